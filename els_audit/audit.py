"""The audit, end to end: model -> probes -> plan -> machine and scales -> prediction -> novelty -> checks.

References:
- M. Kamb and S. Ganguli, "An analytic theory of creativity in convolutional diffusion
  models", ICML 2025 (arXiv 2412.20292); docs/theory.md sections 1-4 (one DDIM grid and one
  seed for network and machines; the machines; per-step scale calibration; the metric and
  the published numbers).
- docs/conventions.md: this module is the pipeline as one pure function,
  :func:`run_audit` (``AuditConfig -> AuditResult``); :func:`els_audit.outputs.write_outputs`
  writes the report, ``summary.json`` and the raw arrays, atomically.  The CLI only builds
  the config.

Stages (each a function of :mod:`els_audit.stages` with a typed result, called in order):

1. load (:func:`~els_audit.stages.load_inputs`): the model, the data, the adapter;
2. probes (:func:`~els_audit.stages.run_probes`): trace, theoretical receptive field,
   structural verdict, field probe, effective receptive field per step (its predicted
   patch per step), measured equivariance (EQ-T);
3. plan (:func:`~els_audit.stages.plan_audit`): a short probe of the engine, each stage's
   predicted seconds, the most faithful settings within ``--budget``
   (:mod:`els_audit.planning`); :func:`~els_audit.stages.settle_inputs` fixes the
   dictionary and the seeds' labels;
4. machine and scales (:func:`~els_audit.stages.fit_machine`): the machine the verdict
   calls for, and its scales: ``erf`` (the probe's prediction), ``calibrate`` (every odd k
   up to the image side), ``auto`` (calibrate among the ERF prediction's neighbours) or a
   given list;
5. prediction (:func:`~els_audit.stages.run_prediction`: network, fitted machine and IS
   from the same seeds on one grid);
6. novelty (:func:`~els_audit.stages.run_novelty`: copy test against the whole data set,
   mosaic, locality map);
7. checks (built-in warnings and the user's ``--fail-on`` rules).
"""

from __future__ import annotations

import dataclasses
import platform
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from . import __version__
from .calibrate import CalibrationResult
from .checks import Check, builtin_checks, evaluate_rules, exit_code
from .config import (FULL_FIDELITY, MACHINE_CHOICES, ONLY_CHOICES, SCALE_MODES, STRUCTURE_SECTIONS, AuditConfig,
                     model_name, parse_arch_kwargs, parse_scales)
from .errors import AuditError
from .machines import free_device_bytes
from .models.capture import capture_library_output, summarise
from .novelty import NoveltyResult
from .predict import PredictionResult
from .published import PublishedMatch
from .serialize import json_safe
from .planning import LADDER, Plan
from .stages.machine import ray_integration
from .stages import (Clock, Inputs, MachineChoice, Probes, ProgressFn, choose_machine, fit_machine, load_inputs,
                     plan_audit, published_match, run_novelty, run_prediction, run_probes, settle_inputs)

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
    "STRUCTURE_SECTIONS",
]


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
        support: :class:`els_audit.stages.machine.SupportsUsed`, the window per step (``None``
            for a structure-only audit).
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
    support: Any = None
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
    plan: Optional[Plan] = None

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
                "support": None if self.support is None else self.support.to_dict(),
                "n_dictionary_images": int(self.data.get("dictionary", {}).get("N", 0)),
            },
            "prediction": self.prediction.to_dict(),
            "published": None if self.published is None else self.published.to_dict(),
            "novelty": self.novelty.to_dict(),
            "full_fidelity": dict(FULL_FIDELITY),
            "plan": None if self.plan is None else self.plan.to_dict(self.timings),
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
            if self.support is not None:
                out.update(self.support.arrays())
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
    if cfg.device == "cuda":
        check_cuda(cfg.memory_budget)
    clock = Clock(progress)
    structure_only = cfg.only == "structure"
    if cfg.ray is not None and not structure_only:
        ray_integration().connect(cfg.ray)            # a missing extra or a bad address: before any work
    inp = load_inputs(cfg, clock, sanity=not structure_only)                          # 1. load
    # NB: the ERF is measured on the finest grid the plan may choose; a coarser plan reads
    # it at its own times (the grids nest)
    probes = run_probes(cfg, clock, inp, steps=cfg.steps or max(LADDER["steps"]))      # 2. probes
    if structure_only:
        inp.notes.append(STRUCTURE_ONLY_NOTE)
        return _with_checks(AuditResult(**_probe_fields(cfg, clock, inp, probes)), cfg, clock)
    plan, cfg = plan_audit(cfg, clock, inp, probes)                                   # 3. plan
    inp, probes = settle_inputs(inp, cfg), probes.on_grid(cfg.steps)
    return _machine_stages(cfg, clock, inp, probes, plan)


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


def _machine_stages(cfg: AuditConfig, clock: Clock, inp: Inputs, probes: Probes, plan: Plan) -> AuditResult:
    """Stages 4-7: the machine and its scales, the prediction, novelty and the checks."""
    fitted = fit_machine(cfg, clock, inp, probes)                                     # 4. machine, scales
    prediction = run_prediction(cfg, clock, inp, fitted)                              # 5. prediction
    novelty = run_novelty(cfg, clock, inp, fitted, prediction)                        # 6. novelty
    published = published_match(inp, probes)
    res = AuditResult(**_probe_fields(cfg, clock, inp, probes), choice=fitted.choice, scales=tuple(fitted.scales),
                      scales_predicted=probes.predicted, scales_source=fitted.source,
                      calibration=fitted.calibration, calibration_other=fitted.calibration_other,
                      support=fitted.support,
                      prediction=prediction, novelty=novelty.result, published=published,
                      nearest_images=novelty.nearest_images, plan=plan)
    return _with_checks(res, cfg, clock)                                              # 7. checks


def check_cuda(memory_budget: int) -> None:
    """Refuse ``--device cuda`` without a CUDA device, or with a memory budget the device
    cannot hold (each of the two machines, the audited one and IS, may use all of it)."""
    if not torch.cuda.is_available():
        raise AuditError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    free = free_device_bytes(torch.device("cuda"))
    if 2 * memory_budget > free:
        raise AuditError(f"--memory-budget {memory_budget / 2**30:.3g} GiB is more than half the "
                         f"{free / 2**30:.3g} GiB free on the GPU (the audited machine and IS keep one budget each); "
                         f"lower --memory-budget")
