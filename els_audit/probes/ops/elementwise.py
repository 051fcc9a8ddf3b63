"""Canonicalisers of elementwise ops, normalisations, softmax and reductions."""

from __future__ import annotations

import operator
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import OpContext, aten, register_op, register_tag, target_name




# -- elementwise -------------------------------------------------------------------------
_POINTWISE_FNS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg,
    operator.pow, operator.mod, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.pos, operator.abs, operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.neg, torch.pow, torch.exp, torch.log, torch.log1p, torch.expm1,
    torch.sqrt, torch.rsqrt, torch.square, torch.abs, torch.sin, torch.cos, torch.tanh, torch.sigmoid,
    torch.relu, torch.clamp, torch.clip, torch.where, torch.maximum, torch.minimum, torch.erf,
    torch.reciprocal, torch.sign, torch.lerp, torch.addcmul, torch.addcdiv, torch.nan_to_num,
    torch.masked_fill, torch.floor, torch.ceil, torch.round, torch.atan2, torch.hypot,
    F.relu, F.relu6, F.silu, F.gelu, F.elu, F.selu, F.celu, F.leaky_relu, F.prelu, F.softplus,
    F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.logsigmoid, F.tanhshrink, F.softsign,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    F.sigmoid, F.tanh, F.relu_, F.threshold,
]
_POINTWISE_MODULES = [
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.ELU, nn.SELU, nn.CELU, nn.LeakyReLU, nn.PReLU,
    nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.LogSigmoid, nn.Sigmoid,
    nn.Tanh, nn.Tanhshrink, nn.Softsign, nn.Threshold, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity,
]
_POINTWISE_METHODS = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "truediv", "neg", "pow", "exp",
    "log", "sqrt", "rsqrt", "square", "abs", "sin", "cos", "tanh", "sigmoid", "relu", "relu_",
    "clamp", "clamp_", "clip", "masked_fill", "masked_fill_", "maximum", "minimum", "reciprocal",
    "float", "double", "half", "bfloat16", "to", "type", "contiguous", "clone", "detach",
    "requires_grad_", "cpu", "cuda", "lerp", "addcmul", "erf", "sign", "floor", "ceil", "round",
    "nan_to_num", "exp_", "sigmoid_", "tanh_", "where", "__and__", "__or__", "logical_not",
]
_POINTWISE_ATEN = [
    aten.add, aten.sub, aten.rsub, aten.mul, aten.div, aten.neg, aten.pow, aten.exp, aten.log,
    aten.log1p, aten.expm1, aten.sqrt, aten.rsqrt, aten.square, aten.abs, aten.sin, aten.cos,
    aten.tanh, aten.sigmoid, aten.relu, aten.relu6, aten.silu, aten.gelu, aten.elu, aten.selu,
    aten.celu, aten.leaky_relu, aten.prelu, aten._prelu_kernel, aten.softplus, aten.mish,
    aten.hardswish, aten.hardsigmoid, aten.hardtanh, aten.log_sigmoid, aten.clamp, aten.clamp_min,
    aten.clamp_max, aten.clip, aten.where, aten.maximum, aten.minimum, aten.erf, aten.reciprocal,
    aten.sign, aten.lerp, aten.addcmul, aten.addcdiv, aten.nan_to_num, aten.masked_fill,
    aten.floor, aten.ceil, aten.round, aten.dropout, aten.native_dropout, aten.feature_dropout,
    aten.alpha_dropout, aten._to_copy, aten.to, aten.clone, aten.contiguous, aten.alias,
    aten.detach, aten.lift_fresh_copy, aten.gt, aten.lt, aten.ge, aten.le, aten.eq,
    aten.ne, aten.logical_not, aten.logical_and, aten.logical_or, aten.threshold,
    aten.relu_, aten.silu_, aten.add_, aten.mul_, aten.copy, aten.atan2, aten.hypot,
]

# Ops whose first argument is the data and any other tensor argument only gives a dtype or
# device (``type_as``) -- the second tensor is not a data operand.
_FIRST_ONLY = {"Tensor.type_as", aten.type_as}


@register_op(*_POINTWISE_FNS, *_POINTWISE_MODULES, *[f"Tensor.{m}" for m in _POINTWISE_METHODS], *_POINTWISE_ATEN)
@register_tag(torch.Tag.pointwise)
def _c_pointwise(ctx: OpContext):
    operands = ctx.tensor_args()
    return "pointwise", {}, operands


