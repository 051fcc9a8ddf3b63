"""The deduplication's C kernels (``_native.key_hash`` / ``key_verify``, used by
``_dictionary._hash_dedup``): the same partition of the keys as the torch path, on every
key layout the machines build (circular, zero-padded edge and interior groups, 'valid'),
in float32 and float64; a hash collision falls back to the exact row-wise comparison."""

import pytest
import torch
import torch.nn.functional as F

from els_audit.machines import _dictionary, _native, build_machine
from els_audit.machines._dictionary import _KeyEnumerator, circular_pad, patch_offsets

from .test_native import needs_cc

_exact_dedup_ref = _dictionary._exact_dedup


def _images(dtype, n=30, C=2, H=11, W=9, seed=0):
    """Sparse small-integer images: many equal patches at every k."""
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(n, C, H, W, generator=g) < 0.05
    return (on * torch.randint(1, 3, (n, C, H, W), generator=g)).to(dtype)


def _enumerator(imgs, k, layout):
    """A group's key enumerator as build_dictionary / build_nested_dictionary make them."""
    n, C, H, W = imgs.shape
    r = k // 2
    if layout == "circular":
        padded, ys, xs, origin = circular_pad(imgs, r).contiguous(), torch.arange(H), torch.arange(W), (0, 0)
    elif layout == "valid":
        padded, ys, xs, origin = imgs.contiguous(), torch.arange(r, H - r), torch.arange(r, W - r), (-r, -r)
    elif layout == "edge":                                  # a bbELS edge group: one row, zero padding
        padded, ys, xs, origin = F.pad(imgs, (r,) * 4), torch.tensor([0]), torch.arange(r, W - r), (0, 0)
    else:                                                   # "corner": one pixel, zero padding
        padded, ys, xs, origin = F.pad(imgs, (r,) * 4), torch.tensor([H - 1]), torch.tensor([0]), (0, 0)
    offsets = patch_offsets(C, k, *padded.shape[-2:])
    return _KeyEnumerator(padded, offsets, k, n, ys, xs, origin, torch.arange(n))


def _canonical(rep, inverse, counts):
    """A partition numbered by first occurrence (the hash order of the groups is arbitrary;
    the machines renumber them by position)."""
    perm = torch.argsort(rep)
    rank = torch.empty_like(perm)
    rank[perm] = torch.arange(perm.numel())
    return rep[perm], rank[inverse], counts[perm]


def _torch_dedup(enum, K):
    enum.native_keys = lambda: False
    try:
        return _dictionary._hash_dedup(enum, enum.total, K, 3 * enum.npos)
    finally:
        del enum.native_keys


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["circular", "valid", "edge", "corner"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_native_dedup_partitions_keys_as_the_torch_path(dtype, layout, k, two_threads):
    imgs = _images(dtype)
    enum = _enumerator(imgs, k, layout)
    K = imgs.shape[1] * k * k
    assert enum.native_keys()
    rep, inverse, counts, row_sum = _dictionary._hash_dedup(enum, enum.total, K, 3 * enum.npos)
    want = _torch_dedup(enum, K)
    for got, ref in zip(_canonical(rep, inverse, counts), _canonical(*want[:3])):
        assert torch.equal(got, ref)
    assert torch.allclose(row_sum, want[3], rtol=1e-12, atol=1e-12)
    # brute force: the unique rows, their first occurrences and multiplicities
    rows = enum(0, enum.total)
    uniq, inv, cnt = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
    assert rep.numel() == uniq.shape[0] > 1 and int(counts.max()) > 1
    assert torch.equal(rows[rep[inverse]], rows)                               # every key is its group's
    assert torch.equal(torch.sort(counts).values, torch.sort(cnt).values)
    first = torch.full((cnt.numel(),), enum.total).scatter_reduce_(0, inv, torch.arange(enum.total), reduce="amin")
    assert torch.equal(torch.sort(rep).values, torch.sort(first).values)
    assert torch.allclose(row_sum, rows.double().sum(0), rtol=1e-12, atol=1e-9)


@needs_cc
def test_key_verify_counts_the_keys_unequal_to_their_representative():
    imgs = _images(torch.float32)
    enum = _enumerator(imgs, 3, "circular")
    layout = (enum.padded.reshape(-1), enum.img_stride, enum.pos_base, enum.row_offsets.contiguous(), enum.k)
    idx = torch.arange(enum.total)
    rows = enum(0, enum.total)
    assert _native.key_verify(*layout, torch.zeros(1, dtype=torch.long), torch.zeros(enum.total, dtype=torch.long),
                              0, enum.total) == int((rows != rows[0]).any(1).sum())
    assert _native.key_verify(*layout, idx, idx, 0, enum.total) == 0            # every key its own group


@needs_cc
@pytest.mark.parametrize("colliding", ["first hash", "both hashes"])
def test_a_hash_collision_falls_back_to_the_exact_partition(colliding, monkeypatch):
    # the first hash collides: a second, independent one separates the keys; both collide:
    # the exact row-wise partition
    imgs = _images(torch.float64)
    enum = _enumerator(imgs, 3, "circular")
    want = _torch_dedup(enum, 18)
    calls = []

    def hashing(x, img_stride, pos_base, row_off, k, R, start, end):
        h, colsum = real(x, img_stride, pos_base, row_off, k, R, start, end)
        calls.append(R)
        if colliding == "both hashes" or len(calls) == 1:
            h = torch.zeros_like(h)                                              # every key one hash
        return h, colsum
    real = _native.key_hash
    monkeypatch.setattr(_native, "key_hash", hashing)
    exact = []
    monkeypatch.setattr(_dictionary, "_exact_dedup", lambda *a: exact.append(1) or real_exact(*a))
    real_exact = _exact_dedup_ref
    got = _dictionary._hash_dedup(enum, enum.total, 18, 3 * enum.npos)
    assert len(calls) == 2 and not torch.equal(calls[0], calls[1])
    assert len(exact) == (colliding == "both hashes")
    for a, b in zip(_canonical(*got[:3]), _canonical(*want[:3])):
        assert torch.equal(a, b)


@needs_cc
@pytest.mark.parametrize("kind,dictionary", [("bbELS", "periodic"), ("ELS", "periodic"), ("ELS", "valid"),
                                             ("LS", "periodic")])
def test_machines_built_with_either_dedup_agree(kind, dictionary, monkeypatch, two_threads):
    imgs = _images(torch.float32, n=12, C=1, H=10, W=10) * 0.5 - 0.5
    x = torch.randn(2, 1, 10, 10, generator=torch.Generator().manual_seed(1))
    a = build_machine(kind, imgs, dictionary=dictionary)
    got = {("one", k): a.denoised(x, 0.3, k=k) for k in (3, 5)} | a.denoised_sweep(x, 0.3, (3, 5, 7))
    monkeypatch.setattr(_KeyEnumerator, "native_keys", lambda self: False)
    b = build_machine(kind, imgs, dictionary=dictionary)
    want = {("one", k): b.denoised(x, 0.3, k=k) for k in (3, 5)} | b.denoised_sweep(x, 0.3, (3, 5, 7))
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-6, atol=1e-6), k
    assert a.dictionary_stats(5) == b.dictionary_stats(5)
