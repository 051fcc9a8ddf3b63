"""The pipeline end to end on the zoo models (tiny settings), and its pure parts."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from els_audit.audit import AuditConfig, AuditError, choose_machine, model_name, parse_scales, run_audit
from els_audit.models.zoo.catalog import zoo_model_path

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "els_audit" / "summary_schema.json").read_text())
# tiny but real: 100 MNIST digits (copy test), 50 of them in the dictionary, 4 steps, 3 seeds
TINY = dict(data="mnist5k:size=32:limit=100", data_limit=50, steps=4, seeds=3, calibration_seeds=1, threads=1)


@pytest.fixture(scope="module")
def runs():
    return {
        "resnet-zeros": run_audit(AuditConfig(model="zoo:resnet-zeros", **TINY)),
        "resnet-circular": run_audit(AuditConfig(model="zoo:resnet-circular", compare_criteria=True, **TINY)),
        # NB: scales from the ERF probe (no calibration) keep this one fast; the verdict is what is tested
        "unet-attention": run_audit(AuditConfig(model="zoo:unet-attention", scales="erf", **TINY)),
    }


def test_machine_follows_the_verdict(runs):
    z, c, a = runs["resnet-zeros"], runs["resnet-circular"], runs["unet-attention"]
    assert z.choice.kind == "bbELS" and "boundary-broken" in z.structure["verdict"]
    assert c.choice.kind == "ELS" and c.structure["verdict"] == ["equivariant"] and c.choice.dictionary == "periodic"
    assert a.structure["verdict"] == ["boundary-broken", "period-4", "non-local"]
    assert any("global ops" in cav for cav in a.choice.caveats)
    assert {ch.name: ch.status for ch in a.checks}["locality"] == "warn"
    assert {ch.name: ch.status for ch in z.checks}["locality"] == "pass"
    # the paper's ResNet: 1 + 2 * (6 + 2) = 17 px field
    assert [ax["size"] for ax in z.receptive_field["axes"]] == [17, 17]


def test_fitted_machine_beats_memorization_on_conv_models(runs):
    for name in ("resnet-zeros", "resnet-circular"):
        p = runs[name].prediction
        assert p.median_r > p.is_median_r, name
        assert p.win_rate >= 2 / 3, name


def test_scales_bookkeeping(runs):
    z = runs["resnet-zeros"]
    assert len(z.scales) == TINY["steps"]
    assert z.calibration is not None and z.calibration.scales == z.scales == z.prediction.scales
    # the ERF lists sampler order (t = 1 first); scales put the least noise first
    assert z.scales_predicted == tuple(reversed(z.erf.predicted_patch))
    # auto: every candidate lies within +-2 of the ERF prediction (spread 1), odd
    for j, k in enumerate(z.scales):
        assert k % 2 == 1 and abs(k - z.scales_predicted[j]) <= 2
    a = runs["unet-attention"]
    assert a.calibration is None and a.scales == a.scales_predicted
    c = runs["resnet-circular"]
    assert c.calibration.criterion == "x0" and c.calibration_other.criterion == "cosine"
    assert c.scales == c.calibration.scales                      # the other criterion is only reported
    assert c.to_dict()["machine"]["calibration_other"]["scales"] == list(c.calibration_other.scales)
    assert z.calibration_other is None


def test_schema_is_valid_and_shipped():
    from els_audit.outputs import summary_schema

    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert summary_schema() == SCHEMA


def test_summary_validates_and_is_strict_json(runs):
    for r in runs.values():
        d = r.to_dict()
        text = json.dumps(d, allow_nan=False)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert d["prediction"]["seeds"][0]["seed"] == 0 and len(d["prediction"]["seeds"]) == TINY["seeds"]
        assert d["config"]["data_limit"] == 50 and d["machine"]["n_dictionary_images"] == 50
        assert d["data"]["N"] == 100
        assert d["model"]["sha256"] and len(d["model"]["sha256"]) == 64
        assert {b["kind"] for b in d["structure"]["breakers"]} <= {"boundary", "stride", "global-op"}
        assert d["exit_code"] == 0
    bad = dict(runs["resnet-zeros"].to_dict())
    bad["machine"] = dict(bad["machine"], kind="XYZ")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)


def test_arrays_line_up(runs):
    r = runs["resnet-zeros"]
    arr = r.arrays()
    B = TINY["seeds"]
    assert arr["network"].shape == arr["machine"].shape == arr["is"].shape == (B, 1, 32, 32)
    assert arr["seeds"].tolist() == [0, 1, 2]
    assert arr["mosaic_source_image"].shape == (B, 32, 32)
    assert arr["mosaic_source_image"].max() < 50          # indexes the 50-image dictionary
    assert arr["nearest_training_images"].shape == (B, 1, 32, 32)
    # the nearest image really is the nearest of the 100 (brute force)
    from els_audit.data import load_dataset

    full = load_dataset(TINY["data"]).images.numpy().reshape(100, -1).astype(np.float64)
    d = np.linalg.norm(arr["network"].reshape(B, 1, -1).astype(np.float64) - full[None], axis=2)   # (B, 100)
    assert arr["nearest_index"].tolist() == d.argmin(1).tolist()


def test_fail_on_rules_set_the_exit_code(runs):
    from dataclasses import replace

    from els_audit.checks import evaluate_rules, exit_code, parse_rule

    core = runs["resnet-zeros"].summary_core()
    assert exit_code(evaluate_rules([parse_rule("median_r<2")], core)) == 1    # r <= 1 always
    assert exit_code(evaluate_rules([parse_rule("median_r<-2")], core)) == 0
    cfg = replace(runs["resnet-zeros"].config, fail_on=("memorized_fraction>=0",))
    assert cfg.rules[0].path == "novelty.memorized_fraction"


@pytest.mark.parametrize("structure,kind", [
    ({"verdict": ["equivariant"], "breakers": [], "partial": False, "period_all": 1}, "ELS"),
    ({"verdict": ["boundary-broken"], "breakers": [{"kind": "boundary"}], "partial": False, "band_width": 3}, "bbELS"),
    ({"verdict": ["boundary-broken", "period-4"], "breakers": [{"kind": "boundary"}, {"kind": "stride"}],
      "partial": False, "period_all": 4}, "bbELS"),
    ({"verdict": ["boundary-broken"], "breakers": [{"kind": "position-embedding"}], "partial": False}, "LS"),
    ({"verdict": ["equivariant"], "breakers": [], "partial": True}, "LS"),
    ({"error": "TraceError: x"}, "LS"),
    (None, "LS"),
])
def test_choose_machine_rules(structure, kind):
    c = choose_machine(structure)
    assert c.kind == kind and not c.forced and c.reason
    assert (c.dictionary == "periodic") == (kind == "ELS")


def test_choose_machine_override_and_caveats():
    s = {"verdict": ["boundary-broken", "period-4"], "breakers": [{"kind": "boundary"}], "partial": False,
         "period_all": 4}
    c = choose_machine(s, "ELS", "valid")
    assert c.kind == "ELS" and c.forced and c.dictionary == "valid" and "bbELS" in c.reason
    assert any("multiples of 4" in cav for cav in c.caveats)
    with pytest.raises(AuditError):
        choose_machine(s, "IS")


def test_parse_scales_and_model_name(tmp_path):
    assert parse_scales("auto") == "auto" and parse_scales("erf") == "erf"
    assert parse_scales("3, 3,5") == (3, 3, 5)
    with pytest.raises(AuditError):
        parse_scales("three")
    assert model_name("zoo:resnet-zeros") == "resnet-zeros"
    assert model_name("/a/b/my model.safetensors") == "my_model"
    assert model_name("../<x>.pt") == "x"     # "<x>" -> "_x_", edges stripped
    (tmp_path / "dir.model").mkdir()
    assert model_name(str(tmp_path / "dir.model")) == "dir.model"


@pytest.mark.parametrize("kw,msg", [
    (dict(steps=0), "steps"),
    (dict(scales=(3, 5)), "one per step"),
    (dict(scales=(3, 4, 5, 7)), "odd"),
    (dict(machine="IS"), "machine"),
    (dict(criterion="l2"), "criterion"),
    (dict(fail_on=("median_r<<1",)), "cannot parse"),
    (dict(data_limit=2), "--data-limit"),
    (dict(memorized_threshold=0), "--memorized-threshold"),
    (dict(steps=1001), "--steps must be an integer from 1 to 1000"),
    (dict(calibration_seeds=5000), "--calibration-seeds"),
    (dict(spread=999), "--spread"),
    (dict(threads=100_000), "--threads must be an integer from 1 to"),
    (dict(label=-1), "--label"),
    (dict(seed_offset=-1), "--seed-offset"),
    (dict(model=" "), "no model"),
])
def test_config_refuses_bad_input(kw, msg):
    args = dict(model="zoo:resnet-zeros", steps=4)
    args.update(kw)
    with pytest.raises(ValueError, match=msg) as e:
        AuditConfig(**args)
    assert "\n" not in str(e.value)


def test_no_data_named_is_a_clear_error(tmp_path):
    # weights without their zoo config: the architecture is given, the data is not
    p = tmp_path / "net.safetensors"
    shutil.copy(zoo_model_path("resnet-zeros"), p)
    with pytest.raises(AuditError, match="--data"):
        run_audit(AuditConfig(model=str(p), arch="PaperResNet", steps=2, seeds=1))


def test_unknown_label_is_a_clear_error():
    with pytest.raises(AuditError, match="no training image has that label"):
        run_audit(AuditConfig(model="zoo:resnet-zeros", data="mnist5k:size=32:limit=20", label=11, steps=2, seeds=1))


def test_a_bug_in_the_analysis_stops_the_audit_instead_of_falling_back_to_ls(monkeypatch):
    # only a network the tracers cannot follow is audited without structure; an error in our
    # own rules must surface, not pass for an architecture that calls for the LS machine
    import els_audit.probes as probes

    def buggy(*a, **k):
        raise RuntimeError("receptive-field rule 'conv' failed on node conv1 (test)")

    monkeypatch.setattr(probes, "receptive_field", buggy)
    with pytest.raises(RuntimeError, match="failed on node conv1"):
        run_audit(AuditConfig(model="zoo:resnet-zeros", data="mnist5k:size=32:limit=40", data_limit=20, steps=2,
                              seeds=2, scales="erf", threads=1))


def test_untraceable_network_gets_ls_and_a_warning(monkeypatch):
    import els_audit.probes as trace

    def refuse(*a, **k):
        raise trace.TraceError("both tracers failed (test)")

    monkeypatch.setattr(trace, "trace_model", refuse)
    r = run_audit(AuditConfig(model="zoo:resnet-zeros", data="mnist5k:size=32:limit=40", data_limit=20, steps=2,
                              seeds=2, scales="erf", threads=1))
    assert r.choice.kind == "LS" and "unknown" in r.choice.reason
    d = r.to_dict()
    assert d["structure"]["verdict"] == ["unknown"] and "both tracers failed" in d["structure"]["error"]
    jsonschema.validate(d, SCHEMA)
    assert {c.name: c.status for c in r.checks}["structure_traced"] == "warn"
    assert r.exit_code == 0
    from els_audit.report import render_html

    assert "could not be traced" in render_html(r)


def test_conditional_uses_per_label_dictionaries(tmp_path):
    # a zoo ResNet that takes (and ignores) a label: the audit must still keep every seed's
    # machine inside its own class, which the mosaic's source images show
    from els_audit.data import balanced_subset_indices, load_dataset
    from els_audit.models.zoo.architectures import PaperResNet

    class TakesLabel(PaperResNet):
        def forward(self, x, t, label=None):
            return super().forward(x, t, None)

    p = tmp_path / "cond.safetensors"
    shutil.copy(zoo_model_path("resnet-zeros"), p)
    spec = "mnist5k:size=32:limit=100"
    r = run_audit(AuditConfig(model=str(p), arch=TakesLabel, data=spec, data_limit=50, steps=2, seeds=3,
                              conditional=True, scales=(3, 5), threads=1))
    assert r.prediction.labels == (0, 1, 2)                   # seed i gets label i mod 10
    assert [s["label"] for s in r.to_dict()["prediction"]["seeds"]] == [0, 1, 2]
    full = load_dataset(spec)
    dict_labels = full.labels[balanced_subset_indices(full.labels, len(full), 50, 0)].numpy()     # (50,)
    src = r.prediction.diagnostics["source_image"]                                               # (3, H, W)
    for i, lab in enumerate((0, 1, 2)):
        assert set(dict_labels[src[i]].ravel().tolist()) == {lab}
    assert r.to_dict()["data"]["dictionary"]["conditional"] is True


class _OracleIS01:
    """Builds a 'network' that is the exact ideal-score denoiser of its own training images
    kept in [0, 1] (a buffer, so it travels in a safetensors file)."""

    def __new__(cls, n=40):
        import torch

        from els_audit.machines import build_machine

        class OracleIS01(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("images", torch.zeros(n, 1, 32, 32))

            def forward(self, x, t):
                return build_machine("IS", self.images, schedule="cosine-legacy").eps(x, t)

        return OracleIS01()


def test_model_in_another_data_range(tmp_path):
    # the oracle lives in [0, 1]; the audit must run the whole process in that range, so its
    # IS machine (same 40 images, mapped to [0, 1]) reproduces the oracle's samples exactly
    # and every sample is a copy of a training image
    from safetensors.torch import save_file

    from els_audit.data import load_dataset

    spec = "mnist5k:size=32:limit=40"
    imgs01 = (load_dataset(spec).images + 1) / 2                                   # (40, 1, 32, 32) in [0, 1]
    p = tmp_path / "oracle.safetensors"
    save_file({"images": imgs01.contiguous()}, str(p))
    r = run_audit(AuditConfig(model=str(p), arch=_OracleIS01, data_range="0,1", data=spec, data_limit=None,
                              steps=3, seeds=2, scales=(3, 3, 3), machine="LS", threads=1))
    assert r.denoiser["data_range"] == [0.0, 1.0]
    assert r.prediction.is_median_r > 0.999
    assert float(np.abs(r.prediction.is_samples - r.prediction.network).max()) < 1e-3
    assert r.novelty.memorized_fraction == 1.0
    assert r.prediction.network.min() > -0.05                # samples in the model's [0, 1] range
    assert any("data range" in w for w in r.warnings)


def test_calibrate_mode_tries_every_odd_k():
    r = run_audit(AuditConfig(model="zoo:resnet-circular", data="mnist5k:size=32:limit=20", data_limit=10, steps=2,
                              seeds=2, calibration_seeds=1, scales="calibrate", criterion="cosine", threads=1))
    assert r.calibration.candidates == tuple(range(3, 32, 2))          # 3, 5, ..., 31 for 32 x 32
    assert r.calibration.criterion == "cosine" and "every odd k" in r.scales_source
    v = r.calibration.values                                          # (2, 15), cosine: higher is better
    assert not np.isnan(v).any()
    # the chosen k is the best candidate at each step (one seed: its own vote)
    assert [r.calibration.candidates[int(np.argmax(v[j]))] for j in range(2)] == list(r.scales)
