"""Prediction against networks whose samples are known by construction.

Ground truth: a network that IS the fitted machine gives the machine's sample exactly (r =
R^2 = 1 to float precision); a network that IS the IS machine gives the IS sample exactly.
The final DDIM step lands on the machine's E[x0 | x_{1/T}] = sum_j w_j centre_j, so every
pixel of the machine's sample lies within (1 - w_max) * (data range) of its winning source
pixel: a provable link between the mosaic diagnostics and the sample.
"""

import json

import numpy as np
import pytest
import torch

from els_audit.machines import build_machine, scale_schedule_eps
from els_audit.metrics import pearson_r, r_squared
from els_audit.predict import predict_samples
from els_audit.sampler import initial_noise

STEPS = 5
SCALES = (3, 5, 3, 7, 5)




def data(N=12, H=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, 1, H, H, generator=g, dtype=torch.float64) * 2 - 1


@pytest.fixture(scope="module")
def machines():
    imgs = data()
    return imgs, build_machine("ELS", imgs), build_machine("IS", imgs)


def test_els_network_is_predicted_exactly(machines):
    imgs, els, is_m = machines
    net = scale_schedule_eps(els, SCALES, STEPS)
    res = predict_samples(net, els, SCALES, seeds=[10, 11, 12], steps=STEPS, is_machine=is_m)
    np.testing.assert_allclose(res.machine_samples, res.network, atol=1e-12)
    for p in res.per_seed:
        assert p.r == pytest.approx(1.0, abs=1e-12) and p.r2 == pytest.approx(1.0, abs=1e-12)
        assert p.is_r < 0.99 and p.beats_is is True
    assert res.median_r == pytest.approx(1.0, abs=1e-12) and res.win_rate == 1.0
    # the per-seed numbers are the metrics of the kept arrays
    for i, p in enumerate(res.per_seed):
        assert p.is_r == pearson_r(res.is_samples[i], res.network[i])
        assert p.is_r2 == r_squared(res.is_samples[i], res.network[i])
    assert res.is_median_r == pytest.approx(float(np.median([p.is_r for p in res.per_seed])), abs=0)
    np.testing.assert_array_equal(res.x_T, initial_noise([10, 11, 12], (1, 8, 8), dtype=torch.float64).numpy())


def test_is_network_is_the_is_sample(machines):
    imgs, els, is_m = machines
    res = predict_samples(is_m.eps, els, SCALES, seeds=[1, 2], steps=STEPS, is_machine=is_m)
    np.testing.assert_allclose(res.is_samples, res.network, atol=1e-12)
    assert all(p.is_r == pytest.approx(1.0, abs=1e-12) and p.r < 1 - 1e-6 for p in res.per_seed)
    assert res.win_rate == 0.0


def test_mosaic_diagnostics_explain_the_machine_sample(machines):
    imgs, els, is_m = machines
    scales = (3,) * 10                  # last step at t = 0.1: a sharp softmax
    net = scale_schedule_eps(els, scales, 10)
    res = predict_samples(net, els, scales, seeds=[3, 4], steps=10, is_machine=is_m)
    d = res.diagnostics
    assert set(d) == {"source_image", "source_y", "source_x", "weight", "multiplicity", "entropy"}
    assert d["source_image"].shape == (2, 8, 8)
    centre = imgs.numpy()[d["source_image"], 0, d["source_y"], d["source_x"]]          # (B, H, W)
    # |sum_j w_j c_j - c_win| = |sum_{j != win} w_j (c_j - c_win)| <= (1 - w_win) * range
    rng = float(imgs.max() - imgs.min())
    err = np.abs(res.machine_samples[:, 0] - centre)
    assert np.all(err <= (1 - d["weight"]) * rng + 1e-9)
    assert np.median(d["weight"]) > 0.9   # the bound is not vacuous
    # computing the diagnostics in the last step's pass does not change the sample
    plain = predict_samples(net, els, scales, seeds=[3, 4], steps=10, is_machine=is_m, diagnostics_at_end=False)
    assert plain.diagnostics is None
    np.testing.assert_allclose(plain.machine_samples, res.machine_samples, atol=1e-12)


