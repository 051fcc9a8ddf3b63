"""Canonicalisers of the index-map ops: convolutions, pooling, upsampling, pixel (un)shuffle, padding."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .base import OpContext, aten, register_op, target_name


def as_tuple(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        v = tuple(int(x) for x in v)
        if len(v) == 1 and n > 1:
            return v * n
        if len(v) != n:
            raise ValueError(f"expected {n} values, got {v}")
        return v
    return (int(v),) * n


def _conv_padding(padding: Any, kernel: tuple, dilation: tuple, nd: int) -> list[list[int]]:
    if isinstance(padding, str):
        if padding == "valid":
            return [[0, 0] for _ in range(nd)]
        if padding == "same":
            out = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                out.append([total // 2, total - total // 2])
            return out
        raise ValueError(f"unknown conv padding {padding!r}")
    p = as_tuple(padding, nd)
    return [[x, x] for x in p]


def _conv_params(inp: fx.Node, weight_shape: tuple, stride, padding, dilation, groups,
                 transposed: bool, output_padding, padding_mode: str, ctx: OpContext) -> dict:
    in_shape = ctx.shape(inp)
    nd = len(weight_shape) - 2
    kernel = tuple(int(k) for k in weight_shape[2:])
    stride = as_tuple(stride, nd)
    dilation = as_tuple(dilation, nd)
    params = {
        "nd": nd,
        "kernel": list(kernel),
        "stride": list(stride),
        "dilation": list(dilation),
        "padding": _conv_padding(padding, kernel, dilation, nd),
        "padding_spec": padding if isinstance(padding, str) else list(as_tuple(padding, nd)),
        "padding_mode": padding_mode,
        "groups": int(groups),
        "transposed": bool(transposed),
    }
    if transposed:
        # Output padding from the shapes (covers ConvTranspose called with output_size).
        out_shape = ctx.out_shape
        op = []
        for ax in range(nd):
            n_in = in_shape[-nd + ax]
            base = (n_in - 1) * stride[ax] - 2 * params["padding"][ax][0] + dilation[ax] * (kernel[ax] - 1) + 1
            op.append(int(out_shape[-nd + ax] - base))
        params["output_padding"] = op
    return params


@register_op(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _c_conv_module(ctx: OpContext):
    m = ctx.module
    inp = ctx.node.args[0] if ctx.node.args else ctx.node.kwargs["input"]
    params = _conv_params(inp, tuple(m.weight.shape), m.stride, m.padding, m.dilation, m.groups,
                          False, None, m.padding_mode, ctx)
    return "conv", params, [inp]


@register_op(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _c_convt_module(ctx: OpContext):
    m = ctx.module
    inp = ctx.node.args[0] if ctx.node.args else ctx.node.kwargs["input"]
    params = _conv_params(inp, tuple(m.weight.shape), m.stride, m.padding, m.dilation, m.groups,
                          True, m.output_padding, m.padding_mode, ctx)
    return "conv_transpose", params, [inp]


_CONV_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVT_NAMES = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")


def _conv_from_bound(ctx: OpContext, b: dict, transposed: bool):
    inp, w = b["input"], b["weight"]
    if not ctx.is_tensor(w):
        raise ValueError("conv weight is not a tensor node")
    params = _conv_params(inp, ctx.shape(w), b.get("stride", 1), b.get("padding", 0), b.get("dilation", 1),
                          b.get("groups", 1), transposed, b.get("output_padding", 0), "zeros", ctx)
    operands = [inp, w] + ([b["bias"]] if ctx.is_tensor(b.get("bias")) else [])
    return ("conv_transpose" if transposed else "conv"), params, operands


@register_op(F.conv1d, F.conv2d, F.conv3d)
def _c_conv_fn(ctx: OpContext):
    return _conv_from_bound(ctx, ctx.bind(_CONV_NAMES, {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}), False)


@register_op(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
def _c_convt_fn(ctx: OpContext):
    return _conv_from_bound(ctx, ctx.bind(_CONVT_NAMES, {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}), True)


@register_op(aten.conv1d, aten.conv2d, aten.conv3d)
def _c_conv_aten(ctx: OpContext):
    return _conv_from_bound(ctx, ctx.bind_schema(), False)


@register_op(aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
def _c_convt_aten(ctx: OpContext):
    return _conv_from_bound(ctx, ctx.bind_schema(), True)


@register_op(aten.convolution, aten._convolution)
def _c_convolution_aten(ctx: OpContext):
    b = ctx.bind_schema()
    return _conv_from_bound(ctx, b, bool(b["transposed"]))


# -- pooling -----------------------------------------------------------------------------
def _pool(ctx: OpContext, inp, kind: str, nd: int, kernel, stride, padding, dilation=1, ceil_mode=False):
    kernel = as_tuple(kernel, nd)
    stride = as_tuple(stride, nd) if stride not in (None, [], ()) else kernel
    params = {
        "nd": nd,
        "pool": kind,
        "kernel": list(kernel),
        "stride": list(stride),
        "dilation": list(as_tuple(dilation, nd)),
        "padding": [[p, p] for p in as_tuple(padding, nd)],
        "padding_mode": "zeros" if kind == "avg" else "constant(-inf)",
        "ceil_mode": bool(ceil_mode),
    }
    return "pool", params, [inp]


_POOL_MODULES = {nn.MaxPool1d: ("max", 1), nn.MaxPool2d: ("max", 2), nn.MaxPool3d: ("max", 3),
                 nn.AvgPool1d: ("avg", 1), nn.AvgPool2d: ("avg", 2), nn.AvgPool3d: ("avg", 3)}


@register_op(*_POOL_MODULES)
def _c_pool_module(ctx: OpContext):
    m = ctx.module
    kind, nd = _POOL_MODULES[type(m)] if type(m) in _POOL_MODULES else next(
        v for k, v in _POOL_MODULES.items() if isinstance(m, k))
    return _pool(ctx, ctx.node.args[0], kind, nd, m.kernel_size, m.stride, m.padding,
                 getattr(m, "dilation", 1), m.ceil_mode)


_POOL_FN_NAMES = {
    "max": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "avg": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
}
_POOL_FNS = {F.max_pool1d: ("max", 1), F.max_pool2d: ("max", 2), F.max_pool3d: ("max", 3),
             F.max_pool1d_with_indices: ("max", 1), F.max_pool2d_with_indices: ("max", 2),
             F.max_pool3d_with_indices: ("max", 3),
             F.avg_pool1d: ("avg", 1), F.avg_pool2d: ("avg", 2), F.avg_pool3d: ("avg", 3)}


@register_op(*_POOL_FNS)
def _c_pool_fn(ctx: OpContext):
    kind, nd = _POOL_FNS[ctx.node.target]
    b = ctx.bind(_POOL_FN_NAMES[kind], {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False})
    return _pool(ctx, b["input"], kind, nd, b["kernel_size"], b["stride"], b["padding"], b.get("dilation", 1), b["ceil_mode"])


_POOL_ATEN = {aten.max_pool1d: ("max", 1), aten.max_pool2d: ("max", 2), aten.max_pool3d: ("max", 3),
              aten.max_pool2d_with_indices: ("max", 2), aten.max_pool3d_with_indices: ("max", 3),
              aten.avg_pool1d: ("avg", 1), aten.avg_pool2d: ("avg", 2), aten.avg_pool3d: ("avg", 3)}


@register_op(*_POOL_ATEN)
def _c_pool_aten(ctx: OpContext):
    kind, nd = _POOL_ATEN[ctx.node.target.overloadpacket]
    b = ctx.bind_schema()
    return _pool(ctx, b["self"], kind, nd, b["kernel_size"], b.get("stride"), b.get("padding", 0),
                 b.get("dilation", 1), b.get("ceil_mode", False))


@register_op(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
             nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
             F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
             F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
             F.adaptive_max_pool1d_with_indices, F.adaptive_max_pool2d_with_indices,
             aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d,
             aten._adaptive_avg_pool2d, aten._adaptive_avg_pool3d,
             aten.adaptive_max_pool1d, aten.adaptive_max_pool2d, aten.adaptive_max_pool3d)
def _c_adaptive_pool(ctx: OpContext):
    inp = ctx.node.args[0] if ctx.node.args else next(iter(ctx.node.kwargs.values()))
    name = target_name(type(ctx.module) if ctx.module is not None else ctx.node.target)
    nd = int(next(c for c in reversed(name) if c.isdigit()))
    return "adaptive_pool", {"nd": nd, "pool": "max" if "max" in name.lower() else "avg"}, [inp]


# -- upsampling ----------------------------------------------------------------------------
def _upsample(inp, mode: str, align_corners: Optional[bool], nd: int):
    if mode == "area":
        return "adaptive_pool", {"nd": nd, "pool": "avg"}, [inp]
    return "upsample", {"nd": nd, "mode": mode, "align_corners": bool(align_corners)}, [inp]


@register_op(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
def _c_upsample_module(ctx: OpContext):
    m = ctx.module
    inp = ctx.node.args[0]
    nd = len(ctx.shape(inp)) - 2
    return _upsample(inp, m.mode, m.align_corners, nd)


@register_op(F.interpolate, F.upsample)
def _c_interpolate(ctx: OpContext):
    b = ctx.bind(("input", "size", "scale_factor", "mode", "align_corners"), {"mode": "nearest", "align_corners": None})
    return _upsample(b["input"], b["mode"], b["align_corners"], len(ctx.shape(b["input"])) - 2)


@register_op(F.upsample_nearest)
def _c_upsample_nearest_fn(ctx: OpContext):
    inp = ctx.node.args[0]
    return _upsample(inp, "nearest", None, len(ctx.shape(inp)) - 2)


@register_op(F.upsample_bilinear)
def _c_upsample_bilinear_fn(ctx: OpContext):
    inp = ctx.node.args[0]
    return _upsample(inp, "bilinear", True, 2)


_UPSAMPLE_ATEN = {aten.upsample_nearest1d: "nearest", aten.upsample_nearest2d: "nearest",
                  aten.upsample_nearest3d: "nearest", aten._upsample_nearest_exact1d: "nearest-exact",
                  aten._upsample_nearest_exact2d: "nearest-exact", aten._upsample_nearest_exact3d: "nearest-exact",
                  aten.upsample_linear1d: "linear", aten.upsample_bilinear2d: "bilinear",
                  aten.upsample_trilinear3d: "trilinear", aten.upsample_bicubic2d: "bicubic"}


@register_op(*_UPSAMPLE_ATEN)
def _c_upsample_aten(ctx: OpContext):
    b = ctx.bind_schema()
    inp = b.get("input", b.get("self"))
    return _upsample(inp, _UPSAMPLE_ATEN[ctx.node.target.overloadpacket], b.get("align_corners", False),
                     len(ctx.shape(inp)) - 2)


@register_op(nn.PixelShuffle, F.pixel_shuffle, aten.pixel_shuffle)
def _c_pixel_shuffle(ctx: OpContext):
    if ctx.module is not None:
        return "pixel_shuffle", {"factor": int(ctx.module.upscale_factor)}, [ctx.node.args[0]]
    b = ctx.bind(("input", "upscale_factor"))
    return "pixel_shuffle", {"factor": int(b["upscale_factor"])}, [b["input"]]


@register_op(nn.PixelUnshuffle, F.pixel_unshuffle, aten.pixel_unshuffle)
def _c_pixel_unshuffle(ctx: OpContext):
    if ctx.module is not None:
        return "pixel_unshuffle", {"factor": int(ctx.module.downscale_factor)}, [ctx.node.args[0]]
    b = ctx.bind(("input", "downscale_factor"))
    return "pixel_unshuffle", {"factor": int(b["downscale_factor"])}, [b["input"]]


# -- padding -------------------------------------------------------------------------------
_PAD_MODE = {"constant": "zeros", "zeros": "zeros", "reflect": "reflect", "replicate": "replicate",
             "circular": "circular"}


def _pad(inp, pad: Sequence[int], mode: str, value: Any = None):
    pad = [int(p) for p in pad]
    if len(pad) % 2:
        raise ValueError(f"pad needs pairs, got {pad}")
    if mode not in _PAD_MODE:
        raise ValueError(f"unknown pad mode {mode!r}")
    # F.pad order: (last_before, last_after, 2nd_last_before, ...) -> per trailing dim.
    per_dim = [[pad[2 * i], pad[2 * i + 1]] for i in range(len(pad) // 2)][::-1]
    params = {"padding": per_dim, "padding_mode": _PAD_MODE[mode]}
    if mode == "constant" and value not in (None, 0, 0.0):
        params["value"] = float(value)
    return "pad", params, [inp]


@register_op(F.pad, torch._C._nn.pad)
def _c_pad_fn(ctx: OpContext):
    b = ctx.bind(("input", "pad", "mode", "value"), {"mode": "constant", "value": None})
    return _pad(b["input"], b["pad"], b["mode"], b["value"])


@register_op(aten.pad)
def _c_pad_aten(ctx: OpContext):
    b = ctx.bind_schema()
    return _pad(b["self"], b["pad"], b["mode"], b.get("value"))


@register_op(aten.constant_pad_nd)
def _c_constant_pad_aten(ctx: OpContext):
    b = ctx.bind_schema()
    return _pad(b["self"], b["pad"], "constant", b.get("value"))


_PAD_ATEN_MODE = {aten.reflection_pad1d: "reflect", aten.reflection_pad2d: "reflect", aten.reflection_pad3d: "reflect",
                  aten.replication_pad1d: "replicate", aten.replication_pad2d: "replicate",
                  aten.replication_pad3d: "replicate", aten._pad_circular: "circular"}


@register_op(*_PAD_ATEN_MODE)
def _c_mode_pad_aten(ctx: OpContext):
    b = ctx.bind_schema()
    return _pad(b["self"], b.get("padding", b.get("pad")), _PAD_ATEN_MODE[ctx.node.target.overloadpacket])


_PAD_MODULES = {nn.ZeroPad1d: "constant", nn.ZeroPad2d: "constant", nn.ZeroPad3d: "constant",
                nn.ConstantPad1d: "constant", nn.ConstantPad2d: "constant", nn.ConstantPad3d: "constant",
                nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect", nn.ReflectionPad3d: "reflect",
                nn.ReplicationPad1d: "replicate", nn.ReplicationPad2d: "replicate", nn.ReplicationPad3d: "replicate",
                nn.CircularPad1d: "circular", nn.CircularPad2d: "circular", nn.CircularPad3d: "circular"}


@register_op(*_PAD_MODULES)
def _c_pad_module(ctx: OpContext):
    m = ctx.module
    mode = next(v for k, v in _PAD_MODULES.items() if isinstance(m, k))
    return _pad(ctx.node.args[0], m.padding, mode, getattr(m, "value", None))
