"""Checks on an audit: built-in warnings and the user's ``--fail-on`` rules.

A rule states a FAILURE condition on one number of the summary, e.g.
``memorized_fraction>0.05`` (fail when more than 5 % of the samples are copies) or
``median_r<0.8`` (fail when the fitted machine predicts the network worse than r = 0.8).
Grammar (parsed by a regular expression, never evaluated as code)::

    RULE   := METRIC OP NUMBER
    METRIC := a short name from METRICS, or a dotted path into summary.json
              (e.g. ``prediction.is_median_r``)
    OP     := < | <= | > | >= | == | !=

A rule whose metric is missing or undefined (``null``/NaN) in the summary fails: a gate
must not pass on a number it could not see.

Rules can also come from a TOML file (for registries)::

    fail_on = ["memorized_fraction>0.05", "median_r<0.8"]

Statuses: ``pass``, ``warn`` (reported, exit code 0) and ``fail`` (exit code 1).  The
built-in checks only warn, except ``field_probe``: a gradient probe that contradicts the
theoretical receptive field fails the run.
"""

from __future__ import annotations

import math
import operator
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from .serialize import json_safe

__all__ = [
    "Check",
    "Rule",
    "RuleError",
    "METRICS",
    "HEADLINE_METRICS",
    "metric_values",
    "OPERATORS",
    "STATUSES",
    "parse_rule",
    "load_rules",
    "lookup",
    "evaluate_rules",
    "builtin_checks",
    "exit_code",
]

STATUSES = ("pass", "warn", "fail")

#: below this median r the fitted machine explains almost nothing of the network: r^2 < 0.09,
#: under a tenth of the variance of its samples.  Every zoo model is far above it (the lowest,
#: unet-attention at the default settings, 0.52) and so is every published ELS value (the lowest
#: 0.77, docs/theory.md section 4); an untrained network audits at about 0.07.
EXPLAINS_ALMOST_NOTHING = 0.3
#: fewer training images than this, and the machines can only recombine a handful of images:
#: locality cannot be told from copying (the audit's default dictionary takes 300)
MIN_IMAGES = 100
#: a class-conditional machine uses each class's images as its dictionary: fewer than this per class
MIN_PER_CLASS = 10
#: images smaller than this: the paper's calibrated patch sizes reach 15-27 px at high noise, so
#: every candidate window would see (nearly) the whole image and the scales resolve nothing
MIN_SIDE = 16
#: a conditional model whose output moves less than this (relative) when only the label changes
#: ignores its label
LABEL_EFFECT_FLOOR = 1e-6

#: short metric names -> dotted path in summary.json
METRICS: dict[str, str] = {
    "median_r": "prediction.median_r",
    "median_r2": "prediction.median_r2",
    "is_median_r": "prediction.is_median_r",
    "is_median_r2": "prediction.is_median_r2",
    "win_rate": "prediction.win_rate",
    "memorized_fraction": "novelty.memorized_fraction",
    "baseline_memorized_fraction": "novelty.memorization.baseline.memorized_fraction",
    "median_novel_fraction": "novelty.locality.median_novel_fraction",
    "median_n_sources": "novelty.mosaic.median_n_sources",
    "median_seam_fraction": "novelty.mosaic.median_seam_fraction",
    "band_width": "structure.band_width",
    "period": "structure.period_all",
    "sanity_ratio": "denoiser.sanity.ratio",
}

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
    "<": operator.lt, ">": operator.gt,
}

_RULE_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*(<=|>=|==|!=|<|>)\s*"
                      r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


class RuleError(ValueError):
    """A --fail-on rule that cannot be parsed; the message is one line."""


@dataclass(frozen=True)
class Check:
    """One check's outcome.

    Attributes:
        name: the check's name (for a rule: its text).
        status: ``pass``, ``warn`` or ``fail``.
        value: the measured value (a number, a bool, a string or ``None``).
        threshold: the threshold it was compared with, or ``None``.
        message: one line saying what it means.
        source: ``"builtin"`` or ``"rule"``.
    """

    name: str
    status: str
    value: Any
    threshold: Any
    message: str
    source: str = "builtin"

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check status must be one of {STATUSES}; got {self.status!r}")

    def to_dict(self) -> dict:
        return json_safe({"name": self.name, "status": self.status, "value": self.value,
                          "threshold": self.threshold, "message": self.message, "source": self.source})


