"""Patch dictionaries: which training patches compete at which query pixel.

References:
- Kamb & Ganguli, ICML 2025 (arXiv 2412.20292), eq. 38 (ELS), and docs/theory.md section 2
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

A dictionary stores, per group, the *unique* keys as references into the padded images
plus their multiplicity (identical patches, e.g. MNIST background, are merged and enter
the softmax with a ``log(count)`` bias: exact), the centre values, the squared norms and
the group's shift patch (subtracted from keys and queries: exact in exact arithmetic, see
:mod:`._engine`): its mean patch, which keeps float32 logits well conditioned, except that
in-image pixels take the background value where the images have one (a value covering half
their pixels, :func:`background_of`), so that most entries of the shifted keys are exactly
zero and the fused C kernel multiplies only the others (:mod:`._native`).  The patches themselves are
either materialised (engine-ready rows, while the memory budget allows) or gathered chunk
by chunk when the engine needs them; when even the deduplication would not fit the budget
a group streams every key image by image.  So memory stays bounded whatever N, H, W, k are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from . import _native as native

__all__ = ["KeyChunk", "PatchGroup", "PatchDictionary", "build_dictionary", "circular_pad", "patch_offsets",
           "prefix_rows", "DEDUP_BYTES_PER_KEY"]


@dataclass
class KeyChunk:
    """A slice of a group's keys, as the engine consumes them.

    kaug: (m, K + 1) rows ``[p - mean, ||p - mean||^2]``; centre: (m, C);
    log_count: (m,) log multiplicity of merged duplicates, or None (all ones);
    start: position of the first key in the group's key order.
    """

    kaug: torch.Tensor
    centre: torch.Tensor
    log_count: Optional[torch.Tensor]
    start: int


class PatchGroup:
    """Query pixels that share one key set, and that key set.

    Deduplicated groups store, per unique key (M of them): the enumeration index of its
    first occurrence, its multiplicity, squared norm and centre; patches are gathered from
    the padded images when the engine asks for a chunk.  Streaming groups (used when the
    deduplication itself would not fit the memory budget) store nothing per key and
    enumerate every key, image by image.

    query_pixels: (P,) long, flat pixel index y * W + x; mean: (K,) the group's shift patch
    (the mean patch of its full key multiset, with the images' background value at in-image
    pixels where they have one: :func:`_group_shift`); total_keys: keys before deduplication.
    """

    def __init__(self, enum: "_KeyEnumerator", query_pixels: torch.Tensor, mean: torch.Tensor,
                 centre_idx: torch.Tensor, rep: Optional[torch.Tensor] = None,
                 counts: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32):
        self.enum = enum
        self.query_pixels = query_pixels
        self.mean = mean
        self.centre_idx = centre_idx
        self.total_keys = enum.total
        self.deduplicated = rep is not None
        self.kaug: Optional[torch.Tensor] = None
        if self.deduplicated:
            self.rep = rep                                                            # (M,) long
            self.count = counts.to(torch.int32)                                       # (M,)
            self.log_count = counts.to(dtype).log()                                   # (M,)
            M = rep.numel()
            self.sqnorm = torch.empty(M, dtype=dtype, device=mean.device)
            self.centre = torch.empty(M, len(centre_idx), dtype=dtype, device=mean.device)
            step = max(1, (1 << 22) // max(1, mean.numel()))
            for s in range(0, M, step):
                keys = enum.at(rep[s: s + step])                                      # (m, K)
                d = keys - mean
                self.sqnorm[s: s + step] = (d * d).sum(1)
                self.centre[s: s + step] = keys[:, centre_idx]

    @property
    def n_keys(self) -> int:
        """Keys the engine iterates over (unique keys when deduplicated)."""
        return int(self.rep.numel()) if self.deduplicated else self.total_keys

    @property
    def n_materialized(self) -> int:
        """Keys (a prefix of the key order) whose engine rows are kept in memory."""
        return 0 if self.kaug is None else int(self.kaug.shape[0])

    def chunks(self, size: int) -> Iterator[KeyChunk]:
        """Key chunks of about ``size`` keys (streaming groups round to whole images).

        Materialised keys come as slices of the kept rows; the rest are gathered into two
        reused buffers (each chunk is consumed before the next; fresh tensors per chunk cost
        an extra pass and page faults).
        """
        if self.deduplicated:
            n_mat = self.n_materialized
            K = self.mean.numel()
            raw = kaug = None
            s = 0
            while s < self.n_keys:
                e = min(self.n_keys, s + size, n_mat if s < n_mat else self.n_keys)
                if s < n_mat:
                    out = self.kaug[s:e]
                else:
                    if kaug is None:
                        raw = torch.empty(min(size, self.n_keys) * K, dtype=self.mean.dtype, device=self.mean.device)
                        kaug = torch.empty(min(size, self.n_keys), K + 1, dtype=self.mean.dtype, device=self.mean.device)
                    out = self._augment(self.enum.at(self.rep[s:e], out=raw[: (e - s) * K]), self.sqnorm[s:e],
                                        out=kaug[: e - s])
                yield KeyChunk(out, self.centre[s:e], self.log_count[s:e], s)
                s = e
        else:
            step = max(1, size // self.enum.npos) * self.enum.npos
            for s in range(0, self.total_keys, step):
                keys = self.enum(s, min(self.total_keys, s + step))
                yield KeyChunk(self._augment(keys), keys[:, self.centre_idx], None, s)

    def _augment(self, keys: torch.Tensor, sqnorm: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Engine rows ``[p - mean, ||p - mean||^2]`` (m, K+1), into ``out`` if given."""
        K = self.mean.numel()
        if out is None:
            out = torch.empty(keys.shape[0], K + 1, dtype=keys.dtype, device=keys.device)
        d = torch.sub(keys, self.mean, out=out[:, :K])                                 # (m, K)
        out[:, K] = (d * d).sum(1) if sqnorm is None else sqnorm
        return out

    # -- materialisation: keep the engine-ready keys in memory (a speed layer) ------------
    def materialized_bytes(self) -> int:
        """Bytes that :meth:`materialize` would add to keep every key (0 for streaming groups)."""
        if not self.deduplicated:
            return 0
        return (self.n_keys - self.n_materialized) * (self.mean.numel() + 1) * self.mean.element_size()

    def materialize(self, max_bytes: Optional[int] = None) -> int:
        """Gather unique keys once and keep ``[p - mean, ||p - mean||^2]`` rows: all of them,
        or as long a prefix of the key order as ``max_bytes`` more allows.  Returns bytes added.

        NB: gathering a patch costs ~10-40 ns per element here, comparable to the GEMM
        itself when few queries share the keys (bbELS edge groups, small batches).
        """
        if not self.deduplicated:
            return 0
        row = (self.mean.numel() + 1) * self.mean.element_size()
        have = self.n_materialized
        want = prefix_rows(have, self.n_keys, row, max_bytes)
        if want <= have:
            return 0
        kaug = torch.empty(want, self.mean.numel() + 1, dtype=self.mean.dtype, device=self.mean.device)
        if have:
            kaug[:have] = self.kaug
        step = max(1, (1 << 22) // kaug.shape[1])
        for s in range(have, want, step):
            e = min(want, s + step)
            self._augment(self.enum.at(self.rep[s:e]), self.sqnorm[s:e], out=kaug[s:e])
        self.kaug = kaug
        return (want - have) * row

    def release(self) -> None:
        self.kaug = None

    def source(self, idx: torch.Tensor) -> torch.Tensor:
        """(len(idx), 3) long: (image, centre y, centre x) of keys at positions idx."""
        return self.enum.source(self.rep[idx] if self.deduplicated else idx)

    def key_bases(self, idx: torch.Tensor) -> torch.Tensor:
        """(len(idx),) flat index, in the padded images, of the first element of the keys at
        positions idx of the key order (add :meth:`_KeyEnumerator.flat_offsets` for the rest)."""
        return self.enum.base(self.rep[idx] if self.deduplicated else idx)

    def patches(self, idx: torch.Tensor) -> torch.Tensor:
        """(len(idx), K) the patches of the keys at positions idx of the key order."""
        return self.enum.at(self.rep[idx] if self.deduplicated else idx)

    def centres(self, idx: torch.Tensor) -> torch.Tensor:
        """(len(idx), C) the centre pixels of the keys at positions idx of the key order."""
        if self.deduplicated:
            return self.centre[idx]
        return self.enum.at(idx)[:, self.centre_idx]

    def log2_multiplicity(self, idx: torch.Tensor) -> torch.Tensor:
        """(len(idx),) float64 log2 of the keys' multiplicities (0 when not merged)."""
        return self.multiplicity(idx).to(torch.float64).log2()

    def multiplicity(self, idx: torch.Tensor) -> torch.Tensor:
        if self.deduplicated:
            return self.count[idx].long()
        return torch.ones(idx.shape, dtype=torch.long, device=idx.device)

    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in (self.query_pixels, self.mean))
        if self.deduplicated:
            n += sum(t.numel() * t.element_size()
                     for t in (self.rep, self.count, self.log_count, self.sqnorm, self.centre))
        if self.kaug is not None:
            n += self.kaug.numel() * self.kaug.element_size()
        return n + self.enum.nbytes()


