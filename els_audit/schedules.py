"""Noise schedules as (a_t, b_t) pairs on t in [0, 1].

References:
- Kamb & Ganguli, ICML 2025 (arXiv 2412.20292), and docs/theory.md section 1: the forward
  process ``x_t = a_t x_0 + b_t eps`` with ``a_t^2 + b_t^2 = 1`` (variance preserving).
- Ho et al. 2020 (DDPM linear betas); Nichol & Dhariwal 2021 (improved cosine, s = 0.008).

A schedule is any object with ``name`` and ``alpha_sigma(t) -> (a, b)``; named schedules
are looked up in :data:`SCHEDULES`, which loads the entry-point group
``els_audit.schedules`` (first-party ones live in ``plugins/schedules.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Union

import torch

from .registry import Registry

__all__ = ["NoiseSchedule", "DiscreteSchedule", "SCHEDULES", "get_schedule", "TimeLike"]

TimeLike = Union[float, torch.Tensor]


class NoiseSchedule(ABC):
    """Base class: subclasses implement :meth:`alpha_bar_f64` on a float64 tensor."""

    name: str = "?"

    @abstractmethod
    def alpha_bar_f64(self, t: torch.Tensor) -> torch.Tensor:
        """abar(t) = a_t^2 for a float64 tensor t in [0, 1]."""

    def alpha_sigma(self, t: TimeLike, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(a_t, b_t)`` with the shape of ``t`` (a 0-d tensor for a float).

        Computed in float64 and cast to ``dtype`` (default: ``t``'s dtype if it is a
        floating tensor, else float64).
        """
        if dtype is None:
            dtype = t.dtype if isinstance(t, torch.Tensor) and t.is_floating_point() else torch.float64
        t64 = torch.as_tensor(t, dtype=torch.float64)
        if torch.any((t64 < 0) | (t64 > 1)) or not torch.all(torch.isfinite(t64)):
            raise ValueError(f"t must lie in [0, 1]; got {t64.min().item()}..{t64.max().item()}")
        a, b = self._alpha_sigma_f64(t64)
        return a.to(dtype), b.to(dtype)

    def _alpha_sigma_f64(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alpha_bar_f64(t)
        return abar.sqrt(), (1.0 - abar).clamp_min(0.0).sqrt()

    def to_dict(self) -> dict:
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class DiscreteSchedule(NoiseSchedule):
    """A schedule given by ``T`` discrete betas, mapped onto t in [0, 1].

    Training index ``n`` (0-based, the diffusers convention) sits at ``t = (n + 1) / T``;
    ``t = 0`` is the clean image (abar = 1).  Between grid points ``log abar`` is
    interpolated linearly in t.  NB: this mapping is our convention; a model trained on
    integer indices is converted with :meth:`t_to_index` / :meth:`index_to_t`.
    """

    def __init__(self, betas: torch.Tensor, name: str):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() < 1 or torch.any((betas <= 0) | (betas >= 1)):
            raise ValueError("betas must be a 1-d tensor with values in (0, 1)")
        self.name = name
        self.betas = betas
        self.num_train_steps = betas.numel()
        # log abar at t_j = j / T, j = 0..T                                     # (T+1,)
        self._log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.log1p(-betas), 0)])

    def alpha_bar_f64(self, t: torch.Tensor) -> torch.Tensor:
        T = self.num_train_steps
        pos = t * T
        lo = pos.floor().clamp(0, T - 1).long()
        frac = pos - lo.to(torch.float64)
        la = self._log_abar[lo] * (1 - frac) + self._log_abar[lo + 1] * frac
        return la.exp()

    def index_to_t(self, n: torch.Tensor | int) -> torch.Tensor:
        return (torch.as_tensor(n, dtype=torch.float64) + 1) / self.num_train_steps

    def t_to_index(self, t: TimeLike) -> torch.Tensor:
        """Nearest training index for t (clamped to 0..T-1)."""
        n = torch.round(torch.as_tensor(t, dtype=torch.float64) * self.num_train_steps - 1)
        return n.clamp(0, self.num_train_steps - 1).long()

    def to_dict(self) -> dict:
        return {"name": self.name, "num_train_steps": self.num_train_steps}


SCHEDULES: Registry = Registry("els_audit.schedules", "noise schedule")


def get_schedule(schedule: "str | NoiseSchedule") -> NoiseSchedule:
    """Resolve a schedule name (or pass an instance through)."""
    if isinstance(schedule, NoiseSchedule):
        return schedule
    if hasattr(schedule, "alpha_sigma") and not isinstance(schedule, str):
        return schedule  # duck-typed third-party object
    obj = SCHEDULES.get(schedule)
    return obj() if isinstance(obj, type) else obj


