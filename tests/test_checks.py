"""Checks and --fail-on rules: parsing (no eval), evaluation, the TOML rules file."""

import math

import pytest

from els_audit.checks import (METRICS, Check, RuleError, builtin_checks, evaluate_rules, exit_code, load_rules,
                              lookup, parse_rule)


def _summary(**over):
    s = {
        "prediction": {"median_r": 0.75, "median_r2": 0.5, "is_median_r": 0.4, "win_rate": 0.875},
        "novelty": {"memorized_fraction": 0.125, "memorization": {"baseline": {"memorized_fraction": 0.0}}},
        "structure": {"verdict": ["boundary-broken"], "partial": False, "band_width": 8, "period_all": 1},
        "denoiser": {"sanity": {"ratio": 0.03, "threshold": 0.8, "passed": True}, "warnings": []},
    }
    for k, v in over.items():
        s[k] = v
    return s


def test_parse_rule_forms():
    r = parse_rule("memorized_fraction>0.05")
    assert (r.metric, r.path, r.op, r.threshold) == ("memorized_fraction", "novelty.memorized_fraction", ">", 0.05)
    r = parse_rule("  median_r <= 8e-1 ")
    assert (r.op, r.threshold, r.text) == ("<=", 0.8, "median_r <= 8e-1")
    r = parse_rule("prediction.is_median_r!=.5")
    assert (r.path, r.op, r.threshold) == ("prediction.is_median_r", "!=", 0.5)
    assert set(METRICS) >= {"median_r", "memorized_fraction", "win_rate", "median_r2", "is_median_r"}


@pytest.mark.parametrize("bad", ["median_r<<0.8", "median_r", "0.8>median_r", "__import__('os')>1",
                                 "median_r<0.8; rm -rf /", "median_r<nan", "median_r<inf", "nosuch<1", ""])
def test_parse_rule_refuses_anything_else(bad):
    with pytest.raises(RuleError) as e:
        parse_rule(bad)
    assert "\n" not in str(e.value)


def test_evaluate_rules_hand_values():
    s = _summary()
    rules = [parse_rule(t) for t in ("memorized_fraction>0.05", "median_r<0.8", "median_r<0.7", "win_rate>=0.875",
                                     "median_r==0.75")]
    got = evaluate_rules(rules, s)
    # 0.125 > 0.05 -> fail; 0.75 < 0.8 -> fail; 0.75 < 0.7 false -> pass; 0.875 >= 0.875 -> fail; == -> fail
    assert [c.status for c in got] == ["fail", "fail", "pass", "fail", "fail"]
    assert got[0].value == 0.125 and got[0].threshold == 0.05 and got[0].source == "rule"
    assert exit_code(got) == 1
    assert exit_code(got[2:3]) == 0


def test_missing_or_undefined_metric_fails():
    s = _summary(prediction={"median_r": None})
    got = evaluate_rules([parse_rule("median_r<0.8"), parse_rule("prediction.nothing>1")], s)
    assert [c.status for c in got] == ["fail", "fail"]
    assert "undefined" in got[0].message and "not in the summary" in got[1].message
    s = _summary(prediction={"median_r": float("nan")})
    assert evaluate_rules([parse_rule("median_r<0.8")], s)[0].status == "fail"


def test_lookup():
    assert lookup({"a": {"b": 3}}, "a.b") == 3
    assert lookup({"a": {"b": None}}, "a.b") is None
    assert lookup({"a": 1}, "a.b") is not None  # the missing sentinel, not a value
    assert lookup({"a": 1}, "a.b") is lookup({}, "x")


def test_load_rules(tmp_path):
    p = tmp_path / "rules.toml"
    p.write_text('fail_on = ["memorized_fraction>0.05", "median_r < 0.8"]\n')
    rules = load_rules(p)
    assert [r.text for r in rules] == ["memorized_fraction>0.05", "median_r < 0.8"]
    p.write_text("fail_on = 3\n")
    with pytest.raises(RuleError, match="list of strings"):
        load_rules(p)
    p.write_text("fail_on = [\n")
    with pytest.raises(RuleError, match="not valid TOML"):
        load_rules(p)
    p.write_text('fail_on = []\nextra = 1\n')
    with pytest.raises(RuleError, match="unknown key"):
        load_rules(p)
    with pytest.raises(RuleError, match="cannot read"):
        load_rules(tmp_path / "absent.toml")


