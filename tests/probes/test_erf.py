"""Stage 4 (effective receptive field): analytic kernels of a linear conv chain,
hand-derived ERF sides, backends, clamping, determinism, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from els_audit.probes import effective_receptive_field, erf_side

from toy_models import ConvStack, eps_of, linear_chain


def test_erf_side_by_hand():
    m = np.zeros((7, 7))
    m[3, 3] = 1.0          # distance 0 from the centre
    m[3, 5] = 1.0          # distance 2
    m[0, 0] = 2.0          # distance 3
    # masses by radius: r0 = 1, r2 = 1, r3 = 2 (total 4): 25 % at side 1, 50 % at side 5
    assert erf_side(m, (3, 3), 0.25) == 1
    assert erf_side(m, (3, 3), 0.5) == 5
    assert erf_side(m, (3, 3), 0.51) == 7
    assert erf_side(m, (3, 3), 1.0) == 7
    # from the corner (0, 0): r0 = 2 (50 %), (3, 3) at r3, (3, 5) at r5
    assert erf_side(m, (0, 0), 0.5) == 1 and erf_side(m, (0, 0), 0.9) == 11
    assert erf_side(np.zeros((3, 3)), (1, 1), 0.5) == 1
    with pytest.raises(ValueError, match="q must be"):
        erf_side(m, (3, 3), 0.0)


def test_linear_chain_matches_analytic_kernel():
    # Two zero-padded convs with kernel outer(k, k), k = [1, 2, 1].  In the interior the
    # Jacobian of out[p] is the full convolution outer(b, b), b = [1, 4, 6, 4, 1] (sum 16,
    # mass 256).  Zero padding at the border: 1-d, out[0] = 2 y[0] + y[1] with
    # y[0] = 2 x0 + x1 (x_-1 = 0) and y[1] = x0 + 2 x1 + x2, so out[0] = 5 x0 + 4 x1 + x2:
    # the corner Jacobian is outer([5, 4, 1], [5, 4, 1]) (mass 100), the left-edge one
    # outer(b, [5, 4, 1]) (mass 160).
    net = linear_chain(2)
    res = effective_receptive_field(eps_of(net), (1, 9, 9), steps=2, n_samples=2, seed=0)
    maps = res.arrays()["erf_maps"]                                            # (T, P, H, W)
    b = np.array([1, 4, 6, 4, 1.0])
    e = np.array([5, 4, 1.0])
    centre = np.zeros((9, 9))
    centre[2:7, 2:7] = np.outer(b, b) / 256
    edge = np.zeros((9, 9))
    edge[2:7, 0:3] = np.outer(b, e) / 160
    corner = np.zeros((9, 9))
    corner[0:3, 0:3] = np.outer(e, e) / 100
    for ti in range(2):  # a linear net: the same at every t
        np.testing.assert_allclose(maps[ti, 0], centre, atol=1e-6)
        np.testing.assert_allclose(maps[ti, 1], edge, atol=1e-6)
        np.testing.assert_allclose(maps[ti, 2], corner, atol=1e-6)
    assert res.gradient_mass["centre"] == pytest.approx((256.0, 256.0))
    assert res.gradient_mass["corner"] == pytest.approx((100.0, 100.0))
    # centre: side 1 holds 36/256 = 14 %, side 3 holds 14^2/256 = 77 %, side 5 all of it
    assert res.erf50["centre"] == (3, 3) and res.erf90["centre"] == (5, 5) and res.erf99["centre"] == (5, 5)
    # corner: side 1 holds 25 %, side 3 holds 81 %, side 5 all
    assert res.erf50["corner"] == (3, 3) and res.erf90["corner"] == (5, 5)
    # edge (4, 0): side 1 holds 6*5/160 = 19 %, side 3 holds 14*9/160 = 79 %, side 5 all
    assert res.erf50["edge"] == (3, 3) and res.erf90["edge"] == (5, 5)
    assert res.predicted_patch == (5, 5)
    assert res.times == (1.0, 0.5)
    json.dumps(res.to_dict(), allow_nan=False)


def test_x0_map_removes_the_identity_term():
    # One conv with kernel outer([1, 2, 1], [1, 2, 1]): J_eps at the centre is 4, the four
    # edge neighbours 2, the four corners 1 (mass 16).  With b_t = 1/4 the x0_hat Jacobian
    # (times a_t) is |1 - b J| = |1 - 4/4| = 0 on the diagonal and b |J| off it:
    # edges 4 * 2/4 = 2, corners 4 * 1/4 = 1 -> mass 3: edge 1/6 each, corner 1/12 each.
    class Quarter:
        name = "b=1/4"

        def alpha_sigma(self, t):
            return torch.tensor((1 - 1 / 16) ** 0.5), torch.tensor(0.25)

    res = effective_receptive_field(eps_of(linear_chain(1)), (1, 7, 7), steps=1, n_samples=2,
                                    schedule=Quarter(), pixels={"centre": (3, 3)})
    x0 = res.arrays()["x0_erf_maps"][0, 0]
    expect = np.zeros((7, 7))
    expect[2:5, 2:5] = [[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]]
    np.testing.assert_allclose(x0, expect, atol=1e-7)
    # the eps map keeps the centre: 4/16
    assert res.maps[0, 0, 3, 3] == pytest.approx(0.25)
    assert res.x0_erf50["centre"] == (3,) and res.erf50["centre"] == (3,)
    assert "x0_hat" in res.patch_rule
    res_eps = effective_receptive_field(eps_of(linear_chain(1)), (1, 7, 7), steps=1, n_samples=1,
                                        schedule=Quarter(), patch_from="eps")
    assert "d eps[centre]" in res_eps.patch_rule


def test_predicted_patch_is_clamped():
    # 3 layers reach 3 px: on a 6x6 image the centre (3, 3) has mass at row 0 (distance 3),
    # so ERF100 = 7 > the largest odd size that fits (5) -> clamped to 5.
    res = effective_receptive_field(eps_of(linear_chain(3)), (1, 6, 6), steps=1, n_samples=1, els_mass=1.0,
                                    patch_from="eps")
    assert res.erf99["centre"][0] == 7 and res.predicted_patch == (5,)
    assert "clamped to [3, 5]" in res.patch_rule
    # an identity-like 1x1 net has ERF 1 -> raised to min_patch
    one = linear_chain(1, kernel_1d=(1.0,))
    res = effective_receptive_field(eps_of(one), (1, 6, 6), steps=1, n_samples=1, patch_from="eps")
    assert res.erf90["centre"] == (1,) and res.predicted_patch == (3,)
    res = effective_receptive_field(eps_of(one), (1, 6, 6), steps=1, n_samples=1, min_patch=1, patch_from="eps")
    assert res.predicted_patch == (1,)


def test_backends_agree_and_runs_are_deterministic():
    torch.manual_seed(0)
    m = ConvStack(3, channels=3).eval()
    kw = dict(steps=3, n_samples=3, seed=7)
    a = effective_receptive_field(eps_of(m), (1, 8, 8), backend="autograd", **kw)
    b = effective_receptive_field(eps_of(m), (1, 8, 8), backend="captum", **kw)
    np.testing.assert_allclose(a.maps, b.maps, atol=1e-6)
    np.testing.assert_allclose(a.x0_maps, b.x0_maps, atol=1e-6)
    assert a.erf90 == b.erf90 and a.x0_erf90 == b.x0_erf90
    c = effective_receptive_field(eps_of(m), (1, 8, 8), backend="autograd", **kw)
    assert a.to_dict() == c.to_dict() and np.array_equal(a.maps, c.maps)


def test_multichannel_sums_over_output_channels():
    # out = conv with 2 output channels of weights w0 = 1 at the centre tap, w1 = 2 at the
    # right tap, 1 input channel: sum_c |d out[c, p]/dx| = 1 at p and 2 at p + (0, 1).
    conv = torch.nn.Conv2d(2, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0
        conv.weight[1, 0, 1, 2] = 2.0
    res = effective_receptive_field(lambda x, t, l: conv(x), (2, 7, 7), steps=1, n_samples=1,
                                    pixels={"centre": (3, 3)})
    m = res.maps[0, 0]
    assert m[3, 3] == pytest.approx(1 / 3) and m[3, 4] == pytest.approx(2 / 3)
    assert res.gradient_mass["centre"] == (pytest.approx(3.0),)


def test_data_and_labels_are_used():
    seen = {}

    def eps(x, t, label):
        seen["label"] = label
        seen["x"] = x.detach().clone()
        return x * 1.0

    class NoNoise:  # a_t = 1, b_t = 0: x_t is the training image itself
        name = "no-noise"

        def alpha_sigma(self, t):
            return torch.tensor(1.0), torch.tensor(0.0)

    data = torch.full((2, 1, 5, 5), 0.5)
    effective_receptive_field(eps, (1, 5, 5), steps=2, n_samples=2, data=data, label=3, schedule=NoNoise())
    assert seen["label"].tolist() == [3, 3]
    assert torch.all(seen["x"] == 0.5)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        effective_receptive_field(eps, (1, 5, 5), data=data * 4)
    with pytest.raises(ValueError, match="data must be"):
        effective_receptive_field(eps, (1, 5, 5), data=torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="backend"):
        effective_receptive_field(eps, (1, 5, 5), backend="jax")
    with pytest.raises(ValueError, match="outside"):
        effective_receptive_field(eps, (1, 5, 5), pixels={"p": (9, 9)})
    with pytest.raises(ValueError, match="label"):
        effective_receptive_field(eps, (1, 5, 5), n_samples=2, label=torch.tensor([1, 2, 3]))


def test_paper_unet_erf_runs_and_is_json_safe():
    from els_audit.models.zoo import PaperUNet

    torch.manual_seed(0)
    m = PaperUNet(base=4, levels=1, time_dim=8).eval()
    res = effective_receptive_field(eps_of(m), (1, 8, 8), steps=2, n_samples=2)
    assert len(res.predicted_patch) == 2 and all(k % 2 == 1 and 3 <= k <= 7 for k in res.predicted_patch)
    assert all(res.erf50[p][i] <= res.erf90[p][i] <= res.erf99[p][i] for p in res.pixels for i in range(2))
    json.dumps(res.to_dict(), allow_nan=False)


def test_erf_side_on_the_torus_by_hand():
    m = np.zeros((8, 8))
    m[0, 0] = 1.0
    m[7, 7] = 1.0           # next to the corner on the torus, 7 away on the plane
    m[0, 1] = 2.0
    assert erf_side(m, (0, 0), 1.0) == 15 and erf_side(m, (0, 0), 1.0, wrap=True) == 3
    assert erf_side(m, (0, 0), 0.75, wrap=False) == 3 and erf_side(m, (0, 0), 0.75, wrap=True) == 3


def test_circular_stack_is_measured_on_the_torus():
    # 4 circular convs with kernel outer(k, k), k = [1, 2, 1]: a linear map whose field is 9 px
    # wide everywhere on the torus (at the corner too); on the plane the corner's mass would
    # seem to spread over the whole 32 px image.
    k = torch.tensor([1.0, 2.0, 1.0])
    convs = [nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular", bias=False) for _ in range(4)]
    for c in convs:
        with torch.no_grad():
            c.weight.copy_(torch.outer(k, k)[None, None])
    seq = nn.Sequential(*convs)
    eps = lambda x, t, label: seq(x)  # noqa: E731
    torus = effective_receptive_field(eps, (1, 32, 32), steps=1, n_samples=1, wrap=True)
    plane = effective_receptive_field(eps, (1, 32, 32), steps=1, n_samples=1)
    for name in ("centre", "edge", "corner"):
        assert torus.erf99[name] == torus.erf99["centre"] and torus.erf99[name][0] <= 9
    assert plane.erf99["corner"][0] > 50    # the wrapped mass sits 31 px away on the plane
    assert torus.geometry == "torus" and torus.to_dict()["geometry"] == "torus" and plane.geometry == "plane"


def test_on_grid_reads_a_coarser_grid_at_its_own_times():
    # a 4-step grid holds the 2-step grid's times (1.0 and 0.5): its entries are those steps'
    res = effective_receptive_field(eps_of(linear_chain(2)), (1, 9, 9), steps=4, n_samples=1, seed=0)
    two = res.on_grid(2)
    assert two.times == (res.times[0], res.times[2]) == (1.0, 0.5)
    assert two.predicted_patch == (res.predicted_patch[0], res.predicted_patch[2])
    for name in ("erf50", "erf90", "erf99", "x0_erf90", "gradient_mass"):
        for px, per_step in getattr(two, name).items():
            assert per_step == (getattr(res, name)[px][0], getattr(res, name)[px][2])
    np.testing.assert_array_equal(two.arrays()["erf_maps"], res.arrays()["erf_maps"][[0, 2]])
    assert res.on_grid(4) is res
    with pytest.raises(ValueError, match="must divide 4"):
        res.on_grid(3)
