"""Shaped patch supports: the machines' patch distance weighted per window element.

The square machines (docs/theory.md section 2) compare a query window with a training patch
by ``||Omega_p(x) - a P||^2``, every element of the k x k window counting once.  A shaped
support replaces it by

    d_w(q, P) = sum_o w_o (q_o - a P_o)^2,      w_o >= 0 per window offset o,

the same weights for every channel, every pixel and every key, so the machine stays
equivariant (and exact: it is the square machine on keys and queries scaled by sqrt(w),
:func:`els_audit.machines._engine.grouped_softmax_average`'s ``col_scale``; the centres that
are averaged are not scaled).  The weights may differ per sampling step.

Three schedules of weights (docs/theory.md section 5, related work):

- ``erf``: the network's own measured sensitivity.  At step t the weights are its x0 ERF
  map at the centre pixel (:mod:`els_audit.probes.erf`: the mean |d x0_hat[centre] / d x|),
  cropped to the k x k window and scaled to maximum 1.  Niedoba et al. (ICML 2025) shape
  their patch supports from gradient-sensitivity maps in this spirit.
- ``erf-area``: an ERF-shaped support of the square's area: the centre and the k^2 - 1
  other offsets where the same map is largest, within the (2k - 1) x (2k - 1) square
  around the centre, get weight 1, the rest 0 (ties: nearer the centre first, then raster
  order).  Its window is the smallest odd square around those offsets: at least k, at most
  2k - 1 (the cap keeps a flat, noisy map at high noise from spreading the support, and
  the cost, over the whole image).
- ``data``: the training data's own locality (Lukoianov et al., NeurIPS 2025).  The
  optimal linear denoiser at step t is ``W_t = U diag(a^2 l / (a^2 l + b^2)) U^T`` for the
  pixel covariance ``U diag(l) U^T`` of the training set; each row, divided by its
  diagonal and thresholded at ``threshold`` (0.02, the authors' default) of its largest
  entry (the authors take the whole matrix's largest: see :func:`_data_map`), is that
  pixel's mask.  Their machine uses each pixel's own mask; to keep the machine equivariant
  we take, per offset, the fraction of pixels (those that vary: at least 1% of the mean
  pixel variance) whose mask holds it, and keep the offsets that at least half of them
  hold (the centre always).  The result is
  cropped to the k x k window.

In every schedule k is the square machine's patch size, calibrated the same way: the shape
lives inside (or, for ``erf-area``, has the area of) the k x k square.

Diagnostics: identical dictionary patches are merged as for square windows; patches that
differ only where the weight is 0 compete as separate entries with equal logits, so the
winner's ``weight`` and ``multiplicity`` count only its exact copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["SupportSchedule", "SUPPORT_KINDS", "erf_supports", "data_supports", "DATA_MAX_ELEMENTS",
           "DATA_THRESHOLD"]

SUPPORT_KINDS = ("square", "erf", "erf-area", "data")
#: the data support eigendecomposes a (C H W)^2 covariance: beyond this many elements it is refused
DATA_MAX_ELEMENTS = 4096
#: Lukoianov et al.'s mask threshold (fraction of the largest normalised filter entry)
DATA_THRESHOLD = 0.02


@dataclass(frozen=True, eq=False)
class SupportSchedule:
    """Per-step weight maps over window offsets, and how a k x k support is read from them.

    Attributes:
        kind: ``"erf"``, ``"erf-area"`` or ``"data"`` (module docstring).
        times: (T,) grid times of the maps, ascending (``times[j] = (j+1)/T`` on a DDIM grid).
        maps: (T, S, S) float64, S odd: the weight of offset (dy, dx) at ``maps[j, r+dy, r+dx]``
            with ``r = S // 2``; non-negative.
        source: where the maps came from, in words (for the report).
    """

    kind: str
    times: tuple[float, ...]
    maps: np.ndarray
    source: str

    def __post_init__(self):
        if self.kind not in SUPPORT_KINDS[1:]:
            raise ValueError(f"unknown support kind {self.kind!r}; choose one of {', '.join(SUPPORT_KINDS[1:])}")
        m = np.asarray(self.maps, dtype=np.float64)
        if m.ndim != 3 or m.shape[1] != m.shape[2] or m.shape[1] % 2 == 0 or m.shape[0] != len(self.times):
            raise ValueError(f"maps must be (T, S, S) with S odd and T = len(times); got {m.shape}")
        if not np.all(np.isfinite(m)) or np.any(m < 0):
            raise ValueError("support maps must be finite and non-negative")
        if m.ndim == 3 and m.size and not np.all(m.reshape(m.shape[0], -1).max(1) > 0):
            raise ValueError("a support map is all zero: it would compare nothing (every key would weigh the same)")
        object.__setattr__(self, "maps", m)

    @property
    def side(self) -> int:
        return int(self.maps.shape[1])

    def step_of(self, t: float) -> int:
        """Index j of the map measured at t (within 1e-6), else ValueError."""
        j = int(np.argmin([abs(t - s) for s in self.times]))
        if abs(self.times[j] - t) > 1e-6:
            raise ValueError(f"the {self.kind} support was measured at {len(self.times)} times; t = {t:.6g} is "
                             f"not one of them (run the machine on the same step grid)")
        return j

    def window(self, t: float, k: int) -> tuple[int, torch.Tensor]:
        """The support at time t for patch size k: ``(window side, (side, side) float64
        weights)``, ``side == k`` except for ``erf-area`` (module docstring)."""
        m = self.maps[self.step_of(t)]
        if self.kind == "erf-area":
            return _top_area(m, k)
        w = _crop(m, min(k, self.side))
        if k > self.side:                                   # beyond the measured map: weight 0
            w = np.pad(w, (k - self.side) // 2)
        if self.kind == "erf":
            top = w.max()
            w = w / top if top > 0 else np.ones_like(w)
        return k, torch.from_numpy(np.ascontiguousarray(w))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "times": [round(t, 6) for t in self.times], "side": self.side,
                "source": self.source}


def _crop(m: np.ndarray, k: int) -> np.ndarray:
    r, c = k // 2, m.shape[0] // 2
    return m[c - r: c + r + 1, c - r: c + r + 1].copy()


def _top_area(m: np.ndarray, k: int) -> tuple[int, torch.Tensor]:
    """The centre and the k^2 - 1 largest other offsets of m within the (2k - 1) square
    around it (ties: nearer the centre, then raster order), as a 0/1 map on the smallest
    odd window holding them."""
    m = _crop(m, min(2 * k - 1, m.shape[0]))
    S = m.shape[0]
    c = S // 2
    n = min(k * k, S * S)
    yy, xx = np.mgrid[0:S, 0:S]
    dist = (yy - c) ** 2 + (xx - c) ** 2
    score = m.ravel().astype(np.float64).copy()
    score[c * S + c] = np.inf                               # the centre always counts, first
    order = np.lexsort((np.arange(S * S), dist.ravel(), -score))[:n]
    sel = np.zeros(S * S, dtype=bool)
    sel[order] = True
    sel = sel.reshape(S, S)
    ys, xs = np.nonzero(sel)
    r = int(max(abs(ys - c).max(), abs(xs - c).max()))
    return 2 * r + 1, torch.from_numpy(_crop(sel.astype(np.float64), 2 * r + 1))


# ---------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------
def erf_supports(erf, kind: str = "erf", pixel: str = "centre") -> SupportSchedule:
    """Weights from a measured :class:`els_audit.probes.erf.ERFResult` (its x0 maps at
    ``pixel``): one map per step, offsets within the largest odd square around the pixel
    that stays inside the image."""
    if kind not in ("erf", "erf-area"):
        raise ValueError(f"erf_supports makes 'erf' or 'erf-area' supports; got {kind!r}")
    if erf.x0_maps is None:
        raise ValueError("the ERF result carries no maps; measure it with effective_receptive_field")
    names = list(erf.pixels)
    if pixel not in names:
        raise ValueError(f"the ERF was measured at {names}, not at {pixel!r}")
    cy, cx = erf.pixels[pixel]
    _, H, W = erf.image_shape
    r = min(cy, cx, H - 1 - cy, W - 1 - cx)
    maps = np.asarray(erf.x0_maps, dtype=np.float64)[:, names.index(pixel), cy - r: cy + r + 1, cx - r: cx + r + 1]
    order = np.argsort(erf.times)                           # sampler order (t = 1 first) -> ascending
    return SupportSchedule(kind, tuple(float(erf.times[i]) for i in order), maps[order],
                           f"x0 ERF map at the {pixel} pixel {tuple(erf.pixels[pixel])}, {erf.n_samples} inputs")


def data_supports(images: torch.Tensor, schedule, times: Sequence[float], *,
                  threshold: float = DATA_THRESHOLD, majority: float = 0.5) -> SupportSchedule:
    """Supports from the training set's pixel covariance (module docstring, ``data``).

    Args:
        images: (N, C, H, W) training images; C H W <= :data:`DATA_MAX_ELEMENTS`.
        schedule: gives (a_t, b_t); times: the step times (ascending or not).
        threshold: a pixel's mask keeps entries >= threshold * the largest normalised entry.
        majority: an offset is kept when at least this fraction of pixels' masks hold it.
    """
    N, C, H, W = images.shape
    D = C * H * W
    if D > DATA_MAX_ELEMENTS:
        raise ValueError(f"the data support eigendecomposes a {D} x {D} pixel covariance; it is offered up to "
                         f"{DATA_MAX_ELEMENTS} elements (C*H*W); use the erf support for larger images")
    cov = _covariance(images.reshape(N, D))
    lam, U = torch.linalg.eigh(cov)
    lam = lam.clamp_min(0)
    t_sorted = tuple(sorted(float(t) for t in times))
    a, b = schedule.alpha_sigma(torch.tensor(t_sorted, dtype=torch.float64), dtype=torch.float64)
    S = 2 * max(H, W) - 1
    maps = np.stack([_data_map(U, lam, float(ai), float(bi), C, H, W, S, threshold, majority)
                     for ai, bi in zip(a, b)])
    return SupportSchedule("data", t_sorted, maps,
                           f"pixel covariance of {N} training images, threshold {threshold:g}, majority {majority:g}")


def _covariance(x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(D, D) float64 population covariance of the rows of x (N, D), in chunks of rows (no
    float64 copy of the whole data set)."""
    N, D = x.shape
    s = torch.zeros(D, dtype=torch.float64)
    ss = torch.zeros(D, D, dtype=torch.float64)
    for i in range(0, N, chunk):
        c = x[i: i + chunk].to(torch.float64)
        s += c.sum(0)
        ss += c.t() @ c
    mean = s / N
    return ss / N - torch.outer(mean, mean)


