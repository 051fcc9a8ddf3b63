"""Shaped supports (els_audit.machines.supports): every local machine with per-offset weights
against the brute-force loops; the weight rules (erf crop and scale, erf-area's top k^2,
data masks) against hand-derived cases; float32 paths against float64."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from els_audit import get_schedule
from els_audit.machines import build_machine
from els_audit.machines.supports import SupportSchedule, data_supports, erf_supports

from .brute_force import brute_score, entries, window

SCHED = get_schedule("cosine-legacy")
KINDS = [("LS", "periodic"), ("ELS", "periodic"), ("ELS", "valid"), ("bbELS", "periodic")]


def ab(t):
    return [tuple(float(v) for v in SCHED.alpha_sigma(float(tt))) for tt in t]


def data(N=4, C=2, H=6, W=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(N, C, H, W, generator=g, dtype=dtype) * 2 - 1
    imgs[2] = imgs[0]                                               # duplicates merge
    x = torch.randn(2, C, H, W, generator=g, dtype=dtype)
    return imgs, x


def random_maps(times, S=7, seed=1):
    g = np.random.default_rng(seed)
    m = g.uniform(0, 2, size=(len(times), S, S))
    m[m < 0.6] = 0.0                                                # holes, and a zero centre somewhere
    m[0, S // 2, S // 2] = 0.0
    return m


@pytest.mark.parametrize("kind,dic", KINDS)
@pytest.mark.parametrize("k", [3, 5])
def test_weighted_machines_match_brute_force(kind, dic, k):
    imgs, x = data()
    times = (0.3, 0.6)
    sup = SupportSchedule("data", times, random_maps(times), "test")      # 'data': the map cropped, as is
    m = build_machine(kind, imgs, dictionary=dic, supports=sup)
    for t in times:
        _, w = sup.window(t, k)
        want = brute_score(kind, imgs, x, ab([t, t]), k=k, dictionary=dic, weights=w)
        got = m.score(x, t, k=k)
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), (t, k)
    # a sweep with supports runs one k at a time and equals single calls
    sw = m.score_sweep(x, times[1], (3, 5))
    for kk in (3, 5):
        assert torch.allclose(sw[kk], m.score(x, times[1], k=kk), rtol=0, atol=0)


def test_normaliser_with_weights_is_the_weighted_sum():
    """The shard normaliser (what shards merge on) is log2 sum_j exp(-d_w / 2b^2), checked
    against a loop over the entries."""
    imgs, x = data(N=3, C=1, H=5, W=5)
    t = 0.4
    sup = SupportSchedule("data", (t,), random_maps((t,), S=5, seed=4), "test")
    m = build_machine("ELS", imgs, supports=sup)
    _, w = sup.window(t, 3)
    a, b = ab([t])[0]
    got = m.partial(x[:1], t, k=3).log2_norm[0]
    for (y, xx) in [(0, 0), (2, 3), (4, 4)]:
        q = window(x[0], y, xx, 3, "circular")
        d2 = torch.stack([(w * (q - a * window(imgs[j], qy, qx, 3, md)) ** 2).sum()
                          for j, qy, qx, md in entries("ELS", imgs, y, xx, 3, "periodic")])
        want = torch.logsumexp(-d2 / (2 * b * b), 0) / np.log(2)
        assert abs(float(got[y, xx]) - float(want)) < 1e-9


def test_square_support_equals_the_square_machine():
    imgs, x = data()
    t = 0.5
    ones = SupportSchedule("data", (t,), np.ones((1, 7, 7)), "ones")
    for kind in ("ELS", "bbELS"):
        a = build_machine(kind, imgs, supports=ones).score(x, t, k=5)
        b = build_machine(kind, imgs).score(x, t, k=5)
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", [0.05, 0.5, 0.9])
def test_float32_paths_with_weights_agree_with_float64(t, monkeypatch):
    """16x16 queries, two images: enough rows for the fused C step at t >= 0.5; the float64
    refinement at t = 0.05.  float32 against the float64 machine (itself tested above)."""
    g = torch.Generator().manual_seed(5)
    imgs = (torch.rand(40, 1, 16, 16, generator=g, dtype=torch.float64) > 0.7).double() * 2 - 1
    x = torch.randn(2, 1, 16, 16, generator=g, dtype=torch.float64)
    sup = SupportSchedule("erf", (t,), random_maps((t,), S=9, seed=2), "test")
    from els_audit.machines import _engine, _native
    calls = []
    fused = _engine._fused_group_means
    monkeypatch.setattr(_engine, "_fused_group_means", lambda *a: calls.append(1) or fused(*a))
    for kind in ("ELS", "bbELS"):
        m64 = build_machine(kind, imgs, supports=sup).denoised(x, t, k=7)
        m32 = build_machine(kind, imgs.float(), supports=sup).denoised(x.float(), t, k=7)
        assert (m32.double() - m64).abs().max() < 2e-4, (kind, t)
    if t >= 0.5 and _native.available():                          # the fused C step ran on scaled rows
        assert calls


def test_erf_weights_are_cropped_and_scaled_to_max_one():
    m = np.zeros((1, 7, 7))
    m[0, 3, 3], m[0, 3, 4], m[0, 0, 0] = 2.0, 4.0, 8.0              # (0, 0) lies outside k = 5
    sup = SupportSchedule("erf", (0.5,), m, "test")
    k, w = sup.window(0.5, 5)
    assert k == 5 and w.shape == (5, 5)
    assert float(w[2, 2]) == 0.5 and float(w[2, 3]) == 1.0 and float(w.sum()) == 1.5
    k9, w9 = sup.window(0.5, 9)                                      # wider than the map: zeros around
    assert k9 == 9 and float(w9[0, 0]) == 0 and float(w9[1, 1]) == 1.0


def test_a_widened_erf_area_window_matches_brute_force():
    """erf-area's support can reach beyond k: the machine runs on the wider window."""
    imgs, x = data(N=3, C=1, H=7, W=7, seed=6)
    t = 0.4
    m = np.zeros((1, 7, 7))
    m[0, 3, :] = [1, 2, 3, 9, 3, 2, 1]                          # a horizontal ridge
    sup = SupportSchedule("erf-area", (t,), m, "test")
    side, w = sup.window(t, 3)
    assert side == 5 and float(w.sum()) == 9                    # 5 of the row (cap 2k - 1 = 5), 4 beside the centre
    for kind in ("ELS", "bbELS"):
        got = build_machine(kind, imgs, supports=sup).score(x, t, k=3)
        want = brute_score(kind, imgs, x, ab([t, t]), k=side, weights=w)
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), kind


