"""Real architectures built from diffusers (random init, seeded, shrunk), each traced, its
theoretical field and structural verdict asserted against what the architecture truly is,
and the field checked against brute force (gradient support, forward-mode AD of padding).

- ``UNet2DModel`` with the google/ddpm-cifar10-32 block layout (channels shrunk,
  ``layers_per_block=1``): zero-padded conv3s, three stride-2 ``Downsample2D`` convs,
  GroupNorm everywhere, self-attention at 16 px (one in down_blocks.1, two in up_blocks.2)
  and at 4 px in the mid block.
- The same UNet with only ``DownBlock2D`` / ``UpBlock2D`` (attention only in the mid block,
  unless ``add_attention=False``); and its GroupNorm-free twin, whose local field and
  boundary band are checked exactly by brute force on a large image.
- ``DiTTransformer2DModel`` with class labels: patch-embed conv (stride p), fixed sincos
  position embedding added to the tokens, adaLN-Zero blocks, unpatchify by reshape +
  einsum; with and without learned sigma (2x output channels); and its attention-free
  twin, whose patch field is checked exactly by brute force.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

from els_audit.probes import equivariance_structure, probe_receptive_field, receptive_field, trace_model  # noqa: E402

_DDPM_DOWN = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
_DDPM_UP = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")

# The field of the DDPM-layout UNet (layers_per_block=1), per output phase mod 8.  By hand, the
# far edge (lo) in image pixels, accumulating the reach of every conv3 times its scale:
#   conv_in 1; down0 (s1) 2 convs +2 = 3; Downsample k3 s2 p1 +1 = 4; down1 (s2) +4 = 8;
#   Downsample (s2) +2 = 10; down2 (s4) +8 = 18; Downsample (s4) +4 = 22; down3 (s8) +16 = 38;
#   mid 2 resnets (s8) +32 = 70; up0 2 resnets (s8) +32 = 102; nearest x2 + conv3 to s4 -> 110;
#   up1 (s4) +16 = 126; up to s2 -> 130; up2 (s2) +8 = 138; up to s1 -> 140; up3 +4 = 144;
#   conv_out +1 = 145, at the phase where every floor() of the upsamplings falls low.
# The per-phase intervals are confirmed exactly by the gradient support of the GroupNorm-free
# twin on a 304 px image (test_unet_local_field_is_exact_by_brute_force).
_UNET_PHASES = ((-142, 134), (-143, 133), (-144, 132), (-145, 131),
                (-138, 138), (-139, 137), (-140, 136), (-141, 135))


def _analyse(model, args, kwargs):
    tr = trace_model(model.eval(), args, kwargs)
    rf = receptive_field(tr)
    return tr, rf, equivariance_structure(tr, rf)


def _unet(in_ch, down, up, channels=(32, 32, 64, 64), **kw):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=32, in_channels=in_ch, out_channels=in_ch, block_out_channels=channels, layers_per_block=1,
        down_block_types=down, up_block_types=up, norm_num_groups=8, **kw)


def _unet_inputs(in_ch, size):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, in_ch, size, size, generator=g), torch.tensor([10, 500])), {"return_dict": False}


def _kinds(st):
    return {b.kind for b in st.breakers}


def _attention_breakers(st):
    return [b for b in st.breakers if b.kind == "global-op" and "attention" in b.cause]


def _common(tr, rf, st):
    assert tr.unknown_ops == ()
    assert tr.verified_max_abs_diff is not None and tr.verified_max_abs_diff < 1e-4
    assert not rf.partial and rf.unsupported_ops == ()
    assert not st.partial and st.unsupported_ops == ()


def _probe_inside(tr, rf, size, pixels=None):
    c = size // 2
    for px in pixels or [(c, c), (0, c), (c, size - 1), (0, 0), (size - 1, size - 1)]:  # centre, edges, corners
        pr = probe_receptive_field(tr, rf, pixel=px, n_inputs=2)
        assert pr.inside, (px, pr)


# -- UNet2DModel, google/ddpm-cifar10-32 layout ----------------------------------------------
@pytest.fixture(scope="module")
def ddpm():
    args, kwargs = _unet_inputs(3, 32)
    return _analyse(_unet(3, _DDPM_DOWN, _DDPM_UP), args, kwargs)


def test_ddpm_cifar10_unet_verdict(ddpm):
    tr, rf, st = ddpm
    _common(tr, rf, st)
    assert tr.output_shape == (2, 3, 32, 32)
    # zero padding everywhere, three stride-2 downsamples, GroupNorm + attention
    assert st.verdict == ("boundary-broken", "period-8", "non-local"), st.verdict_line
    assert st.period_all == 8 and st.period == {"H": 8, "W": 8}
    # GroupNorm and attention carry every boundary effect to every pixel: the band is the image
    assert st.band_spreads_globally and st.band_width == 16
    assert _kinds(st) == {"boundary", "stride", "global-op"}
    strides = [b for b in st.breakers if b.kind == "stride"]
    assert [b.module_path for b in strides] == [f"down_blocks.{i}.downsamplers.0.conv" for i in range(3)]
    assert [b.amount["period"] for b in strides] == [2, 4, 8]
    assert all(b.cause.startswith("zeros padding") for b in st.breakers if b.kind == "boundary")


def test_ddpm_cifar10_unet_global_ops_are_named_and_equivariant(ddpm):
    _, rf, st = ddpm
    # 1 attention in AttnDownBlock2D, 2 (layers_per_block + 1) in AttnUpBlock2D, 1 in the mid block
    attn = _attention_breakers(st)
    assert sorted(b.module_path for b in attn) == [
        "down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1"]
    norms = [b for b in st.breakers if b.kind == "global-op" and "GroupNorm" in b.cause]
    assert norms and len(norms) + len(attn) == sum(b.kind == "global-op" for b in st.breakers)
    # permutation-equivariant: they spread, they do not break circular-shift equivariance
    assert not any(b.breaks_equivariance for b in st.breakers if b.kind == "global-op")
    assert rf.is_global and {g.kind for g in rf.global_paths} == {"norm", "attention"}
    assert all(g.equivariant for g in rf.global_paths)


def test_ddpm_cifar10_unet_time_embedding_is_not_a_position_embedding(ddpm):
    _, _, st = ddpm
    # temb: sinusoidal over *timesteps*, a (B, C, 1, 1) bias in every resnet: constant over H, W
    assert not _kinds(st) & {"position-embedding", "coordinate-channels", "position-dependent", "dense-over-space"}


def test_ddpm_cifar10_unet_field(ddpm):
    tr, rf, _ = ddpm
    assert [(a.axis, a.size, a.period, a.scale, a.extent) for a in rf.axes] == [
        ("H", 277, 8, "1", (-145, 138)), ("W", 277, 8, "1", (-145, 138))]
    assert rf.axes[0].phases == _UNET_PHASES
    _probe_inside(tr, rf, 32)


# -- UNet2DModel without attention blocks --------------------------------------------------------
@pytest.fixture(scope="module", params=[False, True], ids=["add_attention=False", "mid-block-attention"])
def plain_unet(request):
    args, kwargs = _unet_inputs(1, 32)
    model = _unet(1, ("DownBlock2D",) * 4, ("UpBlock2D",) * 4, add_attention=request.param)
    return request.param, _analyse(model, args, kwargs)


def test_unet_without_attention_groupnorm_is_global(plain_unet):
    mid_attention, (tr, rf, st) = plain_unet
    _common(tr, rf, st)
    # GroupNorm statistics over (C/G, H, W): every output pixel depends on every input pixel;
    # permutation-equivariant, so non-local but not an equivariance breaker by itself
    assert st.verdict == ("boundary-broken", "period-8", "non-local"), st.verdict_line
    assert _kinds(st) == {"boundary", "stride", "global-op"}
    assert not any(b.breaks_equivariance for b in st.breakers if b.kind == "global-op")
    assert rf.is_global and all(g.equivariant for g in rf.global_paths)
    # UNetMidBlock2D has an attention unless add_attention=False, whatever the block types
    assert [b.module_path for b in _attention_breakers(st)] == (["mid_block.attentions.0"] if mid_attention else [])
    assert {g.kind for g in rf.global_paths} == ({"norm", "attention"} if mid_attention else {"norm"})
    assert [(a.size, a.period, a.scale, a.phases) for a in rf.axes] == [(277, 8, "1", _UNET_PHASES)] * 2
    _probe_inside(tr, rf, 32, [(16, 16), (0, 0)])


@pytest.fixture(scope="module")
def local_unet():
    """The attention-free UNet with every GroupNorm replaced by the identity: a purely local,
    zero-padded, period-8 network, small enough in channels to probe on a 304 px image
    (field 277 < 304)."""
    model = _unet(1, ("DownBlock2D",) * 4, ("UpBlock2D",) * 4, channels=(8, 8, 16, 16), add_attention=False)
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(mod, name, nn.Identity())
    args, kwargs = _unet_inputs(1, 304)
    return model.eval(), args, _analyse(model, args, kwargs)


def test_unet_local_field_is_exact_by_brute_force(local_unet):
    _, _, (tr, rf, st) = local_unet
    _common(tr, rf, st)
    assert st.verdict == ("boundary-broken", "period-8"), st.verdict_line
    assert not rf.is_global and _kinds(st) == {"boundary", "stride"}
    assert [(a.size, a.period, a.scale, a.extent, a.phases) for a in rf.axes] == [
        (277, 8, "1", (-145, 138), _UNET_PHASES)] * 2
    for i in range(4):  # H phases 0..3 and W phases 4..7, away from the borders
        pr = probe_receptive_field(tr, rf, pixel=(152 + i, 156 + i), n_inputs=2)
        assert pr.inside and pr.fill == 1.0 and pr.support == pr.predicted, (i, pr)


class _RingPad(nn.Module):
    """A zero-padded conv whose padding ring carries ``value[0]`` (0 in the primal)."""

    def __init__(self, conv: nn.Conv2d, value: list):
        super().__init__()
        self.conv, self.value = conv, value

    def forward(self, h):
        ph, pw = self.conv.padding
        ring = 1 - F.pad(torch.ones_like(h), (pw, pw, ph, ph))
        k = self.conv
        return F.conv2d(F.pad(h, (pw, pw, ph, ph)) + self.value[0] * ring, k.weight, k.bias, k.stride, 0,
                        k.dilation, k.groups)


def test_unet_boundary_band_is_exact_by_forward_mode_ad(local_unet):
    """The band (pixels whose value depends on the padding) against its ground truth: the
    support of d out / d c, with c the value of every padding ring, by forward-mode AD (a
    difference zero-vs-circular padding drowns in rounding: the effect decays to 1e-17)."""
    import torch.autograd.forward_ad as fwAD

    model, (x, t), (_, _, st) = local_unet
    twin, value = copy.deepcopy(model), [None]
    for mod in list(twin.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.Conv2d) and child.padding != (0, 0):
                assert child.padding_mode == "zeros"
                setattr(mod, name, _RingPad(child, value))
    with torch.no_grad(), fwAD.dual_level():
        value[0] = fwAD.make_dual(torch.zeros(()), torch.ones(()))
        out = fwAD.unpack_dual(twin(x, t, return_dict=False)[0])
        assert torch.equal(out.primal, model(x, t, return_dict=False)[0])
        touched = (out.tangent != 0).any(0).any(0).numpy()
    # Downsample k3 s2 p1 on an even size never reads its right/bottom padding: 140 vs 132
    assert st.band == {"H": (140, 132), "W": (140, 132)} and st.band_width == 140
    bh, bw = st.band_masks["H"], st.band_masks["W"]
    assert ((bh[:, None] | bw[None, :]) == touched).all()


# -- DiTTransformer2DModel ----------------------------------------------------------------------
def _dit(patch, size, learned_sigma, layers=2, in_ch=4):
    torch.manual_seed(0)
    model = diffusers.models.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=in_ch,
        out_channels=2 * in_ch if learned_sigma else None, num_layers=layers, sample_size=size,
        patch_size=patch, num_embeds_ada_norm=10)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, in_ch, size, size, generator=g), torch.tensor([10, 500]))
    return model, args, {"class_labels": torch.tensor([1, 7]), "return_dict": False}


_DIT_CASES = [(2, 16, False), (2, 32, True), (4, 16, False)]


@pytest.fixture(scope="module", params=_DIT_CASES, ids=lambda c: f"p{c[0]}-{c[1]}px-sigma{int(c[2])}")
def dit(request):
    patch, size, learned_sigma = request.param
    model, args, kwargs = _dit(patch, size, learned_sigma)
    return request.param, _analyse(model, args, kwargs)


def _patch_phases(p):
    # patch conv k=p s=p: token m reads x[pm, pm + p - 1]; unpatchify: o reads token o // p.
    # Phase k = o mod p: [o - k, o - k + p - 1].
    return tuple((-k, p - 1 - k) for k in range(p))


def test_dit_verdict_and_breakers(dit):
    (patch, size, learned_sigma), (tr, rf, st) = dit
    _common(tr, rf, st)
    # learned sigma: one (B, 2C, H, W) tensor (eps, then variance interpolation); the whole
    # tensor is the analysed output, both halves share the same spatial field
    assert tr.output_shape == (2, 8 if learned_sigma else 4, size, size)
    # no padding anywhere (the patches tile the image): no boundary band
    assert st.verdict == (f"period-{patch}", "non-local"), st.verdict_line
    assert st.period_all == patch and st.band_width == 0 and "boundary" not in _kinds(st)
    assert _kinds(st) == {"stride", "position-embedding", "global-op"}
    [stride] = [b for b in st.breakers if b.kind == "stride"]
    assert stride.module_path == "pos_embed.proj" and stride.amount["period"] == patch
    # the sincos embedding added in PatchEmbed: exactly one, and neither the timestep nor the
    # class-label embedding (adaLN-Zero scale / shift / gate, constant over tokens)
    [pe] = [b for b in st.breakers if b.kind == "position-embedding"]
    assert pe.module_path == "pos_embed" and pe.breaks_equivariance
    attn = _attention_breakers(st)
    assert [b.module_path for b in attn] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert len(attn) == sum(b.kind == "global-op" for b in st.breakers)  # LayerNorm is per token
    assert rf.is_global and {g.kind for g in rf.global_paths} == {"attention"}


def test_dit_unpatchify_returns_to_pixel_scale(dit):
    (patch, size, _), (tr, rf, _) = dit
    assert [(a.axis, a.size, a.period, a.scale, a.extent, a.phases) for a in rf.axes] == [
        (ax, patch, patch, "1", (-(patch - 1), patch - 1), _patch_phases(patch)) for ax in ("H", "W")]
    _probe_inside(tr, rf, size)


class _NoAttention(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


@pytest.mark.parametrize("patch", [2, 4])
def test_dit_patch_field_is_exact_by_brute_force(patch):
    """Without attention a DiT is local: each output pixel reads exactly its own patch (the
    gradient support fills the predicted field at every phase); the position embedding is
    still reported."""
    model, args, kwargs = _dit(patch, 16, False)
    for blk in model.transformer_blocks:
        blk.attn1 = _NoAttention()
    tr, rf, st = _analyse(model, args, kwargs)
    _common(tr, rf, st)
    assert not rf.is_global and rf.global_paths == ()
    # the field is local, but the position embedding breaks equivariance at every pixel
    assert st.verdict == (f"period-{patch}", "non-local"), st.verdict_line
    assert [(a.size, a.period, a.scale, a.phases) for a in rf.axes] == [(patch, patch, "1", _patch_phases(patch))] * 2
    assert [b.module_path for b in st.breakers if b.kind == "position-embedding"] == ["pos_embed"]
    for k in range(patch):
        pr = probe_receptive_field(tr, rf, pixel=(8 + k, 8 + (k + 1) % patch), n_inputs=2)
        assert pr.inside and pr.fill == 1.0 and pr.support == pr.predicted, (k, pr)
