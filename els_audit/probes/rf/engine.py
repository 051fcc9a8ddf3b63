"""Stage 2 of the architecture probes: the theoretical receptive field of a traced network.

References:
- A. Araujo, W. Norris, J. Sim, "Computing Receptive Fields of Convolutional Neural
  Networks", Distill 2019: per layer ``r_l = r_{l-1} + (k_l - 1) d_l j_{l-1}``,
  ``j_l = j_{l-1} s_l`` (jump, size, offset), for chains.
- Kamb & Ganguli, ICML 2025 (docs/theory.md section 3): the paper's ResNet has a 17 px field;
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
same engine follow attention written as ``flatten -> Linear -> bmm -> softmax``, patchify
and unpatchify written as reshapes (a split axis is space-to-depth, an axis merged with the
plain factors after it depth-to-space: the maps of PixelUnshuffle / PixelShuffle), and
extra tokens concatenated around the image tokens (a *token factor*, until they are sliced
or split off again).

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
from typing import Any, Optional, Union

import torch.fx as fx


from ..meta import META_IMAGE, META_ON_PATH, META_OP, META_RF, META_SHAPE
from ..ops import OpInfo
from ..trace import TraceResult
from .effects import Effect, Flow, GlobalMix, RFAnnotation, SpatialInfo
from .maps import AxisOp, PeriodicMap, Unsupported
from .layout import RuleContext, image_layout, plain, spatial
from .result import AxisField, GlobalPath, ReceptiveFieldResult, UnsupportedOp, as_number
from .table import RF_RULES


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
            layout = tuple(plain(int(s)) for s in shape)
        flows = tuple(Flow(i, a, "global") for i, info in enumerate(ctx.ins) if info is not None for a in info.axes())
        axes = tuple(dict.fromkeys(f.axis for f in flows))
        return Effect(layout, flows, (GlobalMix(axes, f"unsupported op: {reason}", False),), unsupported=reason)

    out = ctx.out_shape
    if is_multi_output(out):
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
    present = {a for facs in eff.layout for a in spatial(facs)}
    maps = {a: m for a, m in maps.items() if a in present and not m.is_empty()}
    srcs = frozenset().union(*(i.global_srcs for i in ins if i is not None))
    if glob or eff.mixes:
        srcs = srcs | {node_name}
    return SpatialInfo(eff.layout, maps, srcs)


def is_multi_output(shape: Any) -> bool:
    """``els_shape`` of a multi-output op: a tuple of shapes (or ``None`` for a non-tensor)."""
    return isinstance(shape, tuple) and bool(shape) and isinstance(shape[0], tuple | type(None))


def data_operands(node: fx.Node, op: OpInfo) -> list[fx.Node]:
    """The tensor data operands of ``node``, in the canonical order (every input of an unknown op)."""
    by_name = {a.name: a for a in node.all_input_nodes}
    operands = [by_name[n] for n in op.operands if n in by_name] if op.kind != "unknown" else list(node.all_input_nodes)
    return [o for o in operands if isinstance(o.meta.get(META_SHAPE), tuple)]


def _rule_effect(rule, ctx: RuleContext) -> Union[Effect, tuple]:
    """A rule's effect; for a multi-output op whose rule describes one output (a reduction
    such as ``var_mean`` or ``max(x, dim)``), the rule is applied to each output's shape."""
    if not is_multi_output(ctx.out_shape) or getattr(rule, "multi_output", False):
        return rule(ctx)
    effs = []
    for shape in ctx.out_shape:
        sub = copy.copy(ctx)
        sub.out_shape = shape
        effs.append(None if shape is None else rule(sub))
    return tuple(effs)


def _node_effect(ctx: RuleContext, unanalysed: list[str]) -> tuple[Union[Effect, tuple], str]:
    """(effect, reason it is conservative or ``""``) of one node."""
    op = ctx.op
    if unanalysed:
        reason = f"operand(s) {', '.join(unanalysed)} depend on the image but were not analysed"
        return _conservative(ctx, reason), reason
    rule = RF_RULES.get(op.kind)
    if rule is None:
        reason = op.note or f"no receptive-field rule for op kind {op.kind!r}"
        return _conservative(ctx, reason), reason
    try:
        return _rule_effect(rule, ctx), ""
    except Unsupported as exc:
        return _conservative(ctx, str(exc)), str(exc)
    except Exception as exc:  # noqa: BLE001 - a rule bug: name the node
        raise RuntimeError(f"receptive-field rule {op.kind!r} failed on node {ctx.node.name} ({op.target}): "
                           f"{type(exc).__name__}: {exc}") from exc


