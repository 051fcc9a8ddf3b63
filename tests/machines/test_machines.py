"""The machines against the brute-force reference (tests/machines/brute_force.py) and
against the properties docs/theory.md states.  float64 throughout unless a test says otherwise."""


import pytest
import torch

from els_audit import get_schedule
from els_audit.machines import build_machine
from els_audit.machines import _device as device_mod
from els_audit.machines import _dictionary as dictionary_mod
from els_audit.machines._engine import grouped_softmax_average

from .brute_force import brute_score, brute_winner, window

SCHED = get_schedule("cosine-legacy")


def ab(t):
    return [tuple(float(v) for v in SCHED.alpha_sigma(float(tt))) for tt in t]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def data(C, H, W, N=4, seed=0, dup=True):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(N, C, H, W, generator=g, dtype=torch.float64) * 2 - 1
    if dup:
        imgs[1] = imgs[0]                       # exact duplicate image: merged keys
        imgs[2, :, :2, :] = -1.0                # a flat background band: many identical patches
    x = torch.randn(3, C, H, W, generator=g, dtype=torch.float64)
    return imgs, x


CASES = [  # (kind, dictionary, k)
    ("IS", "periodic", None),
    ("LS", "periodic", 3), ("LS", "periodic", 5),
    ("ELS", "periodic", 3), ("ELS", "periodic", 5), ("ELS", "periodic", 7),
    ("ELS", "valid", 3),
    ("bbELS", "periodic", 3), ("bbELS", "periodic", 5), ("bbELS", "periodic", 7),
]
SHAPES = [(1, 5, 6), (3, 4, 5)]


@pytest.mark.parametrize("kind,dic,k", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_brute_force(kind, dic, k, shape):
    imgs, x = data(*shape)
    t = torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64)   # per-item times in one batch
    m = build_machine(kind, imgs, dictionary=dic)
    got = m.score(x, t, k=k)
    want = brute_score(kind, imgs, x, ab(t), k=k, dictionary=dic)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("kind,dic,k", [c for c in CASES if c[0] != "IS"])
def test_conditional_matches_brute_force_on_class_subset(kind, dic, k):
    imgs, x = data(1, 5, 5, N=6, dup=False)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    per_item = torch.tensor([1, 0, 1])
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    m = build_machine(kind, imgs, labels, dictionary=dic)
    got = m.score(x, t, k=k, label=per_item)
    for i in range(3):
        sub = imgs[labels == per_item[i]]
        want = brute_score(kind, sub, x[i:i + 1], ab(t[i:i + 1]), k=k, dictionary=dic)
        assert rel_err(got[i:i + 1], want) < 1e-5
        # and the same as an unconditional machine built on the subset
        m_sub = build_machine(kind, sub, dictionary=dic)
        assert rel_err(got[i:i + 1], m_sub.score(x[i:i + 1], t[i:i + 1], k=k)) < 1e-12


def test_ls_with_huge_window_equals_is():
    # k >= 2*max(H, W) - 1 = 11 makes every window cover the whole image
    imgs, x = data(2, 4, 6, dup=False)
    t = 0.35
    s_is = build_machine("IS", imgs).score(x, t)
    s_ls = build_machine("LS", imgs).score(x, t, k=11)
    assert rel_err(s_ls, s_is) < 1e-12


@pytest.mark.parametrize("dy,dx", [(1, 0), (0, 2), (3, 4)])
def test_periodic_els_commutes_with_circular_shift(dy, dx):
    imgs, x = data(1, 6, 7)
    m = build_machine("ELS", imgs, dictionary="periodic")
    s = m.score(x, 0.5, k=5)
    s_shift = m.score(torch.roll(x, (dy, dx), (2, 3)), 0.5, k=5)
    assert rel_err(s_shift, torch.roll(s, (dy, dx), (2, 3))) < 1e-12


