"""Calibrate the locality scale: per step, the patch size k whose machine best matches the network.

References:
- M. Kamb and S. Ganguli, "An analytic theory of creativity in convolutional diffusion
  models", ICML 2025 (arXiv 2412.20292), and docs/theory.md section 3: run the network's own
  reverse process from a seed; at each step compare the network's score ``-eps/b_t`` with
  each candidate machine's score at the same x_t (cosine similarity), keep the best k, take
  the median over seeds.
- docs/theory.md section 1: the DDIM grid ``t_i = i/T`` and ``x0_hat = (x_t - b_t eps) / a_t``.

Step convention (the one :func:`els_audit.machines.scale_schedule_eps` uses): ``scales[j]``,
j = 0..T-1, is the patch size at grid time ``t_{j+1} = (j+1)/T``, i.e. index 0 = least
noise (the last sampler step, t = 1/T), index T-1 = the first step (t = 1), matching the
table of docs/theory.md section 3.  ``scales[j]`` is calibrated on the network's state x at
``t_{j+1}`` and is later applied to the machine's state at the same ``t_{j+1}``.  NB: the
authors' public code applies the scale calibrated for step i+1 at step i (off by one) and
starts its machine at t = 1 - 1/T; we do neither.

Criteria:
- ``"x0"`` (default): mean squared difference between the predicted clean images, the
  network's ``(x - b eps)/a`` and the machine's ``E[x0 | x_t]``.  Since
  ``x0_net - x0_machine = -(b/a) (eps_net - eps_machine) = (b^2/a) (s_net - s_machine)``, at
  one step the x0 MSE is a fixed positive multiple of the eps MSE and of the squared score
  distance: the ranking of k does not depend on the parametrisation, and the shared
  ``-x/b^2`` term of the score, which makes every candidate's score nearly parallel to the
  network's at high noise, cancels.  We use the MSE rather than a cosine of centred x0s
  because the amplitude of the prediction (how far it has left the data mean) is exactly
  what distinguishes small from large k at high noise, and a cosine discards it.  Values
  are in squared data units, lower is better.
- ``"cosine"``: the paper's criterion, cosine similarity of the network's score ``-eps/b``
  with the machine's score, higher is better.  Reproduces the paper (and its blindness at
  t >= 0.9).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .machines import ScoreMachine
from .machines.banded import band_pair_errors
from .metrics import cosine_similarity_batch, mse_batch
from .sampler import EpsFn, ddim_sample, initial_noise, time_grid
from .schedules import NoiseSchedule, get_schedule
from .serialize import json_float

__all__ = [
    "CalibrationResult",
    "calibrate_scales",
    "CRITERIA",
    "default_candidates",
    "candidates_near",
    "step_candidates",
]

CRITERIA = ("x0", "cosine")
ProgressFn = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------------------
# helpers shared with predict.py
# ---------------------------------------------------------------------------------------
def _check_seeds(seeds) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in seeds)
    except TypeError:
        raise ValueError(f"seeds must be a sequence of integers; got {seeds!r}") from None
    if not out:
        raise ValueError("seeds is empty; give at least one seed")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds must be distinct; got {list(out)}")
    return out


def _check_steps(steps) -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    return steps


def _resolve_labels(label, n: int, machine: ScoreMachine) -> Optional[torch.Tensor]:
    """None, an int for every seed, or one label per seed -> (n,) long tensor or None."""
    return machine.check_label(label, n)


def _resolve_schedule(schedule, machine: ScoreMachine, steps: int) -> NoiseSchedule:
    """The sampler's schedule; it must give the machine's (a_t, b_t) on the grid."""
    sched = machine.schedule if schedule is None else get_schedule(schedule)
    grid = torch.tensor(time_grid(steps), dtype=torch.float64)
    a1, b1 = sched.alpha_sigma(grid)
    a2, b2 = machine.schedule.alpha_sigma(grid)
    if not (torch.allclose(a1, a2, rtol=1e-6, atol=1e-9) and torch.allclose(b1, b2, rtol=1e-6, atol=1e-9)):
        raise ValueError(f"schedule {getattr(sched, 'name', sched)!r} differs from the machine's "
                         f"{getattr(machine.schedule, 'name', machine.schedule)!r}; build the machine with the "
                         f"network's schedule")
    return sched


def _checked_eps(eps_fn: EpsFn, what: str) -> EpsFn:
    """Wrap a denoiser: cast its output to x's dtype, refuse NaN/inf."""
    if not callable(eps_fn):
        raise ValueError(f"{what} must be a callable eps(x, t, label); got {type(eps_fn).__name__}")

    def eps(x, t, label=None):
        out = eps_fn(x, t, label)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"{what} returned {type(out).__name__}, not a tensor")
        out = out.to(dtype=x.dtype, device=x.device)
        if not torch.all(torch.isfinite(out)):
            raise ValueError(f"{what} returned NaN or infinite values at t = {float(t.reshape(-1)[0]):.4g}")
        return out

    return eps