def test_builtin_checks_warn_never_fail():
    s = _summary()
    got = {c.name: c for c in builtin_checks(s)}
    assert got["denoiser_sanity"].status == "pass"
    assert got["machine_beats_memorization"].status == "pass"     # 0.75 > 0.4
    assert got["memorization"].status == "warn"                   # 0.125 > baseline 0.0
    assert got["locality"].status == "pass"
    bad = _summary(prediction={"median_r": 0.3, "is_median_r": 0.4},
                   structure={"verdict": ["boundary-broken", "period-4", "non-local"], "partial": True,
                              "unsupported_ops": [["n", "t", "why"]]})
    got = {c.name: c for c in builtin_checks(bad)}
    assert got["machine_beats_memorization"].status == "warn"
    assert got["locality"].status == "warn" and got["structure_complete"].status == "warn"
    assert all(c.status != "fail" for c in got.values())
    assert exit_code(list(got.values())) == 0
    traced = {c.name: c for c in builtin_checks(_summary(structure={"error": "TraceError: boom"}))}
    assert traced["structure_traced"].status == "warn"


def test_check_to_dict_and_status():
    c = Check("x", "warn", float("nan"), 1.0, "m")
    assert c.to_dict() == {"name": "x", "status": "warn", "value": None, "threshold": 1.0, "message": "m",
                           "source": "builtin"}
    with pytest.raises(ValueError):
        Check("x", "ok", 1, None, "m")
    assert math.isclose(parse_rule("median_r<-1.5").threshold, -1.5)


def _names(summary, status):
    return {c.name for c in builtin_checks(summary) if c.status == status}


def test_machine_that_explains_almost_nothing_warns():
    # r = 0.07 (an untrained model's audit): r^2 ~ 0.005, far below every zoo model (>= 0.52)
    assert "machine_explains_network" in _names(_summary(prediction={"median_r": 0.07, "is_median_r": 0.05}), "warn")
    assert "machine_explains_network" in _names(_summary(), "pass")                      # 0.75
    assert "machine_explains_network" in _names(_summary(prediction={"median_r": 0.3, "is_median_r": 0.1}), "pass")


def test_what_the_audit_was_given_is_checked():
    ok = _summary(config={"data": "mnist5k", "conditional": False, "label": None},
                  data={"spec": "mnist5k", "N": 5000, "H": 32, "W": 32, "label_counts": {"0": 500, "1": 500}})
    assert {"data_size", "image_size"} <= _names(ok, "pass") and not _names(ok, "warn") & {"data_named"}
    empty = _summary(config={"data": "  ", "conditional": False},
                     data={"spec": "mnist5k:size=32", "N": 5000, "H": 32, "W": 32})
    assert "data_named" in _names(empty, "warn")
    tiny = _summary(config={"data": "x.npz"}, data={"spec": "x.npz", "N": 3, "H": 7, "W": 7})
    assert {"data_size", "image_size"} <= _names(tiny, "warn")
    msgs = {c.name: c.message for c in builtin_checks(tiny)}
    assert "at least 100" in msgs["data_size"] and "16x16 or larger" in msgs["image_size"]
    # a conditional audit uses each class as a dictionary: a class of 4 images is too few
    cond = _summary(config={"data": "x.npz", "conditional": True},
                    data={"spec": "x.npz", "N": 1000, "H": 32, "W": 32, "label_counts": {"0": 996, "1": 4}})
    assert "data_size" in _names(cond, "warn")
    assert "data_size" in _names(dict(cond, config={"data": "x.npz", "label": 0}), "pass")   # class 0 only


def test_a_label_the_model_ignores_warns():
    ignored = _summary(denoiser={"sanity": None, "warnings": [], "label_effect": 0.0})
    used = _summary(denoiser={"sanity": None, "warnings": [], "label_effect": 0.2})
    assert "label_used" in _names(ignored, "warn") and "label_used" in _names(used, "pass")
    assert "label_used" not in {c.name for c in builtin_checks(_summary())}       # unconditional: not asked
