"""Receptive-field rules of the index-map, elementwise and layout op kinds."""

from __future__ import annotations

import copy
import math
from fractions import Fraction
from typing import Callable, Optional, Sequence


from .effects import TOKENS, Effect, Factor, Flow, GlobalMix, parse_tokens, token_factor
from .maps import AxisOp, Unsupported
from .layout import (RuleContext, broadcast, global_flows, id_flows, plain, reshape_layout, spatial)
from .table import rf_rule


def _axis_of(facs: Sequence[Factor], what: str) -> Optional[str]:
    sp = spatial(facs)
    if not sp:
        return None
    if any(n.startswith(TOKENS) for n, _ in facs):
        raise Unsupported(f"{what} along a token dim that holds extra tokens")
    if len(facs) != 1:
        raise Unsupported(f"{what} over a dim that merges axes {sp}")
    return sp[0]


def _strided_axis_op(kernel: int, stride: int, dilation: int, before: int, boundary: str, label: str) -> AxisOp:
    return AxisOp(1, stride, (tuple(-before + dilation * k for k in range(kernel)),), boundary, label=label)


_BOUNDARY = {"zeros": "zeros", "constant(-inf)": "zeros", "reflect": "reflect", "replicate": "replicate",
             "circular": "circular"}


def _spatial_op_effect(ctx: RuleContext, nd: int, axis_ops: Sequence[Callable[[int, int], AxisOp]],
                       channel_to: Optional[int] = None, contract_channels: bool = False,
                       what: str = "op") -> Effect:
    """Common shape of conv / pool / upsample / pixel-shuffle: the last ``nd`` dims are
    mapped by ``axis_ops[k](n_in, n_out)``; the channel dim is replaced (and contracted,
    for convs)."""
    i = 0
    info = ctx.ins[0]
    if info is None:
        raise Unsupported(f"{what}: the data operand does not depend on the image but a weight does")
    in_shape, out_shape = ctx.shapes[0], ctx.out_shape
    L = len(in_shape)
    layout = list(info.layout)
    flows: list[Flow] = []
    mixes: list[GlobalMix] = []
    for k in range(nd):
        d = L - nd + k
        facs = info.layout[d]
        n_in, n_out = in_shape[d], out_shape[d]
        op = axis_ops[k](n_in, n_out)
        if n_in == n_out and op.n_in == op.n_out == 1 and op.taps == ((0,),):
            # NB: an identity along this dim (a kernel-1 conv over flattened positions, as in
            # guided-diffusion's qkv conv1d): positions map to themselves, whatever the dim holds
            flows.extend(id_flows(i, facs))
            continue
        ax = _axis_of(facs, what)
        if ax is None:
            layout[d] = plain(n_out)
            continue
        flows.append(Flow(i, ax, op))
        layout[d] = plain(n_out, ax)
    c = L - nd - 1
    if c >= 0:
        if contract_channels and spatial(info.layout[c]):
            sp = spatial(info.layout[c])
            flows.extend(global_flows(i, info.layout[c]))
            mixes.append(GlobalMix(tuple(sp), f"{what} weights contract a dim carrying image axes {sp}", False))
            layout[c] = plain(out_shape[c])
        elif channel_to is not None or contract_channels:
            if spatial(info.layout[c]):
                raise Unsupported(f"{what} regroups a channel dim carrying image axes")
            layout[c] = plain(out_shape[c])
        else:
            flows.extend(id_flows(i, info.layout[c]))
    for d in range(max(c, 0)):
        flows.extend(id_flows(i, info.layout[d]))
    return Effect(tuple(layout), tuple(flows), tuple(mixes))


@rf_rule("conv")
def _rf_conv(ctx: RuleContext) -> Effect:
    p = ctx.params
    nd = p["nd"]
    if any(info is not None for info in ctx.ins[1:]):
        raise Unsupported("conv weights computed from the image (dynamic convolution)")
    mode = _BOUNDARY[p["padding_mode"]]

    def make(k: int) -> Callable[[int, int], AxisOp]:
        K, s, d = p["kernel"][k], p["stride"][k], p["dilation"][k]
        before, after = p["padding"][k]
        label = f"conv k{K} s{s} d{d} pad({before},{after}) {p['padding_mode']}"
        return lambda n_in, n_out: _strided_axis_op(K, s, d, before, mode, label)

    return _spatial_op_effect(ctx, nd, [make(k) for k in range(nd)], contract_channels=True, what="conv")


