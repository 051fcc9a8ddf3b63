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


class _Einsum:
    """One contraction read as an einsum: its letters per operand dim, sizes, and operand infos.

    Operands beyond the equation's specs are addends (the bias of addmm / linear); specs
    beyond the operands are implicit parameters (nn.Linear's weight): image-independent.
    """

    def __init__(self, ctx: RuleContext, attention: bool):
        self.ctx = ctx
        eq = ctx.params["equation"]
        self.n_specs = len(eq.split("->")[0].split(","))
        self.n_ops = len(ctx.ins)
        self.spec_shapes = [ctx.shapes[i] if i < self.n_ops else None for i in range(self.n_specs)]
        self.letters, self.out_letters = _parse_equation(eq, self.spec_shapes)
        self.sizes: dict[str, int] = {}
        for i, lets in enumerate(self.letters):
            for L, s in zip(lets, self.spec_shapes[i] or ()):
                self.sizes[L] = max(self.sizes.get(L, 1), int(s))
        for L, s in zip(self.out_letters, ctx.out_shape):
            self.sizes[L] = max(self.sizes.get(L, 1), int(s))
        self.what = "attention" if attention else ctx.params.get("op", "contraction")
        self.flows: list[Flow] = []
        self.mixes: list[GlobalMix] = []

    def info_of(self, i: int) -> Optional[SpatialInfo]:
        return self.ctx.ins[i] if i < self.n_ops else None

    def size_of(self, i: int, d: int) -> int:
        shape = self.spec_shapes[i]
        return int(shape[d]) if shape is not None else self.sizes.get(self.letters[i][d], 1)

    def effect(self) -> Effect:
        layout = self.output_layout()
        self.contracted()
        position = self.positions(layout)
        self.addends(layout, position)
        return Effect(tuple(layout), tuple(self.flows), tuple(self.mixes), tuple(position))

    def output_layout(self) -> list[tuple[Factor, ...]]:
        """Each output dim inherits the layout of an operand dim with its letter.

        NB: the output keeps the local map of the operand whose dim it inherits (for
        attention, the query's position); the positions that are summed over (keys, values)
        are global flows.  So attention's local part is the query path.
        """
        layout: list[tuple[Factor, ...]] = []
        used_axes: set[str] = set()
        for j, L in enumerate(self.out_letters):
            srcs = [(i, d) for i, lets in enumerate(self.letters) for d, l in enumerate(lets)
                    if l == L and self.info_of(i) is not None and self.size_of(i, d) > 1
                    and not all(n == "*" for n, _ in self.info_of(i).layout[d])]
            chosen: Optional[tuple[Factor, ...]] = None
            for i, d in srcs:
                facs = self.info_of(i).layout[d]
                if chosen is None or (spatial(facs) and not spatial(chosen)):
                    chosen = facs
            chosen = chosen if chosen is not None else plain(int(self.ctx.out_shape[j]))
            sp = spatial(chosen)
            if sp and used_axes.intersection(sp):
                # The same image axis on two output dims (attention scores q k^T): keep the
                # first, the second indexes *other* positions -> mixing.
                for i, d in srcs:
                    if spatial(self.info_of(i).layout[d]):
                        self.flows.extend(global_flows(i, self.info_of(i).layout[d]))
                self.mixes.append(GlobalMix(tuple(sp), f"{self.what}: pairwise over positions ({','.join(sp)})", True))
                chosen = plain(int(self.ctx.out_shape[j]))
            else:
                for i, d in srcs:
                    facs = self.info_of(i).layout[d]
                    if not spatial(facs):
                        continue
                    if facs == chosen:
                        self.flows.extend(id_flows(i, facs))
                    else:
                        self.flows.extend(global_flows(i, facs))
                        self.mixes.append(GlobalMix(tuple(spatial(facs)), f"{self.what}: operands with different layouts",
                                                    True))
                used_axes.update(sp)
            layout.append(chosen)
        return layout

    def contracted(self) -> None:
        """Letters summed over: a sum over positions is global (equivariant when every
        operand holding it is image data; fixed weights over flattened space are not)."""
        for L in dict.fromkeys(l for lets in self.letters for l in lets):
            if L in self.out_letters:
                continue
            holders = [(i, d) for i, lets in enumerate(self.letters) for d, l in enumerate(lets)
                       if l == L and self.size_of(i, d) > 1]
            sp_axes: list[str] = []
            for i, d in holders:
                info = self.info_of(i)
                if info is not None and spatial(info.layout[d]):
                    self.flows.extend(global_flows(i, info.layout[d]))
                    sp_axes.extend(spatial(info.layout[d]))
            if sp_axes:
                axes = tuple(dict.fromkeys(sp_axes))
                equivariant = all(self.info_of(i) is not None for i, _ in holders)
                why = (f"{self.what} over positions ({','.join(axes)})" if equivariant else
                       f"{self.what} with fixed weights over flattened space ({','.join(axes)}): position-dependent")
                self.mixes.append(GlobalMix(axes, why, equivariant))

    def positions(self, layout: list) -> list:
        """Image-independent operands that vary along an output dim carrying image axes."""
        position = []
        for i in range(min(self.n_specs, self.n_ops)):
            if self.info_of(i) is not None:
                continue
            lets = self.letters[i]

            def dim_map(j: int, lets=lets) -> Optional[int]:
                L = self.out_letters[j]
                return lets.index(L) if L in lets else None

            p = position_check(self.ctx, i, tuple(layout), dim_map, f"enters {self.what}")
            if p:
                position.append(p)
        return position

    def addends(self, layout: list, position: list) -> None:
        """Addends (the bias of addmm): elementwise against the output."""
        ctx = self.ctx
        for i in range(self.n_specs, self.n_ops):
            off = len(ctx.out_shape) - len(ctx.shapes[i])
            info = ctx.ins[i]
            if info is None:
                p = position_check(ctx, i, tuple(layout), lambda j, off=off: j - off, "added")
                if p:
                    position.append(p)
                continue
            for d, facs in enumerate(info.layout):
                if spatial(facs):
                    self.flows.extend(id_flows(i, facs) if facs == layout[d + off] else global_flows(i, facs))


def _einsum_effect(ctx: RuleContext, attention: bool) -> Effect:
    return _Einsum(ctx, attention).effect()


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
