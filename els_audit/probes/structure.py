"""Stage 3 of the architecture probes: where and how much a network breaks translation
equivariance, read off the traced graph (the shift tests that measure it are in
:mod:`els_audit.probes.measured`).

References:
- Kamb & Ganguli, ICML 2025 (docs/theory.md sections 2-3): the ELS machine models circular
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
"""


from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch.fx as fx

from .breakers import EQ_RULES, Breaker, EqContext, Seed
from .meta import META_EQ, META_ON_PATH, META_OP, META_RF
from .ops import OpInfo
from .rf import AxisOp, Effect, ReceptiveFieldResult, RFAnnotation, SpatialInfo, receptive_field
from .rf.engine import data_operands
from .trace import TraceResult

#: The verdict vocabulary (``period-P`` carries the period).
VERDICTS = ("equivariant", "boundary-broken", "period-P", "non-local")


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
        trace: from :func:`els_audit.probes.trace_model`.
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
    nodes = list(trace.graph_module.graph.nodes)
    seeds, unsupported = _seed_pass(nodes)
    masks = _MaskPass(nodes, seeds, trace.spatial_axes)
    masks.run()
    out_masks = masks.masks.get(trace.output_node) or {}
    if isinstance(out_masks, tuple):
        out_masks = out_masks[0]
    breakers, total = _breakers(nodes, seeds, masks, out_masks)
    band = {a: _band_of(m) for a, m in total.items()}
    bw = max([max(v) for v in band.values()] or [0])
    period_all = 1
    for p in masks.period.values():
        period_all = _lcm(period_all, p)
    partial = bool(unsupported) or rf.partial
    verdict, line = _verdict(breakers, bw, period_all, partial, any(m.all() for m in total.values()))
    if partial:
        line += f" [partial: {len(set(u[0] for u in unsupported)) or len(rf.unsupported_ops)} unsupported op(s)]"
    return StructuralEquivarianceResult(
        verdict=tuple(verdict),
        verdict_line=line.strip(),
        band_width=int(bw),
        band={a: tuple(int(x) for x in v) for a, v in band.items()},
        band_spreads_globally=bool(masks.spread.any()),
        period=dict(masks.period),
        period_all=int(period_all),
        breakers=tuple(breakers),
        unsupported_ops=tuple(unsupported),
        partial=partial,
        image_shape=tuple(trace.input_shape[1:]),
        band_masks={a: m.copy() for a, m in total.items()},
    )


def _node_io(node: fx.Node) -> tuple[OpInfo, tuple, tuple, list[fx.Node]]:
    """(op, effects, infos, data operands) of a node the receptive-field pass annotated."""
    ann: RFAnnotation = node.meta[META_RF]
    op: OpInfo = node.meta[META_OP]
    effs = ann.effect if isinstance(ann.effect, tuple) else (ann.effect,)
    infos = ann.info if isinstance(ann.info, tuple) else (ann.info,)
    return op, effs, infos, data_operands(node, op)


def _seed_pass(nodes: list[fx.Node]) -> tuple[dict[str, list[Seed]], list[tuple[str, str, str]]]:
    """Pass 1: the breaker seeds of every node (per-kind rules), and the unsupported ops on the path."""
    seeds: dict[str, list[Seed]] = {}
    unsupported: list[tuple[str, str, str]] = []
    for node in nodes:
        ann: Optional[RFAnnotation] = node.meta.get(META_RF)
        if ann is None or ann.effect is None:
            continue
        op, effs, infos, operands = _node_io(node)
        ins = []
        for o in operands:
            a = o.meta.get(META_RF)
            ins.append(a.info if a is not None and isinstance(a.info, SpatialInfo) else None)
        node_seeds: list[Seed] = []
        for eff, info in zip(effs, infos):
            if eff is None or info is None or (op.kind == "select_output" and not eff.unsupported):
                continue
            reason = eff.unsupported or ("" if op.kind in EQ_RULES else f"no equivariance rule for op kind {op.kind!r}")
            if reason:
                node_seeds.append(Seed("unsupported", reason, tuple(a for m in eff.mixes for a in m.axes)
                                       if eff.unsupported else tuple(info.axes())))
                if node.meta.get(META_ON_PATH):
                    unsupported.append((node.name, op.target, reason))
                continue
            try:
                node_seeds.extend(EQ_RULES.get(op.kind)(EqContext(node, op, eff, info, operands, ins)))
            except Exception as exc:  # noqa: BLE001 - a rule bug: name the node
                raise RuntimeError(f"equivariance rule {op.kind!r} failed on node {node.name} ({op.target}): "
                                   f"{type(exc).__name__}: {exc}") from exc
        if node_seeds:
            seeds[node.name] = node_seeds
    return seeds, unsupported


