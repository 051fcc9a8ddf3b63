"""Novelty: copy test, mosaic and locality map against hand-derived and brute-force truth."""

import json
import math

import numpy as np
import pytest
import torch

from els_audit.machines import build_machine, scale_schedule_eps
from els_audit.novelty import assess_novelty, locality_novelty, memorization, mosaic, nearest_neighbours
from els_audit.predict import predict_samples




def vec_images(rows):
    """Images of shape (1, 1, 2) from 2-vectors."""
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 1, 1, 2)


# training "images" as 2-vectors: t0 = (0,0), t1 = (3,4), t2 = (10,0), t3 = (0,-10)
TRAIN = vec_images([[0, 0], [3, 4], [10, 0], [0, -10]])


# ---------------------------------------------------------------- nearest neighbours
def test_nearest_neighbours_brute_force():
    g = np.random.default_rng(1)
    q, p = g.normal(size=(7, 2, 3, 3)), g.normal(size=(11, 2, 3, 3))
    idx, dist = nearest_neighbours(q, p, 3, chunk_elems=20)           # several query chunks
    ex = np.array([0, 3, 5, 10, 2, 2, 7])
    idx_x, dist_x = nearest_neighbours(q, p, 2, exclude=ex)
    for i in range(7):
        d = [math.dist(q[i].ravel(), p[j].ravel()) for j in range(11)]
        order = sorted(range(11), key=lambda j: (d[j], j))
        assert list(idx[i]) == order[:3]
        np.testing.assert_allclose(dist[i], [d[j] for j in order[:3]], rtol=1e-12)
        order_x = [j for j in order if j != ex[i]]
        assert list(idx_x[i]) == order_x[:2]


def test_identical_pair_has_distance_exactly_zero():
    g = np.random.default_rng(2)
    p = g.normal(size=(5, 3, 8, 8)) * 100                                # large norms: expansion cancels badly
    _, dist = nearest_neighbours(p[2:3], p, 1)
    assert dist[0, 0] == 0.0


# ---------------------------------------------------------------- memorisation
def test_memorization_hand_derived():
    samples = vec_images([
        [0, 0],        # = t0: d1 = 0, d2 = |t1| = 5 -> ratio 0, memorised
        [1.5, 2],      # midpoint of t0 and t1: d1 = d2 = 2.5 -> ratio 1
        [0.3, 0.4],    # d(t0) = 0.5, d(t1) = |(2.7, 3.6)| = 4.5 -> ratio 1/9, memorised
        [0.9, 1.2],    # d(t0) = 1.5, d(t1) = |(2.1, 2.8)| = 3.5 -> ratio 3/7 = 0.4286
    ])
    m = memorization(samples, TRAIN)
    np.testing.assert_allclose(m.nearest_distance, [0, 2.5, 0.5, 1.5], atol=1e-12)
    np.testing.assert_allclose(m.second_distance, [5, 2.5, 4.5, 3.5], atol=1e-12)
    np.testing.assert_allclose(m.ratio, [0, 1, 1 / 9, 3 / 7], atol=1e-12)
    assert list(m.nearest_index) == [0, 0, 0, 0] and list(m.second_index[[0, 2, 3]]) == [1, 1, 1]
    assert list(m.memorized) == [True, False, True, False] and m.memorized_fraction == 0.5
    # configurable: at threshold 1/2 the fourth (3/7) is memorised too
    assert memorization(samples, TRAIN, threshold=0.5).memorized_fraction == 0.75
    # leave-one-out baseline, by hand:
    #  t0: 5 (t1), 10 (t2)                        -> 0.5
    #  t1: 5 (t0), |(7,-4)| = sqrt 65             -> 5/sqrt 65 = 0.6202
    #  t2: sqrt 65 (t1), 10 (t0)                  -> sqrt 65 / 10 = 0.8062
    #  t3: 10 (t0), |(10,10)| = sqrt 200 (t2)     -> 10/sqrt 200 = 0.7071
    np.testing.assert_allclose(m.baseline_ratio, [0.5, 5 / math.sqrt(65), math.sqrt(65) / 10, 10 / math.sqrt(200)],
                               atol=1e-12)
    assert m.baseline_memorized_fraction == 0.0
    d = json.loads(json.dumps(m.to_dict()))
    assert d["memorized_fraction"] == 0.5 and d["baseline"]["n_queries"] == 4


def test_duplicates_in_training_data():
    train = vec_images([[0, 0], [0, 0], [3, 4], [10, 0]])
    m = memorization(vec_images([[0, 0], [2, 3]]), train)
    # equal to two identical training images: d1 = d2 = 0 -> ratio 0 (a copy)
    assert m.ratio[0] == 0.0 and m.memorized[0]
    # the duplicates are each other's nearest neighbour in the baseline: ratio 0 for both
    assert list(m.baseline_ratio[:2]) == [0.0, 0.0] and m.baseline_memorized_fraction == 0.5


