"""Stage 3 of an audit: which machine models the network, from the structural verdict
(docs/theory.md section 2), built over the dictionary, with its scales given, predicted by the
ERF or calibrated against the network (docs/theory.md section 3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..calibrate import CalibrationResult, calibrate_scales, step_candidates
from ..config import MACHINE_CHOICES
from ..errors import AuditError
from ..machines import ScoreMachine, build_machine
from ..machines.supports import SupportSchedule, data_supports, erf_supports
from ..sampler import time_grid
from .clock import Clock
from .inputs import Inputs
from .probes import Probes


@dataclass(frozen=True)
class MachineChoice:
    """Which machine models the network, and why.

    ``kind``: ELS, bbELS or LS.  ``reason``: one line.  ``forced``: ``--machine`` chose.
    ``dictionary``: ``periodic``/``valid`` for ELS, else ``None``.  ``caveats``: what the
    machine does not model (a stride period, global ops).
    """

    kind: str
    reason: str
    forced: bool
    dictionary: Optional[str]
    caveats: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"kind": self.kind, "reason": self.reason, "forced": self.forced, "dictionary": self.dictionary,
                "caveats": list(self.caveats)}


#: breaker kinds after which no translation symmetry is left to use
_EVERYWHERE = ("position-embedding", "coordinate-channels", "position-dependent", "dense-over-space")


def choose_machine(structure: Optional[dict], override: str = "auto", dictionary: str = "periodic") -> MachineChoice:
    """The machine the verdict calls for (docs/theory.md section 2).

    Rules: equivariant (circular padding, period 1) -> ELS; a boundary band (zero-type
    padding) -> bbELS; translation symmetry broken everywhere (position embeddings,
    coordinates, dense layers over space), an op without a rule, or no structural
    analysis at all -> LS (locality without equivariance: nothing unproven is assumed).
    A stride period P > 1 and global ops are recorded as caveats: the machines model
    neither.  ``override`` (``--machine``) wins, with the verdict kept in the reason.

    Args:
        structure: ``StructuralEquivarianceResult.to_dict()``, or ``{"error": ...}`` /
            ``None`` when the network could not be traced.
        override: ``auto`` or a machine kind.
        dictionary: ELS dictionary (``periodic``/``valid``).
    Returns:
        :class:`MachineChoice`.
    """
    caveats: list[str] = []
    if not structure or structure.get("error"):
        why = (structure or {}).get("error", "no structural analysis")
        kind, reason = "LS", f"the network's structure is unknown ({why}); LS assumes no equivariance"
    else:
        verdict = list(structure.get("verdict") or [])
        kinds = {b.get("kind") for b in structure.get("breakers") or [] if b.get("breaks_equivariance", True)}
        period = int(structure.get("period_all") or 1)
        if period > 1:
            caveats.append(f"equivariant only to shifts by multiples of {period} (strided layers); "
                           f"the machine assumes every shift")
        if "non-local" in verdict:
            caveats.append("global ops (attention / statistics over space) mix the whole image; "
                           "a local machine cannot explain that part")
        hard = sorted(kinds & set(_EVERYWHERE))
        if structure.get("partial"):
            kind, reason = "LS", "some ops have no equivariance rule (partial analysis); LS assumes no equivariance"
        elif hard:
            kind = "LS"
            reason = f"translation symmetry is broken everywhere ({', '.join(hard)}); LS keeps locality only"
        elif "boundary-broken" in verdict:
            band = structure.get("band_width")
            kind, reason = "bbELS", f"zero-type padding breaks equivariance within {band} px of the border -> bbELS"
        else:
            kind, reason = "ELS", "circular / no padding: equivariant to shifts -> ELS"
    if override != "auto":
        if override not in MACHINE_CHOICES:
            raise AuditError(f"machine must be one of {', '.join(MACHINE_CHOICES)}; got {override!r}")
        reason = f"--machine {override} (the verdict suggests {kind}: {reason})"
        kind, forced = override, True
    else:
        forced = False
    return MachineChoice(kind=kind, reason=reason, forced=forced,
                         dictionary=dictionary if kind == "ELS" else None, caveats=tuple(caveats))


# ---------------------------------------------------------------------------------------
# the machine and its scales
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FittedMachine:
    """The machine the audit fitted and the IS baseline beside it.

    ``scales``: one odd patch size per step (index 0 = least noise); ``source``: where they
    came from; ``calibration`` / ``calibration_other``: the calibration evidence (``None``
    when the scales were given or taken from the ERF).  ``support``: the window's shape,
    :func:`supports_used`; ``band_scales``: the border band's sizes (``--support border``).
    """

    choice: MachineChoice
    machine: ScoreMachine
    is_machine: ScoreMachine
    scales: tuple[int, ...]
    source: str
    calibration: Optional[CalibrationResult] = None
    calibration_other: Optional[CalibrationResult] = None
    band_scales: Optional[tuple[int, ...]] = None
    support: Optional["SupportsUsed"] = None


def fit_machine(cfg, clock: Clock, inp: Inputs, probes: Probes) -> FittedMachine:
    """Choose the machine from the verdict, build it over the dictionary and fit its scales
    (``cfg.scales``: given, the ERF's prediction, or calibrated)."""
    choice = choose_machine(probes.structure, cfg.machine, cfg.dictionary)
    clock.say(f"machine: {choice.kind} ({choice.reason})")
    labels = inp.dic.labels if inp.conditional else None
    sched = inp.den.schedule
    if cfg.support == "border" and choice.kind != "bbELS":
        raise AuditError(f"--support border gives the border band of a zero-padded network its own scale (bbELS); "
                         f"this audit fits {choice.kind}: drop --support border, or pass --machine bbELS")
    shaped = shaped_supports(cfg, clock, probes, inp.train_images, sched)     # data: the whole set
    machine, is_machine = build_machines(cfg, clock, choice, inp.dict_images, labels, sched, shaped)

    def fitted(scales, source, calibration=None, other=None) -> FittedMachine:
        band = None if calibration is None else calibration.band_scales
        return FittedMachine(choice, machine, is_machine, tuple(scales), source, calibration, other, band,
                             supports_used(cfg.support, shaped, tuple(scales), band))

    if isinstance(cfg.scales, tuple):
        return fitted(cfg.scales, "given (--scales)")
    if cfg.scales == "erf":
        return fitted(probes.predicted, "erf (the probe's prediction, not calibrated)")
    cands, source = scale_candidates(cfg, inp.shape, probes.predicted)

    def calibrate(criterion: str, name: str) -> CalibrationResult:
        return clock.stage(name, calibrate_scales, inp.eps_fn, machine, seeds=calibration_seeds(cfg),
                           steps=cfg.steps, schedule=sched, candidates=cands, criterion=criterion,
                           label=inp.cal_labels, progress=clock.steps("calibrate"), slow=True,
                           border_band=cfg.support == "border" and criterion == "x0")

    calibration = calibrate(cfg.criterion, "calibrate")
    other = None
    if cfg.compare_criteria:
        crit = "cosine" if cfg.criterion == "x0" else "x0"
        other = calibrate(crit, f"calibrate ({crit}, for comparison)")
    return fitted(calibration.scales, source, calibration, other)


def build_machines(cfg, clock: Clock, choice: MachineChoice, images, labels, sched,
                   shaped: Optional[SupportSchedule] = None) -> tuple[ScoreMachine, ScoreMachine]:
    """The chosen machine (with its shaped supports, if any) and the IS baseline over
    ``images``: in this process, or (``cfg.ray``) sharded over Ray actors, one actor per shard
    holding both (:mod:`els_audit.integrations.ray`)."""
    specs = [(choice.kind, cfg.dictionary, shaped), ("IS", "periodic", None)]
    if cfg.ray is None:
        return tuple(build_machine(kind, images, labels, schedule=sched, dictionary=dic,
                                   memory_budget=cfg.memory_budget, supports=sup, device=cfg.device)
                     for kind, dic, sup in specs)
    RayShardPool = ray_integration().RayShardPool
    from ..machines.sharded import sharded_machines
    clock.say(f"ray: sharding the dictionary ({images.shape[0]} images) over Ray actors ({cfg.ray}) ...")
    pool = RayShardPool(images, labels, specs, address=cfg.ray, schedule=sched, memory_budget=cfg.memory_budget)
    d = pool.describe()
    clock.say(f"ray: {d['shards']} shards, {d['cpus_per_shard']:g} CPU each, memory budget "
              f"{cfg.memory_budget / 2**30:.2g} GiB each")
    machine, is_machine = sharded_machines(pool, images, labels, schedule=sched, memory_budget=cfg.memory_budget)
    return machine, is_machine


def ray_integration():
    """:mod:`els_audit.integrations.ray`, or a one-line error naming the extra."""
    try:
        from ..integrations import ray as ray_integration_module
    except ImportError as exc:
        raise AuditError(f"--ray needs Ray ({exc}); install the extra: pip install 'els-audit[ray]'") from None
    return ray_integration_module


def calibration_seeds(cfg) -> list[int]:
    """The calibration seeds: ``10_000 + i``, disjoint from the evaluation seeds."""
    return [10_000 + i for i in range(cfg.calibration_seeds)]


def scale_candidates(cfg, shape: tuple[int, int, int], predicted: tuple[int, ...]) -> tuple[tuple, str]:
    """(per-step candidates for :func:`calibrate_scales`, the source line) for ``--scales
    calibrate`` (every odd k up to the image side) or ``auto`` (the ERF prediction's
    neighbours): :func:`els_audit.calibrate.step_candidates`."""
    cands = step_candidates(cfg.scales, shape, predicted, cfg.spread)
    if cfg.scales == "calibrate":
        return cands, (f"calibrated over every odd k in {cands[0][0]}..{cands[0][-1]} "
                       f"({cfg.criterion} criterion)")
    return cands, f"calibrated around the ERF prediction (+-{2 * cfg.spread}, {cfg.criterion} criterion)"


# ---------------------------------------------------------------------------------------
# supports (--support)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SupportsUsed:
    """The window the fitted machine used at each step, for the summary and the report.

    ``kind``: ``--support``; ``source``: where the shape came from; ``sides``: (T,) window
    side per step (index 0 = least noise); ``weights``: T arrays (side, side), the weight of
    each window offset (1 everywhere for a square); ``band_sides``: ``--support border``'s
    band sizes, else None.
    """

    kind: str
    source: str
    sides: tuple[int, ...]
    weights: tuple[np.ndarray, ...]
    band_sides: Optional[tuple[int, ...]] = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "source": self.source, "sides": list(self.sides),
                "weight_sum": [round(float(w.sum()), 4) for w in self.weights],
                "band_sides": None if self.band_sides is None else list(self.band_sides)}

    def arrays(self) -> dict[str, np.ndarray]:
        """``support_weights`` (T, S, S): each step's weights centred in the widest window."""
        S = max(self.sides)
        out = np.zeros((len(self.sides), S, S))
        for j, w in enumerate(self.weights):
            o = (S - w.shape[0]) // 2
            out[j, o: o + w.shape[0], o: o + w.shape[1]] = w
        return {"support_weights": out}


