"""The gradient-support check of the theoretical receptive field.

At an output pixel p, the support of ``|d out[p] / d x|`` (union over random inputs) must lie
inside the theoretical field of p *on the finite image*: the interval ``[lo, hi]`` of the
infinite-image map, folded back by every boundary condition the network reads (clipped for
zero / replicate padding, mirrored for reflect padding, wrapped around for circular padding
and rolls).  A support outside it means the theoretical analysis is wrong for this network;
the audit turns that into a failing check (``field_probe``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from .inputs import draw_x0
from .rf import ReceptiveFieldResult, boundary_modes, receptive_field
from .trace import TraceResult


@dataclass(frozen=True)
class ProbeResult:
    """Gradient-support check of the theoretical field at one output pixel.

    Attributes:
        pixel: the output pixel probed (centre by default).
        predicted: per axis, the (first, last) image index of the predicted field at that
            pixel on the finite image (its cells may wrap around: see ``boundaries``).
        support: per axis, the (first, last) index where |d out[pixel] / d x| > 0,
            union over the random inputs ((-1, -1) when nothing was found).
        inside: the support lies inside the predicted field (checked pixel by pixel).
        fill: fraction of the predicted field where the gradient was non-zero.
        n_inputs: number of random inputs.
        boundaries: the boundary conditions the field was folded by (``"circular"`` wraps).
    """

    pixel: tuple[int, ...]
    predicted: Mapping[str, tuple[int, int]]
    support: Mapping[str, tuple[int, int]]
    inside: bool
    fill: float
    n_inputs: int
    boundaries: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"pixel": list(self.pixel), "predicted": {k: list(v) for k, v in self.predicted.items()},
                "support": {k: list(v) for k, v in self.support.items()}, "inside": self.inside,
                "fill": round(self.fill, 6), "n_inputs": self.n_inputs, "boundaries": list(self.boundaries)}


def fold(lo: int, hi: int, n: int, modes: frozenset[str]) -> np.ndarray:
    """The cells of ``[0, n)`` that the infinite-image interval ``[lo, hi]`` reads under the
    boundary conditions ``modes`` (a union: a network may use several)."""
    q = np.arange(lo, hi + 1)
    cells = [q[(q >= 0) & (q < n)]]
    if "circular" in modes:
        cells.append(np.mod(q, n))
    if "reflect" in modes and n > 1:
        period = 2 * (n - 1)
        r = np.mod(q, period)
        cells.append(np.where(r < n, r, period - r))
    if modes & {"replicate", "zeros"} or not modes:
        cells.append(np.clip(q, 0, n - 1) if "replicate" in modes else cells[0])
    mask = np.zeros(n, dtype=bool)
    for c in cells:
        mask[c] = True
    return mask


def _supports(trace: TraceResult, pixels: list[tuple[int, ...]], n_inputs: int, seed: int) -> list[torch.Tensor]:
    """Per pixel, where |d out[pixel] / d x| > 0 (union over inputs): one forward per input,
    one backward per pixel on it."""
    nd = len(trace.spatial_axes)
    g = torch.Generator().manual_seed(seed)
    supports = [torch.zeros(trace.input_shape[-nd:], dtype=torch.bool) for _ in pixels]
    for _ in range(n_inputs):
        x = draw_x0(None, trace.input_shape[1:], trace.input_shape[0], g).requires_grad_(True)
        bound = trace.forward_signature.bind(*trace.example_args, **dict(trace.example_kwargs))
        bound.arguments[trace.image_arg] = x
        out = trace.run(*bound.args, **bound.kwargs)
        for k, pixel in enumerate(pixels):
            sel = out[(slice(None),) * (out.dim() - nd) + pixel]
            (grad,) = torch.autograd.grad(sel.sum(), x, retain_graph=k < len(pixels) - 1)
            supports[k] |= grad.abs().sum(dim=tuple(range(grad.dim() - nd))) > 0
    return supports


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
    nd = len(trace.spatial_axes)
    spatial = tuple(trace.input_shape[-nd:])
    pixel = tuple(int(p) for p in (pixel if pixel is not None else [s // 2 for s in spatial]))
    return probe_receptive_fields(trace, rf, [pixel], n_inputs=n_inputs, seed=seed)[0]


def probe_receptive_fields(trace: TraceResult, rf: Optional[ReceptiveFieldResult], pixels: Sequence[Sequence[int]],
                           *, n_inputs: int = 3, seed: int = 0) -> list[ProbeResult]:
    """:func:`probe_receptive_field` at several output pixels, sharing the forward passes."""
    if n_inputs < 1:
        raise ValueError(f"n_inputs must be >= 1, got {n_inputs}")
    if trace.forward_signature is None:
        raise ValueError("this TraceResult has no forward signature; re-trace with trace_model")
    rf = rf or receptive_field(trace)
    nd = len(trace.spatial_axes)
    pixels = [tuple(int(p) for p in pix) for pix in pixels]
    for pixel in pixels:
        if len(pixel) != nd or any(not 0 <= p < s for p, s in zip(pixel, trace.output_shape[-nd:])):
            raise ValueError(f"pixel {pixel} is not inside the output {trace.output_shape[-nd:]}")
    modes = boundary_modes(trace)
    return [_judge(trace, rf, pixel, support, modes, n_inputs)
            for pixel, support in zip(pixels, _supports(trace, pixels, n_inputs, seed))]


def _judge(trace: TraceResult, rf: ReceptiveFieldResult, pixel: tuple[int, ...], support: torch.Tensor,
           modes: frozenset[str], n_inputs: int) -> ProbeResult:
    """The support of one pixel against its theoretical field folded onto the image."""
    nd = len(trace.spatial_axes)
    spatial = tuple(trace.input_shape[-nd:])
    box = torch.ones(spatial, dtype=torch.bool)
    predicted: dict[str, tuple[int, int]] = {}
    for k, a in enumerate(trace.spatial_axes):
        af = next((f for f in rf.axes if f.axis == a), None) if rf.axes and not rf.is_global else None
        mask = fold(*af.interval(pixel[k]), spatial[k], modes) if af is not None else np.ones(spatial[k], bool)
        idx = np.nonzero(mask)[0]
        predicted[a] = (int(idx.min()), int(idx.max())) if idx.size else (-1, -1)
        shape = [1] * nd
        shape[k] = spatial[k]
        box = box & torch.from_numpy(mask).view(shape)
    sup_box = {}
    for k, a in enumerate(trace.spatial_axes):
        other = tuple(j for j in range(nd) if j != k)
        line = support.any(dim=other) if other else support
        idx = torch.nonzero(line).flatten()
        sup_box[a] = (int(idx.min()), int(idx.max())) if idx.numel() else (-1, -1)
    inside = bool((support & ~box).sum() == 0)
    fill = float((support & box).sum()) / max(1, int(box.sum()))
    return ProbeResult(pixel, predicted, sup_box, inside, fill, n_inputs, tuple(sorted(modes)))
