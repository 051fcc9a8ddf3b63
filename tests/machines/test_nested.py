"""Sweeps over patch sizes (score_sweep / denoised_sweep) and the nested-window engine.

The nested engine (els_audit/machines/_nested.py) is checked against the brute-force loops
of tests/machines/brute_force.py and against the single-k engine; float64 unless a test
says otherwise.  Tiny tiles and row blocks force the tile-ownership and online-softmax
paths that the defaults only meet on big dictionaries.
"""


import pytest
import torch

from els_audit.machines import build_machine
from els_audit.machines import _nested as nested_mod
from els_audit.machines._nested import build_nested_dictionary, nested_softmax_average, onion_offsets

from .brute_force import brute_score
from .test_machines import SCHED, ab, data, rel_err


def test_onion_order_nests_every_window():
    dy, dx = onion_offsets(7)
    assert (dy[0], dx[0]) == (0, 0)
    for j in (1, 3, 5, 7):
        r = j // 2
        first = set(zip(dy[: j * j].tolist(), dx[: j * j].tolist()))
        assert first == {(y, x) for y in range(-r, r + 1) for x in range(-r, r + 1)}


@pytest.mark.parametrize("shape,ks", [((1, 5, 6), (3, 5, 7)), ((3, 4, 5), (1, 5)), ((1, 4, 5), (3, 7, 9))])
def test_sweep_matches_brute_force(shape, ks):
    imgs, x = data(*shape)
    t = torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64)
    m = build_machine("ELS", imgs)
    assert m._nests(ks)
    got = m.score_sweep(x, t, ks)
    assert sorted(got) == sorted(ks)
    for k in ks:
        want = brute_score("ELS", imgs, x, ab(t), k=k, dictionary="periodic")
        assert rel_err(got[k], want) < 1e-10, k


@pytest.mark.parametrize("tile_nodes,row_block", [(1, 7), (3, 1000), (17, 5)])
def test_tiles_and_row_blocks_do_not_change_the_answer(tile_nodes, row_block):
    imgs, x = data(1, 6, 7, N=5)
    ks = (3, 5, 7, 9)
    t = torch.tensor([0.02, 0.3, 0.95], dtype=torch.float64)
    a, b = SCHED.alpha_sigma(t, dtype=torch.float64)
    nd = build_nested_dictionary(imgs, ks, tile_nodes=tile_nodes)
    got = nested_softmax_average(nd, x, a, b, row_block=row_block)
    m = build_machine("ELS", imgs)
    for k in ks:
        assert rel_err(got[k], m.denoised(x, t, k=k)) < 1e-10, k


def test_tree_counts_every_key_once_per_level():
    imgs, _ = data(1, 5, 6, N=4)
    nd = build_nested_dictionary(imgs, (3, 5, 7), tile_nodes=2)
    total = imgs.shape[0] * 5 * 6
    log2_count = None
    for lv in nd.levels:
        log2_count = lv.dbias if lv.parent is None else log2_count[lv.parent.long()] + lv.dbias
        assert torch.allclose((2.0 ** log2_count).sum(), torch.tensor(float(total), dtype=torch.float64))
        if lv.parent is not None:
            assert torch.all(lv.parent[1:] >= lv.parent[:-1])           # children contiguous
    owned = [sum(t[i][1] - t[i][2] for t in nd.tiles) for i in range(len(nd.levels))]
    assert owned == nd.unique_keys
    # the merged duplicates are real: image 1 == image 0
    assert nd.unique_keys[-1] < total


def test_conditional_sweep_equals_single_k_on_each_class():
    imgs, x = data(1, 5, 5, N=6)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    lab = torch.tensor([2, 0, 1])
    m = build_machine("ELS", imgs, labels)
    got = m.score_sweep(x, 0.3, (3, 5), label=lab)
    for k in (3, 5):
        assert rel_err(got[k], m.score(x, 0.3, k=k, label=lab)) < 1e-10


@pytest.mark.parametrize("kind,dic,ks", [("LS", "periodic", (3, 5)), ("IS", "periodic", (3, 5)),
                                         ("bbELS", "periodic", (3, 7, 9))])
