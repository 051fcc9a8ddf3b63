"""The gradient-support check of the theoretical receptive field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from .inputs import draw_x0
from .rf import ReceptiveFieldResult, receptive_field
from .trace import TraceResult


# ----------------------------------------------------------------------------------------
# Numerical probe
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeResult:
    """Gradient-support check of the theoretical field at one output pixel.

    Attributes:
        pixel: the output pixel probed (centre by default).
        predicted: per axis, the (first, last) image index of the theoretical field at
            that pixel (clipped to the image; wrap-around ignored).
        support: per axis, the (first, last) index where |d out[pixel] / d x| > 0,
            union over the random inputs.
        inside: the support lies inside the predicted box (checked per pixel).
        fill: fraction of the predicted box where the gradient was non-zero.
        n_inputs: number of random inputs.
    """

    pixel: tuple[int, ...]
    predicted: Mapping[str, tuple[int, int]]
    support: Mapping[str, tuple[int, int]]
    inside: bool
    fill: float
    n_inputs: int

    def to_dict(self) -> dict:
        return {"pixel": list(self.pixel), "predicted": {k: list(v) for k, v in self.predicted.items()},
                "support": {k: list(v) for k, v in self.support.items()}, "inside": self.inside,
                "fill": round(self.fill, 6), "n_inputs": self.n_inputs}


def probe_receptive_field(trace: TraceResult, rf: Optional[ReceptiveFieldResult] = None, *,
                          n_inputs: int = 3, seed: int = 0, pixel: Optional[Sequence[int]] = None) -> ProbeResult:
    """Check the theoretical field against the support of |d out[pixel] / d x|.

    Runs the traced graph on ``n_inputs`` random images (N(0, I), seeded; the other inputs
    as in the example) and records where the gradient of the output at ``pixel`` (summed
    over batch and channels) is non-zero.

    Args:
        trace: the traced network.
        rf: its :class:`ReceptiveFieldResult` (computed when omitted).
        n_inputs: random inputs to take the union of supports over.
        seed: seed of the random inputs.
        pixel: output pixel (spatial indices); default the centre ``N // 2``.

    Returns:
        :class:`ProbeResult`.
    """
    if n_inputs < 1:
        raise ValueError(f"n_inputs must be >= 1, got {n_inputs}")
    rf = rf or receptive_field(trace)
    nd = len(trace.spatial_axes)
    spatial = trace.input_shape[-nd:]
    pixel = tuple(int(p) for p in (pixel if pixel is not None else [s // 2 for s in spatial]))
    if len(pixel) != nd or any(not 0 <= p < s for p, s in zip(pixel, trace.output_shape[-nd:])):
        raise ValueError(f"pixel {pixel} is not inside the output {trace.output_shape[-nd:]}")
    g = torch.Generator().manual_seed(seed)
    if trace.forward_signature is None:
        raise ValueError("this TraceResult has no forward signature; re-trace with trace_model")
    support = torch.zeros(spatial, dtype=torch.bool)
    for _ in range(n_inputs):
        x = draw_x0(None, trace.input_shape[1:], trace.input_shape[0], g).requires_grad_(True)
        bound = trace.forward_signature.bind(*trace.example_args, **dict(trace.example_kwargs))
        bound.arguments[trace.image_arg] = x
        out = trace.run(*bound.args, **bound.kwargs)
        sel = out[(slice(None),) * (out.dim() - nd) + pixel]
        (grad,) = torch.autograd.grad(sel.sum(), x)
        support |= grad.abs().sum(dim=tuple(range(grad.dim() - nd))) > 0
    predicted: dict[str, tuple[int, int]] = {}
    box = torch.ones(spatial, dtype=torch.bool)
    if rf.axes and not rf.is_global:
        for k, af in enumerate(rf.axes):
            lo, hi = af.interval(pixel[k])
            lo, hi = max(0, lo), min(spatial[k] - 1, hi)
            predicted[af.axis] = (lo, hi)
            mask = torch.zeros(spatial[k], dtype=torch.bool)
            mask[lo: hi + 1] = True
            shape = [1] * nd
            shape[k] = spatial[k]
            box = box & mask.view(shape)
    else:
        for k, a in enumerate(trace.spatial_axes):
            predicted[a] = (0, spatial[k] - 1)
    sup_box = {}
    for k, a in enumerate(trace.spatial_axes):
        other = tuple(j for j in range(nd) if j != k)
        line = support.any(dim=other) if other else support
        idx = torch.nonzero(line).flatten()
        sup_box[a] = (int(idx.min()), int(idx.max())) if idx.numel() else (-1, -1)
    inside = bool((support & ~box).sum() == 0)
    fill = float((support & box).sum()) / max(1, int(box.sum()))
    return ProbeResult(pixel, predicted, sup_box, inside, fill, n_inputs)