@dataclass(frozen=True)
class Rule:
    """A parsed ``--fail-on`` rule: fail when ``summary[path] OP threshold``."""

    text: str
    metric: str
    path: str
    op: str
    threshold: float

    def to_dict(self) -> dict:
        return {"text": self.text, "metric": self.metric, "path": self.path, "op": self.op,
                "threshold": self.threshold}


def parse_rule(text: str) -> Rule:
    """Parse one rule like ``"memorized_fraction>0.05"``.

    Args:
        text: ``METRIC OP NUMBER`` (spaces allowed).
    Returns:
        :class:`Rule`.
    Raises:
        RuleError: not of that form, or an unknown short metric name.
    """
    if not isinstance(text, str):
        raise RuleError(f"a --fail-on rule must be a string like 'median_r<0.8'; got {type(text).__name__}")
    m = _RULE_RE.match(text)
    if m is None:
        raise RuleError(f"cannot parse --fail-on rule {text!r}; write METRIC OP NUMBER, e.g. 'median_r<0.8' "
                        f"(OP one of {' '.join(OPERATORS)})")
    metric, op, num = m.groups()
    if "." in metric:
        path = metric
    elif metric in METRICS:
        path = METRICS[metric]
    else:
        raise RuleError(f"unknown metric {metric!r} in --fail-on rule {text!r}; use one of "
                        f"{', '.join(sorted(METRICS))} or a dotted path into summary.json")
    value = float(num)
    if not math.isfinite(value):
        raise RuleError(f"the threshold of --fail-on rule {text!r} must be a finite number")
    return Rule(text=text.strip(), metric=metric, path=path, op=op, threshold=value)


def load_rules(path: Union[str, Path]) -> tuple[Rule, ...]:
    """Read ``fail_on = [...]`` from a TOML file.

    Raises:
        RuleError: unreadable file, bad TOML, a missing or mistyped ``fail_on``, a bad rule.
    """
    p = Path(path)
    if p.exists() and not p.is_file():
        raise RuleError(f"{p}: is not a regular file; give the rules file")
    try:
        data = tomllib.loads(p.read_text())
    except OSError as exc:
        raise RuleError(f"{p}: cannot read the rules file ({exc.strerror or exc}); check the path") from None
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(f"{p}: not valid TOML ({' '.join(str(exc).split())}); fix the file") from None
    except RecursionError:
        raise RuleError(f"{p}: the TOML is nested too deeply; fix the file") from None
    unknown = sorted(set(data) - {"fail_on"})
    if unknown:
        raise RuleError(f"{p}: unknown key(s) {', '.join(unknown)}; the rules file holds only fail_on = [...]")
    rules = data.get("fail_on")
    if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
        raise RuleError(f"{p}: needs fail_on = [\"median_r<0.8\", ...] (a list of strings)")
    return tuple(parse_rule(r) for r in rules)


_MISSING = object()


