"""Separate scales for the border band and the interior (issue 19, variant c).

A zero-padded network sees the padding within k // 2 of the border, and bbELS models that
band with patches of the same padding pattern (docs/theory.md section 2).  Nothing says
the network looks as far there as in the interior.  The banded machine takes two patch
sizes per step: pixels within ``k // 2`` of an edge (the band where the interior scale's
window meets the padding) get the machine's answer at ``k_band``, every other pixel its
answer at ``k``.  Each pixel's answer is the machine's own exact answer at its size, so the
banded machine is exact to this definition and shards like the machine itself.

``k_band == k`` is the machine itself.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from . import ScoreDiagnostics, ScoreMachine, _check_k, _grid_step

__all__ = ["band_mask", "banded_score", "banded_schedule_eps", "band_pair_errors"]


def band_mask(H: int, W: int, k: int, device=None) -> torch.Tensor:
    """(H, W) bool: the pixels within k // 2 of an edge."""
    r = k // 2
    yy, xx = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
    return (yy < r) | (yy >= H - r) | (xx < r) | (xx >= W - r)


def banded_score(machine: ScoreMachine, x: torch.Tensor, t, k: int, k_band: int, label=None, *,
                 diagnostics: bool = False):
    """The banded machine's score (and diagnostics): the machine at ``k_band`` in the band
    of ``k``, at ``k`` elsewhere (module docstring)."""
    _check_k(k)
    _check_k(k_band)
    if k_band == k:
        return machine.score(x, t, k=k, label=label, diagnostics=diagnostics)
    band = band_mask(x.shape[-2], x.shape[-1], k, x.device)
    if not diagnostics:
        sw = machine.score_sweep(x, t, (k, k_band), label=label)
        return torch.where(band, sw[k_band], sw[k])
    s_in, d_in = machine.score(x, t, k=k, label=label, diagnostics=True)
    s_band, d_band = machine.score(x, t, k=k_band, label=label, diagnostics=True)
    diag = ScoreDiagnostics(**{f: torch.where(band, getattr(d_band, f), getattr(d_in, f))
                               for f in ScoreDiagnostics.__dataclass_fields__})
    return torch.where(band, s_band, s_in), diag


def banded_schedule_eps(machine: ScoreMachine, scales: Sequence[int], band_scales: Sequence[int], steps: int):
    """Like :func:`els_audit.machines.scale_schedule_eps`, with ``band_scales[i-1]`` in the
    border band at grid time ``t_i = i / steps``."""
    if len(scales) != steps or len(band_scales) != steps:
        raise ValueError(f"need one scale and one band scale per step: got {len(scales)} and {len(band_scales)} "
                         f"for {steps} steps")
    for k in (*scales, *band_scales):
        _check_k(k)

    def eps(x, t, label=None):
        i = _grid_step(t, steps)
        _, b = machine._coefficients(t, x)
        return -b[:, None, None, None] * banded_score(machine, x, t, scales[i - 1], band_scales[i - 1], label)

    return eps


def band_pair_errors(sq_err: dict, ks: Sequence[int], shape: Optional[tuple] = None) -> np.ndarray:
    """(n, n, B) summed squared error of the banded answer for every (k, k_band) pair of
    ``ks``, from each size's per-pixel squared error ``sq_err[k]`` (B, H, W) (summed over
    channels): the band of k takes k_band's errors, the rest k's."""
    ks = list(ks)
    B, H, W = sq_err[ks[0]].shape
    out = np.zeros((len(ks), len(ks), B))
    for i, k in enumerate(ks):
        band = band_mask(H, W, k, sq_err[k].device)
        inner = (sq_err[k] * ~band).sum((1, 2))                                       # (B,)
        for j, kb in enumerate(ks):
            out[i, j] = (inner + (sq_err[kb] * band).sum((1, 2))).double().cpu().numpy()
    return out
