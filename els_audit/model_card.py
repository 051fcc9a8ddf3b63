"""A Hugging Face model card from an audit: ``model-index`` metadata plus a Markdown section.

The Hub reads evaluation results from the YAML front matter of a model's ``README.md``, under
``model-index`` (one entry per model, with ``results``: a task, a dataset and metrics; the
spec is the Hub's ``modelcard.md``).  :func:`model_card` writes a whole card: that front
matter, with the audit's numbers as metrics (``verified: false``: they are the tool's
measurements, not the Hub's), and a section that answers a reviewer's four questions in
words (how local is the model, what breaks translation equivariance, how much of its output
locality explains, does it copy its training data), then the settings.

The card reads the summary only (``AuditResult.to_dict()``), as the report does.  The YAML
is written here rather than by a YAML library: the structure is fixed (mappings, lists,
strings, numbers) and every string is emitted as a double-quoted JSON string, which is a
valid YAML double-quoted scalar, so no value can change the document's structure.  A card
this tool wrote starts its section with :data:`CARD_MARKER`; the CLI replaces an existing
file only when it holds that marker.

To merge the metadata into an existing card instead, load both with
``huggingface_hub.ModelCard`` and copy ``eval_results`` across.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Optional

from .checks import metric_values

__all__ = ["model_card", "model_index", "CARD_MARKER", "to_yaml"]

#: the line that says a card file was written by els-audit (and may be replaced)
CARD_MARKER = "<!-- written by els-audit: the next audit with --model-card here replaces this file -->"


def _num(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


#: the metric names and what each means, in the card (the values: checks.metric_values)
_METRIC_NAMES = {
    "median_r": "median Pearson r, {kind} machine vs network (same seeds)",
    "median_r2": "median R^2 of the {kind} machine's samples against the network's",
    "is_median_r": "median Pearson r, ideal-score (memorising) machine vs network",
    "win_rate": "fraction of seeds where the {kind} machine beats the ideal-score machine",
    "memorized_fraction": "fraction of the network's samples that copy a training image",
}


def _metrics(s: dict) -> list[dict]:
    """The audit's numbers as model-index metrics (those that were measured and are finite)."""
    pred, nov = s.get("prediction") or {}, s.get("novelty") or {}
    kind = (s.get("machine") or {}).get("kind", "ELS")
    args = {"machine": kind, "dictionary_images": (s.get("machine") or {}).get("n_dictionary_images"),
            "steps": pred.get("steps"), "seeds": pred.get("n_seeds")}
    return [{"type": t, "name": _METRIC_NAMES[t].format(kind=kind), "value": round(v, 6),
             "args": args if t != "memorized_fraction" else {"threshold": _num(nov.get("threshold"))},
             "verified": False}
            for t, v in metric_values(s, tuple(_METRIC_NAMES)).items()]


def model_index(s: dict) -> Optional[list[dict]]:
    """The ``model-index`` entry of an audit summary, or None when it measured nothing (a
    structure-only audit)."""
    metrics = _metrics(s)
    if not metrics:
        return None
    data = s.get("data") or {}
    conditional = bool((s.get("config") or {}).get("conditional"))
    shape = "x".join(str(data.get(k)) for k in ("C", "H", "W"))
    return [{
        "name": s.get("name") or "model",
        "results": [{
            "task": {"type": "unconditional-image-generation" if not conditional else "image-generation",
                     "name": "locality audit (els-audit)"},
            "dataset": {"type": str(data.get("name") or "training-set"),
                        "name": f"{data.get('name') or 'training set'} ({data.get('N')} training images, {shape})",
                        "split": "train"},
            "metrics": metrics,
        }],
    }]