def lookup(summary: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` of a nested dict, or the module's missing-value sentinel
    (compare with ``lookup({}, "x")``) when a key is absent; ``None`` is a present value."""
    cur: Any = summary
    for part in path.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        else:
            return _MISSING
    return cur


#: the audit's headline numbers (what a registry or a model card records)
HEADLINE_METRICS = ("median_r", "median_r2", "is_median_r", "win_rate", "memorized_fraction")


def metric_values(summary: Mapping[str, Any], names: Sequence[str] = HEADLINE_METRICS) -> dict[str, float]:
    """``{name: value}`` of the named :data:`METRICS` that the summary holds as finite numbers."""
    out = {}
    for name in names:
        v = lookup(summary, METRICS[name])
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[name] = float(v)
    return out


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(float(v)):
        return float(v)
    return None


def evaluate_rules(rules: Sequence[Rule], summary: Mapping[str, Any]) -> tuple[Check, ...]:
    """Evaluate each rule against a summary dict.

    Returns:
        one :class:`Check` per rule: ``fail`` when the rule's condition holds or its
        metric is missing/undefined, ``pass`` otherwise.
    """
    out = []
    for r in rules:
        raw = lookup(summary, r.path)
        if raw is _MISSING:
            out.append(Check(r.text, "fail", None, r.threshold,
                             f"{r.path} is not in the summary, so the rule cannot pass", "rule"))
            continue
        v = _number(raw)
        if v is None:
            out.append(Check(r.text, "fail", None, r.threshold,
                             f"{r.path} is undefined ({raw!r}), so the rule cannot pass", "rule"))
            continue
        hit = OPERATORS[r.op](v, r.threshold)
        msg = f"{r.path} = {v:.4g}: " + ("fails" if hit else "passes") + f" (fail when {r.op} {r.threshold:g})"
        out.append(Check(r.text, "fail" if hit else "pass", v, r.threshold, msg, "rule"))
    return tuple(out)


def builtin_checks(summary: Mapping[str, Any]) -> tuple[Check, ...]:
    """Checks an audit always reports: warnings, except ``field_probe``, which fails when
    the gradient of the network contradicts its own structural analysis.

    Reads the summary dict (not the objects), so the same checks apply to a stored
    summary.json.
    """
    out: list[Check] = []
    den = summary.get("denoiser") or {}
    san = den.get("sanity") or {}
    if san:
        ok = bool(san.get("passed"))
        out.append(Check("denoiser_sanity", "pass" if ok else "warn", san.get("ratio"), san.get("threshold"),
                         "one-step denoising error / error of predicting zero at t = 0.5"
                         + ("" if ok else "; the model may be mis-adapted (check --prediction, --time, --schedule)")))
    defaulted = den.get("warnings") or []
    out.append(Check("settings_resolved", "warn" if defaulted else "pass", len(defaulted), 0,
                     "; ".join(defaulted) if defaulted else "every adapter setting came from the model or the user"))
    st = summary.get("structure") or {}
    if st.get("error"):
        out.append(Check("structure_traced", "warn", False, None,
                         f"the network could not be traced ({st['error']}); the machine falls back to LS"))
    else:
        partial = bool(st.get("partial"))
        out.append(Check("structure_complete", "warn" if partial else "pass", not partial, None,
                         "unsupported ops: " + ", ".join(str(u) for u in st.get("unsupported_ops", []))
                         if partial else "every op on the image path has a rule"))
        out += _probe_checks(st)
        mass = [v for vs in ((summary.get("erf") or {}).get("gradient_mass") or {}).values() for v in vs]
        if mass and not any(_number(v) for v in mass):
            out.append(Check("erf_measured", "warn", 0.0, None,
                             "the effective receptive field found no gradient of the output with respect to the "
                             "input at any step: its maps and predicted patch sizes mean nothing"))
        nonlocal_ = "non-local" in (st.get("verdict") or [])
        out.append(Check("locality", "warn" if nonlocal_ else "pass", not nonlocal_, None,
                         "the network mixes information over the whole image (global ops); a local machine "
                         "cannot explain all of it" if nonlocal_ else
                         "the network is local (no global op on the path)"))
    out += _input_checks(summary)
    pred = summary.get("prediction") or {}
    r, ir = _number(pred.get("median_r")), _number(pred.get("is_median_r"))
    if r is not None and ir is not None:
        out.append(Check("machine_beats_memorization", "pass" if r > ir else "warn", r, ir,
                         f"median r of the fitted machine {r:.3f} vs the IS (memorisation) baseline {ir:.3f}"))
    if r is not None:
        low = r < EXPLAINS_ALMOST_NOTHING
        out.append(Check("machine_explains_network", "warn" if low else "pass", r, EXPLAINS_ALMOST_NOTHING,
                         (f"the fitted machine explains almost nothing of the network (median r {r:.3f} < "
                          f"{EXPLAINS_ALMOST_NOTHING:g}): the model may be untrained, mis-adapted, or not local, and "
                          f"the locality and novelty findings say little about it") if low else
                         f"median r {r:.3f} >= {EXPLAINS_ALMOST_NOTHING:g}"))
    nov = summary.get("novelty") or {}
    mf = _number(nov.get("memorized_fraction"))
    base = _number(lookup(summary, "novelty.memorization.baseline.memorized_fraction") if nov else None)
    if mf is not None:
        thr = base if base is not None else 0.0
        out.append(Check("memorization", "warn" if mf > thr else "pass", mf, thr,
                         f"{mf:.1%} of the network's samples are near-copies of a training image "
                         f"(training images among themselves: {thr:.1%})"))
    return tuple(out)


def _probe_checks(st: Mapping[str, Any]) -> list[Check]:
    """The gradient check of the theoretical field (a failure: the analysis contradicts the
    network, so the verdict and the machine choice cannot be trusted) and a zero output."""
    out: list[Check] = []
    fp = st.get("field_probe") or {}
    rows = (fp.get("pixels") or {}) if fp else {}
    if fp.get("error"):
        out.append(Check("field_probe", "warn", None, None,
                         f"the gradient check of the receptive field could not run ({fp['error']})"))
    elif rows and all(_no_support(row) for row in rows.values()):
        out.append(Check("field_probe", "warn", None, None,
                         "the output's gradient is zero everywhere at the probed pixels (a zero-initialised or "
                         "constant output layer?): the gradient check of the receptive field checked nothing"))
    elif fp:
        bad = [(name, row) for name, row in rows.items() if not row.get("inside")]
        out.append(Check("field_probe", "fail" if bad else "pass", not bad, None,
                         ("the gradient of the output reaches outside the theoretical receptive field at "
                          + "; ".join(f"the {name} pixel {tuple(row['pixel'])} (support {row['support']}, field "
                                      f"{row['predicted']})" for name, row in bad)
                          + ": the structural analysis is wrong for this network, so its verdict and the machine "
                            "choice cannot be trusted; please report it with the model's architecture")
                         if bad else "the gradient support at the centre, an edge and a corner lies inside the "
                                     "theoretical field"))
    out_max = _number((st.get("trace") or {}).get("output_abs_max"))
    if out_max is not None:
        zero = out_max == 0.0
        out.append(Check("output_nonzero", "warn" if zero else "pass", out_max, 0,
                         "the model's output is identically zero on the example inputs (a zero-initialised output "
                         "layer?): the receptive field and the verdict are the architecture's, but the gradient "
                         "probe and the ERF measure nothing; audit trained weights" if zero else
                         f"max |output| {out_max:.3g} on the example inputs"))
    return out


def _no_support(row: Mapping[str, Any]) -> bool:
    """The probe found no pixel the output depends on (support (-1, -1) on every axis)."""
    sup = row.get("support") or {}
    return bool(sup) and all(list(v)[0] < 0 for v in sup.values())


def _input_checks(summary: Mapping[str, Any]) -> list[Check]:
    """Warnings about what the audit was given: no data named, too little of it, images too
    small, a label the model ignores."""
    out: list[Check] = []
    cfg = summary.get("config") or {}
    data = summary.get("data") or {}
    if isinstance(cfg.get("data"), str) and not cfg["data"].strip():
        out.append(Check("data_named", "warn", False, None,
                         f"--data was empty, so the data the model's config names was used "
                         f"({data.get('spec')!r}); name the training data explicitly"))
    n = _number(data.get("N"))
    if n is not None:
        counts = {str(k): int(v) for k, v in (data.get("label_counts") or {}).items()}
        smallest = None                                   # the smallest class dictionary a machine uses
        if cfg.get("label") is not None:
            smallest = counts.get(str(cfg["label"]))
        elif cfg.get("conditional") and counts:
            smallest = min(counts.values())
        few = n < MIN_IMAGES or (smallest is not None and smallest < MIN_PER_CLASS)
        out.append(Check("data_size", "warn" if few else "pass", int(n), MIN_IMAGES,
                         (f"{int(n)} training images" + (f" (smallest class {smallest})" if smallest is not None else "")
                          + f": too few for the machines to tell locality from copying; give at least {MIN_IMAGES} "
                            f"(and {MIN_PER_CLASS} per class for a conditional model), ideally the model's whole "
                            f"training set") if few else f"{int(n)} training images"))
    side = min(int(data.get("H") or 0), int(data.get("W") or 0))
    if side:
        small = side < MIN_SIDE
        out.append(Check("image_size", "warn" if small else "pass", side, MIN_SIDE,
                         (f"{data.get('H')}x{data.get('W')} images: every candidate patch would see (nearly) the whole "
                          f"image, so the locality scales resolve nothing; audit at {MIN_SIDE}x{MIN_SIDE} or larger")
                         if small else f"{data.get('H')}x{data.get('W')} images"))
    effect = _number((summary.get("denoiser") or {}).get("label_effect"))
    if effect is not None:
        ignored = effect < LABEL_EFFECT_FLOOR
        out.append(Check("label_used", "warn" if ignored else "pass", effect, LABEL_EFFECT_FLOOR,
                         "the model's output does not change when only the class label does: it ignores the label, "
                         "so --conditional/--label audit an unconditional model" if ignored else
                         f"changing only the label moves the output by {effect:.3g} (relative)"))
    return out


def exit_code(checks: Sequence[Check]) -> int:
    """0 when nothing failed (warnings allowed), 1 when some check failed."""
    return 1 if any(c.status == "fail" for c in checks) else 0
