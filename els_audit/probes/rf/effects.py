"""What the receptive-field pass knows per node and what a rule says about one op."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union


from .maps import AxisOp, PeriodicMap

Factor = tuple[str, int]  # (name, size): name is an axis ("H"), "" (non-spatial) or "*" (broadcast copy)
Layout = tuple[tuple[Factor, ...], ...]
#: the name prefix of a *token* factor: positions that hold image factors between extra
#: tokens (``torch.cat((time_token, tokens), dim=1)`` in U-ViT / in-context conditioning)
TOKENS = "+"


def token_factor(before: int, after: int, inner: tuple[Factor, ...]) -> Factor:
    """A dim of ``before`` extra tokens, the image factors ``inner``, then ``after`` extra tokens."""
    size = before + after
    n = 1
    for _, s in inner:
        n *= s
    return (f"{TOKENS}{before}{TOKENS}{after}|" + ";".join(f"{a}:{s}" for a, s in inner), size + n)


def parse_tokens(name: str) -> tuple[int, int, tuple[Factor, ...]]:
    """(before, after, inner factors) of a token factor's name."""
    head, inner = name[len(TOKENS):].split("|", 1)
    before, after = head.split(TOKENS)
    facs = tuple((a, int(s)) for a, s in (f.rsplit(":", 1) for f in inner.split(";"))) if inner else ()
    return int(before), int(after), facs


def factor_axes(name: str, size: int) -> list[tuple[str, int]]:
    """The image axes a factor carries, with their sizes (none for ``""`` / ``"*"``)."""
    if name in ("", "*"):
        return []
    if name.startswith(TOKENS):
        return [(a, s) for a, s in parse_tokens(name)[2] if a not in ("", "*")]
    return [(name, size)]


# ----------------------------------------------------------------------------------------
# Per-node state and rule effects
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpatialInfo:
    """What the RF pass knows about one image-dependent tensor.

    Attributes:
        layout: per tensor dim, its factors ``(name, size)``: an image axis (``"H"``),
            ``""`` (non-spatial) or ``"*"`` (broadcast copy).  ``(B, HW, C)`` tokens of a
            16x16 image: ``((("", B),), (("H", 16), ("W", 16)), (("", C),))``.
        maps: local dependence map per image axis present in the layout.
        global_srcs: names of the global-mixing nodes upstream.
    """

    layout: Layout
    maps: Mapping[str, PeriodicMap]
    global_srcs: frozenset[str]

    def axes(self) -> dict[str, tuple[int, int]]:
        """Image axis -> (tensor dim, size at this node)."""
        out = {}
        for d, facs in enumerate(self.layout):
            for name, size in facs:
                for a, s in factor_axes(name, size):
                    out[a] = (d, s)
        return out

    def layout_str(self) -> str:
        parts = []
        for facs in self.layout:
            if not facs:
                parts.append("1")
            else:
                parts.append("".join(_show(n, s) for n, s in facs))
        return ",".join(parts)


def _show(name: str, size: int) -> str:
    if name in ("", "*"):
        return "." if name == "" else "*"
    if name.startswith(TOKENS):
        return TOKENS + "".join(a for a, _ in factor_axes(name, size))
    return name


@dataclass(frozen=True)
class Flow:
    """Data flow from operand ``operand`` along image axis ``axis``: ``"id"`` (same
    positions), an :class:`AxisOp`, or ``"global"`` (all positions mixed)."""

    operand: int
    axis: str
    transform: Union[str, AxisOp]


@dataclass(frozen=True)
class GlobalMix:
    """This node mixes all positions along ``axes``.  ``equivariant``: the mixing is
    permutation-equivariant (attention, statistics, mean), so it does not by itself break
    circular-shift equivariance; a Linear over flattened space is not."""

    axes: tuple[str, ...]
    reason: str
    equivariant: bool


@dataclass(frozen=True)
class Effect:
    """What a rule says about one node: the output layout, the flows, global mixing,
    position-dependent operands (name, axes, why), and the rule's own remarks."""

    layout: Layout
    flows: tuple[Flow, ...] = ()
    mixes: tuple[GlobalMix, ...] = ()
    position: tuple[tuple[str, tuple[str, ...], str], ...] = ()
    unsupported: str = ""


@dataclass(frozen=True)
class RFAnnotation:
    """``node.meta["els_rf"]``: the node's :class:`SpatialInfo` (a tuple of them for
    multi-output ops) and the :class:`Effect` that produced it."""

    info: Union[SpatialInfo, tuple]
    effect: Union[Effect, tuple, None]

    def summary(self) -> dict:
        info = self.info[0] if isinstance(self.info, tuple) and self.info else self.info
        if not isinstance(info, SpatialInfo):
            return {}
        return {
            "layout": info.layout_str(),
            "field": {a: m.size() for a, m in info.maps.items()},
            "scale": {a: str(m.scale) for a, m in info.maps.items()},
            "global": bool(info.global_srcs),
        }
