"""Patch dictionaries: which training patches compete at which query pixel.

References:
- Kamb & Ganguli, ICML 2025 (arXiv 2412.20292), eq. 38 (ELS), and theory.md section 2
  (LS, ELS periodic / valid, bbELS).

Every local machine is a *grouped* softmax: query pixels are split into groups that see the
same key set, so one dictionary serves a whole group.

| machine       | groups                                              | keys of a group                          |
|---------------|-----------------------------------------------------|------------------------------------------|
| LS            | one per pixel p                                     | patch at p of every image (zero padded)  |
| ELS periodic  | one (all pixels)                                    | every patch, circular wrap               |
| ELS valid     | one (all pixels; queries circularly padded)         | interior patches only                    |
| bbELS         | one per (row pattern, column pattern)               | patches with the same zero-pad pattern   |

bbELS patterns, per axis: with r = k // 2 the interior positions are ``I = [r, n-1-r]``; an
interior position's pattern is "no padding" and it is matched by every interior position; a
position within r of an edge has a unique padding pattern and is matched only by itself.
The 2-D pattern is the product of the two axes' patterns (corner pixels: same location only).

A dictionary stores no patches.  It stores, per group, the *unique* keys as (image, y, x)
references plus their multiplicity (identical patches, e.g. MNIST background, are merged
and enter the softmax with a ``log(count)`` bias: exact), the centre values, the squared
norms and the group's mean patch (subtracted from keys and queries to keep float32 logits
well conditioned: exact in exact arithmetic, see :mod:`._engine`).  Patches are gathered
from the padded images chunk by chunk when the engine needs them, so memory stays bounded
whatever N, H, W and k are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PatchGroup", "PatchDictionary", "build_dictionary", "patch_offsets"]


@dataclass
class PatchGroup:
    """Query pixels that share one key set, and that key set (deduplicated).

    Shapes (M = number of unique keys, K = C * k * k, P = query pixels in the group):
      query_pixels: (P,) long, flat pixel index y * W + x
      key_base: (M,) long, flat index of the patch's top-left element in the padded images
      key_source: (M, 3) long, (image index in the full data set, centre y, centre x) of
          the first occurrence of the key
      key_count: (M,) multiplicity; key_log_count: (M,) its log, in the compute dtype
      key_sqnorm: (M,) ||p - mean||^2 ; key_centre: (M, C) centre pixel of the patch
      mean: (K,) mean patch of the group's full (non-deduplicated) key multiset
    """

    query_pixels: torch.Tensor
    key_base: torch.Tensor
    key_source: torch.Tensor
    key_count: torch.Tensor
    key_log_count: torch.Tensor
    key_sqnorm: torch.Tensor
    key_centre: torch.Tensor
    mean: torch.Tensor
    total_keys: int  # keys before deduplication

    @property
    def n_unique(self) -> int:
        return int(self.key_base.numel())


@dataclass
class PatchDictionary:
    """The key sets of one machine at one patch size (and one class label)."""

    kind: str
    k: int
    mode: str            # "circular" | "valid" | "zeros"
    padded: torch.Tensor  # (N, C, Hp, Wp) padded images, flattened by gather offsets
    offsets: torch.Tensor  # (K,) offsets of the patch elements from its top-left element
    groups: list[PatchGroup]
    image_shape: tuple[int, int, int]

    def nbytes(self) -> int:
        n = self.padded.numel() * self.padded.element_size() + self.offsets.numel() * 8
        for g in self.groups:
            for t in (g.query_pixels, g.key_base, g.key_source, g.key_count, g.key_log_count,
                      g.key_sqnorm, g.key_centre, g.mean):
                n += t.numel() * t.element_size()
        return n

    @property
    def total_keys(self) -> int:
        return sum(g.total_keys for g in self.groups)

    @property
    def unique_keys(self) -> int:
        return sum(g.n_unique for g in self.groups)

    def gather(self, base: torch.Tensor) -> torch.Tensor:
        """Patches (len(base), K) whose top-left elements sit at ``base``."""
        return torch.take(self.padded, base[:, None] + self.offsets[None, :])


def patch_offsets(C: int, k: int, Hp: int, Wp: int) -> torch.Tensor:
    """Flat offsets of a (C, k, k) window inside a (C, Hp, Wp) image, in unfold order."""
    c = torch.arange(C)[:, None, None] * (Hp * Wp)
    dy = torch.arange(k)[None, :, None] * Wp
    dx = torch.arange(k)[None, None, :]
    return (c + dy + dx).reshape(-1)                                               # (C*k*k,)


def _axis_patterns(n: int, r: int) -> list[tuple[list[int], list[int]]]:
    """bbELS patterns along one axis of length n: (query positions, key positions)."""
    interior = list(range(r, n - r))
    pats = [([p], [p]) for p in range(n) if p not in set(interior)]
    if interior:
        pats.insert(0, (interior, interior))
    return pats


def _hash_dedup(patches_fn: "_KeyEnumerator", total: int, K: int, chunk: int, seed: int = 0x5EED):
    """Exact deduplication of ``total`` patch rows produced chunk-wise by ``patches_fn``.

    Rows are hashed by a random float64 projection and sorted (stable) by hash; rows with
    equal hashes are then compared element-wise with their representative, so a hash
    collision can never merge two different patches (it falls back to an exact row-wise
    ``torch.unique``).  The same pass accumulates the float64 sum of all rows.

    Returns (rep_index (M,), inverse (total,), counts (M,), row_sum (K,) float64), where
    rep_index is the first occurrence of each unique row.
    """
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(K, generator=g, dtype=torch.float64)
    h = torch.empty(total, dtype=torch.float64)
    row_sum = torch.zeros(K, dtype=torch.float64)
    for s in range(0, total, chunk):
        e = min(total, s + chunk)
        rows = patches_fn(s, e).to(torch.float64)
        h[s:e] = rows @ R
        row_sum += rows.sum(0)
    rep, inverse, counts = _runs(h)
    # verify: every row equals its representative
    for s in range(0, total, chunk):
        e = min(total, s + chunk)
        if not torch.equal(patches_fn(s, e), patches_fn.at(rep[inverse[s:e]])):
            break
    else:
        return rep, inverse, counts, row_sum
    # NB: hash collision (never observed); exact but slow fallback.
    allrows = torch.cat([patches_fn(s, min(total, s + chunk)) for s in range(0, total, chunk)])
    _, inverse, counts = torch.unique(allrows, dim=0, return_inverse=True, return_counts=True)
    rep = torch.full((counts.numel(),), total, dtype=torch.long)
    rep.scatter_reduce_(0, inverse, torch.arange(total), reduce="amin")
    return rep, inverse, counts, row_sum


def _runs(h: torch.Tensor):
    """Groups of equal values in h: (first index of each group, group id per element, sizes)."""
    hs, order = torch.sort(h, stable=True)              # equal hashes keep index order
    new = torch.ones_like(hs, dtype=torch.bool)
    new[1:] = hs[1:] != hs[:-1]
    run_id = torch.cumsum(new, 0) - 1                                                # (total,)
    rep = order[new]                                     # first (lowest) index of each run
    inverse = torch.empty_like(run_id)
    inverse[order] = run_id
    counts = torch.bincount(run_id)
    return rep, inverse, counts


class _KeyEnumerator:
    """Enumerates the keys of one group: images x key positions, in (image, y, x) order."""

    def __init__(self, dic_padded: torch.Tensor, offsets: torch.Tensor, n_img: int,
                 ys: torch.Tensor, xs: torch.Tensor, pad_origin: tuple[int, int], image_ids: torch.Tensor):
        N, C, Hp, Wp = dic_padded.shape
        self.padded = dic_padded
        self.offsets = offsets
        self.ys, self.xs = ys, xs                 # centre positions, unpadded coordinates
        self.npos = ys.numel() * xs.numel()
        self.n_img = n_img
        self.image_ids = image_ids                 # (N,) index into the full data set
        oy, ox = pad_origin                        # top-left of the window for centre (0, 0)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        self.pos_y, self.pos_x = yy.reshape(-1), xx.reshape(-1)                        # (npos,)
        self.pos_base = (yy.reshape(-1) + oy) * Wp + (xx.reshape(-1) + ox)             # (npos,)
        self.img_stride = C * Hp * Wp
        self.total = n_img * self.npos
        self.k = int(round((offsets.numel() // C) ** 0.5))
        # index of each key position among the unfold windows of a padded image
        self.pos_win = (yy.reshape(-1) + oy) * (Wp - self.k + 1) + (xx.reshape(-1) + ox)
        self.n_windows = (Hp - self.k + 1) * (Wp - self.k + 1)

    def base(self, idx: torch.Tensor) -> torch.Tensor:
        img, pos = idx // self.npos, idx % self.npos
        return img * self.img_stride + self.pos_base[pos]

    def source(self, idx: torch.Tensor) -> torch.Tensor:
        img, pos = idx // self.npos, idx % self.npos
        return torch.stack([self.image_ids[img], self.pos_y[pos], self.pos_x[pos]], 1)

    def at(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.take(self.padded, self.base(idx)[:, None] + self.offsets[None, :])

    def __call__(self, s: int, e: int) -> torch.Tensor:
        """Rows s..e-1; whole images at a time use unfold (much faster than a gather)."""
        if s % self.npos or e % self.npos or 4 * self.npos < self.n_windows:
            return self.at(torch.arange(s, e))
        n0, n1 = s // self.npos, e // self.npos
        win = F.unfold(self.padded[n0:n1], self.k)                          # (n, K, L) all windows
        return win[:, :, self.pos_win].permute(0, 2, 1).reshape(-1, win.shape[1])  # (n*npos, K)


def build_dictionary(
    kind: str,
    images: torch.Tensor,
    k: int,
    *,
    mode: str,
    image_ids: torch.Tensor | None = None,
    chunk_elems: int = 1 << 24,
) -> PatchDictionary:
    """Build the grouped, deduplicated patch dictionary of a local machine.

    Args:
        kind: "LS", "ELS" or "bbELS".
        images: (N, C, H, W) training images (the dictionary), compute dtype.
        k: odd patch size.
        mode: "circular" (ELS periodic), "valid" (ELS interior patches), "zeros" (LS, bbELS).
        image_ids: (N,) index of each image in the caller's full data set (for provenance).
        chunk_elems: elements per gathered chunk (bounds the memory of the build).
    Returns:
        :class:`PatchDictionary`.
    """
    N, C, H, W = images.shape
    r = k // 2
    K = C * k * k
    if image_ids is None:
        image_ids = torch.arange(N)
    if mode == "circular":
        # NB: circular padding by more than the image size wraps more than once; F.pad
        # refuses that, so tile the images instead.
        reps_y, reps_x = -(-r // H) * 2 + 1, -(-r // W) * 2 + 1
        tiled = images.repeat(1, 1, reps_y, reps_x)
        oy, ox = (reps_y // 2) * H - r, (reps_x // 2) * W - r
        padded = tiled[:, :, oy: oy + H + 2 * r, ox: ox + W + 2 * r].contiguous()
    elif mode in ("zeros", "valid"):
        padded = F.pad(images, (r, r, r, r)) if mode == "zeros" else images.contiguous()
    else:
        raise ValueError(f"unknown padding mode {mode!r}")
    Hp, Wp = padded.shape[-2:]
    offsets = patch_offsets(C, k, Hp, Wp)
    chunk = max(1, chunk_elems // K)
    centre_idx = torch.arange(C) * k * k + r * k + r                                # (C,)

    # (query rows, query cols, key rows, key cols) per group, in unpadded coordinates
    specs: list[tuple[list[int], list[int], list[int], list[int]]] = []
    if kind == "ELS" and mode == "circular":
        specs.append((list(range(H)), list(range(W)), list(range(H)), list(range(W))))
    elif kind == "ELS" and mode == "valid":
        if k > H or k > W:
            raise ValueError(f"ELS with dictionary='valid' needs k <= image size ({H}x{W}); got k={k}")
        specs.append((list(range(H)), list(range(W)), list(range(r, H - r)), list(range(r, W - r))))
    elif kind == "bbELS":
        for qy, ky in _axis_patterns(H, r):
            for qx, kx in _axis_patterns(W, r):
                specs.append((qy, qx, ky, kx))
    elif kind == "LS":
        for y in range(H):
            for x in range(W):
                specs.append(([y], [x], [y], [x]))
    else:
        raise ValueError(f"no patch dictionary for machine kind {kind!r}")

    # window top-left for centre (y, x) in padded coordinates: (y + r - r, x + r - r) for
    # padded modes, (y - r, x - r) for 'valid' (no padding; only interior centres are used)
    origin = (0, 0) if mode in ("zeros", "circular") else (-r, -r)
    groups = []
    for qy, qx, ky, kx in specs:
        enum = _KeyEnumerator(padded, offsets, N, torch.tensor(ky), torch.tensor(kx), origin, image_ids)
        img_chunk = max(1, chunk // enum.npos) * enum.npos                             # whole images
        rep, inverse, counts, row_sum = _hash_dedup(enum, enum.total, K, img_chunk)
        mean = (row_sum / enum.total).to(images.dtype)                                # (K,) group mean patch
        M = rep.numel()
        sq = torch.empty(M, dtype=images.dtype)
        cen = torch.empty(M, C, dtype=images.dtype)
        for s in range(0, M, chunk):
            e = min(M, s + chunk)
            p = enum.at(rep[s:e])                                                        # (m, K)
            cen[s:e] = p[:, centre_idx]
            d = p - mean
            sq[s:e] = (d * d).sum(1)
        qyy, qxx = torch.meshgrid(torch.tensor(qy), torch.tensor(qx), indexing="ij")
        groups.append(PatchGroup(
            query_pixels=(qyy * W + qxx).reshape(-1),
            key_base=enum.base(rep),
            key_source=enum.source(rep),
            key_count=counts,
            key_log_count=counts.to(images.dtype).log(),
            key_sqnorm=sq,
            key_centre=cen,
            mean=mean,
            total_keys=enum.total,
        ))
    return PatchDictionary(kind=kind, k=k, mode=mode, padded=padded, offsets=offsets,
                           groups=groups, image_shape=(C, H, W))
