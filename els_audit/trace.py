"""Stage 1 of the architecture probes: trace a denoiser into an FX graph, with shapes.

References:
- torch.fx ``symbolic_trace`` / ``Tracer`` (leaf modules, ``concrete_args``) and
  ``torch/fx/passes/shape_prop.py`` (:class:`ShapeProp`): shapes on every node.
- ``torch.export.export`` (non-strict): the fall-back for forwards that symbolic tracing
  cannot follow (tensor-dependent Python, ``len(proxy.shape)``, ...).  Its training IR is
  at the level of ``aten.conv2d`` / ``aten.linear`` / ``aten.group_norm``.
- fvcore ``nn/jit_handles.py`` and ``torch.utils.flop_counter``: a table maps every op to a
  handler; an op without one is reported, never assumed harmless.

What this module adds to the graph (``node.meta`` keys, all under the ``els_`` namespace;
later stages and the networkx view only read them):

``els_op``     :class:`OpInfo` -- canonical op kind, parameters, data operands.
``els_shape``  output shape (tuple), a tuple of shapes for multi-output ops, or ``None``.
``els_value``  concrete value of non-tensor nodes (``x.shape``, sizes, dtypes).
``els_vary``   per dim of a tensor output: does the value vary along that dim (from the
               example run; used to tell a learned position embedding from a broadcast
               time embedding).
``els_image``  ``True`` when the node's value depends on the image input (through data
               operands; shape queries such as ``x.shape`` do not count).
``els_on_path`` ``True`` when the node lies on a path from the image to the analysed output.

The canonical op table (:data:`OP_TABLE`) maps torch.nn module classes, functions, aten
overload packets and ``Tensor`` methods to a canonicaliser that returns
``(kind, params, operands)``.  Register more with :func:`register_op`; a target registered
twice is refused.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from .serialize import json_safe

__all__ = [
    "TraceResult",
    "TraceError",
    "OpInfo",
    "OpContext",
    "OP_TABLE",
    "register_op",
    "trace_model",
    "META_OP",
    "META_SHAPE",
    "META_VALUE",
    "META_VARY",
    "META_IMAGE",
    "META_ON_PATH",
    "target_name",
]

META_OP = "els_op"
META_SHAPE = "els_shape"
META_VALUE = "els_value"
META_VARY = "els_vary"
META_IMAGE = "els_image"
META_ON_PATH = "els_on_path"



class _MissingOp:
    """Stands in for an aten op this torch build lacks: registrable, never matched."""

    def __init__(self, name: str):
        self.__name__ = name

    def __repr__(self) -> str:
        return f"aten.{self.__name__} (absent in this torch build)"


class _SafeAten:
    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(torch.ops.aten, name)
        except (AttributeError, RuntimeError):
            return _MissingOp(name)


aten = _SafeAten()


# Kinds that carry no data (shape queries, asserts, guards): never image-dependent.
_META_KIND = "meta"
# Tensors up to this many elements get an exact ``els_vary`` record; bigger ones are
# recorded as varying along every dim.  NB: conservative (a big constant buffer would be
# flagged as position-dependent), never optimistic.
_VARY_MAX_NUMEL = 1 << 24


class TraceError(ValueError):
    """The model could not be traced (both tracers failed) or the inputs are unusable."""


# ----------------------------------------------------------------------------------------
# Canonical op records
# ----------------------------------------------------------------------------------------
def target_name(target: Any) -> str:
    """A readable qualified name for an FX node target (class, function, aten op, method)."""
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target.__name__}" if target.namespace == "aten" else str(target)
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"aten.{target.__name__}"
    if isinstance(target, type):
        return f"{target.__module__}.{target.__qualname__}"
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    if "boolean_dispatch" in name:
        name = getattr(target, "__name__", name)
    return f"{mod}.{name}" if mod else name


def _json_default(x: Any) -> Any:
    """How an op parameter that is no plain value is written: a dtype by name, a graph node
    by its name, anything else by its repr."""
    if isinstance(x, (torch.dtype, fx.Node)):
        return str(x)
    return repr(x)


@dataclass(frozen=True)
class OpInfo:
    """The canonical description of one graph node.

    Attributes:
        kind: canonical op kind (``"conv"``, ``"pool"``, ``"pointwise"``, ``"norm"``,
            ``"einsum"``, ``"attention"``, ...; ``"unknown"`` when no table entry matched;
            ``"meta"`` for nodes without data, e.g. ``x.shape``).
        target: qualified name of the op (module class, function, aten op or method).
        module_path: dotted path of the owning submodule (``""`` at the root / unknown).
        params: kind-specific parameters (JSON-safe): kernel, stride, dilation, padding
            (per spatial dim, ``[before, after]``), padding_mode, groups, ...
        operands: names of the data operand nodes in canonical order (e.g. for a conv
            ``(input, weight[, bias])``; shape-only arguments are not operands).
        note: why the op is ``unknown`` (no rule, or the rule failed), else ``""``.
    """

    kind: str
    target: str
    module_path: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    operands: tuple[str, ...] = ()
    note: str = ""

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "target": self.target,
            "module_path": self.module_path,
            "params": json_safe(dict(self.params), _json_default),
            "operands": list(self.operands),
            "note": self.note,
        }


Canonicaliser = Callable[["OpContext"], tuple]


class _OpTable:
    """Target -> canonicaliser.  Keys: nn.Module classes, callables, aten overload packets,
    and ``"Tensor.<method>"`` strings for ``call_method`` nodes."""

    def __init__(self) -> None:
        self._rules: dict[Any, Canonicaliser] = {}

    def register(self, *targets: Any) -> Callable[[Canonicaliser], Canonicaliser]:
        """Decorator registering ``fn`` for every target; refuses a target already taken."""
        if not targets:
            raise ValueError("register_op needs at least one target")

        def deco(fn: Canonicaliser) -> Canonicaliser:
            for t in targets:
                key = t  # a class, a callable, an aten packet or overload, or "Tensor.<method>"
                if key in self._rules:
                    raise ValueError(
                        f"op {target_name(t)} already has a canonical rule "
                        f"({self._rules[key].__qualname__}); refusing {fn.__qualname__}"
                    )
                self._rules[key] = fn
            return fn

        return deco

    def lookup(self, node: fx.Node, gm: fx.GraphModule) -> Optional[Canonicaliser]:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            cls = type(mod)
            if cls in self._rules:
                return self._rules[cls]
            # A subclass that keeps its parent's forward behaves like the parent.
            for base in cls.__mro__[1:]:
                if base in self._rules and getattr(cls, "forward", None) is getattr(base, "forward", None):
                    return self._rules[base]
            return None
        if node.op == "call_method":
            return self._rules.get(f"Tensor.{node.target}")
        if node.op == "call_function":
            t = node.target
            try:
                if t in self._rules:
                    return self._rules[t]
            except TypeError:  # unhashable target
                return None
            if isinstance(t, torch._ops.OpOverload):
                return self._rules.get(t.overloadpacket)
        return None

    def __contains__(self, t: Any) -> bool:
        return t in self._rules

    def targets(self) -> list[str]:
        return sorted(target_name(k) for k in self._rules)


#: The canonical op table (see :func:`register_op`).
OP_TABLE = _OpTable()
register_op = OP_TABLE.register


class OpContext:
    """What a canonicaliser sees: the node, its module, argument binding and values."""

    def __init__(self, node: fx.Node, gm: fx.GraphModule):
        self.node = node
        self.gm = gm
        self.module = gm.get_submodule(node.target) if node.op == "call_module" else None

    # -- values ------------------------------------------------------------------
    @staticmethod
    def is_tensor(x: Any) -> bool:
        return isinstance(x, fx.Node) and isinstance(x.meta.get(META_SHAPE), tuple) and (
            len(x.meta[META_SHAPE]) == 0 or isinstance(x.meta[META_SHAPE][0], int)
        )

    def value(self, x: Any) -> Any:
        """Concrete value of an argument: non-tensor nodes are replaced by their recorded
        value, tensor nodes are returned as nodes; containers are resolved recursively."""
        if isinstance(x, fx.Node):
            if self.is_tensor(x):
                return x
            return x.meta.get(META_VALUE)
        if isinstance(x, (list, tuple)):
            return type(x)(self.value(v) for v in x) if not isinstance(x, torch.Size) else tuple(x)
        if isinstance(x, dict):
            return {k: self.value(v) for k, v in x.items()}
        return x

    def shape(self, x: Any) -> Optional[tuple]:
        return x.meta.get(META_SHAPE) if isinstance(x, fx.Node) else None

    @property
    def out_shape(self) -> Any:
        return self.node.meta.get(META_SHAPE)

    # -- binding -----------------------------------------------------------------
    def bind(self, names: Sequence[str], defaults: Optional[Mapping[str, Any]] = None, skip_self: bool = False) -> dict:
        """Bind positional/keyword args to ``names`` (values resolved with :meth:`value`)."""
        out = dict(defaults or {})
        args = list(self.node.args)
        for name, a in zip(names, args):
            out[name] = a
        out.update(self.node.kwargs)
        return {k: self.value(v) for k, v in out.items()}

    def bind_schema(self) -> dict:
        """Bind an aten node's arguments by its schema (defaults filled in)."""
        schema = self.node.target._schema
        names = [a.name for a in schema.arguments]
        defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
        return self.bind(names, defaults)

    def tensor_args(self) -> list[fx.Node]:
        """Every tensor node among the args/kwargs, in order (duplicates kept once)."""
        seen: list[fx.Node] = []
        for a in pytree.tree_leaves((list(self.node.args), dict(self.node.kwargs))):
            if self.is_tensor(a) and a not in seen:
                seen.append(a)
        return seen


