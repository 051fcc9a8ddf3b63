"""Receptive-field rules of the contractions: Linear, matmul, bmm, einsum, attention."""

from __future__ import annotations

import copy
from typing import Optional


from .effects import Effect, Factor, Flow, GlobalMix, SpatialInfo
from .maps import Unsupported
from .layout import (RuleContext, global_flows, id_flows, plain, position_check,
                     spatial)
from .table import rf_rule


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
            if chosen is None or (spatial(facs) and not spatial(chosen)):
                chosen = facs
        if chosen is None:
            chosen = plain(s)
        sp = spatial(chosen)
        if sp and used_axes.intersection(sp):
            # The same image axis on two output dims (attention scores q k^T): keep the
            # first, the second indexes *other* positions -> mixing.
            for i, d in srcs:
                if spatial(info_of(i).layout[d]):
                    flows.extend(global_flows(i, info_of(i).layout[d]))
            mixes.append(GlobalMix(tuple(sp), f"{what}: pairwise over positions ({','.join(sp)})", True))
            chosen = plain(s)
        else:
            for i, d in srcs:
                facs = info_of(i).layout[d]
                if not spatial(facs):
                    continue
                if facs == chosen:
                    flows.extend(id_flows(i, facs))
                else:
                    flows.extend(global_flows(i, facs))
                    mixes.append(GlobalMix(tuple(spatial(facs)), f"{what}: operands with different layouts", True))
            used_axes.update(sp)
        layout.append(chosen)

    contracted = [L for L in dict.fromkeys(l for lets in letters for l in lets) if L not in out_letters]
    for L in contracted:
        holders = [(i, d) for i, lets in enumerate(letters) for d, l in enumerate(lets) if l == L and size_of(i, d) > 1]
        sp_axes: list[str] = []
        for i, d in holders:
            info = info_of(i)
            if info is not None and spatial(info.layout[d]):
                flows.extend(global_flows(i, info.layout[d]))
                sp_axes.extend(spatial(info.layout[d]))
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

            p = position_check(ctx, i, tuple(layout), dim_map, f"enters {what}")
            if p:
                position.append(p)
    # Addends (bias of addmm): elementwise against the output.
    for i in range(n_specs, n_ops):
        off = len(ctx.out_shape) - len(ctx.shapes[i])
        info = ctx.ins[i]
        if info is None:
            p = position_check(ctx, i, tuple(layout), lambda j, off=off: j - off, "added")
            if p:
                position.append(p)
        else:
            for d, facs in enumerate(info.layout):
                if spatial(facs):
                    flows.extend(id_flows(i, facs) if facs == layout[d + off] else global_flows(i, facs))
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
                rest.append(Effect(tuple(plain(s) for s in shp),
                                   tuple(Flow(i, a, "global") for i, info in enumerate(ctx.ins) if info is not None for a in info.axes()),
                                   (GlobalMix(tuple(dict.fromkeys(axes)), "attention weights", True),)))
        return (eff, *rest)
    return _einsum_effect(ctx, attention=True)


_rf_attention.multi_output = True  # type: ignore[attr-defined] - returns one effect per output


@rf_rule("select_output")
def _rf_select_output(ctx: RuleContext):  # handled by the engine; listed so it is "known"
    raise AssertionError("select_output is resolved by the engine")
