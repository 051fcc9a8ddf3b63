"""Sharded machines (els_audit.machines.sharded, ._partial): each shard's absolute normaliser
against the brute-force loops, and the merged answers against one process, whatever the
number of shards, for every machine kind, with labels, duplicates across shards and the
diagnostics' winning entries."""

import pytest
import torch

from els_audit import get_schedule
from els_audit.machines import build_machine
from els_audit.machines._partial import merge_partials, winner_hash
from els_audit.machines.sharded import LocalShardPool, ShardedMachine, shard_ids, sharded_machines

from .brute_force import brute_log2_norm

SCHED = get_schedule("cosine-legacy")
KINDS = [("IS", "periodic", None), ("LS", "periodic", 3), ("ELS", "periodic", 5), ("ELS", "valid", 3),
         ("bbELS", "periodic", 5)]


def ab(t):
    return [tuple(float(v) for v in SCHED.alpha_sigma(float(tt))) for tt in t]


def images(N=9, C=1, H=6, W=6, dtype=torch.float64, seed=0):
    """Binary images (many identical patches) with exact copies that land in different shards."""
    g = torch.Generator().manual_seed(seed)
    imgs = ((torch.rand(N, C, H, W, generator=g) > 0.6).to(dtype) * 2 - 1)
    for j in (4, 7):
        if j < N:
            imgs[j] = imgs[1]
    x = torch.randn(3, C, H, W, generator=g, dtype=dtype)
    return imgs, x


@pytest.mark.parametrize("kind,dic,k", KINDS)
def test_log2_norm_matches_brute_force(kind, dic, k):
    imgs, x = images(N=4, H=5, W=5)
    t = torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64)
    m = build_machine(kind, imgs, dictionary=dic)
    got = m.partial(x, t, k=k).log2_norm
    want = brute_log2_norm(kind, imgs, x, ab(t), k=k, dictionary=dic)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-9)
    if kind != "IS":                                   # the nested pass gives the same normaliser
        sweep = m.partial_sweep(x, t, (k, k + 2))
        assert torch.allclose(sweep[k].log2_norm, want, rtol=1e-12, atol=1e-9)


def test_log2_norm_float32_paths_agree_with_float64():
    """float32: the fused C step (t = 0.9), the refined low-noise path (t = 0.05) and the nested
    pass all keep the normaliser to float32 accuracy of the logits."""
    imgs, x = images(N=30, H=8, W=8, seed=3)
    for t in (0.05, 0.5, 0.9):
        m64 = build_machine("ELS", imgs).partial_sweep(x, t, (3, 5))
        m32 = build_machine("ELS", imgs.float()).partial_sweep(x.float(), t, (3, 5))
        for k in (3, 5):
            assert torch.allclose(m32[k].log2_norm, m64[k].log2_norm, rtol=1e-6, atol=1e-3), (t, k)
        single = build_machine("ELS", imgs.float()).partial(x.float(), t, k=5)
        assert torch.allclose(single.log2_norm, m64[5].log2_norm, rtol=1e-6, atol=1e-3), t


def test_shard_ids_deal_images_in_turn():
    assert [s.tolist() for s in shard_ids(7, 3)] == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match="shards"):
        shard_ids(3, 4)


def _same_diag(d0, d1, tol):
    for f in ("source_image", "source_y", "source_x", "multiplicity"):
        assert torch.equal(getattr(d0, f), getattr(d1, f)), f
    assert torch.allclose(d1.weight, d0.weight, rtol=tol, atol=tol)
    assert torch.allclose(d1.entropy, d0.entropy, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind,dic,k", KINDS)
@pytest.mark.parametrize("n_shards", [1, 2, 3, 9])
def test_sharded_equals_one_process(kind, dic, k, n_shards):
    imgs, x = images()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    t = torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64)
    ref = build_machine(kind, imgs, labels, dictionary=dic)
    pool = LocalShardPool(imgs, labels, [(kind, dic)], n_shards=n_shards)
    (m,) = sharded_machines(pool, imgs, labels)
    assert isinstance(m, ShardedMachine) and m.to_dict()["shards"] == n_shards
    s0, d0 = ref.score(x, t, k=k, diagnostics=True)
    s1, d1 = m.score(x, t, k=k, diagnostics=True)
    assert torch.allclose(s1, s0, rtol=1e-10, atol=1e-8)
    _same_diag(d0, d1, 1e-10)
    lab = torch.tensor([2, 0, 1])                      # 9 shards: each holds one class only
    assert torch.allclose(m.score(x, t, k=k, label=lab), ref.score(x, t, k=k, label=lab), rtol=1e-10, atol=1e-8)
    if kind != "IS":
        ks = (k, k + 2)
        m.prepare_sweep(ks, label=lab)
        for want, got in ((ref.score_sweep(x, t, ks), m.score_sweep(x, t, ks)),
                          (ref.denoised_sweep(x, t, ks, label=lab), m.denoised_sweep(x, t, ks, label=lab))):
            for kk in ks:
                assert torch.allclose(got[kk], want[kk], rtol=1e-10, atol=1e-8), kk
        assert m.dictionary_stats(k)["keys"] == ref.dictionary_stats(k)["keys"]


