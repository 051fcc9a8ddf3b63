"""Layout bookkeeping for the rules: which tensor dim carries which image axis, the rule
context, broadcasting and position-dependent operands."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch.fx as fx

from ..meta import META_SHAPE, META_VARY
from ..ops import OpInfo
from .effects import TOKENS, Factor, Flow, Layout, SpatialInfo, factor_axes
from .maps import AxisOp, Unsupported


class RuleContext:
    """What a rule sees: the node, its :class:`OpInfo`, the operands' infos (``None`` for
    operands that do not depend on the image), their shapes and the output shape."""

    def __init__(self, node: fx.Node, op: OpInfo, operands: list[fx.Node], ins: list[Optional[SpatialInfo]]):
        self.node = node
        self.op = op
        self.params = op.params
        self.operands = operands
        self.ins = ins
        self.shapes = [o.meta.get(META_SHAPE) for o in operands]
        self.out_shape = node.meta.get(META_SHAPE)

    def vary(self, i: int) -> tuple[bool, ...]:
        v = self.operands[i].meta.get(META_VARY)
        return tuple(v) if v is not None else tuple(s > 1 for s in self.shapes[i])


# -- layout helpers ------------------------------------------------------------------------
def spatial(facs: Sequence[Factor]) -> list[str]:
    return [a for n, size in facs for a, _ in factor_axes(n, size)]


def canon(facs: Sequence[Factor]) -> tuple[Factor, ...]:
    """Drop size-1 factors and merge neighbouring non-spatial ones."""
    out: list[Factor] = []
    facs = [f for f in facs if f[1] > 1]
    kinds = {n for n, _ in facs if n in ("", "*")}
    for n, s in facs:
        if n == "*" and "" in kinds or n == "*" and spatial(facs):
            n = ""
        if out and n in ("", "*") and out[-1][0] == n:
            out[-1] = (n, out[-1][1] * s)
        else:
            out.append((n, s))
    return tuple(out)


def plain(size: int, name: str = "") -> tuple[Factor, ...]:
    return ((name, size),) if size > 1 else ()


def image_layout(shape: tuple, axes: Sequence[str]) -> Layout:
    nd = len(axes)
    lead = [plain(s) for s in shape[: len(shape) - nd]]
    return tuple(lead + [plain(s, a) for s, a in zip(shape[len(shape) - nd:], axes)])


def reshape_layout(layout: Layout, out_shape: Sequence[int]) -> tuple[Layout, dict[str, AxisOp]]:
    """The layout after a reshape, and the index map it applies to each image axis it
    splits or merges.

    - *split* (space-to-depth: ``(h p) -> h, p``): the outer part keeps the axis, the inner
      part becomes a plain (channel-like) factor; outer position o covers pixels
      ``o p .. o p + p - 1`` (the map of ``PixelUnshuffle``).
    - *merge* (depth-to-space: ``h, p -> (h p)``): a dim holding one image axis followed by
      plain factors of total size r becomes that axis at r times the resolution; position q
      reads position ``q // r`` (the map of ``PixelShuffle``).  A plain factor *before* the
      axis (a batch of rows, ``(b h)``) is kept as is.
    A reshape that splits and merges one axis at once, or that puts an axis's outer part
    anywhere but first, is refused (:class:`Unsupported`).
    """
    queue: list[Factor] = [f for facs in layout for f in facs if f[1] > 1]
    out: list[tuple[Factor, ...]] = []
    ops: dict[str, AxisOp] = {}

    def add(axis: str, op: AxisOp) -> None:
        if axis in ops:
            raise Unsupported(f"reshape to {tuple(out_shape)} splits and merges image axis {axis} at once")
        ops[axis] = op

    for s in out_shape:
        s = int(s)
        if s == 1:
            out.append(())
            continue
        got: list[Factor] = []
        acc = 1
        while acc < s:
            if not queue or s % acc:
                raise Unsupported(f"reshape to {tuple(out_shape)} does not regroup the dims cleanly")
            name, size = queue[0]
            need = s // acc
            if need % size == 0:
                got.append(queue.pop(0))
                acc *= size
            elif size % need == 0:
                inner = size // need
                if name.startswith(TOKENS):
                    raise Unsupported(f"reshape to {tuple(out_shape)} splits a token dim that holds extra tokens")
                if name not in ("", "*"):
                    add(name, AxisOp(1, inner, (tuple(range(inner)),), "none",
                                     label=f"reshape splits {name} {size} -> {need} x {inner} (space-to-depth)"))
                    queue[0] = ("", inner)
                else:
                    queue[0] = (name, inner)
                got.append((name, need))
                acc *= need
            else:
                raise Unsupported(f"reshape to {tuple(out_shape)} mixes dims of sizes {size} and {need}")
        out.append(_merge_depth(canon(got), add))
    if queue:
        raise Unsupported(f"reshape to {tuple(out_shape)} leaves factors {queue} unplaced")
    return tuple(out), ops


def _merge_depth(facs: tuple[Factor, ...], add: Callable[[str, AxisOp], None]) -> tuple[Factor, ...]:
    """A dim ``(axis n, plain r...)`` becomes ``(axis n r)`` with the depth-to-space map."""
    sp = [i for i, (name, _) in enumerate(facs) if name not in ("", "*")]
    if len(sp) != 1 or sp[0] == len(facs) - 1 or facs[sp[0]][0].startswith(TOKENS):
        return facs
    i = sp[0]
    name, n = facs[i]
    r = math.prod(size for _, size in facs[i + 1:])
    add(name, AxisOp(r, 1, tuple((0,) for _ in range(r)), "none",
                     label=f"reshape merges {name} {n} x {r} -> {n * r} (depth-to-space)"))
    return facs[:i] + ((name, n * r),)


def id_flows(i: int, facs: Sequence[Factor]) -> list[Flow]:
    return [Flow(i, a, "id") for a in spatial(facs)]


def global_flows(i: int, facs: Sequence[Factor]) -> list[Flow]:
    return [Flow(i, a, "global") for a in spatial(facs)]


def position_check(ctx: RuleContext, i: int, out_layout: Layout, dim_map: Callable[[int], Optional[int]],
                    why: str) -> Optional[tuple[str, tuple[str, ...], str]]:
    """An image-independent operand that varies along an output dim carrying image axes
    is a position-dependent term (learned position embedding, coordinate channels)."""
    shape = ctx.shapes[i]
    vary = ctx.vary(i)
    axes: list[str] = []
    for j, facs in enumerate(out_layout):
        sp = spatial(facs)
        if not sp:
            continue
        d = dim_map(j)
        if d is None or d < 0 or d >= len(shape):
            continue
        if shape[d] > 1 and vary[d]:
            axes.extend(sp)
    if axes:
        return (ctx.operands[i].name, tuple(dict.fromkeys(axes)), why)
    return None


def broadcast(ctx: RuleContext, skip_dim: Optional[int] = None, why: str = "added / multiplied") -> tuple[Layout, list[Flow], list]:
    """Elementwise broadcasting: output layout, identity flows, position-dependent operands.

    Image-dependent operands give the layout (a dim carrying an image axis wins over a
    non-spatial one; two different image layouts on one dim are refused).  ``skip_dim``
    is the concatenation dim, filled in by the caller.
    """
    out_shape = ctx.out_shape
    nd = len(out_shape)

    def dim_of(i: int, j: int) -> Optional[int]:
        d = j - (nd - len(ctx.shapes[i]))
        return d if d >= 0 else None

    layout: list[tuple[Factor, ...]] = []
    for j in range(nd):
        chosen: Optional[tuple[Factor, ...]] = None
        star = plain_other = False
        for i, info in enumerate(ctx.ins):
            d = dim_of(i, j)
            if d is None or ctx.shapes[i][d] == 1 or j == skip_dim:
                continue
            if info is None:
                plain_other = True
                continue
            facs = info.layout[d]
            if all(n == "*" for n, _ in facs):
                star = True
                continue
            if chosen is None:
                chosen = facs
            elif facs != chosen:
                if spatial(facs) and spatial(chosen):
                    raise Unsupported(f"operands with different spatial layouts are combined ({chosen} vs {facs})")
                if spatial(facs):
                    chosen = facs
        if chosen is None:
            chosen = plain(int(out_shape[j]), "*" if star and not plain_other else "")
        layout.append(chosen)
    flows: list[Flow] = []
    position = []
    for i, info in enumerate(ctx.ins):
        off = nd - len(ctx.shapes[i])
        if info is None:
            p = position_check(ctx, i, tuple(layout), lambda j, off=off: (j - off) if j != skip_dim else None, why)
            if p:
                position.append(p)
            continue
        for d, facs in enumerate(info.layout):
            if spatial(facs) and facs == layout[d + off]:
                flows.extend(id_flows(i, facs))
    return tuple(layout), flows, position
