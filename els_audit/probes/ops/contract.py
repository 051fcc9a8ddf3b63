"""Canonicalisers of contractions: matmul, bmm, einsum, Linear, attention, embedding."""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import OpContext, aten, register_op


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
