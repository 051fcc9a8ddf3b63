"""Breakers of translation equivariance and the per-kind equivariance rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch.fx as fx

from .meta import META_OP
from .ops import OpInfo
from .rf import AxisOp, Effect, SpatialInfo
from .kinds import MODELLED
from .rules import RuleTable


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
class Seed:
    """A breaker found by a rule, before its amount is known."""

    kind: str
    cause: str
    axes: tuple[str, ...] = ()
    breaks: bool = True
    touched: Mapping[str, np.ndarray] = field(default_factory=dict)  # boundary: axis -> (N_out,) bool


#: Equivariance rules, one per canonical op kind: ``rule(ctx) -> list of seeds``.
EQ_RULES = RuleTable("equivariance", allowed=MODELLED, describe=lambda k: f"op kind {k!r}")
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


def _common_seeds(ctx: EqContext) -> list[Seed]:
    seeds = []
    for mix in ctx.effect.mixes:
        if ctx.effect.unsupported:
            continue
        if mix.equivariant:
            seeds.append(Seed("global-op", mix.reason, tuple(mix.axes), breaks=False))
        else:
            seeds.append(Seed("dense-over-space", mix.reason, tuple(mix.axes), breaks=True))
    for name, axes, why in ctx.effect.position:
        if name == ctx.node.name:
            seeds.append(Seed("position-dependent", why, tuple(axes)))
        else:
            kind = _position_kind(list(ctx.node.graph.nodes), name)
            seeds.append(Seed(kind, f"{name} varies over {','.join(axes)} and is {why}", tuple(axes)))
    return seeds


@eq_rule("conv", "conv_transpose", "pool", "pad", "upsample", "pixel_shuffle", "pixel_unshuffle", "roll",
         "index", "adaptive_pool")
def _eq_spatial(ctx: EqContext) -> list[Seed]:
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
        seeds.append(Seed("boundary", cause, tuple(touched), True, touched))
    return seeds


@eq_rule("pointwise", "cat", "stack", "norm", "batchnorm", "softmax", "reduce", "einsum", "attention")
def _eq_mixing(ctx: EqContext) -> list[Seed]:
    """Elementwise and mixing ops: global ops and position-dependent operands."""
    return _common_seeds(ctx)


@eq_rule("reshape", "permute", "expand", "repeat", "split", "select_output")
def _eq_layout(ctx: EqContext) -> list[Seed]:
    """Pure layout ops move positions around consistently: nothing to break."""
    return _common_seeds(ctx)