@dataclass
class PatchDictionary:
    """The key sets of one machine at one patch size (and one class label)."""

    kind: str
    k: int
    mode: str            # "circular" | "valid" | "zeros"
    padded: torch.Tensor  # (N, C, Hp, Wp) padded images the keys are read from
    groups: list[PatchGroup]
    image_shape: tuple[int, int, int]

    def nbytes(self) -> int:
        return self.padded.numel() * self.padded.element_size() + sum(g.nbytes() for g in self.groups)

    @property
    def total_keys(self) -> int:
        return sum(g.total_keys for g in self.groups)

    @property
    def unique_keys(self) -> int:
        return sum(g.n_keys for g in self.groups)

    @property
    def deduplicated(self) -> bool:
        return all(g.deduplicated for g in self.groups)

    def materialize(self, budget_bytes: int) -> int:
        """Materialise groups, fewest query pixels per key first, within ``budget_bytes``
        (the last one partly: a prefix of its keys).

        Those groups gain the most (their gathered keys serve the fewest queries).
        Returns the bytes added.
        """
        added = 0
        order = sorted(self.groups, key=lambda g: g.query_pixels.numel() / max(1, g.n_keys))
        for g in order:
            if g.materialized_bytes() and budget_bytes - added > 0:
                added += g.materialize(budget_bytes - added)
        return added

    def release(self) -> None:
        for g in self.groups:
            g.release()

    def unmaterialized_bytes(self) -> int:
        return sum(g.materialized_bytes() for g in self.groups)

    @property
    def materialized_fraction(self) -> float:
        keys = [g.n_keys for g in self.groups if g.deduplicated]
        done = [g.n_materialized for g in self.groups if g.deduplicated]
        return sum(done) / max(1, sum(keys))


