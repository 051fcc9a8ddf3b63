"""--only structure: the architecture review (trace, receptive field, breakers, verdict, field
probe, ERF, shift tests), without the sanity check and the machines; the same report folder,
summary schema, exit codes and --fail-on rules over what it computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error
from cli_helpers import runner as _runner

from els_audit.audit import AuditConfig, AuditError, run_audit
from els_audit.checks import builtin_checks
from els_audit.cli import main
from els_audit.outputs import summary_schema

DATA = ["--data", "mnist5k:size=32:limit=60", "--steps", "3", "--threads", "1"]
MACHINE_SECTIONS = {"machine", "prediction", "novelty", "published"}


def _validate(summary):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(summary, summary_schema())


def test_structure_only_through_the_cli(tmp_path):
    out = tmp_path / "rep"
    res = _runner().invoke(main, ["zoo:unet-zeros", *DATA, "--only", "structure", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["scope"] == "structure" and not MACHINE_SECTIONS & set(s)
    assert s["structure"]["verdict_line"].startswith("boundary-broken") and "period-4" in s["structure"]["verdict"]
    assert s["structure"]["field_probe"]["agrees"] and s["erf"]["predicted_patch"]
    assert s["equivariance"]["psnr_db"]
    assert "sanity" not in s["denoiser"] or s["denoiser"]["sanity"] is None
    assert any("structure-only audit" in w for w in s["warnings"])
    names = {c["name"] for c in s["checks"]}
    assert {"field_probe", "structure_complete", "locality", "output_nonzero"} <= names
    assert not names & {"machine_beats_memorization", "memorization", "denoiser_sanity"}
    _validate(s)
    html = (out / "index.html").read_text()
    assert "id=erf" in html and "id=gallery" not in html and "id=novelty" not in html
    assert "Structure-only audit" in html
    with np.load(out / "arrays.npz") as z:
        assert "erf_maps" in z.files and "machine_samples" not in z.files


def test_structure_only_skips_the_sanity_check(tmp_path):
    # an untrained network fails the full audit's sanity check, and is reviewed here
    from els_audit.models.zoo import PaperResNet

    path = tmp_path / "untrained.pt"
    torch.save(PaperResNet(padding_mode="circular").state_dict(), path)
    base = [str(path), "--arch", "els_audit.models.zoo.architectures:PaperResNet", "--arch-kwargs",
            '{"padding_mode": "circular"}', *DATA]
    res = _runner().invoke(main, [*base, "--out", str(tmp_path / "a"), "-q"])
    one_line_error(res.exit_code, res.stderr, "sanity check failed", stdout=res.stdout)
    res = _runner().invoke(main, [*base, "--only", "structure", "--out", str(tmp_path / "b"), "-q"])
    assert res.exit_code == 0, res.stderr
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["structure"]["verdict"] == ["equivariant"]
    assert [a["size"] for a in s["structure"]["theoretical_rf"]["axes"]] == [17, 17]
    assert s["erf"]["geometry"] == "torus"          # every boundary is circular


def test_fail_on_rules_gate_on_what_exists(tmp_path):
    res = _runner().invoke(main, ["zoo:resnet-zeros", *DATA, "--only", "structure", "--out", str(tmp_path / "a"),
                                  "-q", "--fail-on", "band_width>0"])
    assert res.exit_code == 1, res.stderr
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert [c["status"] for c in s["checks"] if c["source"] == "rule"] == ["fail"]
    res = _runner().invoke(main, ["zoo:resnet-zeros", *DATA, "--only", "structure", "--out", str(tmp_path / "b"),
                                  "-q", "--fail-on", "median_r<0.8"])
    one_line_error(res.exit_code, res.stderr, "--fail-on median_r<0.8", "--only structure", stdout=res.stdout)
    assert not (tmp_path / "b").exists()


def test_only_is_checked():
    with pytest.raises(AuditError, match="--only must be one of structure"):
        AuditConfig(model="zoo:resnet-zeros", only="machines")


def test_a_zero_output_and_a_contradicted_field_are_reported():
    summary = {"structure": {"verdict": ["equivariant"], "partial": False, "trace": {"output_abs_max": 0.0},
                             "field_probe": {"agrees": False, "pixels": {
                                 "centre": {"pixel": [8, 8], "inside": False, "support": {"H": [0, 15]},
                                            "predicted": {"H": [7, 9]}},
                                 "edge": {"pixel": [8, 0], "inside": True}}}}}
    checks = {c.name: c for c in builtin_checks(summary)}
    assert checks["field_probe"].status == "fail" and "centre pixel (8, 8)" in checks["field_probe"].message
    assert checks["output_nonzero"].status == "warn" and "identically zero" in checks["output_nonzero"].message
    # a zero gradient everywhere: the probe checked nothing, which is said, not passed
    nothing = {"pixel": [0, 0], "inside": True, "support": {"H": [-1, -1], "W": [-1, -1]}, "predicted": {}}
    summary["structure"]["field_probe"] = {"agrees": True, "pixels": {"centre": nothing, "corner": nothing}}
    checks = {c.name: c for c in builtin_checks(summary)}
    assert checks["field_probe"].status == "warn" and "checked nothing" in checks["field_probe"].message


def test_class_conditional_dit_structure_only(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    net = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                          num_layers=1, sample_size=32, patch_size=4, num_embeds_ada_norm=10,
                                          norm_num_groups=1)
    net.save_pretrained(tmp_path / "dit")
    base = [str(tmp_path / "dit"), *DATA]
    res = _runner().invoke(main, [*base, "--out", str(tmp_path / "a"), "-q"])
    one_line_error(res.exit_code, res.stderr, "needs a class label and none was given", "--conditional",
                   stdout=res.stdout)
    res = _runner().invoke(main, [*base, "--conditional", "--only", "structure", "--out", str(tmp_path / "b"), "-q"])
    assert res.exit_code == 0, res.stderr
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    st = s["structure"]
    assert st["verdict"] == ["period-4", "non-local"] and not st["partial"]
    assert {b["kind"] for b in st["breakers"]} >= {"position-embedding", "global-op", "stride"}
    assert [(a["size"], a["scale"]) for a in st["theoretical_rf"]["axes"]] == [(4, "1"), (4, "1")]
    assert st["field_probe"]["agrees"]
    assert s["denoiser"]["label_effect"] > 0


def test_structure_only_in_python():
    r = run_audit(AuditConfig(model="zoo:resnet-circular", data="mnist5k:size=32:limit=40", steps=2, threads=1,
                              only="structure"))
    assert r.scope == "structure" and r.prediction is None and r.exit_code == 0
    assert r.to_dict()["structure"]["verdict"] == ["equivariant"]


def test_a_field_probe_that_cannot_run_keeps_the_verdict(tmp_path):
    # the output is detached from the input: no gradient to check, the verdict still stands
    (tmp_path / "mine.py").write_text(
        "import torch.nn as nn\n"
        "class Detached(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.c = nn.Conv2d(1, 1, 3, padding=1, padding_mode='circular')\n"
        "    def forward(self, x, t):\n"
        "        return self.c(x).detach()\n")
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("mine_detached", tmp_path / "mine.py")
    mod = module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.save(mod.Detached().state_dict(), tmp_path / "w.pt")
    out = tmp_path / "rep"
    res = _runner().invoke(main, [str(tmp_path / "w.pt"), "--arch", f"{tmp_path / 'mine.py'}:Detached", *DATA,
                                  "--only", "structure", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["structure"]["verdict"] == ["equivariant"] and "error" in s["structure"]["field_probe"]
    status = {c["name"]: c["status"] for c in s["checks"]}
    assert status["field_probe"] == "warn" and status["erf_measured"] == "warn"
