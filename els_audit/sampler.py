"""The one deterministic DDIM sampler that drives networks and machines alike.

Reference: Song et al. 2021 (DDIM, eta = 0); docs/theory.md section 1.  On the grid
``t_i = i / T``, i = T..1:

    x <- (a_{i-1} / a_i) x + (b_{i-1} - (a_{i-1} / a_i) b_i) eps_hat(x, t_i)

and the last step lands on t = 0.  Comparing a network with a machine is only meaningful
when both run on the same grid from the same seed: use :func:`initial_noise`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .schedules import NoiseSchedule, get_schedule

__all__ = ["ddim_sample", "SampleResult", "initial_noise", "time_grid", "EpsFn"]

# eps(x [B,C,H,W], t [B] float in [0,1], label [B] long or None) -> eps_hat [B,C,H,W]
EpsFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def time_grid(steps: int) -> list[float]:
    """The sampler grid ``[T/T, (T-1)/T, ..., 0]`` (T + 1 points, descending)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [i / steps for i in range(steps, -1, -1)]


def initial_noise(seeds, shape: tuple[int, int, int], dtype=torch.float32) -> torch.Tensor:
    """x_T for each seed: one independent N(0, I) draw of ``shape`` (C, H, W) per seed.

    Seed s gives the same noise whatever batch it is drawn in.
    """
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        out.append(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))
    return torch.stack(out)                                                      # (B, C, H, W)


@dataclass(frozen=True)
class SampleResult:
    """Final samples and (optionally) the trajectory.

    ``x0``: (B, C, H, W) sample at t = 0.  ``times``: the grid, descending.
    ``xs``: (T+1, B, C, H, W) states x_{t_i} for every grid point (``xs[0]`` = x_T,
    ``xs[-1]`` = x0), ``eps``: (T, B, C, H, W) eps_hat used at each step; both ``None``
    unless capture was asked for.
    """

    x0: torch.Tensor
    times: tuple[float, ...]
    xs: Optional[torch.Tensor] = None
    eps: Optional[torch.Tensor] = None


@torch.no_grad()
def ddim_sample(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    *,
    steps: int = 20,
    schedule: "str | NoiseSchedule" = "cosine-legacy",
    label: Optional[torch.Tensor] = None,
    capture: bool = False,
    step_callback: Optional[Callable[[int, float, torch.Tensor, torch.Tensor], None]] = None,
) -> SampleResult:
    """Run deterministic DDIM (eta = 0) from ``x_T`` down to t = 0.

    Args:
        eps_fn: denoiser ``eps(x, t, label)``; ``t`` is passed as a float tensor [B].
        x_T: (B, C, H, W) starting noise (see :func:`initial_noise`).
        steps: number of steps T on the uniform grid t_i = i/T.
        schedule: schedule name or object giving (a_t, b_t).
        label: optional (B,) class labels passed through to ``eps_fn``.
        capture: keep every x_t and eps_hat.
        step_callback: called as ``f(step_index, t, x_t, eps_hat)`` at each step
            (step_index 0 is t = 1).

    Returns:
        :class:`SampleResult`.
    """
    sched = get_schedule(schedule)
    grid = time_grid(steps)
    x = x_T
    B = x.shape[0]
    xs, epss = ([x.clone()], []) if capture else (None, None)
    for i in range(steps):
        t_now, t_next = grid[i], grid[i + 1]
        a_now, b_now = (float(v) for v in sched.alpha_sigma(t_now))
        a_next, b_next = (float(v) for v in sched.alpha_sigma(t_next))
        t_vec = torch.full((B,), t_now, dtype=x.dtype, device=x.device)
        eps = eps_fn(x, t_vec, label)
        if eps.shape != x.shape:
            raise ValueError(f"denoiser returned shape {tuple(eps.shape)} for input {tuple(x.shape)}")
        if step_callback is not None:
            step_callback(i, t_now, x, eps)
        ratio = a_next / a_now
        x = ratio * x + (b_next - ratio * b_now) * eps
        if capture:
            xs.append(x.clone())
            epss.append(eps.clone())
    return SampleResult(
        x0=x,
        times=tuple(grid),
        xs=torch.stack(xs) if capture else None,
        eps=torch.stack(epss) if capture else None,
    )
