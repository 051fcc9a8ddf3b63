"""Measured translation equivariance: shift tests ``f(roll(x, s))`` vs ``roll(f(x), s)``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..schedules import NoiseSchedule, get_schedule
from .inputs import check_data, check_image_shape, check_labels, noisy_inputs
from .structure import StructuralEquivarianceResult

#: PSNR reported for an exactly zero error (keeps the JSON finite).
PSNR_CAP_DB = 400.0


# ----------------------------------------------------------------------------------------
# Measured
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeasuredEquivarianceResult:
    """Shift tests ``f(roll(x, s))`` vs ``roll(f(x), s)`` at several noise levels.

    Attributes:
        times: the t values tested.
        shifts: the (dy, dx) circular shifts tested.
        band: (B_H, B_W) border band masked for the ``*_masked`` numbers: a pixel is kept
            only when it lies at least B from the edges both in the shifted frame and
            where it came from (so the wrap-around seam is masked too).
        psnr_db / psnr_masked_db: [t][shift] EQ-T PSNR, ``10 log10(2^2 / MSE)`` (capped
            at :data:`PSNR_CAP_DB` for an exactly zero error).  The masked numbers are
            ``None`` when the band leaves no pixel (B >= half the image).
        rel_err / rel_err_masked: [t][shift] ``||diff|| / ||roll(f(x))||`` (RMS ratio).
        max_abs / max_abs_masked: [t][shift] max |diff|.
        effective_band: [t][shift] the smallest border band B (same on both axes) outside
            which the error map stays below ``band_tol`` x RMS(eps): the band that matters
            in practice (a zero-padded UNet's structural band can be far wider, with the
            influence decaying to 1e-8).  ``None`` when no band short of the whole image
            does (global breaking, or a shift that is not a multiple of the period).
        band_tol: the tolerance used for ``effective_band``.
        n_samples, seed: the inputs (x_t from the forward process, seeded).
    """

    times: tuple[float, ...]
    shifts: tuple[tuple[int, int], ...]
    band: tuple[int, int]
    psnr_db: tuple[tuple[float, ...], ...]
    psnr_masked_db: tuple[tuple[float, ...], ...]
    rel_err: tuple[tuple[float, ...], ...]
    rel_err_masked: tuple[tuple[float, ...], ...]
    max_abs: tuple[tuple[float, ...], ...]
    max_abs_masked: tuple[tuple[float, ...], ...]
    effective_band: tuple[tuple[Optional[int], ...], ...]
    band_tol: float
    n_samples: int
    seed: int
    error_maps: np.ndarray = field(repr=False, compare=False, default=None)

    def arrays(self) -> dict[str, np.ndarray]:
        """``error_maps``: [T, S, H, W] mean |diff| over samples and channels."""
        return {"error_maps": self.error_maps.copy()}

    def to_dict(self) -> dict:
        r = lambda rows, nd=3: [[None if v is None else round(float(v), nd) for v in row] for row in rows]  # noqa: E731
        e = lambda rows: [[None if v is None else float(f"{v:.3e}") for v in row] for row in rows]  # noqa: E731
        return {
            "times": list(self.times),
            "shifts": [list(s) for s in self.shifts],
            "band": list(self.band),
            "psnr_db": r(self.psnr_db, 2),
            "psnr_masked_db": r(self.psnr_masked_db, 2),
            "rel_err": e(self.rel_err),
            "rel_err_masked": e(self.rel_err_masked),
            "max_abs": e(self.max_abs),
            "max_abs_masked": e(self.max_abs_masked),
            "effective_band": [list(r) for r in self.effective_band],
            "band_tol": self.band_tol,
            "n_samples": self.n_samples,
            "seed": self.seed,
        }


def _psnr(mse: float) -> float:
    # NB: StyleGAN3's EQ-T uses I_max = 2 (images in [-1, 1]); eps has unit variance, so
    # the same peak is a convention here.  rel_err is the scale-free companion.
    if mse <= 0:
        return PSNR_CAP_DB
    return float(min(PSNR_CAP_DB, 10.0 * math.log10(4.0 / mse)))


def equivariance_measured(
    eps_fn: Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor],
    image_shape: Sequence[int],
    *,
    shifts: Optional[Sequence[Union[int, Sequence[int]]]] = None,
    times: Sequence[float] = (0.1, 0.5, 0.9),
    band: Union[int, Sequence[int], StructuralEquivarianceResult] = 0,
    seed: int = 0,
    n_samples: int = 4,
    data: Optional[torch.Tensor] = None,
    schedule: Union[str, NoiseSchedule] = "cosine-legacy",
    label: Any = None,
    batch_size: int = 64,
    band_tol: float = 1e-3,
) -> MeasuredEquivarianceResult:
    """Measure translation equivariance with circular shifts.

    For each t, draws ``n_samples`` inputs ``x_t = a_t x0 + b_t z`` (x0 from ``data`` if
    given, else N(0, I); z ~ N(0, I); seeded), evaluates ``f = eps_fn`` on x_t and on every
    circularly shifted copy, and compares ``f(roll(x, s))`` with ``roll(f(x), s)``.

    Args:
        eps_fn: ``eps(x [B,C,H,W], t [B] float, label [B] long or None) -> [B,C,H,W]``.
        image_shape: (C, H, W).
        shifts: ints (a diagonal shift (s, s)) or (dy, dx) pairs; default 1 .. max(4, P)
            where P is the period of a structural result passed as ``band`` (else 1 .. 4).
        times: noise levels t in [0, 1].
        band: border band (an int, (B_H, B_W), or a structural result whose band is used)
            masked for the ``*_masked`` numbers.
        seed: seed of the inputs.
        n_samples: inputs per t.
        data: optional [N, C, H, W] training images in [-1, 1].
        schedule: noise schedule name or object.
        label: class label(s) for a conditional model (int or [n_samples]).
        batch_size: largest batch passed to ``eps_fn``.
        band_tol: relative tolerance defining ``effective_band``.

    Returns:
        :class:`MeasuredEquivarianceResult` (EQ-T PSNR with and without the band, relative
        and max errors, the effective band per t, and the per-pixel error maps in
        ``arrays()``).
    """
    C, H, W = check_image_shape(image_shape)
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples and batch_size must be >= 1, got {n_samples}, {batch_size}")
    if not band_tol > 0:
        raise ValueError(f"band_tol must be > 0, got {band_tol}")
    if not times:
        raise ValueError("times is empty; pass e.g. times=(0.1, 0.5, 0.9)")
    sh = _shifts(shifts, band)
    band_t = _band(band)
    sched = get_schedule(schedule)
    data = check_data(data, (C, H, W))
    lab = check_labels(label, n_samples)
    g = torch.Generator().manual_seed(int(seed))
    rows: list[list[tuple]] = [[] for _ in range(7)]       # psnr, psnr_m, rel, rel_m, max, max_m, eff band
    maps = np.zeros((len(times), len(sh), H, W), dtype=np.float32)
    for ti, t in enumerate(times):
        if not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"times must lie in [0, 1], got {t}")
        x, _, _ = noisy_inputs(sched, float(t), data, (C, H, W), n_samples, g)      # (n, C, H, W)
        f0, pairs = _shift_diffs(eps_fn, x, float(t), sh, lab, batch_size)
        scores = [_scores(ref, d, _interior(H, band_t[0], s[0])[:, None] & _interior(W, band_t[1], s[1])[None, :])
                  for s, (ref, d) in zip(sh, pairs)]
        for k in range(6):
            rows[k].append(tuple(sc[k] for sc in scores))
        for si, (_, d) in enumerate(pairs):
            maps[ti, si] = d.abs().mean(dim=(0, 1)).to(torch.float32).numpy()
        # NB: judged on the sample-mean |diff| map, scaled by the RMS of eps.
        tol = band_tol * math.sqrt(float(f0.pow(2).mean()) or 1.0)
        rows[6].append(tuple(_effective_band(maps[ti, si], s, tol) for si, s in enumerate(sh)))
    return MeasuredEquivarianceResult(
        times=tuple(float(t) for t in times), shifts=tuple(sh), band=band_t,
        psnr_db=tuple(rows[0]), psnr_masked_db=tuple(rows[1]), rel_err=tuple(rows[2]), rel_err_masked=tuple(rows[3]),
        max_abs=tuple(rows[4]), max_abs_masked=tuple(rows[5]), effective_band=tuple(rows[6]),
        band_tol=float(band_tol), n_samples=int(n_samples), seed=int(seed), error_maps=maps,
    )


def _shifts(shifts: Optional[Sequence[Union[int, Sequence[int]]]], band: Any) -> list[tuple[int, int]]:
    """(dy, dx) pairs; default 1 .. max(4, P) diagonal, P the structural period."""
    if shifts is None:
        P = band.period_all if isinstance(band, StructuralEquivarianceResult) else 1
        shifts = tuple(range(1, max(4, P) + 1))
    sh: list[tuple[int, int]] = []
    for s in shifts:
        if isinstance(s, (int, np.integer)):
            sh.append((int(s), int(s)))
        elif len(s) == 2:
            sh.append((int(s[0]), int(s[1])))
        else:
            raise ValueError(f"a shift is an int or a (dy, dx) pair, got {s!r}")
    if not sh:
        raise ValueError("shifts is empty; pass e.g. shifts=(1, 2, 3, 4)")
    return sh


def _band(band: Any) -> tuple[int, int]:
    """(B_H, B_W) from an int, a pair, or a structural result's band."""
    if isinstance(band, StructuralEquivarianceResult):
        axes = list(band.band)
        bh = max(band.band.get(axes[0], (0, 0))) if len(axes) >= 1 else 0
        bw_ = max(band.band.get(axes[1], (0, 0))) if len(axes) >= 2 else bh
        band_t = (int(bh), int(bw_))
    elif isinstance(band, (int, np.integer)):
        band_t = (int(band), int(band))
    else:
        band_t = (int(band[0]), int(band[1]))
    if min(band_t) < 0:
        raise ValueError(f"band must be >= 0, got {band_t}")
    return band_t


