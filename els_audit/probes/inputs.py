"""The inputs the numerical probes run the network on: checked shapes, data and labels, and
noisy images ``x_t = a_t x0 + b_t z`` (seeded)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from ..schedules import NoiseSchedule

import torch


def noisy_inputs(schedule: NoiseSchedule, t: float, data: Optional[torch.Tensor], image_shape: tuple, n: int,
                 g: torch.Generator) -> tuple[torch.Tensor, float, float]:
    """``n`` inputs of the forward process at time ``t``: ``x_t = a_t x0 + b_t z`` with x0 drawn
    from ``data`` (else N(0, I)) and z ~ N(0, I), both from ``g`` (in that order).

    Returns:
        (x [n, *image_shape] float32, a_t, b_t).
    """
    a_t, b_t = (float(v) for v in schedule.alpha_sigma(float(t)))
    x0 = draw_x0(data, image_shape, n, g)
    z = torch.randn((n,) + tuple(image_shape), generator=g)
    return a_t * x0 + b_t * z, a_t, b_t


def check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(image_shape) != 3 or any(int(s) < 1 for s in image_shape):
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)}")
    return tuple(int(s) for s in image_shape)  # type: ignore[return-value]


def draw_x0(data: Optional[torch.Tensor], image_shape: tuple, n: int, g: torch.Generator) -> torch.Tensor:
    if data is None:
        return torch.randn((n,) + tuple(image_shape), generator=g)
    idx = torch.randint(0, data.shape[0], (n,), generator=g) if data.shape[0] < n else torch.randperm(data.shape[0], generator=g)[:n]
    return data[idx].to(torch.float32)


def check_data(data: Optional[torch.Tensor], image_shape: tuple) -> Optional[torch.Tensor]:
    if data is None:
        return None
    data = torch.as_tensor(data)
    if data.dim() != 4 or tuple(data.shape[1:]) != tuple(image_shape):
        raise ValueError(f"data must be [N, C, H, W] = [N, {', '.join(map(str, image_shape))}], got {tuple(data.shape)}")
    if data.shape[0] < 1:
        raise ValueError("data is empty; pass at least one training image or data=None")
    lo, hi = float(data.min()), float(data.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"data must be scaled to [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; rescale x -> 2x - 1")
    return data


def check_labels(label: Any, n: int) -> Optional[torch.Tensor]:
    if label is None:
        return None
    lab = torch.as_tensor(label, dtype=torch.long)
    if lab.dim() == 0:
        return lab.expand(n).clone()
    if lab.shape != (n,):
        raise ValueError(f"label must be an int or a tensor of {n} labels (one per sample), got shape {tuple(lab.shape)}")
    return lab