# ----------------------------------------------------------------------------------------
# Canonicalisers
# ----------------------------------------------------------------------------------------
def _tup(v: Any, n: int) -> tuple[int, ...]:
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
    p = _tup(padding, nd)
    return [[x, x] for x in p]


def _conv_params(inp: fx.Node, weight_shape: tuple, stride, padding, dilation, groups,
                 transposed: bool, output_padding, padding_mode: str, ctx: OpContext) -> dict:
    in_shape = ctx.shape(inp)
    nd = len(weight_shape) - 2
    kernel = tuple(int(k) for k in weight_shape[2:])
    stride = _tup(stride, nd)
    dilation = _tup(dilation, nd)
    params = {
        "nd": nd,
        "kernel": list(kernel),
        "stride": list(stride),
        "dilation": list(dilation),
        "padding": _conv_padding(padding, kernel, dilation, nd),
        "padding_spec": padding if isinstance(padding, str) else list(_tup(padding, nd)),
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
    kernel = _tup(kernel, nd)
    stride = _tup(stride, nd) if stride not in (None, [], ()) else kernel
    params = {
        "nd": nd,
        "pool": kind,
        "kernel": list(kernel),
        "stride": list(stride),
        "dilation": list(_tup(dilation, nd)),
        "padding": [[p, p] for p in _tup(padding, nd)],
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
               torch.std_mean, torch.var_mean, torch.count_nonzero, torch.all, torch.any]
_REDUCE_METHODS = ["mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod", "norm", "max", "min",
                   "median", "all", "any"]
_REDUCE_ATEN = [aten.mean, aten.sum, aten.amax, aten.amin, aten.std, aten.var, aten.logsumexp, aten.prod,
                aten.norm, aten.linalg_vector_norm, aten.max, aten.min, aten.var_mean, aten.std_mean,
                aten.median, aten.all, aten.any]


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


# -- contractions --------------------------------------------------------------------------
def _matmul_equation(sa: tuple, sb: tuple) -> str:
    if len(sa) == 1 and len(sb) == 1:
        return "k,k->"
    if len(sa) == 1:
        return "k,...kn->...n"
    if len(sb) == 1:
        return "...mk,k->...m"
    return "...mk,...kn->...mn"


@register_op(torch.matmul, operator.matmul, "Tensor.matmul", "Tensor.__matmul__", aten.matmul)
def _c_matmul(ctx: OpContext):
    a, b = ctx.tensor_args()[:2] if len(ctx.tensor_args()) >= 2 else (ctx.node.args[0], ctx.node.args[1])
    return "einsum", {"equation": _matmul_equation(ctx.shape(a), ctx.shape(b)), "op": "matmul"}, [a, b]


@register_op(torch.bmm, "Tensor.bmm", aten.bmm)
def _c_bmm(ctx: OpContext):
    a, b = ctx.node.args[:2]
    return "einsum", {"equation": "bmk,bkn->bmn", "op": "bmm"}, [a, b]


@register_op(torch.mm, "Tensor.mm", aten.mm)
def _c_mm(ctx: OpContext):
    a, b = ctx.node.args[:2]
    return "einsum", {"equation": "mk,kn->mn", "op": "mm"}, [a, b]


@register_op(torch.baddbmm, "Tensor.baddbmm", aten.baddbmm, torch.addmm, "Tensor.addmm", aten.addmm)
def _c_addmm(ctx: OpContext):
    bias, a, b = ctx.node.args[:3]
    eq = "bmk,bkn->bmn" if len(ctx.shape(a)) == 3 else "mk,kn->mn"
    operands = [a, b] + ([bias] if ctx.is_tensor(bias) else [])
    return "einsum", {"equation": eq, "op": "addmm", "addend": ctx.is_tensor(bias)}, operands


@register_op(torch.einsum, aten.einsum)
def _c_einsum(ctx: OpContext):
    args = list(ctx.node.args)
    eq = ctx.value(args[0])
    ops = args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    return "einsum", {"equation": str(eq).replace(" ", ""), "op": "einsum"}, ops


@register_op(nn.Linear, F.linear, aten.linear)
def _c_linear(ctx: OpContext):
    if ctx.module is not None:
        return "einsum", {"equation": "...k,nk->...n", "op": "linear"}, [ctx.node.args[0]]
    b = ctx.bind(("input", "weight", "bias"), {"bias": None})
    operands = [b["input"], b["weight"]] + ([b["bias"]] if ctx.is_tensor(b.get("bias")) else [])
    eq = "...k,nk->...n" if len(ctx.shape(b["weight"])) == 2 else "...k,k->..."
    return "einsum", {"equation": eq, "op": "linear", "addend": ctx.is_tensor(b.get("bias"))}, operands


@register_op(F.scaled_dot_product_attention, aten.scaled_dot_product_attention,
             aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention,
             aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention,
             aten._scaled_dot_product_attention_math)
def _c_sdpa(ctx: OpContext):
    if isinstance(ctx.node.target, torch._ops.OpOverload):
        b = ctx.bind_schema()
    else:
        b = ctx.bind(("query", "key", "value", "attn_mask"), {"attn_mask": None})
    ops = [b["query"], b["key"], b["value"]]
    eq = "...le,...se,...sf->...lf"
    if ctx.is_tensor(b.get("attn_mask")):
        ops.append(b["attn_mask"])
        eq = "...le,...se,...sf,...ls->...lf"
    return "attention", {"equation": eq, "op": "scaled_dot_product_attention"}, ops


@register_op(nn.MultiheadAttention)
def _c_mha(ctx: OpContext):
    m = ctx.module
    b = ctx.bind(("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask"), {})
    q, k, v = b["query"], b["key"], b["value"]
    nd = len(ctx.shape(q))
    if nd == 2:
        eq = "le,se,sf->lf"
    elif m.batch_first:
        eq = "nle,nse,nsf->nlf"
    else:
        eq = "lne,sne,snf->lnf"
    ops = [q, k, v]
    if ctx.is_tensor(b.get("attn_mask")):
        ops.append(b["attn_mask"])
        eq = eq.replace("->", ",ls->") if nd == 2 else eq.replace("->", ",ls->")
    return "attention", {"equation": eq, "op": "MultiheadAttention", "batch_first": bool(m.batch_first)}, ops


@register_op(nn.Embedding, F.embedding, aten.embedding)
def _c_embedding(ctx: OpContext):
    if ctx.module is not None:
        idx = ctx.node.args[0]
    elif isinstance(ctx.node.target, torch._ops.OpOverload):
        idx = ctx.bind_schema()["indices"]
    else:
        idx = ctx.bind(("input", "weight"))["input"]
    return "embedding", {}, [idx]


# -- concatenation -------------------------------------------------------------------------
@register_op(torch.cat, torch.concat, torch.concatenate, aten.cat, aten.concat)
def _c_cat(ctx: OpContext):
    args = list(ctx.node.args)
    tensors = args[0] if args else ctx.node.kwargs.get("tensors")
    dim = ctx.value(args[1]) if len(args) > 1 else ctx.value(ctx.node.kwargs.get("dim", 0))
    nd = len(ctx.out_shape)
    return "cat", {"dim": int(dim) % nd}, [t for t in tensors if ctx.is_tensor(t)]


@register_op(torch.stack, aten.stack)
def _c_stack(ctx: OpContext):
    args = list(ctx.node.args)
    tensors = args[0] if args else ctx.node.kwargs.get("tensors")
    dim = ctx.value(args[1]) if len(args) > 1 else ctx.value(ctx.node.kwargs.get("dim", 0))
    nd = len(ctx.out_shape)
    return "stack", {"dim": int(dim) % nd}, [t for t in tensors if ctx.is_tensor(t)]


# -- shape ops -----------------------------------------------------------------------------
_RESHAPE = [torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze, torch.ravel,
            nn.Flatten, nn.Unflatten,
            aten.view, aten._unsafe_view, aten.reshape, aten.flatten, aten.unflatten, aten.squeeze,
            aten.unsqueeze, aten.view_copy, aten.squeeze_copy, aten.unsqueeze_copy, aten.ravel]
_RESHAPE_METHODS = ["view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
                    "reshape_as", "ravel", "squeeze_", "unsqueeze_"]


@register_op(*_RESHAPE, *[f"Tensor.{m}" for m in _RESHAPE_METHODS])
def _c_reshape(ctx: OpContext):
    inp = ctx.node.args[0] if ctx.node.args else next(iter(ctx.node.kwargs.values()))
    return "reshape", {"shape": list(ctx.out_shape)}, [inp]


def _perm_from(target_name_: str, nd: int, args: list) -> list[int]:
    if target_name_ in ("permute",):
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        return [int(d) % nd for d in dims]
    if target_name_ in ("transpose", "swapaxes", "swapdims"):
        a, b = int(args[0]) % nd, int(args[1]) % nd
        perm = list(range(nd))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if target_name_ in ("t", "T", "mT"):
        perm = list(range(nd))
        if nd >= 2:
            perm[-1], perm[-2] = perm[-2], perm[-1]
        return perm
    if target_name_ == "movedim":
        src, dst = args[0], args[1]
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src = [s % nd for s in src]
        dst = [d % nd for d in dst]
        order = [i for i in range(nd) if i not in src]
        perm = [None] * nd
        for s, d in zip(src, dst):
            perm[d] = s
        it = iter(order)
        return [p if p is not None else next(it) for p in perm]
    raise ValueError(f"not a permutation op: {target_name_}")


@register_op(torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.t, torch.movedim,
             "Tensor.permute", "Tensor.transpose", "Tensor.swapaxes", "Tensor.swapdims", "Tensor.t",
             "Tensor.movedim", "Tensor.transpose_",
             aten.permute, aten.transpose, aten.t, aten.movedim, aten.swapaxes, aten.permute_copy,
             aten.transpose_copy)
def _c_permute(ctx: OpContext):
    args = [ctx.value(a) for a in ctx.node.args]
    inp = ctx.node.args[0]
    nd = len(ctx.shape(inp))
    rest = args[1:]
    if not rest and ctx.node.kwargs:
        rest = [ctx.value(v) for v in ctx.node.kwargs.values()]
    if isinstance(ctx.node.target, torch._ops.OpOverload):
        name = ctx.node.target.overloadpacket.__name__.replace("_copy", "")
    elif isinstance(ctx.node.target, str):
        name = ctx.node.target.rstrip("_")
    else:
        name = ctx.node.target.__name__
    return "permute", {"perm": _perm_from(name, nd, rest)}, [inp]


@register_op(torch.broadcast_to, "Tensor.expand", "Tensor.expand_as", "Tensor.broadcast_to", aten.expand,
             aten.expand_copy, aten.broadcast_to, aten.expand_as)
def _c_expand(ctx: OpContext):
    return "expand", {"shape": list(ctx.out_shape)}, [ctx.node.args[0]]


@register_op("Tensor.repeat", aten.repeat, torch.tile, "Tensor.tile")
def _c_repeat(ctx: OpContext):
    inp = ctx.node.args[0]
    return "repeat", {"shape": list(ctx.out_shape)}, [inp]


@register_op(torch.roll, "Tensor.roll", aten.roll)
def _c_roll(ctx: OpContext):
    b = ctx.bind(("input", "shifts", "dims"), {"dims": None})
    nd = len(ctx.shape(b["input"]))
    shifts, dims = b["shifts"], b["dims"]
    if dims is None or dims == []:
        raise ValueError("roll without dims flattens the tensor; not a spatial shift")
    shifts = [int(shifts)] if isinstance(shifts, int) else [int(s) for s in shifts]
    dims = [int(dims) % nd] if isinstance(dims, int) else [int(d) % nd for d in dims]
    return "roll", {"shifts": shifts, "dims": dims}, [b["input"]]


def _index_specs(idx: Any, shape: tuple) -> Optional[list]:
    """Canonical per-dim spec of a basic index (``x[:, None, 2:5]``); ``None`` when the index
    uses tensors (advanced indexing)."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    n_consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
    specs: list = []
    dim = 0
    for i in idx:
        if i is Ellipsis:
            for _ in range(len(shape) - n_consumed):
                specs.append(["keep", dim, 0, shape[dim], 1])
                dim += 1
        elif i is None:
            specs.append(["new"])
        elif isinstance(i, slice):
            start, stop, step = i.indices(shape[dim])
            specs.append(["keep", dim, start, stop, step])
            dim += 1
        elif isinstance(i, int) and not isinstance(i, bool):
            specs.append(["select", dim, i % shape[dim]])
            dim += 1
        else:
            return None
    while dim < len(shape):
        specs.append(["keep", dim, 0, shape[dim], 1])
        dim += 1
    return specs


@register_op(operator.getitem)
def _c_getitem(ctx: OpContext):
    src, idx = ctx.node.args[0], ctx.node.args[1]
    src_shape = ctx.shape(src)
    if isinstance(src, fx.Node) and isinstance(src_shape, tuple) and src_shape and isinstance(src_shape[0], tuple | type(None)):
        return "select_output", {"index": int(ctx.value(idx))}, [src]
    if isinstance(src, fx.Node) and src.meta.get(META_SHAPE) is None and isinstance(src.meta.get(META_VALUE), (list, tuple)):
        return _META_KIND, {}, []
    if not ctx.is_tensor(src):
        return _META_KIND, {}, []
    specs = _index_specs(ctx.value(idx), src_shape)
    if specs is None:
        return "gather", {}, [src] + [t for t in pytree.tree_leaves(idx) if ctx.is_tensor(t)]
    return "index", {"specs": specs}, [src]


@register_op(aten.slice, aten.slice_copy)
def _c_slice_aten(ctx: OpContext):
    b = ctx.bind_schema()
    shape = ctx.shape(b["self"])
    d = int(b.get("dim", 0)) % len(shape)
    start = b.get("start") or 0
    end = b.get("end")
    end = shape[d] if end is None else end
    start, stop, step = slice(start, end, int(b.get("step", 1) or 1)).indices(shape[d])
    specs = [["keep", i, 0, shape[i], 1] for i in range(len(shape))]
    specs[d] = ["keep", d, start, stop, step]
    return "index", {"specs": specs}, [b["self"]]


@register_op(aten.select, "Tensor.select", torch.select, aten.select_copy)
def _c_select(ctx: OpContext):
    src = ctx.node.args[0]
    shape = ctx.shape(src)
    d, i = int(ctx.value(ctx.node.args[1])) % len(shape), int(ctx.value(ctx.node.args[2]))
    specs = [["keep", j, 0, shape[j], 1] for j in range(len(shape))]
    specs[d] = ["select", d, i % shape[d]]
    return "index", {"specs": specs}, [src]


@register_op(torch.narrow, "Tensor.narrow", aten.narrow)
def _c_narrow(ctx: OpContext):
    src = ctx.node.args[0]
    shape = ctx.shape(src)
    d, start, length = (int(ctx.value(a)) for a in ctx.node.args[1:4])
    d %= len(shape)
    specs = [["keep", j, 0, shape[j], 1] for j in range(len(shape))]
    specs[d] = ["keep", d, start % shape[d], start % shape[d] + length, 1]
    return "index", {"specs": specs}, [src]


@register_op(torch.chunk, torch.split, torch.tensor_split, torch.unbind, "Tensor.chunk", "Tensor.split",
             "Tensor.tensor_split", "Tensor.unbind", "Tensor.split_with_sizes",
             aten.chunk, aten.split, aten.split_with_sizes, aten.unbind, aten.tensor_split, aten.unsafe_split)
def _c_split(ctx: OpContext):
    src = ctx.node.args[0]
    nd = len(ctx.shape(src))
    name = target_name(ctx.node.target).split(".")[-1]
    if isinstance(ctx.node.target, torch._ops.OpOverload):
        name = ctx.node.target.overloadpacket.__name__
        b = ctx.bind_schema()
        dim = b.get("dim", 0)
    else:
        args = [ctx.value(a) for a in ctx.node.args]
        dim = ctx.node.kwargs.get("dim", args[1] if name == "unbind" and len(args) > 1 else (args[2] if len(args) > 2 else 0))
    return "split", {"dim": int(ctx.value(dim)) % nd, "unbind": "unbind" in name}, [src]


# -- sources without data dependence ------------------------------------------------------
_FACTORY = [torch.arange, torch.linspace, torch.logspace, torch.zeros, torch.ones, torch.full, torch.empty,
            torch.rand, torch.randn, torch.randint, torch.tensor, torch.as_tensor, torch.eye,
            torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like,
            torch.randn_like, torch.meshgrid,
            aten.arange, aten.linspace, aten.zeros, aten.ones, aten.full, aten.empty, aten.rand, aten.randn,
            aten.zeros_like, aten.ones_like, aten.full_like, aten.empty_like, aten.rand_like, aten.randn_like,
            aten.scalar_tensor, aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty, aten.eye,
            aten.empty_strided, aten.empty_permuted]
_FACTORY_METHODS = ["new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"]


@register_op(*_FACTORY, *[f"Tensor.{m}" for m in _FACTORY_METHODS])
def _c_factory(ctx: OpContext):
    # NB: a factory's tensor arguments (``zeros_like(x)``) give only shape/dtype, no data.
    t = ctx.node.target
    if isinstance(t, torch._ops.OpOverload):
        name = t.overloadpacket.__name__
    elif isinstance(t, str):
        name = t
    else:
        name = getattr(t, "__name__", str(t))
    return "factory", {"op": name}, []


_META_FNS = [getattr, torch._assert, torch.is_tensor, torch.numel, len, isinstance,
             aten.sym_size, aten.sym_numel, aten.sym_stride, aten._assert_tensor_metadata,
             aten._assert_async, aten._assert_scalar, aten.sym_constrain_range, aten.sym_constrain_range_for_size,
             aten._functional_assert_async]
_META_METHODS = ["size", "dim", "numel", "stride", "type", "item", "tolist", "get_device", "is_contiguous",
                 "element_size", "nelement", "ndimension"]


@register_op(*_META_FNS, *[f"Tensor.{m}" for m in _META_METHODS if m != "type"])
def _c_meta(ctx: OpContext):
    return _META_KIND, {}, []


_NO_DATA_FNS = set(_FACTORY) | set(_META_FNS)
_NO_DATA_METHODS = {f"Tensor.{m}" for m in _FACTORY_METHODS + _META_METHODS}


# ----------------------------------------------------------------------------------------
# Tracing
# ----------------------------------------------------------------------------------------
class _LeafTracer(fx.Tracer):
    def __init__(self, extra_leaves: tuple[type, ...] = ()):
        super().__init__()
        self._extra = tuple(extra_leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self._extra and isinstance(m, self._extra):
            return True
        return super().is_leaf_module(m, qualname)


class _Recorder(ShapeProp):
    """ShapeProp that also records non-tensor values and, per dim, whether tensors vary;
    keeps the graph's return value (to check the trace against eager execution)."""

    returned: Any = None

    def __init__(self, gm: fx.GraphModule, image_ph: Optional[fx.Node]):
        super().__init__(gm)
        self._skip_vary = _maybe_image_dependent(gm, image_ph)

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        _record(n, result, vary=n not in self._skip_vary)
        if n.op == "output":
            self.returned = result
        return result


def _no_data(node: fx.Node) -> bool:
    """Targets whose result carries no data of their tensor arguments (shape only)."""
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}" in _NO_DATA_METHODS
    if node.op == "call_function":
        try:
            if t in _NO_DATA_FNS:
                return True
        except TypeError:
            return False
        return isinstance(t, torch._ops.OpOverload) and t.overloadpacket in _NO_DATA_FNS
    return False


