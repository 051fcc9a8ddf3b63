"""The cost model: its arithmetic against a hand-written sum, and the probe on real data."""

import math

import numpy as np
import pytest
import torch

from els_audit.calibrate import candidates_near
from els_audit.data import load_dataset
from els_audit.planning import Settings, Throughput, grid_scales, predict_costs, probe_throughput
from els_audit.planning.cost import Work, build_work, pair_fraction

ANCHORS = (0.1, 0.35, 0.65, 0.95)


def _tp(**kw):
    base = dict(kind="bbELS", dictionary="periodic", n_probe=100, n_small=12, anchors=ANCHORS, sweep_unit=(4e-6, 2e-6, 1e-6, 1e-6),
                sweep_fixed=(0.5, 0.2, 0.1, 0.1), single_unit=(2e-6, 1e-6, 5e-7, 5e-7),
                single_fixed=(0.2, 0.1, 0.05, 0.05), diag_unit=3e-6, diag_fixed=0.3, tree_unit=1e-5,
                tree_fixed=1.0, dict_unit=2e-5, dict_fixed=0.1, is_unit=1e-6, net_unit=0.01, nn_unit=1e-7,
                seconds=5.0, device="cpu")
    base.update(kw)
    return Throughput(**base)


def test_eval_seconds_interpolates_log_linearly_between_anchors():
    tp = _tp()
    assert tp.eval_seconds("single", 0.1, 1.0, 1.0) == pytest.approx(0.2 + 2e-6)
    mid = tp.eval_seconds("single", (0.1 + 0.35) / 2, 1000.0, 10.0)
    assert mid == pytest.approx(0.15 + math.sqrt(2e-6 * 1e-6) * 1e4)        # geometric mean of the units
    assert tp.eval_seconds("single", 0.01, 1, 1) == tp.eval_seconds("single", 0.1, 1, 1)   # clamped
    assert tp.eval_seconds("diag", 0.5, 10.0, 2.0) == pytest.approx(0.3 + 3e-6 * 20)


def test_predict_costs_is_the_sum_over_steps():
    tp, C, H, W = _tp(), 1, 32, 32
    work = Work("bbELS", (C, H, W))
    fine = (3, 3, 5, 5, 5, 7, 7, 7, 9, 9, 9, 11, 11, 11, 13, 13, 13, 15, 15, 15)
    s = Settings(n_dictionary=1000, steps=10, calibration_seeds=2, seeds=8)
    got = predict_costs(tp, s, shape=(C, H, W), predicted_fine=fine, scales_mode="auto", spread=1, n_train=5000)
    ks = [fine[2 * j + 1] for j in range(10)]                  # t = (j+1)/10 is fine step 2j+1
    assert grid_scales(fine, 10) == ks
    cands = candidates_near(ks, 1, k_max=31)
    union = sorted({k for c in cands for k in c})
    cal = tp.tree_fixed + tp.tree_unit * 1000 * work(union)
    pred = sum(tp.dict_fixed + tp.dict_unit * 1000 * build_work(C, k) for k in set(ks))
    for j in range(10):
        t = (j + 1) / 10
        cal += 2 * tp.net_unit + tp.eval_seconds("sweep", t, 2 * 1000, work(cands[j]))
        pred += 8 * (tp.net_unit + tp.is_unit * 1000)
        pred += tp.eval_seconds("diag" if j == 0 else "single", t, 8 * 1000, work([ks[j]]))
    assert got.calibrate == pytest.approx(cal) and got.predict == pytest.approx(pred)
    assert got.novelty == pytest.approx(tp.nn_unit * 5000 * (8 + 300))


def test_machine_work_divides_over_workers_the_network_does_not():
    """With the machines sharded over W workers (--ray) only their share of each stage
    shrinks: the network's calls and the novelty search stay in this process."""
    tp = _tp(net_unit=0.5)
    kw = dict(shape=(1, 32, 32), predicted_fine=(3, 5, 7, 9), scales_mode="auto", spread=1, n_train=5000)
    s = Settings(n_dictionary=1000, steps=4, calibration_seeds=2, seeds=8)
    one = predict_costs(tp, s, **kw)
    four = predict_costs(tp, s, **kw, workers=4.0)
    net_cal, net_pred = 4 * 2 * tp.net_unit, 4 * 8 * tp.net_unit
    assert four.calibrate == pytest.approx(net_cal + (one.calibrate - net_cal) / 4)
    assert four.predict == pytest.approx(net_pred + (one.predict - net_pred) / 4)
    assert four.novelty == one.novelty


