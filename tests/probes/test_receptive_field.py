"""Stage 2 (theoretical receptive field): hand-derived fields, phases, global paths,
and the gradient-support probe as independent ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from els_audit.probes import RF_RULES, probe_receptive_field, receptive_field, rf_rule, trace_model
from els_audit.probes.rf import AxisOp, PeriodicMap

from toy_models import (
    tiny_diffusers_unet,
    AttnNet,
    ChannelLastLinearNet,
    ControlFlowNet,
    Conv1dNet,
    ConvStack,
    DenseSpaceNet,
    FlipNet,
    NormNet,
    PadNet,
    PixelShuffleNet,
    SDPANet,
    SqueezeExciteNet,
    StrideThenTranspose,
    TimeEmbNet,
    TwoLevelUNet,
    UpsampleNet,
)


def _trace(model, shape=(1, 8, 8), kwargs=None, seed=0):
    torch.manual_seed(seed)
    model = model.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2,) + shape, generator=g)
    return trace_model(model, (x, torch.rand(2, generator=g)), kwargs)


def _field(model, shape=(1, 8, 8), kwargs=None):
    tr = _trace(model, shape, kwargs)
    return tr, receptive_field(tr)


# -- the index-map algebra ---------------------------------------------------------------
def test_periodic_map_conv_then_transposed_conv_by_hand():
    # conv k3 s2 p1: node m reads x[2m-1 .. 2m+1]  ->  n=1, D=2, lo=-1, hi=+1.
    m = PeriodicMap.identity().apply(AxisOp(1, 2, ((-1, 0, 1),), "zeros"))
    assert (m.n, m.D, m.lo, m.hi) == (1, 2, (-1,), (1,))
    # ConvTranspose k2 s2 p0: output o reads node floor(o/2): phases o=0 -> m=0, o=1 -> m=0
    up = AxisOp(2, 1, ((0,), (0,)), "zeros")
    m2 = m.apply(up)
    assert (m2.n, m2.D, m2.lo, m2.hi) == (2, 2, (-1, -1), (1, 1))
    # relative to the pixel: o=0 -> [-1, 1], o=1 -> [-2, 0]
    assert m2.phases() == [(-1, 1), (-2, 0)]


def test_periodic_map_compacts_and_refuses_scale_mismatch():
    # Two identical phases collapse to period 1.
    m = PeriodicMap._make(2, 2, np.array([-1, 0]), np.array([1, 2]))
    assert (m.n, m.D, m.lo, m.hi) == (1, 1, (-1,), (1,))
    coarse = PeriodicMap(1, 2, (0,), (1,))
    with pytest.raises(Exception, match="different scales"):
        PeriodicMap.identity().union(coarse)


def test_axis_op_finite_boundaries():
    # conv k3 p1 on 4 positions: taps o-1, o, o+1.
    op = AxisOp(1, 1, ((-1, 0, 1),), "reflect")
    idx, valid, touched = op.finite(4, 4)
    assert idx[0].tolist() == [1, 0, 1] and idx[3].tolist() == [2, 3, 2]   # reflect: -1 -> 1, 4 -> 2
    assert touched.tolist() == [True, False, False, True]
    op_c = AxisOp(1, 1, ((-1, 0, 1),), "circular")
    idx, _, touched = op_c.finite(4, 4)
    assert idx[0].tolist() == [3, 0, 1] and not touched.any()
    op_z = AxisOp(1, 1, ((-1, 0, 1),), "zeros")
    idx, _, _ = op_z.finite(4, 4)
    assert idx[0].tolist() == [-1, 0, 1]
    idx, _, _ = AxisOp(1, 1, ((-1, 0, 1),), "replicate").finite(4, 4)
    assert idx[3].tolist() == [2, 3, 3]


# -- hand-derived fields ------------------------------------------------------------------
@pytest.mark.parametrize("L", [1, 2, 3, 5])
def test_stacked_conv3_field_is_2L_plus_1(L):
    # each conv3 widens the field by 2: 1 + 2L
    _, rf = _field(ConvStack(L), (1, 16, 16))
    assert [a.size for a in rf.axes] == [2 * L + 1] * 2
    assert rf.axes[0].extent == (-L, L) and rf.axes[0].centred_side == 2 * L + 1
    assert not rf.is_global and not rf.partial and rf.axes[0].period == 1


def test_dilated_stack():
    # dilations 1, 2, 4 with k3: 1 + 2 (1 + 2 + 4) = 15
    _, rf = _field(ConvStack(3, dilations=(1, 2, 4)), (1, 24, 24))
    assert rf.size("H") == 15 and rf.size("W") == 15


def test_stride2_then_transposed_k2():
    # conv k3 s2 p1: m reads x[2m-1, 2m+1]; convT k2 s2: o reads m = floor(o/2).
    # o even: [o-1, o+1]; o odd: [o-2, o]  ->  size 3 per phase, extent (-2, 1), period 2.
    _, rf = _field(StrideThenTranspose(2, 0))
    a = rf.axes[0]
    assert (a.size, a.extent, a.period, a.phases) == (3, (-2, 1), 2, ((-1, 1), (-2, 0)))
    assert a.centred_side == 5


def test_stride2_then_transposed_k4_p1():
    # convT k4 s2 p1: o = 2i - 1 + kk.  o = 2m reads i in {m-1, m} -> x[2m-3, 2m+1]: (-3, +1);
    # o = 2m+1 reads i in {m, m+1} -> x[2m-1, 2m+3]: (-2, +2).  Size 5, extent (-3, 2).
    _, rf = _field(StrideThenTranspose(4, 1))
    a = rf.axes[0]
    assert (a.size, a.extent, a.phases) == (5, (-3, 2), ((-3, 1), (-2, 2)))


def test_two_level_unet_with_skip():
    # c1 at q: x[q-1, q+1].  c2 at m reads pooled m-1..m+1 = c1[2m-2 .. 2m+3] -> x[2m-3, 2m+4].
    # up at q reads c2[floor(q/2)].  c3 at o reads q in o-1..o+1:
    #   o = 2a:   lo = 2(a-1) - 3 = o - 5,  hi = 2a + 4 = o + 4      -> size 10
    #   o = 2a+1: lo = 2a - 3 = o - 4,      hi = 2(a+1) + 4 = o + 5  -> size 10
    # The skip branch (x[o-2, o+2]) lies inside.
    _, rf = _field(TwoLevelUNet(), (1, 16, 16))
    a = rf.axes[0]
    assert (a.size, a.extent, a.period, a.phases) == (10, (-5, 5), 2, ((-5, 4), (-4, 5)))


def test_pixel_shuffle_round_trip():
    # c1: x[q-1, q+1]; unshuffle: m covers c1[2m, 2m+1] -> x[2m-1, 2m+2];
    # c2: m' -> x[2m'-3, 2m'+4]; shuffle: o -> m' = floor(o/2):
    #   even o: [o-3, o+4], odd o: [o-4, o+3]  -> size 8, extent (-4, 4), period 2
    _, rf = _field(PixelShuffleNet())
    a = rf.axes[0]
    assert (a.size, a.extent, a.phases) == (8, (-4, 4), ((-3, 4), (-4, 3)))


@pytest.mark.parametrize("mode,size,extent", [
    # nearest: o reads q = o-1..o+1, m = floor(q/2): even o -> [o-3, o+1], odd -> [o-2, o+2]
    ("nearest", 5, (-3, 2)),
    # bilinear x2 (align_corners=False): q = 2a reads m in {a-1, a}, q = 2a+1 reads {a, a+1};
    # conv3 on top: even o reads m in {a-1..a+1} -> [o-3, o+3]; odd o -> [o-4, o+2]
    ("bilinear", 7, (-4, 3)),
])
def test_upsampling(mode, size, extent):
    _, rf = _field(UpsampleNet(mode))
    assert (rf.axes[0].size, rf.axes[0].extent) == (size, extent)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "constant"])
def test_explicit_pad_then_valid_convs(mode):
    # pad 1 + valid conv3, twice: 5 whatever the mode
    _, rf = _field(PadNet(mode))
    assert rf.size("H") == 5 and rf.axes[0].extent == (-2, 2)


def test_groups_and_avg_pool():
    # conv3 (1 -> 4), depthwise conv3 (groups 4), AvgPool k3 s1 p1: 1 + 2 + 2 + 2 = 7.
    # Groups split channels, not positions: no effect on the field.
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.dw = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.pool = torch.nn.AvgPool2d(3, stride=1, padding=1)
            self.out = torch.nn.Conv2d(4, 1, 1)

        def forward(self, x, t, label=None):
            return self.out(self.pool(torch.relu(self.dw(torch.relu(self.c1(x))))))

    tr, rf = _field(Net(), (1, 13, 13))
    assert rf.size("H") == 7 and tr.node("dw").meta["els_op"].params["groups"] == 4
    pr = probe_receptive_field(tr, rf)
    assert pr.inside and pr.fill == 1.0


def test_conv1d_field():
    # k3 (d1) then k5 dilation 2: 1 + 2 + 2*4 = 11
    tr = trace_model(Conv1dNet().eval(), (torch.randn(2, 1, 32), torch.rand(2)))
    rf = receptive_field(tr)
    assert [(a.axis, a.size, a.extent) for a in rf.axes] == [("L", 11, (-5, 5))]


def test_control_flow_field_follows_concrete_args():
    # inp conv3 + n blocks conv3 (+ 1x1 out): 1 + 2 (1 + n)
    _, rf2 = _field(ControlFlowNet(), kwargs={"n_blocks": 2})
    _, rf4 = _field(ControlFlowNet(), (1, 16, 16), kwargs={"n_blocks": 4})
    assert rf2.size("H") == 7 and rf4.size("H") == 11


def test_time_embedding_broadcast_is_pointwise():
    # conv3 + (B, C, 1, 1) bias + conv1: 3, nothing global
    _, rf = _field(TimeEmbNet())
    assert rf.size("H") == 3 and not rf.is_global


# -- global paths -------------------------------------------------------------------------
def test_attention_and_groupnorm_are_global_with_local_part():
    # conv3 -> GroupNorm (global stats) -> MHA over tokens (+ residual) -> conv3.
    # Local part: conv3 + pointwise + conv3 = 5.
    _, rf = _field(AttnNet(), (1, 6, 6))
    assert rf.is_global and rf.size("H") == 5
    kinds = {g.kind for g in rf.global_paths}
    assert kinds == {"norm", "attention"}
    assert all(g.equivariant for g in rf.global_paths)
    assert rf.field == {"H": "whole image", "W": "whole image"}


def test_sdpa_tokens_global():
    _, rf = _field(SDPANet(), (1, 6, 6))
    assert rf.is_global and [g.kind for g in rf.global_paths] == ["attention"]
    assert rf.size("H") == 3  # conv3 then the query path (pointwise)


@pytest.mark.parametrize("kind,is_global", [
    ("batch", False),       # eval BatchNorm: per-channel affine
    ("instance", True),     # statistics over H, W
    ("layer_chw", True),    # LayerNorm([C, H, W]): statistics over H, W
    ("layer_c", False),     # LayerNorm(C) on a channel-last view: per pixel
])
def test_norms(kind, is_global):
    _, rf = _field(NormNet(kind), (1, 6, 6))
    assert rf.is_global == is_global and rf.size("H") == 3


def test_linear_over_channels_vs_flattened_space():
    _, rf = _field(ChannelLastLinearNet(), (1, 6, 6))
    assert rf.size("H") == 3 and not rf.is_global
    _, rf = _field(DenseSpaceNet(6), (1, 6, 6))
    assert rf.is_global and not rf.has_local_field
    assert rf.field == {"H": "whole image", "W": "whole image"}
    assert [g.equivariant for g in rf.global_paths] == [False]


def test_global_pooling_gate():
    _, rf = _field(SqueezeExciteNet(), (1, 6, 6))
    assert rf.is_global and [g.kind for g in rf.global_paths] == ["adaptive_pool"]
    assert rf.size("H") == 3


def test_unknown_op_makes_result_partial_and_global():
    _, rf = _field(FlipNet(), (1, 6, 6))
    assert rf.partial and [u.node for u in rf.unsupported_ops] == ["flip"]
    assert rf.is_global  # never silently local
    json.dumps(rf.to_dict(), allow_nan=False)


def test_rule_table_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        rf_rule("conv")(lambda ctx: None)
    assert "conv" in RF_RULES and "attention" in RF_RULES


# -- the numerical probe ------------------------------------------------------------------
@pytest.mark.parametrize("model,shape", [
    (ConvStack(3), (1, 15, 15)),
    (ConvStack(2, kernel=5), (1, 15, 15)),
    (ConvStack(3, dilations=(1, 2, 1)), (1, 17, 17)),
])
def test_probe_fills_field_of_relu_conv_stacks(model, shape):
    tr, rf = _field(model, shape)
    pr = probe_receptive_field(tr, rf, n_inputs=3, seed=1)
    assert pr.inside and pr.fill == 1.0
    assert pr.support == pr.predicted


@pytest.mark.parametrize("model,shape", [
    (TwoLevelUNet(), (1, 16, 16)),
    (StrideThenTranspose(4, 1), (1, 16, 16)),
    (PixelShuffleNet(), (1, 16, 16)),
    (UpsampleNet("bilinear"), (1, 16, 16)),
])
def test_probe_support_inside_field(model, shape):
    tr, rf = _field(model, shape)
    for px in [(8, 8), (7, 9)]:  # both phases of the period-2 nets
        pr = probe_receptive_field(tr, rf, n_inputs=3, seed=2, pixel=px)
        assert pr.inside, (px, pr)


def test_probe_through_an_exported_graph():
    from toy_models import ShapeBranchNet

    tr, rf = _field(ShapeBranchNet(), (1, 7, 7))
    assert tr.tracer == "torch.export" and rf.size("H") == 3
    pr = probe_receptive_field(tr, rf, n_inputs=2)
    assert pr.inside and pr.fill == 1.0 and pr.support == {"H": (2, 4), "W": (2, 4)}


def test_even_kernel_same_padding_is_asymmetric():
    # k4 'same': taps -1..+2 -> extent (-1, 2), size 4; probe agrees exactly.
    class Even(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(1, 1, 4, padding="same")

        def forward(self, x, t, label=None):
            return self.c(x)

    tr, rf = _field(Even(), (1, 9, 9))
    assert rf.axes[0].extent == (-1, 2) and rf.size("H") == 4
    pr = probe_receptive_field(tr, rf)
    assert pr.support == pr.predicted == {"H": (3, 6), "W": (3, 6)}


# -- real models -----------------------------------------------------------------------------
def test_paper_resnet_field_17():
    from els_audit.models.zoo import PaperResNet

    # conv3 up + 6 residual conv3 + conv3 down: 1 + 2 * 8 = 17 (docs/theory.md section 3)
    tr, rf = _field(PaperResNet(width=4, time_dim=8), (1, 24, 24))
    assert rf.size("H") == 17 and rf.size("W") == 17 and not rf.is_global
    pr = probe_receptive_field(tr, rf, n_inputs=2)
    assert pr.inside and pr.fill == 1.0


def test_paper_unet_matches_brute_force_phases():
    from els_audit.models.zoo import PaperUNet

    # Ground truth by brute force: the gradient support of output pixels in all 4 phases
    # of the period-4 pattern on a 56 px image (reach 24 < 27: away from the borders).
    tr, rf = _field(PaperUNet(base=2, levels=2, time_dim=8), (1, 56, 56))
    assert rf.axes[0].period == 4 and rf.size("H") == 48
    for px in range(27, 31):
        pr = probe_receptive_field(tr, rf, n_inputs=3, seed=3, pixel=(px, 28))
        assert pr.inside and pr.support["H"] == pr.predicted["H"], (px, pr)


def test_attention_unet_global_kinds():
    from els_audit.models.zoo import AttentionUNet

    _, rf = _field(AttentionUNet(base=4, channel_mults=(1, 2), time_dim=8), (1, 8, 8))
    assert rf.is_global and not rf.partial
    assert {g.kind for g in rf.global_paths} == {"norm", "einsum", "softmax"} or \
        {g.kind for g in rf.global_paths} >= {"norm", "einsum"}


def test_diffusers_unet_global_kinds():
    m = tiny_diffusers_unet(8)
    tr = trace_model(m, (torch.randn(2, 1, 8, 8), torch.tensor([10, 500])), {"return_dict": False})
    rf = receptive_field(tr)
    assert rf.is_global and not rf.partial
    assert {g.kind for g in rf.global_paths} == {"norm", "attention"}
    json.dumps(rf.to_dict(), allow_nan=False)