class _MaskPass:
    """Pass 2: propagate, per axis, which output positions each boundary breaker touches;
    record which boundary effects reach a global op (``spread``) and the cumulative stride.

    NB: masks are per axis (rows touched, columns touched); the 2-d band is their union,
    exact for ops that act on each axis separately (all index maps here).
    """

    def __init__(self, nodes: list[fx.Node], seeds: dict[str, list[Seed]], axes: Sequence[str]):
        self.nodes = nodes
        bnames = [n for n, ss in seeds.items() if any(s.kind == "boundary" for s in ss)]
        self.row = {n: i for i, n in enumerate(bnames)}        # boundary breaker -> row of the masks
        self.nb = len(bnames)
        self.masks: dict[str, Any] = {}
        self.spread = np.zeros(self.nb, dtype=bool)
        self.period = {a: 1 for a in axes}
        self.stride_nodes: list[tuple[fx.Node, dict[str, int]]] = []

    def run(self) -> None:
        for node in self.nodes:
            ann = node.meta.get(META_RF)
            if ann is None:
                continue
            op, effs, infos, operands = _node_io(node)
            if op.kind == "image":
                self.masks[node.name] = {a: np.zeros((self.nb, s), bool) for a, (_, s) in ann.info.axes().items()}
                continue
            if op.kind == "select_output" and operands and isinstance(self.masks.get(operands[0].name), tuple):
                src = self.masks[operands[0].name]
                k = op.params["index"]
                self.masks[node.name] = src[k] if k < len(src) else None
                continue
            outs = [self._node_masks(node, eff, info, operands) if eff is not None and info is not None else None
                    for eff, info in zip(effs, infos)]
            self.masks[node.name] = tuple(outs) if isinstance(ann.effect, tuple) else outs[0]

    def _node_masks(self, node: fx.Node, eff: Effect, info: SpatialInfo, operands: list[fx.Node]) -> dict:
        on_path = bool(node.meta.get(META_ON_PATH))
        axes_out = info.axes()
        m_out = {a: np.zeros((self.nb, s), bool) for a, (_, s) in axes_out.items()}
        for f in eff.flows:
            if f.operand >= len(operands):
                continue
            src = self.masks.get(operands[f.operand].name)
            if isinstance(src, tuple):
                src = src[0]
            if f.transform == "global":
                if src and on_path:
                    for arr in src.values():
                        self.spread |= arr.any(axis=1)
                continue
            if f.axis not in m_out:
                continue
            if isinstance(f.transform, AxisOp):
                self._through(node, f, operands[f.operand], src, m_out, axes_out[f.axis][1])
            elif src and f.axis in src and src[f.axis].shape == m_out[f.axis].shape:
                m_out[f.axis] |= src[f.axis]
        if on_path:
            self._scales(node, eff, info)
        return m_out

    def _through(self, node: fx.Node, f, operand: fx.Node, src: Optional[dict], m_out: dict, n_out: int) -> None:
        """Carry the masks through an index map; mark what this node's own boundary touches."""
        a_in = operand.meta.get(META_RF)
        n_in = a_in.info.axes()[f.axis][1] if a_in is not None and isinstance(a_in.info, SpatialInfo) else None
        if n_in is None:
            return
        idx, valid, touched = f.transform.finite(n_in, n_out)
        if src and f.axis in src:
            padded = np.concatenate([src[f.axis], np.zeros((self.nb, 1), bool)], axis=1)
            m_out[f.axis] |= padded[:, np.where(idx >= 0, idx, n_in)].any(axis=2)
        if touched.any() and node.name in self.row:
            m_out[f.axis][self.row[node.name]] |= touched

    def _scales(self, node: fx.Node, eff: Effect, info: SpatialInfo) -> None:
        """The cumulative stride at this node (the period), and whether it downsamples."""
        for a, m in info.maps.items():
            if a in self.period:
                self.period[a] = _lcm(self.period[a], m.scale.numerator)
        down = {f.axis: info.maps[f.axis].scale.numerator for f in eff.flows
                if isinstance(f.transform, AxisOp) and f.transform.downsample.numerator > 1 and f.axis in info.maps}
        if down:
            self.stride_nodes.append((node, down))


