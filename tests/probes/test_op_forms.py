"""The op forms of common diffusion codebases, each against its plain-module twin and the
gradient support (brute force): multi-output reductions, space-to-depth / depth-to-space
written as reshape + permute or einops, padding after a reshape merge, unpatchify."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from els_audit.probes import equivariance_structure, probe_receptive_field, receptive_field, trace_model


def _probe(net, size=16, channels=1, tracer="auto"):
    g = torch.Generator().manual_seed(0)
    tr = trace_model(net.eval(), (torch.randn(2, channels, size, size, generator=g), torch.rand(2, generator=g)),
                     tracer=tracer)
    rf = receptive_field(tr)
    return tr, rf, equivariance_structure(tr, rf)


def _exact_at(tr, rf, pixels):
    """The theoretical field is the gradient support, box for box."""
    for p in pixels:
        pr = probe_receptive_field(tr, rf, pixel=p, n_inputs=2)
        assert pr.inside and pr.fill == 1.0, (p, pr)


class _LN(nn.Module):
    """A LayerNorm over channels written with a multi-output statistic."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c = nn.Conv2d(1, 8, 3, padding=1, padding_mode="circular")
        self.o = nn.Conv2d(8, 1, 1)

    def forward(self, x, t):
        h = self.c(x)
        if self.how == "var_mean":
            v, m = torch.var_mean(h, dim=1, keepdim=True)
            h = (h - m) * torch.rsqrt(v + 1e-5)
        elif self.how == "std_mean":
            s, m = torch.std_mean(h, dim=1, keepdim=True)
            h = (h - m) / (s + 1e-5)
        elif self.how == "max":
            h = h - torch.max(h, dim=1, keepdim=True)[0]
        elif self.how == "min_method":
            h = h - h.min(1, keepdim=True).values
        elif self.how == "normalize":  # lucidrains' RMSNorm over channels
            h = F.normalize(h, dim=1) * 8 ** 0.5
        elif self.how == "aminmax":
            lo, hi = torch.aminmax(h, dim=1, keepdim=True)
            h = (h - lo) / (hi - lo + 1e-5)
        return self.o(h)


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("how", ["var_mean", "std_mean", "max", "min_method", "aminmax", "normalize"])
def test_multi_output_statistics_over_channels_stay_local(how, tracer):
    tr, rf, st = _probe(_LN(how), tracer=tracer)
    assert st.verdict == ("equivariant",), st.verdict_line
    assert not st.partial and [b.kind for b in st.breakers if b.breaks_equivariance] == []
    assert rf.size("H") == 3 and not rf.is_global


def test_multi_output_statistic_over_space_is_a_global_op_not_a_position_embedding():
    class SpaceNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 4, 3, padding=1, padding_mode="circular")

        def forward(self, x, t):
            h = self.c(x)
            v, m = torch.var_mean(h, dim=(2, 3), keepdim=True)
            return (h - m) * torch.rsqrt(v + 1e-5)

    _, rf, st = _probe(SpaceNorm())
    kinds = {b.kind for b in st.breakers}
    assert "global-op" in kinds and not kinds & {"position-embedding", "position-dependent", "unsupported"}
    assert rf.is_global and st.verdict == ("equivariant", "non-local")  # permutation-equivariant statistics


