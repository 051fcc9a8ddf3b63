"""The audit's configuration: :class:`AuditConfig` and the parsers the CLI builds it with.

The config is plain data, checked on construction (a bad value raises
:class:`~els_audit.errors.AuditError` with a one-line message naming the flag); the
pipeline (:func:`els_audit.audit.run_audit`) only reads it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .checks import Rule, parse_rule
from .errors import AuditError
from .novelty import DEFAULT_THRESHOLD

__all__ = [
    "AuditConfig",
    "parse_scales",
    "parse_arch_kwargs",
    "model_name",
    "FULL_FIDELITY",
    "DEFAULT_BUDGET",
    "PLANNED",
    "parse_duration",
    "MACHINE_CHOICES",
    "SCALE_MODES",
    "SUPPORT_CHOICES",
    "ONLY_CHOICES",
    "STRUCTURE_SECTIONS",
]

MACHINE_CHOICES = ("auto", "ELS", "bbELS", "LS")
#: ``--only``: run a part of the audit (``structure``: trace, receptive field, verdict, field
#: probe, ERF and shift tests; no sanity check, no machines)
ONLY_CHOICES = ("structure",)
#: the summary sections a structure-only audit writes (``--fail-on`` rules must gate on these)
STRUCTURE_SECTIONS = ("name", "model", "data", "structure", "erf", "equivariance", "config")
SCALE_MODES = ("auto", "erf", "calibrate")
#: ``--support``: square k x k windows (the paper), shaped ones (els_audit.machines.supports),
#: or a separate scale for the border band (els_audit.machines.banded)
SUPPORT_CHOICES = ("square", "erf", "erf-area", "data", "border")
TIME_INPUT_ALIASES = {"unit": "unit", "index": "index", "sigma": "sigma"}

#: what the paper ran: the top of the plan's ladder (:mod:`els_audit.planning.plan`), which
#: a budget cuts from in the order data, steps, calibration seeds, seeds
FULL_FIDELITY = {
    "steps": 20,
    "seeds": 100,
    "calibration_seeds": 8,
    "data_limit": 0,
    "scales": "calibrate",
    "note": ("the paper: 100 seeds, 20 machine steps, calibration over every odd k, the whole training set "
             "as the dictionary (data_limit 0).  Each machine evaluation costs ~N*(H*W)^2*C*k*k multiply-adds per "
             "image (N dictionary images; fewer after merging duplicate patches).  Within --budget the plan "
             "takes the whole set first, then 20 steps, then calibration seeds, then seeds, calibrating around "
             "the ERF prediction; --device cuda runs the network and the machines on the GPU (the same exact "
             "algorithm), with --memory-budget bytes of its memory for each machine."),
}

#: the default time budget of a whole audit, seconds (a registry job's 10 minutes)
DEFAULT_BUDGET = 600.0
#: the settings a plan chooses when the config leaves them ``None``
PLANNED = ("data_limit", "steps", "calibration_seeds", "seeds")


def parse_bytes(text: str) -> int:
    """``--memory-budget``: ``2G``, ``512M``, ``1.5GiB``, ``3000000000`` (bytes) -> bytes.

    Raises:
        AuditError: not a positive size.
    """
    s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], None)
    try:
        value = float(s[:-1] if unit is not None else s) * (unit or 1)
    except ValueError:
        value = float("nan")
    if not (value >= 1 << 20 and math.isfinite(value)):
        raise AuditError(f"--memory-budget {text!r} is not a size of at least 1M; write e.g. 2G or 512M")
    return int(value)


def parse_duration(text: str) -> Optional[float]:
    """``--budget``: ``90s``, ``10m``, ``1.5h``, ``600`` (seconds) -> seconds; ``none`` -> ``None``
    (no limit: full fidelity).

    Raises:
        AuditError: not a positive duration.
    """
    s = str(text).strip().lower()
    if s in ("none", "inf", "unlimited"):
        return None
    unit = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(s[-1:], None)
    num = s[:-1] if unit is not None else s
    try:
        value = float(num) * (unit or 1.0)
    except ValueError:
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise AuditError(f"--budget {text!r} is not a duration; write e.g. 90s, 10m, 1h (or none for no limit)")
    return value


# ---------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------
#: integer settings: field -> (flag, lowest, highest or None); ``threads``' highest is the CPUs
_INT_BOUNDS: dict[str, tuple[str, int, Optional[int]]] = {
    "steps": ("--steps", 1, 1000),
    "seeds": ("--seeds", 1, 10_000),
    "calibration_seeds": ("--calibration-seeds", 1, 1000),
    "seed_offset": ("--seed-offset", 0, 9_999),
    "data_seed": ("data_seed", 0, None),
    "spread": ("--spread", 0, 64),
    "erf_samples": ("erf_samples", 1, 256),
    "data_limit": ("--data-limit", 0, None),
    "threads": ("--threads", 1, None),
    "label": ("--label", 0, None),
}
#: why a bound is what it is, appended to its message
_WHY = {
    "steps": " (a DDIM grid finer than the 1000 training steps of common models adds nothing)",
    "data_limit": " (0 = the whole data set; 1 and 2 are too few for a dictionary)",
    "threads": " (the CPUs this process may use)",
    "spread": " (the candidates stop at the image size anyway)",
}


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class AuditConfig:
    """Everything an audit needs; build it from the CLI or in Python.

    Attributes:
        model: model path or ``"zoo:NAME"``.
        data: data spec (``SOURCE[:key=value...]``); ``None`` = what the model's zoo
            config names.
        data_limit: the machines' dictionary is a seeded, class-balanced subset of this many
            images (0 = all).  The copy test always searches the whole data set.
        data_seed: seed of that subset.
        trust_model, arch, arch_kwargs, format, state_dict_key: passed to
            :func:`els_audit.models.load_model`.
        schedule, time_input, prediction, call_style, num_train_steps, data_range: adapter
            overrides (``None`` = resolve; see :mod:`els_audit.models.adapter`).
        steps: T of the DDIM grid shared by network and machines.
        seeds: number of evaluation seeds (seeds ``seed_offset .. seed_offset+seeds-1``).
        calibration_seeds: calibration seeds, disjoint from the evaluation ones
            (``10_000 + i``).
        budget: seconds the whole audit may take; the plan (:mod:`els_audit.planning`)
            chooses ``data_limit``, ``steps``, ``calibration_seeds`` and ``seeds`` where they
            are ``None`` (the most faithful settings that fit, in that order); ``None`` = no
            limit: the planned settings are full fidelity.  Given settings always win.
        seed_offset: first evaluation seed.
        conditional: class-conditional model: seed i gets label ``i mod n_classes`` and the
            machines per-label dictionaries.
        label: one label for every seed (implies conditional).
        machine: ``auto`` (from the verdict), ``ELS``, ``bbELS`` or ``LS``.
        dictionary: ELS only: ``periodic`` (theory) or ``valid`` (the public code).
        scales: ``auto``, ``erf``, ``calibrate`` or a tuple of odd sizes (index 0 = least
            noise, one per step).
        criterion: calibration criterion, ``x0`` or ``cosine``.
        compare_criteria: also calibrate with the other criterion and report its scales
            beside (doubles the calibration cost; the scales used are ``criterion``'s).
        spread: ``auto`` tries the ERF prediction +- 2*spread.
        erf_samples: inputs per step of the ERF probe.
        memorized_threshold: nearest/second-nearest ratio below which a sample is a copy.
        fail_on: ``--fail-on`` rules (text).
        threads: torch threads (``None`` = leave torch's setting).
        device: ``cpu`` or ``cuda``: where the network and the machines run (with ``ray``,
            the shards run on their actors' CPUs).
        only: ``None`` (the whole audit) or ``"structure"``: the architecture review (see
            :data:`ONLY_CHOICES`); the summary then has no machine, prediction, novelty or
            published section.
        memory_budget: bytes each machine (each shard's, with ``ray``) keeps its
            dictionaries and working memory within.
        ray: ``None`` (the machines run in this process), ``"auto"`` (this machine's Ray
            cluster, else a new local one) or a Ray address: the machines' dictionary is
            sharded over Ray actors (:mod:`els_audit.integrations.ray`, the extra
            ``els-audit[ray]``), with answers equal to one process's.
        support: the machine's window per step (:data:`SUPPORT_CHOICES`): ``square`` (the
            paper), ``erf`` / ``erf-area`` (shaped by the measured x0 ERF), ``data`` (the
            data's locality mask) or ``border`` (a second calibrated scale for the border band).
    """

    model: str
    data: Optional[str] = None
    data_limit: Optional[int] = None
    data_seed: int = 0
    trust_model: bool = False
    arch: Optional[str] = None
    arch_kwargs: Optional[Mapping[str, Any]] = None
    format: Optional[str] = None
    state_dict_key: Optional[str] = None
    schedule: Optional[str] = None
    time_input: Optional[str] = None
    prediction: Optional[str] = None
    call_style: Optional[str] = None
    num_train_steps: Optional[int] = None
    data_range: Optional[str] = None
    steps: Optional[int] = None
    seeds: Optional[int] = None
    calibration_seeds: Optional[int] = None
    budget: Optional[float] = DEFAULT_BUDGET
    seed_offset: int = 0
    conditional: bool = False
    label: Optional[int] = None
    machine: str = "auto"
    dictionary: str = "periodic"
    scales: Union[str, tuple[int, ...]] = "auto"
    criterion: str = "x0"
    compare_criteria: bool = False
    spread: int = 1
    erf_samples: int = 2
    memorized_threshold: float = DEFAULT_THRESHOLD
    fail_on: tuple[str, ...] = ()
    threads: Optional[int] = None
    device: str = "cpu"
    only: Optional[str] = None
    memory_budget: int = 2 * 1024**3
    ray: Optional[str] = None
    support: str = "square"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise AuditError("no model given; pass a model file or zoo:NAME")
        for name, (flag_, lo, hi) in _INT_BOUNDS.items():
            v = getattr(self, name)
            if v is None and name in PLANNED + ("threads", "label"):
                continue
            hi = _cpus() if name == "threads" else hi
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                raise AuditError(f"{flag_} must be an integer " + (f"from {lo} to {hi}" if hi is not None else
                                                                   f">= {lo}") + f"; got {v!r}{_WHY.get(name, '')}")
        if self.data_limit in (1, 2):
            raise AuditError(f"--data-limit must be 0 (the whole set) or at least 3; got {self.data_limit}")
        if self.budget is not None and not (isinstance(self.budget, (int, float)) and self.budget > 0
                                            and math.isfinite(self.budget)):
            raise AuditError(f"--budget must be a positive number of seconds or None; got {self.budget!r}")
        if self.seeds is not None and self.seed_offset + self.seeds > 10_000:
            raise AuditError("evaluation seeds must stay below 10000 (calibration seeds start there); "
                             "lower --seeds or --seed-offset")
        if self.machine not in MACHINE_CHOICES:
            raise AuditError(f"--machine must be one of {', '.join(MACHINE_CHOICES)}; got {self.machine!r}")
        if self.dictionary not in ("periodic", "valid"):
            raise AuditError(f"--dictionary must be periodic or valid; got {self.dictionary!r}")
        if self.support not in SUPPORT_CHOICES:
            raise AuditError(f"--support must be one of {', '.join(SUPPORT_CHOICES)}; got {self.support!r}")
        if self.support == "border" and (self.scales not in ("auto", "calibrate") or self.criterion != "x0"):
            raise AuditError("--support border calibrates a second scale for the border band: use --scales auto or "
                             "calibrate with --criterion x0")
        if self.criterion not in ("x0", "cosine"):
            raise AuditError(f"--criterion must be x0 or cosine; got {self.criterion!r}")
        if isinstance(self.scales, str):
            if self.scales not in SCALE_MODES:
                raise AuditError(f"--scales must be one of {', '.join(SCALE_MODES)} or a list of odd sizes; "
                                 f"got {self.scales!r}")
        else:
            sc = tuple(self.scales)
            if self.steps is None:
                object.__setattr__(self, "steps", len(sc))       # given sizes fix the grid
            if len(sc) != self.steps:
                raise AuditError(f"--scales gives {len(sc)} sizes for {self.steps} steps; give one per step "
                                 f"(index 0 = least noise) or change --steps")
            for k in sc:
                if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
                    raise AuditError(f"--scales must be positive odd integers; got {k!r}")
            object.__setattr__(self, "scales", sc)
        if not (isinstance(self.memorized_threshold, (int, float)) and 0 < self.memorized_threshold <= 1):
            raise AuditError(f"--memorized-threshold must be in (0, 1]; got {self.memorized_threshold!r}")
        if isinstance(self.memory_budget, bool) or not isinstance(self.memory_budget, int) or \
                self.memory_budget < 1 << 20:
            raise AuditError(f"--memory-budget must be at least 1M (bytes); got {self.memory_budget!r}")
        if self.ray is not None and (not isinstance(self.ray, str) or not self.ray.strip()):
            raise AuditError(f"--ray must be 'auto' or a Ray cluster address (host:port or ray://...); got {self.ray!r}")
        if self.device not in ("cpu", "cuda"):
            raise AuditError(f"--device must be cpu or cuda; got {self.device!r}")
        object.__setattr__(self, "fail_on", tuple(self.fail_on))
        for r in self.fail_on:
            parse_rule(r)  # raises RuleError (a ValueError) with a one-line message
        if self.only is not None and self.only not in ONLY_CHOICES:
            raise AuditError(f"--only must be one of {', '.join(ONLY_CHOICES)}; got {self.only!r}")
        if self.only == "structure":
            for rule in self.rules:
                if rule.path.split(".")[0] not in STRUCTURE_SECTIONS:
                    raise AuditError(f"--fail-on {rule.text}: {rule.path} is not computed by --only structure; gate "
                                     f"on what it computes ({', '.join(STRUCTURE_SECTIONS[3:6])}: e.g. band_width, "
                                     f"period) or run the whole audit")

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(parse_rule(r) for r in self.fail_on)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["arch_kwargs"] = None if self.arch_kwargs is None else dict(self.arch_kwargs)
        d["scales"] = self.scales if isinstance(self.scales, str) else list(self.scales)
        d["fail_on"] = list(self.fail_on)
        return d


def parse_arch_kwargs(text: Optional[str]) -> Optional[dict]:
    """``--arch-kwargs '{"width": 64}'`` -> a dict (``None`` stays ``None``).

    Raises:
        AuditError: not a JSON object.
    """
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise AuditError(f"--arch-kwargs is not valid JSON ({exc}); write a JSON object like "
                         f"'{{\"width\": 64}}'") from None
    if not isinstance(value, dict):
        raise AuditError(f"--arch-kwargs must be a JSON object like '{{\"width\": 64}}'; got {type(value).__name__}")
    return value


def parse_scales(text: str) -> Union[str, tuple[int, ...]]:
    """``"auto"``/``"erf"``/``"calibrate"`` or ``"3,3,5,..."`` -> a mode or a tuple of ints.

    Raises:
        AuditError: neither a mode nor a comma-separated list of integers.
    """
    s = str(text).strip()
    if s in SCALE_MODES:
        return s
    try:
        return tuple(int(p) for p in s.replace(" ", "").split(",") if p != "")
    except ValueError:
        raise AuditError(f"--scales {text!r} is neither {', '.join(SCALE_MODES)} nor a list like 3,3,5,7") from None


def model_name(model: str) -> str:
    """A short, file-system-safe name for the model (``zoo:resnet-zeros`` -> ``resnet-zeros``)."""
    s = str(model)
    if s.startswith("zoo:"):
        base = s[4:]
    else:
        p = Path(s.rstrip("/\\"))
        base = p.name if p.is_dir() else p.stem
    safe = "".join(ch if (ch.isalnum() or ch in "-_.") else "_" for ch in base).strip("._")
    return safe or "model"