def _pattern(c: int, n: int, r: int):
    """A coordinate's padding class along an axis of n at radius r: interior, or itself."""
    return "in" if r <= c <= n - 1 - r else c


@pytest.mark.parametrize("H,W,k", [(7, 7, 3), (8, 6, 5), (9, 9, 9), (5, 8, 7), (4, 4, 3), (3, 3, 7)])
def test_pair_fractions_count_the_pairs_each_machine_compares(H, W, k):
    r = k // 2
    pix = [(y, x) for y in range(H) for x in range(W)]
    # bbELS: a pixel meets the positions whose padding pattern equals its own
    bb = sum(1 for p in pix for q in pix
             if (_pattern(p[0], H, r), _pattern(p[1], W, r)) == (_pattern(q[0], H, r), _pattern(q[1], W, r)))
    assert pair_fraction("bbELS", H, W, k) * (H * W) ** 2 == pytest.approx(bb)
    # ELS valid: every pixel meets the positions whose k x k patch lies inside the image
    valid = sum(1 for q in pix if r <= q[0] <= H - 1 - r and r <= q[1] <= W - 1 - r) * H * W
    assert pair_fraction("ELS", H, W, k, "valid") * (H * W) ** 2 == pytest.approx(valid)
    assert pair_fraction("ELS", H, W, k) == 1.0
    assert pair_fraction("LS", H, W, k) * (H * W) ** 2 == pytest.approx(H * W)


def test_a_sweep_adds_each_ring_over_its_own_pairs():
    w = Work("bbELS", (3, 16, 16))
    f = {k: pair_fraction("bbELS", 16, 16, k) for k in (3, 5, 9)}
    want = f[3] * (3 * 9 + 24) + f[5] * (3 * (25 - 9) + 24) + f[9] * (3 * (81 - 25) + 24)
    assert w([9, 3, 5]) == pytest.approx(want) and w([5]) == pytest.approx(f[5] * (75 + 24))
    # the valid ELS dictionary nests over its own pairs; LS does not nest and pays each
    # size's whole product
    valid = Work("ELS", (3, 16, 16), "valid")
    fv = {k: pair_fraction("ELS", 16, 16, k, "valid") for k in (3, 5)}
    assert valid([3, 5]) == pytest.approx(fv[3] * (27 + 24) + fv[5] * (3 * (25 - 9) + 24))
    ls = Work("LS", (3, 16, 16))
    assert ls([3, 5]) == pytest.approx(sum(pair_fraction("LS", 16, 16, k) * (3 * k * k + 24) for k in (3, 5)))


def test_given_scales_cost_no_calibration_and_a_class_meets_its_share():
    tp = _tp()
    s = Settings(n_dictionary=1000, steps=4, calibration_seeds=8, seeds=8)
    got = predict_costs(tp, s, shape=(1, 32, 32), predicted_fine=(3,) * 4, scales_mode=(3, 5, 7, 9), spread=1,
                        n_train=1000)
    assert got.calibrate == 0.0
    half = predict_costs(tp, s, shape=(1, 32, 32), predicted_fine=(3,) * 4, scales_mode=(3, 5, 7, 9), spread=1,
                         n_train=1000, share=0.5)
    assert half.predict < got.predict


def test_the_probe_measures_this_machine_on_real_data():
    full = load_dataset("mnist5k:size=32:limit=120")
    fine = (3, 5, 5, 7, 7, 9, 9, 11, 11, 13)
    cands = candidates_near(fine, 1, k_max=31)
    calls = []

    def net(x, t, label=None):
        calls.append(x.shape[0])
        return torch.zeros_like(x)

    tp = probe_throughput("bbELS", full.images, None, schedule="cosine-legacy", dictionary="periodic",
                          predicted=fine, candidates=cands, eps_fn=net, n_probe=40, seed=0)
    assert (tp.n_probe, tp.n_small) == (40, 2) and calls == [2, 2]
    for name in ("sweep_unit", "single_unit", "sweep_fixed", "single_fixed"):
        v = np.asarray(getattr(tp, name))
        assert v.shape == (4,) and np.all(np.isfinite(v)) and np.all(v >= 0)
    assert min(tp.sweep_unit) > 0 and min(tp.single_unit) > 0 and tp.tree_unit > 0 and tp.dict_unit > 0
    assert tp.seconds > 0 and tp.to_dict()["kind"] == "bbELS"
    # a target time cuts the large size (never below four times the small one)
    quick = probe_throughput("bbELS", full.images, None, schedule="cosine-legacy", dictionary="periodic",
                             predicted=fine, candidates=cands, eps_fn=net, n_probe=120, seed=0, target_seconds=1e-3)
    assert (quick.n_probe, quick.n_small) == (8, 2)
    # the prediction it gives grows with the dictionary and the seeds
    kw = dict(shape=(1, 32, 32), predicted_fine=fine, scales_mode="auto", spread=1, n_train=120)
    small = predict_costs(tp, Settings(40, 10, 2, 8), **kw)
    assert predict_costs(tp, Settings(120, 10, 2, 8), **kw).total > small.total
    assert predict_costs(tp, Settings(40, 10, 2, 16), **kw).predict > small.predict


