"""Novelty: is a sample a copy of a training image, and if not, where does it come from?

References:
- Carlini et al. 2023, "Extracting training data from diffusion models"; Somepalli et al.
  2023: a generated image is a copy when its nearest training image is much nearer than the
  second nearest (ratio test).
- M. Kamb and S. Ganguli, "An analytic theory of creativity in convolutional diffusion
  models", ICML 2025 (arXiv 2412.20292), Theorem 4.1 and docs/theory.md section 2: at t -> 0
  every output pixel is the centre of its nearest training patch (a patch mosaic); the
  machine's diagnostics say which training image and location each pixel came from.

Three analyses, each a pure function, and :func:`assess_novelty` that runs them on a
:class:`els_audit.predict.PredictionResult`:

1. :func:`memorization`: L2 distance (over all pixels and channels) from each sample to its
   nearest and second-nearest training image, ``ratio = d1 / d2``, memorised when
   ``ratio < threshold`` (default 1/3).  Baseline: the same statistic for training images
   among themselves, leave-one-out (a training image is not its own neighbour).
2. :func:`mosaic`: from the fitted machine's last-step diagnostics, the mosaic map, the
   number of distinct source images, and the seams (defined in :func:`mosaic`).
3. :func:`locality_novelty`: pixels that the local machine explains and the memorising IS
   machine does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from .serialize import json_float

__all__ = [
    "nearest_neighbours",
    "MemorizationResult",
    "memorization",
    "MosaicResult",
    "mosaic",
    "LocalityNoveltyResult",
    "locality_novelty",
    "NoveltyResult",
    "assess_novelty",
    "DEFAULT_THRESHOLD",
]

DEFAULT_THRESHOLD = 1.0 / 3.0
ArrayLike = Union[torch.Tensor, np.ndarray]


def _t64(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor or a numpy array; got {type(x).__name__}")
    x = x.detach().cpu().to(torch.float64)
    if not torch.all(torch.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _images(x: ArrayLike, name: str) -> torch.Tensor:
    x = _t64(x, name)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, C, H, W) array; got shape {tuple(x.shape)}")
    return x


# ---------------------------------------------------------------------------------------
# 1. memorisation
# ---------------------------------------------------------------------------------------
def nearest_neighbours(queries: ArrayLike, references: ArrayLike, n: int = 2, *,
                       exclude: Optional[ArrayLike] = None, chunk_elems: int = 1 << 22
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` nearest references of each query by exact L2 distance.

    Candidates are found with the expansion ``|q|^2 + |p|^2 - 2 q.p`` (float64, chunked);
    the ``n + 1`` best are then re-measured as ``|q - p|`` directly and re-sorted, so the
    distances returned are exact up to float64 rounding (an identical pair gives 0).

    Args:
        queries: (Q, ...) arrays; everything after dim 0 is one vector.
        references: (N, ...) arrays of the same trailing shape.
        n: neighbours per query.
        exclude: optional (Q,) reference index never returned for each query (leave-one-out).
        chunk_elems: bounds the (queries x references) block held at once.
    Returns:
        ``(index, distance)``: int64 (Q, n) reference indices and float64 (Q, n) distances,
        nearest first (ties by lower index).
    """
    q = _t64(queries, "queries")
    p = _t64(references, "references")
    if q.shape[1:] != p.shape[1:]:
        raise ValueError(f"queries {tuple(q.shape[1:])} and references {tuple(p.shape[1:])} differ in shape")
    Q, N = q.shape[0], p.shape[0]
    q, p = q.reshape(Q, -1), p.reshape(N, -1)                                         # (Q, D), (N, D)
    avail = N - (1 if exclude is not None else 0)
    if n < 1 or avail < n:
        raise ValueError(f"need at least {n} reference(s) per query (leave-one-out: {exclude is not None}); "
                         f"got {N} references")
    ex = None if exclude is None else torch.as_tensor(np.asarray(exclude), dtype=torch.long).reshape(-1)
    if ex is not None and ex.shape != (Q,):
        raise ValueError(f"exclude must have one index per query ({Q}); got shape {tuple(ex.shape)}")
    pn = (p * p).sum(1)                                                                # (N,)
    m = min(n + 1, avail)
    idx_out = np.empty((Q, n), dtype=np.int64)
    dist_out = np.empty((Q, n))
    rows = max(1, chunk_elems // max(1, N))
    for s in range(0, Q, rows):
        e = min(Q, s + rows)
        qc = q[s:e]                                                                    # (q, D)
        d2 = (qc * qc).sum(1)[:, None] + pn[None, :] - 2.0 * qc @ p.t()                # (q, N)
        if ex is not None:
            d2[torch.arange(e - s), ex[s:e]] = math.inf
        cand = torch.topk(d2, m, dim=1, largest=False).indices                         # (q, m)
        exact = (qc[:, None, :] - p[cand]).pow(2).sum(-1).sqrt()                       # (q, m)
        # re-sort by (exact distance, index)
        order = np.lexsort((cand.numpy(), exact.numpy()), axis=1)[:, :n]                # (q, n)
        idx_out[s:e] = np.take_along_axis(cand.numpy(), order, 1)
        dist_out[s:e] = np.take_along_axis(exact.numpy(), order, 1)
    return idx_out, dist_out


def _ratio(d1: np.ndarray, d2: np.ndarray) -> np.ndarray:
    # NB: d2 = 0 means the two nearest training images are identical (a duplicate in the
    # data) and the query equals them: a copy, ratio 0.  Near-duplicates in the data make
    # the ratio of a true copy approach 1: the test misses copies of duplicated images.
    out = np.zeros_like(d1)
    ok = d2 > 0
    out[ok] = d1[ok] / d2[ok]
    return out


@dataclass(frozen=True, eq=False)
class MemorizationResult:
    """Nearest-neighbour copy detection, with the training set's own statistic beside it.

    Attributes (B samples, Q baseline queries):
        threshold: memorised when ``ratio < threshold``.
        n_train: training images searched.
        nearest_index, second_index: (B,) int64 training-image indices.
        nearest_distance, second_distance: (B,) L2 distances (all pixels and channels).
        ratio: (B,) ``nearest / second`` (0 when both are 0).
        memorized: (B,) bool.
        memorized_fraction: mean of ``memorized``.
        baseline_index: (Q,) training images used as leave-one-out queries.
        baseline_nearest_distance, baseline_ratio: (Q,) their statistics among the others.
        baseline_memorized_fraction: fraction of baseline ratios below the threshold (how
            often the test fires on the data itself, e.g. from duplicates).
    """

    threshold: float
    n_train: int
    nearest_index: np.ndarray
    second_index: np.ndarray
    nearest_distance: np.ndarray
    second_distance: np.ndarray
    ratio: np.ndarray
    memorized: np.ndarray
    memorized_fraction: float
    baseline_index: np.ndarray
    baseline_nearest_distance: np.ndarray
    baseline_ratio: np.ndarray
    baseline_memorized_fraction: float

    def arrays(self) -> dict[str, np.ndarray]:
        return {"nearest_index": self.nearest_index, "nearest_distance": self.nearest_distance,
                "second_distance": self.second_distance, "nn_ratio": self.ratio, "memorized": self.memorized,
                "baseline_index": self.baseline_index, "baseline_ratio": self.baseline_ratio,
                "baseline_nearest_distance": self.baseline_nearest_distance}

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "n_train": self.n_train,
            "memorized_fraction": self.memorized_fraction,
            "median_ratio": json_float(np.median(self.ratio)),
            "median_nearest_distance": json_float(np.median(self.nearest_distance)),
            "baseline": {
                "n_queries": int(self.baseline_index.size),
                "memorized_fraction": self.baseline_memorized_fraction,
                "median_ratio": json_float(np.median(self.baseline_ratio)),
                "median_nearest_distance": json_float(np.median(self.baseline_nearest_distance)),
            },
            "samples": [{"nearest_index": int(self.nearest_index[i]),
                         "nearest_distance": float(self.nearest_distance[i]),
                         "second_distance": float(self.second_distance[i]),
                         "ratio": float(self.ratio[i]), "memorized": bool(self.memorized[i])}
                        for i in range(self.ratio.size)],
        }