def test_other_machines_sweep_one_k_at_a_time(kind, dic, ks):
    # bbELS nests only the sizes with an interior (k <= 5 here): one of them is not a sweep
    imgs, x = data(1, 5, 6)
    m = build_machine(kind, imgs, dictionary=dic)
    assert not m._nests(ks)
    got = m.score_sweep(x, 0.4, ks[::-1])
    for k in ks:
        assert torch.equal(got[k], m.score(x, 0.4, k=k))


def test_denoised_sweep_is_the_mean_centre():
    imgs, x = data(3, 4, 5)
    m = build_machine("ELS", imgs)
    got = m.denoised_sweep(x, 0.6, (3, 5))
    for k in (3, 5):
        assert rel_err(got[k], m.denoised(x, 0.6, k=k)) < 1e-10


def test_float32_sweep_close_to_float64():
    imgs, x = data(1, 6, 6, N=6)
    m64 = build_machine("ELS", imgs)
    m32 = build_machine("ELS", imgs.float())
    for t in (0.1, 0.5, 0.9):
        d64 = m64.denoised_sweep(x, t, (3, 5, 7))
        d32 = m32.denoised_sweep(x.float(), t, (3, 5, 7))
        for k in d64:
            assert rel_err(d32[k].double(), d64[k]) < 1e-4


def test_materialised_and_gathered_rows_agree():
    imgs, x = data(1, 6, 5)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    a, b = SCHED.alpha_sigma(t, dtype=torch.float64)
    nd = build_nested_dictionary(imgs, (3, 5, 7), tile_nodes=5)
    gathered = nested_softmax_average(nd, x, a, b)
    assert nd.materialize(1 << 30) > 0 and nd.materialized_fraction == 1
    kept = nested_softmax_average(nd, x, a, b)
    for k in gathered:
        assert rel_err(kept[k], gathered[k]) < 1e-12
    nd.release()
    assert nd.materialized_fraction == 0
    nd.materialize(nd.unmaterialized_bytes() // 2)                 # a prefix of the nodes
    assert 0 < nd.materialized_fraction < 1
    part = nested_softmax_average(nd, x, a, b)
    for k in gathered:
        assert rel_err(part[k], gathered[k]) < 1e-12


def test_optimistic_softmax_recovers_when_the_max_jumps():
    # Very low noise and one-node tiles: the running max keeps jumping by far more than
    # 2**60 bits after the first tiles; the engine must notice the overflow and redo them.
    g = torch.Generator().manual_seed(3)
    imgs = torch.rand(6, 1, 5, 5, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0.01, 0.01], dtype=torch.float64)
    a, b = SCHED.alpha_sigma(t, dtype=torch.float64)
    x = imgs[[5, 0]] * a[0] + 0.01 * torch.randn(2, 1, 5, 5, generator=g, dtype=torch.float64)
    nd = build_nested_dictionary(imgs, (3, 5), tile_nodes=1)
    stats = {}
    got = nested_softmax_average(nd, x, a, b, stats=stats)
    assert stats["redone"] > 0 and stats["skipped"] > 0 and stats["done"] > 0
    m = build_machine("ELS", imgs)
    for k in (3, 5):
        assert rel_err(got[k], m.denoised(x, t, k=k)) < 1e-9


def test_sweep_falls_back_when_the_tree_exceeds_the_budget():
    imgs, x = data(1, 5, 6)
    m = build_machine("ELS", imgs, memory_budget=2 * nested_mod.nested_dictionary_bytes(4 * 30, 2, 1) - 1)
    assert not m._nests((3, 5))
    got = m.score_sweep(x, 0.4, (3, 5))
    assert torch.equal(got[3], m.score(x, 0.4, k=3))


def test_prepared_tree_serves_every_subset():
    imgs, x = data(1, 5, 6)
    labels = torch.tensor([0, 0, 1, 1])
    m = build_machine("ELS", imgs, labels)
    m.prepare_sweep((3, 5, 7, 9), label=torch.tensor([1, 0, 1]))
    before = dict(m._cache)
    assert sorted(k[2] for k in before) == [0, 1]
    lab = torch.tensor([1, 1, 0])
    got = m.denoised_sweep(x, 0.2, (5, 9), label=lab)
    assert dict(m._cache).keys() == before.keys()                      # nothing new was built
    assert sorted(got) == [5, 9]
    for k in (5, 9):
        assert rel_err(got[k], m.denoised(x, 0.2, k=k, label=lab)) < 1e-10


