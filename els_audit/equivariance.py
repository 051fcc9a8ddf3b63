"""Stage 3 of the architecture probes: where and how much a network breaks translation
equivariance -- structurally (from the traced graph) and measured (shift tests).

References:
- Kamb & Ganguli, ICML 2025 (theory.md sections 2-3): the ELS machine models circular
  CNNs (equivariant); the boundary-broken ELS models zero-padded ones, whose pixels within
  the boundary band see the padding; UNets with stride-2 steps are equivariant only to
  shifts by multiples of 2^levels.
- Karras et al., "Alias-Free Generative Adversarial Networks" (StyleGAN3), NeurIPS 2021,
  appendix E: EQ-T = 10 log10(I_max^2 / MSE) between f(shift(x)) and shift(f(x)), with
  I_max = 2 for images in [-1, 1].
- Islam, Jia, Bruce, "How much position information do CNNs encode?", ICLR 2020: zero
  padding leaks absolute position.

Structural analysis (:func:`equivariance_structure`) reads the receptive-field pass
(``node.meta["els_rf"]``) and classifies every breaker with a per-kind rule
(:data:`EQ_RULES`, registered with :func:`eq_rule`, duplicates refused):

- ``boundary``: zero / constant / reflect / replicate padding, transposed-conv and
  interpolation edges.  Its *amount* is the width of the band it influences at the output,
  found by propagating a per-position "touched by this boundary" mask through the graph at
  the example's size (cumulative reach).  Circular padding touches nothing.
- ``stride``: downsampling; the network is equivariant only to shifts that are multiples
  of the cumulative stride (``period``).
- ``global-op``: attention, statistics over space (GroupNorm ...), global pooling.  These
  are permutation-equivariant, so they do not break circular-shift equivariance by
  themselves, but they spread any boundary effect over the whole image
  (``spreads_globally``).
- ``position-embedding`` / ``coordinate-channels`` / ``position-dependent``: an
  image-independent tensor that varies over space enters the activations; and
  ``dense-over-space``: fixed weights over flattened positions.  These break equivariance
  everywhere.
- ``unsupported``: an op no rule models (the result is partial).

Measured analysis (:func:`equivariance_measured`) runs the eps callable on circularly
shifted inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.fx as fx

from .receptive_field import (
    META_RF,
    AxisOp,
    Effect,
    RFAnnotation,
    ReceptiveFieldResult,
    SpatialInfo,
    _RuleTable,
    receptive_field,
)
from .schedules import NoiseSchedule, get_schedule
from .trace import META_ON_PATH, META_OP, OpInfo, TraceResult

__all__ = [
    "Breaker",
    "StructuralEquivarianceResult",
    "MeasuredEquivarianceResult",
    "EQ_RULES",
    "eq_rule",
    "equivariance_structure",
    "equivariance_measured",
    "VERDICTS",
    "META_EQ",
]

META_EQ = "els_eq"
#: The verdict vocabulary (``period-P`` carries the period).
VERDICTS = ("equivariant", "boundary-broken", "period-P", "non-local")
#: PSNR reported for an exactly zero error (keeps the JSON finite).
PSNR_CAP_DB = 400.0


# ----------------------------------------------------------------------------------------
# Breakers and the per-kind rule table
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Breaker:
    """One thing that breaks (or spreads the breaking of) translation equivariance.

    Attributes:
        kind: ``boundary``, ``stride``, ``global-op``, ``position-embedding``,
            ``coordinate-channels``, ``position-dependent``, ``dense-over-space`` or
            ``unsupported``.
        node / target / module_path: where.
        cause: what, in words (``"zeros padding (1, 1) of conv k3 s1 d1 on H"``).
        amount: how much: ``{"band": {"H": [before, after], ...}, "band_width": B,
            "spreads_globally": bool}`` for boundary breakers (the band at the output),
            ``{"period": P, "axes": {...}}`` for strides, ``{"scope": "whole image",
            "axes": [...]}`` for global ones.
        breaks_equivariance: False for permutation-equivariant global ops.
    """

    kind: str
    node: str
    target: str
    module_path: str
    cause: str
    amount: Mapping[str, Any]
    breaks_equivariance: bool

    def to_dict(self) -> dict:
        return {"kind": self.kind, "node": self.node, "target": self.target, "module_path": self.module_path,
                "cause": self.cause, "amount": _plain(self.amount), "breaks_equivariance": self.breaks_equivariance}


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return x


@dataclass(frozen=True)
class _Seed:
    """A breaker found by a rule, before its amount is known."""

    kind: str
    cause: str
    axes: tuple[str, ...] = ()
    breaks: bool = True
    touched: Mapping[str, np.ndarray] = field(default_factory=dict)  # boundary: axis -> (N_out,) bool


#: Equivariance rules, one per canonical op kind: ``rule(ctx) -> list of seeds``.
EQ_RULES = _RuleTable("equivariance")
eq_rule = EQ_RULES.register


class EqContext:
    """What an equivariance rule sees: the node, its op, its RF effect, the operands'
    spatial infos and the finite boundary taps of each of its index maps."""

    def __init__(self, node: fx.Node, op: OpInfo, effect: Effect, info: SpatialInfo,
                 operands: list[fx.Node], ins: list[Optional[SpatialInfo]]):
        self.node, self.op, self.effect, self.info = node, op, effect, info
        self.operands, self.ins = operands, ins

    def axis_sizes(self, i: int, axis: str) -> tuple[int, int]:
        """(input size, output size) of image axis ``axis`` for operand ``i``."""
        return self.ins[i].axes()[axis][1], self.info.axes()[axis][1]


def _describe_spatial(op: OpInfo, axop: AxisOp) -> str:
    p = op.params
    mode = p.get("padding_mode", axop.boundary)
    if op.kind in ("conv", "pool"):
        return f"{mode} padding of {axop.label}"
    if op.kind == "conv_transpose":
        return f"missing inputs at the edges of {axop.label}"
    if op.kind == "pad":
        return f"explicit {axop.label}"
    if op.kind == "upsample":
        return f"edge clamping of {axop.label} interpolation"
    return axop.label or op.kind


def _position_kind(op_nodes: Sequence[fx.Node], name: str) -> str:
    """Name the source of a position-dependent operand by walking back to its origin."""
    by = {n.name: n for n in op_nodes}
    node = by.get(name)
    seen = 0
    stack = [node] if node is not None else []
    kinds: set[str] = set()
    while stack and seen < 64:
        n = stack.pop()
        seen += 1
        info = n.meta.get(META_OP)
        if info is None:
            continue
        if info.kind == "param":
            kinds.add("param")
        elif info.kind == "factory" and info.params.get("op") in ("arange", "linspace", "logspace", "meshgrid"):
            kinds.add("coord")
        stack.extend(n.all_input_nodes)
    if "coord" in kinds:
        return "coordinate-channels"
    if "param" in kinds:
        return "position-embedding"
    return "position-dependent"


def _common_seeds(ctx: EqContext) -> list[_Seed]:
    seeds = []
    for mix in ctx.effect.mixes:
        if ctx.effect.unsupported:
            continue
        if mix.equivariant:
            seeds.append(_Seed("global-op", mix.reason, tuple(mix.axes), breaks=False))
        else:
            seeds.append(_Seed("dense-over-space", mix.reason, tuple(mix.axes), breaks=True))
    for name, axes, why in ctx.effect.position:
        if name == ctx.node.name:
            seeds.append(_Seed("position-dependent", why, tuple(axes)))
        else:
            kind = _position_kind(list(ctx.node.graph.nodes), name)
            seeds.append(_Seed(kind, f"{name} varies over {','.join(axes)} and is {why}", tuple(axes)))
    return seeds


@eq_rule("conv", "conv_transpose", "pool", "pad", "upsample", "pixel_shuffle", "pixel_unshuffle", "roll",
         "index", "adaptive_pool")
def _eq_spatial(ctx: EqContext) -> list[_Seed]:
    """Index-map ops: a boundary seed where a tap reads padding (non-circular)."""
    touched: dict[str, np.ndarray] = {}
    causes: dict[str, list[str]] = {}
    for f in ctx.effect.flows:
        if not isinstance(f.transform, AxisOp) or ctx.ins[f.operand] is None:
            continue
        if f.axis not in ctx.info.axes() or f.axis not in ctx.ins[f.operand].axes():
            continue
        n_in, n_out = ctx.axis_sizes(f.operand, f.axis)
        _, _, t = f.transform.finite(n_in, n_out)
        if t.any():
            touched[f.axis] = touched.get(f.axis, np.zeros(n_out, bool)) | t
            causes.setdefault(_describe_spatial(ctx.op, f.transform), []).append(f.axis)
    seeds = _common_seeds(ctx)
    if touched:
        cause = "; ".join(f"{what} on {','.join(axes)}" for what, axes in causes.items())
        seeds.append(_Seed("boundary", cause, tuple(touched), True, touched))
    return seeds


@eq_rule("pointwise", "cat", "stack", "norm", "batchnorm", "softmax", "reduce", "einsum", "attention")
def _eq_mixing(ctx: EqContext) -> list[_Seed]:
    """Elementwise and mixing ops: global ops and position-dependent operands."""
    return _common_seeds(ctx)


@eq_rule("reshape", "permute", "expand", "repeat", "split", "select_output")
def _eq_layout(ctx: EqContext) -> list[_Seed]:
    """Pure layout ops move positions around consistently: nothing to break."""
    return _common_seeds(ctx)


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StructuralEquivarianceResult:
    """Equivariance breaking read off the graph.

    Attributes:
        verdict: subset of ``equivariant``, ``boundary-broken``, ``period-P`` (P the
            period), ``non-local``, in that order.
        verdict_line: one line, e.g. ``"boundary-broken(B=3) period-4 non-local"``.
        band_width: B, the widest boundary band at the output (pixels from an edge whose
            value depends on the boundary condition), over axes and sides; 0 if none.
        band: per axis ``[before, after]`` band widths at the output.
        band_spreads_globally: a boundary effect enters a global op on the way to the
            output, so (slightly) every pixel depends on the boundary.
        period: per axis, the smallest shift the network can be equivariant to.
        period_all: lcm of the per-axis periods (the P of ``period-P``).
        breakers: every breaker, in graph order.
        unsupported_ops: ops without an equivariance rule (or an RF rule) on the path.
        partial: some op was not modelled (then ``equivariant`` is never claimed).
        image_shape: the example's (C, *spatial) shape the band was computed at.
    """

    verdict: tuple[str, ...]
    verdict_line: str
    band_width: int
    band: Mapping[str, tuple[int, int]]
    band_spreads_globally: bool
    period: Mapping[str, int]
    period_all: int
    breakers: tuple[Breaker, ...]
    unsupported_ops: tuple[tuple[str, str, str], ...]
    partial: bool
    image_shape: tuple[int, ...]
    band_masks: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def arrays(self) -> dict[str, np.ndarray]:
        """Per axis, the (N,) boolean band mask at the output (for the report)."""
        return {f"band_{a}": m.copy() for a, m in self.band_masks.items()}

    def to_dict(self) -> dict:
        return {
            "verdict": list(self.verdict),
            "verdict_line": self.verdict_line,
            "band_width": self.band_width,
            "band": {a: list(v) for a, v in self.band.items()},
            "band_spreads_globally": self.band_spreads_globally,
            "period": dict(self.period),
            "period_all": self.period_all,
            "breakers": [b.to_dict() for b in self.breakers],
            "unsupported_ops": [list(u) for u in self.unsupported_ops],
            "partial": self.partial,
            "image_shape": list(self.image_shape),
        }


def _band_of(mask: np.ndarray) -> tuple[int, int]:
    """(before, after) band widths of a 1-d boolean mask: how far from each edge the
    affected positions reach (positions in the first half count for ``before``)."""
    n = mask.shape[0]
    idx = np.nonzero(mask)[0]
    before = [int(o) + 1 for o in idx if o <= (n - 1) / 2]
    after = [n - int(o) for o in idx if o > (n - 1) / 2]
    return (max(before) if before else 0, max(after) if after else 0)


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def equivariance_structure(trace: TraceResult, rf: Optional[ReceptiveFieldResult] = None) -> StructuralEquivarianceResult:
    """Structural equivariance analysis of a traced network.

    Args:
        trace: from :func:`els_audit.trace.trace_model`.
        rf: its receptive field (computed when omitted; this pass reads the
            ``els_rf`` annotations it leaves).

    Returns:
        :class:`StructuralEquivarianceResult` with the verdict, boundary band (per axis,
        at the example's size), stride period, every breaker with kind, node and amount.
        Writes ``node.meta["els_eq"]`` (the breakers at that node).

    Example:
        >>> tr = trace_model(PaperResNet().eval(), (torch.randn(2, 1, 32, 32), torch.rand(2)))
        >>> equivariance_structure(tr).verdict_line
        'boundary-broken(B=8)'
    """
    rf = rf or receptive_field(trace)
    gm = trace.graph_module
    nodes = list(gm.graph.nodes)

    # Pass 1: seeds per node.
    seeds: dict[str, list[_Seed]] = {}
    unsupported: list[tuple[str, str, str]] = []
    for node in nodes:
        ann: Optional[RFAnnotation] = node.meta.get(META_RF)
        if ann is None or ann.effect is None:
            continue
        op: OpInfo = node.meta[META_OP]
        effs = ann.effect if isinstance(ann.effect, tuple) else (ann.effect,)
        infos = ann.info if isinstance(ann.info, tuple) else (ann.info,)
        by_name = {a.name: a for a in node.all_input_nodes}
        operands = [by_name[n] for n in op.operands if n in by_name] if op.kind != "unknown" else list(node.all_input_nodes)
        operands = [o for o in operands if isinstance(o.meta.get("els_shape"), tuple)]
        ins = []
        for o in operands:
            a = o.meta.get(META_RF)
            ins.append(a.info if a is not None and isinstance(a.info, SpatialInfo) else None)
        node_seeds: list[_Seed] = []
        for eff, info in zip(effs, infos):
            if eff is None or info is None:
                continue
            if eff.unsupported:
                node_seeds.append(_Seed("unsupported", eff.unsupported, tuple(a for m in eff.mixes for a in m.axes)))
                if node.meta.get(META_ON_PATH):
                    unsupported.append((node.name, op.target, eff.unsupported))
                continue
            if op.kind == "select_output":
                continue
            rule = EQ_RULES.get(op.kind)
            if rule is None:
                reason = f"no equivariance rule for op kind {op.kind!r}"
                node_seeds.append(_Seed("unsupported", reason, tuple(info.axes())))
                if node.meta.get(META_ON_PATH):
                    unsupported.append((node.name, op.target, reason))
                continue
            try:
                node_seeds.extend(rule(EqContext(node, op, eff, info, operands, ins)))
            except Exception as exc:  # noqa: BLE001 - a rule bug: name the node
                raise RuntimeError(f"equivariance rule {op.kind!r} failed on node {node.name} ({op.target}): "
                                   f"{type(exc).__name__}: {exc}") from exc
        if node_seeds:
            seeds[node.name] = node_seeds

    # Boundary breakers get a row in the mask arrays.
    bnames = [n for n, ss in seeds.items() if any(s.kind == "boundary" for s in ss)]
    brow = {n: i for i, n in enumerate(bnames)}
    nb = len(bnames)

    # Pass 2: propagate boundary masks; record global spreading and scales.
    # NB: masks are per axis (rows touched, columns touched); the 2-d band is their union,
    # exact for ops that act on each axis separately (all index maps here).
    masks: dict[str, Any] = {}
    spread = np.zeros(nb, dtype=bool)
    period = {a: 1 for a in trace.spatial_axes}
    stride_nodes: list[tuple[fx.Node, dict[str, int]]] = []
    for node in nodes:
        ann = node.meta.get(META_RF)
        if ann is None:
            continue
        op = node.meta[META_OP]
        if op.kind == "image":
            masks[node.name] = {a: np.zeros((nb, s), bool) for a, (_, s) in ann.info.axes().items()}
            continue
        effs = ann.effect if isinstance(ann.effect, tuple) else (ann.effect,)
        infos = ann.info if isinstance(ann.info, tuple) else (ann.info,)
        by_name = {a.name: a for a in node.all_input_nodes}
        operands = [by_name[n] for n in op.operands if n in by_name] if op.kind != "unknown" else list(node.all_input_nodes)
        operands = [o for o in operands if isinstance(o.meta.get("els_shape"), tuple)]
        on_path = bool(node.meta.get(META_ON_PATH))
        if op.kind == "select_output":
            src = masks.get(operands[0].name)
            k = op.params["index"]
            masks[node.name] = src[k] if isinstance(src, tuple) and k < len(src) else src
            continue
        outs = []
        for eff, info in zip(effs, infos):
            if eff is None or info is None:
                outs.append(None)
                continue
            axes_out = info.axes()
            m_out = {a: np.zeros((nb, s), bool) for a, (_, s) in axes_out.items()}
            for f in eff.flows:
                if f.operand >= len(operands):
                    continue
                src = masks.get(operands[f.operand].name)
                if isinstance(src, tuple):
                    src = src[0]
                if f.transform == "global":
                    if src and on_path:
                        for arr in src.values():
                            spread |= arr.any(axis=1)
                    continue
                if f.axis not in m_out:
                    continue
                if isinstance(f.transform, AxisOp):
                    a_in = operands[f.operand].meta.get(META_RF)
                    n_in = a_in.info.axes()[f.axis][1] if a_in is not None and isinstance(a_in.info, SpatialInfo) else None
                    if n_in is None:
                        continue
                    idx, valid, touched = f.transform.finite(n_in, axes_out[f.axis][1])
                    if src and f.axis in src:
                        padded = np.concatenate([src[f.axis], np.zeros((nb, 1), bool)], axis=1)
                        m_out[f.axis] |= padded[:, np.where(idx >= 0, idx, n_in)].any(axis=2)
                    if touched.any() and node.name in brow:
                        m_out[f.axis][brow[node.name]] |= touched
                elif src and f.axis in src and src[f.axis].shape == m_out[f.axis].shape:
                    m_out[f.axis] |= src[f.axis]
            outs.append(m_out)
            # Scales: the cumulative stride at this node.
            if on_path:
                for a, m in info.maps.items():
                    num = m.scale.numerator
                    if a in period:
                        period[a] = _lcm(period[a], num)
                down = {f.axis: info.maps[f.axis].scale.numerator for f in eff.flows
                        if isinstance(f.transform, AxisOp) and f.transform.downsample.numerator > 1 and f.axis in info.maps}
                if down:
                    stride_nodes.append((node, down))
        masks[node.name] = tuple(outs) if isinstance(ann.effect, tuple) else outs[0]

    out_masks = masks.get(trace.output_node) or {}
    if isinstance(out_masks, tuple):
        out_masks = out_masks[0]

    # Breakers with amounts.
    breakers: list[Breaker] = []
    total = {a: np.zeros(arr.shape[1], bool) for a, arr in out_masks.items()}
    for node in nodes:
        if node.name not in seeds or not node.meta.get(META_ON_PATH):
            continue
        op = node.meta[META_OP]
        node_breakers = []
        for s in seeds[node.name]:
            if s.kind == "boundary":
                r = brow[node.name]
                band = {a: _band_of(arr[r]) for a, arr in out_masks.items()}
                for a, arr in out_masks.items():
                    total[a] |= arr[r]
                bw = max([max(v) for v in band.values()] or [0])
                amount = {"band": band, "band_width": bw, "spreads_globally": bool(spread[r])}
            elif s.kind in ("unsupported",):
                amount = {"scope": "unknown (treated as whole image)", "axes": list(s.axes)}
            else:
                amount = {"scope": "whole image", "axes": list(s.axes)}
            node_breakers.append(Breaker(s.kind, node.name, op.target, op.module_path, s.cause, amount, s.breaks))
        for node_s, down in stride_nodes:
            if node_s is node:
                node_breakers.append(Breaker("stride", node.name, op.target, op.module_path,
                                             f"downsampling ({', '.join(f'{a}: x1/{v}' for a, v in down.items())} cumulative)",
                                             {"period": max(down.values()), "axes": dict(down)}, True))
        breakers.extend(node_breakers)
        node.meta[META_EQ] = tuple(node_breakers)
    for node_s, down in stride_nodes:
        if node_s.name not in seeds:
            op = node_s.meta[META_OP]
            b = Breaker("stride", node_s.name, op.target, op.module_path,
                        f"downsampling ({', '.join(f'{a}: x1/{v}' for a, v in down.items())} cumulative)",
                        {"period": max(down.values()), "axes": dict(down)}, True)
            breakers.append(b)
            node_s.meta[META_EQ] = (b,)
    order = {n.name: i for i, n in enumerate(nodes)}
    breakers.sort(key=lambda b: order.get(b.node, 0))

    band = {a: _band_of(m) for a, m in total.items()}
    bw = max([max(v) for v in band.values()] or [0])
    period_all = 1
    for p in period.values():
        period_all = _lcm(period_all, p)
    partial = bool(unsupported) or rf.partial
    boundary = bw > 0
    nonlocal_ = any(b.kind not in ("boundary", "stride") for b in breakers)
    breaking_global = any(b.kind not in ("boundary", "stride", "global-op") for b in breakers)
    verdict: list[str] = []
    if not partial and not boundary and period_all == 1 and not breaking_global:
        verdict.append("equivariant")
    if boundary:
        verdict.append("boundary-broken")
    if period_all > 1:
        verdict.append(f"period-{period_all}")
    if nonlocal_:
        verdict.append("non-local")
    line = " ".join(f"boundary-broken(B={bw})" if v == "boundary-broken" else v for v in verdict)
    if partial:
        line += f" [partial: {len(set(u[0] for u in unsupported)) or len(rf.unsupported_ops)} unsupported op(s)]"
    return StructuralEquivarianceResult(
        verdict=tuple(verdict),
        verdict_line=line.strip(),
        band_width=int(bw),
        band={a: tuple(int(x) for x in v) for a, v in band.items()},
        band_spreads_globally=bool(spread.any()),
        period=dict(period),
        period_all=int(period_all),
        breakers=tuple(breakers),
        unsupported_ops=tuple(unsupported),
        partial=partial,
        image_shape=tuple(trace.input_shape[1:]),
        band_masks={a: m.copy() for a, m in total.items()},
    )


# ----------------------------------------------------------------------------------------
# Measured
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeasuredEquivarianceResult:
    """Shift tests ``f(roll(x, s))`` vs ``roll(f(x), s)`` at several noise levels.

    Attributes:
        times: the t values tested.
        shifts: the (dy, dx) circular shifts tested.
        band: (B_H, B_W) border band masked for the ``*_masked`` numbers: a pixel is kept
            only when it lies at least B from the edges both in the shifted frame and
            where it came from (so the wrap-around seam is masked too).
        psnr_db / psnr_masked_db: [t][shift] EQ-T PSNR, ``10 log10(2^2 / MSE)`` (capped
            at :data:`PSNR_CAP_DB` for an exactly zero error).  The masked numbers are
            ``None`` when the band leaves no pixel (B >= half the image).
        rel_err / rel_err_masked: [t][shift] ``||diff|| / ||roll(f(x))||`` (RMS ratio).
        max_abs / max_abs_masked: [t][shift] max |diff|.
        effective_band: [t][shift] the smallest border band B (same on both axes) outside
            which the error map stays below ``band_tol`` x RMS(eps): the band that matters
            in practice (a zero-padded UNet's structural band can be far wider, with the
            influence decaying to 1e-8).  ``None`` when no band short of the whole image
            does (global breaking, or a shift that is not a multiple of the period).
        band_tol: the tolerance used for ``effective_band``.
        n_samples, seed: the inputs (x_t from the forward process, seeded).
    """

    times: tuple[float, ...]
    shifts: tuple[tuple[int, int], ...]
    band: tuple[int, int]
    psnr_db: tuple[tuple[float, ...], ...]
    psnr_masked_db: tuple[tuple[float, ...], ...]
    rel_err: tuple[tuple[float, ...], ...]
    rel_err_masked: tuple[tuple[float, ...], ...]
    max_abs: tuple[tuple[float, ...], ...]
    max_abs_masked: tuple[tuple[float, ...], ...]
    effective_band: tuple[tuple[Optional[int], ...], ...]
    band_tol: float
    n_samples: int
    seed: int
    error_maps: np.ndarray = field(repr=False, compare=False, default=None)

    def arrays(self) -> dict[str, np.ndarray]:
        """``error_maps``: [T, S, H, W] mean |diff| over samples and channels."""
        return {"error_maps": self.error_maps.copy()}

    def to_dict(self) -> dict:
        r = lambda rows, nd=3: [[None if v is None else round(float(v), nd) for v in row] for row in rows]  # noqa: E731
        e = lambda rows: [[None if v is None else float(f"{v:.3e}") for v in row] for row in rows]  # noqa: E731
        return {
            "times": list(self.times),
            "shifts": [list(s) for s in self.shifts],
            "band": list(self.band),
            "psnr_db": r(self.psnr_db, 2),
            "psnr_masked_db": r(self.psnr_masked_db, 2),
            "rel_err": e(self.rel_err),
            "rel_err_masked": e(self.rel_err_masked),
            "max_abs": e(self.max_abs),
            "max_abs_masked": e(self.max_abs_masked),
            "effective_band": [list(r) for r in self.effective_band],
            "band_tol": self.band_tol,
            "n_samples": self.n_samples,
            "seed": self.seed,
        }


def _psnr(mse: float) -> float:
    # NB: StyleGAN3's EQ-T uses I_max = 2 (images in [-1, 1]); eps has unit variance, so
    # the same peak is a convention here.  rel_err is the scale-free companion.
    if mse <= 0:
        return PSNR_CAP_DB
    return float(min(PSNR_CAP_DB, 10.0 * math.log10(4.0 / mse)))


def _check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(image_shape) != 3 or any(int(s) < 1 for s in image_shape):
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)}")
    return tuple(int(s) for s in image_shape)  # type: ignore[return-value]


def _draw_x0(data: Optional[torch.Tensor], image_shape: tuple, n: int, g: torch.Generator) -> torch.Tensor:
    if data is None:
        return torch.randn((n,) + tuple(image_shape), generator=g)
    idx = torch.randint(0, data.shape[0], (n,), generator=g) if data.shape[0] < n else torch.randperm(data.shape[0], generator=g)[:n]
    return data[idx].to(torch.float32)


def _check_data(data: Optional[torch.Tensor], image_shape: tuple) -> Optional[torch.Tensor]:
    if data is None:
        return None
    data = torch.as_tensor(data)
    if data.dim() != 4 or tuple(data.shape[1:]) != tuple(image_shape):
        raise ValueError(f"data must be [N, C, H, W] = [N, {', '.join(map(str, image_shape))}], got {tuple(data.shape)}")
    if data.shape[0] < 1:
        raise ValueError("data is empty; pass at least one training image or data=None")
    lo, hi = float(data.min()), float(data.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"data must be scaled to [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; rescale x -> 2x - 1")
    return data


def _labels(label: Any, n: int) -> Optional[torch.Tensor]:
    if label is None:
        return None
    lab = torch.as_tensor(label, dtype=torch.long)
    if lab.dim() == 0:
        return lab.expand(n).clone()
    if lab.shape != (n,):
        raise ValueError(f"label must be an int or a tensor of {n} labels (one per sample), got shape {tuple(lab.shape)}")
    return lab


def equivariance_measured(
    eps_fn: Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor],
    image_shape: Sequence[int],
    *,
    shifts: Optional[Sequence[Union[int, Sequence[int]]]] = None,
    times: Sequence[float] = (0.1, 0.5, 0.9),
    band: Union[int, Sequence[int], StructuralEquivarianceResult] = 0,
    seed: int = 0,
    n_samples: int = 4,
    data: Optional[torch.Tensor] = None,
    schedule: Union[str, NoiseSchedule] = "cosine-legacy",
    label: Any = None,
    batch_size: int = 64,
    band_tol: float = 1e-3,
) -> MeasuredEquivarianceResult:
    """Measure translation equivariance with circular shifts.

    For each t, draws ``n_samples`` inputs ``x_t = a_t x0 + b_t z`` (x0 from ``data`` if
    given, else N(0, I); z ~ N(0, I); seeded), evaluates ``f = eps_fn`` on x_t and on every
    circularly shifted copy, and compares ``f(roll(x, s))`` with ``roll(f(x), s)``.

    Args:
        eps_fn: ``eps(x [B,C,H,W], t [B] float, label [B] long or None) -> [B,C,H,W]``.
        image_shape: (C, H, W).
        shifts: ints (a diagonal shift (s, s)) or (dy, dx) pairs; default 1 .. max(4, P)
            where P is the period of a structural result passed as ``band`` (else 1 .. 4).
        times: noise levels t in [0, 1].
        band: border band (an int, (B_H, B_W), or a structural result whose band is used)
            masked for the ``*_masked`` numbers.
        seed: seed of the inputs.
        n_samples: inputs per t.
        data: optional [N, C, H, W] training images in [-1, 1].
        schedule: noise schedule name or object.
        label: class label(s) for a conditional model (int or [n_samples]).
        batch_size: largest batch passed to ``eps_fn``.
        band_tol: relative tolerance defining ``effective_band``.

    Returns:
        :class:`MeasuredEquivarianceResult` (EQ-T PSNR with and without the band, relative
        and max errors, the effective band per t, and the per-pixel error maps in
        ``arrays()``).
    """
    C, H, W = _check_image_shape(image_shape)
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples and batch_size must be >= 1, got {n_samples}, {batch_size}")
    if not band_tol > 0:
        raise ValueError(f"band_tol must be > 0, got {band_tol}")
    if not times:
        raise ValueError("times is empty; pass e.g. times=(0.1, 0.5, 0.9)")
    if shifts is None:
        P = band.period_all if isinstance(band, StructuralEquivarianceResult) else 1
        shifts = tuple(range(1, max(4, P) + 1))
    sh: list[tuple[int, int]] = []
    for s in shifts:
        if isinstance(s, (int, np.integer)):
            sh.append((int(s), int(s)))
        elif len(s) == 2:
            sh.append((int(s[0]), int(s[1])))
        else:
            raise ValueError(f"a shift is an int or a (dy, dx) pair, got {s!r}")
    if not sh:
        raise ValueError("shifts is empty; pass e.g. shifts=(1, 2, 3, 4)")
    if isinstance(band, StructuralEquivarianceResult):
        axes = list(band.band)
        bh = max(band.band.get(axes[0], (0, 0))) if len(axes) >= 1 else 0
        bw_ = max(band.band.get(axes[1], (0, 0))) if len(axes) >= 2 else bh
        band_t = (int(bh), int(bw_))
    elif isinstance(band, (int, np.integer)):
        band_t = (int(band), int(band))
    else:
        band_t = (int(band[0]), int(band[1]))
    if min(band_t) < 0:
        raise ValueError(f"band must be >= 0, got {band_t}")
    sched = get_schedule(schedule)
    data = _check_data(data, (C, H, W))
    lab = _labels(label, n_samples)
    g = torch.Generator().manual_seed(int(seed))

    def interior(n: int, b: int, shift: int) -> torch.Tensor:
        o = torch.arange(n)
        src = torch.remainder(o - shift, n)
        return (o >= b) & (o < n - b) & (src >= b) & (src < n - b)

    psnr, psnr_m, rel, rel_m, mx, mx_m, eff_band = [], [], [], [], [], [], []
    maps = np.zeros((len(times), len(sh), H, W), dtype=np.float32)
    for ti, t in enumerate(times):
        if not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"times must lie in [0, 1], got {t}")
        a_t, b_t = (float(v) for v in sched.alpha_sigma(float(t)))
        x0 = _draw_x0(data, (C, H, W), n_samples, g)
        z = torch.randn((n_samples, C, H, W), generator=g)
        x = a_t * x0 + b_t * z                                                   # (n, C, H, W)
        xs = torch.cat([x] + [torch.roll(x, s, dims=(-2, -1)) for s in sh])     # ((S+1) n, C, H, W)
        labs = None if lab is None else lab.repeat(len(sh) + 1)
        outs = []
        with torch.no_grad():
            for i in range(0, xs.shape[0], batch_size):
                xb = xs[i: i + batch_size]
                tb = torch.full((xb.shape[0],), float(t))
                lb = None if labs is None else labs[i: i + batch_size]
                outs.append(eps_fn(xb, tb, lb).detach().to(torch.float64))
        f = torch.cat(outs)                                                      # ((S+1) n, C, H, W)
        if f.shape != xs.shape:
            raise ValueError(f"eps_fn returned shape {tuple(f.shape[1:])} for inputs {tuple(xs.shape[1:])}")
        f0 = f[:n_samples]
        row = [[], [], [], [], [], []]
        for si, s in enumerate(sh):
            ref = torch.roll(f0, s, dims=(-2, -1))
            diff = f[(si + 1) * n_samples: (si + 2) * n_samples] - ref             # (n, C, H, W)
            keep = interior(H, band_t[0], s[0])[:, None] & interior(W, band_t[1], s[1])[None, :]  # (H, W)
            mse = float(diff.pow(2).mean())
            denom = float(ref.pow(2).mean()) or 1.0
            row[0].append(_psnr(mse))
            row[2].append(math.sqrt(mse / denom))
            row[4].append(float(diff.abs().max()))
            dm = diff[..., keep]
            if dm.numel():
                mse_m = float(dm.pow(2).mean())
                denom_m = float(ref[..., keep].pow(2).mean()) or 1.0
                row[1].append(_psnr(mse_m))
                row[3].append(math.sqrt(mse_m / denom_m))
                row[5].append(float(dm.abs().max()))
            else:  # the band covers the whole image: nothing left to measure
                row[1].append(None)
                row[3].append(None)
                row[5].append(None)
            maps[ti, si] = diff.abs().mean(dim=(0, 1)).to(torch.float32).numpy()
        for lst, vals in zip((psnr, psnr_m, rel, rel_m, mx, mx_m), row):
            lst.append(tuple(vals))
        # Effective band per shift: the smallest B whose masked error map stays below
        # tolerance.  NB: judged on the sample-mean |diff| map, scaled by the RMS of eps.
        tol = band_tol * math.sqrt(float(f0.pow(2).mean()) or 1.0)
        found = []
        for si, s in enumerate(sh):
            b_found = None
            for B in range(0, (min(H, W) + 1) // 2):
                keep = (interior(H, B, s[0])[:, None] & interior(W, B, s[1])[None, :]).numpy()
                if keep.any() and maps[ti, si][keep].max() <= tol:
                    b_found = B
                    break
            found.append(b_found)
        found = tuple(found)
        eff_band.append(found)
    return MeasuredEquivarianceResult(
        times=tuple(float(t) for t in times), shifts=tuple(sh), band=band_t,
        psnr_db=tuple(psnr), psnr_masked_db=tuple(psnr_m), rel_err=tuple(rel), rel_err_masked=tuple(rel_m),
        max_abs=tuple(mx), max_abs_masked=tuple(mx_m), effective_band=tuple(eff_band), band_tol=float(band_tol),
        n_samples=int(n_samples), seed=int(seed), error_maps=maps,
    )
