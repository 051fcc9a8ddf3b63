"""The audit in MLflow: a run with its numbers, the report as artifacts, and a verdict on a
registered model version; an evaluator for ``mlflow.evaluate(..., evaluators=["els-audit"])``.

Needs the optional extra (``pip install els-audit[mlflow]``); nothing in the core imports
this module.  Everything here reads the audit's summary (``AuditResult.to_dict()``, the
same dict as ``summary.json``), as the report does.

What :func:`log_audit` records, in the active run or a new one of ``experiment``:
- params: the audit's config (``config.*``) and the plan's settings (``plan.*``);
- metrics: ``median_r``, ``median_r2``, ``is_median_r``, ``win_rate``,
  ``memorized_fraction``, ``exit_code``; and per step (``step`` = j, the grid time
  ``t = (j+1)/steps``, 0 = least noise) ``erf90_centre``, ``scale_predicted`` and
  ``scale_calibrated``;
- tags: ``els_audit.verdict``, ``els_audit.machine``, ``els_audit.passed`` ("true"/"false"),
  ``els_audit.version``, ``els_audit.model_sha256``;
- artifacts: the report folder under ``els-audit/`` (or ``summary.json`` alone);
- with ``registered_model=(NAME, VERSION)``: the same verdict, pass/fail, median r and run
  id as tags of that model version in the registry.

The evaluator (entry point ``mlflow.model_evaluator`` = ``els-audit``) runs an audit when a
registry job asks for it::

    result = mlflow.models.evaluate(
        data=pd.DataFrame({"data": ["train.npz"]}), model_type="els-audit", evaluators=["els-audit"],
        evaluator_config={"els-audit": {"model": "unet.safetensors", "arch": "pkg.nets:UNet", "budget": "10m"}})
    mlflow.validate_evaluation_results({"median_r": MetricThreshold(threshold=0.8, greater_is_better=True)}, result)

The model comes from the evaluator's config (a file, folder or ``zoo:NAME``), since the
audit reads weights, not a pyfunc; ``data`` is one row naming the training data in a
``data`` column (or the config's ``data``).  Other config keys are
:class:`~els_audit.config.AuditConfig` fields (``budget`` in seconds or as "10m").  The
result's metrics are those above, so ``mlflow.validate_evaluation_results`` gates on them
with MLflow's own ``MetricThreshold``.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import mlflow
from mlflow.models.evaluation import EvaluationResult, ModelEvaluator
from mlflow.tracking import MlflowClient

from ..checks import metric_values
from ..serialize import dumps

__all__ = ["log_audit", "summary_metrics", "step_metrics", "audit_tags", "check_model_version", "ElsAuditEvaluator",
           "MODEL_TYPE"]

#: the ``model_type`` the evaluator answers to
MODEL_TYPE = "els-audit"
_PARAM_MAX = 500            # MLflow keeps param values up to 6000 characters; ours stay short


def summary_metrics(s: dict) -> dict[str, float]:
    """The audit's scalar metrics (those measured and finite) and its exit code."""
    out = metric_values(s)
    if isinstance(s.get("exit_code"), int):
        out["exit_code"] = float(s["exit_code"])
    return out


def step_metrics(s: dict) -> dict[str, list[tuple[int, float]]]:
    """Per-step series ``{name: [(step, value), ...]}``; step j is grid time (j+1)/steps."""
    out: dict[str, list[tuple[int, float]]] = {}
    erf = s.get("erf") or {}
    times, centre = erf.get("times") or [], ((erf.get("x0_erf90") or {}).get("centre") or [])
    if times and centre:
        T = len(times)
        out["erf90_centre"] = sorted((int(round(t * T)) - 1, float(v)) for t, v in zip(times, centre))
    mac = s.get("machine") or {}
    for key, name in (("scales_predicted", "scale_predicted"), ("scales", "scale_calibrated")):
        if mac.get(key):
            out[name] = [(j, float(k)) for j, k in enumerate(mac[key])]
    return out


def audit_tags(s: dict) -> dict[str, str]:
    """Run (and model version) tags: the verdict, the machine, pass/fail."""
    return {"els_audit.verdict": str((s.get("structure") or {}).get("verdict_line", "n/a")),
            "els_audit.machine": str((s.get("machine") or {}).get("kind", "none")),
            "els_audit.passed": "true" if s.get("exit_code") == 0 else "false",
            "els_audit.version": str((s.get("versions") or {}).get("els_audit", "")),
            "els_audit.model_sha256": str((s.get("model") or {}).get("sha256", ""))}


def _params(s: dict) -> dict[str, str]:
    out = {}
    for k, v in sorted((s.get("config") or {}).items()):
        out[f"config.{k}"] = json.dumps(v)[:_PARAM_MAX] if not isinstance(v, str) else v[:_PARAM_MAX]
    for k, v in sorted(((s.get("plan") or {}).get("settings") or {}).items()):
        out[f"plan.{k}"] = str(v)
    return out