def _maybe_image_dependent(gm: fx.GraphModule, image_ph: Optional[fx.Node]) -> set:
    """Structural superset of the image-dependent nodes (through every edge except into
    shape-only ops).  Per-dim variation (``els_vary``) is only needed -- and only recorded --
    for the others: it is the expensive part of the recording."""
    if image_ph is None:
        return set()
    dep = {image_ph}
    for n in gm.graph.nodes:
        if n is image_ph or n.op in ("placeholder", "get_attr", "output") or _no_data(n):
            continue
        if any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def _shape_of(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return tuple(int(s) for s in v.shape)
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, torch.Tensor) or x is None for x in v) and any(
        isinstance(x, torch.Tensor) for x in v
    ):
        return tuple(_shape_of(x) for x in v)
    return None


def _plain_value(v: Any) -> Any:
    if isinstance(v, torch.Size):
        return tuple(int(s) for s in v)
    if isinstance(v, (list, tuple)):
        return type(v)(_plain_value(x) for x in v) if not isinstance(v, torch.Size) else tuple(v)
    if isinstance(v, (int, float, bool, str, type(None), torch.dtype, torch.device, slice)):
        return v
    if isinstance(v, torch.SymInt):
        return int(v)
    return repr(v)


def _vary(t: torch.Tensor) -> tuple[bool, ...]:
    if t.numel() > _VARY_MAX_NUMEL or t.numel() == 0:
        return tuple(s > 1 for s in t.shape)
    out = []
    with torch.no_grad():
        for d, s in enumerate(t.shape):
            if s <= 1:
                out.append(False)
            else:
                first = t.narrow(d, 0, 1)
                out.append(bool((t != first).any().item()))
    return tuple(out)