def test_baseline_subset_is_seeded():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(40, 1, 3, 3, generator=g, dtype=torch.float64)
    a = memorization(train[:2] + 0.01, train, baseline_limit=10, seed=3)
    b = memorization(train[:2] + 0.01, train, baseline_limit=10, seed=3)
    assert a.baseline_index.size == 10 and np.array_equal(a.baseline_index, b.baseline_index)
    # each baseline query is compared with all 40 others (brute force)
    for qi, r in zip(a.baseline_index, a.baseline_ratio):
        d = sorted(math.dist(train[qi].ravel().tolist(), train[j].ravel().tolist()) for j in range(40) if j != qi)
        assert r == pytest.approx(d[0] / d[1], rel=1e-12)


def test_memorization_bad_input():
    with pytest.raises(ValueError, match=">= 3 training"):
        memorization(TRAIN[:1], TRAIN[:2])
    with pytest.raises(ValueError, match="differ in shape"):
        memorization(torch.zeros(1, 1, 2, 1, dtype=torch.float64), TRAIN)
    with pytest.raises(ValueError, match="threshold"):
        memorization(TRAIN, TRAIN, threshold=0)


# ---------------------------------------------------------------- mosaic
def identity_maps(H, W, image):
    yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    return np.full((H, W), image), yy, xx


def test_two_halves_one_seam_line_two_sources():
    H, W = 4, 6
    si, sy, sx = identity_maps(H, W, 0)
    si[:, 3:] = 1                       # left half from image 0, right half from image 1, same places
    m = mosaic(si[None], sy[None], sx[None])
    assert m.n_sources[0] == 2 and m.dominant_fraction[0] == 0.5
    want_right = np.zeros((H, W - 1), bool)
    want_right[:, 2] = True             # the edge between columns 2 and 3, every row
    np.testing.assert_array_equal(m.seam_right[0], want_right)
    assert not m.seam_down.any() and m.seam_count[0] == H
    assert m.seam_fraction[0] == pytest.approx(4 / (4 * 5 + 3 * 6))
    assert m.seam_pixels()[0].sum() == 2 * H


def test_same_image_at_non_adjacent_offsets_is_a_seam():
    H, W = 3, 4
    si, sy, sx = identity_maps(H, W, 0)
    sy[1, :] = 2                         # row 1 copied from row 2: one image, shifted
    m = mosaic(si[None], sy[None], sx[None])
    assert m.n_sources[0] == 1 and m.dominant_fraction[0] == 1.0
    # row 0 -> row 1: source rows 0 -> 2 (not +1): seam; row 1 -> row 2: source rows 2 -> 2: seam
    np.testing.assert_array_equal(m.seam_down[0], np.ones((2, W), bool))
    assert not m.seam_right.any()


def test_periodic_offsets_wrap():
    H, W = 3, 4
    si, sy, sx = identity_maps(H, W, 0)
    sx = (sx + 3) % W                    # a circular shift by 3: source x goes 3, 0, 1, 2
    plain = mosaic(si[None], sy[None], sx[None])
    wrapped = mosaic(si[None], sy[None], sx[None], periodic=True)
    assert plain.seam_right[0, :, 0].all() and plain.seam_count[0] == H   # 3 -> 0 is not +1 ...
    assert wrapped.seam_count[0] == 0                                      # ... unless modulo W


def test_merged_duplicates_are_checked_by_content():
    # image 0: a flat -1 band in rows 0-1, then distinct values; the engine reports every
    # background pixel through one representative (image 0 at (0, 0)), multiplicity > 1
    imgs = torch.tensor([[[[-1.0, -1, -1], [-1, -1, -1], [0.1, 0.2, 0.3]]]], dtype=torch.float64)
    si, sy, sx = identity_maps(3, 3, 0)
    mult = np.ones((3, 3), np.int64)
    sy[:2], sx[:2], mult[:2] = 0, 0, 6
    with pytest.raises(ValueError, match="images="):
        mosaic(si[None], sy[None], sx[None], mult[None])
    m = mosaic(si[None], sy[None], sx[None], mult[None], images=imgs)
    # inside the band the representative continued by one step is still -1 = the neighbour's
    # source value: no seam.  Band -> row 2: (0,0)+(1,0) = (1,0) is -1 but row 2's source is
    # 0.1, 0.2, 0.3: seams.  Row 2 is unambiguous and identical to the image: no seam.
    assert not m.seam_right.any()
    np.testing.assert_array_equal(m.seam_down[0], [[False] * 3, [True] * 3])
    assert m.ambiguous_fraction[0] == pytest.approx(6 / 9) and m.n_sources[0] == 1
    # without the multiplicity the same maps would be read literally: seams everywhere in the band
    lit = mosaic(si[None], sy[None], sx[None])
    assert lit.seam_right[0, :2].all()