def test_low_noise_limit_is_nearest_patch_mosaic():
    # Theorem 4.1: as b_t -> 0 every pixel of the denoised image is the centre of its
    # nearest dictionary patch.  At t = 1e-4, b = sin(1e-4/1.008*pi/2) = 1.56e-4, so the
    # softmax is a hard argmin unless two distances tie within ~b^2.
    imgs, _ = data(1, 5, 5, dup=False)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 1, 5, 5, generator=g, dtype=torch.float64) * 2 - 1
    k = 3
    m = build_machine("ELS", imgs)
    t = 1e-4
    den = m.denoised(x, t, k=k)
    a = float(SCHED.alpha_sigma(t)[0])
    for bi in range(2):
        for y in range(5):
            for xx in range(5):
                q = window(x[bi], y, xx, k, "circular")
                best = min(((q - a * window(imgs[j], qy, qx, k, "circular")).pow(2).sum().item(), imgs[j, 0, qy, qx].item())
                           for j in range(4) for qy in range(5) for qx in range(5))
                assert den[bi, 0, y, xx].item() == pytest.approx(best[1], abs=1e-6)


def test_float32_close_to_float64():
    imgs, x = data(1, 8, 8)
    s64 = build_machine("bbELS", imgs).score(x, 0.5, k=5)
    s32 = build_machine("bbELS", imgs.float()).score(x.float(), 0.5, k=5)
    assert s32.dtype == torch.float32
    assert rel_err(s32.double(), s64) < 1e-5


@pytest.mark.parametrize("tiny_tiles,times", [(False, (0.1, 0.3, 0.6)), (True, (0.02, 0.05, 0.3))])
def test_diagnostics_match_brute_force(tiny_tiles, times, monkeypatch):
    # tiny tiles at low noise: most tiles are negligible and skipped, diagnostics included
    if tiny_tiles:
        monkeypatch.setattr(device_mod, "CPU_TILE_ELEMS", 64)
    imgs, x = data(1, 5, 5)
    t = torch.tensor(times, dtype=torch.float64)
    for kind in ("ELS", "bbELS", "LS"):
        m = build_machine(kind, imgs)
        _, diag = m.score(x, t, k=3, diagnostics=True)
        _, ref = brute_score(kind, imgs, x, ab(t), k=3, diagnostics=True)
        for bi in range(3):
            for (y, xx), (ents, w) in ref[bi].items():
                src, ties, wmax = brute_winner(ents, w)
                assert (diag.source_image[bi, y, xx].item(), diag.source_y[bi, y, xx].item(),
                        diag.source_x[bi, y, xx].item()) == src
                assert diag.weight[bi, y, xx].item() == pytest.approx(wmax.item(), rel=1e-9)
                assert diag.multiplicity[bi, y, xx].item() == ties
                h = -torch.xlogy(w, w).sum().item()                         # 0 log 0 = 0
                assert diag.entropy[bi, y, xx].item() == pytest.approx(h, rel=1e-9, abs=1e-12)


def test_is_diagnostics():
    imgs, x = data(1, 4, 4, dup=False)
    s, diag = build_machine("IS", imgs).score(x, 0.5, diagnostics=True)
    _, ref = brute_score("IS", imgs, x, ab([0.5] * 3), diagnostics=True)
    for bi in range(3):
        assert diag.source_image[bi, 0, 0].item() == int(ref[bi].argmax())
        assert diag.weight[bi, 2, 3].item() == pytest.approx(ref[bi].max().item(), rel=1e-12)


def test_duplicates_are_merged_exactly():
    imgs, _ = data(1, 6, 6)
    m = build_machine("ELS", imgs)
    st = m.dictionary_stats(k=3)
    assert st["keys"] == 4 * 36
    # image 1 duplicates image 0: at least its 36 patches merge away
    assert st["unique_keys"] <= 4 * 36 - 36


def test_tiling_does_not_change_the_answer():
    imgs, x = data(1, 6, 6)
    m = build_machine("ELS", imgs)
    m.score(x, 0.5, k=3)
    dic = m._dictionary(3, None)
    from els_audit.machines import _circular_pad
    q = torch.nn.functional.unfold(_circular_pad(x, 1), 3)                         # ELS queries
    a, b = SCHED.alpha_sigma(torch.full((3,), 0.5, dtype=torch.float64))
    big = grouped_softmax_average(dic, q, a, b, diagnostics=True, tile_elems=1 << 20)
    small = grouped_softmax_average(dic, q, a, b, diagnostics=True, tile_elems=70)  # many chunks
    assert rel_err(small.mean_centre, big.mean_centre) < 1e-12
    assert torch.allclose(small.entropy, big.entropy, rtol=1e-10)
    assert torch.equal(small.winner_source, big.winner_source)