def _apply_all(name: str, eff: Union[Effect, tuple], ins: list) -> Union[SpatialInfo, tuple]:
    if isinstance(eff, tuple):
        return tuple(_apply(name, e, ins) if e is not None else None for e in eff)
    return _apply(name, eff, ins)


def _run_pass(trace: TraceResult) -> tuple[dict, list[UnsupportedOp]]:
    gm = trace.graph_module
    infos: dict[str, Any] = {}
    unsupported: list[UnsupportedOp] = []
    for node in gm.graph.nodes:
        if not node.meta.get(META_IMAGE):
            continue
        op: OpInfo = node.meta[META_OP]
        if op.kind == "image":
            info = SpatialInfo(image_layout(node.meta[META_SHAPE], trace.spatial_axes),
                               {a: PeriodicMap.identity() for a in trace.spatial_axes}, frozenset())
            infos[node.name] = info
            node.meta[META_RF] = RFAnnotation(info, None)
            continue
        if op.kind == "meta":
            continue
        operands = data_operands(node, op)
        if op.kind == "select_output":
            src = infos.get(operands[0].name)
            k = op.params["index"]
            info = src[k] if isinstance(src, tuple) and k < len(src) else None
            if info is not None:
                infos[node.name] = info
                node.meta[META_RF] = RFAnnotation(info, Effect(info.layout, tuple(Flow(0, a, "id") for a in info.axes())))
                continue
        ins = [infos.get(o.name) if isinstance(infos.get(o.name), SpatialInfo) else None for o in operands]
        # NB: an image-dependent operand without an analysis would otherwise pass for an
        # image-independent one (a "position embedding"): conservative instead.
        unanalysed = [o.name for o, i in zip(operands, ins) if i is None and o.meta.get(META_IMAGE)
                      and not is_multi_output(o.meta.get(META_SHAPE))]
        ctx = RuleContext(node, op, operands, ins)
        eff, reason = _node_effect(ctx, unanalysed)
        try:
            info = _apply_all(node.name, eff, ins)
        except Unsupported as exc:
            reason = str(exc)
            eff = _conservative(ctx, reason)
            info = _apply_all(node.name, eff, ins)
        if reason and node.meta.get(META_ON_PATH):
            unsupported.append(UnsupportedOp(node.name, op.target, op.kind, reason))
        infos[node.name] = info
        node.meta[META_RF] = RFAnnotation(info, eff)
    return infos, unsupported


def boundary_modes(trace: TraceResult) -> frozenset[str]:
    """The boundary conditions the analysed output reads at the example's size: the
    ``boundary`` of every index map on the image path whose taps leave the input
    (``"zeros"``, ``"reflect"``, ``"replicate"``, ``"circular"``).  Empty for a network that
    never reads past an edge.  Needs :func:`receptive_field` to have run on ``trace``."""
    modes: set[str] = set()
    for node in trace.graph.nodes:
        ann = node.meta.get(META_RF)
        if ann is None or ann.effect is None or not node.meta.get(META_ON_PATH):
            continue
        operands = data_operands(node, node.meta[META_OP])
        effs = ann.effect if isinstance(ann.effect, tuple) else (ann.effect,)
        infos = ann.info if isinstance(ann.info, tuple) else (ann.info,)
        for eff, info in zip(effs, infos):
            if eff is None or not isinstance(info, SpatialInfo):
                continue
            for f in eff.flows:
                if not isinstance(f.transform, AxisOp) or f.transform.boundary == "none" or f.operand >= len(operands):
                    continue
                src = operands[f.operand].meta.get(META_RF)
                src_info = src.info if src is not None else None
                if not isinstance(src_info, SpatialInfo) or f.axis not in src_info.axes() or f.axis not in info.axes():
                    continue
                if f.transform.reads_outside(src_info.axes()[f.axis][1], info.axes()[f.axis][1]):
                    modes.add(f.transform.boundary)
    return frozenset(modes)


def receptive_field(trace: TraceResult) -> ReceptiveFieldResult:
    """Theoretical receptive field of a traced network (exact on an infinite image).

    Walks the graph once, applying the per-kind rules of :data:`RF_RULES`; writes
    ``node.meta["els_rf"]`` on every image-dependent node.

    Args:
        trace: from :func:`els_audit.probes.trace_model`.

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
            axis=a, size=m.size(), extent=(as_number(lo), as_number(hi)), centred_side=int(side), period=m.n,
            scale=str(m.scale), image_size=int(n_img), covers_image=m.size() >= n_img,
            phases=tuple((as_number(p[0]), as_number(p[1])) if p is not None else None for p in ph), map=m,
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
