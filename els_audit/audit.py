"""The audit, end to end: model -> probes -> machine -> scales -> prediction -> novelty -> checks.

References:
- M. Kamb and S. Ganguli, "An analytic theory of creativity in convolutional diffusion
  models", ICML 2025 (arXiv 2412.20292); theory.md sections 1-4 (one DDIM grid and one
  seed for network and machines; the machines; per-step scale calibration; the metric and
  the published numbers).
- docs/conventions.md: this module is the pipeline as one pure function,
  :func:`run_audit` (``AuditConfig -> AuditResult``); :func:`els_audit.outputs.write_outputs`
  writes the report, ``summary.json`` and the raw arrays, atomically.  The CLI only builds
  the config.

Stages (each a function of the library, called in order):

1. load (:func:`els_audit.models.load_model` + :func:`els_audit.models.make_denoiser`),
   data (:func:`els_audit.data.load_dataset`);
2. probes: trace, theoretical receptive field, structural equivariance verdict,
   effective receptive field per step (its predicted patch per step), measured
   equivariance (EQ-T);
3. machine choice from the verdict (:func:`choose_machine`), built over a seeded,
   class-balanced subset of the data (the cost: see :data:`FULL_FIDELITY`);
4. scales: ``erf`` (the probe's prediction), ``calibrate`` (every odd k up to the image
   side), ``auto`` (calibrate among the ERF prediction's neighbours) or a given list;
5. prediction (network, fitted machine and IS from the same seeds on one grid);
6. novelty (copy test against the whole data set, mosaic, locality map);
7. checks (built-in warnings and the user's ``--fail-on`` rules).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

from . import __version__
from .calibrate import CalibrationResult, calibrate_scales, candidates_near, default_candidates
from .checks import Check, Rule, builtin_checks, evaluate_rules, exit_code, parse_rule
from .errors import AuditError
from .machines import build_machine
from .models.capture import capture_library_output, summarise
from .novelty import DEFAULT_THRESHOLD, NoveltyResult, assess_novelty
from .predict import PredictionResult, predict_samples
from .published import PublishedMatch, closest_published
from .serialize import json_safe
from .stages import Clock, Inputs, Probes, ProgressFn, load_inputs, run_probes

__all__ = [
    "AuditConfig",
    "AuditResult",
    "AuditError",
    "MachineChoice",
    "run_audit",
    "choose_machine",
    "parse_scales",
    "parse_arch_kwargs",
    "model_name",
    "FULL_FIDELITY",
    "MACHINE_CHOICES",
    "SCALE_MODES",
    "ONLY_CHOICES",
]

MACHINE_CHOICES = ("auto", "ELS", "bbELS", "LS")
#: ``--only``: run a part of the audit (``structure``: trace, receptive field, verdict, field
#: probe, ERF and shift tests; no sanity check, no machines)
ONLY_CHOICES = ("structure",)
#: the summary sections a structure-only audit writes (``--fail-on`` rules must gate on these)
STRUCTURE_SECTIONS = ("name", "model", "data", "structure", "erf", "equivariance", "config")
SCALE_MODES = ("auto", "erf", "calibrate")
TIME_INPUT_ALIASES = {"unit": "unit", "index": "index", "sigma": "sigma"}

#: what the paper ran, and what a full-fidelity audit should use (the defaults are cut
#: down so that the README's run finishes in under 3 minutes on 2 CPU cores).
FULL_FIDELITY = {
    "steps": 20,
    "seeds": 100,
    "calibration_seeds": 8,
    "data_limit": None,
    "scales": "calibrate",
    "note": ("the paper: 100 seeds, 20 machine steps, calibration over every odd k, the whole training set "
             "as the dictionary.  Each machine evaluation costs ~N*(H*W)^2*C*k*k multiply-adds per image "
             "(N dictionary images; fewer after merging duplicate patches): for MNIST 5000 at 32x32 that is "
             "seconds per image per step on a CPU, so the full setting takes hours there.  --device cuda moves "
             "only the network; the machines run on the CPU in this version."),
}




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
    "data_limit": ("--data-limit", 3, None),
    "threads": ("--threads", 1, None),
    "label": ("--label", 0, None),
}
#: why a bound is what it is, appended to its message
_WHY = {
    "steps": " (a DDIM grid finer than the 1000 training steps of common models adds nothing)",
    "data_limit": " (0 = the whole data set)",
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
            images (``None`` = all).  The copy test always searches the whole data set.
        data_seed: seed of that subset.
        trust_model, arch, arch_kwargs, format, state_dict_key: passed to
            :func:`els_audit.models.load_model`.
        schedule, time_input, prediction, call_style, num_train_steps, data_range: adapter
            overrides (``None`` = resolve; see :mod:`els_audit.models.adapter`).
        steps: T of the DDIM grid shared by network and machines.
        seeds: number of evaluation seeds (seeds ``seed_offset .. seed_offset+seeds-1``).
        calibration_seeds: calibration seeds, disjoint from the evaluation ones
            (``10_000 + i``).
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
        device: ``cpu`` or ``cuda`` (the network; machines run where the data lives).
        only: ``None`` (the whole audit) or ``"structure"``: the architecture review (see
            :data:`ONLY_CHOICES`); the summary then has no machine, prediction, novelty or
            published section.
    """

    model: str
    data: Optional[str] = None
    data_limit: Optional[int] = 300
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
    steps: int = 10
    seeds: int = 8
    calibration_seeds: int = 2
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

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise AuditError("no model given; pass a model file or zoo:NAME")
        for name, (flag_, lo, hi) in _INT_BOUNDS.items():
            v = getattr(self, name)
            if v is None and name in ("data_limit", "threads", "label"):
                continue
            hi = _cpus() if name == "threads" else hi
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                raise AuditError(f"{flag_} must be an integer " + (f"from {lo} to {hi}" if hi is not None else
                                                                   f">= {lo}") + f"; got {v!r}{_WHY.get(name, '')}")
        if self.seed_offset + self.seeds > 10_000:
            raise AuditError("evaluation seeds must stay below 10000 (calibration seeds start there); "
                             "lower --seeds or --seed-offset")
        if self.machine not in MACHINE_CHOICES:
            raise AuditError(f"--machine must be one of {', '.join(MACHINE_CHOICES)}; got {self.machine!r}")
        if self.dictionary not in ("periodic", "valid"):
            raise AuditError(f"--dictionary must be periodic or valid; got {self.dictionary!r}")
        if self.criterion not in ("x0", "cosine"):
            raise AuditError(f"--criterion must be x0 or cosine; got {self.criterion!r}")
        if isinstance(self.scales, str):
            if self.scales not in SCALE_MODES:
                raise AuditError(f"--scales must be one of {', '.join(SCALE_MODES)} or a list of odd sizes; "
                                 f"got {self.scales!r}")
        else:
            sc = tuple(self.scales)
            if len(sc) != self.steps:
                raise AuditError(f"--scales gives {len(sc)} sizes for {self.steps} steps; give one per step "
                                 f"(index 0 = least noise) or change --steps")
            for k in sc:
                if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
                    raise AuditError(f"--scales must be positive odd integers; got {k!r}")
            object.__setattr__(self, "scales", sc)
        if not (isinstance(self.memorized_threshold, (int, float)) and 0 < self.memorized_threshold <= 1):
            raise AuditError(f"--memorized-threshold must be in (0, 1]; got {self.memorized_threshold!r}")
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


