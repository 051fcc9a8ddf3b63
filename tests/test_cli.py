"""The command line: exit codes, one-line errors, --json -, --quiet, --rules, and the console entry."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import one_line_error
from cli_helpers import runner as _runner

from els_audit.cli import main

TINY = ["--data", "mnist5k:size=32:limit=60", "--data-limit", "30", "--steps", "3", "--seeds", "2",
        "--calibration-seeds", "1", "--threads", "1"]


def _one_line_error(res):
    return one_line_error(res.exit_code, res.stderr, stdout=res.stdout)


def test_quiet_json_stdout_and_rules_file(tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text('fail_on = ["median_r<-2"]\n')          # r >= -1: never fails
    out = tmp_path / "rep"
    res = _runner().invoke(main, ["zoo:resnet-circular", *TINY, "--out", str(out), "--json", "-", "--quiet",
                                  "--rules", str(rules), "--scales", "erf"])
    assert res.exit_code == 0, res.stderr
    assert res.stderr == ""
    summary = json.loads(res.stdout)
    assert summary["machine"]["kind"] == "ELS"
    assert summary["config"]["fail_on"] == ["median_r<-2"]
    rule = [c for c in summary["checks"] if c["source"] == "rule"]
    assert [c["status"] for c in rule] == ["pass"]
    assert sorted(p.name for p in out.iterdir()) == [".els-audit-report", "arrays.npz", "index.html", "summary.json"]
    assert json.loads((out / "summary.json").read_text()) == summary


def test_console_entry_fail_on_exits_1(tmp_path):
    # the real process, as a user runs it: progress on stderr, exit code 1 on a failed rule
    out = tmp_path / "r"
    js = tmp_path / "s.json"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    p = subprocess.run([sys.executable, "-m", "els_audit.cli", "zoo:resnet-zeros", *TINY, "--out", str(out),
                        "--json", str(js), "--fail-on", "median_r<2", "--no-report"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 1, p.stderr
    assert "calibrate" in p.stderr and "1 fail: median_r<2" in p.stderr
    s = json.loads(js.read_text())
    assert s["exit_code"] == 1 and s["machine"]["kind"] == "bbELS"
    assert sorted(x.name for x in out.iterdir()) == [".els-audit-report", "arrays.npz", "summary.json"]


@pytest.mark.parametrize("args,needle", [
    (["zoo:nope"], "no such zoo model"),
    (["/no/such/model.safetensors"], "no such file"),
    (["zoo:resnet-zeros", "--fail-on", "median_r<<1"], "cannot parse --fail-on rule"),
    (["zoo:resnet-zeros", "--steps", "4", "--scales", "3,5"], "one per step"),
    (["zoo:resnet-zeros", "--scales", "big"], "--scales"),
    (["zoo:resnet-zeros", "--data", "no/such/dir:limit=3"], "no/such/dir"),
    (["zoo:resnet-zeros", "--steps", "many"], "is not a valid integer"),
    (["zoo:resnet-zeros", "--machine", "IS"], "--machine"),
    ([], "Missing argument"),
])
def test_bad_input_exits_2_with_one_line(args, needle, tmp_path):
    out = tmp_path / "never"
    res = _runner().invoke(main, [*args, "--out", str(out)] if args else args)
    assert res.exit_code == 2
    line = _one_line_error(res)
    assert needle in line
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []                 # nothing half-written


def test_debug_shows_the_traceback_and_still_exits_2():
    res = _runner().invoke(main, ["zoo:nope", "--debug", "--quiet"])
    assert res.exit_code == 2
    assert "Traceback" in res.stderr and "ModelLoadError" in res.stderr


def test_out_is_a_file(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    res = _runner().invoke(main, ["zoo:resnet-zeros", *TINY, "--scales", "erf", "--out", str(f), "--quiet"])
    assert res.exit_code == 2
    assert "not a folder" in _one_line_error(res)
    assert f.read_text() == "x"


def test_out_holding_other_files_is_refused_before_the_audit(tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    res = _runner().invoke(main, ["zoo:resnet-zeros", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "was not written by els-audit (it holds notes.txt)" in _one_line_error(res)
    assert "load model" not in res.stderr                  # refused before any work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_help():
    res = _runner().invoke(main, ["--help"])
    assert res.exit_code == 0
    for opt in ("--data", "--trust-model", "--arch", "--schedule", "--time", "--predicts", "--steps", "--seeds",
                "--conditional", "--label", "--machine", "--scales", "--criterion", "--out", "--json", "--fail-on",
                "--quiet", "--debug", "--device", "--threads", "--data-limit"):
        assert opt in res.stdout, opt


def test_cuda_without_a_gpu_exits_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    res = _runner().invoke(main, ["zoo:resnet-zeros", "--device", "cuda", "--quiet", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "no CUDA device" in _one_line_error(res)
