"""The report's first screen and its breaker table, in words.

A reviewer opens the report with four questions: how local is the model, what breaks its
translation equivariance, how much of its output does locality explain, and does it copy
its training data.  :func:`glance` answers them with four numbers and one figure (the
network's samples above the fitted machine's, same seeds) before any detail.
:func:`breaker_groups` folds the per-operation breaker list (57 GroupNorm rows on a
diffusers UNet) into one row per kind and cause, with a count, the amount in words, and the
node list folded away.  Like the rest of the report, this only reads the result.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .checks import metric_values
from .report_html import _e, _gray, _img, _plt, _table

__all__ = ["glance", "breaker_groups", "amount_in_words"]

#: what each breaker kind means, in a reviewer's words
KIND_WORDS = {
    "boundary": "padding at the image border: pixels near an edge see padding instead of image",
    "stride": "striding or pooling: equivariant only to shifts by the stride",
    "global-op": "a global operation (norm statistics, attention, pooling over the image): every pixel "
                 "depends on every other",
    "position": "a position embedding: the output depends on absolute position",
}


def amount_in_words(amounts: list[Any]) -> str:
    """What a group of breakers' ``amount`` dicts (from the probes) add up to, as a phrase."""
    amounts = [a for a in amounts if isinstance(a, dict)]
    parts = []
    bands = sorted({int(a["band_width"]) for a in amounts if a.get("band_width") is not None})
    if bands:
        span = f"{bands[0]}" if len(bands) == 1 else f"{bands[0]} to {bands[-1]}"
        spread = sum(bool(a.get("spreads_globally")) for a in amounts)
        parts.append(f"pixels within {span} px of the border"
                     + (f"; through a later global op every pixel ({spread} of {len(amounts)})" if spread else ""))
    periods = sorted({int(a["period"]) for a in amounts if isinstance(a.get("period"), (int, float))})
    if periods:
        parts.append("equivariant only to shifts by multiples of " + " / ".join(f"{p} px" for p in periods))
    scopes = sorted({str(a["scope"]) for a in amounts if a.get("scope")})
    if scopes:
        axes = sorted({ax for a in amounts for ax in (a.get("axes") or []) if isinstance(ax, str)})
        parts.append(" / ".join(scopes) + (f" (over {', '.join(axes)})" if axes else ""))
    return "; ".join(parts) or "no measured amount"


def breaker_groups(breakers: list[dict]) -> list[dict]:
    """One group per (kind, cause): ``{kind, cause, count, amount, nodes}``, largest first."""
    groups: dict[tuple, dict] = {}
    for b in breakers:
        key = (b.get("kind"), b.get("cause"))
        g = groups.setdefault(key, {"kind": key[0], "cause": key[1], "count": 0, "nodes": [], "amounts": []})
        g["count"] += 1
        g["nodes"].append(b.get("module_path") or b.get("node"))
        g["amounts"].append(b.get("amount"))
    out = sorted(groups.values(), key=lambda g: (-g["count"], str(g["kind"]), str(g["cause"])))
    for g in out:
        g["amount"] = amount_in_words(g.pop("amounts"))
    return out


def breaker_table(breakers: list[dict]) -> str:
    """HTML: the grouped breakers, each group's nodes folded in a ``<details>``."""
    rows = []
    for g in breaker_groups(breakers):
        nodes = ", ".join(_e(n) for n in g["nodes"][:200]) + (f" and {len(g['nodes']) - 200} more"
                                                               if len(g["nodes"]) > 200 else "")
        rows.append((f"<b>{_e(g['kind'])}</b><br><span class=muted>{_e(KIND_WORDS.get(g['kind'], ''))}</span>",
                     _e(g["cause"]), _e(g["count"]), _e(g["amount"]),
                     f"<details><summary>{_e(g['count'])} node{'s' if g['count'] != 1 else ''}</summary>"
                     f"<span class=nodes>{nodes}</span></details>"))
    return _table(["kind", "cause", "count", "amount", "where"], rows)


def _card(question: str, number: str, words: str, status: str = "") -> str:
    return (f'<div class="card {status}"><div class=q>{_e(question)}</div><div class=n>{number}</div>'
            f'<div class=w>{words}</div></div>')


def glance(r, s: dict) -> str:
    """HTML: the four answers as cards, then one figure (network over machine samples)."""
    st = s.get("structure") or {}
    rf = (st.get("theoretical_rf") or {}).get("summary") or "not traced"
    scales = list(r.scales or []) if s.get("scope") != "structure" else []
    local = (f"patch {int(np.median(scales))} px" if scales else _e(rf))
    local_words = (f"median calibrated patch over {len(scales)} steps (range {min(scales)}-{max(scales)}); "
                   f"theoretical field: {_e(rf)}" if scales else "theoretical receptive field")
    groups = breaker_groups(st.get("breakers") or [])
    kinds = sorted({g["kind"] for g in groups})
    eq_words = ("; ".join(f"{_e(k)}: {sum(g['count'] for g in groups if g['kind'] == k)} op(s)" for k in kinds)
                or "no breaking operation: equivariant to circular shifts")
    cards = [_card("How local is it?", local, local_words),
             _card("What breaks equivariance?", f"<code>{_e(st.get('verdict_line') or 'unknown')}</code>", eq_words)]
    if s.get("scope") != "structure":
        pred, m = s.get("prediction") or {}, metric_values(s)
        mr, ir = m.get("median_r"), m.get("is_median_r")
        # the cards take the colour of the audit's own checks on the same numbers
        status = {c.get("name"): c.get("status", "") for c in s.get("checks") or []}
        expl = status.get("machine_beats_memorization", "")
        cards.append(_card("How much does locality explain?", f"r = {mr:.2f}" if mr is not None else "n/a",
                           f"median Pearson r of the fitted {_e(s['machine']['kind'])} machine against the network "
                           f"over {_e(pred.get('n_seeds'))} seeds; memorising IS machine "
                           + (f"{ir:.2f}" if ir is not None else "n/a"), expl))
        mf = m.get("memorized_fraction")
        cards.append(_card("Does it copy its training data?", f"{100 * mf:.0f}% copied" if mf is not None else "n/a",
                           "samples whose nearest training image is much closer than the second nearest",
                           status.get("memorization", "")))
    else:
        cards += [_card("How much does locality explain?", "not measured", "structure-only audit"),
                  _card("Does it copy its training data?", "not measured", "structure-only audit")]
    out = ['<div class=cards>' + "".join(cards) + "</div>"]
    if s.get("scope") != "structure" and r.prediction is not None:
        out.append(_figure(r))
    return "".join(out)


def _figure(r) -> str:
    """Network samples (top) over the fitted machine's (bottom) for up to 6 seeds, r above each."""
    pr = r.prediction
    n = min(6, len(pr.seeds))
    lo, hi = (float(v) for v in (r.denoiser.get("data_range") or (-1.0, 1.0)))
    plt = _plt()
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 2.8), dpi=80, squeeze=False)
    for i in range(n):
        _gray(axes[0][i], pr.network[i], f"seed {pr.seeds[i]}: r {pr.per_seed[i].r:.2f}", lo, hi)
        _gray(axes[1][i], pr.machine_samples[i], "", lo, hi)
    axes[0][0].set_ylabel("network", fontsize=8)
    axes[1][0].set_ylabel(r.choice.kind, fontsize=8)
    fig.tight_layout()
    return _img(fig, "the network's samples over the fitted machine's, same seeds")
