"""Stage 4 of the architecture probes: the effective receptive field at every noise level.

References:
- W. Luo, Y. Li, R. Urtasun, R. Zemel, "Understanding the Effective Receptive Field in
  Deep Convolutional Neural Networks", NeurIPS 2016: the ERF is the map of
  |d out[p] / d x|, concentrated far inside the theoretical field.
- Kamb & Ganguli, ICML 2025 (docs/theory.md sections 2-3): the ELS machine denoises pixel p from
  the k x k patch around it, with k fitted per step; Niedoba et al., ICML 2025: patch
  supports derived from gradient sensitivity maps.
- captum ``Saliency`` (Simonyan et al. 2014): |gradient| attribution with per-example
  targets.

For each t on the sampler grid (``t_i = i / steps``, i = steps .. 1, the times at which
:func:`els_audit.sampler.ddim_sample` calls the network), inputs are drawn from the forward
process ``x_t = a_t x0 + b_t z`` (x0 from training images when given, else N(0, I)), and
for output pixels at the centre, an edge and a corner the map

    M_p(q) = mean over inputs of  sum_{c_out, c_in} |d eps[c_out, p] / d x[c_in, q]|

is computed.  Summaries: ERF50 / 90 / 99, the side of the smallest square centred on p
(clipped to the image) that holds 50 / 90 / 99 % of the mass of M_p.

The same gradients also give the map of the implied clean-image estimate
``x0_hat = (x - b_t eps) / a_t``, whose Jacobian is ``(I - b_t J_eps) / a_t``: off the
diagonal it is ``J_eps`` scaled by ``b_t / a_t``; on the diagonal it is ``|1 - b_t J|``.
At high noise eps is close to x itself (``J_eps ~ I``), so the eps map is a spike at p
that hides how far the network looks; the x0 map removes that shared identity term (the
same reason docs/theory.md gives for comparing predicted x0 when calibrating).

Predicted ELS patch size per step: ``k_t = ERF_q(centre)`` of the x0 map (``patch_from``,
default ``"x0"``; ``"eps"`` reads the eps map) with ``q = els_mass`` (default 0.9), odd
by construction, clamped to ``[min_patch, k_max]`` where ``k_max`` is the largest odd
number <= min(H, W).  NB: a heuristic -- the patch the ELS machine compares is taken to be
the window holding most of the network's sensitivity at the centre pixel; a later stage
compares it with calibrated sizes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .inputs import check_data, check_image_shape, check_labels, noisy_inputs
from ..sampler import time_grid
from ..schedules import NoiseSchedule, get_schedule

__all__ = ["ERFResult", "effective_receptive_field", "erf_side", "DEFAULT_BACKEND", "BACKENDS"]

#: Gradient backends.  NB: measured in bench/bench_probes.py (2 CPU cores, 32x32, 20 steps,
#: 8 inputs; bench/README.md "Probes"): the two give identical maps, and plain autograd
#: was faster on every model (PaperResNet 6.5 s vs 17.4 s, PaperUNet 6.1 vs 10.0,
#: AttentionUNet 16.8 vs 25.1, diffusers UNet2DModel 28.0 vs 28.3; at 5 steps, best of 4
#: alternating: 3.1 vs 4.6, 1.6 vs 2.8, 3.2 vs 5.6).  captum's Saliency
#: takes one target per example, so each (input, pixel, channel) needs its own copy of the
#: input and its own forward; the autograd path runs one forward per input and one
#: backward per (pixel, channel) on the retained graph.  Hence autograd is the default.
BACKENDS = ("autograd", "captum")
DEFAULT_BACKEND = "autograd"
MASSES = (0.5, 0.9, 0.99)

EpsFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def erf_side(mass_map: np.ndarray, pixel: Sequence[int], q: float, wrap: bool = False) -> int:
    """Side of the smallest square centred on ``pixel`` holding a fraction ``q`` of the
    mass of ``mass_map`` (H, W).  Odd: ``2 r + 1`` for the smallest Chebyshev radius r
    with mass(dist <= r) >= q * total.  The square may stick out of the image (edge and
    corner pixels); only the pixels inside count -- unless ``wrap``: then the image is a
    torus (a circularly padded network) and the square wraps around the edges.  A zero
    map gives 1."""
    m = np.asarray(mass_map, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"mass_map must be (H, W), got shape {m.shape}")
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")
    total = float(m.sum())
    if total <= 0.0:
        return 1
    H, W = m.shape
    hh, ww = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    dh, dw = np.abs(hh - int(pixel[0])), np.abs(ww - int(pixel[1]))
    if wrap:
        dh, dw = np.minimum(dh, H - dh), np.minimum(dw, W - dw)
    d = np.maximum(dh, dw)                                                       # (H, W) Chebyshev
    by_r = np.bincount(d.ravel(), weights=m.ravel())
    cum = np.cumsum(by_r)
    # NB: a relative tolerance of 1e-9 absorbs float round-off in the cumulative sum.
    r = int(np.searchsorted(cum, q * total * (1.0 - 1e-9), side="left"))
    return 2 * min(r, len(cum) - 1) + 1


@dataclass(frozen=True)
class ERFResult:
    """Effective receptive field per noise level.

    Attributes:
        times: t at each step, in sampler order (step 0 is t = 1, the last is t = 1/steps).
        pixels: name -> (h, w) of the probed output pixels (``centre``, ``edge``, ``corner``).
        erf50 / erf90 / erf99: name -> per-step side (odd, px) of the smallest centred
            square holding 50 / 90 / 99 % of the mass of |d eps[p] / dx|.
        x0_erf50 / x0_erf90 / x0_erf99: the same for the implied clean-image estimate
            ``x0_hat = (x - b_t eps) / a_t`` (no extra gradients: its Jacobian is
            ``(I - b_t J_eps) / a_t``).
        predicted_patch: per-step predicted ELS patch size (odd, clamped to the image).
        patch_rule: how ``predicted_patch`` is derived, in words.
        gradient_mass: name -> per-step total mean |gradient| (the map's scale before
            normalisation).
        backend: ``"autograd"`` or ``"captum"``.
        n_samples, seed, image_shape, schedule, data_source: the set-up.
        geometry: ``"plane"`` (squares clipped at the edges) or ``"torus"`` (they wrap around,
            for a circularly padded network).
    """

    times: tuple[float, ...]
    pixels: Mapping[str, tuple[int, int]]
    erf50: Mapping[str, tuple[int, ...]]
    erf90: Mapping[str, tuple[int, ...]]
    erf99: Mapping[str, tuple[int, ...]]
    x0_erf50: Mapping[str, tuple[int, ...]]
    x0_erf90: Mapping[str, tuple[int, ...]]
    x0_erf99: Mapping[str, tuple[int, ...]]
    predicted_patch: tuple[int, ...]
    patch_rule: str
    gradient_mass: Mapping[str, tuple[float, ...]]
    backend: str
    n_samples: int
    seed: int
    image_shape: tuple[int, int, int]
    schedule: str
    data_source: str
    geometry: str = "plane"
    maps: np.ndarray = field(repr=False, compare=False, default=None)
    x0_maps: np.ndarray = field(repr=False, compare=False, default=None)

    def on_grid(self, steps: int) -> "ERFResult":
        """The result on a coarser grid of ``steps`` steps whose times are among these (its
        step count divides this one's): every per-step entry at those times."""
        fine = len(self.times)
        if steps == fine:
            return self
        if steps < 1 or fine % steps:
            raise ValueError(f"the ERF was measured on {fine} steps; a grid of {steps} steps is not part of it "
                             f"(its step count must divide {fine})")
        idx = list(range(0, fine, fine // steps))                    # sampler order: t = 1 first

        def pick(per_step: Mapping[str, Sequence]) -> dict:
            return {k: tuple(v[i] for i in idx) for k, v in per_step.items()}

        return dataclasses.replace(
            self, times=tuple(self.times[i] for i in idx), erf50=pick(self.erf50), erf90=pick(self.erf90),
            erf99=pick(self.erf99), x0_erf50=pick(self.x0_erf50), x0_erf90=pick(self.x0_erf90),
            x0_erf99=pick(self.x0_erf99), predicted_patch=tuple(self.predicted_patch[i] for i in idx),
            gradient_mass=pick(self.gradient_mass),
            maps=None if self.maps is None else self.maps[idx],
            x0_maps=None if self.x0_maps is None else self.x0_maps[idx])

    def arrays(self) -> dict[str, np.ndarray]:
        """``erf_maps`` (eps) and ``x0_erf_maps`` (x0_hat): [T, P, H, W] float32, each map
        normalised to sum 1 (P follows ``pixels``); ``times``: [T]."""
        return {"erf_maps": self.maps.copy(), "x0_erf_maps": self.x0_maps.copy(),
                "times": np.asarray(self.times, dtype=np.float64)}

    def to_dict(self) -> dict:
        return {
            "times": [round(t, 6) for t in self.times],
            "pixels": {k: list(v) for k, v in self.pixels.items()},
            "erf50": {k: list(v) for k, v in self.erf50.items()},
            "erf90": {k: list(v) for k, v in self.erf90.items()},
            "erf99": {k: list(v) for k, v in self.erf99.items()},
            "x0_erf50": {k: list(v) for k, v in self.x0_erf50.items()},
            "x0_erf90": {k: list(v) for k, v in self.x0_erf90.items()},
            "x0_erf99": {k: list(v) for k, v in self.x0_erf99.items()},
            "predicted_patch": list(self.predicted_patch),
            "patch_rule": self.patch_rule,
            "gradient_mass": {k: [float(f"{v:.4e}") for v in vs] for k, vs in self.gradient_mass.items()},
            "backend": self.backend,
            "n_samples": self.n_samples,
            "seed": self.seed,
            "image_shape": list(self.image_shape),
            "schedule": self.schedule,
            "data_source": self.data_source,
            "geometry": self.geometry,
        }


def _default_pixels(H: int, W: int) -> dict[str, tuple[int, int]]:
    return {"centre": (H // 2, W // 2), "edge": (H // 2, 0), "corner": (0, 0)}


def _accumulate(acc_eps: torch.Tensor, acc_x0: torch.Tensor, p_idx: torch.Tensor, c_idx: torch.Tensor,
                pix: torch.Tensor, g: torch.Tensor, b_t: float) -> None:
    """Add one batch of rows to the eps and x0 maps.

    Row r is the signed gradient ``g[r] = d eps[c_r, p_r] / d x`` of one input.  With
    ``x0_hat = (x - b_t eps) / a_t``, ``a_t d x0_hat[c, p] / dx = delta_{(c,p)} - b_t g``:
    off the diagonal ``b_t |g|``, on it ``|1 - b_t g|``.  (The 1 / a_t factor cancels in the
    normalised map.)
    """
    a = g.abs()                                                                  # (R, C, H, W)
    acc_eps.index_add_(0, p_idx, a.sum(dim=1).to(torch.float64))                 # (P, H, W)
    x0 = a * b_t                                                                 # (R, C, H, W)
    r = torch.arange(g.shape[0])
    hh, ww = pix[p_idx, 0], pix[p_idx, 1]                                        # (R,)
    x0[r, c_idx, hh, ww] = (1.0 - b_t * g[r, c_idx, hh, ww]).abs()
    acc_x0.index_add_(0, p_idx, x0.sum(dim=1).to(torch.float64))                 # (P, H, W)


def _maps_autograd(eps_fn: EpsFn, x: torch.Tensor, t: torch.Tensor, lab: Optional[torch.Tensor],
                   pix: torch.Tensor, batch_size: int, b_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over inputs of the eps and x0 sensitivity maps of every pixel p (see
    :func:`_accumulate`).

    One forward per chunk of inputs, then one backward per (pixel, output channel) on the
    same graph (``retain_graph``): the forward is shared by all pixels.
    Returns two (P, H, W) float64 tensors.
    """
    n, C, H, W = x.shape
    P = pix.shape[0]
    acc_eps = torch.zeros((P, H, W), dtype=torch.float64)
    acc_x0 = torch.zeros((P, H, W), dtype=torch.float64)
    chunk = max(1, batch_size // max(1, P * C))
    jobs = [(p, c) for p in range(P) for c in range(C)]
    for i in range(0, n, chunk):
        xb = x[i: i + chunk].detach().requires_grad_(True)                      # (b, C, H, W)
        out = eps_fn(xb, t[i: i + chunk], None if lab is None else lab[i: i + chunk])
        if out.shape != xb.shape:
            raise ValueError(f"eps_fn returned shape {tuple(out.shape)} for inputs {tuple(xb.shape)}")
        if not out.requires_grad:  # detached from the input (no_grad inside, integer output): no gradient
            continue
        nb = xb.shape[0]
        for j, (p, c) in enumerate(jobs):
            sel = out[:, c, pix[p, 0], pix[p, 1]]                                # (b,)
            (g,) = torch.autograd.grad(sel.sum(), xb, retain_graph=j < len(jobs) - 1)
            _accumulate(acc_eps, acc_x0, torch.full((nb,), p), torch.full((nb,), c), pix, g.detach(), b_t)
    return acc_eps, acc_x0


def _maps_captum(eps_fn: EpsFn, x: torch.Tensor, t: torch.Tensor, lab: Optional[torch.Tensor],
                 pix: torch.Tensor, batch_size: int, b_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as :func:`_maps_autograd` with captum ``Saliency`` (signed gradients,
    ``abs=False``): every (input, pixel, output channel) is one example of a replicated
    batch with its own target -- captum takes one target per example, so the forward is
    not shared."""
    from captum.attr import Saliency

    n, C, H, W = x.shape
    P = pix.shape[0]

    def fwd(xx: torch.Tensor, tt: torch.Tensor, ll: Any = None) -> torch.Tensor:
        return eps_fn(xx, tt, ll)

    sal = Saliency(fwd)
    s_idx = torch.arange(n).repeat_interleave(P * C)                             # (R,)
    p_idx = torch.arange(P).repeat_interleave(C).repeat(n)                       # (R,)
    c_idx = torch.arange(C).repeat(n * P)                                        # (R,)
    acc_eps = torch.zeros((P, H, W), dtype=torch.float64)
    acc_x0 = torch.zeros((P, H, W), dtype=torch.float64)
    for i in range(0, s_idx.numel(), batch_size):
        sl = slice(i, i + batch_size)
        xb = x[s_idx[sl]].detach().requires_grad_(True)                          # (r, C, H, W)
        tgt = [(int(c), int(pix[p, 0]), int(pix[p, 1])) for c, p in zip(c_idx[sl], p_idx[sl])]
        extra = (t[s_idx[sl]],) if lab is None else (t[s_idx[sl]], lab[s_idx[sl]])
        g = sal.attribute(xb, target=tgt, abs=False, additional_forward_args=extra).detach()
        _accumulate(acc_eps, acc_x0, p_idx[sl], c_idx[sl], pix, g, b_t)
    return acc_eps, acc_x0


def _check_settings(steps: int, n_samples: int, batch_size: int, backend: str, els_mass: float, min_patch: int,
                    patch_from: str) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples and batch_size must be >= 1, got {n_samples}, {batch_size}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not 0.0 < els_mass <= 1.0:
        raise ValueError(f"els_mass must be in (0, 1], got {els_mass}")
    if min_patch < 1 or min_patch % 2 == 0:
        raise ValueError(f"min_patch must be a positive odd number, got {min_patch}")
    if patch_from not in ("x0", "eps"):
        raise ValueError(f"patch_from must be 'x0' or 'eps', got {patch_from!r}")


def _check_pixels(pixels: Optional[Mapping[str, Sequence[int]]], H: int, W: int) -> dict[str, tuple[int, int]]:
    pix = dict(pixels) if pixels is not None else _default_pixels(H, W)
    if not pix:
        raise ValueError("pixels is empty; pass e.g. {'centre': (H // 2, W // 2)}")
    for name, (h, w) in pix.items():
        if not (0 <= int(h) < H and 0 <= int(w) < W):
            raise ValueError(f"pixel {name}={(h, w)} is outside the {H}x{W} image")
    return {k: (int(v[0]), int(v[1])) for k, v in pix.items()}


def _normalise(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each (T, P) map divided by its mass (zero maps stay zero); and the masses."""
    mass = m.sum(axis=(2, 3))                                                    # (T, P)
    return np.where(mass[..., None, None] > 0, m / np.maximum(mass[..., None, None], 1e-300), 0.0), mass


def effective_receptive_field(
    eps_fn: EpsFn,
    image_shape: Sequence[int],
    *,
    steps: int = 20,
    schedule: Union[str, NoiseSchedule] = "cosine-legacy",
    data: Optional[torch.Tensor] = None,
    n_samples: int = 8,
    seed: int = 0,
    label: Any = None,
    pixels: Optional[Mapping[str, Sequence[int]]] = None,
    els_mass: float = 0.9,
    min_patch: int = 3,
    patch_from: str = "x0",
    backend: str = DEFAULT_BACKEND,
    batch_size: int = 256,
    wrap: bool = False,
) -> ERFResult:
    """Effective receptive field of a denoiser at every step of the sampler grid.

    Args:
        eps_fn: ``eps(x [B,C,H,W], t [B] float, label [B] long or None) -> [B,C,H,W]``.
            Examples of a batch must not interact (eval mode; no batch statistics).
        image_shape: (C, H, W).
        steps: number of sampler steps T; the probed times are ``i / T``, i = T .. 1.
        schedule: noise schedule (name or object) giving (a_t, b_t).
        data: optional [N, C, H, W] training images in [-1, 1] (else x0 ~ N(0, I)).
        n_samples: inputs x_t averaged per step.
        seed: seed of the inputs.
        label: class label(s) for a conditional model (int or [n_samples]).
        pixels: name -> (h, w) output pixels; default centre (H//2, W//2), edge (H//2, 0),
            corner (0, 0).  ``predicted_patch`` uses ``"centre"`` (else the first).
        els_mass: mass fraction defining the predicted ELS patch (see module docstring).
        min_patch: smallest predicted patch (odd; the paper's candidates start at 3).
        patch_from: ``"x0"`` (default) or ``"eps"``: which map the predicted patch is
            read from (see module docstring).
        backend: ``"autograd"`` or ``"captum"`` (same numbers; see :data:`DEFAULT_BACKEND`).
        batch_size: bounds the work per backward: ``batch_size // (pixels x channels)``
            inputs per forward (autograd), or that many replicated rows (captum).
        wrap: measure the squares on the torus (for a network whose every boundary is
            circular: an edge pixel's field continues on the opposite edge).

    Returns:
        :class:`ERFResult`; the normalised maps [T, P, H, W] are in ``arrays()``.
    """
    C, H, W = check_image_shape(image_shape)
    _check_settings(steps, n_samples, batch_size, backend, els_mass, min_patch, patch_from)
    pix = _check_pixels(pixels, H, W)
    sched = get_schedule(schedule)
    data = check_data(data, (C, H, W))
    lab = check_labels(label, n_samples)
    compute = _maps_autograd if backend == "autograd" else _maps_captum
    g = torch.Generator().manual_seed(int(seed))
    times = time_grid(steps)[:-1]                                                # t = 1 .. 1/T
    names = list(pix)
    P = len(names)
    k_max = min(H, W) if min(H, W) % 2 else min(H, W) - 1
    lo_k = min(min_patch, k_max)
    pix_t = torch.tensor([pix[n] for n in names], dtype=torch.long)              # (P, 2)

    maps = np.zeros((len(times), P, H, W), dtype=np.float64)
    maps_x0 = np.zeros((len(times), P, H, W), dtype=np.float64)
    for ti, t in enumerate(times):
        x, a_t, b_t = noisy_inputs(sched, float(t), data, (C, H, W), n_samples, g)      # (n, C, H, W)
        tv = torch.full((n_samples,), float(t))
        m_eps, m_x0 = compute(eps_fn, x, tv, lab, pix_t, batch_size, b_t)       # (P, H, W) each
        maps[ti] = (m_eps / n_samples).numpy()
        maps_x0[ti] = (m_x0 / n_samples).numpy()

    norm, mass = _normalise(maps)
    norm_x0, _ = _normalise(maps_x0)

    def sides(nm: np.ndarray, q: float) -> dict:
        return {n: tuple(erf_side(nm[ti, pi], pix[n], q, wrap) for ti in range(len(times))) for pi, n in enumerate(names)}

    erf = {q: sides(norm, q) for q in MASSES}
    erf_x0 = {q: sides(norm_x0, q) for q in MASSES}
    centre = "centre" if "centre" in pix else names[0]
    ci = names.index(centre)
    src = norm_x0 if patch_from == "x0" else norm
    patch = tuple(int(min(k_max, max(lo_k, erf_side(src[ti, ci], pix[centre], els_mass, wrap)))) for ti in range(len(times)))
    what = "x0_hat" if patch_from == "x0" else "eps"
    rule = (f"k_t = side of the smallest square centred on the {centre} pixel holding {els_mass:.0%} of "
            f"sum|d {what}[{centre}]/dx| (odd by construction), clamped to [{lo_k}, {k_max}]")
    return ERFResult(
        times=tuple(float(t) for t in times),
        pixels=pix,
        erf50=erf[0.5], erf90=erf[0.9], erf99=erf[0.99],
        x0_erf50=erf_x0[0.5], x0_erf90=erf_x0[0.9], x0_erf99=erf_x0[0.99],
        predicted_patch=patch,
        patch_rule=rule,
        gradient_mass={n: tuple(float(mass[ti, pi]) for ti in range(len(times))) for pi, n in enumerate(names)},
        backend=backend,
        n_samples=int(n_samples),
        seed=int(seed),
        image_shape=(C, H, W),
        schedule=getattr(sched, "name", str(schedule)),
        data_source="training images" if data is not None else "N(0, I)",
        geometry="torus" if wrap else "plane",
        maps=norm.astype(np.float32),
        x0_maps=norm_x0.astype(np.float32),
    )