DEDUP_BYTES_PER_KEY = 48


def prefix_rows(have: int, n: int, row_bytes: int, max_bytes: Optional[int]) -> int:
    """How many of n rows to keep (a prefix) when ``have`` are kept and ``max_bytes`` more
    may be spent (None: all of them)."""
    return n if max_bytes is None else min(n, have + max(0, max_bytes) // row_bytes)


def circular_pad(x: torch.Tensor, r: int) -> torch.Tensor:
    """Circular padding by r on H and W of (N, C, H, W), wrapping as often as needed.

    NB: F.pad refuses circular padding wider than the image; tiling does not.
    """
    H, W = x.shape[-2:]
    ry, rx = -(-r // H) * 2 + 1, -(-r // W) * 2 + 1
    tiled = x.repeat(1, 1, ry, rx)
    oy, ox = (ry // 2) * H - r, (rx // 2) * W - r
    return tiled[:, :, oy: oy + H + 2 * r, ox: ox + W + 2 * r]


def background_of(images: torch.Tensor) -> torch.Tensor:
    """(C,) per channel the value that covers at least half of the pixels of ``images``
    (N, C, H, W) (a background, e.g. MNIST's -1), NaN where no value does."""
    C = images.shape[1]
    flat = images.transpose(0, 1).reshape(C, -1)
    out = torch.full((C,), float("nan"), dtype=images.dtype, device=images.device)
    for c in range(C):
        vals, counts = torch.unique(flat[c], return_counts=True)
        top = int(counts.argmax())
        if 2 * int(counts[top]) >= flat.shape[1]:
            out[c] = vals[top]
    return out


def _group_shift(mean: torch.Tensor, background: torch.Tensor, C: int, k: int, H: int, W: int, ky0: int, kx0: int,
                 zero_padded: bool) -> torch.Tensor:
    """(K,) a group's shift: its mean patch, with the background value at the window's
    in-image pixels (keys centred at row ky0, column kx0; with zero padding, pixels outside
    the image keep the mean, 0: every key of a group has the same padding pattern)."""
    if bool(background.isnan().all()):
        return mean
    r = k // 2
    dy, dx = torch.arange(k, device=mean.device) + ky0 - r, torch.arange(k, device=mean.device) + kx0 - r
    inside = ((dy >= 0) & (dy < H))[:, None] & ((dx >= 0) & (dx < W))[None, :]          # (k, k)
    if not zero_padded:
        inside[:] = True                                                                # wraps, or interior only
    bg = background[:, None, None].expand(C, k, k)
    use = inside[None] & ~bg.isnan()
    return torch.where(use.reshape(-1), bg.reshape(-1), mean)


def patch_offsets(C: int, k: int, Hp: int, Wp: int, device=None) -> torch.Tensor:
    """Flat offsets of a (C, k, k) window inside a (C, Hp, Wp) image, in unfold order."""
    c = torch.arange(C, device=device)[:, None, None] * (Hp * Wp)
    dy = torch.arange(k, device=device)[None, :, None] * Wp
    dx = torch.arange(k, device=device)[None, None, :]
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

    Rows are hashed by a random float64 projection (summed row by row, so that equal rows
    get equal hashes wherever they sit in a chunk) and sorted (stable) by hash; rows with
    equal hashes are then compared element-wise with their representative, so a hash
    collision can never merge two different patches (it falls back to an exact row-wise
    ``torch.unique``).  The same pass accumulates the float64 sum of all rows.

    Returns (rep_index (M,), inverse (total,), counts (M,), row_sum (K,) float64), where
    rep_index is the first occurrence of each unique row.
    """
    dev = patches_fn.padded.device
    g = torch.Generator().manual_seed(seed)                        # the same projection on every device
    R = torch.randn(K, generator=g, dtype=torch.float64, device="cpu").to(dev)
    if patches_fn.native_keys():
        return _native_dedup(patches_fn, total, R, chunk)
    h = torch.empty(total, dtype=torch.float64, device=dev)
    row_sum = torch.zeros(K, dtype=torch.float64, device=dev)
    for s in range(0, total, chunk):
        e = min(total, s + chunk)
        rows = patches_fn(s, e).to(torch.float64)
        # NB: not ``rows @ R``: BLAS sums the tail rows of a block in another order, so equal
        # rows got up to 4 different hashes and were not merged (measured: 3 equal keys of a
        # bbELS corner group left as 2); a row-wise reduction is the same for equal rows
        h[s:e] = (rows * R).sum(1)
        row_sum += rows.sum(0)
    rep, inverse, counts = _runs(h)
    # verify: every row equals its representative
    for s in range(0, total, chunk):
        e = min(total, s + chunk)
        if not torch.equal(patches_fn(s, e), patches_fn.at(rep[inverse[s:e]])):
            break
    else:
        return rep, inverse, counts, row_sum
    return _exact_dedup(patches_fn, total, chunk) + (row_sum,)


def _exact_dedup(patches_fn: "_KeyEnumerator", total: int, chunk: int):
    """(rep, inverse, counts) by a row-wise ``torch.unique`` of every key: exact, slow, the
    fallback should two different keys share a hash (never observed)."""
    dev = patches_fn.padded.device
    allrows = torch.cat([patches_fn(s, min(total, s + chunk)) for s in range(0, total, chunk)])
    _, inverse, counts = torch.unique(allrows, dim=0, return_inverse=True, return_counts=True)
    rep = torch.full((counts.numel(),), total, dtype=torch.long, device=dev)
    rep.scatter_reduce_(0, inverse, torch.arange(total, device=dev), reduce="amin")
    return rep, inverse, counts


def _native_dedup(enum: "_KeyEnumerator", total: int, R: torch.Tensor, chunk: int):
    """:func:`_hash_dedup` with the C kernels (:func:`._native.key_hash` and ``key_verify``):
    the keys are hashed and compared where they lie in the padded images, never gathered
    into rows (the torch path's gathers and float64 copies were most of a build's time).
    The same groups, representatives and counts as the torch path (the hashes, and so the
    order of the groups, differ; the partition does not); the column sums agree to float64
    rounding."""
    layout = (enum.padded.reshape(-1), enum.img_stride, enum.pos_base.contiguous(), enum.row_offsets.contiguous(), enum.k)
    h, row_sum = native.key_hash(*layout, R, 0, total)
    rep, inverse, counts = _runs(h)
    if native.key_verify(*layout, rep, inverse, 0, total):
        # NB: two different keys share a float64 hash (at 5e7 distinct keys a few percent
        # likely): group by a second, independent hash too before the exact row-wise way,
        # which holds every key in memory at once
        g = torch.Generator().manual_seed(0x5EED2)
        h2, _ = native.key_hash(*layout, torch.randn(R.numel(), generator=g, dtype=torch.float64), 0, total)
        rep, inverse, counts = _runs(h, h2)
        if native.key_verify(*layout, rep, inverse, 0, total):
            rep, inverse, counts = _exact_dedup(enum, total, chunk)
    return rep, inverse, counts, row_sum


def _runs(h: torch.Tensor, h2: Optional[torch.Tensor] = None):
    """Groups of equal values in h (of equal pairs (h, h2) when h2 is given): (first index of
    each group, group id per element, sizes)."""
    if h2 is None:
        hs, order = torch.sort(h, stable=True)          # equal hashes keep index order
        new = torch.ones_like(hs, dtype=torch.bool)
        new[1:] = hs[1:] != hs[:-1]
    else:
        order = torch.sort(h2, stable=True).indices
        order = order[torch.sort(h[order], stable=True).indices]       # by (h, h2), then index
        hs, hs2 = h[order], h2[order]
        new = torch.ones_like(hs, dtype=torch.bool)
        new[1:] = (hs[1:] != hs[:-1]) | (hs2[1:] != hs2[:-1])
    run_id = torch.cumsum(new, 0) - 1                                                # (total,)
    rep = order[new]                                     # first (lowest) index of each run
    inverse = torch.empty_like(run_id)
    inverse[order] = run_id
    counts = torch.bincount(run_id)
    return rep, inverse, counts


class _KeyEnumerator:
    """Enumerates the keys of one group: images x key positions, in (image, y, x) order."""

    def __init__(self, dic_padded: torch.Tensor, offsets: torch.Tensor, k: int, n_img: int,
                 ys: torch.Tensor, xs: torch.Tensor, pad_origin: tuple[int, int], image_ids: torch.Tensor):
        N, C, Hp, Wp = dic_padded.shape
        self.padded = dic_padded
        self.npos = ys.numel() * xs.numel()      # key centre positions, unpadded coordinates
        self.image_ids = image_ids                 # (N,) index into the full data set
        oy, ox = pad_origin                        # top-left of the window for centre (0, 0)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        self.pos_y, self.pos_x = yy.reshape(-1), xx.reshape(-1)                        # (npos,)
        self.pos_base = (yy.reshape(-1) + oy) * Wp + (xx.reshape(-1) + ox)             # (npos,)
        self.img_stride = C * Hp * Wp
        self.total = n_img * self.npos
        self.k = k
        # start of each of the C*k rows of a window, and every k-run of the flat images
        self.row_offsets = offsets.reshape(-1, k)[:, 0]                                  # (C*k,)
        self.row_view = dic_padded.reshape(-1).unfold(0, k, 1)                          # (numel-k+1, k) view
        # index of each key position among the unfold windows of a padded image
        self.pos_win = (yy.reshape(-1) + oy) * (Wp - self.k + 1) + (xx.reshape(-1) + ox)
        self.n_windows = (Hp - self.k + 1) * (Wp - self.k + 1)

    def native_keys(self) -> bool:
        """Whether the C kernels can hash and compare these keys in place (CPU, float32 or
        float64 contiguous images, kernels built)."""
        return (self.padded.device.type == "cpu" and self.padded.dtype in (torch.float32, torch.float64)
                and self.padded.is_contiguous() and native.available())

    def flat_offsets(self) -> torch.Tensor:
        """(K,) offsets of a key's elements from its :meth:`base`, in unfold order."""
        return (self.row_offsets[:, None] + torch.arange(self.k, device=self.padded.device)[None, :]).reshape(-1)

    def base(self, idx: torch.Tensor) -> torch.Tensor:
        img, pos = idx // self.npos, idx % self.npos
        return img * self.img_stride + self.pos_base[pos]

    def source(self, idx: torch.Tensor) -> torch.Tensor:
        img, pos = idx // self.npos, idx % self.npos
        return torch.stack([self.image_ids[img], self.pos_y[pos], self.pos_x[pos]], 1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pos_base, self.pos_win, self.pos_y, self.pos_x))

    def at(self, idx: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Patches (len(idx), K) of keys at enumeration positions ``idx`` (into ``out``, a
        contiguous buffer of len(idx) * K elements, if given).

        NB: gathers C*k contiguous rows of k elements through an overlapping-window view
        of the flat images: 2-4x faster here than an element-wise ``torch.take`` for k >= 7.
        """
        rows = (self.base(idx)[:, None] + self.row_offsets[None, :]).reshape(-1)       # (m * C*k,)
        if out is None:
            return self.row_view[rows].reshape(len(idx), -1)
        torch.index_select(self.row_view, 0, rows, out=out.view(-1, self.k))
        return out.view(len(idx), -1)

    def __call__(self, s: int, e: int) -> torch.Tensor:
        """Rows s..e-1; whole images at a time use unfold (much faster than a gather)."""
        if s % self.npos or e % self.npos or 4 * self.npos < self.n_windows:
            return self.at(torch.arange(s, e, device=self.padded.device))
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
    dedup_budget: Optional[int] = None,
    interior: bool = True,
) -> PatchDictionary:
    """Build the grouped, deduplicated patch dictionary of a local machine.

    Args:
        kind: "LS", "ELS" or "bbELS".
        images: (N, C, H, W) training images (the dictionary), compute dtype.
        k: odd patch size.
        mode: "circular" (ELS periodic), "valid" (ELS interior patches), "zeros" (LS, bbELS).
        image_ids: (N,) index of each image in the caller's full data set (for provenance).
        chunk_elems: elements per gathered chunk (bounds the memory of the build).
        dedup_budget: bytes the deduplication may use; above it, keys stream (None: always
            deduplicate).
        interior: bbELS only: False leaves out the interior group (the pixels at least r
            from every edge), for callers that answer it otherwise (a nested sweep).
    Returns:
        :class:`PatchDictionary`.
    """
    N, C, H, W = images.shape
    r = k // 2
    K = C * k * k
    if image_ids is None:
        image_ids = torch.arange(N, device=images.device)
    if mode == "circular":
        padded = circular_pad(images, r).contiguous()
    elif mode in ("zeros", "valid"):
        padded = F.pad(images, (r, r, r, r)) if mode == "zeros" else images.contiguous()
    else:
        raise ValueError(f"unknown padding mode {mode!r}")
    Hp, Wp = padded.shape[-2:]
    dev = images.device
    offsets = patch_offsets(C, k, Hp, Wp, device=dev)
    chunk = max(1, chunk_elems // K)
    centre_idx = torch.arange(C, device=dev) * k * k + r * k + r                    # (C,)
    background = background_of(images)

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
                if interior or not (r <= qy[0] and qy[-1] < H - r and r <= qx[0] and qx[-1] < W - r):
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
    # NB: deduplication needs ~DEDUP_BYTES_PER_KEY bytes per key (hashes, sort, inverse)
    # and keeps ~(20 + 4C) per unique key; beyond the budget the groups stream instead
    # (exact too, no merging of duplicates).
    total = N * sum(len(ky) * len(kx) for _, _, ky, kx in specs)
    padded_bytes = padded.numel() * padded.element_size()
    dedup = dedup_budget is None or padded_bytes + total * (DEDUP_BYTES_PER_KEY + 4 * C) <= dedup_budget
    groups = []
    for qy, qx, ky, kx in specs:
        enum = _KeyEnumerator(padded, offsets, k, N, torch.tensor(ky, device=dev), torch.tensor(kx, device=dev), origin,
                              image_ids)
        img_chunk = max(1, chunk // enum.npos) * enum.npos                             # whole images
        rep, counts, row_sum = None, None, torch.zeros(K, dtype=torch.float64, device=dev)
        if dedup:
            rep, _, counts, row_sum = _hash_dedup(enum, enum.total, K, img_chunk)
            # NB: unique keys in enumeration (image-major) order, not hash order: gathering
            # them then walks the images in memory order (cache hits), see PatchGroup.chunks
            by_position = torch.argsort(rep)
            rep, counts = rep[by_position], counts[by_position]
        else:
            for s in range(0, enum.total, img_chunk):
                row_sum += enum(s, min(enum.total, s + img_chunk)).to(torch.float64).sum(0)
        mean = (row_sum / enum.total).to(images.dtype)                                # (K,) group mean patch
        mean = _group_shift(mean, background, C, k, H, W, ky[0], kx[0], mode == "zeros")
        qyy, qxx = torch.meshgrid(torch.tensor(qy, device=dev), torch.tensor(qx, device=dev), indexing="ij")
        groups.append(PatchGroup(enum, (qyy * W + qxx).reshape(-1), mean, centre_idx, rep, counts,
                                 dtype=images.dtype))
    return PatchDictionary(kind=kind, k=k, mode=mode, padded=padded, groups=groups, image_shape=(C, H, W))