def test_keys_the_memory_budget_cannot_keep_cost_the_measured_gather_ratio():
    # 1 GB of keys per image-size unit: at 2 GB budget, 3/4 of it, less what the tree holds
    tp = _tp(kept_bytes=1.0, unkept_ratio=2.0, held_bytes=0.0, memory_budget=1000)
    assert tp.kept_factor(n_dictionary=10, C=1, k=5) == 1.0                 # 250 bytes needed, 750 room
    assert tp.kept_factor(n_dictionary=60, C=1, k=5) == pytest.approx(0.5 + 0.5 * 2.0)   # 1500 needed
    held = _tp(kept_bytes=1.0, unkept_ratio=2.0, held_bytes=5.0, memory_budget=1000)
    assert held.kept_factor(n_dictionary=30, C=1, k=5) == pytest.approx(0.8 + 0.2 * 2.0)  # room 600 of 750


def test_release_kept_drops_the_kept_keys_and_reports_what_stays():
    from els_audit.machines import build_machine

    full = load_dataset("mnist5k:size=32:limit=20")
    m = build_machine("bbELS", full.images)
    m.dictionary_stats(5)
    before = m.dictionary_stats(5)
    assert before["materialized_fraction"] == 1.0
    held = m.release_kept()
    after = m.dictionary_stats(5)                # asking again keeps the keys again
    assert 0 < held < before["bytes"] and after["materialized_fraction"] == 1.0


def test_shaped_supports_cost_every_size_in_full():
    """--support erf & co. sweep one size at a time: a sweep costs the sum of its sizes'
    whole products, where square windows nest (each size adds its ring)."""
    square = Work("bbELS", (1, 16, 16))
    shaped = Work("bbELS", (1, 16, 16), nested=False)
    assert shaped((3, 5, 7)) == pytest.approx(sum(square((k,)) for k in (3, 5, 7)))
    assert square((3, 5, 7)) < shaped((3, 5, 7))
    assert not Work("ELS", (1, 8, 8), nested=False).nests and Work("ELS", (1, 8, 8)).nests


def test_predict_costs_follow_the_support():
    """The plan's seconds for --support: shaped supports calibrate one size at a time at the
    single-size rate (more than the nested sweep here), a wider erf-area window costs more,
    and the border band doubles the prediction's machine evaluations."""
    tp = _tp()
    s = Settings(n_dictionary=1000, steps=4, calibration_seeds=2, seeds=8)
    kw = dict(shape=(1, 16, 16), predicted_fine=[5, 7, 9, 11], scales_mode="auto", spread=1, n_train=5000)
    square = predict_costs(tp, s, **kw)
    shaped = predict_costs(tp, s, **kw, support="erf")
    wide = predict_costs(tp, s, **kw, support="erf-area", window_of=lambda t, k: k + 4)
    border = predict_costs(tp, s, **kw, support="border")
    assert shaped.calibrate > square.calibrate and wide.calibrate > shaped.calibrate
    assert wide.predict > shaped.predict == pytest.approx(square.predict)
    assert border.calibrate == pytest.approx(square.calibrate) and border.predict > square.predict


def test_the_probe_builds_the_c_kernels_before_it_times_anything(monkeypatch):
    # a first audit compiles the machines' C kernels: inside the small size's timing that looked
    # like a fixed cost, and the fitted cost per image fell to its floor (4x the work planned)
    from els_audit.machines import _native
    from els_audit.planning import cost

    events, real_available, real_once = [], _native.available, cost._probe_once
    monkeypatch.setattr(_native, "available", lambda: events.append("build") or real_available())
    monkeypatch.setattr(cost, "_probe_once", lambda **kw: events.append("time") or real_once(**kw))
    full = load_dataset("mnist5k:size=32:limit=40")
    fine = (3, 5, 5, 7)
    probe_throughput("bbELS", full.images, None, schedule="cosine-legacy", dictionary="periodic", predicted=fine,
                     candidates=candidates_near(fine, 1, k_max=31), eps_fn=lambda x, t, label=None: torch.zeros_like(x),
                     n_probe=8, seed=0)
    assert events[0] == "build" and "time" in events