def test_prepared_tree_serves_single_sizes_and_survives_single_k_calls():
    imgs, x = data(1, 5, 6)
    m = build_machine("ELS", imgs)
    m.prepare_sweep((3, 5, 7))
    (tree_key,) = [k for k in m._cache if k[0] == "nested"]
    tree = m._cache[tree_key]
    tree.materialize(1 << 30)
    got = m.denoised_sweep(x, 0.3, (5,))                              # one size, from the tree
    assert [k for k in m._cache] == [tree_key]
    assert rel_err(got[5], build_machine("ELS", imgs).denoised(x, 0.3, k=5)) < 1e-10
    # a single-k dictionary over a tight budget: the tree's kept rows go before the tree does
    single = build_machine("ELS", imgs)._dictionary(3, None).nbytes()
    kept = sum(lv.kept_bytes() for lv in tree.levels)
    m.memory_budget = 2 * (tree.nbytes() - kept + single)
    m._dictionary(3, None)
    assert tree_key in m._cache and tree.materialized_fraction < 1


@pytest.mark.parametrize("ks,msg", [((), "empty"), ((3, 4), "odd"), ((0,), "odd")])
def test_bad_sweeps_are_clear_value_errors(ks, msg):
    imgs, x = data(1, 4, 4)
    with pytest.raises(ValueError, match=msg):
        build_machine("ELS", imgs).score_sweep(x, 0.5, ks)


# -- bbELS: an interior tree for the interior group, the edge groups one k at a time ---------
def sparse_digits(N, H, W, seed=0):
    """MNIST-like float64 images: a flat -1 background with a few random strokes, so that
    many patches repeat and many tree nodes end at shallow levels (leaves above the finest)."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.full((N, 1, H, W), -1.0, dtype=torch.float64)
    mask = torch.rand(N, 1, H, W, generator=g) < 0.08
    imgs[mask] = torch.rand(int(mask.sum()), generator=g, dtype=torch.float64) * 2 - 1
    imgs[1] = imgs[0]
    return imgs


def noisy_queries(imgs, seed):
    """(t, a, b, x): three of ``imgs`` (3, 0, 7) noised at t = 0.03, 0.3, 0.9 (float64)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([0.03, 0.3, 0.9], dtype=torch.float64)
    a, b = SCHED.alpha_sigma(t, dtype=torch.float64)
    noise = torch.randn((3,) + tuple(imgs.shape[1:]), generator=g, dtype=torch.float64)
    return t, a, b, a[:, None, None, None] * imgs[[3, 0, 7]] + b[:, None, None, None] * noise


@pytest.mark.parametrize("shape,ks", [((1, 6, 7), (3, 5, 7)), ((3, 5, 6), (1, 3, 5)),
                                      ((1, 5, 8), (3, 5, 7, 9)), ((1, 7, 7), (3, 7))])
def test_bbels_sweep_matches_brute_force(shape, ks):
    imgs, x = data(*shape)
    t = torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64)
    m = build_machine("bbELS", imgs)
    assert m._nests(ks)
    got = m.score_sweep(x, t, ks)
    assert sorted(got) == sorted(ks)
    for k in ks:
        want = brute_score("bbELS", imgs, x, ab(t), k=k)
        assert rel_err(got[k], want) < 1e-10, k