def test_hash_collisions_fall_back_to_exact_dedup(monkeypatch):
    imgs, x = data(1, 5, 5)
    t = 0.4
    want = build_machine("ELS", imgs).score(x, t, k=3)
    # a projection of zeros hashes every patch to the same value: verification must catch it
    real_randn = torch.randn
    monkeypatch.setattr(dictionary_mod.torch, "randn", lambda *a, **kw: real_randn(*a, **kw) * 0)
    m = build_machine("ELS", imgs)
    got = m.score(x, t, k=3)
    monkeypatch.undo()
    assert rel_err(got, want) < 1e-12
    assert m.dictionary_stats(k=3)["unique_keys"] > 1


def test_large_k_wraps_more_than_once():
    # k = 9 on a 3x4 image: circular windows wrap more than once around each axis
    imgs, x = data(1, 3, 4, dup=False)
    t = torch.tensor([0.5] * 3, dtype=torch.float64)
    got = build_machine("ELS", imgs).score(x, t, k=9)
    want = brute_score("ELS", imgs, x, ab(t), k=9)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("call,msg", [
    (lambda m, x: m.score(x[:, :, :4], 0.5, k=3), "shape"),
    (lambda m, x: m.score(torch.cat([x, x], 1), 0.5, k=3), "shape"),
    (lambda m, x: m.score(x, 0.5, k=4), "odd"),
    (lambda m, x: m.score(x, 0.5, k=-1), "odd"),
    (lambda m, x: m.score(x, 0.5), "patch size"),
    (lambda m, x: m.score(x * float("nan"), 0.5, k=3), "NaN"),
    (lambda m, x: m.score(x, 0.5, k=3, label=7), "label"),
    (lambda m, x: m.score(x.float(), 0.5, k=3), "float"),
    (lambda m, x: m.score(x, 1.5, k=3), "[0, 1]"),
    (lambda m, x: m.score(x, 0.0, k=3), "t = 0"),
])
def test_bad_input_is_a_clear_value_error(call, msg):
    imgs, x = data(1, 5, 5)
    m = build_machine("ELS", imgs, torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match=__import__("re").escape(msg)):
        call(m, x)


def test_bad_build_arguments():
    imgs, _ = data(1, 5, 5)
    with pytest.raises(ValueError, match="unknown machine kind"):
        build_machine("ELSX", imgs)
    with pytest.raises(ValueError, match="dictionary"):
        build_machine("ELS", imgs, dictionary="circular")
    with pytest.raises(ValueError, match="labels"):
        build_machine("ELS", imgs, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="without labels"):
        build_machine("ELS", imgs).score(torch.zeros(1, 1, 5, 5, dtype=torch.float64), 0.5, k=3, label=0)
    with pytest.raises(ValueError, match="k <= image size"):
        build_machine("ELS", imgs, dictionary="valid").score(torch.zeros(1, 1, 5, 5, dtype=torch.float64), 0.5, k=7)


@pytest.mark.parametrize("kind", ["ELS", "bbELS", "LS"])
def test_streaming_dictionary_when_dedup_exceeds_budget(kind):
    # A budget too small for deduplication makes the groups stream every key instead:
    # same answers, duplicates no longer merged.
    imgs, x = data(1, 5, 6)
    t = torch.tensor([0.1, 0.4, 0.9], dtype=torch.float64)
    m = build_machine(kind, imgs, memory_budget=1000)
    got, diag = m.score(x, t, k=3, diagnostics=True)
    st = m.dictionary_stats(k=3)
    assert not st["deduplicated"] and st["unique_keys"] == st["keys"]
    want, ref = brute_score(kind, imgs, x, ab(t), k=3, diagnostics=True)
    assert rel_err(got, want) < 1e-5
    deduped = build_machine(kind, imgs).score(x, t, k=3, diagnostics=True)[1]
    assert torch.equal(diag.source_image, deduped.source_image)
    assert torch.allclose(diag.entropy, deduped.entropy, rtol=1e-10)
    assert torch.all(diag.multiplicity == 1)


@pytest.mark.parametrize("kind", ["ELS", "bbELS", "LS"])
def test_streaming_float32_at_low_noise_is_refined_like_the_deduplicated(kind):
    # the float64 refinement reads the recorded keys' centres: a streaming group keeps none
    # (it crashed here before 2026-12-08), so they are gathered from the images
    imgs, x = data(1, 5, 6)
    t = torch.tensor([0.02, 0.05, 0.1], dtype=torch.float64)
    want = brute_score(kind, imgs, x, ab(t), k=3)
    got = build_machine(kind, imgs.float(), memory_budget=1000).score(x.float(), t.float(), k=3)
    assert not build_machine(kind, imgs.float(), memory_budget=1000).dictionary_stats(k=3)["deduplicated"]
    assert rel_err(got.double(), want) < 1e-5
    assert rel_err(got.double(), build_machine(kind, imgs.float()).score(x.float(), t.float(), k=3).double()) < 1e-6