# ---------------------------------------------------------------------------------------
# candidates
# ---------------------------------------------------------------------------------------
def _check_k(k) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1 or k % 2 == 0:
        raise ValueError(f"patch sizes must be positive odd integers; got {k!r}")
    return int(k)


def default_candidates(image_shape: Sequence[int]) -> tuple[int, ...]:
    """Odd k from 3 up to the larger image side (docs/theory.md section 3).

    Args:
        image_shape: (C, H, W).
    Returns:
        e.g. ``(3, 5, ..., 31)`` for 32 x 32 images.
    """
    side = max(int(image_shape[-1]), int(image_shape[-2]))
    return tuple(range(3, side + 1, 2)) or (3,)


def candidates_near(scales: Sequence[int], spread: int = 2, k_max: Optional[int] = None) -> tuple[tuple[int, ...], ...]:
    """Per-step candidates around a predicted schedule (e.g. the ERF prediction).

    Args:
        scales: (T,) predicted odd patch sizes, index 0 = least noise.
        spread: how many odd neighbours on each side (k - 2*spread .. k + 2*spread).
        k_max: drop candidates above this (e.g. ``2 * max(H, W) - 1``); the smallest is 1.
    Returns:
        T tuples of odd candidates, each containing the prediction, for
        :func:`calibrate_scales`'s ``candidates``.
    """
    if not isinstance(spread, int) or spread < 0:
        raise ValueError(f"spread must be a non-negative integer; got {spread!r}")
    out = []
    for k in scales:
        k = _check_k(k)
        ks = [c for c in range(k - 2 * spread, k + 2 * spread + 1, 2) if c >= 1 and (k_max is None or c <= k_max)]
        out.append(tuple(sorted(set(ks) | {k})))
    return tuple(out)


def step_candidates(mode: str, shape: Sequence[int], predicted: Sequence[int],
                    spread: int) -> tuple[tuple[int, ...], ...]:
    """Per-step candidates of a calibration: ``"calibrate"`` every odd k up to the image
    side at every step, ``"auto"`` the ERF prediction's neighbours (:func:`candidates_near`,
    up to the largest odd size within the image).

    Args:
        mode: ``"calibrate"`` or ``"auto"``; shape: (C, H, W); predicted: (T,) odd sizes,
            index 0 = least noise; spread: see :func:`candidates_near`.
    """
    H, W = int(shape[-2]), int(shape[-1])
    if mode == "calibrate":
        return (default_candidates(shape),) * len(predicted)
    k_max = max(H, W) if max(H, W) % 2 else max(H, W) - 1
    return candidates_near(predicted, spread, k_max=k_max)


def _per_step_candidates(candidates, steps: int, image_shape) -> tuple[tuple[int, ...], ...]:
    if candidates is None:
        return (default_candidates(image_shape),) * steps
    cands = list(candidates)
    if not cands:
        raise ValueError("candidates is empty; give odd patch sizes, e.g. (3, 5, 7)")
    if all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in cands):
        one = tuple(sorted({_check_k(c) for c in cands}))
        return (one,) * steps
    if len(cands) != steps:
        raise ValueError(f"per-step candidates need one sequence per step: got {len(cands)} for {steps} steps")
    out = []
    for c in cands:
        try:
            ks = tuple(sorted({_check_k(k) for k in c}))
        except TypeError:
            raise ValueError(f"candidates must be odd integers or one sequence of them per step; got {c!r}") from None
        if not ks:
            raise ValueError("a step has no candidates; give at least one odd patch size per step")
        out.append(ks)
    return tuple(out)