def _record(n: fx.Node, result: Any, vary: bool = True) -> None:
    shape = _shape_of(result)
    n.meta[META_SHAPE] = shape
    if isinstance(result, torch.Tensor) and vary:
        n.meta[META_VARY] = _vary(result)
    elif shape is None:
        n.meta[META_VALUE] = _plain_value(result)


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]


def _module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        path = last[0] if isinstance(last, tuple) else str(last)
        # torch.export writes e.g. "L['self'].down.0" in some versions.
        return path.replace("L['self'].", "").replace("L['self']", "")
    return ""


@dataclass(frozen=True)
class TraceResult:
    """A traced denoiser: the graph, with shapes and ``els_`` annotations on every node.

    Attributes:
        graph_module: the :class:`torch.fx.GraphModule` (annotated in ``node.meta``).
        tracer: ``"torch.fx.symbolic_trace"`` or ``"torch.export"``.
        tracer_reason: why that tracer (e.g. the error symbolic tracing stopped on).
        image_node: name of the placeholder holding the image x (B, C, *spatial).
        image_arg: name of the ``forward`` parameter that takes the image.
        output_node: name of the node analysed as the network's eps output.
        input_shape / output_shape: shapes of those two nodes.
        concrete_args: non-tensor arguments fixed during tracing (name -> repr).
        spatial_axes: names given to the image's spatial dims (``("H", "W")`` for 2-d).
        unknown_ops: ``(node, target)`` of ops on the image->output path with no table entry.
        op_counts: canonical kind -> number of nodes on the image->output path.
        verified_max_abs_diff: max |graph(x) - module(x)| on the example inputs (the trace
            is checked against eager execution), ``None`` when outputs were not comparable.
        training_mode: the module was in training mode (dropout / batch statistics active).
        example_args / example_kwargs: the inputs used (kept for numerical probes).
    """

    graph_module: fx.GraphModule
    tracer: str
    tracer_reason: str
    image_node: str
    image_arg: str
    output_node: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    concrete_args: Mapping[str, str]
    spatial_axes: tuple[str, ...]
    unknown_ops: tuple[tuple[str, str], ...]
    op_counts: Mapping[str, int]
    verified_max_abs_diff: Optional[float]
    training_mode: bool
    example_args: tuple = field(repr=False, default=())
    example_kwargs: Mapping[str, Any] = field(repr=False, default_factory=dict)
    forward_signature: Optional[inspect.Signature] = field(repr=False, default=None)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def node(self, name: str) -> fx.Node:
        """The graph node called ``name``."""
        for n in self.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r} in the traced graph")

    def nodes_on_path(self) -> list[fx.Node]:
        """Nodes on a data path from the image to the analysed output, in graph order."""
        return [n for n in self.graph.nodes if n.meta.get(META_ON_PATH)]

    def to_networkx(self):
        """The networkx ``DiGraph`` view (see :func:`els_audit.graph.to_networkx`)."""
        from .graph import to_networkx

        return to_networkx(self)

    def run(self, *args, **kwargs) -> torch.Tensor:
        """Run the traced graph and return the analysed output tensor."""
        return _run_to_output(self.graph_module, self.tracer, self.forward_signature, self.output_node, args, kwargs)

    def to_dict(self) -> dict:
        return {
            "tracer": self.tracer,
            "tracer_reason": self.tracer_reason,
            "image_node": self.image_node,
            "image_arg": self.image_arg,
            "output_node": self.output_node,
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "concrete_args": dict(self.concrete_args),
            "spatial_axes": list(self.spatial_axes),
            "n_nodes": len(self.graph.nodes),
            "n_nodes_on_path": len(self.nodes_on_path()),
            "unknown_ops": [list(u) for u in self.unknown_ops],
            "op_counts": dict(self.op_counts),
            "verified_max_abs_diff": self.verified_max_abs_diff,
            "training_mode": self.training_mode,
        }


