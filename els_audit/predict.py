"""Seed-by-seed prediction: network vs the fitted machine vs the IS (memorisation) baseline.

References:
- M. Kamb and S. Ganguli, "An analytic theory of creativity in convolutional diffusion
  models", ICML 2025 (arXiv 2412.20292).  docs/theory.md section 1 (one DDIM grid, one seed,
  for network and machines alike) and section 4 (the paper's r, the true R^2, the IS
  baseline, the win rate).

For every seed the three samplers start from the same ``initial_noise(seeds, shape)`` and
run deterministic DDIM on the same grid ``t_i = i/T``.  The fitted machine uses
``scales[j]`` at ``t = (j+1)/T`` (:func:`els_audit.machines.scale_schedule_eps`; index 0 =
least noise).  NB: the paper sampled its networks with 150 steps and its machines with 20;
here both use ``steps``, so that the comparison is seed-for-seed on one grid.

Metrics per seed (target = the network's sample): r(machine, network) as the paper computes
it, R^2 of the machine's sample as a prediction of the network's, the same two for IS, and
whether the machine's r beats IS's.  Summary: medians over seeds (undefined values
skipped) and the win rate.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .calibrate import (ProgressFn, _check_k, _check_seeds, _check_steps, _checked_eps,
                        _resolve_labels, _resolve_schedule)
from .machines import ScoreMachine, scale_schedule_eps
from .machines.banded import banded_schedule_eps, banded_score
from .metrics import pearson_r_batch, r_squared_batch
from .sampler import EpsFn, ddim_sample, initial_noise
from .schedules import NoiseSchedule
from .serialize import json_float

__all__ = ["SeedPrediction", "PredictionResult", "predict_samples", "DIAGNOSTIC_FIELDS"]

DIAGNOSTIC_FIELDS = ("source_image", "source_y", "source_x", "weight", "multiplicity", "entropy")


@dataclass(frozen=True)
class SeedPrediction:
    """Metrics of one seed.  ``nan`` where undefined (a constant image); ``beats_is`` is
    ``None`` then."""

    seed: int
    label: Optional[int]
    r: float
    r2: float
    is_r: float
    is_r2: float
    beats_is: Optional[bool]

    def to_dict(self) -> dict:
        return {"seed": self.seed, "label": self.label, "r": json_float(self.r), "r2": json_float(self.r2),
                "is_r": json_float(self.is_r), "is_r2": json_float(self.is_r2), "beats_is": self.beats_is}


def _nanmedian(v: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-nan -> nan
        return float(np.nanmedian(v)) if v.size else float("nan")


@dataclass(frozen=True, eq=False)
class PredictionResult:
    """Samples of the network, the fitted machine and IS from the same seeds, and metrics.

    Attributes:
        steps, schedule, scales: the grid and the fitted machine's per-step patch sizes
            (``scales[j]`` at ``t = (j+1)/steps``).
        seeds, labels: per-seed seed and label (``None`` if unconditional).
        machine, is_machine: the machines' ``to_dict()``.
        per_seed: one :class:`SeedPrediction` per seed.
        median_r, median_r2, is_median_r, is_median_r2: medians over seeds (undefined
            values skipped; ``nan`` if none is defined).
        win_rate: fraction of seeds (with both r defined) where r(machine) > r(IS).
        x_T, network, machine_samples, is_samples: float arrays (B, C, H, W).
        diagnostics: the fitted machine's diagnostics at its last step (t = 1/steps, patch
            size ``scales[0]``): arrays (B, H, W) named as in :data:`DIAGNOSTIC_FIELDS`
            (the mosaic map: source image, y, x per pixel), or ``None``.

    Arrays stay out of :meth:`to_dict`; :meth:`arrays` returns them for an ``.npz``.
    """

    steps: int
    schedule: str
    scales: tuple[int, ...]
    seeds: tuple[int, ...]
    labels: Optional[tuple[int, ...]]
    machine: dict
    is_machine: dict
    per_seed: tuple[SeedPrediction, ...]
    median_r: float
    median_r2: float
    is_median_r: float
    is_median_r2: float
    win_rate: float
    x_T: np.ndarray
    network: np.ndarray
    machine_samples: np.ndarray
    is_samples: np.ndarray
    diagnostics: Optional[dict]
    band_scales: Optional[tuple[int, ...]] = None

    @property
    def r(self) -> np.ndarray:
        """(B,) r(machine, network) per seed."""
        return np.array([p.r for p in self.per_seed])

    @property
    def is_r(self) -> np.ndarray:
        """(B,) r(IS, network) per seed."""
        return np.array([p.is_r for p in self.per_seed])

    def arrays(self) -> dict[str, np.ndarray]:
        """Raw arrays for an ``.npz``: seeds, x_T, the three samples, the mosaic maps."""
        out = {"seeds": np.asarray(self.seeds), "x_T": self.x_T, "network": self.network,
               "machine": self.machine_samples, "is": self.is_samples, "r": self.r, "is_r": self.is_r}
        if self.labels is not None:
            out["labels"] = np.asarray(self.labels)
        if self.diagnostics is not None:
            out.update({f"mosaic_{k}": v for k, v in self.diagnostics.items()})
        return out

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "schedule": self.schedule,
            "scales": list(self.scales),
            "band_scales": None if self.band_scales is None else list(self.band_scales),
            "machine": dict(self.machine),
            "is_machine": dict(self.is_machine),
            "n_seeds": len(self.seeds),
            "median_r": json_float(self.median_r),
            "median_r2": json_float(self.median_r2),
            "is_median_r": json_float(self.is_median_r),
            "is_median_r2": json_float(self.is_median_r2),
            "win_rate": json_float(self.win_rate),
            "seeds": [p.to_dict() for p in self.per_seed],
        }


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def predict_samples(
    eps_fn: EpsFn,
    machine: ScoreMachine,
    scales: Sequence[int],
    *,
    seeds: Sequence[int],
    steps: int,
    is_machine: ScoreMachine,
    schedule: Union[None, str, NoiseSchedule] = None,
    label: Union[None, int, Sequence[int], torch.Tensor] = None,
    diagnostics_at_end: bool = True,
    progress: Optional[ProgressFn] = None,
    band_scales: Optional[Sequence[int]] = None,
) -> PredictionResult:
    """Sample network, fitted machine and IS from the same seeds and compare them.

    Args:
        eps_fn: the network as ``eps(x, t, label)``: x (B, C, H, W) in the machine's dtype,
            t (B,), label (B,) long or ``None``; returns (B, C, H, W).
        machine: the fitted local machine (LS, ELS or bbELS), over the training images or a
            subset.
        scales: (steps,) odd patch sizes, ``scales[j]`` at ``t = (j+1)/steps`` (e.g.
            :attr:`CalibrationResult.scales`).
        seeds: evaluation seeds (distinct integers).
        steps: T, the DDIM grid ``t_i = i/T`` shared by all three samplers.
        is_machine: the IS machine (memorisation baseline), same image shape and schedule.
        schedule: the network's schedule; ``None`` = the machine's.  Must agree with both
            machines on the grid.
        label: class label for every seed, or one per seed, for conditional models.
        diagnostics_at_end: keep the fitted machine's diagnostics (mosaic map) from its last
            step; computed in the same pass as that step's score.
        progress: optional ``f(stage, steps_done, steps)`` with stage ``"network"``,
            ``"machine"`` or ``"IS"``.
        band_scales: (steps,) sizes for the border band (:mod:`els_audit.machines.banded`;
            e.g. :attr:`CalibrationResult.band_scales`), None for one size per step.
    Returns:
        :class:`PredictionResult`.
    """
    for m, what in ((machine, "machine"), (is_machine, "is_machine")):
        if not isinstance(m, ScoreMachine):
            raise ValueError(f"{what} must be a ScoreMachine from build_machine; got {type(m).__name__}")
    if machine.kind == "IS":
        raise ValueError("machine is the IS machine; pass the fitted local machine (LS, ELS or bbELS) "
                         "and the IS machine as is_machine")
    if is_machine.kind != "IS":
        raise ValueError(f"is_machine must be an IS machine (the memorisation baseline); got {is_machine.kind}")
    if is_machine.image_shape != machine.image_shape or is_machine.images.dtype != machine.images.dtype:
        raise ValueError(f"is_machine has images {is_machine.image_shape} {is_machine.images.dtype} but the machine "
                         f"{machine.image_shape} {machine.images.dtype}; build both on the same data and dtype")
    steps = _check_steps(steps)
    seeds = _check_seeds(seeds)
    scales = tuple(_check_k(k) for k in scales)
    B = len(seeds)
    sched = _resolve_schedule(schedule, machine, steps)
    _resolve_schedule(sched, is_machine, steps)
    labels = _resolve_labels(label, B, machine)
    if labels is not None:
        _resolve_labels(labels, B, is_machine)
    dtype = machine.images.dtype
    if band_scales is None:
        fitted = scale_schedule_eps(machine, scales, steps)   # validates len(scales) and each k
    else:
        band_scales = tuple(_check_k(k) for k in band_scales)
        fitted = banded_schedule_eps(machine, scales, band_scales, steps)
    x_T = initial_noise(seeds, machine.image_shape, dtype=dtype)                      # (B, C, H, W)

    captured: dict = {}

    def machine_eps(x, t, label=None):
        i = int(round(float(t.reshape(-1)[0]) * steps))
        if diagnostics_at_end and i == 1:
            # the last step, t = 1/T: the same score as fitted(), plus its diagnostics
            s, diag = banded_score(machine, x, t, scales[0], scales[0] if band_scales is None else band_scales[0],
                                   label, diagnostics=True)                            # (B, C, H, W)
            _, b = machine.schedule.alpha_sigma(t.to(x.dtype), dtype=x.dtype)          # (B,)
            captured["diag"] = diag
            return -b[:, None, None, None] * s
        return fitted(x, t, label)

    def tick(stage):
        if progress is None:
            return None
        return lambda i, t, x, e: progress(stage, i + 1, steps)

    net = ddim_sample(_checked_eps(eps_fn, "the network"), x_T, steps=steps, schedule=sched, label=labels,
                      step_callback=tick("network")).x0                               # (B, C, H, W)
    mac = ddim_sample(machine_eps, x_T, steps=steps, schedule=sched, label=labels,
                      step_callback=tick("machine")).x0                               # (B, C, H, W)
    ism = ddim_sample(lambda x, t, lab: is_machine.eps(x, t, label=lab), x_T, steps=steps, schedule=sched,
                      label=labels, step_callback=tick("IS")).x0                      # (B, C, H, W)

    r = pearson_r_batch(mac, net)                                                      # (B,)
    r2 = r_squared_batch(mac, net)                                                     # (B,) target = network
    is_r = pearson_r_batch(ism, net)                                                   # (B,)
    is_r2 = r_squared_batch(ism, net)                                                  # (B,)
    defined = ~(np.isnan(r) | np.isnan(is_r))
    beats = r > is_r
    per_seed = tuple(
        SeedPrediction(seed=seeds[i], label=None if labels is None else int(labels[i]), r=float(r[i]),
                       r2=float(r2[i]), is_r=float(is_r[i]), is_r2=float(is_r2[i]),
                       beats_is=bool(beats[i]) if defined[i] else None)
        for i in range(B))
    win_rate = float(np.mean(beats[defined])) if defined.any() else math.nan
    diag = captured.get("diag")
    diagnostics = None if diag is None else {f: _np(getattr(diag, f)) for f in DIAGNOSTIC_FIELDS}
    return PredictionResult(
        steps=steps, schedule=str(getattr(sched, "name", sched)), scales=scales, seeds=seeds,
        labels=None if labels is None else tuple(int(v) for v in labels),
        machine=machine.to_dict(), is_machine=is_machine.to_dict(), per_seed=per_seed,
        median_r=_nanmedian(r), median_r2=_nanmedian(r2), is_median_r=_nanmedian(is_r),
        is_median_r2=_nanmedian(is_r2), win_rate=win_rate,
        x_T=_np(x_T), network=_np(net), machine_samples=_np(mac), is_samples=_np(ism), diagnostics=diagnostics,
        band_scales=band_scales,
    )