class _S2D(nn.Module):
    """Space-to-depth, a conv at half resolution, depth-to-space, a conv at full resolution."""

    def __init__(self, form, pad_after=False):
        super().__init__()
        self.form, self.pad_after = form, pad_after
        self.c = nn.Conv2d(4, 8, 3, padding=1, padding_mode="circular")
        self.o = nn.Conv2d(2, 1, 3, padding=0 if pad_after else 1, padding_mode="circular")
        self.pu, self.ps = nn.PixelUnshuffle(2), nn.PixelShuffle(2)

    def forward(self, x, t):
        b, c, h, w = x.shape
        if self.form == "module":
            y = self.ps(self.c(self.pu(x)))
        elif self.form == "reshape":
            y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
            y = self.c(y)
            y = y.reshape(b, 2, 2, 2, h // 2, w // 2).permute(0, 1, 4, 2, 5, 3).reshape(b, 2, h, w)
        else:
            import einops

            y = einops.rearrange(x, "b c (h p1) (w p2) -> b (c p1 p2) h w", p1=2, p2=2)
            y = self.c(y)
            y = einops.rearrange(y, "b (c p1 p2) h w -> b c (h p1) (w p2)", p1=2, p2=2)
        if self.pad_after:
            y = F.pad(y, (1, 1, 1, 1), mode="circular")
        return self.o(y)


@pytest.mark.parametrize("pad_after", [False, True])
@pytest.mark.parametrize("form", ["reshape", "einops"])
def test_space_to_depth_forms_match_pixel_unshuffle(form, pad_after):
    if form == "einops":
        pytest.importorskip("einops", reason="einops is a test dependency (pip install -e .[test])")
    _, rf_m, st_m = _probe(_S2D("module", pad_after))
    tr, rf, st = _probe(_S2D(form, pad_after))
    assert st.verdict_line == st_m.verdict_line == "period-2"
    assert [a.to_dict() for a in rf.axes] == [a.to_dict() for a in rf_m.axes]
    assert rf.size("H") == 8 and rf.axes[0].period == 2 and rf.axes[0].scale == "1"
    _exact_at(tr, rf, [(7, 7), (8, 8), (0, 15)])


class _AttnAfterS2D(nn.Module):
    """Attention after a reshape downsample must be named, not hidden behind a partial."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(4, 8, 3, padding=1, padding_mode="circular")
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.o = nn.Conv2d(8, 4, 1)

    def forward(self, x, t):
        b, c, h, w = x.shape
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        y = self.c(y)
        tok = y.flatten(2).transpose(1, 2)
        tok = tok + self.attn(tok, tok, tok, need_weights=False)[0]
        y = tok.transpose(1, 2).reshape(b, 8, h // 2, w // 2)
        y = self.o(y)
        return y.reshape(b, c, 2, 2, h // 2, w // 2).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h, w)


def test_attention_after_a_reshape_downsample_is_named():
    _, rf, st = _probe(_AttnAfterS2D())
    assert not st.partial
    assert any(b.kind == "global-op" and "attention" in b.cause for b in st.breakers)
    assert "period-2" in st.verdict and "non-local" in st.verdict
    assert rf.axes and rf.size("H") == 6  # the local path: conv k3 at half resolution


class _Unpatchify(nn.Module):
    """A DiT's output stage: patch-embed conv, a per-token Linear, unpatchify as reshape +
    einsum + reshape as the last op."""

    def __init__(self, p=2, c=1, d=16):
        super().__init__()
        self.p, self.c = p, c
        self.embed = nn.Conv2d(c, d, p, stride=p)
        self.lin = nn.Linear(d, p * p * c)

    def forward(self, x, t):
        n, _, hh, ww = x.shape
        h, w = hh // self.p, ww // self.p
        tok = self.embed(x).flatten(2).transpose(1, 2)          # (n, h w, d)
        y = self.lin(tok)                                         # (n, h w, p p c)
        y = y.reshape(n, h, w, self.p, self.p, self.c)
        y = torch.einsum("nhwpqc->nchpwq", y)
        return y.reshape(n, self.c, h * self.p, w * self.p)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_unpatchify_as_the_last_op_is_at_full_scale(tracer):
    tr, rf, st = _probe(_Unpatchify(), tracer=tracer)
    a = rf.axes[0]
    assert a.scale == "1" and a.size == 2 and a.period == 2
    assert a.phases == ((0, 1), (-1, 0))     # pixel 2k reads 2k..2k+1, pixel 2k+1 reads 2k..2k+1
    assert st.verdict_line == "period-2"
    _exact_at(tr, rf, [(0, 0), (7, 8), (15, 15)])


class _QKVConv1d(nn.Module):
    """guided-diffusion's attention input: a kernel-1 conv1d over the flattened positions."""

    def __init__(self):
        super().__init__()
        self.i = nn.Conv2d(1, 4, 3, padding=1, padding_mode="circular")
        self.c = nn.Conv1d(4, 4, 1)

    def forward(self, x, t):
        x = self.i(x)
        b, c, h, w = x.shape
        return self.c(x.reshape(b, c, h * w)).reshape(b, c, h, w)


class _CropWithShapes(nn.Module):
    """NCSN++'s upfirdn2d crops with bounds computed from ``x.shape`` (graph nodes under fx)."""

    def forward(self, x, t):
        y = F.pad(x, [1, 1, 1, 1])
        return y[:, :, 1:y.shape[2] - 1, 1:y.shape[3] - 1]


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("net,size", [(_QKVConv1d, 3), (_CropWithShapes, 1)])
def test_pointwise_over_flattened_positions_and_shape_computed_crops(net, size, tracer):
    tr, rf, st = _probe(net(), tracer=tracer)
    assert tr.unknown_ops == () and not st.partial
    assert st.verdict == ("equivariant",) and st.breakers == ()   # the cropped padding never reaches the output
    assert rf.size("H") == size
    _exact_at(tr, rf, [(8, 8), (0, 0)])


class _InContextTokens(nn.Module):
    """U-ViT / in-context conditioning: a time token and a register token around the image
    tokens, a position embedding over all of them, attention, long skip, then the extra
    tokens dropped (by slicing or split) and the tokens unpatchified with einops."""

    def __init__(self, drop="slice", p=2, d=16, n=64):
        super().__init__()
        self.drop, self.p, self.n = drop, p, n
        self.embed = nn.Conv2d(1, d, p, stride=p)
        self.time = nn.Linear(1, d)
        self.reg = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, n + 2, d))
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.skip = nn.Linear(2 * d, d)
        self.out = nn.Linear(d, p * p)
        self.final = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t):
        b = x.shape[0]
        tok = self.embed(x).flatten(2).transpose(1, 2)                            # (b, n, d)
        z = torch.cat((self.time(t[:, None])[:, None, :], tok, self.reg.expand(b, -1, -1)), dim=1) + self.pos
        h = self.ln(z)
        z = self.skip(torch.cat((z, z + self.attn(h, h, h, need_weights=False)[0]), dim=-1))
        if self.drop == "slice":
            z = z[:, 1:1 + self.n, :]
        else:
            z = z.split([1, self.n, 1], dim=1)[1]
        z = self.out(z)                                                            # (b, n, p p)
        side = int(self.n ** 0.5)
        y = z.reshape(b, side, side, self.p, self.p).permute(0, 1, 3, 2, 4).reshape(b, 1, side * self.p, side * self.p)
        return self.final(y)