def _round_to_candidate(value: float, cands: Sequence[int]) -> int:
    # NB: the median of the per-seed winners can fall between two candidates (an even number
    # of seeds); take the nearest candidate, the smaller one on a tie (the more local).
    return min(cands, key=lambda c: (abs(c - value), c))


# ---------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CalibrationResult:
    """Per-step patch sizes fitted to a network, with the evidence.

    Attributes:
        criterion: ``"x0"`` (MSE of predicted clean images, lower is better) or ``"cosine"``
            (cosine of scores, higher is better).
        steps: T.
        schedule: schedule name.
        seeds, labels: calibration seeds and their labels (``None`` if unconditional).
        candidates: (n_cand,) every candidate evaluated at some step, ascending.
        scales: (T,) chosen k per step; ``scales[j]`` belongs to ``t = (j+1)/T`` (index 0 =
            least noise), the convention of :func:`els_audit.machines.scale_schedule_eps`.
        agreement: (T,) fraction of seeds whose own best k equals ``scales[j]``: the
            calibration's own uncertainty.
        values: (T, n_cand) criterion per step and candidate, median over seeds; ``nan``
            where a candidate was not evaluated at that step.
        per_seed_values: (T, n_cand, n_seeds) the criterion before the median.
        per_seed_best: (T, n_seeds) best k per step and seed.
        machine: the machine's ``to_dict()``.
        band_scales, band_agreement, band_per_seed_best: with ``border_band``, the border
            band's own size per step, its agreement and each seed's vote (T, n_seeds)
            (:mod:`els_audit.machines.banded`); ``scales``, ``agreement`` and
            ``per_seed_best`` are then the interior's, from the same pair votes, while
            ``values`` stays the whole-image criterion of each single size.  ``None``
            otherwise.
    """

    criterion: str
    steps: int
    schedule: str
    seeds: tuple[int, ...]
    labels: Optional[tuple[int, ...]]
    candidates: tuple[int, ...]
    scales: tuple[int, ...]
    agreement: tuple[float, ...]
    values: np.ndarray
    per_seed_values: np.ndarray
    per_seed_best: np.ndarray
    machine: dict
    band_scales: Optional[tuple[int, ...]] = None
    band_agreement: Optional[tuple[float, ...]] = None
    band_per_seed_best: Optional[np.ndarray] = None

    @property
    def higher_is_better(self) -> bool:
        return self.criterion == "cosine"

    @property
    def times(self) -> tuple[float, ...]:
        """(T,) grid time of each scale: ``times[j] = (j+1)/T``."""
        return tuple((j + 1) / self.steps for j in range(self.steps))

    def arrays(self) -> dict[str, np.ndarray]:
        """Raw arrays for an ``.npz`` (names prefixed ``calibration_``)."""
        return {"calibration_values": self.values, "calibration_per_seed_values": self.per_seed_values,
                "calibration_per_seed_best": self.per_seed_best,
                "calibration_candidates": np.asarray(self.candidates), "calibration_scales": np.asarray(self.scales),
                "calibration_seeds": np.asarray(self.seeds),
                **({} if self.band_scales is None else {
                    "calibration_band_scales": np.asarray(self.band_scales),
                    "calibration_band_per_seed_best": self.band_per_seed_best})}

    def to_dict(self) -> dict:
        return {
            "criterion": self.criterion,
            "better": "higher" if self.higher_is_better else "lower",
            "steps": self.steps,
            "schedule": self.schedule,
            "convention": "scales[j] is applied at t = (j+1)/steps (index 0 = least noise)",
            "times": list(self.times),
            "scales": list(self.scales),
            "agreement": [float(a) for a in self.agreement],
            "candidates": list(self.candidates),
            "values": [[json_float(v) for v in row] for row in self.values],
            "per_seed_best": [[int(v) for v in row] for row in self.per_seed_best],
            "seeds": list(self.seeds),
            "labels": None if self.labels is None else list(self.labels),
            "machine": dict(self.machine),
            "band_scales": None if self.band_scales is None else list(self.band_scales),
            "band_agreement": None if self.band_agreement is None else [float(a) for a in self.band_agreement],
            "band_per_seed_best": None if self.band_per_seed_best is None else
            [[int(v) for v in row] for row in self.band_per_seed_best],
        }