def test_duplicates_across_shards_merge_as_one_entry():
    """Image 1 has copies 4 and 7, one in each of three shards: the winner at a query equal
    to image 1 is image 1 with the multiplicity one process gives (3 and more, merged)."""
    imgs, _ = images()
    x = imgs[1:2] * SCHED.alpha_sigma(0.02)[0]
    ref = build_machine("ELS", imgs)
    (m,) = sharded_machines(LocalShardPool(imgs, None, [("ELS", "periodic")], n_shards=3), imgs)
    _, d0 = ref.score(x, 0.02, k=3, diagnostics=True)
    _, d1 = m.score(x, 0.02, k=3, diagnostics=True)
    _same_diag(d0, d1, 1e-9)
    assert int(d1.multiplicity.min()) >= 3


@pytest.mark.parametrize("t", [0.05, 0.5, 0.95])
def test_float32_sharded_within_float32_rounding(t):
    imgs, x = images(N=40, H=8, W=8, seed=5)
    imgs, x = imgs.float(), x.float()
    ref = build_machine("ELS", imgs)
    (m,) = sharded_machines(LocalShardPool(imgs, None, [("ELS", "periodic")], n_shards=4), imgs)
    exact = build_machine("ELS", imgs.double()).score_sweep(x.double(), t, (3, 5, 7))
    one, many = ref.score_sweep(x, t, (3, 5, 7)), m.score_sweep(x, t, (3, 5, 7))
    for k in exact:
        err_one = ((one[k].double() - exact[k]).abs().max() / exact[k].abs().max()).item()
        err_many = ((many[k].double() - exact[k]).abs().max() / exact[k].abs().max()).item()
        assert err_many <= max(4 * err_one, 1e-6), (k, err_one, err_many)


def test_winner_hash_is_the_patch_content():
    imgs, _ = images(N=3, H=5, W=5)
    imgs[2] = torch.roll(imgs[0], shifts=(1, 2), dims=(-2, -1))
    from els_audit.machines import ScoreDiagnostics
    z = torch.zeros(1, 1, 3, dtype=torch.long)
    src = torch.tensor([[[0, 2, 1]]])
    ys, xs = torch.tensor([[[1, 2, 1]]]), torch.tensor([[[1, 3, 1]]])
    d = ScoreDiagnostics(src, ys, xs, z.double(), z, z.double())
    h = winner_hash(imgs, "ELS", "periodic", 3, d)[0, 0]
    assert h[0] == h[1]                                # the same periodic patch, moved with the image
    assert h[0] != h[2]
    hz = winner_hash(imgs, "LS", "periodic", 3, d)[0, 0]
    assert hz[0] != hz[1] or bool((imgs[0, :, :3, :3] == imgs[2, :, 1:4, 2:5]).all())


def test_merge_refuses_queries_no_shard_answers():
    imgs, x = images(N=4, H=5, W=5)
    p = build_machine("ELS", imgs).partial(x, 0.5, k=3)
    p.log2_norm[0, 0, 0] = float("-inf")
    with pytest.raises(ValueError, match="no key in any shard"):
        merge_partials([p, p.__class__(p.mean, p.log2_norm.clone())])


def test_a_window_larger_than_the_image_shards_too():
    """k = 11 on 4x4 images: periodic windows wrap more than once, the hash pads the same way."""
    imgs, x = images(N=6, H=4, W=4, seed=4)
    ref = build_machine("ELS", imgs)
    (m,) = sharded_machines(LocalShardPool(imgs, None, [("ELS", "periodic")], n_shards=2), imgs)
    s0, d0 = ref.score(x, 0.3, k=11, diagnostics=True)
    s1, d1 = m.score(x, 0.3, k=11, diagnostics=True)
    assert torch.allclose(s1, s0, rtol=1e-10, atol=1e-8)
    _same_diag(d0, d1, 1e-10)