@register_op("Tensor.type_as", aten.type_as)
def _c_type_as(ctx: OpContext):
    return "pointwise", {}, ctx.tensor_args()[:1]


# -- normalisation -----------------------------------------------------------------------
@register_op(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
def _c_batchnorm_module(ctx: OpContext):
    m = ctx.module
    batch_stats = m.training or not m.track_running_stats or m.running_mean is None
    return "batchnorm", {"batch_statistics": bool(batch_stats)}, [ctx.node.args[0]]


@register_op(F.batch_norm)
def _c_batchnorm_fn(ctx: OpContext):
    b = ctx.bind(("input", "running_mean", "running_var", "weight", "bias", "training"), {"training": False})
    batch_stats = bool(b["training"]) or b["running_mean"] is None
    return "batchnorm", {"batch_statistics": batch_stats}, [b["input"]]


@register_op(aten.batch_norm, aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit,
             aten.native_batch_norm, aten._batch_norm_impl_index)
def _c_batchnorm_aten(ctx: OpContext):
    b = ctx.bind_schema()
    packet = ctx.node.target.overloadpacket
    if packet is aten._native_batch_norm_legit_no_training:
        training = False
    else:
        training = bool(b.get("training", True))
    return "batchnorm", {"batch_statistics": training}, [b["input"]]


def _norm(inp, dims: Sequence[int], ndim: int, what: str):
    dims = sorted({d % ndim for d in dims})
    return "norm", {"normalized_dims": dims, "norm": what}, [inp]


@register_op(nn.GroupNorm)
def _c_groupnorm_module(ctx: OpContext):
    inp = ctx.node.args[0]
    nd = len(ctx.shape(inp))
    return _norm(inp, range(1, nd), nd, f"GroupNorm({ctx.module.num_groups})")


@register_op(F.group_norm)
def _c_groupnorm_fn(ctx: OpContext):
    b = ctx.bind(("input", "num_groups"))
    nd = len(ctx.shape(b["input"]))
    return _norm(b["input"], range(1, nd), nd, f"GroupNorm({b['num_groups']})")


@register_op(aten.group_norm, aten.native_group_norm)
def _c_groupnorm_aten(ctx: OpContext):
    b = ctx.bind_schema()
    inp = b["input"]
    nd = len(ctx.shape(inp))
    return _norm(inp, range(1, nd), nd, "GroupNorm")


@register_op(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def _c_instancenorm_module(ctx: OpContext):
    m = ctx.module
    inp = ctx.node.args[0]
    nd = len(ctx.shape(inp))
    if m.track_running_stats and not m.training:
        return "batchnorm", {"batch_statistics": False}, [inp]  # running stats: per-channel affine
    return _norm(inp, range(2, nd), nd, "InstanceNorm")


@register_op(F.instance_norm)
def _c_instancenorm_fn(ctx: OpContext):
    b = ctx.bind(("input", "running_mean", "running_var", "weight", "bias", "use_input_stats"), {"use_input_stats": True})
    nd = len(ctx.shape(b["input"]))
    if not b["use_input_stats"]:
        return "batchnorm", {"batch_statistics": False}, [b["input"]]
    return _norm(b["input"], range(2, nd), nd, "InstanceNorm")


@register_op(aten.instance_norm)
def _c_instancenorm_aten(ctx: OpContext):
    b = ctx.bind_schema()
    nd = len(ctx.shape(b["input"]))
    if not b["use_input_stats"]:
        return "batchnorm", {"batch_statistics": False}, [b["input"]]
    return _norm(b["input"], range(2, nd), nd, "InstanceNorm")


@register_op(nn.LayerNorm, nn.RMSNorm)
def _c_layernorm_module(ctx: OpContext):
    inp = ctx.node.args[0]
    nd = len(ctx.shape(inp))
    k = len(ctx.module.normalized_shape)
    return _norm(inp, range(nd - k, nd), nd, type(ctx.module).__name__)


@register_op(F.normalize)
def _c_normalize(ctx: OpContext):
    """``F.normalize(x, p, dim)``: x divided by its norm along ``dim`` (RMSNorm over channels)."""
    b = ctx.bind(("input", "p", "dim", "eps"), {"p": 2.0, "dim": 1})
    nd = len(ctx.shape(b["input"]))
    dims = b["dim"] if isinstance(b["dim"], (list, tuple)) else [b["dim"]]
    return _norm(b["input"], [int(d) for d in dims], nd, "normalize")


@register_op(F.layer_norm, F.rms_norm, aten.layer_norm, aten.native_layer_norm, aten.rms_norm, aten._fused_rms_norm)
def _c_layernorm_fn(ctx: OpContext):
    if isinstance(ctx.node.target, (torch._ops.OpOverload,)):
        b = ctx.bind_schema()
    else:
        b = ctx.bind(("input", "normalized_shape"))
    inp = b["input"]
    nd = len(ctx.shape(inp))
    ns = b["normalized_shape"]
    k = len(ns) if isinstance(ns, (list, tuple)) else 1
    return _norm(inp, range(nd - k, nd), nd, "LayerNorm" if "layer" in target_name(ctx.node.target) else "RMSNorm")


# -- softmax / reductions ------------------------------------------------------------------
@register_op(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "Tensor.softmax", "Tensor.log_softmax",
             nn.Softmax, nn.LogSoftmax, aten._softmax, aten.softmax, aten._log_softmax, aten.log_softmax,
             aten._safe_softmax)
def _c_softmax(ctx: OpContext):
    if ctx.module is not None:
        inp, dim = ctx.node.args[0], ctx.module.dim
    elif isinstance(ctx.node.target, torch._ops.OpOverload):
        b = ctx.bind_schema()
        inp, dim = b["self"], b["dim"]
    else:
        b = ctx.bind(("input", "dim"), {"dim": None})
        inp, dim = b["input"], b["dim"]
    nd = len(ctx.shape(inp))
    if dim is None:
        dim = 0 if nd in (0, 1, 3) else 1  # torch's legacy implicit dim
    return "softmax", {"dim": int(dim) % max(nd, 1)}, [inp]


_REDUCE_FNS = [torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
               torch.prod, torch.norm, torch.linalg.vector_norm, torch.max, torch.min, torch.median,
               torch.std_mean, torch.var_mean, torch.count_nonzero, torch.all, torch.any, torch.aminmax,
               torch.nanmean, torch.nansum, torch.nanmedian, torch.argmax, torch.argmin, torch.mode]
_REDUCE_METHODS = ["mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod", "norm", "max", "min",
                   "median", "all", "any", "aminmax", "nanmean", "nansum", "nanmedian", "argmax", "argmin", "mode"]
_REDUCE_ATEN = [aten.mean, aten.sum, aten.amax, aten.amin, aten.std, aten.var, aten.logsumexp, aten.prod,
                aten.norm, aten.linalg_vector_norm, aten.max, aten.min, aten.var_mean, aten.std_mean,
                aten.median, aten.all, aten.any, aten.aminmax, aten.nanmean, aten.nansum, aten.nanmedian,
                aten.argmax, aten.argmin, aten.mode]


# Positional names of the reduction functions (second positional is the dim, except for
# norms, whose second positional is the order p).
_REDUCE_NAMES = {torch.norm: ("input", "p", "dim"), "Tensor.norm": ("input", "p", "dim"),
                 torch.linalg.vector_norm: ("x", "ord", "dim")}


@register_op(*_REDUCE_FNS, *[f"Tensor.{m}" for m in _REDUCE_METHODS], *_REDUCE_ATEN)
def _c_reduce(ctx: OpContext):
    tensors = ctx.tensor_args()
    if len(tensors) > 1:  # torch.max(a, b), aten.max.other: elementwise
        return "pointwise", {}, tensors
    if isinstance(ctx.node.target, torch._ops.OpOverload):
        b = ctx.bind_schema()
        inp, dim = b.get("self", b.get("input")), b.get("dim")
    else:
        key = ctx.node.target if ctx.node.op == "call_function" else f"Tensor.{ctx.node.target}"
        names = _REDUCE_NAMES.get(key, ("input", "dim"))
        b = ctx.bind(names, {"dim": None})
        inp = b.get(names[0])
        dim = b.get("dim", b.get("axis"))
        if isinstance(dim, bool):  # torch.std(x, True): the old 'unbiased' positional
            dim = None
    nd = len(ctx.shape(inp))
    if dim is None or dim == [] or dim == ():
        dims = list(range(nd))
    elif isinstance(dim, (list, tuple)):
        dims = [int(d) % nd for d in dim]
    else:
        dims = [int(dim) % nd]
    return "reduce", {"dims": sorted(set(dims))}, [inp]