def _data_map(U, lam, a, b, C, H, W, S, threshold, majority) -> np.ndarray:
    shrink = a * a * lam / (a * a * lam + b * b)
    Wt = (U * shrink) @ U.t()                                                  # (D, D)
    diag = Wt.diagonal().clone()
    live = diag.abs() > 1e-12
    Wt = Wt / torch.where(live, diag, torch.ones_like(diag))[:, None]
    # NB: each row against its own largest entry (the authors take the largest of the whole
    # matrix): a near-constant pixel (MNIST's border) has a tiny diagonal, and its row's
    # entries would set a threshold that no other pixel's mask reaches
    mask = Wt.abs() >= threshold * Wt.abs().amax(1, keepdim=True)
    # channels: an offset belongs to a pixel's mask when any channel pair holds it
    m = mask.reshape(C, H * W, C, H * W).any(2).any(0)                          # (HW out, HW in)
    # pixels that vary: at least 1% of the mean pixel variance (the rest say nothing of locality)
    var = (U * U * lam).sum(1).reshape(C, H * W).sum(0)
    live_px = var >= 0.01 * var.mean()
    r = S // 2
    held = np.zeros((S, S))
    count = np.zeros((S, S))
    m = m.numpy()
    for p in np.nonzero(live_px.numpy())[0]:
        py, px = divmod(int(p), W)
        row = m[p].reshape(H, W)
        y0, x0 = r - py, r - px
        held[y0: y0 + H, x0: x0 + W] += row
        count[y0: y0 + H, x0: x0 + W] += 1
    frac = np.divide(held, count, out=np.zeros_like(held), where=count > 0)
    out = (frac >= majority).astype(np.float64)
    out[r, r] = 1.0
    return out


def column_scale(weights: torch.Tensor, channels: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """(C k k,) the engine's ``col_scale`` for (k, k) weights: sqrt(w) per channel, in the
    unfold layout (channel-major), on ``device`` (default: the weights')."""
    return weights.sqrt().reshape(-1).repeat(channels).to(dtype=dtype, device=device)


def check_supports(supports: Optional[SupportSchedule], kind: str) -> None:
    if supports is not None:
        if not isinstance(supports, SupportSchedule):
            raise ValueError(f"supports must be a SupportSchedule; got {type(supports).__name__}")
        if kind == "IS":
            raise ValueError("the IS machine compares whole images; shaped supports apply to LS, ELS and bbELS")
