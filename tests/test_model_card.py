"""--model-card: Hugging Face model-index metadata plus a section in words, parsed back with
huggingface_hub (the Hub's own reader), written only where the tool may write."""

import json

import pytest
from cli_helpers import one_line_error
from cli_helpers import runner as _runner

from els_audit.cli import main
from els_audit.model_card import CARD_MARKER, model_card, to_yaml

huggingface_hub = pytest.importorskip("huggingface_hub")
yaml = pytest.importorskip("yaml")

TINY = ["--data", "mnist5k:size=32:limit=60", "--data-limit", "30", "--steps", "3", "--seeds", "2",
        "--calibration-seeds", "1", "--threads", "1", "--scales", "erf", "--quiet"]


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """One tiny audit written with --json and --model-card."""
    d = tmp_path_factory.mktemp("card")
    res = _runner().invoke(main, ["zoo:resnet-zeros", *TINY, "--out", str(d / "rep"), "--json", str(d / "s.json"),
                                  "--model-card", str(d / "README.md")])
    assert res.exit_code in (0, 1), res.stderr
    return d, json.loads((d / "s.json").read_text()), (d / "README.md").read_text()


def test_the_card_parses_as_the_hubs_metadata_with_the_audits_numbers(audited):
    _, summary, text = audited
    card = huggingface_hub.ModelCard(text)
    assert card.data.model_name == "resnet-zeros"
    got = {r.metric_type: r for r in card.data.eval_results}
    pred, nov = summary["prediction"], summary["novelty"]
    want = {"median_r": pred["median_r"], "median_r2": pred["median_r2"], "is_median_r": pred["is_median_r"],
            "win_rate": pred["win_rate"], "memorized_fraction": nov["memorized_fraction"]}
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].metric_value == pytest.approx(v, abs=1e-6), k
        assert got[k].verified is False
        assert got[k].task_type == "unconditional-image-generation"
        assert got[k].dataset_type == "mnist5k" and got[k].dataset_name == "mnist5k (60 training images, 1x32x32)"
    assert got["median_r"].metric_args == {"machine": "bbELS", "dictionary_images": 30, "steps": 3, "seeds": 2}
    # the section answers the four questions in words, with the same numbers
    assert CARD_MARKER in card.text
    for q in ("How local is it?", "What breaks translation equivariance?", "How much of its output",
              "Does it copy its training data?"):
        assert q in card.text
    assert f"median Pearson r {pred['median_r']:.3f}" in card.text
    assert summary["structure"]["verdict_line"] in card.text
    # the round trip through the Hub's writer keeps the metadata
    again = huggingface_hub.ModelCard(str(card))
    assert [r.metric_value for r in again.data.eval_results] == [r.metric_value for r in card.data.eval_results]


def test_a_card_is_replaced_but_nothing_else_is(audited, tmp_path):
    d, _, text = audited
    mine = tmp_path / "README.md"
    mine.write_text("# my model\n\nhand-written card\n")
    res = _runner().invoke(main, ["zoo:resnet-zeros", "--out", str(tmp_path / "rep"), "--model-card", str(mine)])
    one_line_error(res.exit_code, res.stderr, "--model-card", "was not written by els-audit")
    assert mine.read_text() == "# my model\n\nhand-written card\n"
    assert not (tmp_path / "rep").exists()                                   # refused before any work
    for bad, needle in ((tmp_path, "is a folder"), (tmp_path / "rep2" / "README.md", "inside the report folder")):
        res = _runner().invoke(main, ["zoo:resnet-zeros", "--out", str(tmp_path / "rep2"), "--model-card", str(bad)])
        one_line_error(res.exit_code, res.stderr, needle)
    # a card this tool wrote is replaced by the next audit
    ours = tmp_path / "card.md"
    ours.write_text(text)
    res = _runner().invoke(main, ["zoo:resnet-zeros", *TINY, "--out", str(tmp_path / "rep3"), "--model-card", str(ours)])
    assert res.exit_code in (0, 1), res.stderr
    assert ours.read_text().startswith("---\n") and CARD_MARKER in ours.read_text()


@pytest.mark.parametrize("value", ["plain", 'quote " and \\ back', "colon: and # hash", "- dash", "new\nline",
                                   "{braces}", "yes", "null", "0.5", "", "ünïcode ✓"])
def test_yaml_strings_cannot_change_the_structure(value):
    doc = {"model-index": [{"name": value, "results": [{"task": {"type": value}, "metrics": [
        {"type": "x", "value": 0.25, "verified": False, "args": {"k": value, "n": None, value: 1}}]}]}],
        "tags": [value, "b"], "yes": 2, "on": [], "3d": {}}
    assert yaml.safe_load(to_yaml(doc)) == doc


def test_a_structure_only_audit_gives_a_card_without_metrics():
    s = {"name": "m", "structure": {"verdict_line": "period-2", "theoretical_rf": {"summary": "global"}, "breakers": [
        {"kind": "boundary"}, {"kind": "boundary"}, {"kind": "global-norm"}]}, "checks": [], "exit_code": 0}
    text = model_card(s)
    card = huggingface_hub.ModelCard(text)
    assert card.data.eval_results is None
    assert "2 boundary, 1 global-norm" in text and "Not measured (a structure-only audit)" in text