def memorization(samples: ArrayLike, train_images: ArrayLike, *, threshold: float = DEFAULT_THRESHOLD,
                 baseline_limit: int = 1000, seed: int = 0) -> MemorizationResult:
    """Nearest-neighbour copy test of each sample against the training images.

    Args:
        samples: (B, C, H, W) generated images (e.g. the network's samples).
        train_images: (N, C, H, W) training images, N >= 3 (the whole training set if you
            can: a copy of an image outside it goes unnoticed).
        threshold: memorised when nearest / second-nearest distance < threshold (1/3 after
            Carlini et al. 2023).
        baseline_limit: at most this many training images serve as leave-one-out queries
            for the baseline (a seeded random subset; each is still compared with all N).
        seed: seed of that subset.
    Returns:
        :class:`MemorizationResult`.
    """
    x = _images(samples, "samples")
    tr = _images(train_images, "train_images")
    if x.shape[1:] != tr.shape[1:]:
        raise ValueError(f"samples {tuple(x.shape[1:])} and training images {tuple(tr.shape[1:])} differ in shape")
    N = tr.shape[0]
    if N < 3:
        raise ValueError(f"the nearest/second-nearest test and its leave-one-out baseline need >= 3 training "
                         f"images; got {N}")
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise ValueError(f"threshold must be in (0, 1]; got {threshold!r}")
    if not isinstance(baseline_limit, int) or baseline_limit < 1:
        raise ValueError(f"baseline_limit must be a positive integer; got {baseline_limit!r}")
    idx, dist = nearest_neighbours(x, tr, 2)                                           # (B, 2), (B, 2)
    ratio = _ratio(dist[:, 0], dist[:, 1])                                             # (B,)
    mem = ratio < threshold
    # NB: the baseline uses a seeded subset of at most baseline_limit query images
    if baseline_limit >= N:
        bidx = np.arange(N)
    else:
        bidx = np.sort(np.random.default_rng(seed).choice(N, size=baseline_limit, replace=False))
    bi, bd = nearest_neighbours(tr[torch.from_numpy(bidx)], tr, 2, exclude=bidx)        # (Q, 2)
    bratio = _ratio(bd[:, 0], bd[:, 1])                                                # (Q,)
    return MemorizationResult(
        threshold=float(threshold), n_train=int(N), nearest_index=idx[:, 0], second_index=idx[:, 1],
        nearest_distance=dist[:, 0], second_distance=dist[:, 1], ratio=ratio, memorized=mem,
        memorized_fraction=float(mem.mean()), baseline_index=bidx.astype(np.int64),
        baseline_nearest_distance=bd[:, 0], baseline_ratio=bratio,
        baseline_memorized_fraction=float((bratio < threshold).mean()),
    )