def test_machine_mosaic_of_two_training_halves():
    # ELS at k = 1: every pixel is matched by the single training pixel with the nearest
    # value.  Query = a_t * (left half of A | right half of B) with distinct random values:
    # the exact match (distance 0) wins every pixel, so the mosaic map is the construction.
    g = torch.Generator().manual_seed(5)
    imgs = torch.rand(2, 1, 4, 6, generator=g, dtype=torch.float64) * 2 - 1
    x = torch.cat([imgs[0, :, :, :3], imgs[1, :, :, 3:]], dim=2)[None]              # (1, 1, 4, 6)
    m = build_machine("ELS", imgs)
    t = 0.01
    a = float(m.schedule.alpha_sigma(t)[0])
    _, diag = m.score(a * x, t, k=1, diagnostics=True)
    res = mosaic(diag.source_image, diag.source_y, diag.source_x, diag.multiplicity, images=imgs, periodic=True)
    assert res.n_sources[0] == 2 and res.seam_count[0] == 4 and res.seam_right[0, :, 2].all()
    assert (res.source_image[0, :, :3] == 0).all() and (res.source_image[0, :, 3:] == 1).all()


# ---------------------------------------------------------------- locality map
def test_locality_novelty_hand_derived():
    net = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    mac = torch.tensor([0.1, 0.3, 0.1, 0.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    ism = torch.tensor([0.6, 0.6, 0.4, -0.5], dtype=torch.float64).reshape(1, 1, 2, 2)
    # range 2: explained if |net - ELS| <= 0.2, unexplained by IS if |net - IS| >= 0.5
    # pixel 0: 0.1 <= .2 and .6 >= .5 -> novel; pixel 1: .3 > .2; pixel 2: .4 < .5;
    # pixel 3: 0 <= .2 and .5 >= .5 -> novel
    res = locality_novelty(net, mac, ism)
    np.testing.assert_array_equal(res.novel[0].ravel(), [True, False, False, True])
    assert res.novel_fraction[0] == 0.5 and (res.explained_tol, res.unexplained_tol) == (0.2, 0.5)
    # two channels: the per-pixel error is the RMS over channels, sqrt((.3^2 + .4^2)/2) = 0.35355
    two = locality_novelty(torch.zeros(1, 2, 1, 1), torch.tensor([0.3, 0.4]).reshape(1, 2, 1, 1),
                           torch.ones(1, 2, 1, 1), data_range=1.0, explained=0.36, unexplained=0.9)
    assert two.machine_error[0, 0, 0] == pytest.approx(math.sqrt(0.125), abs=1e-7) and two.novel.all()
    with pytest.raises(ValueError, match="explained < unexplained"):
        locality_novelty(net, mac, ism, explained=0.5, unexplained=0.1)


# ---------------------------------------------------------------- end to end
def test_assess_novelty_on_predictions():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(10, 1, 6, 6, generator=g, dtype=torch.float64) * 2 - 1
    els, is_m = build_machine("ELS", imgs), build_machine("IS", imgs)
    scales = (3,) * 8
    # an IS network copies training images: every sample is memorised, and its nearest
    # training image is the one the IS sample collapsed onto
    copy = predict_samples(is_m.eps, els, scales, seeds=[1, 2, 3], steps=8, is_machine=is_m)
    nov = assess_novelty(copy, imgs, els)
    assert nov.memorized_fraction == 1.0
    assert np.all(nov.memorization.nearest_distance < 1e-6)
    # an ELS network at k = 3 makes mosaics: not copies, several sources, seams
    mosaic_net = scale_schedule_eps(els, scales, 8)
    pred = predict_samples(mosaic_net, els, scales, seeds=[1, 2, 3], steps=8, is_machine=is_m)
    nov = assess_novelty(pred, imgs, els)
    assert nov.memorized_fraction == 0.0
    assert np.all(nov.mosaic.n_sources >= 2) and np.all(nov.mosaic.seam_count > 0)
    # the network IS the machine here: every pixel is explained (error 0), so the novelty
    # map is exactly where IS is at least a quarter of the range away
    assert np.array_equal(nov.locality.novel, nov.locality.is_error >= 0.25 * float(imgs.max() - imgs.min()))
    d = json.loads(json.dumps(nov.to_dict()))
    assert d["memorized_fraction"] == 0.0 and len(d["seeds"]) == 3 and d["seeds"][0]["seed"] == 1
    assert {"n_sources", "seam_count", "ratio", "novel_fraction", "nearest_index"} <= set(d["seeds"][0])
    assert {"mosaic_source_image", "seam_right", "novelty_map", "nearest_index"} <= set(nov.arrays())
    with pytest.raises(ValueError, match="machine="):
        assess_novelty(pred, imgs)