# ---------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------
def calibrate_scales(
    eps_fn: EpsFn,
    machine: ScoreMachine,
    *,
    seeds: Sequence[int],
    steps: int = 20,
    schedule: Union[None, str, NoiseSchedule] = None,
    candidates: Union[None, Sequence[int], Sequence[Sequence[int]]] = None,
    criterion: str = "x0",
    label: Union[None, int, Sequence[int], torch.Tensor] = None,
    progress: Optional[ProgressFn] = None,
    border_band: bool = False,
) -> CalibrationResult:
    """Fit one patch size per step by comparing the network with candidate machines.

    The network's own deterministic DDIM trajectory is run from ``initial_noise(seeds)``;
    at each step, for every candidate k, the machine is evaluated at the network's x_t
    (all seeds in one machine call) and compared with the network by ``criterion``.  Each
    seed votes for its best k; the step's scale is the median vote, rounded to the nearest
    candidate (the smaller on a tie).  Use seeds disjoint from the evaluation seeds of
    :func:`els_audit.predict.predict_samples`.

    Args:
        eps_fn: the network as ``eps(x, t, label)``: x (B, C, H, W) in the machine's dtype,
            t (B,) float times in [0, 1], label (B,) long or ``None``; returns (B, C, H, W).
        machine: a local machine (LS, ELS or bbELS) over the training images or a subset
            (the best k depends on dictionary size: docs/theory.md section 3).
        seeds: calibration seeds (distinct integers).
        steps: T, the DDIM grid ``t_i = i/T``.
        schedule: the network's schedule; ``None`` = the machine's.  Must give the same
            (a_t, b_t) as the machine's on the grid.
        candidates: odd patch sizes tried at every step (default: 3, 5, ... up to the image
            side), or one sequence per step (index 0 = least noise; e.g. from
            :func:`candidates_near`).
        criterion: ``"x0"`` or ``"cosine"`` (see the module docstring).
        label: class label for every seed, or one per seed, for conditional models.
        progress: optional ``f("calibrate", steps_done, steps)``.
        border_band: also fit a separate size for the border band (x0 criterion): each seed
            votes for the (k, k_band) pair of the step's candidates whose banded answer
            (:mod:`els_audit.machines.banded`) is closest to the network's x0; the medians
            of the two votes are ``scales`` and ``band_scales``.
    Returns:
        :class:`CalibrationResult` (``scales[j]`` belongs to ``t = (j+1)/T``).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    if not isinstance(machine, ScoreMachine):
        raise ValueError(f"machine must be a ScoreMachine from build_machine; got {type(machine).__name__}")
    if machine.kind == "IS":
        raise ValueError("the IS machine has no patch size to calibrate; build an LS, ELS or bbELS machine")
    if border_band and criterion != "x0":
        raise ValueError("a border band scale is calibrated with the x0 criterion; use criterion='x0'")
    steps = _check_steps(steps)
    seeds = _check_seeds(seeds)
    B = len(seeds)
    per_step = _per_step_candidates(candidates, steps, machine.image_shape)
    union = tuple(sorted({k for ks in per_step for k in ks}))
    col = {k: i for i, k in enumerate(union)}
    sched = _resolve_schedule(schedule, machine, steps)
    labels = _resolve_labels(label, B, machine)
    net = _checked_eps(eps_fn, "the network")
    dtype = machine.images.dtype
    x_T = initial_noise(seeds, machine.image_shape, dtype=dtype)                      # (B, C, H, W)

    vals = np.full((steps, len(union), B), np.nan)                                     # (T, n_cand, B)
    pairs: list = [None] * steps                                                       # (n_j, n_j, B) per step
    machine.prepare_sweep(union, label=labels)          # one nested tree for every step's subset

    def on_step(i: int, t: float, x: torch.Tensor, eps: torch.Tensor) -> None:
        j = steps - 1 - i                                  # sampler step i starts at t = (j+1)/T
        t_vec = torch.full((B,), t, dtype=dtype)                                       # (B,)
        a, b = sched.alpha_sigma(t_vec, dtype=dtype)                                   # (B,), (B,)
        a4, b4 = a[:, None, None, None], b[:, None, None, None]
        if criterion == "x0":
            if torch.any(a <= 0):
                raise ValueError(f"a_t = 0 at t = {t}: x0 is undefined there; use criterion='cosine'")
            ref = (x - b4 * eps) / a4                                                  # (B, C, H, W) x0_net
        else:
            ref = -eps / b4                                                            # (B, C, H, W) s_net
        # one sweep per step: periodic ELS evaluates all candidates in one nested pass
        if criterion == "x0":
            means = machine.denoised_sweep(x, t_vec, per_step[j], label=labels)
            for k, m in means.items():
                vals[j, col[k]] = mse_batch(ref, m)                                   # m (B, C, H, W)
            if border_band:
                sq = {k: ((m - ref) ** 2).sum(1) for k, m in means.items()}            # (B, H, W)
                pairs[j] = band_pair_errors(sq, per_step[j])
        else:
            for k, m in machine.score_sweep(x, t_vec, per_step[j], label=labels).items():
                vals[j, col[k]] = cosine_similarity_batch(ref, m)
        if progress is not None:
            progress("calibrate", i + 1, steps)

    ddim_sample(net, x_T, steps=steps, schedule=sched, label=labels, step_callback=on_step)

    best = np.zeros((steps, B), dtype=np.int64)                                        # (T, B)
    scales, agreement = [], []
    for j in range(steps):
        cols = [col[k] for k in per_step[j]]
        v = vals[j][cols]                                                              # (n_j, B)
        # NB: an undefined value (a zero score vector) never wins; ties go to the smaller k
        score = np.where(np.isnan(v), np.inf, -v if criterion == "cosine" else v)
        best[j] = np.asarray(per_step[j])[np.argmin(score, axis=0)]
        k_j = _round_to_candidate(float(np.median(best[j])), per_step[j])
        scales.append(k_j)
        agreement.append(float(np.mean(best[j] == k_j)))
    band = band_agree = band_best = None
    if border_band:
        scales, agreement, band, band_agree, best, band_best = _band_votes(pairs, per_step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan slices: not evaluated -> nan
        med = np.nanmedian(vals, axis=2)                                               # (T, n_cand)
    return CalibrationResult(
        criterion=criterion, steps=steps, schedule=str(getattr(sched, "name", sched)), seeds=seeds,
        labels=None if labels is None else tuple(int(v) for v in labels), candidates=union,
        scales=tuple(scales), agreement=tuple(agreement), values=med, per_seed_values=vals,
        per_seed_best=best, machine=machine.to_dict(), band_scales=band, band_agreement=band_agree,
        band_per_seed_best=band_best,
    )


def _band_votes(pairs, per_step):
    """(scales, agreement, band scales, band agreement, per-seed interior votes (T, B),
    per-seed band votes (T, B)) from each step's (n, n, B) pair errors: each seed votes for
    its best pair (ties to the smaller k, then k_band)."""
    scales, agreement, band, band_agree, votes_in, votes_band = [], [], [], [], [], []
    for err, cands in zip(pairs, per_step):
        n, _, B = err.shape
        flat = err.reshape(n * n, B)                       # row i * n + j: (k_i, k_band_j), ascending
        win = np.argmin(np.where(np.isnan(flat), np.inf, flat), axis=0)                 # (B,)
        k_in = np.asarray(cands)[win // n]
        k_band = np.asarray(cands)[win % n]
        votes_in.append(k_in)
        votes_band.append(k_band)
        for votes, out, agree in ((k_in, scales, agreement), (k_band, band, band_agree)):
            k = _round_to_candidate(float(np.median(votes)), cands)
            out.append(k)
            agree.append(float(np.mean(votes == k)))
    return (tuple(scales), tuple(agreement), tuple(band), tuple(band_agree), np.stack(votes_in).astype(np.int64),
            np.stack(votes_band).astype(np.int64))