# ---------------------------------------------------------------------------------------
# 2. the mosaic
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class MosaicResult:
    """Where each pixel's patch came from, and where the mosaic has seams.

    Attributes (B samples of H x W):
        source_image, source_y, source_x: (B, H, W) int64 provenance of each pixel.
        ambiguous: (B, H, W) bool, the winning patch was one of several identical patches
            (multiplicity > 1), so its provenance is one representative among them.
        seam_right: (B, H, W-1) bool, seam between (y, x) and (y, x+1).
        seam_down: (B, H-1, W) bool, seam between (y, x) and (y+1, x).
        n_sources: (B,) distinct source images among unambiguous pixels.
        dominant_source: (B,) the most frequent source image among unambiguous pixels (-1
            if none); dominant_fraction: (B,) its share of the unambiguous pixels.
        seam_count: (B,) seam edges; seam_fraction: (B,) of all H(W-1) + (H-1)W edges.
        ambiguous_fraction: (B,) share of ambiguous pixels.
        periodic: source offsets were compared modulo (H, W).
    """

    source_image: np.ndarray
    source_y: np.ndarray
    source_x: np.ndarray
    ambiguous: np.ndarray
    seam_right: np.ndarray
    seam_down: np.ndarray
    n_sources: np.ndarray
    dominant_source: np.ndarray
    dominant_fraction: np.ndarray
    seam_count: np.ndarray
    seam_fraction: np.ndarray
    ambiguous_fraction: np.ndarray
    periodic: bool

    def seam_pixels(self) -> np.ndarray:
        """(B, H, W) bool: pixels on either side of a seam edge (for drawing)."""
        out = np.zeros(self.source_image.shape, dtype=bool)
        out[:, :, :-1] |= self.seam_right
        out[:, :, 1:] |= self.seam_right
        out[:, :-1, :] |= self.seam_down
        out[:, 1:, :] |= self.seam_down
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mosaic_source_image": self.source_image, "mosaic_source_y": self.source_y,
                "mosaic_source_x": self.source_x, "mosaic_ambiguous": self.ambiguous,
                "seam_right": self.seam_right, "seam_down": self.seam_down, "seam_pixels": self.seam_pixels()}

    def to_dict(self) -> dict:
        return {
            "periodic": self.periodic,
            "median_n_sources": json_float(np.median(self.n_sources)),
            "median_seam_fraction": json_float(np.median(self.seam_fraction)),
            "samples": [{"n_sources": int(self.n_sources[i]), "dominant_source": int(self.dominant_source[i]),
                         "dominant_fraction": json_float(self.dominant_fraction[i]),
                         "seam_count": int(self.seam_count[i]), "seam_fraction": float(self.seam_fraction[i]),
                         "ambiguous_fraction": float(self.ambiguous_fraction[i])}
                        for i in range(self.n_sources.size)],
        }


