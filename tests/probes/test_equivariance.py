"""Stage 3 (equivariance): structural breakers with hand-derived bands and periods, a
brute-force band check, and measured shift tests."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from els_audit.probes import EQ_RULES, eq_rule, equivariance_measured, equivariance_structure, trace_model
from els_audit.probes.measured import PSNR_CAP_DB

from toy_models import (
    tiny_diffusers_unet,
    AttnNet,
    CoordNet,
    ConvStack,
    DenseSpaceNet,
    FlipNet,
    NormNet,
    PadNet,
    PosEmbNet,
    StrideThenTranspose,
    TimeEmbNet,
    TwoLevelUNet,
    eps_of,
)


def _eq(model, shape=(1, 8, 8), seed=0):
    torch.manual_seed(seed)
    model = model.eval()
    g = torch.Generator().manual_seed(seed)
    tr = trace_model(model, (torch.randn((2,) + shape, generator=g), torch.rand(2, generator=g)))
    return equivariance_structure(tr)


# -- structural ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate"])
def test_conv_stack_band(mode):
    # 3 convs with padding 1: the first touches the border pixel; each later conv3 pushes
    # that influence one pixel further in: band 1 + 1 + 1 = 3 on every side.
    eq = _eq(ConvStack(3, padding_mode=mode), (1, 12, 12))
    assert eq.verdict == ("boundary-broken",) and eq.verdict_line == "boundary-broken(B=3)"
    assert eq.band == {"H": (3, 3), "W": (3, 3)} and eq.band_width == 3
    # per breaker: the first conv reaches 3 px, the second 2, the last 1
    assert [b.amount["band_width"] for b in eq.breakers] == [3, 2, 1]
    assert all(b.kind == "boundary" and b.breaks_equivariance for b in eq.breakers)
    json.dumps(eq.to_dict(), allow_nan=False)


def test_conv3_then_conv5_band():
    # conv3 pad 1 touches 1 px; conv5 pad 2 adds 2 (and touches 2 itself): band 1 + 2 = 3
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(1, 2, 3, padding=1)
            self.b = torch.nn.Conv2d(2, 1, 5, padding=2)

        def forward(self, x, t, label=None):
            return self.b(torch.relu(self.a(x)))

    eq = _eq(Net(), (1, 12, 12))
    assert eq.band_width == 3 and [b.amount["band_width"] for b in eq.breakers] == [3, 2]


def test_circular_stack_is_equivariant():
    eq = _eq(ConvStack(3, padding_mode="circular"), (1, 12, 12))
    assert eq.verdict == ("equivariant",) and eq.band_width == 0 and eq.breakers == ()
    assert eq.period == {"H": 1, "W": 1}


@pytest.mark.parametrize("mode,verdict", [("circular", ("equivariant",)), ("reflect", ("boundary-broken",)),
                                          ("constant", ("boundary-broken",))])
def test_explicit_pad_modes(mode, verdict):
    # F.pad by 1 + valid conv3, twice: band 2 unless circular
    eq = _eq(PadNet(mode))
    assert eq.verdict == verdict
    assert eq.band_width == (0 if mode == "circular" else 2)


def test_two_level_unet_band_by_hand():
    # 16 px.  c1 (pad 1) touches rows {0, 15}.  Pool: m = 0 and 7 (of 8).  c2 reads m-1..m+1
    # and pads: {0, 1, 6, 7}.  convT k2 s2: o with floor(o/2) in that set: {0..3, 12..15}.
    # cat with c1 ({0, 15}), c3 reads o-1..o+1 and pads: {0..4, 11..15}: band 5.
    eq = _eq(TwoLevelUNet(), (1, 16, 16))
    assert eq.band == {"H": (5, 5), "W": (5, 5)}
    # maxpool halves: equivariant only to even shifts
    assert eq.period == {"H": 2, "W": 2} and eq.verdict == ("boundary-broken", "period-2")
    strides = [b for b in eq.breakers if b.kind == "stride"]
    assert [b.node for b in strides] == ["max_pool2d"] and strides[0].amount["period"] == 2


def test_circular_unet_period_only():
    eq = _eq(TwoLevelUNet("circular"), (1, 16, 16))
    assert eq.verdict == ("period-2",) and eq.band_width == 0
    # default shifts 1..4: even shifts are exact, odd ones alias
    res = equivariance_measured(eps_of(TwoLevelUNet("circular").eval()), (1, 8, 8), band=eq, times=(0.5,))
    assert res.shifts == ((1, 1), (2, 2), (3, 3), (4, 4))
    rel = res.rel_err[0]
    assert rel[1] < 1e-5 and rel[3] < 1e-5 and min(rel[0], rel[2]) > 1e-3


def test_stride_then_transposed_conv_edges():
    # circular conv k3 s2 then ConvTranspose k4 s2 p1: output 0 reads inputs -1 and 0:
    # input -1 does not exist -> the transposed conv itself is a (1 px) boundary breaker.
    eq = _eq(StrideThenTranspose(4, 1, padding_mode="circular"), (1, 8, 8))
    kinds = sorted({b.kind for b in eq.breakers})
    assert kinds == ["boundary", "stride"] and eq.band == {"H": (1, 1), "W": (1, 1)}
    assert "missing inputs" in next(b.cause for b in eq.breakers if b.kind == "boundary")


def test_paper_resnet_and_unet_against_brute_force_band():
    from els_audit.models.zoo import PaperResNet, PaperUNet

    # Brute force: the same weights with zeros vs circular padding differ exactly where
    # the boundary condition reaches the output.  The influence decays fast with depth
    # (1e-8 at 20 px in the UNet), so compare in float64 with a round-off threshold.
    for cls, kw, shape in [(PaperResNet, dict(width=4, n_layers=2, time_dim=8), (1, 16, 16)),
                           (PaperUNet, dict(base=4, levels=2, time_dim=8), (1, 48, 48))]:
        torch.manual_seed(0)
        zero = cls(padding_mode="zeros", **kw).eval()
        circ = cls(padding_mode="circular", **kw).eval()
        circ.load_state_dict(zero.state_dict())
        g = torch.Generator().manual_seed(1)
        x, t = torch.randn((4,) + shape, generator=g), torch.rand(4, generator=g)
        eq = equivariance_structure(trace_model(zero, (x[:2], t[:2])))
        with torch.no_grad():
            diff = (zero.double()(x.double(), t.double()) - circ.double()(x.double(), t.double()))
        diff = diff.abs().amax(dim=(0, 1)) > 1e-12                                 # (H, W)
        n = shape[-1]
        # along the centre column / row (outside the other axis' band unless it covers all)
        rows, cols = diff[:, n // 2].numpy(), diff[n // 2, :].numpy()
        band = lambda m: (int(np.nonzero(m[: n // 2])[0].max()) + 1 if m[: n // 2].any() else 0,  # noqa: E731
                          n - int(np.nonzero(m[n // 2:])[0].min() + n // 2) if m[n // 2:].any() else 0)
        assert eq.band["H"] == band(rows) and eq.band["W"] == band(cols), (cls.__name__, eq.band)
    # the ResNet by hand: 2 + 2 convs of padding 1 -> band 4
    assert _eq(PaperResNet(width=4, n_layers=2, time_dim=8), (1, 16, 16)).band_width == 4


def test_attention_groupnorm_spread_boundary_globally():
    eq = _eq(AttnNet(), (1, 6, 6))
    assert eq.verdict == ("boundary-broken", "non-local")
    assert eq.band_width == 2 and eq.band_spreads_globally   # conv3 + conv3 locally
    glob = [b for b in eq.breakers if b.kind == "global-op"]
    assert {b.node for b in glob} == {"norm", "attn"} and not any(b.breaks_equivariance for b in glob)
    circ = _eq(AttnNet("circular"), (1, 6, 6))
    assert circ.verdict == ("equivariant", "non-local") and not circ.band_spreads_globally


@pytest.mark.parametrize("model,kind", [
    (PosEmbNet(8), "position-embedding"),
    (CoordNet(), "coordinate-channels"),
    (DenseSpaceNet(8), "dense-over-space"),
])
def test_position_dependent_breakers(model, kind):
    eq = _eq(model)
    assert kind in {b.kind for b in eq.breakers}
    assert "equivariant" not in eq.verdict and "non-local" in eq.verdict
    assert next(b for b in eq.breakers if b.kind == kind).breaks_equivariance


@pytest.mark.parametrize("model,shape", [
    (AttnNet(), (1, 6, 6)), (CoordNet(), (1, 8, 8)), (TwoLevelUNet(), (1, 16, 16)),
    (StrideThenTranspose(4, 1), (1, 8, 8)), (PosEmbNet(8), (1, 8, 8)), (PadNet("reflect"), (1, 8, 8)),
])
def test_both_tracers_agree(model, shape):
    # torch.export lowers to aten ops (MHA becomes bmm + softmax): same field, band, verdict
    torch.manual_seed(0)
    model = model.eval()
    args = (torch.randn((2,) + shape), torch.rand(2))
    out = []
    for tracer in ("fx", "export"):
        eq = equivariance_structure(trace_model(model, args, tracer=tracer))
        out.append((eq.verdict, eq.band, eq.period, sorted({b.kind for b in eq.breakers})))
    assert out[0] == out[1]


def test_time_embedding_and_norms_do_not_break():
    # a (B, C, 1, 1) bias is constant over space: no position breaker
    assert _eq(TimeEmbNet()).verdict == ("equivariant",)
    assert _eq(NormNet("batch"), (1, 6, 6)).verdict == ("equivariant",)
    assert _eq(NormNet("instance"), (1, 6, 6)).verdict == ("equivariant", "non-local")


def test_unknown_op_never_equivariant():
    eq = _eq(FlipNet(), (1, 6, 6))
    assert eq.partial and "equivariant" not in eq.verdict and "partial" in eq.verdict_line
    assert [b.kind for b in eq.breakers] == ["unsupported"]


def test_eq_rule_table_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        eq_rule("conv")(lambda ctx: [])
    assert "attention" in EQ_RULES


def test_diffusers_unet_structure():
    m = tiny_diffusers_unet(16)
    tr = trace_model(m, (torch.randn(2, 1, 16, 16), torch.tensor([10, 500])), {"return_dict": False})
    eq = equivariance_structure(tr)
    # one stride-2 conv downsampler (2 blocks), zero padding, attention + GroupNorm
    assert eq.verdict == ("boundary-broken", "period-2", "non-local") and not eq.partial
    assert eq.band_spreads_globally


# -- measured -----------------------------------------------------------------------------
def test_psnr_by_hand():
    # f(x) = x + m with m = 1 at pixel (0, 0): f(roll x) - roll f(x) = m - roll(m)
    # = +1 at (0, 0), -1 at (1, 1) for shift (1, 1): MSE = 2 / 16 = 0.125 on a 1x4x4 image,
    # PSNR = 10 log10(4 / 0.125) = 10 log10(32) = 15.0515 dB.
    bump = torch.zeros(1, 4, 4)
    bump[0, 0, 0] = 1.0
    res = equivariance_measured(lambda x, t, l: x + bump, (1, 4, 4), shifts=[(1, 1)], times=(0.5,), n_samples=3)
    assert res.psnr_db[0][0] == pytest.approx(10 * math.log10(32), abs=1e-9)
    assert res.max_abs[0][0] == pytest.approx(1.0)
    # band 1 keeps rows/cols o with o in [1, 3) and (o - 1) mod 4 in [1, 3): only o = 2.
    # The error at (2, 2) is 0: exactly zero masked error -> the PSNR cap.
    res = equivariance_measured(lambda x, t, l: x + bump, (1, 4, 4), shifts=[(1, 1)], times=(0.5,), band=1)
    assert res.psnr_masked_db[0][0] == PSNR_CAP_DB and res.max_abs_masked[0][0] == 0.0
    json.dumps(res.to_dict(), allow_nan=False)


def test_circular_net_equivariant_to_1e5():
    m = ConvStack(3, padding_mode="circular").eval()
    res = equivariance_measured(eps_of(m), (1, 12, 12), shifts=(1, 2, 3, (0, 5)), times=(0.1, 0.9), seed=3)
    assert max(max(r) for r in res.rel_err) < 1e-5
    assert min(min(r) for r in res.psnr_db) > 100
    assert res.effective_band == ((0, 0, 0, 0), (0, 0, 0, 0))


def test_zero_padding_error_confined_to_band():
    torch.manual_seed(0)
    m = ConvStack(3).eval()
    eq = _eq(m, (1, 12, 12))
    res = equivariance_measured(eps_of(m), (1, 12, 12), shifts=(1, 2), times=(0.5,), band=eq)
    assert res.band == (3, 3)
    assert max(res.rel_err_masked[0]) < 1e-6 and min(res.rel_err[0]) > 1e-3
    assert res.effective_band == ((3, 3),)  # the structural band is exact for a plain conv stack
    # the error map vanishes outside the band around both the border and the seam
    maps = res.arrays()["error_maps"]                                           # (T, S, H, W)
    for si, (dy, dx) in enumerate(res.shifts):
        o = np.arange(12)
        ok_r = (o >= 3) & (o < 9) & ((o - dy) % 12 >= 3) & ((o - dy) % 12 < 9)
        ok_c = (o >= 3) & (o < 9) & ((o - dx) % 12 >= 3) & ((o - dx) % 12 < 9)
        assert maps[0, si][np.ix_(ok_r, ok_c)].max() < 1e-6
        assert maps[0, si].max() > 1e-3


def test_attention_error_is_global():
    torch.manual_seed(0)
    m = AttnNet().eval()
    eq = _eq(m, (1, 8, 8))
    res = equivariance_measured(eps_of(m), (1, 8, 8), shifts=(1,), times=(0.5,), band=eq)
    assert res.band == (2, 2) and res.rel_err_masked[0][0] > 1e-4
    assert res.effective_band == ((None,),)


def test_period_two_net():
    torch.manual_seed(0)
    m = StrideThenTranspose(2, 0, padding_mode="circular").eval()
    res = equivariance_measured(eps_of(m), (1, 8, 8), shifts=((2, 2), (1, 1), (0, 4)), times=(0.5,))
    rel = res.rel_err[0]
    assert rel[0] < 1e-5 and rel[2] < 1e-5 and rel[1] > 1e-3
    assert res.effective_band[0][1] is None  # an odd shift aliases everywhere


def test_measured_is_deterministic_and_validates():
    m = ConvStack(2).eval()
    a = equivariance_measured(eps_of(m), (1, 6, 6), shifts=(1,), times=(0.3,), seed=5)
    b = equivariance_measured(eps_of(m), (1, 6, 6), shifts=(1,), times=(0.3,), seed=5)
    assert a.to_dict() == b.to_dict()
    with pytest.raises(ValueError, match="image_shape"):
        equivariance_measured(eps_of(m), (6, 6))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        equivariance_measured(eps_of(m), (1, 6, 6), data=torch.full((2, 1, 6, 6), 3.0))
    with pytest.raises(ValueError, match="times must lie"):
        equivariance_measured(eps_of(m), (1, 6, 6), times=(1.5,))