def test_erf_area_keeps_the_centre_and_the_area_and_caps_the_window():
    m = np.ones((1, 7, 7))
    m[0, 3, 3] = 0.5                                            # the centre below the rest: still in, area k^2
    k, w = SupportSchedule("erf-area", (0.5,), m, "test").window(0.5, 3)
    assert k == 3 and float(w.sum()) == 9
    noisy = np.random.default_rng(0).uniform(0.5, 1, size=(1, 27, 27))
    sup = SupportSchedule("erf-area", (0.5,), noisy, "test")
    for kk in (3, 5, 7):
        side, w = sup.window(0.5, kk)
        assert kk <= side <= 2 * kk - 1 and float(w.sum()) == kk * kk and float(w[side // 2, side // 2]) == 1


def test_erf_area_takes_the_k_squared_largest_offsets():
    """A horizontal ridge: the support of area 25 is a 1 x 9 row (the cap 2k - 1) and the 16
    nearest other offsets (ties nearer the centre first)."""
    S = 11
    m = np.zeros((1, S, S))
    m[0, 5, :] = 5 - np.abs(np.arange(S) - 5) * 0.1            # falls off from the centre along the row
    sup = SupportSchedule("erf-area", (0.5,), m, "test")
    k, w = sup.window(0.5, 5)
    assert k == 9 and float(w.sum()) == 25
    assert bool((w[4] == 1).all())                              # the whole ridge row
    rest = w.clone()
    rest[4] = 0
    assert float(rest.sum()) == 16 and float(rest[:, 0].sum() + rest[:, 8].sum()) == 0
    # a flat map: ties go to the nearest offsets, so the square itself
    flat = SupportSchedule("erf-area", (0.5,), np.ones((1, S, S)), "test")
    k, w = flat.window(0.5, 5)
    assert k == 5 and float(w.sum()) == 25


def test_data_support_of_independent_pixels_is_the_centre():
    """Independent pixels of equal variance: the optimal linear denoiser is diagonal."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(4000, 1, 5, 5, generator=g, dtype=torch.float64)
    sup = data_supports(imgs, SCHED, (0.5,), threshold=0.1)
    _, w = sup.window(0.5, 5)
    assert float(w.sum()) == 1 and float(w[2, 2]) == 1


def test_data_support_of_constant_images_is_the_whole_window():
    """Each image one constant: the covariance is all ones, every pixel's filter is flat."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(50, 1, 1, 1, generator=g, dtype=torch.float64).expand(50, 1, 5, 5).contiguous()
    sup = data_supports(imgs, SCHED, (0.2, 0.8))
    for t in (0.2, 0.8):
        _, w = sup.window(t, 5)
        assert float(w.sum()) == 25
    assert sup.side == 9                                              # offsets up to the image size


def test_data_support_of_row_correlated_images_is_a_row():
    """Images whose rows are constant (independent across rows): the mask is the centre row."""
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(3000, 1, 6, 1, generator=g, dtype=torch.float64).expand(3000, 1, 6, 6).contiguous()
    sup = data_supports(imgs, SCHED, (0.5,), threshold=0.1)
    _, w = sup.window(0.5, 5)
    want = torch.zeros(5, 5, dtype=torch.float64)
    want[2] = 1
    assert torch.equal(w, want)


def test_data_support_refuses_large_images():
    with pytest.raises(ValueError, match="up to 4096"):
        data_supports(torch.zeros(2, 3, 64, 64), SCHED, (0.5,))


def test_erf_supports_read_the_centre_x0_map_in_ascending_time():
    T, H, W = 2, 9, 9
    maps = np.zeros((T, 3, H, W), dtype=np.float32)
    maps[0, 0, 4, 4], maps[1, 0, 4, 5] = 1.0, 1.0                     # sampler order: t = 1 first
    erf = SimpleNamespace(x0_maps=maps, pixels={"centre": (4, 4), "edge": (4, 0), "corner": (0, 0)},
                          image_shape=(1, H, W), times=(1.0, 0.5), n_samples=3)
    sup = erf_supports(erf, "erf")
    assert sup.times == (0.5, 1.0) and sup.side == 9
    _, w_low = sup.window(0.5, 3)
    _, w_high = sup.window(1.0, 3)
    assert float(w_low[1, 2]) == 1 and float(w_low.sum()) == 1       # t = 0.5 is the second map
    assert float(w_high[1, 1]) == 1 and float(w_high.sum()) == 1


def test_supports_refuse_bad_use():
    sup = SupportSchedule("erf", (0.5,), np.ones((1, 3, 3)), "test")
    imgs, x = data()
    with pytest.raises(ValueError, match="LS, ELS and bbELS"):
        build_machine("IS", imgs, supports=sup)
    m = build_machine("ELS", imgs, supports=sup)
    with pytest.raises(ValueError, match="not one of them"):
        m.score(x, 0.25, k=3)
    with pytest.raises(ValueError, match="one t per call"):
        m.score(x, torch.tensor([0.5, 0.6], dtype=torch.float64), k=3)
    with pytest.raises(ValueError, match="non-negative"):
        SupportSchedule("erf", (0.5,), -np.ones((1, 3, 3)), "test")
    with pytest.raises(ValueError, match="all zero"):
        SupportSchedule("data", (0.5,), np.zeros((1, 3, 3)), "test")
    with pytest.raises(ValueError, match="S odd"):
        SupportSchedule("erf", (0.5,), np.ones((1, 4, 4)), "test")


@pytest.mark.parametrize("kind", ["ELS", "bbELS"])
def test_shaped_machines_shard_exactly(kind):
    """Shards apply the same supports and merge on their normalisers: 1 process == 3 shards,
    diagnostics included (erf-area widens the window, which the winners' hash follows)."""
    from els_audit.machines.sharded import LocalShardPool, sharded_machines

    imgs, x = data(N=7, C=1, H=6, W=6, seed=3)
    t = 0.3
    m = np.zeros((1, 7, 7))
    m[0, 3, :] = [1, 2, 3, 9, 3, 2, 1]
    for sup in (SupportSchedule("erf", (t,), random_maps((t,)), "test"), SupportSchedule("erf-area", (t,), m, "test")):
        one = build_machine(kind, imgs, supports=sup)
        pool = LocalShardPool(imgs, None, [(kind, "periodic", sup)], n_shards=3, schedule="cosine-legacy")
        sharded = sharded_machines(pool, imgs, schedule="cosine-legacy")[0]
        s1, d1 = one.score(x, t, k=3, diagnostics=True)
        s3, d3 = sharded.score(x, t, k=3, diagnostics=True)
        assert torch.allclose(s1, s3, rtol=1e-10, atol=1e-10)
        assert torch.equal(d1.source_image, d3.source_image) and torch.equal(d1.multiplicity, d3.multiplicity)
        sw = sharded.score_sweep(x, t, (3, 5))
        assert torch.allclose(sw[5], one.score(x, t, k=5), rtol=1e-10, atol=1e-10)


def test_supports_pickle_for_ray_actors():
    """Ray ships a shard's spec, supports included, to its actor by pickling."""
    import pickle
    sup = SupportSchedule("erf-area", (0.25, 0.5), random_maps((0.25, 0.5)), "test")
    back = pickle.loads(pickle.dumps(sup))
    for t in (0.25, 0.5):
        assert back.window(t, 3)[0] == sup.window(t, 3)[0]
        assert torch.equal(back.window(t, 3)[1], sup.window(t, 3)[1])