def _int_map(x, name: str) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if x.ndim != 3 or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name} must be an integer (B, H, W) array; got {x.dtype} {x.shape}")
    return x.astype(np.int64)


def _consistent(si, sy, sx, amb, imgs, ey: int, ex: int, sl_p, sl_q, periodic: bool, H: int, W: int):
    """(B, ...) bool: does q = p + (ey, ex) continue p's source?  See :func:`mosaic`."""
    ip, iq = si[sl_p], si[sl_q]
    yp, yq, xp, xq = sy[sl_p], sy[sl_q], sx[sl_p], sx[sl_q]
    ny, nx = yp + ey, xp + ex                                                          # p's continuation
    if periodic:
        ny, nx = ny % H, nx % W
        dy, dx = (yq - ny) % H, (xq - nx) % W
    else:
        dy, dx = yq - ny, xq - nx
    ok = (ip == iq) & (dy == 0) & (dx == 0)
    need = amb[sl_p] | amb[sl_q]
    check = need & ~ok
    if imgs is not None and check.any():
        inb = (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
        c = check & inb
        b, yy, xx = np.nonzero(c)
        v_next = imgs[ip[b, yy, xx], :, ny[b, yy, xx], nx[b, yy, xx]]                 # (n, C)
        v_q = imgs[iq[b, yy, xx], :, yq[b, yy, xx], xq[b, yy, xx]]                     # (n, C)
        ok[b, yy, xx] = np.all(v_next == v_q, axis=1)
    return ok


def mosaic(source_image: ArrayLike, source_y: ArrayLike, source_x: ArrayLike,
           multiplicity: Optional[ArrayLike] = None, *, images: Optional[ArrayLike] = None,
           periodic: bool = False) -> MosaicResult:
    """Mosaic statistics from a machine's per-pixel provenance (its diagnostics).

    Seam, precisely: for 4-neighbours p and q = p + e, e in {(0, 1), (1, 0)} (pairs inside
    the image; the wrap-around pair of a periodic image is not counted), let p's source be
    (image n, y, x).  The pair is seamless when q's source is (n, y + e_y, x + e_x): the
    same training image, continued by the same step (modulo (H, W) when ``periodic``, i.e.
    for the ELS machine's periodic dictionary).  Otherwise it is a seam: different source
    images, or the same image at non-adjacent offsets.  NB: when either winner is ambiguous
    (one of several identical patches, e.g. a flat background, reported through one
    representative), the pair is instead seamless if training image n's pixel at
    (y + e_y, x + e_x) equals q's source pixel in every channel: some copy could have
    continued p there.  This needs ``images``.

    Args:
        source_image, source_y, source_x: (B, H, W) integer provenance: index into
            ``images`` and the patch centre.
        multiplicity: (B, H, W) number of identical entries sharing the winner's weight;
            ``None`` = every winner is unique.
        images: (N, C, H, W) the images the machine was built on (``machine.images``);
            required when some multiplicity is > 1.
        periodic: compare source offsets modulo (H, W).
    Returns:
        :class:`MosaicResult`.
    """
    si = _int_map(source_image, "source_image")
    sy = _int_map(source_y, "source_y")
    sx = _int_map(source_x, "source_x")
    if not (si.shape == sy.shape == sx.shape):
        raise ValueError(f"source maps differ in shape: {si.shape}, {sy.shape}, {sx.shape}")
    B, H, W = si.shape
    amb = np.zeros(si.shape, dtype=bool) if multiplicity is None else _int_map(multiplicity, "multiplicity") > 1
    if amb.shape != si.shape:
        raise ValueError(f"multiplicity has shape {amb.shape}; expected {si.shape}")
    imgs = None
    if images is not None:
        imgs = _images(images, "images").numpy()
        if imgs.shape[2:] != (H, W):
            raise ValueError(f"images are {imgs.shape[2:]} but the maps are {(H, W)}")
        if si.min() < 0 or si.max() >= imgs.shape[0]:
            raise ValueError(f"source_image indices must lie in [0, {imgs.shape[0]}); pass the machine's images")
    elif amb.any():
        raise ValueError("some winners are merged duplicates (multiplicity > 1): pass images=machine.images so "
                         "seams can be checked by content")
    if sy.min() < 0 or sy.max() >= H or sx.min() < 0 or sx.max() >= W:
        raise ValueError(f"source_y/source_x must lie inside the {H} x {W} image")
    right = ~_consistent(si, sy, sx, amb, imgs, 0, 1, np.s_[:, :, :-1], np.s_[:, :, 1:], periodic, H, W)
    down = ~_consistent(si, sy, sx, amb, imgs, 1, 0, np.s_[:, :-1, :], np.s_[:, 1:, :], periodic, H, W)
    n_src = np.zeros(B, dtype=np.int64)
    dom = np.full(B, -1, dtype=np.int64)
    dom_frac = np.full(B, np.nan)
    for i in range(B):
        u = si[i][~amb[i]]
        if u.size:
            vals, counts = np.unique(u, return_counts=True)
            n_src[i] = vals.size
            dom[i] = vals[np.argmax(counts)]
            dom_frac[i] = counts.max() / u.size
    count = right.reshape(B, -1).sum(1) + down.reshape(B, -1).sum(1)
    edges = H * (W - 1) + (H - 1) * W
    return MosaicResult(
        source_image=si, source_y=sy, source_x=sx, ambiguous=amb, seam_right=right, seam_down=down,
        n_sources=n_src, dominant_source=dom, dominant_fraction=dom_frac, seam_count=count.astype(np.int64),
        seam_fraction=count / edges if edges else np.zeros(B), ambiguous_fraction=amb.reshape(B, -1).mean(1),
        periodic=bool(periodic),
    )


# ---------------------------------------------------------------------------------------
# 3. where locality drives novelty
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LocalityNoveltyResult:
    """Pixels the local machine explains and the memorising IS machine does not.

    Attributes:
        explained_tol, unexplained_tol: absolute thresholds in data units.
        machine_error, is_error: (B, H, W) per-pixel error vs the network (RMS over channels).
        novel: (B, H, W) bool, ``machine_error <= explained_tol`` and
            ``is_error >= unexplained_tol``.
        novel_fraction: (B,) share of novel pixels.
    """

    explained_tol: float
    unexplained_tol: float
    machine_error: np.ndarray
    is_error: np.ndarray
    novel: np.ndarray
    novel_fraction: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {"machine_error": self.machine_error, "is_error": self.is_error, "novelty_map": self.novel}

    def to_dict(self) -> dict:
        return {"explained_tol": self.explained_tol, "unexplained_tol": self.unexplained_tol,
                "median_novel_fraction": json_float(np.median(self.novel_fraction)),
                "novel_fraction": [float(v) for v in self.novel_fraction]}


def locality_novelty(network: ArrayLike, machine_samples: ArrayLike, is_samples: ArrayLike, *,
                     data_range: float = 2.0, explained: float = 0.1, unexplained: float = 0.25
                     ) -> LocalityNoveltyResult:
    """Map the pixels where locality, not memorisation, explains the network's sample.

    Per pixel, the error of a machine's sample is the RMS over channels of its difference
    from the network's sample.  A pixel is novel-by-locality when the fitted machine's error
    is at most ``explained * data_range`` and the IS machine's error at least
    ``unexplained * data_range``.  With the default data range 2 (images in [-1, 1]) these
    are 0.2 and 0.5: within a tenth of the range of the local machine, and at least a
    quarter of the range away from the memorising one.

    Args:
        network, machine_samples, is_samples: (B, C, H, W) final samples from the same seeds.
        data_range: max - min of the data (2 for [-1, 1]).
        explained, unexplained: thresholds as fractions of ``data_range``.
    Returns:
        :class:`LocalityNoveltyResult`.
    """
    net = _images(network, "network")
    mac = _images(machine_samples, "machine_samples")
    ism = _images(is_samples, "is_samples")
    if not (net.shape == mac.shape == ism.shape):
        raise ValueError(f"samples differ in shape: {tuple(net.shape)}, {tuple(mac.shape)}, {tuple(ism.shape)}")
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0; got {data_range!r}")
    if not (0 <= explained < unexplained):
        raise ValueError(f"need 0 <= explained < unexplained; got {explained!r}, {unexplained!r}")
    em = (mac - net).pow(2).mean(1).sqrt().numpy()                                     # (B, H, W)
    ei = (ism - net).pow(2).mean(1).sqrt().numpy()                                     # (B, H, W)
    lo, hi = explained * data_range, unexplained * data_range
    novel = (em <= lo) & (ei >= hi)
    return LocalityNoveltyResult(explained_tol=float(lo), unexplained_tol=float(hi), machine_error=em,
                                 is_error=ei, novel=novel, novel_fraction=novel.reshape(novel.shape[0], -1).mean(1))


# ---------------------------------------------------------------------------------------
# all three on a prediction
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class NoveltyResult:
    """The novelty stage: copy test, mosaic (if diagnostics were kept) and locality map."""

    seeds: tuple[int, ...]
    memorization: MemorizationResult
    mosaic: Optional[MosaicResult]
    locality: LocalityNoveltyResult

    @property
    def memorized_fraction(self) -> float:
        return self.memorization.memorized_fraction

    def arrays(self) -> dict[str, np.ndarray]:
        out = dict(self.memorization.arrays())
        if self.mosaic is not None:
            out.update(self.mosaic.arrays())
        out.update(self.locality.arrays())
        return out

    def to_dict(self) -> dict:
        mem, mos, loc = self.memorization.to_dict(), None, self.locality.to_dict()
        if self.mosaic is not None:
            mos = self.mosaic.to_dict()
        per_seed = []
        for i, s in enumerate(self.seeds):
            row = {"seed": s, **mem["samples"][i], "novel_fraction": loc["novel_fraction"][i]}
            if mos is not None:
                row.update(mos["samples"][i])
            per_seed.append(row)
        return {
            "memorized_fraction": self.memorized_fraction,
            "threshold": self.memorization.threshold,
            "memorization": {k: v for k, v in mem.items() if k != "samples"},
            "mosaic": None if mos is None else {k: v for k, v in mos.items() if k != "samples"},
            "locality": {k: v for k, v in loc.items() if k != "novel_fraction"},
            "seeds": per_seed,
        }


def assess_novelty(prediction, train_images: ArrayLike, machine=None, *, threshold: float = DEFAULT_THRESHOLD,
                   baseline_limit: int = 1000, seed: int = 0, explained: float = 0.1,
                   unexplained: float = 0.25) -> NoveltyResult:
    """Run the three novelty analyses on the network's samples of a prediction.

    Args:
        prediction: a :class:`els_audit.predict.PredictionResult`.
        train_images: (N, C, H, W) training images for the copy test (the full set if you
            can); their range (max - min) scales the locality thresholds.
        machine: the fitted machine of the prediction; needed for the mosaic when the
            prediction kept diagnostics (its images resolve the provenance).
        threshold, baseline_limit, seed: see :func:`memorization`.
        explained, unexplained: see :func:`locality_novelty`.
    Returns:
        :class:`NoveltyResult` (``mosaic`` is ``None`` without diagnostics).
    """
    tr = _images(train_images, "train_images")
    mem = memorization(prediction.network, tr, threshold=threshold, baseline_limit=baseline_limit, seed=seed)
    data_range = float(tr.max() - tr.min())
    if data_range <= 0:
        raise ValueError("train_images are constant; the locality thresholds need a data range > 0")
    loc = locality_novelty(prediction.network, prediction.machine_samples, prediction.is_samples,
                           data_range=data_range, explained=explained, unexplained=unexplained)
    mos = None
    if prediction.diagnostics is not None:
        if machine is None:
            raise ValueError("the prediction kept mosaic diagnostics: pass machine= (the fitted machine) "
                             "to resolve them")
        d = prediction.diagnostics
        periodic = machine.kind == "ELS" and machine.dictionary == "periodic"
        mos = mosaic(d["source_image"], d["source_y"], d["source_x"], d["multiplicity"], images=machine.images.cpu(),
                     periodic=periodic)
    return NoveltyResult(seeds=tuple(prediction.seeds), memorization=mem, mosaic=mos, locality=loc)