def test_materialised_and_gathered_keys_give_the_same_answer():
    imgs, x = data(1, 6, 6)
    m = build_machine("bbELS", imgs)
    m.score(x, 0.5, k=3)
    dic = m._dictionary(3, None)
    assert dic.materialized_fraction == 1.0
    q = torch.nn.functional.unfold(x, 3, padding=1)
    a, b = SCHED.alpha_sigma(torch.full((3,), 0.3, dtype=torch.float64))
    kept = grouped_softmax_average(dic, q, a, b, diagnostics=True)
    dic.release()
    assert dic.materialized_fraction == 0.0
    gathered = grouped_softmax_average(dic, q, a, b, diagnostics=True)
    assert torch.equal(kept.mean_centre, gathered.mean_centre)
    assert torch.equal(kept.winner_source, gathered.winner_source)


@pytest.mark.parametrize("kind", ["ELS", "bbELS"])
def test_partly_materialised_group_gives_the_same_answer(kind):
    # a prefix of each group's keys kept, the rest gathered; chunks straddle the boundary
    imgs, x = data(1, 6, 7, N=5)
    m = build_machine(kind, imgs)
    dic = m._dictionary(5, None)
    dic.release()
    q = torch.nn.functional.unfold(x, 5, padding=2) if kind == "bbELS" else \
        torch.nn.functional.unfold(dictionary_mod.circular_pad(x, 2), 5)
    a, b = SCHED.alpha_sigma(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    gathered = grouped_softmax_average(dic, q, a, b, diagnostics=True, tile_elems=3000)
    assert dic.materialize(dic.unmaterialized_bytes() // 5) > 0                   # whole groups and a part
    biggest = max(dic.groups, key=lambda g: g.n_keys)
    biggest.release()
    assert biggest.materialize(biggest.materialized_bytes() // 2) > 0
    assert 0 < biggest.n_materialized < biggest.n_keys and 0 < dic.materialized_fraction < 1
    part = grouped_softmax_average(dic, q, a, b, diagnostics=True, tile_elems=3000)
    assert rel_err(part.mean_centre, gathered.mean_centre) < 1e-13
    assert torch.equal(part.winner_source, gathered.winner_source)
    dic.materialize(dic.unmaterialized_bytes())                  # the rest, appended to the prefix
    assert dic.materialized_fraction == 1
    full = grouped_softmax_average(dic, q, a, b, tile_elems=3000)
    assert rel_err(full.mean_centre, gathered.mean_centre) < 1e-13


def test_memory_budget_limits_materialisation():
    imgs, x = data(1, 8, 8, N=6)
    full = build_machine("ELS", imgs)
    full.score(x, 0.5, k=5)
    need = full._dictionary(5, None).nbytes()
    tight = build_machine("ELS", imgs, memory_budget=int(need * 1.2))    # 3/4 of it < need
    got = tight.score(x, 0.5, k=5)
    st = tight.dictionary_stats(k=5)
    assert st["deduplicated"] and 0.0 < st["materialized_fraction"] < 1.0      # a prefix kept
    assert rel_err(got, full.score(x, 0.5, k=5)) < 1e-13                       # other chunking


def test_equal_keys_are_merged_wherever_they_sit():
    """Three equal images: every key of each group is merged with its copies (the hash of a
    row must not depend on its place in the chunk; BLAS's gemv once split them)."""
    g = torch.Generator().manual_seed(0)
    img = (torch.rand(1, 1, 6, 6, generator=g) > 0.6).double() * 2 - 1
    imgs = img.repeat(3, 1, 1, 1)
    for kind in ("LS", "ELS", "bbELS"):
        d = build_machine(kind, imgs)._dictionary(5, None)
        for grp in d.groups:
            assert bool((grp.count % 3 == 0).all()), kind
    alone = build_machine("ELS", img).dictionary_stats(5)["unique_keys"]
    assert build_machine("ELS", imgs).dictionary_stats(5)["unique_keys"] == alone
