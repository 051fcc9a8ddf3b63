"""The banded machine (separate scales for the border band and the interior): against the
brute-force loops, and its calibration recovering the pair of a network that IS a banded
machine."""

import numpy as np
import torch

from els_audit import get_schedule
from els_audit.calibrate import calibrate_scales
from els_audit.machines import build_machine
from els_audit.machines.banded import band_mask, banded_schedule_eps, banded_score
from els_audit.predict import predict_samples

from .brute_force import brute_score

SCHED = get_schedule("cosine-legacy")


def test_band_mask_is_the_pixels_within_half_a_window_of_an_edge():
    m = band_mask(6, 7, 5)
    assert m.shape == (6, 7)
    assert not m[2:4, 2:5].any() and int(m.sum()) == 6 * 7 - 2 * 3
    assert not band_mask(4, 4, 1).any() and bool(band_mask(4, 4, 9).all())


def test_banded_score_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(3, 1, 7, 7, generator=g, dtype=torch.float64) * 2 - 1
    x = torch.randn(2, 1, 7, 7, generator=g, dtype=torch.float64)
    t = 0.4
    a, b = (float(v) for v in SCHED.alpha_sigma(t))
    m = build_machine("bbELS", imgs)
    for k, kb in ((5, 3), (3, 5), (5, 5)):
        want_in = brute_score("bbELS", imgs, x, [(a, b)] * 2, k=k)
        want_band = brute_score("bbELS", imgs, x, [(a, b)] * 2, k=kb)
        want = torch.where(band_mask(7, 7, k), want_band, want_in)
        got = banded_score(m, x, t, k, kb)
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), (k, kb)
        s, diag = banded_score(m, x, t, k, kb, diagnostics=True)
        assert torch.allclose(s, want, rtol=1e-9, atol=1e-9)
        _, d_band = m.score(x, t, k=kb, diagnostics=True)
        _, d_in = m.score(x, t, k=k, diagnostics=True)
        band = band_mask(7, 7, k)
        assert torch.equal(diag.source_image[:, band], d_band.source_image[:, band])
        assert torch.equal(diag.source_image[:, ~band], d_in.source_image[:, ~band])
        assert torch.equal(diag.entropy[:, ~band], d_in.entropy[:, ~band])


def _toy():
    g = torch.Generator().manual_seed(2)
    imgs = (torch.rand(6, 1, 8, 8, generator=g) > 0.5).double() * 2 - 1
    return imgs


def test_calibration_recovers_a_banded_network():
    imgs = _toy()
    m = build_machine("bbELS", imgs)
    steps = 4
    scales, band = (3, 5, 5, 7), (5, 3, 7, 3)
    net = banded_schedule_eps(m, scales, band, steps)
    res = calibrate_scales(net, m, seeds=[1, 2, 3], steps=steps, candidates=(3, 5, 7), border_band=True)
    assert res.scales == scales and res.band_scales == band
    assert res.band_agreement == (1.0,) * steps
    d = res.to_dict()
    assert d["band_scales"] == list(band)
    assert res.band_per_seed_best.tolist() == [[k] * 3 for k in band]
    assert res.per_seed_best.tolist() == [[k] * 3 for k in scales]       # the interior's votes, from the pairs
    # without the band, the square calibration cannot express the network
    plain = calibrate_scales(net, m, seeds=[1, 2, 3], steps=steps, candidates=(3, 5, 7))
    assert plain.band_scales is None and plain.band_per_seed_best is None
    square = predict_samples(net, m, plain.scales, seeds=[7, 8], steps=steps, is_machine=build_machine("IS", imgs))
    assert np.all(square.r < 1 - 1e-6)
    pred = predict_samples(net, m, res.scales, seeds=[7, 8], steps=steps, is_machine=build_machine("IS", imgs),
                           band_scales=res.band_scales)
    assert np.allclose(pred.r, 1.0, atol=1e-9) and pred.to_dict()["band_scales"] == list(band)


def test_border_band_needs_the_x0_criterion():
    imgs = _toy()
    m = build_machine("bbELS", imgs)
    import pytest
    with pytest.raises(ValueError, match="x0 criterion"):
        calibrate_scales(lambda x, t, lab: x, m, seeds=[1], steps=2, border_band=True, criterion="cosine")
