"""ELS / bbELS at several patch sizes in one pass: nested windows over a tree of patches.

References:
- Kamb & Ganguli, ICML 2025 (arXiv 2412.20292), eq. 38 (ELS); docs/theory.md section 2.
- The single-k kernel and its base-2 online softmax: :mod:`._engine`.

A calibration sweep asks for the ELS score at the same ``x`` and ``t`` for several patch
sizes ``k_1 < k_2 < ... < k_L``.  Evaluated one k at a time, every logit of size k costs a
dot product of length ``C k^2``.  Here the windows are nested:

    ||q_k - a p_k||^2 = ||q_(k-) - a p_(k-)||^2 + ||ring_k(q) - a ring_k(p)||^2

where ``k-`` is the previous size and ``ring_k`` the pixels of the k window outside it, so
level k only adds a GEMM over its ring (``C (k^2 - k-^2)`` columns): all L levels together
cost one GEMM of the largest window.

Merging identical patches still pays at every level because the keys form a tree.  Level
k's nodes are the distinct k x k patches of the dictionary; the parent of a node is its
(k-) x (k-) centre, a node of the previous level.  Nodes are numbered so that every node's
children are contiguous and in its parent's order (sort by (parent, node)), so the nodes
of every level under any range of leaves (nodes without children) are again a range.  The
engine walks the leaves in tiles; in a tile, a level-k logit is its parent's logit (a row
gather) plus the ring GEMM, and the softmax of level k counts each node once (in the tile
that holds its first leaf) with a ``log2(count)`` bias, normalised over the whole
dictionary by an online log-sum-exp per level.

Three dictionaries nest this way (``mode``):
- "circular", periodic ELS: every key location exists at every k and every query pixel
  sees the same keys at every k; all leaves are finest nodes.
- "interior", the interior group of bbELS: at size k the keys are the patches centred at
  least k // 2 from every edge, and so are the query pixels that see them.  A larger k
  drops the outermost ring of centres, so its keys are children of keys of the smaller k
  (same centre), and the nodes whose centres all lie in the dropped ring are leaves above
  the finest level.  Query rows are sorted by their distance to the edge, so each level's
  rows are a prefix.  The other bbELS groups (pixels near an edge, each with its own
  padding pattern) are small; the machine runs them one k at a time.
- "valid", ELS with the authors' 'valid' dictionary: the keys of an interior tree (the
  patches that fit inside the image, fewer at every larger k), met by every query pixel
  (circularly padded, as the single-k machine pads them) at every level.

With ``q' = q - a mu`` and ``p' = p - mu`` for a per-channel shift mu (any
constant vector works in exact arithmetic: the background value where one covers half the
pixels, so that most ring entries are exactly zero, else the mean, which keeps float32
logits small; :func:`_shift_of`), the logit is, as in :mod:`._engine`, a GEMM of
``[q' a/b^2, -a^2/(2b^2)]`` against ``[p', ||p'||^2]`` in base 2.

In float32, when the native kernels build (:mod:`._native`), each tile's levels run as one
fused C step (``els_nested_tile``: parent logit + ring GEMM + online softmax per block of
query rows, only the sums written back; levels whose key rows are mostly zero run as
sparse products); at low noise it also records the keys that the float64 refinement needs
(those within REFINE_BITS of their pixel's maximum).  Its row blocks are large (up to
FUSED_MAX_ROWS query rows: every block walks the whole tree); should a block's record buffers
overflow, or its refinement give up, the block is redone in blocks of ``row_block`` rows,
fused where they fit and step by step where they overflow again (each step's softmax sums
as one C pass).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._dictionary import _hash_dedup, _KeyEnumerator, background_of, circular_pad, patch_offsets, prefix_rows
from . import _native as native
from . import _engine
from ._engine import (FUSED_SCRATCH_BYTES, FUSED_SLACK_BITS, LOG2E, REFINE_BITS, Float64Refinement, exact_logits_at,
                      exp2_floor, log2_norm_of, refine_rows, skip_threshold)

__all__ = ["NestedLevel", "NestedDictionary", "build_nested_dictionary", "nested_softmax_average",
           "nested_dictionary_bytes", "interior_tree_bytes", "onion_offsets", "palette_of", "NESTED_BYTES_PER_NODE"]

# bookkeeping per node and level: rep base (int64), parent (int32), log2 count, count (int32),
# centre + 1
NESTED_BYTES_PER_NODE = 8 + 4 + 4 + 4 + 8

# the fused pass's row blocks: up to this many query rows, and their engine columns within
# FUSED_BLOCK_ELEMS elements (the per-level query columns are copied once per block)
FUSED_MAX_ROWS = 1 << 14
FUSED_BLOCK_ELEMS = 1 << 24


def onion_offsets(k: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy, dx) of the k x k window's pixels, centre first, then ring by ring (Chebyshev
    distance), row-major within a ring: the first ``j^2`` entries are the j x j window."""
    r = k // 2
    cells = sorted(((max(abs(dy), abs(dx)), dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)))
    return (torch.tensor([c[1] for c in cells], device=device),
            torch.tensor([c[2] for c in cells], device=device))


def _onion_flat_offsets(k: int, C: int, Hp: int, Wp: int, device=None) -> torch.Tensor:
    """Flat offsets from a pixel of the k x k window's cells in onion order (pixel-major,
    channel-minor) inside (C, Hp, Wp) images."""
    dy, dx = onion_offsets(k, device)
    return ((dy * Wp + dx)[:, None] + torch.arange(C, device=device)[None, :] * (Hp * Wp)).reshape(-1)


