"""The plan stage inside a real audit: settings chosen within the budget, given ones kept,
the plan and its predicted-against-measured seconds in the summary."""

import json
from pathlib import Path

import pytest

from els_audit.audit import AuditConfig, AuditError, run_audit
from els_audit.config import parse_bytes, parse_duration

jsonschema = pytest.importorskip("jsonschema")
SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "els_audit" / "summary_schema.json").read_text())


def test_an_audit_plans_the_settings_left_open_and_reports_the_plan():
    lines = []
    r = run_audit(AuditConfig(model="zoo:resnet-zeros", data="mnist5k:size=32:limit=60", seeds=2,
                              calibration_seeds=1, budget=600, threads=1), progress=lines.append)
    d = r.to_dict()
    jsonschema.validate(d, SCHEMA)
    plan = d["plan"]
    # 60 images and 2 seeds fit 10 minutes easily: the whole set and the paper's 20 steps
    assert plan["planned"] == ["data_limit", "steps"] and plan["given"] == ["calibration_seeds", "seeds"]
    assert plan["settings"] == {"n_dictionary": 60, "steps": 20, "calibration_seeds": 1, "seeds": 2}
    assert d["config"]["data_limit"] == 0 and d["config"]["steps"] == 20 and d["config"]["budget"] == 600
    assert d["machine"]["n_dictionary_images"] == 60 and len(d["machine"]["scales"]) == 20
    assert len(d["erf"]["times"]) == 20 and d["prediction"]["steps"] == 20
    for stage in ("calibrate", "predict", "novelty"):
        st = plan["stages"][stage]
        assert st["predicted_s"] >= 0 and st["measured_s"] == pytest.approx(d["timings"][stage], abs=0.01)
    assert plan["stages"]["calibrate"]["predicted_s"] > 0 and plan["stages"]["predict"]["predicted_s"] > 0
    assert plan["fits"] and 2 * plan["probe"]["n_small"] <= plan["probe"]["n_probe"] <= 60 and d["timings"]["plan"] > 0
    assert any("plan: dictionary 60 of 60 images, 20 steps" in line for line in lines)
    assert any("predict: predicted" in line for line in lines)


def test_a_coarser_plan_reads_the_erf_at_its_own_times():
    # every setting given but none of them the ladder's: no probe, and the ERF on the given grid
    r = run_audit(AuditConfig(model="zoo:resnet-circular", data="mnist5k:size=32:limit=40", data_limit=20, steps=5,
                              seeds=2, calibration_seeds=1, scales="erf", threads=1))
    d = r.to_dict()
    assert d["plan"]["probe"] is None and d["plan"]["planned"] == []
    assert len(d["erf"]["times"]) == 5 and d["machine"]["scales"] == d["machine"]["scales_predicted"]
    assert d["plan"]["cuts"] == ["dictionary 20 of 40 training images (as given)", "steps 5 of 20 (as given)",
                                 "calibration seeds 1 of 8 (as given)", "seeds 2 of 100 (as given)"]


@pytest.mark.parametrize("text,seconds", [("90s", 90.0), ("10m", 600.0), ("1.5h", 5400.0), ("600", 600.0),
                                          ("none", None), (" 2M ", 120.0)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "-5m", "0", "ten minutes", "nanm", "infs"])
def test_parse_duration_refuses_what_is_not_a_duration(text):
    with pytest.raises(AuditError, match="--budget .* is not a duration; write e.g. 90s"):
        parse_duration(text)


def test_config_refuses_a_bad_budget_and_a_two_image_dictionary():
    with pytest.raises(AuditError, match="--budget must be a positive number"):
        AuditConfig(model="zoo:resnet-zeros", budget=0)
    with pytest.raises(AuditError, match="--data-limit must be 0 .* or at least 3"):
        AuditConfig(model="zoo:resnet-zeros", data_limit=2)


def test_a_conditional_audit_probes_one_class_and_plans():
    # the probe's dictionaries are class-balanced and a query meets its own class's images
    r = run_audit(AuditConfig(model="zoo:resnet-zeros", data="mnist5k:size=32:limit=60", label=3, seeds=2,
                              calibration_seeds=1, scales="erf", budget=60, threads=1))
    plan = r.to_dict()["plan"]
    assert plan["planned"] == ["data_limit", "steps"] and plan["settings"]["n_dictionary"] == 60
    probe = plan["probe"]
    assert probe["n_small"] == 2 and probe["n_probe"] >= 4 * probe["n_small"] // 2   # images of class 3 met
    assert plan["stages"]["calibrate"]["predicted_s"] == 0.0 and plan["stages"]["predict"]["predicted_s"] > 0


@pytest.mark.parametrize("text,want", [("2G", 2 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("3000000000", 3_000_000_000),
                                       ("64mb", 64 << 20)])
def test_parse_bytes_reads_sizes(text, want):
    assert parse_bytes(text) == want


@pytest.mark.parametrize("text", ["", "G", "-1G", "10", "lots", "nanG", "1K"])
def test_parse_bytes_refuses_what_is_not_a_size_of_a_megabyte_or_more(text):
    with pytest.raises(AuditError, match="--memory-budget .* is not a size of at least 1M"):
        parse_bytes(text)


def test_config_refuses_a_bad_memory_budget_or_ray_address():
    with pytest.raises(AuditError, match="--memory-budget must be at least 1M"):
        AuditConfig(model="zoo:resnet-zeros", memory_budget=1000)
    with pytest.raises(AuditError, match="--ray must be 'auto' or a Ray cluster address"):
        AuditConfig(model="zoo:resnet-zeros", ray=" ")