def _interior(n: int, b: int, shift: int) -> torch.Tensor:
    """Positions at least ``b`` from the edges both where they are and where the shift took them from."""
    o = torch.arange(n)
    src = torch.remainder(o - shift, n)
    return (o >= b) & (o < n - b) & (src >= b) & (src < n - b)


def _shift_diffs(eps_fn: Callable, x: torch.Tensor, t: float, sh: list[tuple[int, int]], lab: Optional[torch.Tensor],
                 batch_size: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(f(x), [(roll(f(x), s), f(roll(x, s)) - roll(f(x), s)) for each shift]), float64."""
    n = x.shape[0]
    xs = torch.cat([x] + [torch.roll(x, s, dims=(-2, -1)) for s in sh])     # ((S+1) n, C, H, W)
    labs = None if lab is None else lab.repeat(len(sh) + 1)
    outs = []
    with torch.no_grad():
        for i in range(0, xs.shape[0], batch_size):
            xb = xs[i: i + batch_size]
            lb = None if labs is None else labs[i: i + batch_size]
            outs.append(eps_fn(xb, torch.full((xb.shape[0],), t), lb).detach().to(torch.float64))
    f = torch.cat(outs)                                                      # ((S+1) n, C, H, W)
    if f.shape != xs.shape:
        raise ValueError(f"eps_fn returned shape {tuple(f.shape[1:])} for inputs {tuple(xs.shape[1:])}")
    f0 = f[:n]
    refs = [torch.roll(f0, s, dims=(-2, -1)) for s in sh]
    return f0, [(ref, f[(si + 1) * n: (si + 2) * n] - ref) for si, ref in enumerate(refs)]


def _scores(ref: torch.Tensor, diff: torch.Tensor, keep: torch.Tensor) -> tuple:
    """(psnr, psnr masked, rel err, rel err masked, max, max masked) of one shift (``ref`` the
    shifted output); the masked numbers are ``None`` when the band leaves no pixel."""
    mse = float(diff.pow(2).mean())
    denom = float(ref.pow(2).mean()) or 1.0
    dm = diff[..., keep]
    if not dm.numel():  # the band covers the whole image: nothing left to measure
        return _psnr(mse), None, math.sqrt(mse / denom), None, float(diff.abs().max()), None
    mse_m = float(dm.pow(2).mean())
    denom_m = float(ref[..., keep].pow(2).mean()) or 1.0
    return (_psnr(mse), _psnr(mse_m), math.sqrt(mse / denom), math.sqrt(mse_m / denom_m), float(diff.abs().max()),
            float(dm.abs().max()))


def _effective_band(err_map: np.ndarray, s: tuple[int, int], tol: float) -> Optional[int]:
    """The smallest B whose masked error map stays below ``tol`` (``None``: no band short of the image)."""
    H, W = err_map.shape
    for B in range(0, (min(H, W) + 1) // 2):
        keep = (_interior(H, B, s[0])[:, None] & _interior(W, B, s[1])[None, :]).numpy()
        if keep.any() and err_map[keep].max() <= tol:
            return B
    return None
