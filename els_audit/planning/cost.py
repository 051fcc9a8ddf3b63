"""The audit's cost model: a short probe of this machine's engine, and the seconds each stage
will take at given settings.

The machines' work is linear in what they compare: every query pixel of every image meets
every dictionary patch, so a machine evaluation costs ``B x N x u(t, k)`` seconds for B
query images and N dictionary images, where the unit cost ``u`` depends on the noise level
(at low noise most key tiles are skipped, and a float64 refinement runs; at high noise no
logit is negligible), on the patch size and on the machine kind.  The probe measures ``u``
on this machine, with this model's machine kind, labels and candidate sizes, on a seeded
subset of the data, at a few anchor steps; the model interpolates between anchors, scales
by the patch-size work ``C k^2 + c`` of each step, and multiplies out.  Builds (the nested
tree of a calibration, the one-size dictionaries of a prediction) are linear in N the same
way; the network's cost is linear in the batch.

Nothing here knows the device: the probe runs the engine where it will run, so the same
model serves any device.  :mod:`els_audit.planning.plan` picks settings from it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..calibrate import step_candidates
from ..data import balanced_subset_indices
from ..machines import DEFAULT_MEMORY_BUDGET, build_machine
from ..machines import _native as native
from ..novelty import nearest_neighbours
from ..serialize import json_float

__all__ = ["Throughput", "StageCost", "probe_throughput", "Settings", "predict_costs", "PROBE_ANCHORS"]

#: grid times (on the finest grid) at which the probe measures the machines' unit cost
PROBE_ANCHORS = (0.1, 0.35, 0.65, 0.95)
#: dictionary images per class of the probe's small size (its timings are the fixed costs:
#: a bbELS dictionary's ~450 padding groups per size cost about a millisecond each)
SMALL_PROBE = 2
#: the per-pixel work a patch of side k costs beside its C k^2 multiply-adds (the softmax
#: and bookkeeping of one logit, in multiply-add units; measured on the CPU engine)
_LOGIT_WORK = 24.0


def pair_fraction(kind: str, H: int, W: int, k: int, dictionary: str = "periodic") -> float:
    """The fraction of (query pixel, dictionary position) pairs a machine compares at size k,
    counted exactly from its definition (docs/theory.md section 2):

    - ELS, periodic dictionary: every pixel meets every position: 1;
    - ELS, valid dictionary: the (H - k + 1)(W - k + 1) positions whose patch fits;
    - bbELS: a pixel meets the positions with its own padding pattern; per axis an interior
      coordinate (at least r = k // 2 from both ends) matches the H - 2r interior ones and a
      band coordinate only itself, so the pairs are ``((H-2r)^2 + 2r) ((W-2r)^2 + 2r)``;
    - LS: every pixel meets its own position only: H W pairs.
    """
    r = k // 2
    if kind == "ELS":
        return 1.0 if dictionary == "periodic" else max(0, H - k + 1) * max(0, W - k + 1) / (H * W)
    if kind == "LS":
        return 1.0 / (H * W)
    ih, iw = max(0, H - 2 * r), max(0, W - 2 * r)
    return (ih * ih + min(2 * r, H)) * (iw * iw + min(2 * r, W)) / (H * W) ** 2


@dataclass(frozen=True)
class Work:
    """The relative work of one machine evaluation per (query image x dictionary image),
    up to the engine's speed: the pairs it compares (:func:`pair_fraction`) times ``C k^2``
    multiply-adds plus one softmax term per pair and size.  A sweep over sizes runs nested
    where the machine nests (:attr:`nests`): each size adds its ring, ``C (k^2 - k_prev^2)``,
    over its own pairs; elsewhere each size costs its whole product."""

    kind: str
    shape: tuple[int, int, int]
    dictionary: str = "periodic"
    nested: bool = True           # False: shaped supports (--support erf ...), one size at a time

    @property
    def nests(self) -> bool:
        """Whether a sweep runs as one nested pass (ELS, bbELS with square windows); LS and
        shaped supports run one size at a time."""
        return self.nested and self.kind in ("ELS", "bbELS")

    def __call__(self, ks: Sequence[int]) -> float:
        C, H, W = self.shape
        total, prev = 0.0, 0
        for k in sorted(ks):
            f = pair_fraction(self.kind, H, W, k, self.dictionary)
            total += f * (C * (k * k - (prev * prev if self.nests else 0)) + _LOGIT_WORK)
            prev = k
        return total


def patch_work(C: int, ks: Sequence[int]) -> float:
    """The relative work of one periodic-ELS evaluation at sizes ``ks`` (:class:`Work`)."""
    return Work("ELS", (C, 1, 1))(ks)


def build_work(C: int, k: int) -> float:
    """The relative work of building a one-size dictionary (hashing every patch's C k^2 values)."""
    return float(C * k * k)


@dataclass(frozen=True)
class Throughput:
    """What the probe measured on this machine.

    Every machine cost is affine in what it meets: ``fixed + unit x count``, the two fitted
    from the same work on two dictionary sizes (``n_probe`` and ``n_small`` images).

    ``sweep_*[i]`` / ``single_*[i]``: a calibration sweep / a single-size evaluation at
    ``anchors[i]``, unit per (query image x dictionary image x :class:`Work`), fixed
    per call; ``diag_*``: a single-size evaluation with the mosaic's diagnostics at the
    lowest anchor (the prediction's last step); ``tree_*``: the calibration's nested tree,
    unit per (dictionary image x patch work of the candidates); ``dict_*``: a one-size
    dictionary, unit per (dictionary image x :func:`build_work`); ``is_unit``: the IS
    machine per (query image x dictionary image); ``net_unit``: network seconds per image;
    ``nn_unit``: copy-test seconds per (query x training image); ``seconds``: the probe's
    own time; ``device``: where it ran; ``kept_bytes``: a one-size dictionary's bytes with
    every key kept, per (dictionary image x C k^2); ``unkept_ratio``: an evaluation's time
    with no key kept against every key kept; ``held_bytes``: what a calibration's tree and
    edge groups hold besides their kept keys, per dictionary image (see :meth:`kept_factor`).
    """

    kind: str
    dictionary: str
    n_probe: int
    n_small: int
    anchors: tuple[float, ...]
    sweep_unit: tuple[float, ...]
    sweep_fixed: tuple[float, ...]
    single_unit: tuple[float, ...]
    single_fixed: tuple[float, ...]
    diag_unit: float
    diag_fixed: float
    tree_unit: float
    tree_fixed: float
    dict_unit: float
    dict_fixed: float
    is_unit: float
    net_unit: float
    nn_unit: float
    seconds: float
    device: str
    kept_bytes: float = 0.0
    unkept_ratio: float = 1.0
    held_bytes: float = 0.0
    memory_budget: int = DEFAULT_MEMORY_BUDGET

    def kept_factor(self, n_dictionary: float, C: int, k: int) -> float:
        """How much slower than the probe an evaluation at k runs over ``n_dictionary``
        images: the machine keeps a one-size dictionary's keys only up to three quarters of
        its memory budget and gathers the rest per tile (``unkept_ratio`` slower)."""
        need = self.kept_bytes * n_dictionary * C * k * k
        room = max(0.0, 0.75 * self.memory_budget - self.held_bytes * n_dictionary)
        kept = 1.0 if need <= 0 else min(1.0, room / need)
        return kept + (1.0 - kept) * self.unkept_ratio

    def eval_seconds(self, which: str, t: float, count: float, work: float) -> float:
        """Seconds of one evaluation (``which``: sweep, single or diag) at t meeting ``count``
        (query x dictionary) images at patch work ``work``; log-linear between anchors."""
        if which == "diag":
            return self.diag_fixed + self.diag_unit * count * work
        unit, fixed = ((self.sweep_unit, self.sweep_fixed) if which == "sweep"
                       else (self.single_unit, self.single_fixed))
        u = float(np.exp(np.interp(t, self.anchors, np.log(np.maximum(np.asarray(unit), 1e-30)))))
        return float(np.interp(t, self.anchors, fixed)) + u * count * work

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = ([json_float(x) for x in v] if isinstance(v, tuple) else
                           json_float(v) if isinstance(v, float) else v)
        return out


def _timed(fn: Callable, *a, **kw) -> float:
    """Seconds ``fn`` takes, queued GPU work included."""
    t = time.perf_counter()
    fn(*a, **kw)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _step_of(t: float, steps: int) -> int:
    """Index j (0 = least noise) of the grid time ``(j+1)/steps`` nearest t."""
    return int(min(range(steps), key=lambda j: abs((j + 1) / steps - t)))


@dataclass
class _Raw:
    """Seconds of the probe's work on one dictionary, and what it met."""

    n: int
    seconds: float = 0.0
    tree: float = 0.0
    sweep: list = dataclasses.field(default_factory=list)
    single: list = dataclasses.field(default_factory=list)
    diag: float = 0.0
    builds: float = 0.0
    kept_bytes: float = 0.0          # bytes of the one-size dictionaries with every key kept, per C k^2
    held: float = 0.0                # bytes the tree and the edge groups hold without kept keys
    unkept_ratio: float = 1.0        # an evaluation's time with no key kept / with every key kept


def _affine(big: float, small: float, n_big: float, n_small: float) -> tuple[float, float]:
    """(unit, fixed) of ``fixed + unit x n`` through two timings.  NB: where the fixed
    costs are nearly everything (bbELS at large k compares few pairs), the two timings are
    nearly equal and their difference is timer noise: the unit is kept at least 2 % of the
    large timing (a floor of a fifth over-predicted such audits 2-5x)."""
    unit = max(big - small, 0.02 * big) / max(n_big - n_small, 1e-9)
    return unit, max(0.0, big - unit * n_big)


def probe_throughput(kind: str, images: torch.Tensor, labels: Optional[torch.Tensor], *, schedule,
                     dictionary: str, predicted: Sequence[int], candidates: Optional[Sequence[Sequence[int]]],
                     eps_fn: Callable, n_probe: int, seed: int = 0, label: Optional[int] = None,
                     device: str = "cpu", target_seconds: Optional[float] = None) -> Throughput:
    """Measure the engine's costs on two seeded, class-balanced subsets of ``images``.

    Args:
        kind: the machine kind the audit will fit (ELS, bbELS, LS).
        images: (N, C, H, W) the whole training set in the model's range; labels: (N,) or
            ``None`` (a conditional audit probes one class's dictionary, ``label``).
        schedule, dictionary: as for :func:`els_audit.machines.build_machine`.
        predicted: the ERF's predicted size per step of the finest grid (index 0 = least
            noise); candidates: per-step calibration candidates on that grid (``None``:
            no calibration).
        eps_fn: the network ``eps(x, t, label)``; device: where the machines will run (the
            probe's machines run there: its costs are that device's); n_probe: the most dictionary images to
            probe with (the small size is :data:`SMALL_PROBE` images per class, the middle
            one four times that; the costs are fitted through the small and the largest).
        target_seconds: about how long the probe may take: a small and a middle size run
            first, and the large one is cut so that, at their cost per image, the probe stays
            within.
    Returns:
        :class:`Throughput`.
    """
    # NB: the machines' C kernels compile on their first use (seconds, once per machine and
    # source); inside the small size's timing that looked like a fixed cost, and the cost per
    # image fell to its floor (a new user's first audit planned 4x the work its budget held)
    native.available()
    t_start = time.perf_counter()
    N, C, H, W = images.shape
    g = torch.Generator().manual_seed(seed + 1)
    n_big = max(4, min(int(n_probe), N))
    rows = balanced_subset_indices(labels, N, n_big, seed)
    rest = torch.ones(N, dtype=torch.bool)
    rest[rows] = False
    pool = images[rest] if bool(rest.any()) else images
    x0 = pool[torch.randperm(pool.shape[0], generator=g)[:2]]
    x0 = x0.repeat(2, 1, 1, 1)[:2]                                         # (2, C, H, W) queries
    lab = None if label is None else torch.full((2,), int(label), dtype=torch.long)
    work = dict(kind=kind, images=images, labels=labels, schedule=schedule, dictionary=dictionary,
                predicted=predicted, candidates=candidates, x0=x0, label=label, lab=lab, seed=seed, device=device)
    n_classes = 1 if labels is None else int(torch.unique(labels).numel())
    n_small = min(N, SMALL_PROBE * n_classes)
    small = _probe_once(n=n_small, **work)
    # NB: the large size comes from a middle one's slope: the small run is nearly all fixed
    # costs, so timing it alone says nothing of the cost per image
    n_mid = min(N, 4 * n_small, n_big)
    big = _probe_once(n=n_mid, measure_unkept=True, **work) if n_mid > n_small else small
    if target_seconds is not None and n_mid > n_small:
        per_image = max(big.seconds - small.seconds, 0.1 * big.seconds) / (n_mid - n_small)
        fixed = max(0.0, small.seconds - per_image * n_small)
        left = target_seconds - (time.perf_counter() - t_start)
        n_big = min(n_big, int((left - fixed) / per_image))
    if n_big > n_mid or big is small:
        big = _probe_once(n=max(n_big, n_mid), measure_unkept=True, **work)
    B, C = 2, int(C)
    per = [B * big.n, B * small.n]
    steps = len(predicted)
    sweep = [_affine(bg, sm, *per) for bg, sm in zip(big.sweep, small.sweep)]
    single = [_affine(bg, sm, *per) for bg, sm in zip(big.single, small.single)]
    diag = _affine(big.diag, small.diag, *per)
    tree = _affine(big.tree, small.tree, big.n, small.n)
    builds = _affine(big.builds, small.builds, big.n, small.n)
    anchor_ks = [int(predicted[_step_of(t, steps)]) for t in PROBE_ANCHORS]
    work_of = Work(kind, (C, H, W), dictionary)
    sweep_work = [work_of(candidates[_step_of(t, steps)]) for t in PROBE_ANCHORS] if candidates else []
    union = sorted({k for c in candidates for k in c}) if candidates else [1]
    dict_work = sum(build_work(C, k) for k in set(anchor_ks))
    is_machine = build_machine("IS", images[rows], None if labels is None else labels[rows], schedule=schedule,
                               device=device)
    is_unit = _timed(is_machine.denoised, x0, 0.5, label=lab) / (B * big.n)
    t = torch.full((B,), 0.5, dtype=x0.dtype)
    eps_fn(x0, t, lab)                                                     # warm-up
    net_unit = _timed(eps_fn, x0, t, lab) / B
    q = images[torch.randperm(N, generator=g)[:min(N, 64)]]        # enough queries to amortise the norms
    nn_unit = _timed(nearest_neighbours, q, images) / (q.shape[0] * N)
    return Throughput(
        kind=kind, dictionary=dictionary, n_probe=big.n, n_small=small.n, anchors=PROBE_ANCHORS,
        sweep_unit=tuple(u / w for (u, _), w in zip(sweep, sweep_work)) or tuple(0.0 for _ in PROBE_ANCHORS),
        sweep_fixed=tuple(f for _, f in sweep) or tuple(0.0 for _ in PROBE_ANCHORS),
        single_unit=tuple(u / work_of([k]) for (u, _), k in zip(single, anchor_ks)),
        single_fixed=tuple(f for _, f in single),
        diag_unit=diag[0] / work_of([anchor_ks[0]]), diag_fixed=diag[1],
        tree_unit=tree[0] / work_of(union), tree_fixed=tree[1],
        dict_unit=builds[0] / dict_work, dict_fixed=builds[1] / len(set(anchor_ks)),
        kept_bytes=big.kept_bytes / max(1, big.n), unkept_ratio=max(1.0, big.unkept_ratio),
        held_bytes=big.held / max(1, big.n),
        is_unit=is_unit, net_unit=net_unit, nn_unit=nn_unit, seconds=time.perf_counter() - t_start, device=device)


def _probe_once(*, n: int, kind, images, labels, schedule, dictionary, predicted, candidates, x0, label, lab,
                seed, device: str = "cpu", measure_unkept: bool = False) -> _Raw:
    """The probe's work on one seeded, class-balanced dictionary of n images: the tree over
    every candidate, then per anchor a sweep, a one-size build and an evaluation."""
    t_start = time.perf_counter()
    N = images.shape[0]
    rows = balanced_subset_indices(labels, N, n, seed)
    dic_labels = None if labels is None else labels[rows]
    met = int((dic_labels == label).sum()) if label is not None and dic_labels is not None else len(rows)
    raw = _Raw(n=max(1, met))
    machine = build_machine(kind, images[rows], dic_labels, schedule=schedule, dictionary=dictionary, device=device)
    g = torch.Generator().manual_seed(seed + 2)
    steps = len(predicted)
    if candidates:
        union = sorted({k for c in candidates for k in c})
        raw.tree = _timed(machine.prepare_sweep, union, label=lab)
    built: set[int] = set()
    for i, t in enumerate(PROBE_ANCHORS):
        j = _step_of(t, steps)
        tt = (j + 1) / steps
        a, b = (float(v) for v in machine.schedule.alpha_sigma(tt))
        x = a * x0 + b * torch.randn(x0.shape, generator=g, dtype=x0.dtype)               # (2, C, H, W)
        k = int(predicted[j])
        if candidates:
            raw.sweep.append(_timed(machine.denoised_sweep, x, tt, candidates[j], label=lab))
        if k not in built:                                              # builds the one-size dictionary
            raw.builds += _timed(machine.dictionary_stats, k, label=label)
            built.add(k)
        raw.single.append(_timed(machine.denoised, x, tt, k=k, label=lab))
        if i == 0:                               # the prediction's last step keeps the mosaic's diagnostics
            raw.diag = _timed(machine.score, x, tt, k=k, label=lab, diagnostics=True)
    C = int(images.shape[1])
    stats = [machine.dictionary_stats(k, label=label) for k in sorted(built)]
    if candidates:
        # NB: the calibration's tree and edge groups stay cached through the prediction; what
        # they hold (with the one-size dictionaries' bookkeeping: an overestimate) is not
        # free for keeping keys
        raw.held = machine.release_kept()
    raw.kept_bytes = sum(st["bytes"] / max(st["materialized_fraction"], 1e-9) for st in stats) / sum(
        C * k * k for k in sorted(built))
    if measure_unkept:
        # NB: a dictionary too large for the memory budget keeps only part of its keys and
        # gathers the rest from the images per tile: time one evaluation that keeps none
        bare = build_machine(kind, images[rows], dic_labels, schedule=schedule, dictionary=dictionary,
                             memory_budget=0, device=device)
        bare.dictionary_stats(k, label=label)
        raw.unkept_ratio = _timed(bare.denoised, x, tt, k=k, label=lab) / max(raw.single[-1], 1e-9)
    raw.seconds = time.perf_counter() - t_start
    return raw


def _net_unit(eps_fn: Callable, x: torch.Tensor, lab: Optional[torch.Tensor]) -> float:
    """Network seconds per image (the second of two calls: the first warms up)."""
    t = torch.full((x.shape[0],), 0.5, dtype=x.dtype)
    eps_fn(x, t, lab)
    return _timed(eps_fn, x, t, lab) / x.shape[0]


@dataclass(frozen=True)
class Settings:
    """The settings a plan chooses (what a cost is predicted for)."""

    n_dictionary: int
    steps: int
    calibration_seeds: int
    seeds: int

    def to_dict(self) -> dict:
        return {"n_dictionary": self.n_dictionary, "steps": self.steps,
                "calibration_seeds": self.calibration_seeds, "seeds": self.seeds}


@dataclass(frozen=True)
class StageCost:
    """Predicted seconds of the stages still to run."""

    calibrate: float
    predict: float
    novelty: float

    @property
    def total(self) -> float:
        return self.calibrate + self.predict + self.novelty

    def to_dict(self) -> dict:
        return {"calibrate": round(self.calibrate, 2), "predict": round(self.predict, 2),
                "novelty": round(self.novelty, 2)}


def grid_scales(predicted_fine: Sequence[int], steps: int) -> list[int]:
    """The fine grid's per-step sizes at the coarser grid's times (nearest fine step)."""
    fine = len(predicted_fine)
    return [int(predicted_fine[_step_of((j + 1) / steps, fine)]) for j in range(steps)]


def predict_costs(tp: Throughput, s: Settings, *, shape: Sequence[int], predicted_fine: Sequence[int],
                  scales_mode, spread: int, n_train: int, share: float = 1.0, workers: float = 1.0,
                  support: str = "square", window_of: Optional[Callable[[float, int], int]] = None) -> StageCost:
    """Seconds of calibration, prediction and novelty at settings ``s``.

    ``predicted_fine``: the ERF's sizes per step on the grid the probe used; ``scales_mode``:
    the config's ``scales`` (a tuple = given, ``"erf"``, ``"auto"`` or ``"calibrate"``);
    ``share``: the fraction of the dictionary one query meets (a conditional audit's
    queries meet their class's images only); ``workers``: how many times this process's
    engine the machines run at (sharded over a Ray cluster: its CPUs over this process's
    threads); the network and the novelty search stay here; ``support``: ``--support``
    (shaped supports calibrate one size at a time, with a dictionary per size, at the
    single-size rate; ``border`` evaluates two sizes per prediction step); ``window_of(t,
    k)``: the window side a shaped support uses for size k at time t (``erf-area`` can
    widen it), k itself when not given.
    """
    win = window_of or (lambda t, k: k)
    C, H, W = (int(v) for v in shape)
    shaped = support not in ("square", "border")
    work_of = Work(tp.kind, (C, H, W), tp.dictionary, nested=not shaped)
    n_meet = s.n_dictionary * share
    ks = list(scales_mode) if isinstance(scales_mode, tuple) else grid_scales(predicted_fine, s.steps)
    times = [(j + 1) / s.steps for j in range(s.steps)]
    calibrate = 0.0
    if scales_mode in ("auto", "calibrate"):
        cands = step_candidates(scales_mode, (C, H, W), ks, spread)
        union = sorted({k for c in cands for k in c})
        if shaped:
            built = {win(t, k) for t, c in zip(times, cands) for k in c}
            calibrate = sum(tp.dict_fixed + tp.dict_unit * s.n_dictionary * build_work(C, k) for k in built) / workers
        else:
            calibrate = (tp.tree_fixed + tp.tree_unit * s.n_dictionary * work_of(union)) / workers
        for t, c in zip(times, cands):
            calibrate += (s.calibration_seeds * tp.net_unit
                          + tp.eval_seconds("single" if shaped else "sweep", t, s.calibration_seeds * n_meet,
                                            work_of([win(t, k) for k in c])) / workers)
    used = [win(t, k) for t, k in zip(times, ks)]
    sizes = 2 if support == "border" else 1                             # the band's size beside the interior's
    predict = sum(tp.dict_fixed + tp.dict_unit * s.n_dictionary * build_work(C, k) for k in set(used)) / workers
    for j, (t, k) in enumerate(zip(times, used)):
        which = "diag" if j == 0 else "single"                          # step 0 (least noise) runs last
        machine = (s.seeds * tp.is_unit * n_meet
                   + sizes * tp.eval_seconds(which, t, s.seeds * n_meet, work_of([k])) * tp.kept_factor(n_meet, C, k))
        predict += s.seeds * tp.net_unit + machine / workers
    novelty = tp.nn_unit * n_train * (s.seeds + min(300, n_train))
    return StageCost(calibrate, predict, novelty)
