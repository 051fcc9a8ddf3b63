"""MLflow: an audit logged to a real local tracking store (sqlite), a registered model version
tagged with its verdict, and a registry job gating on mlflow.models.evaluate + MLflow's own
thresholds.  Needs the mlflow extra (in the test extra; skipped, with the reason, without it)."""

import subprocess
import sys

import pytest
from cli_helpers import one_line_error
from cli_helpers import runner as _runner

from els_audit.cli import main

mlflow = pytest.importorskip("mlflow")
pd = pytest.importorskip("pandas")
from mlflow.models import MetricThreshold  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

TINY = {"data_limit": 30, "steps": 3, "seeds": 2, "calibration_seeds": 1, "scales": "erf", "threads": 1}
TINY_CLI = ["--data", "mnist5k:size=32:limit=60", "--data-limit", "30", "--steps", "3", "--seeds", "2",
            "--calibration-seeds", "1", "--threads", "1", "--scales", "erf", "--quiet"]


@pytest.fixture()
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)                           # artifacts land under tmp_path/mlruns
    mlflow.set_tracking_uri(uri)
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)


def _register(client, tmp_path, name="resnet"):
    client.create_registered_model(name)
    (tmp_path / "weights").mkdir()
    return client.create_model_version(name, str(tmp_path / "weights")).version


def test_cli_logs_the_audit_and_tags_the_model_version(store, tmp_path):
    version = _register(store, tmp_path)
    res = _runner().invoke(main, ["zoo:resnet-zeros", *TINY_CLI, "--out", str(tmp_path / "rep"), "--mlflow", "review",
                                  "--mlflow-model", f"resnet/{version}", "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.stderr
    import json
    summary = json.loads((tmp_path / "s.json").read_text())
    exp = store.get_experiment_by_name("review")
    (run,) = store.search_runs([exp.experiment_id])
    m, tags, params = run.data.metrics, run.data.tags, run.data.params
    assert m["median_r"] == pytest.approx(summary["prediction"]["median_r"])
    assert m["memorized_fraction"] == pytest.approx(summary["novelty"]["memorized_fraction"])
    assert m["exit_code"] == 0
    assert tags["els_audit.verdict"] == summary["structure"]["verdict_line"] and tags["els_audit.machine"] == "bbELS"
    assert tags["els_audit.passed"] == "true"
    assert params["config.steps"] == "3" and params["plan.n_dictionary"] == "30"
    hist = store.get_metric_history(run.info.run_id, "scale_calibrated")
    assert [(h.step, int(h.value)) for h in sorted(hist, key=lambda h: h.step)] == list(
        enumerate(summary["machine"]["scales"]))
    arts = {a.path for a in store.list_artifacts(run.info.run_id, "els-audit")}
    assert {"els-audit/summary.json", "els-audit/index.html", "els-audit/arrays.npz"} <= arts
    mv = store.get_model_version("resnet", version)
    assert mv.tags["els_audit.passed"] == "true" and mv.tags["els_audit.run_id"] == run.info.run_id
    assert mv.tags["els_audit.verdict"] == summary["structure"]["verdict_line"]


def test_registry_job_gates_a_version_on_mlflows_thresholds(store, tmp_path):
    version = _register(store, tmp_path, "circ")
    mlflow.set_experiment("registry-gate")
    with mlflow.start_run() as run:
        result = mlflow.models.evaluate(
            data=pd.DataFrame({"data": ["mnist5k:size=32:limit=60"]}), model_type="els-audit",
            evaluators=["els-audit"], evaluator_config={"els-audit": {"model": "zoo:resnet-circular", **TINY}})
    r = result.metrics["median_r"]
    assert -1 <= r <= 1 and set(result.metrics) >= {"median_r", "is_median_r", "win_rate", "memorized_fraction"}
    assert store.get_run(run.info.run_id).data.metrics["median_r"] == pytest.approx(r)

    def gate(threshold):                                  # what a registry job does with the result
        try:
            mlflow.validate_evaluation_results(
                {"median_r": MetricThreshold(threshold=threshold, greater_is_better=True)}, result)
        except mlflow.models.evaluation.validation.ModelValidationFailedException:
            return False
        store.set_registered_model_alias("circ", "audited", version)
        return True

    assert not gate(r + 0.01)
    with pytest.raises(mlflow.exceptions.MlflowException):
        store.get_model_version_by_alias("circ", "audited")
    assert gate(r - 0.01)
    assert store.get_model_version_by_alias("circ", "audited").version == version


def test_bad_mlflow_flags_exit_2_before_any_work(store, tmp_path):
    res = _runner().invoke(main, ["zoo:resnet-zeros", "--out", str(tmp_path / "a"), "--mlflow-model", "x/1"])
    one_line_error(res.exit_code, res.stderr, "--mlflow-model needs --mlflow")
    res = _runner().invoke(main, ["zoo:resnet-zeros", "--out", str(tmp_path / "b"), "--mlflow", "e",
                                  "--mlflow-model", "nope/7"])
    one_line_error(res.exit_code, res.stderr, "no registered model version nope/7")
    res = _runner().invoke(main, ["zoo:resnet-zeros", "--out", str(tmp_path / "c"), "--mlflow", "e",
                                  "--mlflow-model", "nope"])
    one_line_error(res.exit_code, res.stderr, "is not NAME/VERSION")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_the_core_never_imports_mlflow():
    code = ("import sys, els_audit.cli, els_audit.audit, els_audit.outputs, els_audit.model_card, "
            "els_audit.integrations; assert 'mlflow' not in sys.modules, 'mlflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_log_audit_from_python_inside_an_active_run(store):
    from els_audit.integrations.mlflow import log_audit

    s = {"name": "m", "config": {"steps": 2}, "plan": {"settings": {"seeds": 4}}, "exit_code": 1,
         "prediction": {"median_r": 0.5, "median_r2": float("nan"), "is_median_r": 0.2, "win_rate": 1.0},
         "novelty": {"memorized_fraction": 0.0}, "machine": {"kind": "ELS", "scales": [3, 5]},
         "structure": {"verdict_line": "equivariant"}, "erf": {"times": [1.0, 0.5], "x0_erf90": {"centre": [7, 5]}}}
    mlflow.set_experiment("outer")
    with mlflow.start_run() as outer:
        inner = log_audit(s)                                  # into the active run
        nested = log_audit(s, experiment="outer")             # a new run, nested under the active one
    assert inner == outer.info.run_id and nested != inner
    run = store.get_run(inner)
    assert run.data.metrics["median_r"] == 0.5 and "median_r2" not in run.data.metrics    # NaN is not logged
    assert run.data.tags["els_audit.passed"] == "false" and run.data.params["config.steps"] == "2"
    assert [(h.step, h.value) for h in sorted(store.get_metric_history(inner, "erf90_centre"), key=lambda h: h.step)] \
        == [(0, 5.0), (1, 7.0)]
    assert store.get_run(nested).data.tags["mlflow.parentRunId"] == inner