@pytest.mark.parametrize("drop", ["slice", "split"])
def test_extra_tokens_around_the_image_tokens(drop):
    tr, rf, st = _probe(_InContextTokens(drop))
    assert not st.partial and tr.unknown_ops == ()
    kinds = {b.kind for b in st.breakers}
    assert kinds == {"boundary", "global-op", "position-embedding", "stride"}     # not the time token
    assert st.verdict == ("boundary-broken", "period-2", "non-local")
    # the local path: patch embed k2 s2, then the final 3x3 conv at full resolution
    assert [(a.size, a.scale, a.period) for a in rf.axes] == [(4, "1", 2), (4, "1", 2)]
    for p in [(8, 8), (0, 0), (15, 7)]:
        assert probe_receptive_field(tr, rf, pixel=p, n_inputs=2).inside


class _ClassToken(nn.Module):
    """A class token attends over the image tokens and its summary is added back everywhere."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1, padding_mode="circular")
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, x, t):
        h = self.c(x)
        tok = torch.cat((self.cls.expand(h.shape[0], -1, -1), h.flatten(2).transpose(1, 2)), 1)
        tok = tok + self.attn(tok, tok, tok, need_weights=False)[0]
        return h + tok[:, 0][:, :, None, None]


def test_reading_the_class_token_is_a_global_summary_not_a_fixed_position():
    _, rf, st = _probe(_ClassToken())
    assert st.verdict == ("equivariant", "non-local") and not st.partial
    assert [b.kind for b in st.breakers] == ["global-op"] and rf.size("H") == 3
