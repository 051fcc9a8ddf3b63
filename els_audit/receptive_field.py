"""Stage 2 of the architecture probes: the theoretical receptive field of a traced network.

References:
- A. Araujo, W. Norris, J. Sim, "Computing Receptive Fields of Convolutional Neural
  Networks", Distill 2019: per layer ``r_l = r_{l-1} + (k_l - 1) d_l j_{l-1}``,
  ``j_l = j_{l-1} s_l`` (jump, size, offset), for chains.
- Kamb & Ganguli, ICML 2025 (theory.md section 3): the paper's ResNet has a 17 px field;
  its UNet is equivariant only to shifts by multiples of 2^levels.

What we do beyond the chain recursion (which folds layers in execution order and is wrong
on skips, transposed convolutions and upsampling): per spatial axis, every node carries an
exact *periodic interval map* (:class:`PeriodicMap`) from its own positions ``o`` to the
interval ``[lo(o), hi(o)]`` of image pixels it depends on, on an infinite image:
``lo(o + n) = lo(o) + D``.  ``n`` is the phase period and ``D / n`` the jump.  Convs,
pools, transposed convs, nearest / linear upsampling, pixel (un)shuffle and padding are
index maps (:class:`AxisOp`: output ``o`` reads input taps ``taps(o)``), applied exactly per
phase; adds and concatenations take the union of their branches.  Layout tracking
(which tensor dim carries which image axis, through view / flatten / permute) lets the
same engine follow attention written as ``flatten -> Linear -> bmm -> softmax``.

Ops that mix all positions along an axis (attention, softmax or statistics over space,
global pooling, a Linear over flattened space) become *global flows*: they are reported as
``global_paths``, and the *local* field is the field of the paths that avoid them.  An op
with no rule is listed in ``unsupported_ops``, makes the result partial, and is treated
as global (never as local).

Per-op rules are registered with :func:`rf_rule` (one per op kind, duplicates refused).
Every node on the image path gets ``node.meta["els_rf"]`` (:class:`RFAnnotation`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.fx as fx

from .trace import META_IMAGE, META_ON_PATH, META_OP, META_SHAPE, META_VARY, OpInfo, TraceResult

__all__ = [
    "AxisOp",
    "PeriodicMap",
    "SpatialInfo",
    "Flow",
    "GlobalMix",
    "Effect",
    "RFAnnotation",
    "AxisField",
    "GlobalPath",
    "UnsupportedOp",
    "ReceptiveFieldResult",
    "ProbeResult",
    "Unsupported",
    "RF_RULES",
    "rf_rule",
    "receptive_field",
    "probe_receptive_field",
    "META_RF",
]

META_RF = "els_rf"

_BIG = 1 << 40  # "no dependence" sentinel for an interval bound
Factor = tuple[str, int]  # (name, size): name is an axis ("H"), "" (non-spatial) or "*" (broadcast copy)
Layout = tuple[tuple[Factor, ...], ...]


class Unsupported(Exception):
    """Raised by a rule for a call pattern it does not model (reported, never guessed)."""


# ----------------------------------------------------------------------------------------
# Index maps
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AxisOp:
    """How one op maps one spatial axis: output position ``o`` reads input positions
    ``taps(o)``, periodic as ``taps(o + k n_out) = taps(o mod n_out) + k n_in``.

    Attributes:
        n_out, n_in: the period in output / input positions (conv stride s: ``(1, s)``;
            transposed conv or nearest upsampling by s: ``(s, 1)``).
        taps: for ``o = 0 .. n_out - 1`` the input positions read (may be negative or past
            the end: those are padding, handled by ``boundary``).
        boundary: what an out-of-range tap reads: ``"zeros"`` (any constant, incl. the
            -inf of max pooling), ``"reflect"``, ``"replicate"``, ``"circular"``, or
            ``"none"`` (never happens for this op).
        finite_taps: exact taps for the example's sizes when the op is not translation
            periodic (``align_corners=True`` resampling); ``None`` otherwise.
        label: short description, e.g. ``"conv k3 s1 d1 pad(1,1) zeros"``.
    """

    n_out: int
    n_in: int
    taps: tuple[tuple[int, ...], ...]
    boundary: str = "none"
    finite_taps: Optional[tuple[tuple[int, ...], ...]] = None
    label: str = ""

    @property
    def downsample(self) -> Fraction:
        """Input positions per output position (the op's own stride)."""
        return Fraction(self.n_in, self.n_out)

    def _tap_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        T = max(1, max(len(t) for t in self.taps))
        m = np.zeros((self.n_out, T), dtype=np.int64)
        valid = np.zeros((self.n_out, T), dtype=bool)
        for o, row in enumerate(self.taps):
            m[o, : len(row)] = row
            valid[o, : len(row)] = True
        return m, valid

    def taps_for(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Taps of many output positions: (positions [P], T) int array and a validity mask."""
        m, valid = self._tap_matrix()
        k, r = np.divmod(positions, self.n_out)
        return m[r] + (k * self.n_in)[:, None], valid[r]

    def finite(self, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Taps on a finite axis of ``n_in`` -> ``n_out`` positions, boundary applied.

        Returns:
            idx: (n_out, T) int64 input index read by each tap, ``-1`` where the tap reads
                a constant (zero padding / nothing);
            valid: (n_out, T) bool, the tap exists;
            touched: (n_out,) bool, the output reads padding (the boundary condition).
        """
        if self.finite_taps is not None:
            T = max(1, max(len(t) for t in self.finite_taps))
            q = np.zeros((n_out, T), dtype=np.int64)
            valid = np.zeros((n_out, T), dtype=bool)
            for o, row in enumerate(self.finite_taps[:n_out]):
                q[o, : len(row)] = row
                valid[o, : len(row)] = True
        else:
            q, valid = self.taps_for(np.arange(n_out))
        out_of_range = valid & ((q < 0) | (q >= n_in))
        touched = out_of_range.any(axis=1) & (self.boundary not in ("circular",))
        idx = q.copy()
        if self.boundary == "circular":
            idx = np.mod(q, n_in)
        elif self.boundary == "reflect":
            if n_in == 1:
                idx = np.zeros_like(q)
            else:
                period = 2 * (n_in - 1)
                r = np.mod(q, period)
                idx = np.where(r > n_in - 1, period - r, r)
        elif self.boundary == "replicate":
            idx = np.clip(q, 0, n_in - 1)
        else:  # zeros / none: an out-of-range tap reads a constant
            idx = np.where(out_of_range, -1, q)
        idx = np.where(valid, idx, -1)
        return idx, valid, touched


@dataclass(frozen=True)
class PeriodicMap:
    """Exact dependence interval of each position of a node along one axis, on an
    infinite image: ``[lo(o), hi(o)]`` with ``lo(o + n) = lo(o) + D`` (same for hi).

    ``lo[r] > hi[r]`` marks a phase that depends on no image pixel.
    """

    n: int
    D: int
    lo: tuple[int, ...]
    hi: tuple[int, ...]

    @staticmethod
    def identity() -> "PeriodicMap":
        return PeriodicMap(1, 1, (0,), (0,))

    @property
    def scale(self) -> Fraction:
        """Jump: image pixels per node position."""
        return Fraction(self.D, self.n)

    def eval(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k, r = np.divmod(q, self.n)
        lo = np.asarray(self.lo, dtype=np.int64)[r] + k * self.D
        hi = np.asarray(self.hi, dtype=np.int64)[r] + k * self.D
        return lo, hi

    @staticmethod
    def _make(n: int, D: int, lo: np.ndarray, hi: np.ndarray) -> "PeriodicMap":
        empty = (lo > _BIG // 2) | (hi < -_BIG // 2) | (lo > hi)
        lo = np.where(empty, _BIG, lo)
        hi = np.where(empty, -_BIG, hi)
        # Smallest period that reproduces the map.
        for d in range(1, n):
            if n % d or (D * d) % n:
                continue
            step = D * d // n
            e = empty
            if not np.array_equal(e[d:], e[:-d]):
                continue
            ok = ~e[d:]
            if np.array_equal(lo[d:][ok], lo[:-d][ok] + step) and np.array_equal(hi[d:][ok], hi[:-d][ok] + step):
                return PeriodicMap(d, step, tuple(int(v) for v in lo[:d]), tuple(int(v) for v in hi[:d]))
        return PeriodicMap(n, D, tuple(int(v) for v in lo), tuple(int(v) for v in hi))

    def apply(self, op: AxisOp) -> "PeriodicMap":
        """The map of the op's output: exact, phase by phase."""
        m = self.n // math.gcd(self.n, op.n_in)
        n_o = op.n_out * m
        D_o = self.D * (m * op.n_in // self.n)
        q, valid = op.taps_for(np.arange(n_o))
        lo, hi = self.eval(q)
        lo = np.where(valid, lo, _BIG).min(axis=1)
        hi = np.where(valid, hi, -_BIG).max(axis=1)
        return PeriodicMap._make(n_o, D_o, lo, hi)

    def union(self, other: "PeriodicMap") -> "PeriodicMap":
        if self.scale != other.scale:
            raise Unsupported(f"branches at different scales ({self.scale} vs {other.scale} px per position) are combined")
        n = self.n * other.n // math.gcd(self.n, other.n)
        D = self.D * (n // self.n)
        q = np.arange(n)
        l1, h1 = self.eval(q)
        l2, h2 = other.eval(q)
        return PeriodicMap._make(n, D, np.minimum(l1, l2), np.maximum(h1, h2))

    def phases(self) -> list[Optional[tuple[Fraction, Fraction]]]:
        """Per phase o: (lo(o) - o j, hi(o) - o j) relative to the position's own image
        coordinate ``o j`` (``None`` for a phase that depends on nothing)."""
        out = []
        for o in range(self.n):
            if self.lo[o] > self.hi[o]:
                out.append(None)
            else:
                c = Fraction(o * self.D, self.n)
                out.append((self.lo[o] - c, self.hi[o] - c))
        return out

    def size(self) -> int:
        sizes = [h - l + 1 for l, h in zip(self.lo, self.hi) if l <= h]
        return max(sizes) if sizes else 0

    def is_empty(self) -> bool:
        return all(l > h for l, h in zip(self.lo, self.hi))

    def to_dict(self) -> dict:
        return {"period": self.n, "shift": self.D, "lo": list(self.lo), "hi": list(self.hi)}


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
                if name not in ("", "*"):
                    out[name] = (d, size)
        return out

    def layout_str(self) -> str:
        parts = []
        for facs in self.layout:
            if not facs:
                parts.append("1")
            else:
                parts.append("".join(n if n not in ("", "*") else ("." if n == "" else "*") for n, _ in facs))
        return ",".join(parts)


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


# ----------------------------------------------------------------------------------------
# Rule table
# ----------------------------------------------------------------------------------------
class _RuleTable:
    def __init__(self, what: str):
        self.what = what
        self._rules: dict[str, Callable] = {}

    def register(self, *kinds: str) -> Callable:
        def deco(fn: Callable) -> Callable:
            for k in kinds:
                if k in self._rules:
                    raise ValueError(f"{self.what} rule for op kind {k!r} already registered "
                                     f"({self._rules[k].__qualname__}); refusing {fn.__qualname__}")
                self._rules[k] = fn
            return fn

        return deco

    def get(self, kind: str) -> Optional[Callable]:
        return self._rules.get(kind)

    def kinds(self) -> list[str]:
        return sorted(self._rules)

    def __contains__(self, kind: str) -> bool:
        return kind in self._rules


#: Receptive-field rules, one per canonical op kind.
RF_RULES = _RuleTable("receptive-field")
rf_rule = RF_RULES.register


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
def _spatial(facs: Sequence[Factor]) -> list[str]:
    return [n for n, _ in facs if n not in ("", "*")]


def _canon(facs: Sequence[Factor]) -> tuple[Factor, ...]:
    """Drop size-1 factors and merge neighbouring non-spatial ones."""
    out: list[Factor] = []
    facs = [f for f in facs if f[1] > 1]
    kinds = {n for n, _ in facs if n in ("", "*")}
    for n, s in facs:
        if n == "*" and "" in kinds or n == "*" and _spatial(facs):
            n = ""
        if out and n in ("", "*") and out[-1][0] == n:
            out[-1] = (n, out[-1][1] * s)
        else:
            out.append((n, s))
    return tuple(out)


def _plain(size: int, name: str = "") -> tuple[Factor, ...]:
    return ((name, size),) if size > 1 else ()


def _image_layout(shape: tuple, axes: Sequence[str]) -> Layout:
    nd = len(axes)
    lead = [_plain(s) for s in shape[: len(shape) - nd]]
    return tuple(lead + [_plain(s, a) for s, a in zip(shape[len(shape) - nd:], axes)])


def _reshape_layout(layout: Layout, out_shape: Sequence[int]) -> Layout:
    queue: list[Factor] = [f for facs in layout for f in facs if f[1] > 1]
    out: list[tuple[Factor, ...]] = []
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
                if name not in ("", "*"):
                    raise Unsupported(f"reshape splits image axis {name} ({size} -> {need} x {size // need}): "
                                      "patch reshapes are not modelled")
                got.append((name, need))
                queue[0] = (name, size // need)
                acc *= need
            else:
                raise Unsupported(f"reshape to {tuple(out_shape)} mixes dims of sizes {size} and {need}")
        out.append(_canon(got))
    if queue:
        raise Unsupported(f"reshape to {tuple(out_shape)} leaves factors {queue} unplaced")
    return tuple(out)


def _id_flows(i: int, facs: Sequence[Factor]) -> list[Flow]:
    return [Flow(i, a, "id") for a in _spatial(facs)]


def _global_flows(i: int, facs: Sequence[Factor]) -> list[Flow]:
    return [Flow(i, a, "global") for a in _spatial(facs)]


def _position_check(ctx: RuleContext, i: int, out_layout: Layout, dim_map: Callable[[int], Optional[int]],
                    why: str) -> Optional[tuple[str, tuple[str, ...], str]]:
    """An image-independent operand that varies along an output dim carrying image axes
    is a position-dependent term (learned position embedding, coordinate channels)."""
    shape = ctx.shapes[i]
    vary = ctx.vary(i)
    axes: list[str] = []
    for j, facs in enumerate(out_layout):
        sp = _spatial(facs)
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


def _broadcast(ctx: RuleContext, skip_dim: Optional[int] = None, why: str = "added / multiplied") -> tuple[Layout, list[Flow], list]:
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
                if _spatial(facs) and _spatial(chosen):
                    raise Unsupported(f"operands with different spatial layouts are combined ({chosen} vs {facs})")
                if _spatial(facs):
                    chosen = facs
        if chosen is None:
            chosen = _plain(int(out_shape[j]), "*" if star and not plain_other else "")
        layout.append(chosen)
    flows: list[Flow] = []
    position = []
    for i, info in enumerate(ctx.ins):
        off = nd - len(ctx.shapes[i])
        if info is None:
            p = _position_check(ctx, i, tuple(layout), lambda j, off=off: (j - off) if j != skip_dim else None, why)
            if p:
                position.append(p)
            continue
        for d, facs in enumerate(info.layout):
            if _spatial(facs) and facs == layout[d + off]:
                flows.extend(_id_flows(i, facs))
    return tuple(layout), flows, position


# ----------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------
def _axis_of(facs: Sequence[Factor], what: str) -> Optional[str]:
    sp = _spatial(facs)
    if not sp:
        return None
    if len(facs) != 1:
        raise Unsupported(f"{what} over a dim that merges axes {sp}")
    return sp[0]


def _strided_axis_op(kernel: int, stride: int, dilation: int, before: int, boundary: str, label: str) -> AxisOp:
    return AxisOp(1, stride, (tuple(-before + dilation * k for k in range(kernel)),), boundary, label=label)


_BOUNDARY = {"zeros": "zeros", "constant(-inf)": "zeros", "reflect": "reflect", "replicate": "replicate",
             "circular": "circular"}


def _spatial_op_effect(ctx: RuleContext, nd: int, axis_ops: Sequence[Callable[[int, int], AxisOp]],
                       channel_to: Optional[int] = None, contract_channels: bool = False,
                       what: str = "op") -> Effect:
    """Common shape of conv / pool / upsample / pixel-shuffle: the last ``nd`` dims are
    mapped by ``axis_ops[k](n_in, n_out)``; the channel dim is replaced (and contracted,
    for convs)."""
    i = 0
    info = ctx.ins[0]
    if info is None:
        raise Unsupported(f"{what}: the data operand does not depend on the image but a weight does")
    in_shape, out_shape = ctx.shapes[0], ctx.out_shape
    L = len(in_shape)
    layout = list(info.layout)
    flows: list[Flow] = []
    mixes: list[GlobalMix] = []
    for k in range(nd):
        d = L - nd + k
        facs = info.layout[d]
        ax = _axis_of(facs, what)
        n_in, n_out = in_shape[d], out_shape[d]
        if ax is None:
            layout[d] = _plain(n_out)
            continue
        op = axis_ops[k](n_in, n_out)
        flows.append(Flow(i, ax, op))
        layout[d] = _plain(n_out, ax)
    c = L - nd - 1
    if c >= 0:
        if contract_channels and _spatial(info.layout[c]):
            sp = _spatial(info.layout[c])
            flows.extend(_global_flows(i, info.layout[c]))
            mixes.append(GlobalMix(tuple(sp), f"{what} weights contract a dim carrying image axes {sp}", False))
            layout[c] = _plain(out_shape[c])
        elif channel_to is not None or contract_channels:
            if _spatial(info.layout[c]):
                raise Unsupported(f"{what} regroups a channel dim carrying image axes")
            layout[c] = _plain(out_shape[c])
        else:
            flows.extend(_id_flows(i, info.layout[c]))
    for d in range(max(c, 0)):
        flows.extend(_id_flows(i, info.layout[d]))
    return Effect(tuple(layout), tuple(flows), tuple(mixes))


@rf_rule("conv")
def _rf_conv(ctx: RuleContext) -> Effect:
    p = ctx.params
    nd = p["nd"]
    if any(info is not None for info in ctx.ins[1:]):
        raise Unsupported("conv weights computed from the image (dynamic convolution)")
    mode = _BOUNDARY[p["padding_mode"]]

    def make(k: int) -> Callable[[int, int], AxisOp]:
        K, s, d = p["kernel"][k], p["stride"][k], p["dilation"][k]
        before, after = p["padding"][k]
        label = f"conv k{K} s{s} d{d} pad({before},{after}) {p['padding_mode']}"
        return lambda n_in, n_out: _strided_axis_op(K, s, d, before, mode, label)

    return _spatial_op_effect(ctx, nd, [make(k) for k in range(nd)], contract_channels=True, what="conv")


@rf_rule("conv_transpose")
def _rf_conv_transpose(ctx: RuleContext) -> Effect:
    p = ctx.params
    nd = p["nd"]
    if any(info is not None for info in ctx.ins[1:]):
        raise Unsupported("transposed-conv weights computed from the image")

    def make(k: int) -> Callable[[int, int], AxisOp]:
        K, s, d = p["kernel"][k], p["stride"][k], p["dilation"][k]
        pb = p["padding"][k][0]
        taps = []
        for o in range(s):
            taps.append(tuple((o + pb - d * kk) // s for kk in range(K) if (o + pb - d * kk) % s == 0))
        label = f"conv_transpose k{K} s{s} d{d} pad{pb}"
        # NB: an output that reads a missing input (past either end) lacks terms: a
        # zero-padding-like boundary effect.
        return lambda n_in, n_out: AxisOp(s, 1, tuple(taps), "zeros", label=label)

    return _spatial_op_effect(ctx, nd, [make(k) for k in range(nd)], contract_channels=True, what="conv_transpose")


@rf_rule("pool")
def _rf_pool(ctx: RuleContext) -> Effect:
    p = ctx.params
    nd = p["nd"]
    mode = _BOUNDARY[p["padding_mode"]]

    def make(k: int) -> Callable[[int, int], AxisOp]:
        K, s, d = p["kernel"][k], p["stride"][k], p["dilation"][k]
        before = p["padding"][k][0]
        label = f"{p['pool']}pool k{K} s{s} pad{before}"
        return lambda n_in, n_out: _strided_axis_op(K, s, d, before, mode, label)

    return _spatial_op_effect(ctx, nd, [make(k) for k in range(nd)], what="pool")


@rf_rule("adaptive_pool")
def _rf_adaptive_pool(ctx: RuleContext) -> Effect:
    nd = ctx.params["nd"]
    info = ctx.ins[0]
    in_shape, out_shape = ctx.shapes[0], ctx.out_shape
    L = len(in_shape)
    layout = list(info.layout)
    flows: list[Flow] = []
    pooled: list[str] = []
    for d in range(L - nd):
        flows.extend(_id_flows(0, info.layout[d]))
    for k in range(nd):
        d = L - nd + k
        facs = info.layout[d]
        ax = _axis_of(facs, "adaptive pool")
        n_in, n_out = in_shape[d], out_shape[d]
        if ax is None:
            layout[d] = _plain(n_out)
            continue
        if n_out == 1:
            flows.append(Flow(0, ax, "global"))
            pooled.append(ax)
            layout[d] = ()
        elif n_in == n_out:
            flows.append(Flow(0, ax, "id"))
        elif n_in % n_out == 0:
            r = n_in // n_out
            flows.append(Flow(0, ax, AxisOp(1, r, (tuple(range(r)),), "none", label=f"adaptive pool {n_in}->{n_out}")))
            layout[d] = _plain(n_out, ax)
        else:
            raise Unsupported(f"adaptive pooling {n_in}->{n_out} along {ax} has uneven bins")
    mixes = (GlobalMix(tuple(pooled), f"global {ctx.params['pool']} pooling over {','.join(pooled)}", True),) if pooled else ()
    return Effect(tuple(layout), tuple(flows), mixes)


def _upsample_op(mode: str, align_corners: bool, n_in: int, n_out: int) -> AxisOp:
    r = Fraction(n_out, n_in)
    p, q = r.numerator, r.denominator
    # NB: the source index uses the size ratio n_in / n_out; PyTorch uses 1 / scale_factor
    # when a scale factor is given, which differs only for non-integer factors.
    if mode in ("nearest", "nearest-exact"):
        off = Fraction(1, 2) if mode == "nearest-exact" else Fraction(0)
        taps = tuple((math.floor((o + off) * q / p),) for o in range(p))
        return AxisOp(p, q, taps, "replicate" if mode == "nearest-exact" else "none", label=f"{mode} x{r}")
    if mode in ("linear", "bilinear", "trilinear", "bicubic"):
        cubic = mode == "bicubic"
        taps = []
        for o in range(p):
            src = (o + Fraction(1, 2)) * q / p - Fraction(1, 2)
            i0 = math.floor(src)
            if cubic:
                taps.append(tuple(range(i0 - 1, i0 + 3)))
            else:
                taps.append((i0,) if src == i0 else (i0, i0 + 1))
        finite = None
        if align_corners:
            # NB: align_corners=True resamples on a grid stretched to the corners: not
            # translation-periodic.  The infinite-image map uses the align_corners=False
            # taps (an approximation); the finite boundary analysis uses the exact taps.
            rows = []
            for o in range(n_out):
                src = Fraction(o * (n_in - 1), n_out - 1) if n_out > 1 else Fraction(0)
                i0 = math.floor(src)
                rows.append(tuple(range(i0 - 1, i0 + 3)) if cubic else ((i0,) if src == i0 else (i0, min(i0 + 1, n_in - 1))))
            finite = tuple(rows)
        # Edge samples clamp to the first / last input: a replicate-like boundary.
        return AxisOp(p, q, tuple(taps), "replicate", finite_taps=finite,
                      label=f"{mode} x{r}" + (" align_corners" if align_corners else ""))
    raise Unsupported(f"upsampling mode {mode!r} is not modelled")


@rf_rule("upsample")
def _rf_upsample(ctx: RuleContext) -> Effect:
    p = ctx.params
    nd = p["nd"]
    ops = [lambda n_in, n_out: _upsample_op(p["mode"], p["align_corners"], n_in, n_out)] * nd
    eff = _spatial_op_effect(ctx, nd, ops, what="upsample")
    if p["align_corners"] and p["mode"] != "nearest":
        axes = tuple(a for a in ctx.ins[0].axes())
        eff = Effect(eff.layout, eff.flows, eff.mixes,
                     ((ctx.node.name, axes, "align_corners=True resampling is not translation-periodic"),))
    return eff


@rf_rule("pixel_shuffle")
def _rf_pixel_shuffle(ctx: RuleContext) -> Effect:
    r = ctx.params["factor"]
    op = AxisOp(r, 1, tuple((0,) for _ in range(r)), "none", label=f"pixel_shuffle x{r}")
    return _spatial_op_effect(ctx, 2, [lambda a, b: op] * 2, channel_to=1, what="pixel_shuffle")


@rf_rule("pixel_unshuffle")
def _rf_pixel_unshuffle(ctx: RuleContext) -> Effect:
    r = ctx.params["factor"]
    op = AxisOp(1, r, (tuple(range(r)),), "none", label=f"pixel_unshuffle /{r}")
    return _spatial_op_effect(ctx, 2, [lambda a, b: op] * 2, channel_to=1, what="pixel_unshuffle")


@rf_rule("pad")
def _rf_pad(ctx: RuleContext) -> Effect:
    info = ctx.ins[0]
    per_dim = ctx.params["padding"]  # for the trailing dims, in order
    mode = ctx.params["padding_mode"]
    L = len(ctx.shapes[0])
    first = L - len(per_dim)
    layout = list(info.layout)
    flows: list[Flow] = []
    for d in range(L):
        facs = info.layout[d]
        if d < first or per_dim[d - first] == [0, 0]:
            flows.extend(_id_flows(0, facs))
            continue
        before, after = per_dim[d - first]
        ax = _axis_of(facs, "pad")
        if ax is None:  # padding a non-spatial dim: just a bigger dim
            layout[d] = _plain(ctx.out_shape[d])
            continue
        op = AxisOp(1, 1, ((-before,),), _BOUNDARY.get(mode, mode), label=f"pad({before},{after}) {mode}")
        flows.append(Flow(0, ax, op))
        layout[d] = _plain(ctx.out_shape[d], ax)
    return Effect(tuple(layout), tuple(flows))


@rf_rule("roll")
def _rf_roll(ctx: RuleContext) -> Effect:
    info = ctx.ins[0]
    shifts = dict(zip(ctx.params["dims"], ctx.params["shifts"]))
    flows: list[Flow] = []
    for d, facs in enumerate(info.layout):
        if d in shifts and _spatial(facs):
            ax = _axis_of(facs, "roll")
            flows.append(Flow(0, ax, AxisOp(1, 1, ((-shifts[d],),), "circular", label=f"roll {shifts[d]}")))
        else:
            flows.extend(_id_flows(0, facs))
    return Effect(info.layout, tuple(flows))


@rf_rule("pointwise")
def _rf_pointwise(ctx: RuleContext) -> Effect:
    layout, flows, position = _broadcast(ctx)
    return Effect(layout, tuple(flows), (), tuple(position))


@rf_rule("batchnorm")
def _rf_batchnorm(ctx: RuleContext) -> Effect:
    info = ctx.ins[0]
    flows = [f for facs in info.layout for f in _id_flows(0, facs)]
    mixes: tuple = ()
    if ctx.params.get("batch_statistics"):
        axes = tuple(info.axes())
        flows += [Flow(0, a, "global") for a in axes]
        mixes = (GlobalMix(axes, "batch-norm batch statistics (training mode) over B and space", True),)
    return Effect(info.layout, tuple(flows), mixes)


@rf_rule("norm")
def _rf_norm(ctx: RuleContext) -> Effect:
    info = ctx.ins[0]
    dims = ctx.params["normalized_dims"]
    flows = [f for facs in info.layout for f in _id_flows(0, facs)]
    axes = [a for d in dims for a in _spatial(info.layout[d])]
    mixes: tuple = ()
    if axes:
        flows += [Flow(0, a, "global") for a in axes]
        mixes = (GlobalMix(tuple(axes), f"{ctx.params.get('norm', 'norm')} statistics over {','.join(axes)}", True),)
    return Effect(info.layout, tuple(flows), mixes)


@rf_rule("softmax")
def _rf_softmax(ctx: RuleContext) -> Effect:
    info = ctx.ins[0]
    d = ctx.params["dim"]
    flows = [f for facs in info.layout for f in _id_flows(0, facs)]
    axes = _spatial(info.layout[d]) if d < len(info.layout) else []
    mixes: tuple = ()
    if axes:
        flows += [Flow(0, a, "global") for a in axes]
        mixes = (GlobalMix(tuple(axes), f"softmax over {','.join(axes)}", True),)
    return Effect(info.layout, tuple(flows), mixes)


@rf_rule("reduce")
def _rf_reduce(ctx: RuleContext) -> Effect:
    info = ctx.ins[0]
    dims = set(ctx.params["dims"])
    keep = len(ctx.out_shape) == len(ctx.shapes[0])
    layout: list = []
    flows: list[Flow] = []
    axes: list[str] = []
    for d, facs in enumerate(info.layout):
        if d in dims:
            axes.extend(_spatial(facs))
            flows.extend(_global_flows(0, facs))
            if keep:
                layout.append(())
        else:
            layout.append(facs)
            flows.extend(_id_flows(0, facs))
    mixes = (GlobalMix(tuple(axes), f"reduction over {','.join(axes)}", True),) if axes else ()
    return Effect(tuple(layout), tuple(flows), mixes)


@rf_rule("reshape")
def _rf_reshape(ctx: RuleContext) -> Effect:
    info = ctx.ins[0]
    layout = _reshape_layout(info.layout, ctx.out_shape)
    flows = [Flow(0, a, "id") for a in info.axes()]
    return Effect(layout, tuple(flows))


@rf_rule("permute")
def _rf_permute(ctx: RuleContext) -> Effect:
    info = ctx.ins[0]
    perm = ctx.params["perm"]
    layout = tuple(info.layout[p] for p in perm)
    return Effect(layout, tuple(Flow(0, a, "id") for a in info.axes()))


@rf_rule("expand", "repeat")
def _rf_expand(ctx: RuleContext) -> Effect:
    info = ctx.ins[0]
    in_shape, out_shape = ctx.shapes[0], ctx.out_shape
    off = len(out_shape) - len(in_shape)
    layout = []
    for j, s in enumerate(out_shape):
        d = j - off
        if d < 0 or (in_shape[d] == 1 and s > 1):
            layout.append(_plain(s, "*"))
        elif in_shape[d] == s:
            layout.append(info.layout[d])
        else:  # repeat along an existing dim
            if _spatial(info.layout[d]):
                raise Unsupported(f"repeat tiles image axes {_spatial(info.layout[d])}")
            layout.append(_plain(s))
    return Effect(tuple(layout), tuple(Flow(0, a, "id") for a in info.axes()))


@rf_rule("index")
def _rf_index(ctx: RuleContext) -> Effect:
    info = ctx.ins[0]
    layout: list = []
    flows: list[Flow] = []
    mixes: list[GlobalMix] = []
    for spec in ctx.params["specs"]:
        if spec[0] == "new":
            layout.append(())
            continue
        d = spec[1]
        facs = info.layout[d]
        sp = _spatial(facs)
        n = 0 if spec[0] == "select" else len(range(spec[2], spec[3], spec[4]))
        if sp and (spec[0] == "select" or n == 1):
            # Picking one position along an image axis: every output reads that fixed
            # position, wherever it is.
            flows.extend(_global_flows(0, facs))
            mixes.append(GlobalMix(tuple(sp), f"indexing picks a fixed position along {','.join(sp)}", False))
            if spec[0] == "keep":
                layout.append(())
            continue
        if spec[0] == "select":
            continue
        _, _, start, stop, step = spec
        if not sp or (start == 0 and step == 1 and n == ctx.shapes[0][d]):
            layout.append(facs if n == ctx.shapes[0][d] else _plain(n))
            flows.extend(_id_flows(0, facs))
            continue
        ax = _axis_of(facs, "slice")
        flows.append(Flow(0, ax, AxisOp(1, step, ((start,),), "none", label=f"slice {start}:{stop}:{step}")))
        layout.append(_plain(n, ax))
    return Effect(tuple(layout), tuple(flows), tuple(mixes))


@rf_rule("split")
def _rf_split(ctx: RuleContext) -> tuple:
    info = ctx.ins[0]
    d = ctx.params["dim"]
    if _spatial(info.layout[d]):
        raise Unsupported(f"split / chunk along image axes {_spatial(info.layout[d])}")
    effs = []
    for shp in ctx.out_shape:
        if shp is None:
            effs.append(None)
            continue
        if ctx.params.get("unbind"):
            layout = info.layout[:d] + info.layout[d + 1:]
        else:
            layout = info.layout[:d] + (_plain(shp[d]),) + info.layout[d + 1:]
        effs.append(Effect(layout, tuple(Flow(0, a, "id") for a in info.axes())))
    return tuple(effs)


@rf_rule("cat", "stack")
def _rf_cat(ctx: RuleContext) -> Effect:
    d = ctx.params["dim"]
    if ctx.op.kind == "cat":
        for info in ctx.ins:
            if info is not None and _spatial(info.layout[d]):
                raise Unsupported(f"concatenation along image axes {_spatial(info.layout[d])}")
        layout, flows, position = _broadcast(ctx, skip_dim=d, why="concatenated")
        layout = list(layout)
        layout[d] = _plain(ctx.out_shape[d])
        return Effect(tuple(layout), tuple(flows), (), tuple(position))
    # stack: every operand gets a new dim d
    sub = copy.copy(ctx)
    sub.out_shape = tuple(sz for j, sz in enumerate(ctx.out_shape) if j != d)
    layout, flows, position = _broadcast(sub, why="stacked")
    layout = list(layout)
    layout.insert(d, _plain(ctx.out_shape[d]))
    return Effect(tuple(layout), tuple(flows), (), tuple(position))


# -- contractions (Linear, matmul, bmm, einsum, attention) -----------------------------------
def _parse_equation(eq: str, shapes: list[Optional[tuple]]) -> tuple[list[list[str]], list[str]]:
    """Letters per operand dim and per output dim; ``...`` expands to right-aligned
    broadcast letters ``_0, _1, ...``."""
    lhs, rhs = eq.split("->")
    specs = lhs.split(",")
    max_e = 0
    ells = []
    for i, spec in enumerate(specs):
        if "..." in spec:
            if i >= len(shapes) or shapes[i] is None:
                raise Unsupported("an implicit operand cannot have an ellipsis")
            e = len(shapes[i]) - (len(spec) - 3)
            ells.append(e)
            max_e = max(max_e, e)
        else:
            ells.append(0)
    ell_letters = [f"_{k}" for k in range(max_e)]

    def expand(spec: str, e: int) -> list[str]:
        if "..." in spec:
            a, b = spec.split("...")
            return list(a) + ell_letters[max_e - e:] + list(b)
        return list(spec)

    letters = [expand(s, e) for s, e in zip(specs, ells)]
    out = expand(rhs, max_e) if "..." in rhs else list(rhs)
    return letters, out


def _einsum_effect(ctx: RuleContext, attention: bool) -> Effect:
    eq = ctx.params["equation"]
    n_specs = len(eq.split("->")[0].split(","))
    n_ops = len(ctx.ins)
    # Operands beyond the specs are addends (the bias of addmm / linear); specs beyond the
    # operands are implicit parameters (nn.Linear's weight): image-independent, varying.
    spec_shapes = [ctx.shapes[i] if i < n_ops else None for i in range(n_specs)]
    letters, out_letters = _parse_equation(eq, spec_shapes)
    sizes: dict[str, int] = {}
    for i, lets in enumerate(letters):
        if spec_shapes[i] is None:
            continue
        for L, s in zip(lets, spec_shapes[i]):
            sizes[L] = max(sizes.get(L, 1), int(s))
    for L, s in zip(out_letters, ctx.out_shape):
        sizes[L] = max(sizes.get(L, 1), int(s))

    def info_of(i: int) -> Optional[SpatialInfo]:
        return ctx.ins[i] if i < n_ops else None

    def size_of(i: int, d: int) -> int:
        return int(spec_shapes[i][d]) if spec_shapes[i] is not None else sizes.get(letters[i][d], 1)

    what = "attention" if attention else ctx.params.get("op", "contraction")
    # NB: the output keeps the local map of the operand whose dim it inherits (for
    # attention, the query's position); the positions that are summed over (keys,
    # values) are global flows.  So attention's local part is the query path.
    flows: list[Flow] = []
    mixes: list[GlobalMix] = []
    layout: list[tuple[Factor, ...]] = []
    used_axes: set[str] = set()
    for j, L in enumerate(out_letters):
        s = int(ctx.out_shape[j])
        srcs = [(i, d) for i, lets in enumerate(letters) for d, l in enumerate(lets)
                if l == L and info_of(i) is not None and size_of(i, d) > 1
                and not all(n == "*" for n, _ in info_of(i).layout[d])]
        chosen: Optional[tuple[Factor, ...]] = None
        for i, d in srcs:
            facs = info_of(i).layout[d]
            if chosen is None or (_spatial(facs) and not _spatial(chosen)):
                chosen = facs
        if chosen is None:
            chosen = _plain(s)
        sp = _spatial(chosen)
        if sp and used_axes.intersection(sp):
            # The same image axis on two output dims (attention scores q k^T): keep the
            # first, the second indexes *other* positions -> mixing.
            for i, d in srcs:
                if _spatial(info_of(i).layout[d]):
                    flows.extend(_global_flows(i, info_of(i).layout[d]))
            mixes.append(GlobalMix(tuple(sp), f"{what}: pairwise over positions ({','.join(sp)})", True))
            chosen = _plain(s)
        else:
            for i, d in srcs:
                facs = info_of(i).layout[d]
                if not _spatial(facs):
                    continue
                if facs == chosen:
                    flows.extend(_id_flows(i, facs))
                else:
                    flows.extend(_global_flows(i, facs))
                    mixes.append(GlobalMix(tuple(_spatial(facs)), f"{what}: operands with different layouts", True))
            used_axes.update(sp)
        layout.append(chosen)

    contracted = [L for L in dict.fromkeys(l for lets in letters for l in lets) if L not in out_letters]
    for L in contracted:
        holders = [(i, d) for i, lets in enumerate(letters) for d, l in enumerate(lets) if l == L and size_of(i, d) > 1]
        sp_axes: list[str] = []
        for i, d in holders:
            info = info_of(i)
            if info is not None and _spatial(info.layout[d]):
                flows.extend(_global_flows(i, info.layout[d]))
                sp_axes.extend(_spatial(info.layout[d]))
        if sp_axes:
            equivariant = all(info_of(i) is not None for i, _ in holders)
            why = (f"{what} over positions ({','.join(dict.fromkeys(sp_axes))})" if equivariant else
                   f"{what} with fixed weights over flattened space ({','.join(dict.fromkeys(sp_axes))}): "
                   "position-dependent")
            mixes.append(GlobalMix(tuple(dict.fromkeys(sp_axes)), why, equivariant))

    position = []
    for i in range(n_specs):
        if i < n_ops and info_of(i) is None:
            lets = letters[i]

            def dim_map(j: int, lets=lets) -> Optional[int]:
                L = out_letters[j]
                return lets.index(L) if L in lets else None

            p = _position_check(ctx, i, tuple(layout), dim_map, f"enters {what}")
            if p:
                position.append(p)
    # Addends (bias of addmm): elementwise against the output.
    for i in range(n_specs, n_ops):
        off = len(ctx.out_shape) - len(ctx.shapes[i])
        info = ctx.ins[i]
        if info is None:
            p = _position_check(ctx, i, tuple(layout), lambda j, off=off: j - off, "added")
            if p:
                position.append(p)
        else:
            for d, facs in enumerate(info.layout):
                if _spatial(facs):
                    flows.extend(_id_flows(i, facs) if facs == layout[d + off] else _global_flows(i, facs))
    return Effect(tuple(layout), tuple(flows), tuple(mixes), tuple(position))


@rf_rule("einsum")
def _rf_einsum(ctx: RuleContext) -> Effect:
    return _einsum_effect(ctx, attention=False)


@rf_rule("attention")
def _rf_attention(ctx: RuleContext):
    if isinstance(ctx.out_shape, tuple) and ctx.out_shape and isinstance(ctx.out_shape[0], tuple | type(None)):
        # nn.MultiheadAttention returns (out, weights or None): the weights are a
        # (positions x positions) map; treat them as fully mixed.
        first = ctx.out_shape[0]
        sub = copy.copy(ctx)
        sub.out_shape = first
        eff = _einsum_effect(sub, attention=True)
        rest = []
        for shp in ctx.out_shape[1:]:
            if shp is None:
                rest.append(None)
            else:
                axes = tuple(a for info in ctx.ins if info is not None for a in info.axes())
                rest.append(Effect(tuple(_plain(s) for s in shp),
                                   tuple(Flow(i, a, "global") for i, info in enumerate(ctx.ins) if info is not None for a in info.axes()),
                                   (GlobalMix(tuple(dict.fromkeys(axes)), "attention weights", True),)))
        return (eff, *rest)
    return _einsum_effect(ctx, attention=True)


@rf_rule("select_output")
def _rf_select_output(ctx: RuleContext):  # handled by the engine; listed so it is "known"
    raise AssertionError("select_output is resolved by the engine")


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------
def _frac(x: Fraction) -> Union[int, float]:
    return int(x) if x.denominator == 1 else round(float(x), 4)


@dataclass(frozen=True)
class AxisField:
    """The local receptive field along one image axis at the analysed output.

    Attributes:
        axis: ``"H"``, ``"W"`` (or ``"L"``, ``"D"``).
        size: the largest field, in image pixels, over output positions (on an infinite
            image, i.e. away from the borders).  L stacked conv3: ``2L + 1``.
        extent: (lo, hi) offsets of the field relative to the output pixel, over all
            phases (a stride-2 conv then a k2 s2 transposed conv: size 3, extent (-2, 1)).
        centred_side: the smallest odd centred window holding the field at every phase:
            ``2 max(|lo|, |hi|) + 1``.
        period: the phase period of the field pattern at the output (1 for stride-1 nets).
        scale: image pixels per output position (``"1"`` for a denoiser).
        image_size: the example's size along this axis.
        covers_image: ``size >= image_size``.
        phases: per output phase, the (lo, hi) offsets.
    """

    axis: str
    size: int
    extent: tuple[Union[int, float], Union[int, float]]
    centred_side: int
    period: int
    scale: str
    image_size: int
    covers_image: bool
    phases: tuple
    map: Optional[PeriodicMap] = field(default=None, repr=False, compare=False)

    def interval(self, pixel: int) -> tuple[int, int]:
        """(first, last) image index of the field of output position ``pixel`` (infinite
        image: may lie outside the example)."""
        lo, hi = self.map.eval(np.asarray([pixel]))
        return int(lo[0]), int(hi[0])

    def to_dict(self) -> dict:
        return {
            "axis": self.axis,
            "size": self.size,
            "extent": list(self.extent),
            "centred_side": self.centred_side,
            "period": self.period,
            "scale": self.scale,
            "image_size": self.image_size,
            "covers_image": self.covers_image,
            "phases": [list(p) if p is not None else None for p in self.phases],
        }


@dataclass(frozen=True)
class GlobalPath:
    """A node through which the output depends on every position along ``axes``."""

    node: str
    target: str
    module_path: str
    kind: str
    axes: tuple[str, ...]
    reason: str
    equivariant: bool

    def to_dict(self) -> dict:
        return {"node": self.node, "target": self.target, "module_path": self.module_path, "kind": self.kind,
                "axes": list(self.axes), "reason": self.reason, "equivariant": self.equivariant}


@dataclass(frozen=True)
class UnsupportedOp:
    """An op on the image path that no rule models (treated as global, result partial)."""

    node: str
    target: str
    kind: str
    reason: str

    def to_dict(self) -> dict:
        return {"node": self.node, "target": self.target, "kind": self.kind, "reason": self.reason}


@dataclass(frozen=True)
class ReceptiveFieldResult:
    """Theoretical receptive field of the analysed output.

    Attributes:
        axes: the *local* field per image axis (paths that avoid global ops); empty when
            every path from the image passes a global op.
        is_global: some path passes an op that mixes all positions (the field is then the
            whole image); those ops are in ``global_paths``.
        global_paths: the global ops upstream of the output, in graph order.
        unsupported_ops: ops on the image path without a rule (``partial`` is then True).
        partial: the answer is a bound under assumptions (see ``unsupported_ops``).
        input_shape / output_node: what was analysed.
    """

    axes: tuple[AxisField, ...]
    is_global: bool
    global_paths: tuple[GlobalPath, ...]
    unsupported_ops: tuple[UnsupportedOp, ...]
    partial: bool
    input_shape: tuple[int, ...]
    output_node: str
    spatial_axes: tuple[str, ...] = ("H", "W")

    @property
    def has_local_field(self) -> bool:
        return bool(self.axes)

    def size(self, axis: str) -> int:
        """Local field size along ``axis``."""
        for a in self.axes:
            if a.axis == axis:
                return a.size
        raise KeyError(f"no local field along {axis!r} (axes: {[a.axis for a in self.axes]})")

    @property
    def field(self) -> dict[str, Union[int, str]]:
        """Per axis: the local field size, or ``"whole image"`` when a global op is on a path."""
        if self.is_global:
            return {a: "whole image" for a in self.spatial_axes}
        return {a.axis: a.size for a in self.axes}

    def summary(self) -> str:
        loc = " x ".join(str(a.size) for a in self.axes) + " px" if self.axes else "none"
        s = f"local field {loc}"
        if self.is_global:
            kinds = sorted({g.kind for g in self.global_paths})
            s += f"; global through {len(self.global_paths)} op(s) ({', '.join(kinds)})"
        if self.partial:
            s += f"; PARTIAL: {len(self.unsupported_ops)} unsupported op(s)"
        return s

    def to_dict(self) -> dict:
        return {
            "summary": self.summary(),
            "axes": [a.to_dict() for a in self.axes],
            "field": self.field,
            "is_global": self.is_global,
            "global_paths": [g.to_dict() for g in self.global_paths],
            "unsupported_ops": [u.to_dict() for u in self.unsupported_ops],
            "partial": self.partial,
            "input_shape": list(self.input_shape),
            "output_node": self.output_node,
            "spatial_axes": list(self.spatial_axes),
        }


# ----------------------------------------------------------------------------------------
# Engine
# ----------------------------------------------------------------------------------------
def _conservative(ctx: RuleContext, reason: str) -> Union[Effect, tuple]:
    """Effect of an op without a model: every image input mixes into every output."""

    def one(shape: tuple) -> Effect:
        layout = None
        for i, info in enumerate(ctx.ins):
            if info is not None and tuple(ctx.shapes[i]) == tuple(shape):
                layout = info.layout
                break
        if layout is None:
            layout = tuple(_plain(int(s)) for s in shape)
        flows = tuple(Flow(i, a, "global") for i, info in enumerate(ctx.ins) if info is not None for a in info.axes())
        axes = tuple(dict.fromkeys(f.axis for f in flows))
        return Effect(layout, flows, (GlobalMix(axes, f"unsupported op: {reason}", False),), unsupported=reason)

    out = ctx.out_shape
    if isinstance(out, tuple) and out and isinstance(out[0], tuple | type(None)):
        return tuple(one(s) if s is not None else None for s in out)
    return one(out)


def _apply(node_name: str, eff: Effect, ins: list[Optional[SpatialInfo]]) -> SpatialInfo:
    maps: dict[str, PeriodicMap] = {}
    glob = False
    for f in eff.flows:
        src = ins[f.operand] if f.operand < len(ins) else None
        if src is None:
            continue
        if f.transform == "global":
            glob = True
            continue
        m = src.maps.get(f.axis)
        if m is None:
            continue
        new = m if f.transform == "id" else m.apply(f.transform)
        maps[f.axis] = maps[f.axis].union(new) if f.axis in maps else new
    present = {n for facs in eff.layout for n, _ in facs}
    maps = {a: m for a, m in maps.items() if a in present and not m.is_empty()}
    srcs = frozenset().union(*(i.global_srcs for i in ins if i is not None))
    if glob or eff.mixes:
        srcs = srcs | {node_name}
    return SpatialInfo(eff.layout, maps, srcs)


def _run_pass(trace: TraceResult) -> tuple[dict, list[UnsupportedOp]]:
    gm = trace.graph_module
    infos: dict[str, Any] = {}
    unsupported: list[UnsupportedOp] = []
    for node in gm.graph.nodes:
        if not node.meta.get(META_IMAGE):
            continue
        op: OpInfo = node.meta[META_OP]
        if op.kind == "image":
            info = SpatialInfo(_image_layout(node.meta[META_SHAPE], trace.spatial_axes),
                               {a: PeriodicMap.identity() for a in trace.spatial_axes}, frozenset())
            infos[node.name] = info
            node.meta[META_RF] = RFAnnotation(info, None)
            continue
        if op.kind == "meta":
            continue
        by_name = {a.name: a for a in node.all_input_nodes}
        operands = [by_name[n] for n in op.operands if n in by_name] if op.kind != "unknown" else list(node.all_input_nodes)
        operands = [o for o in operands if isinstance(o.meta.get("els_shape"), tuple)]
        ins = [infos.get(o.name) if isinstance(infos.get(o.name), SpatialInfo) else None for o in operands]
        if op.kind == "select_output":
            src = infos.get(operands[0].name)
            k = op.params["index"]
            info = src[k] if isinstance(src, tuple) and k < len(src) else None
            if info is None:
                continue
            infos[node.name] = info
            node.meta[META_RF] = RFAnnotation(info, Effect(info.layout, tuple(Flow(0, a, "id") for a in info.axes())))
            continue
        ctx = RuleContext(node, op, operands, ins)
        rule = RF_RULES.get(op.kind)
        reason = ""
        if rule is None:
            reason = op.note or f"no receptive-field rule for op kind {op.kind!r}"
            eff: Any = _conservative(ctx, reason)
        else:
            try:
                eff = rule(ctx)
            except Unsupported as exc:
                reason = str(exc)
                eff = _conservative(ctx, reason)
            except Exception as exc:  # noqa: BLE001 - a rule bug: name the node
                raise RuntimeError(
                    f"receptive-field rule {op.kind!r} failed on node {node.name} ({op.target}): "
                    f"{type(exc).__name__}: {exc}") from exc
        try:
            if isinstance(eff, tuple):
                info = tuple(_apply(node.name, e, ins) if e is not None else None for e in eff)
            else:
                info = _apply(node.name, eff, ins)
        except Unsupported as exc:
            reason = str(exc)
            eff = _conservative(ctx, reason)
            info = (tuple(_apply(node.name, e, ins) if e is not None else None for e in eff)
                    if isinstance(eff, tuple) else _apply(node.name, eff, ins))
        if reason and node.meta.get(META_ON_PATH):
            unsupported.append(UnsupportedOp(node.name, op.target, op.kind, reason))
        infos[node.name] = info
        node.meta[META_RF] = RFAnnotation(info, eff)
    return infos, unsupported


def receptive_field(trace: TraceResult) -> ReceptiveFieldResult:
    """Theoretical receptive field of a traced network (exact on an infinite image).

    Walks the graph once, applying the per-kind rules of :data:`RF_RULES`; writes
    ``node.meta["els_rf"]`` on every image-dependent node.

    Args:
        trace: from :func:`els_audit.trace.trace_model`.

    Returns:
        :class:`ReceptiveFieldResult`: the local field per axis (size, extent relative to
        the output pixel, phases), the global paths, unsupported ops, ``partial``.

    Example:
        >>> tr = trace_model(PaperResNet().eval(), (torch.randn(2, 1, 32, 32), torch.rand(2)))
        >>> receptive_field(tr).size("H")
        17
    """
    infos, unsupported = _run_pass(trace)
    out = infos.get(trace.output_node)
    if not isinstance(out, SpatialInfo):
        raise ValueError(f"the analysed output {trace.output_node!r} has no spatial analysis; "
                         "pick another output with output_index=")
    gm = trace.graph_module
    axes_out = out.axes()
    fields = []
    for a in trace.spatial_axes:
        m = out.maps.get(a)
        if m is None or a not in axes_out:
            continue
        ph = m.phases()
        nonempty = [p for p in ph if p is not None]
        lo = min(p[0] for p in nonempty)
        hi = max(p[1] for p in nonempty)
        side = 2 * math.ceil(max(abs(lo), abs(hi))) + 1
        n_img = trace.input_shape[len(trace.input_shape) - len(trace.spatial_axes) + trace.spatial_axes.index(a)]
        fields.append(AxisField(
            axis=a, size=m.size(), extent=(_frac(lo), _frac(hi)), centred_side=int(side), period=m.n,
            scale=str(m.scale), image_size=int(n_img), covers_image=m.size() >= n_img,
            phases=tuple((_frac(p[0]), _frac(p[1])) if p is not None else None for p in ph), map=m,
        ))
    if len(fields) != len(trace.spatial_axes):
        fields = []  # no local field on some axis: the output is purely global there
    gpaths = []
    for node in gm.graph.nodes:
        if node.name not in out.global_srcs:
            continue
        ann = node.meta.get(META_RF)
        effs = ann.effect if isinstance(ann.effect, tuple) else (ann.effect,)
        for eff in effs:
            if eff is None:
                continue
            for mix in eff.mixes:
                op = node.meta[META_OP]
                gpaths.append(GlobalPath(node.name, op.target, op.module_path, op.kind, tuple(mix.axes), mix.reason,
                                         mix.equivariant))
            break
    return ReceptiveFieldResult(
        axes=tuple(fields),
        is_global=bool(out.global_srcs),
        global_paths=tuple(gpaths),
        unsupported_ops=tuple(unsupported),
        partial=bool(unsupported),
        input_shape=tuple(trace.input_shape),
        output_node=trace.output_node,
        spatial_axes=tuple(trace.spatial_axes),
    )


# ----------------------------------------------------------------------------------------
# Numerical probe
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeResult:
    """Gradient-support check of the theoretical field at one output pixel.

    Attributes:
        pixel: the output pixel probed (centre by default).
        predicted: per axis, the (first, last) image index of the theoretical field at
            that pixel (clipped to the image; wrap-around ignored).
        support: per axis, the (first, last) index where |d out[pixel] / d x| > 0,
            union over the random inputs.
        inside: the support lies inside the predicted box (checked per pixel).
        fill: fraction of the predicted box where the gradient was non-zero.
        n_inputs: number of random inputs.
    """

    pixel: tuple[int, ...]
    predicted: Mapping[str, tuple[int, int]]
    support: Mapping[str, tuple[int, int]]
    inside: bool
    fill: float
    n_inputs: int

    def to_dict(self) -> dict:
        return {"pixel": list(self.pixel), "predicted": {k: list(v) for k, v in self.predicted.items()},
                "support": {k: list(v) for k, v in self.support.items()}, "inside": self.inside,
                "fill": round(self.fill, 6), "n_inputs": self.n_inputs}


def probe_receptive_field(trace: TraceResult, rf: Optional[ReceptiveFieldResult] = None, *,
                          n_inputs: int = 3, seed: int = 0, pixel: Optional[Sequence[int]] = None) -> ProbeResult:
    """Check the theoretical field against the support of |d out[pixel] / d x|.

    Runs the traced graph on ``n_inputs`` random images (N(0, I), seeded; the other inputs
    as in the example) and records where the gradient of the output at ``pixel`` (summed
    over batch and channels) is non-zero.

    Args:
        trace: the traced network.
        rf: its :class:`ReceptiveFieldResult` (computed when omitted).
        n_inputs: random inputs to take the union of supports over.
        seed: seed of the random inputs.
        pixel: output pixel (spatial indices); default the centre ``N // 2``.

    Returns:
        :class:`ProbeResult`.
    """
    if n_inputs < 1:
        raise ValueError(f"n_inputs must be >= 1, got {n_inputs}")
    rf = rf or receptive_field(trace)
    nd = len(trace.spatial_axes)
    spatial = trace.input_shape[-nd:]
    pixel = tuple(int(p) for p in (pixel if pixel is not None else [s // 2 for s in spatial]))
    if len(pixel) != nd or any(not 0 <= p < s for p, s in zip(pixel, trace.output_shape[-nd:])):
        raise ValueError(f"pixel {pixel} is not inside the output {trace.output_shape[-nd:]}")
    g = torch.Generator().manual_seed(seed)
    if trace.forward_signature is None:
        raise ValueError("this TraceResult has no forward signature; re-trace with trace_model")
    support = torch.zeros(spatial, dtype=torch.bool)
    for _ in range(n_inputs):
        x = torch.randn(trace.input_shape, generator=g).requires_grad_(True)
        bound = trace.forward_signature.bind(*trace.example_args, **dict(trace.example_kwargs))
        bound.arguments[trace.image_arg] = x
        out = trace.run(*bound.args, **bound.kwargs)
        sel = out[(slice(None),) * (out.dim() - nd) + pixel]
        (grad,) = torch.autograd.grad(sel.sum(), x)
        support |= grad.abs().sum(dim=tuple(range(grad.dim() - nd))) > 0
    predicted: dict[str, tuple[int, int]] = {}
    box = torch.ones(spatial, dtype=torch.bool)
    if rf.axes and not rf.is_global:
        for k, af in enumerate(rf.axes):
            lo, hi = af.interval(pixel[k])
            lo, hi = max(0, lo), min(spatial[k] - 1, hi)
            predicted[af.axis] = (lo, hi)
            mask = torch.zeros(spatial[k], dtype=torch.bool)
            mask[lo: hi + 1] = True
            shape = [1] * nd
            shape[k] = spatial[k]
            box = box & mask.view(shape)
    else:
        for k, a in enumerate(trace.spatial_axes):
            predicted[a] = (0, spatial[k] - 1)
    sup_box = {}
    for k, a in enumerate(trace.spatial_axes):
        other = tuple(j for j in range(nd) if j != k)
        line = support.any(dim=other) if other else support
        idx = torch.nonzero(line).flatten()
        sup_box[a] = (int(idx.min()), int(idx.max())) if idx.numel() else (-1, -1)
    inside = bool((support & ~box).sum() == 0)
    fill = float((support & box).sum()) / max(1, int(box.sum()))
    return ProbeResult(pixel, predicted, sup_box, inside, fill, n_inputs)