# ---------------------------------------------------------------------------------------
# machine choice
# ---------------------------------------------------------------------------------------
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
    """The machine the verdict calls for (theory.md section 2).

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
# result
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class AuditResult:
    """Everything an audit found.  ``to_dict()`` is summary.json; ``arrays()`` the ``.npz``.

    Attributes:
        config: the :class:`AuditConfig`.
        model: ``LoadedModel.to_dict()``; denoiser: ``Denoiser.to_dict()`` (without the model).
        data: the full data set's ``to_dict()`` plus ``dictionary`` (the subset the
            machines use).
        trace, receptive_field, structure: probe results as dicts (``structure`` may be
            ``{"error": ...}`` when tracing failed).
        erf, equivariance: ERF and measured-equivariance objects (``None`` if not run).
        choice: :class:`MachineChoice`.
        scales, scales_predicted, scales_source: the per-step patch sizes used (index 0 =
            least noise), the ERF prediction in the same order, and where they came from.
        calibration: :class:`CalibrationResult` or ``None``.
        calibration_other: the other criterion's calibration (``compare_criteria``) or ``None``.
        prediction: :class:`PredictionResult`; novelty: :class:`NoveltyResult`.
        published: :class:`PublishedMatch`.
        checks: every :class:`Check`; exit_code: 0 or 1.
        graph: the traced graph's networkx view (for the report), or ``None``.
        nearest_images: (B, C, H, W) the nearest training image of each network sample.
        dictionary_images: (N, C, H, W) the machines' dictionary (for the mosaic).
        timings: stage -> seconds.  versions: package versions.  warnings: notes.

    A structure-only audit (``config.only == "structure"``) has no choice, scales,
    calibration, prediction, novelty or published result (``None`` / empty), and its
    summary no ``machine``, ``prediction``, ``novelty`` or ``published`` section.
    """

    @property
    def scope(self) -> str:
        """``"full"`` or ``"structure"`` (summary.json's ``scope``)."""
        return "structure" if self.prediction is None else "full"


    config: AuditConfig
    model: dict
    denoiser: dict
    data: dict
    trace: Optional[dict]
    receptive_field: Optional[dict]
    structure: dict
    erf: Any
    equivariance: Any
    choice: Optional[MachineChoice] = None
    scales: tuple[int, ...] = ()
    scales_predicted: tuple[int, ...] = ()
    scales_source: str = ""
    calibration: Optional[CalibrationResult] = None
    calibration_other: Optional[CalibrationResult] = None
    prediction: Optional[PredictionResult] = None
    novelty: Optional[NoveltyResult] = None
    published: Optional[PublishedMatch] = None
    checks: tuple[Check, ...] = ()
    exit_code: int = 0
    graph: Any = field(repr=False, default=None)
    nearest_images: Optional[np.ndarray] = field(repr=False, default=None)
    timings: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    name: str = "model"

    def summary_core(self) -> dict:
        """summary.json without the checks (the checks are computed from this)."""
        d = {
            "schema": "els-audit/summary/1",
            "scope": self.scope,
            "name": self.name,
            "model": self.model,
            "denoiser": self.denoiser,
            "data": self.data,
            "structure": {
                **self.structure,
                "theoretical_rf": self.receptive_field,
                "trace": self.trace,
            },
            "erf": None if self.erf is None else self.erf.to_dict(),
            "equivariance": None if self.equivariance is None else self.equivariance.to_dict(),
            "config": self.config.to_dict(),
            "versions": dict(self.versions),
            "timings": {k: round(float(v), 3) for k, v in self.timings.items()},
            "warnings": list(self.warnings),
        }
        if self.scope == "full":
            d.update(self._machine_sections())
        return json_safe(d)

    def _machine_sections(self) -> dict:
        return {
            "machine": {
                **self.choice.to_dict(),
                "scales": list(self.scales),
                "scales_predicted": list(self.scales_predicted),
                "scales_source": self.scales_source,
                "scales_convention": "scales[j] is applied at t = (j+1)/steps (index 0 = least noise)",
                "calibration": None if self.calibration is None else self.calibration.to_dict(),
                "calibration_other": None if self.calibration_other is None else self.calibration_other.to_dict(),
                "n_dictionary_images": int(self.data.get("dictionary", {}).get("N", 0)),
            },
            "prediction": self.prediction.to_dict(),
            "published": None if self.published is None else self.published.to_dict(),
            "novelty": self.novelty.to_dict(),
            "full_fidelity": dict(FULL_FIDELITY),
        }

    def to_dict(self) -> dict:
        """summary.json (JSON-safe; validated by ``els_audit/summary_schema.json``)."""
        d = self.summary_core()
        d["checks"] = [c.to_dict() for c in self.checks]
        d["exit_code"] = self.exit_code
        return json_safe(d)

    def arrays(self) -> dict[str, np.ndarray]:
        """Raw arrays for ``arrays.npz``: seeds, x_T, the three samples, maps, calibration
        (a structure-only audit: the ERF and shift-test maps)."""
        out = dict(self.prediction.arrays()) if self.prediction is not None else {}
        for k, v in (self.novelty.arrays() if self.novelty is not None else {}).items():
            out.setdefault(k, v)
        if self.calibration is not None:
            out.update(self.calibration.arrays())
        if self.calibration_other is not None:
            crit = self.calibration_other.criterion
            out.update({f"{k}_{crit}": v for k, v in self.calibration_other.arrays().items()})
        if self.erf is not None:
            out["erf_maps"] = self.erf.arrays()["erf_maps"]
            out["erf_times"] = self.erf.arrays()["times"]
        if self.equivariance is not None:
            out["equivariance_error_maps"] = self.equivariance.arrays()["error_maps"]
        if self.nearest_images is not None:
            out["nearest_training_images"] = self.nearest_images
        if self.scope == "full":
            out["scales"] = np.asarray(self.scales)
            out["scales_predicted"] = np.asarray(self.scales_predicted)
        return out


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def versions() -> dict:
    """Versions of the software the audit ran on."""
    out = {"els_audit": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__, "platform": platform.platform()}
    for mod in ("matplotlib", "networkx", "captum"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                m = __import__(mod)
            except Exception:  # noqa: BLE001 - an optional dependency may be absent
                m = None
        out[mod] = getattr(m, "__version__", None) if m is not None else None
    return out


def _arch_family(module, structure: dict) -> Optional[str]:
    name = type(module).__name__.lower()
    attn = any(g.get("kind") in ("attention", "einsum", "sdpa", "mha", "bmm", "matmul")
               for g in (structure.get("_global_paths") or []))
    if "resnet" in name:
        return "ResNet"
    if "unet" in name:
        return "UNet+attention" if (attn or "attention" in name) else "UNet"
    return None


def _padding_of(structure: dict) -> Optional[str]:
    if not structure or structure.get("error"):
        return None
    verdict = structure.get("verdict") or []
    if "boundary-broken" in verdict:
        return "zeros"
    if any(b.get("kind") == "boundary" for b in structure.get("breakers") or []):
        return "zeros"
    return "circular"


# ---------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------
def run_audit(config: AuditConfig, *, progress: Optional[ProgressFn] = None) -> AuditResult:
    """Run the whole audit; what libraries (torch, the model's own code) warn or log while it
    runs is kept in the result's ``warnings`` (summarised), not printed.

    Args:
        config: an :class:`AuditConfig`.
        progress: optional ``f(line)`` for progress lines (the CLI prints them on stderr).
    Returns:
        :class:`AuditResult` (``exit_code`` 1 when a ``fail_on`` rule failed).
    Raises:
        ValueError (:class:`AuditError`, ``ModelLoadError``, ``DataSpecError``,
        ``RuleError``): the audit cannot run with this input; the message is one line.
    """
    with capture_library_output() as said:
        res = _run(config, progress)
    if not said:
        return res
    return dataclasses.replace(res, warnings=res.warnings + (f"while the audit ran, libraries said: "
                                                             f"{summarise(said)}",))


def _run(config: AuditConfig, progress: Optional[ProgressFn]) -> AuditResult:
    cfg = config
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise AuditError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    clock = Clock(progress)
    structure_only = cfg.only == "structure"
    inp = load_inputs(cfg, clock, sanity=not structure_only)                          # 1. load
    probes = run_probes(cfg, clock, inp)                                              # 2. probes
    if structure_only:
        inp.notes.append(STRUCTURE_ONLY_NOTE)
        return _with_checks(AuditResult(**_probe_fields(cfg, clock, inp, probes)), cfg, clock)
    return _machine_stages(cfg, clock, inp, probes)


#: what a structure-only audit's numbers mean (the weights may be untrained: no sanity check ran)
STRUCTURE_ONLY_NOTE = (
    "structure-only audit (--only structure): no sanity check ran, so the weights may be untrained, and no machine "
    "was fitted.  The receptive field, breakers and verdict are the architecture's and hold for any weights; the "
    "ERF and the shift tests measure these weights: on random weights the ERF shows how far the architecture's "
    "sensitivity reaches at initialisation, not the patch sizes a trained model will use")


def _probe_fields(cfg: AuditConfig, clock: Clock, inp: Inputs, probes: Probes) -> dict:
    """The :class:`AuditResult` fields every audit has: inputs and probes."""
    den_d = inp.den.to_dict()
    den_d.pop("model", None)
    den_d["label_effect"] = inp.label_effect
    data_d = inp.full.to_dict()
    data_d["spec_source"] = inp.spec_source
    data_d["dictionary"] = {"N": len(inp.dic), "limit": cfg.data_limit, "seed": cfg.data_seed,
                            "label_counts": None if inp.dic.labels is None else
                            {str(k): v for k, v in inp.dic.label_counts().items()},
                            "conditional": inp.conditional}
    return dict(config=cfg, model=inp.loaded.to_dict(), denoiser=den_d, data=data_d, trace=probes.trace,
                receptive_field=probes.receptive_field, structure=dict(probes.structure), erf=probes.erf,
                equivariance=probes.equivariance, graph=probes.graph, timings=dict(clock.timings),
                versions=versions(), warnings=tuple(inp.notes) + tuple(inp.loaded.notes), name=model_name(cfg.model))


def _with_checks(res: AuditResult, cfg: AuditConfig, clock: Clock) -> AuditResult:
    """The result with its built-in checks and ``--fail-on`` rules evaluated (and its exit code)."""
    core = res.summary_core()
    checks = builtin_checks(core) + evaluate_rules(cfg.rules, core)
    res = dataclasses.replace(res, checks=checks, exit_code=exit_code(checks))
    clock.say("checks: " + ", ".join(f"{c.name}={c.status}" for c in checks))
    return res


def _machine_stages(cfg: AuditConfig, clock: Clock, inp: Inputs, probes: Probes) -> AuditResult:
    """Stages 3-7: the machine, its scales, the prediction, novelty and the checks."""
    C, H, W = inp.shape
    full, dic, den, conditional = inp.full, inp.dic, inp.den, inp.conditional
    sched, eps_fn, notes = den.schedule, inp.eps_fn, inp.notes
    train_images, dict_images = inp.train_images, inp.dict_images
    eval_labels, cal_labels = inp.eval_labels, inp.cal_labels
    structure, predicted = {**probes.structure, "_global_paths": probes.global_paths}, probes.predicted
    # 3. machine ----------------------------------------------------------------------------
    choice = choose_machine(structure, cfg.machine, cfg.dictionary)
    clock.say(f"machine: {choice.kind} ({choice.reason})")
    labels_t = dic.labels if conditional else None
    machine = build_machine(choice.kind, dict_images, labels_t, schedule=sched, dictionary=cfg.dictionary)
    is_machine = build_machine("IS", dict_images, labels_t, schedule=sched)

    # 4. scales -------------------------------------------------------------------------------
    k_max = max(H, W) if max(H, W) % 2 else max(H, W) - 1
    calibration = other = None
    cal_seeds = [10_000 + i for i in range(cfg.calibration_seeds)]
    if isinstance(cfg.scales, tuple):
        scales, source = cfg.scales, "given (--scales)"
    elif cfg.scales == "erf":
        scales, source = predicted, "erf (the probe's prediction, not calibrated)"
    else:
        if cfg.scales == "calibrate":
            cands = default_candidates((C, H, W))
            source = f"calibrated over every odd k in {cands[0]}..{cands[-1]} ({cfg.criterion} criterion)"
        else:
            cands = candidates_near(predicted, cfg.spread, k_max=k_max)
            source = f"calibrated around the ERF prediction (+-{2 * cfg.spread}, {cfg.criterion} criterion)"
        calibration = clock.stage("calibrate", calibrate_scales, eps_fn, machine, seeds=cal_seeds, steps=cfg.steps,
                                  schedule=sched, candidates=cands, criterion=cfg.criterion,
                                  label=cal_labels, progress=clock.steps(), slow=True)
        scales = calibration.scales
        if cfg.compare_criteria:
            crit = "cosine" if cfg.criterion == "x0" else "x0"
            other = clock.stage(f"calibrate ({crit}, for comparison)", calibrate_scales, eps_fn, machine,
                                seeds=cal_seeds,
                                steps=cfg.steps, schedule=sched, candidates=cands, criterion=crit, label=cal_labels,
                                progress=clock.steps(), slow=True)

    # 5. prediction -------------------------------------------------------------------------
    seeds = list(range(cfg.seed_offset, cfg.seed_offset + cfg.seeds))
    prediction = clock.stage("predict", predict_samples, eps_fn, machine, scales, seeds=seeds, steps=cfg.steps,
                             is_machine=is_machine, schedule=sched, label=eval_labels, progress=clock.steps(),
                             slow=True)

    # 6. novelty -----------------------------------------------------------------------------
    # NB: the copy test searches the whole data set (not only the dictionary subset).
    novelty = clock.stage("novelty", assess_novelty, prediction, train_images, machine,
                          threshold=float(cfg.memorized_threshold), baseline_limit=min(300, len(full)), seed=0)
    nearest = train_images[torch.from_numpy(novelty.memorization.nearest_index)].numpy()

    # published -----------------------------------------------------------------------------
    try:
        published = closest_published(inp.spec, _arch_family(inp.loaded.module, structure), _padding_of(structure),
                                      conditional)
    except ValueError as exc:
        published = None
        notes.append(f"no published comparison: {exc}")

    fields = _probe_fields(cfg, clock, inp, probes)
    res = AuditResult(**fields, choice=choice, scales=tuple(scales), scales_predicted=predicted, scales_source=source,
                      calibration=calibration, calibration_other=other, prediction=prediction, novelty=novelty,
                      published=published, nearest_images=nearest)
    return _with_checks(res, cfg, clock)