_AXIS_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


def _flat_inputs(sig: inspect.Signature, args: tuple, kwargs: dict) -> tuple[list[str], list[Any], dict]:
    """Bind example inputs; returns (param names in order, values in order, concrete args)."""
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise TraceError(f"example inputs do not match forward{sig}: {exc}; pass example_args/example_kwargs that forward accepts") from None
    bound.apply_defaults()
    names, values, concrete = [], [], {}
    for name, p in sig.parameters.items():
        v = bound.arguments.get(name, p.default)
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            if v:
                raise TraceError(f"forward takes *{name}; pass every input by name so it can be traced")
            continue
        names.append(name)
        values.append(v)
        if not isinstance(v, torch.Tensor):
            concrete[name] = v
    return names, values, concrete


def _find_image_placeholder(gm: fx.GraphModule, tracer: str, names: list[str], img_name: str,
                            args: tuple, kwargs: Mapping, image: torch.Tensor) -> Optional[fx.Node]:
    """fx keeps one placeholder per ``forward`` parameter; export names its placeholders
    after the parameters (flattened input leaves otherwise)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if tracer != "torch.export":
        i = names.index(img_name)
        return placeholders[i] if i < len(placeholders) else None
    ph = next((p for p in placeholders if p.target == img_name), None)
    if ph is None:
        leaves = pytree.tree_leaves((tuple(args), dict(kwargs)))
        idx = next((i for i, v in enumerate(leaves) if v is image), None)
        ph = placeholders[idx] if idx is not None and idx < len(placeholders) else None
    return ph


def _graph_inputs(gm: fx.GraphModule, tracer: str, sig: inspect.Signature, args: tuple, kwargs: Mapping) -> list:
    """Values for the graph's placeholders, in order.

    fx keeps one placeholder per ``forward`` parameter (concrete ones included); export
    keeps one per flattened input leaf, named after the parameter where it can.
    """
    names, values, _ = _flat_inputs(sig, tuple(args), dict(kwargs))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if tracer == "torch.export":
        by_name = dict(zip(names, values))
        if all(p.target in by_name for p in placeholders):
            values = [by_name[p.target] for p in placeholders]
        else:
            values = pytree.tree_leaves((tuple(args), dict(kwargs)))
    if len(values) != len(placeholders):
        raise TraceError(
            f"the traced graph has {len(placeholders)} inputs but {len(values)} values were given; "
            "call it with the same arguments as the example"
        )
    return values


def _run_to_output(gm: fx.GraphModule, tracer: str, sig: inspect.Signature, output_node: str,
                   args: tuple, kwargs: Mapping) -> torch.Tensor:
    """Run the graph with an Interpreter and return the value of node ``output_node``."""

    class _Grab(fx.Interpreter):
        grabbed: Any = None

        def run_node(self, n):
            r = super().run_node(n)
            if n.name == output_node:
                self.grabbed = r
            return r

    interp = _Grab(gm)
    interp.run(*_graph_inputs(gm, tracer, sig, args, kwargs))
    return interp.grabbed


def trace_model(
    module: nn.Module,
    example_args: tuple,
    example_kwargs: Optional[Mapping[str, Any]] = None,
    *,
    leaf_modules: Sequence[type] = (),
    image_arg: Union[int, str, None] = None,
    output_index: Optional[int] = None,
    tracer: str = "auto",
) -> TraceResult:
    """Trace ``module`` into an annotated FX graph (symbolic trace, else ``torch.export``).

    Non-tensor arguments (``label=None``, flags, ints) are passed to the tracer as concrete
    arguments, so Python control flow on them is resolved.  Where symbolic tracing fails
    (tensor-dependent Python, unsupported builtins), ``torch.export`` (non-strict) is tried;
    the result says which tracer was used and why.  Shapes of every node come from
    ShapeProp on the example inputs, and the traced graph is checked against eager
    execution on them.

    Args:
        module: the denoiser (an ``nn.Module``; put it in ``eval()`` mode first).
        example_args: positional example inputs, e.g. ``(x [B,C,H,W], t [B])``.  Use B >= 2
            so that batch and channel dims are not confused with broadcast dims.
        example_kwargs: keyword example inputs, e.g. ``{"return_dict": False}``.
        leaf_modules: extra module classes to keep opaque (``call_module`` nodes); they
            need a rule in :data:`OP_TABLE`, or they are reported as unknown ops.
        image_arg: position or name of the image argument; default: the first tensor
            argument with at least 3 dims.
        output_index: which tensor leaf of the output is eps (default: the first with the
            image's shape, else the first image-dependent tensor).
        tracer: ``"auto"``, ``"fx"`` or ``"export"``.

    Returns:
        :class:`TraceResult`.

    Raises:
        TraceError: inputs that do not fit ``forward``, no image argument, or both tracers
            failing (the message carries both errors).
    """
    if not isinstance(module, nn.Module):
        raise TraceError(f"trace_model needs an nn.Module, got {type(module).__name__}; wrap your callable in a module")
    if not isinstance(example_args, tuple):
        raise TraceError(f"example_args must be a tuple of inputs, got {type(example_args).__name__}; use (x, t)")
    if tracer not in ("auto", "fx", "export"):
        raise TraceError(f"tracer must be 'auto', 'fx' or 'export', got {tracer!r}")
    kwargs = dict(example_kwargs or {})
    sig = inspect.signature(module.forward)
    names, values, concrete = _flat_inputs(sig, example_args, kwargs)

    # Which argument is the image.
    if image_arg is None:
        img_name = next((nm for nm, v in zip(names, values) if isinstance(v, torch.Tensor) and v.dim() >= 3), None)
        if img_name is None:
            raise TraceError("no tensor argument with >= 3 dims (B, C, *spatial) among the example inputs; pass image_arg=")
    elif isinstance(image_arg, int):
        if not 0 <= image_arg < len(names):
            raise TraceError(f"image_arg={image_arg} but forward has {len(names)} arguments")
        img_name = names[image_arg]
    else:
        if image_arg not in names:
            raise TraceError(f"image_arg={image_arg!r} is not an argument of forward{sig}")
        img_name = image_arg
    image = values[names.index(img_name)]
    if not isinstance(image, torch.Tensor) or image.dim() < 3 or image.dim() > 5:
        raise TraceError(f"the image argument {img_name!r} must be a tensor (B, C, *spatial) with 1-3 spatial dims")
    nd = image.dim() - 2

    gm = None
    used = ""
    reason = ""
    fx_error: Optional[str] = None
    if tracer in ("auto", "fx"):
        try:
            tr = _LeafTracer(tuple(leaf_modules))
            graph = tr.trace(module, concrete_args=concrete or None)
            gm = fx.GraphModule(tr.root, graph, type(module).__name__)
            rec = _Recorder(gm, _find_image_placeholder(gm, "torch.fx.symbolic_trace", names, img_name, example_args, kwargs, image))
            with torch.no_grad():
                rec.propagate(*values)
            used = "torch.fx.symbolic_trace"
            reason = "symbolic tracing succeeded" + (
                f" with concrete args {sorted(concrete)}" if concrete else "")
        except Exception as exc:  # noqa: BLE001 - any tracing failure falls back
            fx_error = _first_line(exc)
            gm = None
            if tracer == "fx":
                raise TraceError(f"symbolic tracing failed: {fx_error}; try tracer='export'") from exc
    if gm is None:
        try:
            ep = torch.export.export(module, tuple(example_args), kwargs or None, strict=False)
            gm = ep.module()
            rec = _Recorder(gm, _find_image_placeholder(gm, "torch.export", names, img_name, example_args, kwargs, image))
            with torch.no_grad():
                rec.propagate(*_graph_inputs(gm, "torch.export", sig, example_args, kwargs))
            used = "torch.export"
            reason = (f"symbolic tracing failed ({fx_error}); used torch.export" if fx_error
                      else "torch.export requested")
        except Exception as exc:  # noqa: BLE001
            raise TraceError(
                f"could not trace {type(module).__name__}: symbolic tracing: {fx_error or 'not tried'}; "
                f"torch.export: {_first_line(exc)}. Register the failing submodule as a leaf "
                "(leaf_modules=...) or simplify its forward"
            ) from exc

    image_ph = _find_image_placeholder(gm, used, names, img_name, example_args, kwargs, image)
    if image_ph is None:
        raise TraceError(f"the image argument {img_name!r} is not a graph input after tracing")

    # Canonical ops and data dependence, in topological order.
    unknown: list[tuple[str, str]] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.meta[META_OP] = OpInfo("image" if node is image_ph else "input", node.name)
            node.meta[META_IMAGE] = node is image_ph
            continue
        if node.op == "get_attr":
            node.meta[META_OP] = OpInfo("param", str(node.target), module_path=str(node.target).rsplit(".", 1)[0] if "." in str(node.target) else "")
            node.meta[META_IMAGE] = False
            continue
        if node.op == "output":
            node.meta[META_OP] = OpInfo("output", "output")
            node.meta[META_IMAGE] = False
            continue
        info = _canonicalise(node, gm)
        node.meta[META_OP] = info
        node.meta[META_IMAGE] = any(gm_node.meta.get(META_IMAGE, False) for gm_node in _operand_nodes(node, info))

    # The analysed output.
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = [x for x in pytree.tree_leaves(out_node.args[0]) if isinstance(x, fx.Node) and OpContext.is_tensor(x)]
    img_leaves = [x for x in leaves if x.meta.get(META_IMAGE)]
    if not img_leaves:
        raise TraceError("no output of the model depends on the image input; is image_arg right?")
    if output_index is not None:
        if not 0 <= output_index < len(leaves):
            raise TraceError(f"output_index={output_index} but the model returns {len(leaves)} tensors")
        eps_node = leaves[output_index]
    else:
        eps_node = next((x for x in img_leaves if x.meta[META_SHAPE] == tuple(image.shape)), img_leaves[0])

    # On-path marking: ancestors of the output through data operands, that depend on x.
    stack, seen = [eps_node], set()
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        info = n.meta.get(META_OP)
        for o in _operand_nodes(n, info) if info is not None else []:
            if o.meta.get(META_IMAGE):
                stack.append(o)
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        on = n.name in seen and n.meta.get(META_IMAGE, False)
        n.meta[META_ON_PATH] = bool(on)
        if on:
            k = n.meta[META_OP].kind
            counts[k] = counts.get(k, 0) + 1
            if k == "unknown":
                unknown.append((n.name, n.meta[META_OP].target))

    # Check the trace against eager execution (the graph's outputs were kept by ShapeProp).
    diff: Optional[float] = None
    try:
        with torch.no_grad():
            ref = module(*example_args, **kwargs)
        ref_leaves = [x for x in pytree.tree_leaves(ref) if isinstance(x, torch.Tensor)]
        got_leaves = [x for x in pytree.tree_leaves(rec.returned) if isinstance(x, torch.Tensor)]
        if ref_leaves and len(ref_leaves) == len(got_leaves) and all(
                r.shape == g.shape for r, g in zip(ref_leaves, got_leaves)):
            diff = float(max((r.double() - g.double()).abs().max().item() for r, g in zip(ref_leaves, got_leaves)))
    except Exception:  # noqa: BLE001 - verification is best effort; reported as None
        diff = None

    return TraceResult(
        graph_module=gm,
        tracer=used,
        tracer_reason=reason,
        image_node=image_ph.name,
        image_arg=img_name,
        output_node=eps_node.name,
        input_shape=tuple(image.shape),
        output_shape=tuple(eps_node.meta[META_SHAPE]),
        concrete_args=MappingProxyType({k: repr(v) for k, v in concrete.items()}),
        spatial_axes=_AXIS_NAMES[nd],
        unknown_ops=tuple(unknown),
        op_counts=MappingProxyType(dict(sorted(counts.items()))),
        verified_max_abs_diff=diff,
        training_mode=bool(module.training),
        example_args=tuple(example_args),
        example_kwargs=MappingProxyType(kwargs),
        forward_signature=sig,
    )


def _operand_nodes(node: fx.Node, info: OpInfo) -> list[fx.Node]:
    if info.kind == "unknown":
        return [a for a in node.all_input_nodes]
    names = set(info.operands)
    return [a for a in node.all_input_nodes if a.name in names]


def _canonicalise(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    path = _module_path(node)
    if node.op == "call_module":
        tname = target_name(type(gm.get_submodule(node.target)))
    elif node.op == "call_method":
        tname = f"Tensor.{node.target}"
    else:
        tname = target_name(node.target)
    if node.meta.get(META_SHAPE) is None:
        # No tensor comes out: shape arithmetic, asserts, guards.  No data flows on.
        return OpInfo(_META_KIND, tname, path)
    rule = OP_TABLE.lookup(node, gm)
    if rule is None:
        return OpInfo("unknown", tname, path, note="no canonical rule for this op")
    ctx = OpContext(node, gm)
    try:
        kind, params, operands = rule(ctx)
    except Exception as exc:  # noqa: BLE001 - an odd call pattern: reported, never dropped
        return OpInfo("unknown", tname, path, note=f"canonical rule failed on node {node.name}: {_first_line(exc)}")
    names = tuple(o.name for o in operands if isinstance(o, fx.Node))
    return OpInfo(kind, tname, path, params=MappingProxyType(dict(params)), operands=names)