@pytest.mark.parametrize("tile_nodes,row_block", [(1, 7), (4, 1000), (33, 13)])
def test_interior_tree_with_shallow_leaves_matches_single_k(tile_nodes, row_block):
    imgs = sparse_digits(12, 9, 11)
    t, a, b, x = noisy_queries(imgs, seed=1)
    ks = (3, 5, 7, 9)
    nd = build_nested_dictionary(imgs, ks, mode="interior", tile_nodes=tile_nodes)
    # nodes end at every level, and every level's nodes under a tile hang below the
    # previous level's nodes under it
    n_leaves = sum(lv.n_nodes for lv in nd.levels[:-1]) - sum(lv.n_nodes for lv in nd.levels[1:])
    assert n_leaves > 0
    for tile in nd.tiles:
        for i in range(1, len(ks)):
            (p0, p1, _), (j0, j1, _) = tile[i - 1], tile[i]
            if j1 > j0:
                par = nd.levels[i].parent[j0:j1].long()
                assert p0 <= int(par.min()) and int(par.max()) < p1
    got = nested_softmax_average(nd, x, a, b, row_block=row_block)
    m = build_machine("bbELS", imgs)
    for k in ks:
        r = k // 2
        want = m.denoised(x, t, k=k)
        inner = (slice(None), slice(None), slice(r, 9 - r), slice(r, 11 - r))
        assert rel_err(got[k][inner], want[inner]) < 1e-10, k
        outside = torch.ones(9, 11, dtype=torch.bool)
        outside[r:9 - r, r:11 - r] = False
        assert torch.isnan(got[k][:, :, outside]).all()               # edge pixels: not the tree's


# -- ELS with the 'valid' dictionary: the interior tree's keys, every pixel a query --------
@pytest.mark.parametrize("shape,ks", [((1, 6, 7), (3, 5)), ((3, 5, 6), (1, 3, 5)), ((1, 7, 9), (3, 5, 7))])
def test_valid_els_sweep_matches_brute_force(shape, ks):
    imgs, x = data(*shape)
    t = torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64)
    m = build_machine("ELS", imgs, dictionary="valid")
    assert m._nests(ks)
    got = m.score_sweep(x, t, ks)
    assert sorted(got) == sorted(ks)
    for k in ks:
        want = brute_score("ELS", imgs, x, ab(t), k=k, dictionary="valid")
        assert rel_err(got[k], want) < 1e-10, k


@pytest.mark.parametrize("tile_nodes,row_block", [(1, 7), (4, 1000), (33, 13)])
def test_valid_tree_with_shallow_leaves_answers_every_pixel(tile_nodes, row_block):
    imgs = sparse_digits(12, 9, 11)
    t, a, b, x = noisy_queries(imgs, seed=2)
    ks = (3, 5, 7, 9)
    nd = build_nested_dictionary(imgs, ks, mode="valid", tile_nodes=tile_nodes)
    assert [lv.n_nodes for lv in nd.levels] == [
        lv.n_nodes for lv in build_nested_dictionary(imgs, ks, mode="interior", tile_nodes=tile_nodes).levels]
    got = nested_softmax_average(nd, x, a, b, row_block=row_block)
    m = build_machine("ELS", imgs, dictionary="valid")
    for k in ks:
        assert not torch.isnan(got[k]).any(), k
        assert rel_err(got[k], m.denoised(x, t, k=k)) < 1e-10, k