def _stride_breaker(node: fx.Node, down: dict[str, int]) -> Breaker:
    op = node.meta[META_OP]
    return Breaker("stride", node.name, op.target, op.module_path,
                   f"downsampling ({', '.join(f'{a}: x1/{v}' for a, v in down.items())} cumulative)",
                   {"period": max(down.values()), "axes": dict(down)}, True)


def _breakers(nodes: list[fx.Node], seeds: dict[str, list[Seed]], masks: _MaskPass, out_masks: dict
              ) -> tuple[list[Breaker], dict[str, np.ndarray]]:
    """Every breaker on the path with its amount, in graph order (``node.meta["els_eq"]``), and
    the union of the boundary bands at the output per axis."""
    breakers: list[Breaker] = []
    total = {a: np.zeros(arr.shape[1], bool) for a, arr in out_masks.items()}
    strides = dict((n.name, d) for n, d in masks.stride_nodes)
    for node in nodes:
        if node.name not in seeds or not node.meta.get(META_ON_PATH):
            continue
        op = node.meta[META_OP]
        node_breakers = []
        for s in seeds[node.name]:
            if s.kind == "boundary":
                r = masks.row[node.name]
                band = {a: _band_of(arr[r]) for a, arr in out_masks.items()}
                for a, arr in out_masks.items():
                    total[a] |= arr[r]
                bw = max([max(v) for v in band.values()] or [0])
                if bw == 0 and not masks.spread[r]:
                    continue  # a padding the network crops away again never reaches the output
                amount = {"band": band, "band_width": bw, "spreads_globally": bool(masks.spread[r])}
            elif s.kind == "unsupported":
                amount = {"scope": "unknown (treated as whole image)", "axes": list(s.axes)}
            else:
                amount = {"scope": "whole image", "axes": list(s.axes)}
            node_breakers.append(Breaker(s.kind, node.name, op.target, op.module_path, s.cause, amount, s.breaks))
        if node.name in strides:
            node_breakers.append(_stride_breaker(node, strides[node.name]))
        breakers.extend(node_breakers)
        node.meta[META_EQ] = tuple(node_breakers)
    for node_s, down in masks.stride_nodes:
        if node_s.name not in seeds:
            b = _stride_breaker(node_s, down)
            breakers.append(b)
            node_s.meta[META_EQ] = (b,)
    order = {n.name: i for i, n in enumerate(nodes)}
    breakers.sort(key=lambda b: order.get(b.node, 0))
    return breakers, total


def _verdict(breakers: list[Breaker], bw: int, period_all: int, partial: bool, band_everywhere: bool
             ) -> tuple[list[str], str]:
    """The verdict words and the verdict line."""
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
    # NB: a band as wide as half the image holds every pixel: say so, B alone reads as a margin
    bb = f"boundary-broken(B={bw}, every pixel in the band)" if band_everywhere else f"boundary-broken(B={bw})"
    return verdict, " ".join(bb if v == "boundary-broken" else v for v in verdict)