_PLAIN_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
#: words YAML 1.1 reads as booleans or null: such keys are quoted
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def to_yaml(value: Any, indent: int = 0) -> str:
    """Block YAML of mappings, lists, strings, numbers, booleans and None (strings quoted as
    JSON, which YAML reads as double-quoted scalars)."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return pad + "{}\n"
        out = []
        for k, v in value.items():
            key = str(k) if _PLAIN_KEY.fullmatch(str(k)) and str(k).lower() not in _YAML_WORDS else json.dumps(str(k))
            if isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{key}:\n" + to_yaml(v, indent + 2))
            else:
                out.append(f"{pad}{key}: {_scalar(v)}\n")
        return "".join(out)
    if isinstance(value, list):
        if not value:
            return pad + "[]\n"
        out = []
        for v in value:
            if isinstance(v, (dict, list)) and v:
                body = to_yaml(v, indent + 2)
                out.append(f"{pad}- " + body[indent + 2:])                  # first line after the dash
            else:
                out.append(f"{pad}- {_scalar(v)}\n")
        return "".join(out)
    return pad + _scalar(value) + "\n"


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if math.isfinite(v) else "null"
    if isinstance(v, (dict, list)):
        return "{}" if isinstance(v, dict) else "[]"
    return json.dumps(str(v))


def _fmt(v: Any, digits: int = 3) -> str:
    x = _num(v)
    return "n/a" if x is None else f"{x:.{digits}f}"


def _pct(v: Any) -> str:
    x = _num(v)
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _section(s: dict) -> str:
    st, pred, nov, mac = (s.get(k) or {} for k in ("structure", "prediction", "novelty", "machine"))
    rf = (st.get("theoretical_rf") or {}).get("summary", "not measured")
    breakers = st.get("breakers") or []
    kinds: dict[str, int] = {}
    for b in breakers:
        kinds[b.get("kind", "other")] = kinds.get(b.get("kind", "other"), 0) + 1
    broken = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none found"
    lines = [CARD_MARKER, "", "## Locality audit (els-audit)", ""]
    lines.append(f"- **How local is it?** Theoretical receptive field: {rf}."
                 + (f" Calibrated patch size per step (least noise first): {', '.join(map(str, mac['scales']))}."
                    if mac.get("scales") else ""))
    lines.append(f"- **What breaks translation equivariance?** Verdict `{st.get('verdict_line', 'n/a')}`; "
                 f"breaking operations by kind: {broken}.")
    if pred:
        lines.append(f"- **How much of its output does locality explain?** The fitted {mac.get('kind', '')} machine "
                     f"predicts the network's samples with median Pearson r {_fmt(pred.get('median_r'))} "
                     f"(R^2 {_fmt(pred.get('median_r2'))}) over {pred.get('n_seeds')} seeds; the memorising "
                     f"ideal-score machine reaches {_fmt(pred.get('is_median_r'))}; the local machine is closer "
                     f"on {_pct(pred.get('win_rate'))} of the seeds.")
    else:
        lines.append("- **How much of its output does locality explain?** Not measured (a structure-only audit).")
    if nov:
        lines.append(f"- **Does it copy its training data?** {_pct(nov.get('memorized_fraction'))} of its samples "
                     f"copy a training image (the nearest training image closer than {_fmt(nov.get('threshold'), 2)} "
                     f"times the distance to the second nearest).")
    else:
        lines.append("- **Does it copy its training data?** Not measured (a structure-only audit).")
    checks = s.get("checks") or []
    failed = [c["name"] for c in checks if c.get("status") == "fail"]
    warned = [c["name"] for c in checks if c.get("status") == "warn"]
    plan = (s.get("plan") or {}).get("settings") or {}
    data = s.get("data") or {}
    lines += ["", f"Checks: {len(checks) - len(failed) - len(warned)} pass, {len(warned)} warn, {len(failed)} fail"
              + (f" ({', '.join(failed)})" if failed else "") + f"; exit code {s.get('exit_code')}."]
    if plan:
        lines.append(f"Settings: dictionary {plan.get('n_dictionary')} of {data.get('N')} training images, "
                     f"{plan.get('steps')} steps, {plan.get('calibration_seeds')} calibration seeds, "
                     f"{plan.get('seeds')} seeds.")
    ver = (s.get("versions") or {}).get("els_audit")
    lines.append(f"Model sha256 `{(s.get('model') or {}).get('sha256', 'n/a')}`; els-audit {ver}. The metrics in the "
                 "metadata are this tool's measurements (`verified: false`).")
    return "\n".join(lines) + "\n"


def model_card(summary: dict) -> str:
    """The whole card (front matter + section) for an audit summary (``AuditResult.to_dict()``)."""
    meta: dict = {"tags": ["els-audit", "diffusion"]}
    idx = model_index(summary)
    if idx:
        meta["model-index"] = idx
    front = "---\n" + to_yaml(meta) + "---\n\n"
    return front + _section(summary)