def test_valid_els_conditional_float32_sweep_and_budget():
    imgs, x = data(1, 6, 7, N=6)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    m = build_machine("ELS", imgs, labels, dictionary="valid")
    lab = torch.tensor([1, 0, 1])
    got = m.score_sweep(x, 0.3, (3, 5), label=lab)
    for k in (3, 5):
        assert rel_err(got[k], m.score(x, 0.3, k=k, label=lab)) < 1e-10
    m32 = build_machine("ELS", imgs.float(), dictionary="valid")
    got32 = m32.score_sweep(x.float(), 0.3, (3, 5))
    for k in (3, 5):
        assert rel_err(got32[k].double(), m.score(x, 0.3, k=k)) < 1e-5
    need = nested_mod.interior_tree_bytes(6, 1, 6, 7, (3, 5), 8, coded=nested_mod.palette_of(imgs) is not None)
    assert build_machine("ELS", imgs, dictionary="valid", memory_budget=need * 4 // 3 + 4)._nests((3, 5))
    assert not build_machine("ELS", imgs, dictionary="valid", memory_budget=need * 4 // 3 - 4)._nests((3, 5))


def test_interior_tree_counts_every_interior_key_once_per_level():
    imgs = sparse_digits(6, 8, 9)
    ks = (3, 5, 7)
    nd = build_nested_dictionary(imgs, ks, mode="interior", tile_nodes=3)
    log2_count = None
    for k, lv in zip(ks, nd.levels):
        log2_count = lv.dbias if lv.parent is None else log2_count[lv.parent.long()] + lv.dbias
        r = k // 2
        assert torch.allclose((2.0 ** log2_count).sum(), torch.tensor(6.0 * (8 - 2 * r) * (9 - 2 * r),
                                                                      dtype=torch.float64))
    owned = [sum(t[i][1] - t[i][2] for t in nd.tiles) for i in range(len(ks))]
    assert owned == nd.unique_keys


def test_interior_tree_needs_an_interior():
    with pytest.raises(ValueError, match="interior tree needs k <= 5"):
        build_nested_dictionary(sparse_digits(2, 5, 6), (3, 7), mode="interior")


def test_bbels_conditional_and_float32_sweeps():
    imgs = sparse_digits(8, 8, 8)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
    lab = torch.tensor([2, 0, 1])
    _, x = data(1, 8, 8)
    m = build_machine("bbELS", imgs, labels)
    got = m.score_sweep(x, 0.3, (3, 5, 9), label=lab)
    for k in (3, 5, 9):
        assert rel_err(got[k], m.score(x, 0.3, k=k, label=lab)) < 1e-10, k
    m32 = build_machine("bbELS", imgs.float())
    for t in (0.1, 0.5, 0.9):
        d32 = m32.denoised_sweep(x.float(), t, (3, 5, 7))
        for k, d in d32.items():
            assert rel_err(d.double(), m.denoised(x, t, k=k)) < 1e-4, (t, k)


def test_bbels_edge_dictionary_is_the_complement_of_the_interior():
    from els_audit.machines._dictionary import build_dictionary
    imgs = sparse_digits(3, 7, 9)
    for k in (3, 5, 7, 9):
        full = build_dictionary("bbELS", imgs, k, mode="zeros")
        edges = build_dictionary("bbELS", imgs, k, mode="zeros", interior=False)
        r = k // 2
        pix = torch.cat([g.query_pixels for g in edges.groups]).tolist()
        interior = {y * 9 + x for y in range(r, 7 - r) for x in range(r, 9 - r)}
        assert len(pix) == len(set(pix)) and set(pix) == set(range(63)) - interior
        assert len(edges.groups) == len(full.groups) - (1 if interior else 0)


# -- float32 refinement at low noise (els_audit/machines/_engine.py, Float64Refinement) -----
def _low_noise_case(seed=5):
    """Near-copies of one image (pixel differences ~0.006) and a query at t = 0.03: the
    logits reach ~1e4 bits while the copies' logits differ by a few bits, so float32
    rounding of the logits (~1e-3 bits) shows in the weights."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, 9, 9, generator=g, dtype=torch.float64) * 2 - 1
    imgs = base + 0.006 * torch.randn(40, 3, 9, 9, generator=g, dtype=torch.float64)
    t = 0.03
    a, b = (float(v) for v in SCHED.alpha_sigma(t))
    x = a * base + b * torch.randn(1, 3, 9, 9, generator=g, dtype=torch.float64)
    return imgs, x, t


@pytest.mark.parametrize("kind,dic", [("ELS", "periodic"), ("bbELS", "periodic"), ("ELS", "valid")])
def test_float64_refinement_makes_float32_exact_at_low_noise(kind, dic, monkeypatch):
    from els_audit.machines import _engine
    imgs, x, t = _low_noise_case()
    ks = (3, 5, 7)
    want = {k: build_machine(kind, imgs, dictionary=dic).score(x, t, k=k) for k in ks}
    m32 = build_machine(kind, imgs.float(), dictionary=dic)
    refined = {k: m32.score(x.float(), t, k=k) for k in ks}
    swept = m32.score_sweep(x.float(), t, ks)
    monkeypatch.setattr(_engine, "REFINE_MIN_COEF", float("inf"))                 # refinement off
    plain = {k: m32.score(x.float(), t, k=k) for k in ks}
    plain_swept = m32.score_sweep(x.float(), t, ks)
    for k in ks:
        e_ref, e_sw = rel_err(refined[k].double(), want[k]), rel_err(swept[k].double(), want[k])
        # ~1e-6 is float32 output rounding: the score divides x - a * mean by b^2 at t = 0.03
        assert e_ref < 3e-6 and e_sw < 3e-6, (k, e_ref, e_sw)
        if k >= 5:                                    # without it: 1.6e-5 .. 8.5e-5
            assert rel_err(plain[k].double(), want[k]) > 5 * e_ref
            assert rel_err(plain_swept[k].double(), want[k]) > 5 * e_sw


def test_float64_refinement_gives_up_beyond_its_cap():
    from els_audit.machines._engine import Float64Refinement
    ref = Float64Refinement(torch.ones(4, dtype=torch.bool), prune_at=8, cap=8)
    L = torch.zeros(4, 6)                               # 24 records, all at the maximum
    ref.add(L, L.amax(1), L.amax(1), 0, 0)
    with pytest.warns(RuntimeWarning, match="float64 refinement skipped"):
        ref.prune(torch.zeros(4))
    assert ref.gave_up and ref.final(torch.zeros(4))[0].numel() == 0
    acc = torch.ones(4, 2)
    assert torch.equal(ref.corrected(acc, torch.zeros(4), None), acc.double())   # float32 answer stands


@pytest.mark.parametrize("N", [4, 8])                                # 168 / 336 distinct pixel values
def test_bbels_nests_only_when_the_whole_tree_fits_the_budget(N):
    imgs, x = data(1, 6, 7, N=N)
    coded = N == 4                                                      # <= 256 values: byte-coded rows
    assert (nested_mod.palette_of(imgs) is not None) == coded
    need = nested_mod.interior_tree_bytes(N, 1, 6, 7, (3, 5), 8, coded=coded)
    assert build_machine("bbELS", imgs, memory_budget=need * 4 // 3 + 4)._nests((3, 5))
    small = build_machine("bbELS", imgs, memory_budget=need * 4 // 3 - 4)
    assert not small._nests((3, 5))
    got = small.score_sweep(x, 0.4, (3, 5))
    assert torch.equal(got[5], small.score(x, 0.4, k=5))


# -- kept rows as palette codes (NestedLevel: images with <= 256 distinct values) ----------
@pytest.mark.parametrize("mode", ["circular", "interior", "valid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_byte_coded_rows_decode_to_the_same_bits(mode, dtype, monkeypatch):
    g = torch.Generator().manual_seed(3)
    imgs = (torch.randint(0, 256, (5, 2, 9, 8), generator=g) / 127.5 - 1).to(dtype)   # 8-bit pixels
    coded = build_nested_dictionary(imgs, (3, 5, 7), mode=mode, tile_nodes=16)
    assert coded.codes_flat is not None and all(lv.palette is not None for lv in coded.levels)
    plain = build_nested_dictionary(imgs, (3, 5, 7), mode=mode, tile_nodes=16)
    plain.codes_flat = None
    for lv in plain.levels:
        lv.palette = None
    for nd in (coded, plain):
        nd.materialize(1 << 30)
        assert nd.materialized_fraction == 1
    for lc, lp in zip(coded.levels, plain.levels):
        assert lc.kaug is None and lc.kcodes.dtype == torch.uint8
        assert lc.kept_bytes() < lp.kept_bytes() / 2
        for j0, j1 in ((0, lc.n_nodes), (3, 11)):
            want = lp.keys(plain.padded_flat, j0, j1)
            assert torch.equal(lc.keys(coded.padded_flat, j0, j1), want)         # native decode (float32)
            monkeypatch.setattr(nested_mod.native, "available", lambda: False)
            assert torch.equal(lc.keys(coded.padded_flat, j0, j1), want)         # torch decode
            monkeypatch.undo()
    # and the pass agrees with the rows gathered from the images
    x = torch.randn(2, 2, 9, 8, generator=g, dtype=dtype)
    a, b = torch.tensor([0.8, 0.3], dtype=dtype), torch.tensor([0.6, 0.95], dtype=dtype)
    got = nested_softmax_average(coded, x, a, b)
    coded.release()
    want = nested_softmax_average(coded, x, a, b)
    for k in got:
        assert torch.equal(got[k].nan_to_num(), want[k].nan_to_num()), k


def test_no_palette_beyond_256_values():
    imgs = torch.linspace(-1, 1, 257).reshape(1, 1, 1, 257)
    assert nested_mod.palette_of(imgs) is None
    assert nested_mod.palette_of(imgs[..., :256]).shape == (256,)
