"""Calibration against networks whose true scales are known by construction.

Ground truth:
- a "network" that IS the ELS machine run with a per-step schedule of patch sizes gives,
  at its own x_t, exactly the candidate machine with the same k (criterion 0 for x0, 1 for
  cosine, up to float64 rounding), so calibration must return that schedule, index for
  index.  The schedule is non-monotone, so applying a scale one step off would be caught.
- the IS machine equals LS and bbELS at k >= 2 max(H, W) - 1 (every window covers the whole
  image and, for bbELS, every pixel has its own padding pattern), so an IS network must be
  calibrated to that k at every step when it is a candidate.
"""

import json
import math

import numpy as np
import pytest
import torch

from els_audit.calibrate import _round_to_candidate, calibrate_scales, candidates_near, default_candidates
from els_audit.machines import build_machine, scale_schedule_eps

STEPS = 6
TRUE = (3, 5, 3, 7, 5, 7)          # index 0 = least noise (t = 1/6)


def data(N=12, H=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, 1, H, H, generator=g, dtype=torch.float64) * 2 - 1




@pytest.fixture(scope="module")
def els():
    return build_machine("ELS", data())


@pytest.mark.parametrize("criterion", ["x0", "cosine"])
def test_recovers_the_schedule_of_an_els_network(els, criterion):
    net = scale_schedule_eps(els, TRUE, STEPS)
    res = calibrate_scales(net, els, seeds=[1, 2, 3], steps=STEPS, candidates=(3, 5, 7), criterion=criterion)
    assert res.scales == TRUE
    assert res.agreement == (1.0,) * STEPS
    assert res.candidates == (3, 5, 7) and res.times == tuple(j / 6 for j in range(1, 7))
    col = {k: i for i, k in enumerate(res.candidates)}
    for j, k in enumerate(TRUE):
        v = res.values[j]
        if criterion == "x0":
            # the true k reproduces the network's x0 to rounding; the others do not
            assert v[col[k]] < 1e-20
            assert min(v[c] for kk, c in col.items() if kk != k) > 1e-10
        else:
            assert v[col[k]] == pytest.approx(1.0, abs=1e-12)
            # NB: at t = 1 the wrong candidates' cosines are within ~1e-10 of 1 (the shared
            # -x/b^2 term), still far above float64 rounding (~1e-16)
            assert max(v[c] for kk, c in col.items() if kk != k) < 1 - 1e-13
    assert res.per_seed_best.shape == (STEPS, 3) and (res.per_seed_best == np.array(TRUE)[:, None]).all()


def test_cosine_is_nearly_blind_at_t1_and_x0_is_not(els):
    # docs/theory.md section 3: at t = 1 the shared -x/b^2 term makes every candidate's score
    # nearly parallel to the network's.  Measured here, not assumed: the worst wrong
    # candidate's cosine deficit is tiny while its x0 MSE relative to the true one is huge.
    net = scale_schedule_eps(els, TRUE, STEPS)
    cos = calibrate_scales(net, els, seeds=[1, 2], steps=STEPS, candidates=(3, 5, 7), criterion="cosine")
    x0 = calibrate_scales(net, els, seeds=[1, 2], steps=STEPS, candidates=(3, 5, 7), criterion="x0")
    j = STEPS - 1                        # t = 1
    wrong = [i for i, k in enumerate(cos.candidates) if k != TRUE[j]]
    assert max(1 - cos.values[j, i] for i in wrong) < 1e-4
    right = cos.candidates.index(TRUE[j])
    assert min(x0.values[j, i] for i in wrong) > 1e10 * x0.values[j, right]


@pytest.mark.parametrize("kind", ["LS", "bbELS"])
def test_is_network_is_calibrated_to_the_whole_image_window(kind):
    imgs = data(N=10, H=5)
    is_m = build_machine("IS", imgs)
    m = build_machine(kind, imgs)
    # k = 2*5 - 1 = 9 covers the whole 5x5 image from every pixel: the machine equals IS
    res = calibrate_scales(is_m.eps, m, seeds=[4, 5], steps=5, candidates=(3, 5, 9))
    assert res.scales == (9,) * 5
    assert np.all(res.values[:, 2] < 1e-20) and np.all(res.values[:, :2] > 1e-10)


def test_conditional_network(els):
    imgs = data()
    labels = torch.tensor([0, 1] * 6)
    m = build_machine("ELS", imgs, labels)
    net = scale_schedule_eps(m, TRUE, STEPS)
    res = calibrate_scales(net, m, seeds=[1, 2, 3], steps=STEPS, candidates=(3, 5, 7), label=[0, 1, 1])
    assert res.scales == TRUE and res.labels == (0, 1, 1)
    with pytest.raises(ValueError, match="without labels"):
        calibrate_scales(net, els, seeds=[1], steps=STEPS, candidates=(3,), label=0)


def test_per_step_candidates_near_a_prediction(els):
    net = scale_schedule_eps(els, TRUE, STEPS)
    predicted = (3, 3, 5, 5, 7, 7)
    cands = candidates_near(predicted, spread=1, k_max=9)
    assert cands[0] == (1, 3, 5) and cands[5] == (5, 7, 9)
    res = calibrate_scales(net, els, seeds=[7], steps=STEPS, candidates=cands)
    assert res.scales == TRUE
    assert res.candidates == (1, 3, 5, 7, 9)
    # k = 9 was not tried at step 0: nan in the array, null in the JSON
    assert math.isnan(res.values[0, 4])
    d = json.loads(json.dumps(res.to_dict()))
    assert d["values"][0][4] is None and d["scales"] == list(TRUE) and d["criterion"] == "x0"
    assert d["convention"].startswith("scales[j] is applied at t = (j+1)/steps")