def _summary_of(result: Any) -> dict:
    """The summary dict as summary.json holds it."""
    if isinstance(result, dict):
        return result
    if hasattr(result, "to_dict"):
        return json.loads(dumps(result.to_dict()))
    raise TypeError(f"log_audit needs an AuditResult or its summary dict; got {type(result).__name__}")


def log_audit(result: Any, *, report_folder: Union[None, str, Path] = None, experiment: Optional[str] = None,
              registered_model: Optional[tuple[str, str]] = None) -> str:
    """Log an audit to MLflow and return the run id.

    Args:
        result: an :class:`~els_audit.audit.AuditResult` or its summary dict.
        report_folder: the report folder to log as artifacts (else ``summary.json`` alone).
        experiment: log into a new run of this experiment (created if missing); else into
            the active run, or a new run of the current experiment.
        registered_model: ``(NAME, VERSION)`` of a registered model version to tag with the
            verdict.
    Returns:
        the run id.
    """
    s = _summary_of(result)
    metrics = summary_metrics(s)
    if experiment is not None:
        mlflow.set_experiment(experiment)
    active = mlflow.active_run()
    run = active if active is not None and experiment is None else mlflow.start_run(
        run_name=f"els-audit {s.get('name', '')}", nested=active is not None)
    try:
        mlflow.log_params(_params(s))
        mlflow.log_metrics(metrics)
        for name, series in step_metrics(s).items():
            for step, value in series:
                mlflow.log_metric(name, value, step=step)
        mlflow.set_tags(audit_tags(s))
        if report_folder is not None:
            mlflow.log_artifacts(str(report_folder), artifact_path="els-audit")
        else:
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "summary.json").write_text(json.dumps(s, indent=1))
                mlflow.log_artifacts(d, artifact_path="els-audit")
        run_id = run.info.run_id
    finally:
        if run is not active:
            mlflow.end_run()
    if registered_model is not None:
        name, version = registered_model
        client = MlflowClient()
        tags = {**audit_tags(s), "els_audit.run_id": run_id}
        if "median_r" in metrics:
            tags["els_audit.median_r"] = f"{metrics['median_r']:.4f}"
        for k, v in tags.items():
            client.set_model_version_tag(name, str(version), k, v)
    return run_id


def check_model_version(name: str, version: str) -> None:
    """Raise ValueError (one line) unless the registry holds model ``name`` at ``version``."""
    try:
        MlflowClient().get_model_version(name, str(version))
    except Exception as exc:  # noqa: BLE001 - MlflowException and the store's own errors
        uri = mlflow.get_registry_uri()
        raise ValueError(f"no registered model version {name}/{version} in the MLflow registry at {uri} "
                         f"({type(exc).__name__}); register it first or fix --mlflow-model") from None


class ElsAuditEvaluator(ModelEvaluator):
    """``mlflow.models.evaluate(..., model_type="els-audit", evaluators=["els-audit"])`` (module docstring)."""

    @classmethod
    def can_evaluate(cls, *, model_type, evaluator_config, **kwargs) -> bool:
        return model_type == MODEL_TYPE

    def evaluate(self, *, model_type, dataset, run_id, evaluator_config, model=None, **kwargs):
        from ..audit import run_audit
        from ..config import AuditConfig, parse_duration
        from ..outputs import plan_outputs, write_outputs

        cfg = dict(evaluator_config or {})
        target = cfg.pop("model", None)
        if not target:
            raise ValueError('the els-audit evaluator needs evaluator_config={"els-audit": {"model": PATH or '
                             '"zoo:NAME", ...}}: it audits weights, not a pyfunc')
        data = cfg.pop("data", None) or _data_column(dataset)
        if isinstance(cfg.get("budget"), str):
            cfg["budget"] = parse_duration(cfg["budget"])
        fields = {f.name for f in dataclasses.fields(AuditConfig)}
        unknown = sorted(set(cfg) - fields)
        if unknown:
            raise ValueError(f"unknown els-audit setting(s) {unknown} in evaluator_config; use AuditConfig fields")
        result = run_audit(AuditConfig(model=str(target), data=data, **cfg))
        s = _summary_of(result)
        with tempfile.TemporaryDirectory() as d:
            folder = write_outputs(result, plan_outputs(Path(d) / "report"))
            log_audit(s, report_folder=folder)          # into the run mlflow.evaluate started
        return EvaluationResult(metrics=summary_metrics(s), artifacts={})


def _data_column(dataset) -> Optional[str]:
    """The training data spec from the evaluation data's ``data`` column (one row), if any."""
    df = getattr(dataset, "features_data", None)
    if df is not None and hasattr(df, "columns") and "data" in df.columns and len(df):
        return str(df["data"].iloc[0])
    return None