def shaped_supports(cfg, clock: Clock, probes: Probes, images, sched) -> Optional[SupportSchedule]:
    """The shaped supports ``--support`` asks for (None for square windows and the border band);
    ``images``: the whole data set, whose covariance gives the ``data`` masks."""
    if cfg.support in ("erf", "erf-area"):
        if probes.erf is None or probes.erf.x0_maps is None:
            raise AuditError(f"--support {cfg.support} needs the ERF probe's maps, which did not run; "
                             f"use --support square")
        return erf_supports(probes.erf.on_grid(cfg.steps), cfg.support)
    if cfg.support == "data":
        times = [t for t in time_grid(cfg.steps) if t > 0]
        try:
            return clock.stage("data support", data_supports, images, sched, times)
        except ValueError as exc:
            raise AuditError(f"--support data: {exc}") from None
    return None


def supports_used(kind: str, shaped: Optional[SupportSchedule], scales: tuple[int, ...],
                  band: Optional[tuple[int, ...]]) -> SupportsUsed:
    """Each step's window (side and weights) for the fitted scales."""
    steps = len(scales)
    sides, weights = [], []
    for j, k in enumerate(scales):
        if shaped is None:
            side, w = k, np.ones((k, k))
        else:
            side, w = shaped.window((j + 1) / steps, k)
            w = w.numpy()
        sides.append(int(side))
        weights.append(np.asarray(w, dtype=np.float64))
    source = {"square": "square k x k windows (the paper)",
              "border": "square windows; the border band (within k // 2 of an edge) has its own calibrated size"}
    return SupportsUsed(kind, source.get(kind) or shaped.source, tuple(sides), tuple(weights),
                        None if band is None else tuple(band))