@rf_rule("conv_transpose")
def _rf_conv_transpose(ctx: RuleContext) -> Effect:
    p = ctx.params
    nd = p["nd"]
    if any(info is not None for info in ctx.ins[1:]):
        raise Unsupported("transposed-conv weights computed from the image")

    def make(k: int) -> Callable[[int, int], AxisOp]:
        K, s, d = p["kernel"][k], p["stride"][k], p["dilation"][k]
        pb = p["padding"][k][0]
        taps = []
        for o in range(s):
            taps.append(tuple((o + pb - d * kk) // s for kk in range(K) if (o + pb - d * kk) % s == 0))
        label = f"conv_transpose k{K} s{s} d{d} pad{pb}"
        # NB: an output that reads a missing input (past either end) lacks terms: a
        # zero-padding-like boundary effect.
        return lambda n_in, n_out: AxisOp(s, 1, tuple(taps), "zeros", label=label)

    return _spatial_op_effect(ctx, nd, [make(k) for k in range(nd)], contract_channels=True, what="conv_transpose")


@rf_rule("pool")
def _rf_pool(ctx: RuleContext) -> Effect:
    p = ctx.params
    nd = p["nd"]
    mode = _BOUNDARY[p["padding_mode"]]

    def make(k: int) -> Callable[[int, int], AxisOp]:
        K, s, d = p["kernel"][k], p["stride"][k], p["dilation"][k]
        before = p["padding"][k][0]
        label = f"{p['pool']}pool k{K} s{s} pad{before}"
        return lambda n_in, n_out: _strided_axis_op(K, s, d, before, mode, label)

    return _spatial_op_effect(ctx, nd, [make(k) for k in range(nd)], what="pool")


@rf_rule("adaptive_pool")
def _rf_adaptive_pool(ctx: RuleContext) -> Effect:
    nd = ctx.params["nd"]
    info = ctx.ins[0]
    in_shape, out_shape = ctx.shapes[0], ctx.out_shape
    L = len(in_shape)
    layout = list(info.layout)
    flows: list[Flow] = []
    pooled: list[str] = []
    for d in range(L - nd):
        flows.extend(id_flows(0, info.layout[d]))
    for k in range(nd):
        d = L - nd + k
        facs = info.layout[d]
        ax = _axis_of(facs, "adaptive pool")
        n_in, n_out = in_shape[d], out_shape[d]
        if ax is None:
            layout[d] = plain(n_out)
            continue
        if n_out == 1:
            flows.append(Flow(0, ax, "global"))
            pooled.append(ax)
            layout[d] = ()
        elif n_in == n_out:
            flows.append(Flow(0, ax, "id"))
        elif n_in % n_out == 0:
            r = n_in // n_out
            flows.append(Flow(0, ax, AxisOp(1, r, (tuple(range(r)),), "none", label=f"adaptive pool {n_in}->{n_out}")))
            layout[d] = plain(n_out, ax)
        else:
            raise Unsupported(f"adaptive pooling {n_in}->{n_out} along {ax} has uneven bins")
    mixes = (GlobalMix(tuple(pooled), f"global {ctx.params['pool']} pooling over {','.join(pooled)}", True),) if pooled else ()
    return Effect(tuple(layout), tuple(flows), mixes)


def _upsample_op(mode: str, align_corners: bool, n_in: int, n_out: int) -> AxisOp:
    r = Fraction(n_out, n_in)
    p, q = r.numerator, r.denominator
    # NB: the source index uses the size ratio n_in / n_out; PyTorch uses 1 / scale_factor
    # when a scale factor is given, which differs only for non-integer factors.
    if mode in ("nearest", "nearest-exact"):
        off = Fraction(1, 2) if mode == "nearest-exact" else Fraction(0)
        taps = tuple((math.floor((o + off) * q / p),) for o in range(p))
        return AxisOp(p, q, taps, "replicate" if mode == "nearest-exact" else "none", label=f"{mode} x{r}")
    if mode in ("linear", "bilinear", "trilinear", "bicubic"):
        cubic = mode == "bicubic"
        taps = []
        for o in range(p):
            src = (o + Fraction(1, 2)) * q / p - Fraction(1, 2)
            i0 = math.floor(src)
            if cubic:
                taps.append(tuple(range(i0 - 1, i0 + 3)))
            else:
                taps.append((i0,) if src == i0 else (i0, i0 + 1))
        finite = None
        if align_corners:
            # NB: align_corners=True resamples on a grid stretched to the corners: not
            # translation-periodic.  The infinite-image map uses the align_corners=False
            # taps (an approximation); the finite boundary analysis uses the exact taps.
            rows = []
            for o in range(n_out):
                src = Fraction(o * (n_in - 1), n_out - 1) if n_out > 1 else Fraction(0)
                i0 = math.floor(src)
                rows.append(tuple(range(i0 - 1, i0 + 3)) if cubic else ((i0,) if src == i0 else (i0, min(i0 + 1, n_in - 1))))
            finite = tuple(rows)
        # Edge samples clamp to the first / last input: a replicate-like boundary.
        return AxisOp(p, q, tuple(taps), "replicate", finite_taps=finite,
                      label=f"{mode} x{r}" + (" align_corners" if align_corners else ""))
    raise Unsupported(f"upsampling mode {mode!r} is not modelled")


@rf_rule("upsample")
def _rf_upsample(ctx: RuleContext) -> Effect:
    p = ctx.params
    nd = p["nd"]
    ops = [lambda n_in, n_out: _upsample_op(p["mode"], p["align_corners"], n_in, n_out)] * nd
    eff = _spatial_op_effect(ctx, nd, ops, what="upsample")
    if p["align_corners"] and p["mode"] != "nearest":
        axes = tuple(a for a in ctx.ins[0].axes())
        eff = Effect(eff.layout, eff.flows, eff.mixes,
                     ((ctx.node.name, axes, "align_corners=True resampling is not translation-periodic"),))
    return eff


@rf_rule("pixel_shuffle")
def _rf_pixel_shuffle(ctx: RuleContext) -> Effect:
    r = ctx.params["factor"]
    op = AxisOp(r, 1, tuple((0,) for _ in range(r)), "none", label=f"pixel_shuffle x{r}")
    return _spatial_op_effect(ctx, 2, [lambda a, b: op] * 2, channel_to=1, what="pixel_shuffle")


@rf_rule("pixel_unshuffle")
def _rf_pixel_unshuffle(ctx: RuleContext) -> Effect:
    r = ctx.params["factor"]
    op = AxisOp(1, r, (tuple(range(r)),), "none", label=f"pixel_unshuffle /{r}")
    return _spatial_op_effect(ctx, 2, [lambda a, b: op] * 2, channel_to=1, what="pixel_unshuffle")


@rf_rule("pad")
def _rf_pad(ctx: RuleContext) -> Effect:
    info = ctx.ins[0]
    per_dim = ctx.params["padding"]  # for the trailing dims, in order
    mode = ctx.params["padding_mode"]
    L = len(ctx.shapes[0])
    first = L - len(per_dim)
    layout = list(info.layout)
    flows: list[Flow] = []
    for d in range(L):
        facs = info.layout[d]
        if d < first or per_dim[d - first] == [0, 0]:
            flows.extend(id_flows(0, facs))
            continue
        before, after = per_dim[d - first]
        ax = _axis_of(facs, "pad")
        if ax is None:  # padding a non-spatial dim: just a bigger dim
            layout[d] = plain(ctx.out_shape[d])
            continue
        op = AxisOp(1, 1, ((-before,),), _BOUNDARY.get(mode, mode), label=f"pad({before},{after}) {mode}")
        flows.append(Flow(0, ax, op))
        layout[d] = plain(ctx.out_shape[d], ax)
    return Effect(tuple(layout), tuple(flows))


@rf_rule("roll")
def _rf_roll(ctx: RuleContext) -> Effect:
    info = ctx.ins[0]
    shifts = dict(zip(ctx.params["dims"], ctx.params["shifts"]))
    flows: list[Flow] = []
    for d, facs in enumerate(info.layout):
        if d in shifts and spatial(facs):
            ax = _axis_of(facs, "roll")
            flows.append(Flow(0, ax, AxisOp(1, 1, ((-shifts[d],),), "circular", label=f"roll {shifts[d]}")))
        else:
            flows.extend(id_flows(0, facs))
    return Effect(info.layout, tuple(flows))


@rf_rule("pointwise")
def _rf_pointwise(ctx: RuleContext) -> Effect:
    layout, flows, position = broadcast(ctx)
    return Effect(layout, tuple(flows), (), tuple(position))


@rf_rule("batchnorm")
def _rf_batchnorm(ctx: RuleContext) -> Effect:
    info = ctx.ins[0]
    flows = [f for facs in info.layout for f in id_flows(0, facs)]
    mixes: tuple = ()
    if ctx.params.get("batch_statistics"):
        axes = tuple(info.axes())
        flows += [Flow(0, a, "global") for a in axes]
        mixes = (GlobalMix(axes, "batch-norm batch statistics (training mode) over B and space", True),)
    return Effect(info.layout, tuple(flows), mixes)


def _mix_over(ctx: RuleContext, dims: Sequence[int], reason: str) -> Effect:
    """Statistics over ``dims`` (a norm, a softmax): every position keeps its own value and
    also sees all positions along the image axes those dims carry."""
    info = ctx.ins[0]
    flows = [f for facs in info.layout for f in id_flows(0, facs)]
    axes = [a for d in dims if d < len(info.layout) for a in spatial(info.layout[d])]
    mixes: tuple = ()
    if axes:
        flows += [Flow(0, a, "global") for a in axes]
        mixes = (GlobalMix(tuple(axes), f"{reason} over {','.join(axes)}", True),)
    return Effect(info.layout, tuple(flows), mixes)


@rf_rule("norm")
def _rf_norm(ctx: RuleContext) -> Effect:
    return _mix_over(ctx, ctx.params["normalized_dims"], f"{ctx.params.get('norm', 'norm')} statistics")


@rf_rule("softmax")
def _rf_softmax(ctx: RuleContext) -> Effect:
    return _mix_over(ctx, [ctx.params["dim"]], "softmax")


@rf_rule("reduce")
def _rf_reduce(ctx: RuleContext) -> Effect:
    info = ctx.ins[0]
    dims = set(ctx.params["dims"])
    keep = len(ctx.out_shape) == len(ctx.shapes[0])
    layout: list = []
    flows: list[Flow] = []
    axes: list[str] = []
    for d, facs in enumerate(info.layout):
        if d in dims:
            axes.extend(spatial(facs))
            flows.extend(global_flows(0, facs))
            if keep:
                layout.append(())
        else:
            layout.append(facs)
            flows.extend(id_flows(0, facs))
    mixes = (GlobalMix(tuple(axes), f"reduction over {','.join(axes)}", True),) if axes else ()
    return Effect(tuple(layout), tuple(flows), mixes)


@rf_rule("reshape")
def _rf_reshape(ctx: RuleContext) -> Effect:
    info = ctx.ins[0]
    layout, ops = reshape_layout(info.layout, ctx.out_shape)
    flows = [Flow(0, a, ops.get(a, "id")) for a in info.axes()]
    return Effect(layout, tuple(flows))


@rf_rule("permute")
def _rf_permute(ctx: RuleContext) -> Effect:
    info = ctx.ins[0]
    perm = ctx.params["perm"]
    layout = tuple(info.layout[p] for p in perm)
    return Effect(layout, tuple(Flow(0, a, "id") for a in info.axes()))


@rf_rule("expand", "repeat")
def _rf_expand(ctx: RuleContext) -> Effect:
    info = ctx.ins[0]
    in_shape, out_shape = ctx.shapes[0], ctx.out_shape
    off = len(out_shape) - len(in_shape)
    layout = []
    for j, s in enumerate(out_shape):
        d = j - off
        if d < 0 or (in_shape[d] == 1 and s > 1):
            layout.append(plain(s, "*"))
        elif in_shape[d] == s:
            layout.append(info.layout[d])
        else:  # repeat along an existing dim
            if spatial(info.layout[d]):
                raise Unsupported(f"repeat tiles image axes {spatial(info.layout[d])}")
            layout.append(plain(s))
    return Effect(tuple(layout), tuple(Flow(0, a, "id") for a in info.axes()))


@rf_rule("index")
def _rf_index(ctx: RuleContext) -> Effect:
    info = ctx.ins[0]
    layout: list = []
    flows: list[Flow] = []
    mixes: list[GlobalMix] = []
    for spec in ctx.params["specs"]:
        if spec[0] == "new":
            layout.append(())
            continue
        d = spec[1]
        facs = info.layout[d]
        sp = spatial(facs)
        n = 0 if spec[0] == "select" else len(range(spec[2], spec[3], spec[4]))
        if spec[0] == "select" and _token_range(facs, spec[2], 1) == ():
            continue  # an extra token (a class token): no image position is picked
        if sp and (spec[0] == "select" or n == 1):
            # Picking one position along an image axis: every output reads that fixed
            # position, wherever it is.
            flows.extend(global_flows(0, facs))
            mixes.append(GlobalMix(tuple(sp), f"indexing picks a fixed position along {','.join(sp)}", False))
            if spec[0] == "keep":
                layout.append(())
            continue
        if spec[0] == "select":
            continue
        _, _, start, stop, step = spec
        tok = _token_range(facs, start, n) if step == 1 and sp and n != ctx.shapes[0][d] else None
        if tok is not None:  # x[:, 1:] drops the extra tokens again: the image factors, or none
            layout.append(tok if tok else plain(n))
            flows.extend(id_flows(0, tok))
            continue
        if not sp or (start == 0 and step == 1 and n == ctx.shapes[0][d]):
            layout.append(facs if n == ctx.shapes[0][d] else plain(n))
            flows.extend(id_flows(0, facs))
            continue
        ax = _axis_of(facs, "slice")
        flows.append(Flow(0, ax, AxisOp(1, step, ((start,),), "none", label=f"slice {start}:{stop}:{step}")))
        layout.append(plain(n, ax))
    return Effect(tuple(layout), tuple(flows), tuple(mixes))


def _token_range(facs: Sequence[Factor], start: int, n: int) -> Optional[tuple[Factor, ...]]:
    """For a token dim: the image factors when positions ``start .. start + n`` are exactly
    the image tokens, ``()`` when they are only extra tokens, ``None`` otherwise."""
    if len(facs) != 1 or not facs[0][0].startswith(TOKENS):
        return None
    before, after, inner = parse_tokens(facs[0][0])
    n_img = facs[0][1] - before - after
    if start == before and n == n_img:
        return inner
    if start + n <= before or start >= before + n_img:
        return ()
    return None


@rf_rule("split")
def _rf_split(ctx: RuleContext) -> tuple:
    info = ctx.ins[0]
    d = ctx.params["dim"]
    sizes = [None if shp is None else (1 if ctx.params.get("unbind") else shp[d]) for shp in ctx.out_shape]
    starts = [sum(s or 0 for s in sizes[:k]) for k in range(len(sizes))]
    tokens = [_token_range(info.layout[d], a, s) if s is not None else None for a, s in zip(starts, sizes)]
    if spatial(info.layout[d]) and (ctx.params.get("unbind") or any(t is None for t, s in zip(tokens, sizes) if s)):
        raise Unsupported(f"split / chunk along image axes {spatial(info.layout[d])}")
    effs = []
    for shp, tok in zip(ctx.out_shape, tokens):
        if shp is None:
            effs.append(None)
            continue
        if ctx.params.get("unbind"):
            layout = info.layout[:d] + info.layout[d + 1:]
        else:
            layout = info.layout[:d] + (tok if tok else plain(shp[d]),) + info.layout[d + 1:]
        effs.append(Effect(layout, tuple(Flow(0, a, "id") for a in info.axes())))
    return tuple(effs)


_rf_split.multi_output = True  # type: ignore[attr-defined] - returns one effect per output


def _with_tokens(facs: tuple[Factor, ...], before: int, after: int) -> tuple[Factor, ...]:
    """The token factor of image factors ``facs`` with extra tokens around them."""
    if before == after == 0:
        return facs
    if len(facs) == 1 and facs[0][0].startswith(TOKENS):
        b0, a0, inner = parse_tokens(facs[0][0])
        return (token_factor(before + b0, after + a0, inner),)
    return (token_factor(before, after, tuple(facs)),)


@rf_rule("cat", "stack")
def _rf_cat(ctx: RuleContext) -> Effect:
    d = ctx.params["dim"]
    if ctx.op.kind == "cat":
        holders = [i for i, info in enumerate(ctx.ins) if info is not None and spatial(info.layout[d])]
        if len(holders) > 1 or (holders and len(ctx.ins[holders[0]].layout[d]) != 1
                                and any(n.startswith(TOKENS) for n, _ in ctx.ins[holders[0]].layout[d])):
            raise Unsupported(f"concatenation along image axes {spatial(ctx.ins[holders[0]].layout[d])}")
        layout, flows, position = broadcast(ctx, skip_dim=d, why="concatenated")
        layout = list(layout)
        layout[d] = plain(ctx.out_shape[d])
        if holders:  # extra tokens before / after the image tokens (a time or class token)
            h = holders[0]
            layout[d] = _with_tokens(ctx.ins[h].layout[d], sum(ctx.shapes[i][d] for i in range(h)),
                                     sum(ctx.shapes[i][d] for i in range(h + 1, len(ctx.ins))))
            flows = list(flows) + id_flows(h, ctx.ins[h].layout[d])
        return Effect(tuple(layout), tuple(flows), (), tuple(position))
    # stack: every operand gets a new dim d
    sub = copy.copy(ctx)
    sub.out_shape = tuple(sz for j, sz in enumerate(ctx.out_shape) if j != d)
    layout, flows, position = broadcast(sub, why="stacked")
    layout = list(layout)
    layout.insert(d, plain(ctx.out_shape[d]))
    return Effect(tuple(layout), tuple(flows), (), tuple(position))