def test_a_seed_does_not_depend_on_its_batch(machines):
    imgs, els, is_m = machines
    net = lambda x, t, lab: 0.9 * els.eps(x, t, k=5)                                    # noqa: E731
    both = predict_samples(net, els, SCALES, seeds=[20, 21], steps=STEPS, is_machine=is_m)
    one = predict_samples(net, els, SCALES, seeds=[21], steps=STEPS, is_machine=is_m)
    for a, b in ((both.network, one.network), (both.machine_samples, one.machine_samples),
                 (both.is_samples, one.is_samples)):
        np.testing.assert_allclose(a[1:], b, atol=1e-12)
    assert both.per_seed[1].r == pytest.approx(one.per_seed[0].r, abs=1e-12)


def test_progress_reports_every_step_of_every_sampler(machines):
    imgs, els, is_m = machines
    seen = []
    predict_samples(is_m.eps, els, SCALES, seeds=[1], steps=STEPS, is_machine=is_m,
                    progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert seen == [(s, i, STEPS) for s in ("network", "machine", "IS") for i in range(1, STEPS + 1)]


def test_conditional_and_json(machines):
    imgs, _, _ = machines
    labels = torch.tensor([0, 1] * 6)
    els = build_machine("bbELS", imgs, labels)
    is_m = build_machine("IS", imgs, labels)
    net = scale_schedule_eps(els, SCALES, STEPS)
    res = predict_samples(net, els, SCALES, seeds=[5, 6, 7], steps=STEPS, is_machine=is_m, label=[1, 0, 1])
    assert res.labels == (1, 0, 1)
    assert all(p.r == pytest.approx(1.0, abs=1e-12) for p in res.per_seed)
    src = res.diagnostics["source_image"]       # the conditional machine's mosaic map
    d = json.loads(json.dumps(res.to_dict()))
    for key in ("median_r", "median_r2", "is_median_r", "is_median_r2", "win_rate", "seeds", "scales"):
        assert key in d
    assert d["seeds"][0] == {"seed": 5, "label": 1, "r": d["seeds"][0]["r"], "r2": d["seeds"][0]["r2"],
                             "is_r": d["seeds"][0]["is_r"], "is_r2": d["seeds"][0]["is_r2"], "beats_is": True}
    assert (labels[torch.from_numpy(src[0].ravel())] == 1).all()      # seed 5 (label 1) draws on class 1 only
    arr = res.arrays()
    assert {"seeds", "x_T", "network", "machine", "is", "labels", "mosaic_source_image"} <= set(arr)
    assert "network" not in d and all(isinstance(v, np.ndarray) for v in arr.values())


def test_bad_input(machines):
    imgs, els, is_m = machines
    net = scale_schedule_eps(els, SCALES, STEPS)
    with pytest.raises(ValueError, match="one scale per step"):
        predict_samples(net, els, SCALES[:3], seeds=[1], steps=STEPS, is_machine=is_m)
    with pytest.raises(ValueError, match="odd"):
        predict_samples(net, els, (3.5,) * STEPS, seeds=[1], steps=STEPS, is_machine=is_m)
    with pytest.raises(ValueError, match="is_machine must be an IS"):
        predict_samples(net, els, SCALES, seeds=[1], steps=STEPS, is_machine=els)
    with pytest.raises(ValueError, match="fitted local machine"):
        predict_samples(net, is_m, SCALES, seeds=[1], steps=STEPS, is_machine=is_m)
    small = build_machine("IS", data(H=6))
    with pytest.raises(ValueError, match="same data"):
        predict_samples(net, els, SCALES, seeds=[1], steps=STEPS, is_machine=small)
    with pytest.raises(ValueError, match="returned NaN"):
        predict_samples(lambda x, t, lab: x * float("nan"), els, SCALES, seeds=[1], steps=STEPS, is_machine=is_m)