def test_one_machine_sweep_per_step_with_all_seeds_and_candidates(els):
    calls = []
    real = els.denoised_sweep

    def counting(x, t, ks, label=None):
        calls.append((x.shape[0], tuple(ks)))
        return real(x, t, ks, label=label)

    els.denoised_sweep = counting
    try:
        net = scale_schedule_eps(els, TRUE, STEPS)
        calibrate_scales(net, els, seeds=[1, 2, 3, 4], steps=STEPS, candidates=(3, 7))
    finally:
        del els.denoised_sweep
    assert calls == [(4, (3, 7))] * STEPS


def test_progress(els):
    seen = []
    calibrate_scales(scale_schedule_eps(els, (3, 3, 3), 3), els, seeds=[1], steps=3, candidates=(3,),
                     progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert seen == [("calibrate", 1, 3), ("calibrate", 2, 3), ("calibrate", 3, 3)]


def test_median_rounding_to_a_candidate():
    # seeds voted 3 and 5 -> median 4 -> tie between 3 and 5 -> the smaller (more local)
    assert _round_to_candidate(4.0, (3, 5, 7)) == 3
    assert _round_to_candidate(6.0, (3, 5, 9)) == 5
    assert _round_to_candidate(8.0, (3, 5, 9)) == 9
    assert default_candidates((1, 8, 8)) == (3, 5, 7) and default_candidates((3, 5, 9)) == (3, 5, 7, 9)


def test_seeded_and_reproducible(els):
    net = scale_schedule_eps(els, (5,) * STEPS, STEPS)
    noisy = lambda x, t, lab: net(x, t, lab) + 0.05 * torch.sin(7 * x)       # noqa: E731 a network that is no machine
    a = calibrate_scales(noisy, els, seeds=[3, 1], steps=STEPS, candidates=(3, 5, 7))
    b = calibrate_scales(noisy, els, seeds=[3, 1], steps=STEPS, candidates=(3, 5, 7))
    assert a.scales == b.scales and np.array_equal(a.per_seed_values, b.per_seed_values)


def test_bad_input(els):
    net = scale_schedule_eps(els, TRUE, STEPS)
    is_m = build_machine("IS", data())
    with pytest.raises(ValueError, match="no patch size"):
        calibrate_scales(net, is_m, seeds=[1], steps=STEPS)
    with pytest.raises(ValueError, match="criterion"):
        calibrate_scales(net, els, seeds=[1], steps=STEPS, criterion="l2")
    with pytest.raises(ValueError, match="odd"):
        calibrate_scales(net, els, seeds=[1], steps=STEPS, candidates=(3, 4))
    with pytest.raises(ValueError, match="one sequence per step"):
        calibrate_scales(net, els, seeds=[1], steps=STEPS, candidates=((3,), (5,)))
    with pytest.raises(ValueError, match="differs from the machine"):
        calibrate_scales(net, els, seeds=[1], steps=STEPS, schedule="linear")
    with pytest.raises(ValueError, match="distinct"):
        calibrate_scales(net, els, seeds=[1, 1], steps=STEPS)
    with pytest.raises(ValueError, match="NaN"):
        calibrate_scales(lambda x, t, lab: x * math.nan, els, seeds=[1], steps=STEPS, candidates=(3,))


# ---------------------------------------------------------------------------------------
# the zoo: the fast calibration (nested sweeps, fused native kernels, float32 with the
# float64 refinement) chooses what an exhaustive one does (every candidate by its own call)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kind,dictionary", [("resnet-zeros", "bbELS", "periodic"),
                                                  ("resnet-circular", "ELS", "periodic"),
                                                  ("resnet-circular", "ELS", "valid"),
                                                  ("unet-zeros", "bbELS", "periodic")])
def test_zoo_calibration_chooses_what_the_exhaustive_search_does(name, kind, dictionary):
    from els_audit.data import load_dataset
    from els_audit.models import load_model, make_denoiser

    den = make_denoiser(load_model(f"zoo:{name}"), check=False)
    imgs = load_dataset("mnist5k:size=32:limit=60").images                   # class-balanced sample

    def net(x, t, label=None):
        with torch.no_grad():
            return den.eps(x, t, label)

    cands = (3, 5, 7, 9, 11)
    kw = dict(seeds=[10_000, 10_001, 10_002], steps=6, candidates=cands, schedule=den.schedule)
    fast_machine = build_machine(kind, imgs, schedule=den.schedule, dictionary=dictionary)
    assert fast_machine._nests(cands)                                        # one nested pass per step
    fast = calibrate_scales(net, fast_machine, **kw)
    slow = build_machine(kind, imgs, schedule=den.schedule, dictionary=dictionary)
    slow.denoised_sweep = lambda x, t, ks, label=None: {k: slow.denoised(x, t, k=k, label=label) for k in ks}
    slow.prepare_sweep = lambda ks, label=None: None
    exhaustive = calibrate_scales(net, slow, **kw)
    assert fast.scales == exhaustive.scales
    assert np.array_equal(fast.per_seed_best, exhaustive.per_seed_best)
    assert np.allclose(fast.per_seed_values, exhaustive.per_seed_values, rtol=1e-4, atol=1e-7)
    assert len(set(fast.scales)) > 1                                          # a schedule, not one size