def _centre_flat_index(n_images: int, C: int, H: int, W: int, r: int, device=None) -> torch.Tensor:
    """(n_images * H * W,) flat index, in images padded by r on each side, of every pixel
    in (image, y, x) order: the enumeration order of keys and of query rows."""
    Hp, Wp = H + 2 * r, W + 2 * r
    idx = torch.arange(n_images * H * W, device=device)
    n_i, pos = idx // (H * W), idx % (H * W)
    return n_i * (C * Hp * Wp) + (pos // W + r) * Wp + (pos % W + r)


@dataclass
class NestedLevel:
    """The nodes (distinct k x k patches) of one level, in tree order.

    cols: the columns of the onion-ordered largest window this level adds (pixel-major,
    channel-minor); offsets: (len(cols),) flat offsets of those pixels from a key's centre
    in the padded images; rep_base: (U,) flat index of each node's first occurrence's
    centre; parent: (U,) int32 index into the previous level (None at the first level);
    dbias: (U,) the node's ``log2(count)`` minus its parent's (the engine carries each
    node's bias inside its logit, so a child adds only the difference); vals: (C + 1, U)
    centre values and ones (the softmax numerator and denominator); mu_ring: (ring,) the
    channel means at the ring's columns; count: (U,) int32 multiplicity of each node (for
    the float64 refinement); kaug: optional materialised engine rows
    ``[ring - mu, ||ring - mu||^2, dbias]`` for a prefix of the nodes (n <= U, ring + 2).

    Palette-coded trees (images with at most 256 distinct values, e.g. anything decoded from
    8-bit pixels; ``palette`` (256,) set): the kept rows are ``kcodes`` (n, ring) uint8 codes
    of the ring's pixels and ``kextra`` (n, 2) ``[||ring - mu||^2, dbias]``, a quarter of the
    memory, decoded per tile into the same float rows (same bits).
    """

    k: int
    cols: slice
    offsets: torch.Tensor
    rep_base: torch.Tensor
    parent: Optional[torch.Tensor]
    dbias: torch.Tensor
    vals: torch.Tensor
    mu_ring: torch.Tensor
    count: torch.Tensor
    kaug: Optional[torch.Tensor] = None
    palette: Optional[torch.Tensor] = None
    kcodes: Optional[torch.Tensor] = None
    kextra: Optional[torch.Tensor] = None

    @property
    def n_nodes(self) -> int:
        return int(self.rep_base.numel())

    @property
    def n_materialized(self) -> int:
        kept = self.kaug if self.palette is None else self.kcodes
        return 0 if kept is None else int(kept.shape[0])

    def row_bytes(self) -> int:
        """Bytes to keep one node's row (coded rows: a byte per ring pixel)."""
        ring, item = self.offsets.numel(), self.vals.element_size()
        return (ring + 2) * item if self.palette is None else ring + 2 * item

    def keys(self, padded_flat: torch.Tensor, j0: int, j1: int) -> torch.Tensor:
        """Engine rows of nodes j0..j1-1 (materialised, or gathered from the images)."""
        if j1 <= self.n_materialized:
            if self.palette is None:
                return self.kaug[j0:j1]
            codes, extra = self.kcodes[j0:j1], self.kextra[j0:j1]
            if extra.dtype == torch.float32 and extra.device.type == "cpu" and native.available():
                return native.decode_rows(codes, self.palette, self.mu_ring, extra)
            return torch.cat([self._ring_values(codes), extra], 1)
        kr = padded_flat[self.rep_base[j0:j1, None] + self.offsets[None, :]]              # (n, ring)
        kr -= self.mu_ring
        return torch.cat([kr, (kr * kr).sum(1, keepdim=True), self.dbias[j0:j1, None]], 1)

    def materialized_bytes(self) -> int:
        """Bytes to keep the rows of every node not kept yet."""
        return (self.n_nodes - self.n_materialized) * self.row_bytes()

    def materialize(self, padded_flat: torch.Tensor, max_bytes: Optional[int] = None, step: int = 1 << 16,
                    codes_flat: Optional[torch.Tensor] = None) -> int:
        """Keep the rows of all nodes, or of as long a prefix as ``max_bytes`` more allows
        (coded trees: ``codes_flat`` holds the padded images' palette codes)."""
        row = self.row_bytes()
        have = self.n_materialized
        want = prefix_rows(have, self.n_nodes, row, max_bytes)
        if want <= have:
            return 0
        spans = [(s, min(want, s + step)) for s in range(have, want, step)]
        if self.palette is None:
            self.kaug = torch.cat(([self.kaug] if have else []) + [self.keys(padded_flat, s, e) for s, e in spans])
            return (want - have) * row
        codes, extra = [], []
        for s, e in spans:
            kc = codes_flat[self.rep_base[s:e, None] + self.offsets[None, :]]              # (n, ring) uint8
            kr = self._ring_values(kc)                                                   # as keys() decodes
            codes.append(kc)
            extra.append(torch.cat([(kr * kr).sum(1, keepdim=True), self.dbias[s:e, None]], 1))
        self.kcodes = torch.cat(([self.kcodes] if have else []) + codes)
        self.kextra = torch.cat(([self.kextra] if have else []) + extra)
        return (want - have) * row

    def _ring_values(self, codes: torch.Tensor) -> torch.Tensor:
        """Engine ring values ``palette[codes] - mu`` of byte-coded rows (native decode_rows
        computes the same)."""
        return self.palette[codes.long()] - self.mu_ring

    def release(self) -> None:
        self.kaug = self.kcodes = self.kextra = None

    def kept_bytes(self) -> int:
        """Bytes of the kept rows."""
        return sum(t.numel() * t.element_size() for t in (self.kaug, self.kcodes, self.kextra) if t is not None)

    def nbytes(self) -> int:
        ts = [self.offsets, self.rep_base, self.dbias, self.vals, self.count] + [
            t for t in (self.parent, self.kaug, self.kcodes, self.kextra) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


@dataclass
class NestedDictionary:
    """A periodic ELS, bbELS-interior or valid ELS dictionary at sizes ``ks`` as one tree
    (see module docstring).

    tiles: per tile of leaves, per level ``(j0, j1, own0)``: the level's nodes under the
    tile are ``j0..j1-1``; those from ``own0`` on are counted in this tile's softmax.
    """

    ks: tuple[int, ...]
    levels: list[NestedLevel]
    padded_flat: torch.Tensor      # (N*C*Hp*Wp,) images padded by r_max (circularly or zeros)
    mu: torch.Tensor               # (C,) per-channel shift of keys and queries (_shift_of)
    total_keys: int                # N*H*W: at most this many keys at any level
    tiles: list[list[tuple[int, int, int]]]
    mode: str = "circular"         # or "interior", "valid" (build_nested_dictionary)
    codes_flat: Optional[torch.Tensor] = None   # uint8 palette codes of padded_flat (coded trees)

    def nbytes(self) -> int:
        extra = 0 if self.codes_flat is None else self.codes_flat.numel()
        return self.padded_flat.numel() * self.padded_flat.element_size() + extra + sum(
            lv.nbytes() for lv in self.levels)

    def materialize(self, budget_bytes: int) -> int:
        """Materialise the levels' engine rows, first level first, within ``budget_bytes``
        (the last one partly: a prefix of its nodes).

        NB: gathering a node's ring from the images costs ~5-15 ns per element here (random
        images: cache misses), a fifth of the whole pass; kept rows cost nothing to read
        (byte-coded ones a decode pass over the tile's keys, sequential and small).
        """
        added = 0
        for lv in self.levels:
            if lv.materialized_bytes() and budget_bytes - added > 0:
                added += lv.materialize(self.padded_flat, budget_bytes - added, codes_flat=self.codes_flat)
        return added

    def release(self) -> None:
        for lv in self.levels:
            lv.release()

    def unmaterialized_bytes(self) -> int:
        return sum(lv.materialized_bytes() for lv in self.levels)

    @property
    def materialized_fraction(self) -> float:
        """Fraction of the engine rows (elements, all levels) kept in memory."""
        tot = sum(lv.n_nodes * (lv.offsets.numel() + 2) for lv in self.levels)
        return sum(lv.n_materialized * (lv.offsets.numel() + 2) for lv in self.levels) / max(1, tot)

    @property
    def unique_keys(self) -> list[int]:
        return [lv.n_nodes for lv in self.levels]


def nested_dictionary_bytes(n_keys: int, n_levels: int, C: int) -> int:
    """Upper bound of a nested dictionary's bookkeeping (every key distinct at every level)."""
    return n_keys * n_levels * (NESTED_BYTES_PER_NODE + 4 * (C - 1))


def interior_tree_bytes(n_images: int, C: int, H: int, W: int, ks: Sequence[int], itemsize: int,
                        coded: bool = False) -> int:
    """Upper bound (every key distinct) of an interior tree's bookkeeping plus its kept rows
    (``coded``: rows kept as palette codes, a byte per pixel; see :func:`palette_of`)."""
    total, prev_k2 = 0, 0
    for k in sorted(ks):
        keys = n_images * max(0, H - k + 1) * max(0, W - k + 1)
        ring = C * (k * k - prev_k2)
        row = ring + 2 * itemsize if coded else (ring + 2) * itemsize
        total += keys * (NESTED_BYTES_PER_NODE + 4 * (C - 1) + row)
        prev_k2 = k * k
    return total


def _shift_of(images: torch.Tensor) -> torch.Tensor:
    """(C,) the constant subtracted from keys and queries (any vector gives the same logits in
    exact arithmetic): per channel the background value where one covers at least half of
    the pixels (then most ring entries are exactly zero and the fused C step runs those
    levels sparse, :mod:`._native`), else the mean (keeps float32 logits small)."""
    mean = images.to(torch.float64).mean(dim=(0, 2, 3)).to(images.dtype)
    bg = background_of(images)
    return torch.where(bg.isnan(), mean, bg)


def palette_of(images: torch.Tensor) -> Optional[torch.Tensor]:
    """(256,) the distinct values of ``images`` (sorted, padded with the largest) when there are
    at most 256 of them (images decoded from 8-bit pixels), else None."""
    vals = torch.unique(images)
    if vals.numel() > 256:
        return None
    return torch.cat([vals, vals[-1:].expand(256 - vals.numel())])


def build_nested_dictionary(images: torch.Tensor, ks: Sequence[int], *, image_ids: Optional[torch.Tensor] = None,
                            mode: str = "circular", tile_nodes: int = 1024,
                            chunk_elems: int = 1 << 24) -> NestedDictionary:
    """Build the tree of patches at sizes ``ks`` (odd, increasing).

    mode: "circular" (periodic ELS: every position, circular wrap), "interior" (the
    interior group of bbELS: at size k the centres at least k // 2 from every edge, zero
    padding never read; needs ``ks[-1] <= min(H, W)``) or "valid" (the ELS 'valid'
    dictionary: the same keys as "interior", met by every query pixel, circularly padded).
    """
    ks = tuple(sorted(set(int(k) for k in ks)))
    N, C, H, W = images.shape
    if mode not in ("circular", "interior", "valid"):
        raise ValueError(f"unknown nested dictionary mode {mode!r}")
    if mode != "circular" and ks[-1] > min(H, W):
        raise ValueError(f"an interior tree needs k <= {min(H, W)} (the image size); got k={ks[-1]}")
    dtype, dev = images.dtype, images.device
    if image_ids is None:
        image_ids = torch.arange(N, device=dev)
    r_max = ks[-1] // 2
    padded = (circular_pad(images, r_max) if mode == "circular" else F.pad(images, (r_max,) * 4)).contiguous()
    Hp, Wp = padded.shape[-2:]
    palette = palette_of(images)
    codes_flat = None
    if palette is not None:                     # rows kept as a byte per pixel (NestedLevel)
        codes = torch.searchsorted(palette, images.contiguous()).to(torch.uint8)
        assert torch.equal(palette[codes.long()], images)
        # interior trees never read their zero padding: code 0 there
        codes_flat = (circular_pad(codes, r_max) if mode == "circular" else F.pad(codes, (r_max,) * 4)).reshape(-1)
    all_off = _onion_flat_offsets(ks[-1], C, Hp, Wp, dev)                                    # (C k_max^2,)
    mu = _shift_of(images)                                                                  # (C,)

    levels: list[NestedLevel] = []
    prev: Optional[_KeyEnumerator] = None
    prev_ids: Optional[torch.Tensor] = None
    prev_log2: Optional[torch.Tensor] = None
    prev_k2 = 0
    for k in ks:
        r = k // 2
        if mode == "circular":
            pk, ys, xs = circular_pad(images, r).contiguous(), torch.arange(H, device=dev), torch.arange(W, device=dev)
        else:
            pk, ys, xs = F.pad(images, (r,) * 4), torch.arange(r, H - r, device=dev), torch.arange(r, W - r, device=dev)
        enum = _KeyEnumerator(pk, patch_offsets(C, k, *pk.shape[-2:], device=dev), k, N, ys, xs, (0, 0), image_ids)
        K = C * k * k
        img_chunk = max(1, max(1, chunk_elems // K) // enum.npos) * enum.npos
        rep, inverse, counts, _ = _hash_dedup(enum, enum.total, K, img_chunk)
        U = rep.numel()
        # tree order: children contiguous in their parent's order, and in image-major order
        # of their first occurrence among siblings (gathers then walk the images in order)
        if prev_ids is None:
            order = torch.argsort(rep)
            parent = None
        else:
            par = prev_ids[_index_in(prev, enum, rep)]                                       # parent of each node
            order = torch.argsort(par * enum.total + rep)
            parent = par[order].to(torch.int32)
        new_id = torch.empty(U, dtype=torch.long, device=dev)
        new_id[order] = torch.arange(U, device=dev)
        prev_ids = new_id[inverse]                                                          # (T_k,) per key
        del inverse
        rep, counts = rep[order], counts[order]
        n_i, y, x = rep // enum.npos, enum.pos_y[rep % enum.npos], enum.pos_x[rep % enum.npos]
        centre = images[n_i, :, y, x]                                                       # (U, C)
        vals = torch.cat([centre.t(), torch.ones(1, U, dtype=dtype, device=dev)], 0).contiguous()  # (C+1, U)
        cols = slice(C * prev_k2, C * k * k)
        log2c = counts.to(torch.float64).log2()
        dbias = log2c if parent is None else log2c - prev_log2[parent.long()]
        rep_base = n_i * (C * Hp * Wp) + (y + r_max) * Wp + (x + r_max)                    # centre, padded
        levels.append(NestedLevel(k, cols, all_off[cols].contiguous(), rep_base, parent,
                                  dbias.to(dtype), vals, mu.repeat(k * k - prev_k2), counts.to(torch.int32),
                                  palette=palette))
        prev, prev_k2, prev_log2 = enum, k * k, log2c
    del prev_ids
    tiles = _leaf_tiles(levels, tile_nodes)
    return NestedDictionary(ks, levels, padded.reshape(-1), mu, N * H * W, tiles, mode, codes_flat)


def _index_in(prev: "_KeyEnumerator", enum: "_KeyEnumerator", idx: torch.Tensor) -> torch.Tensor:
    """Enumeration index in ``prev`` of the keys at positions ``idx`` of ``enum`` (the same
    image and centre; prev's centres include enum's)."""
    n_i, pos = idx // enum.npos, idx % enum.npos
    y0, x0 = int(prev.pos_y[0]), int(prev.pos_x[0])
    w = int(prev.pos_x[-1]) - x0 + 1
    return n_i * prev.npos + (enum.pos_y[pos] - y0) * w + (enum.pos_x[pos] - x0)


def _leaf_tiles(levels: list[NestedLevel], tile_leaves: int) -> list[list[tuple[int, int, int]]]:
    """Per tile of leaves, per level ``(j0, j1, own0)`` (see :class:`NestedDictionary`).

    A leaf is a node without children: every finest node, and (interior trees) nodes whose
    occurrences all sit too close to an edge for the next size.  In tree order (sorted by
    (parent, node) at every level, a depth-first order) the leaves under any node form a
    range ``[start, start + n_leaves)``; a tile is a range of leaves, and a level's nodes
    under it are those whose leaf range meets it (again a range); a node is counted in the
    tile that holds its first leaf.
    """
    dev = levels[-1].rep_base.device
    n_leaf = [None] * len(levels)
    n_leaf[-1] = torch.ones(levels[-1].n_nodes, dtype=torch.long, device=dev)
    for i in range(len(levels) - 1, 0, -1):
        c = torch.zeros(levels[i - 1].n_nodes, dtype=torch.long, device=dev).index_add_(
            0, levels[i].parent.long(), n_leaf[i])
        n_leaf[i - 1] = c.clamp_(min=1)                                                    # childless: a leaf
    start = [torch.cumsum(n_leaf[0], 0) - n_leaf[0]]
    for i in range(1, len(levels)):
        par = levels[i].parent.long()
        before = torch.cumsum(n_leaf[i], 0) - n_leaf[i]                                     # within the level
        first = torch.full((levels[i - 1].n_nodes,), torch.iinfo(torch.long).max, dtype=torch.long, device=dev)
        first.scatter_reduce_(0, par, before, reduce="amin")                                # at the first sibling
        start.append(start[i - 1][par] + before - first[par])
    total = int(n_leaf[0].sum())
    l0 = torch.arange(0, total, tile_leaves, device=dev)
    l1 = torch.clamp(l0 + tile_leaves, max=total)
    per_level = []
    for i in range(len(levels)):
        end = start[i] + n_leaf[i]
        per_level.append((torch.searchsorted(end, l0, right=True).tolist(),
                          torch.searchsorted(start[i], l1).tolist(),
                          torch.searchsorted(start[i], l0).tolist()))
    return [[(per_level[i][0][t], per_level[i][1][t], per_level[i][2][t]) for i in range(len(levels))]
            for t in range(l0.numel())]


def _weighted_sums(S: torch.Tensor, m_ref: torch.Tensor, vals: torch.Tensor, scratch: list,
                   floor: float, use_native: bool) -> torch.Tensor:
    """(C+1, R) sums over nodes of ``vals * 2**(S - m_ref)`` (centres, then the normaliser);
    S (n, R) base-2 logits.  In one fused C pass when ``use_native`` (:mod:`._native`), else
    in torch ops with ``scratch[0]`` as the (reused, grown) exp2 buffer."""
    if use_native:
        return native.softmax_sums(S, m_ref, vals, floor)
    if scratch[0].numel() < S.numel():
        scratch[0] = torch.empty(S.numel(), dtype=S.dtype, device=S.device)
    E = scratch[0][: S.numel()].view(S.shape)
    torch.sub(S, m_ref[None, :], out=E).clamp_(min=floor).exp2_()
    return torch.mm(vals, E)


def _query_columns(Q: torch.Tensor, cols: slice, coef_lin: torch.Tensor, coef_sq: torch.Tensor, n: int,
                   width: Optional[int] = None) -> torch.Tensor:
    """(ring + 2, width or n) the engine's query columns ``[q' a/b^2 log2e, coef_sq, 1]`` of the
    first ``n`` rows of ``Q`` at a level's ring ``cols`` (zero beyond n up to ``width``)."""
    q = torch.zeros(cols.stop - cols.start + 2, n if width is None else width, dtype=Q.dtype, device=Q.device)
    q[:-2, :n] = (Q[:n, cols] * coef_lin[:n, None]).t()
    q[-2, :n] = coef_sq[:n]
    q[-1, :n] = 1
    return q


def _fused_row_block(nd: NestedDictionary, levels: list[NestedLevel], wanted: list[bool], Q: torch.Tensor,
                     coef_lin: torch.Tensor, coef_sq: torch.Tensor, nr: list[int], lo: float, skip: float,
                     nmax: int, counts: dict, refine: Optional[list[Float64Refinement]] = None):
    """Softmax sums (L, C+1, rows padded to 16) of one block of query rows over the whole tree,
    one fused C call per tile (``els_nested_tile``); float32, the rows of level i are the
    first ``nr[i]`` of ``Q`` (R, C k_max^2); ``nmax``: the most nodes of a level in a tile.

    Returns (acc, m, top): the sums relative to the running maxima m (L, rows padded), and the
    true maxima top, which m may lag by FUSED_SLACK_BITS (m itself without ``refine``).  With
    ``refine`` (a :class:`Float64Refinement` per level), the kernel records each wanted
    level's keys within REFINE_BITS of their rows' true maxima into them; None if its record
    buffers overflowed (the caller then runs the step-by-step path)."""
    L = len(levels)
    C = nd.mu.numel()
    mw = native.NESTED_MICRO_ROWS
    pad = -(-nr[0] // mw) * mw
    qaT = [_query_columns(Q, lv.cols, coef_lin, coef_sq, n, pad) for lv, n in zip(levels, nr)]
    m = torch.full((L, pad), float("-inf"), dtype=Q.dtype)
    acc = torch.zeros(L, C + 1, pad, dtype=Q.dtype)
    threads = torch.get_num_threads()
    top, records = m, None
    if refine is not None:
        top = torch.full((L, pad), float("inf"), dtype=Q.dtype)          # +inf: never recorded
        for i in range(L):
            if wanted[i]:
                top[i, : nr[i]].masked_fill_(refine[i].active, float("-inf"))
        # room in proportion to the block's rows (a thread may take most of them)
        records = native.RefineRecords(threads, REFINE_BITS, _engine.FUSED_RECORDS_PER_THREAD * -(-pad // 1024))
    block, scratch, csr = native.nested_tile_buffers(nmax, [lv.offsets.numel() + 2 for lv in levels], pad, threads,
                                                     FUSED_SCRATCH_BYTES, Q.dtype)
    item = Q.element_size()
    for tile in nd.tiles:
        fields, alive, prev_j0, j0s = [], [], 0, []
        for i, lv in enumerate(levels):
            j0, j1, own0 = tile[i]
            if j1 == j0:
                break
            par = lv.parent[j0:j1] - prev_j0 if i else None
            if lv.palette is not None and j1 <= lv.n_materialized:
                # kept byte-coded rows: the C step decodes them (the same bits as keys())
                K, rows = None, dict(codes=lv.kcodes.data_ptr() + j0 * lv.kcodes.stride(0), ldc=lv.kcodes.stride(0),
                                     palette=lv.palette.data_ptr(), mu=lv.mu_ring.data_ptr(),
                                     extra=lv.kextra.data_ptr() + j0 * lv.kextra.stride(0) * item,
                                     lde=lv.kextra.stride(0), K=0, ldK=0)
            else:
                K = lv.keys(nd.padded_flat, j0, j1)
                if K.stride(1) != 1:
                    K = K.contiguous()
                rows = dict(K=K.data_ptr(), ldK=K.stride(0))
            alive += [K, par]
            want = wanted[i] and own0 < j1
            counts["done"] += int(want)
            fields.append(native.nested_level_fields(
                **rows, D=lv.offsets.numel() + 2, n=j1 - j0, parent=0 if par is None else par.data_ptr(),
                Q=qaT[i].data_ptr(), ldQ=pad, own0=own0 - j0, want=want, rows=nr[i],
                vals=lv.vals.data_ptr() + j0 * item, ldv=lv.vals.stride(0), m=m[i].data_ptr(), acc=acc[i].data_ptr(),
                ldacc=pad, top=0 if records is None else top[i].data_ptr()))
            prev_j0 = j0
            j0s.append(j0)
        if not fields:
            continue
        if not native.nested_tile(torch.tensor(fields, dtype=torch.int64), C + 1, lo, skip, FUSED_SLACK_BITS, block,
                                  scratch, csr, threads, records):
            return None                                                    # a record buffer overflowed
        if records is not None:
            _add_records(records.take(), j0s, refine, top)
    return acc, m, top


def _add_records(taken, j0s: list[int], refine: list[Float64Refinement], top: torch.Tensor) -> None:
    """The fused kernel's records of one tile (level, row, node in the tile, logit) into each
    level's refinement (nodes numbered in the level), pruned against the true maxima."""
    level, rows, nodes, logits = taken
    for i, j0 in enumerate(j0s):
        sel = (level == i).nonzero().flatten()
        refine[i].add_records(rows[sel], nodes[sel].long() + j0, logits[sel])
        refine[i].prune(top[i, : refine[i].active.numel()])


def _stepwise_row_block(nd: NestedDictionary, levels: list[NestedLevel], wanted: list[bool], Q: torch.Tensor,
                        coef_lin: torch.Tensor, coef_sq: torch.Tensor, nr: list[int], underflow: float,
                        skip_below: float, counts: dict, refine: Optional[list[Float64Refinement]],
                        use_native: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Softmax sums of one block of query rows over the whole tree, step by step: per (tile,
    level) the parent gather and ring GEMM into a (nodes, rows) logit tile, then its softmax
    sums (one C pass when ``use_native``, else torch ops) and the refinement's records.
    Returns per level (acc (C+1, rows), m (rows,)); see :func:`nested_softmax_average`."""
    dtype, dev = Q.dtype, Q.device
    C = nd.mu.numel()
    Lb = len(levels)
    qaT = [_query_columns(Q, lv.cols, coef_lin, coef_sq, n) for lv, n in zip(levels, nr)]   # (ring+2, rows)
    m = [torch.full((n,), float("-inf"), dtype=dtype, device=dev) for n in nr[:Lb]]
    acc = [torch.zeros(C + 1, n, dtype=dtype, device=dev) for n in nr[:Lb]]
    # per level: was the last tile negligible?  (then check the next one's max first)
    checking = [True] * Lb
    scratch = [torch.empty(0, dtype=dtype, device=dev)]
    m_known = [False] * Lb                    # every row of the level has a finite running max
    for tile in nd.tiles:
        S_prev, prev_j0 = None, 0
        for i in range(Lb):
            lv = levels[i]
            j0, j1, own0 = tile[i]
            if j1 == j0:
                break                                                                 # no deeper nodes here
            kaug = lv.keys(nd.padded_flat, j0, j1)                                    # (n, ring+2)
            # S: base-2 logits of nodes j0..j1-1 including their log2(count) bias
            # NB: fresh tensors; into two reused buffers (index_select(out=), mm(out=)) the
            # sweep at N = 5000 ran 1.6x slower at t = 0.5 and 5.5x at t = 0.9
            if S_prev is None:
                S = torch.mm(kaug, qaT[i])                                            # (n, rows)
            else:
                par = lv.parent[j0:j1].long() - prev_j0
                S = (S_prev if nr[i] == S_prev.shape[1] else S_prev[:, : nr[i]]).index_select(0, par)
                S.addmm_(kaug, qaT[i])
            S_prev, prev_j0 = S, j0
            if j1 == own0 or not wanted[i]:
                continue
            S_own = S[own0 - j0:]
            m_old = m[i]
            if checking[i] or not m_known[i]:
                tmax = S_own.amax(0)
                if bool((tmax - m_old).max() < skip_below):
                    counts["skipped"] += 1
                    continue                                                          # negligible tile
                m_new = torch.maximum(m_old, tmax)
            else:
                m_new = m_old                                                         # optimistic, see below
            vals = lv.vals[:, own0:j1]
            part = _weighted_sums(S_own, m_new, vals, scratch, underflow, use_native)  # (C+1, rows)
            if not checking[i]:
                # NB: without the tile max, a logit far above the running max overflows;
                # then redo the tile with its max (rare: the max settles early).  One
                # sync: the normaliser's largest entry (NaN / inf compare False).
                z_hi = float(part[C].max())
                if not z_hi < 2.0 ** 60:
                    counts["redone"] += 1
                    checking[i] = True
                    m_new = torch.maximum(m_old, S_own.amax(0))
                    part = _weighted_sums(S_own, m_new, vals, scratch, underflow, use_native)
                elif z_hi < 2.0 ** skip_below:
                    counts["skipped"] += 1
                    checking[i] = True                                                # negligible: check next
                    continue
            else:
                checking[i] = refine is not None                                      # it needs tile maxima
            if refine is not None:
                refine[i].add(S_own, tmax, m_new, 0, own0, keys_first=True)
            if m_new is not m_old:
                acc[i].mul_(torch.exp2(m_old - m_new)[None, :])
            acc[i].add_(part)
            m[i] = m_new
            m_known[i] = True
            counts["done"] += 1
        if refine is not None:
            for i in range(Lb):
                refine[i].prune(m[i])
    return acc, m


def nested_softmax_average(nd: NestedDictionary, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
                           ks: Optional[Sequence[int]] = None, row_block: int = 1024,
                           stats: Optional[dict] = None, fuse: bool = True,
                           log_norms: Optional[dict] = None) -> dict[int, torch.Tensor]:
    """Softmax average of key centres at every level, for every query pixel.

    Per (tile, level) the softmax either takes the tile's maximum first (and skips the tile
    when it is negligible, see :mod:`._engine`) or, while the previous tile of that level
    was not negligible, exponentiates against the running maximum at once and takes the
    maximum only if a weight overflows (then the tile is redone): at high noise the
    maximum settles within a few tiles and the extra pass is saved.

    Interior trees answer, at size k, only the pixels at least k // 2 from every edge (the
    bbELS interior group); query rows are sorted by that distance so that the rows of each
    level are a prefix of every row block.

    Args:
        nd: the nested dictionary.
        x: (B, C, H, W) queries (padded here as the tree's images are).
        a, b: (B,) schedule coefficients.
        ks: the sizes wanted (a subset of ``nd.ks``; default all): levels above the largest
            are not computed, and only wanted levels pay for a softmax.
        row_block: query pixels per block of the step-by-step path (each block walks every
            tile); the fused C step takes blocks of up to FUSED_MAX_ROWS.
        stats: if a dict, receives counts of (tile, level) steps: "done", "skipped", "redone"
            (the fused C step counts every step with a softmax as "done").
        fuse: run each tile's levels as one fused C step where it applies (float32, native
            kernels built; at low noise it records the float64 refinement's keys, and falls
            back to the step by step path should its record buffers overflow); False: the
            step by step path.
        log_norms: if a dict, receives ``{k: (B, H, W) float64}`` the absolute log2
            normaliser of each wanted level (:func:`._engine.log2_norm_of`; NaN where the
            level does not answer), with which answers over disjoint trees merge exactly.
    Returns:
        {k: (B, C, H, W) mean centre}; for interior trees NaN at the pixels closer than
        k // 2 to an edge (not in the interior group at that k).
    """
    counts = {"done": 0, "skipped": 0, "redone": 0}
    B, C, H, W = x.shape
    dtype = x.dtype
    ks = nd.ks if ks is None else tuple(ks)
    if not set(ks) <= set(nd.ks):
        raise ValueError(f"sizes {sorted(set(ks) - set(nd.ks))} are not in this nested dictionary ({nd.ks})")
    wanted = [k in ks for k in nd.ks]
    L = max(i for i, w in enumerate(wanted) if w) + 1                                      # levels computed
    levels = nd.levels[:L]
    r_max = nd.ks[-1] // 2
    xp = (F.pad(x, (r_max,) * 4) if nd.mode == "interior" else circular_pad(x, r_max)).contiguous()
    dev = x.device
    all_off = _onion_flat_offsets(nd.ks[-1], C, *xp.shape[-2:], device=dev)
    rows = torch.arange(B * H * W, device=dev)                                             # (b, y, x) order
    if nd.mode == "interior":
        y, xx = rows % (H * W) // W, rows % W
        depth = torch.minimum(torch.minimum(y, H - 1 - y), torch.minimum(xx, W - 1 - xx))
        depth, order = torch.sort(depth, descending=True, stable=True)
        # rows of level i: depth >= k_i // 2 (a prefix of the sorted rows)
        n_rows = [int((depth >= lv.k // 2).sum()) for lv in levels]
        rows = order[: n_rows[0]]
    else:
        n_rows = [rows.numel()] * L
    Q_raw = xp.reshape(-1)[_centre_flat_index(B, C, H, W, r_max, dev)[rows, None] + all_off[None, :]]  # (R, C k^2)
    R = Q_raw.shape[0]
    bi = rows // (H * W)                                                                   # query image of a row
    a_row, b_row = a[bi], b[bi]
    mu_cols = nd.mu.repeat(all_off.numel() // C)                                           # onion layout
    Q = Q_raw - a_row[:, None] * mu_cols[None, :]                                          # q' = q - a mu
    coef_lin = LOG2E * a_row / b_row**2
    coef_sq = -LOG2E * a_row**2 / (2 * b_row**2)
    refine_all = refine_rows(dtype, coef_sq)                                               # (R,) or None
    underflow = exp2_floor(dtype)
    skip_below = skip_threshold(nd.total_keys)
    means = torch.full((L, C, R), float("nan"), dtype=dtype, device=dev)
    norms = torch.full((L, R), float("nan"), dtype=torch.float64, device=dev) if log_norms is not None else None

    def keep_norm(i: int, rr: slice, m_i: torch.Tensor, z_i: torch.Tensor) -> None:
        if norms is not None:
            width = C * levels[i].k ** 2                                                   # the level's window
            norms[i, rr] = log2_norm_of(m_i, z_i, Q[rr, :width], b_row[rr])
    # float32 softmax sums run fused in C when the native kernels build (:mod:`._native`)
    use_native = dtype == torch.float32 and C <= native.MAX_CHANNELS and dev.type == "cpu" and native.available()
    # float32: each tile's levels as one fused C step (els_nested_tile), which also records the
    # keys for the float64 refinement where it applies
    fused = use_native and fuse
    nmax = max(j1 - j0 for t in nd.tiles for j0, j1, _ in t[:L]) if fused else 0

    if refine_all is not None:
        a_row64, b_row64 = a_row.to(torch.float64).contiguous(), b_row.to(torch.float64).contiguous()

    def block_rows(r0: int, r1: int) -> tuple[list[int], int]:
        nr = [max(0, min(r1 - r0, n - r0)) for n in n_rows]                                # active rows per level
        return nr, sum(1 for n in nr if n)                                                 # levels with rows

    def fresh_refinement(r0: int, nr: list[int], Lb: int):
        return None if refine_all is None else [Float64Refinement(refine_all[r0:r0 + n]) for n in nr[:Lb]]

    def finish(r0: int, nr: list[int], Lb: int, acc, m, top, refine) -> None:
        """Means (and norms) of rows r0.. from their softmax sums, refined where needed."""
        for i in range(Lb):
            if refine is None:
                means[i, :, r0:r0 + nr[i]] = acc[i][:C] / acc[i][C:]
                if wanted[i]:
                    keep_norm(i, slice(r0, r0 + nr[i]), m[i], acc[i][C])
                continue
            lv = levels[i]
            win = all_off[: C * lv.k * lv.k]                                               # the level's window

            def exact(r, j, lv=lv, win=win):
                s64 = exact_logits_at(Q_raw, r0 + r, nd.padded_flat, lv.rep_base[j], win, mu_cols[: win.numel()],
                                      None, a_row64, b_row64, lv.count[j].to(torch.float64).log2())
                return s64, lv.vals[:, j].t()

            acc64 = refine[i].corrected(acc[i].t(), m[i], exact, top=top[i])                  # (rows, C+1)
            means[i, :, r0:r0 + nr[i]] = (acc64[:, :C] / acc64[:, C:]).t().to(dtype)
            if wanted[i]:
                keep_norm(i, slice(r0, r0 + nr[i]), m[i], acc64[:, C])

    def stepwise(r0: int, r1: int) -> None:
        nr, Lb = block_rows(r0, r1)
        refine = fresh_refinement(r0, nr, Lb)
        acc, m = _stepwise_row_block(nd, levels[:Lb], wanted, Q[r0:r1], coef_lin[r0:r1], coef_sq[r0:r1], nr,
                                     underflow, skip_below, counts, refine, use_native)
        finish(r0, nr, Lb, acc, m, m, refine)

    # NB: the fused step takes many more rows per block than the torch path's (nodes, rows) logit
    # tiles allow: each block walks the whole tree (a C call per tile, whose key rows are converted
    # afresh per call), so fewer blocks cost less Python and fewer conversions
    def fused_block(r0: int, r1: int) -> bool:
        """Rows r0..r1-1 by the fused step; False (nothing written) when its record buffers
        overflowed or the refinement gave up (more near-maximum keys than it holds)."""
        nr, Lb = block_rows(r0, r1)
        refine = fresh_refinement(r0, nr, Lb)
        large = r1 - r0 > row_block
        with warnings.catch_warnings():
            if large:                               # a refinement that gives up is redone below
                warnings.simplefilter("ignore", RuntimeWarning)
            block = _fused_row_block(nd, levels[:Lb], wanted, Q[r0:r1], coef_lin[r0:r1], coef_sq[r0:r1], nr,
                                     underflow, skip_below, nmax, counts, refine)
        if block is None or (large and refine is not None and any(f.gave_up for f in refine)):
            return False
        acc, m, top = ([t[i, ..., : nr[i]] for i in range(Lb)] for t in block)
        finish(r0, nr, Lb, acc, m, top, refine)
        return True

    step = max(row_block, min(FUSED_MAX_ROWS, FUSED_BLOCK_ELEMS // Q.shape[1])) if fused else row_block
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        if fused and fused_block(r0, r1):
            continue
        # step by step; or, after a large fused block overflowed, in blocks of row_block rows,
        # fused where they do not overflow (the refinement's room is per block)
        for s0 in range(r0, r1, row_block):
            s1 = min(r1, s0 + row_block)
            if not (fused and r1 - r0 > row_block and fused_block(s0, s1)):
                stepwise(s0, s1)
    if stats is not None:
        stats.update(counts)
    out = {}
    for i, k in enumerate(nd.ks[:L]):
        if not wanted[i]:
            continue
        full = torch.full((C, B * H * W), float("nan"), dtype=dtype, device=dev)
        full[:, rows] = means[i]
        out[k] = full.reshape(C, B, H * W).permute(1, 0, 2).reshape(B, C, H, W).contiguous()
        if norms is not None:
            nfull = torch.full((B * H * W,), float("nan"), dtype=torch.float64, device=dev)
            nfull[rows] = norms[i]
            log_norms[k] = nfull.reshape(B, H, W)
    return out
