"""First-party noise schedules (entry-point group ``els_audit.schedules``).

References: docs/theory.md section 1; Kamb & Ganguli 2025 (cosine-legacy); Nichol & Dhariwal
2021 (improved cosine); Ho et al. 2020 (linear DDPM betas).
"""

from __future__ import annotations

import math

import torch

from els_audit.schedules import DiscreteSchedule, NoiseSchedule

__all__ = ["CosineLegacySchedule", "ImprovedCosineSchedule", "LinearDDPMSchedule"]


class CosineLegacySchedule(NoiseSchedule):
    """The paper's schedule: ``beta(t) = 1 - cos^2(t / 1.008 * pi / 2)``.

    So ``a_t = cos(t/1.008 * pi/2)`` and ``b_t = sin(t/1.008 * pi/2)``; a(1) = 0.0125.
    """

    name = "cosine-legacy"

    def alpha_bar_f64(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(t / 1.008 * (math.pi / 2)) ** 2

    def _alpha_sigma_f64(self, t):
        ang = t / 1.008 * (math.pi / 2)
        return torch.cos(ang), torch.sin(ang)  # exact, no sqrt(1 - abar) cancellation


class ImprovedCosineSchedule(DiscreteSchedule):
    """Improved cosine (offset s = 0.008) as diffusers' ``squaredcos_cap_v2``.

    ``abar(t) = f(t)/f(0)``, ``f(t) = cos^2((t + s)/(1 + s) * pi/2)``, discretised into
    ``T`` betas clipped at 0.999 (so a(1) > 0 and DDIM from t = 1 is defined).
    """

    def __init__(self, num_train_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        T = num_train_steps
        j = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((j + s) / (1 + s) * (math.pi / 2)) ** 2                    # (T+1,)
        betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        super().__init__(betas, name="cosine")


class LinearDDPMSchedule(DiscreteSchedule):
    """DDPM linear betas from 1e-4 to 0.02 over 1000 integer steps (diffusers ``linear``)."""

    def __init__(self, num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        betas = torch.linspace(beta_start, beta_end, num_train_steps, dtype=torch.float64)
        super().__init__(betas, name="linear")
