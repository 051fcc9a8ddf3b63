"""Canonicalisers of layout ops (cat, reshape, permute, index, split ...) and of the data-free
sources (factories, shape queries)."""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..meta import META_SELECT, META_SHAPE, META_VALUE
from .base import META_KIND, OpContext, aten, register_op, target_name


# -- concatenation -------------------------------------------------------------------------
@register_op(torch.cat, torch.concat, torch.concatenate, aten.cat, aten.concat, torch.stack, aten.stack)
def _c_join(ctx: OpContext):
    args = list(ctx.node.args)
    tensors = args[0] if args else ctx.node.kwargs.get("tensors")
    dim = ctx.value(args[1]) if len(args) > 1 else ctx.value(ctx.node.kwargs.get("dim", 0))
    nd = len(ctx.out_shape)
    target = ctx.node.target
    target = target.overloadpacket if isinstance(target, torch._ops.OpOverload) else target
    kind = "stack" if target in (torch.stack, aten.stack) else "cat"
    return kind, {"dim": int(dim) % nd}, [t for t in tensors if ctx.is_tensor(t)]


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
        return META_KIND, {}, []
    if not ctx.is_tensor(src):
        return META_KIND, {}, []
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


_META_FNS = [torch._assert, torch.is_tensor, torch.numel, len, isinstance,
             aten.sym_size, aten.sym_numel, aten.sym_stride, aten._assert_tensor_metadata,
             aten._assert_async, aten._assert_scalar, aten.sym_constrain_range, aten.sym_constrain_range_for_size,
             aten._functional_assert_async]
_META_METHODS = ["size", "dim", "numel", "stride", "type", "item", "tolist", "get_device", "is_contiguous",
                 "element_size", "nelement", "ndimension"]


@register_op(*_META_FNS, *[f"Tensor.{m}" for m in _META_METHODS if m != "type"])
def _c_meta(ctx: OpContext):
    return META_KIND, {}, []


@register_op(getattr)
def _c_getattr(ctx: OpContext):
    """An attribute that is a tensor: an output of a multi-output op (``.values``), the
    transpose (``.T``, ``.mT``) or the data itself (``.data``); other attributes carry no data."""
    src, attr = ctx.node.args[0], ctx.value(ctx.node.args[1])
    if ctx.node.meta.get(META_SELECT) is not None:
        return "select_output", {"index": int(ctx.node.meta[META_SELECT])}, [src]
    if not ctx.is_tensor(ctx.node) or not ctx.is_tensor(src):
        return META_KIND, {}, []
    nd = len(ctx.shape(src))
    if attr in ("T", "mT", "mH", "H"):
        perm = list(range(nd))[::-1] if attr in ("T", "H") else list(range(nd - 2)) + [nd - 1, nd - 2]
        return "permute", {"perm": perm}, [src]
    if attr in ("data", "real"):
        return "pointwise", {}, [src]
    raise ValueError(f"attribute {attr!r} of a tensor is not modelled")


NO_DATA_FNS = set(_FACTORY) | set(_META_FNS)
NO_DATA_METHODS = {f"Tensor.{m}" for m in _FACTORY_METHODS + _META_METHODS}
