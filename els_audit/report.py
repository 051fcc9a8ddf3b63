"""The HTML report: one self-contained file drawn from an :class:`~els_audit.audit.AuditResult`.

The report only reads the result (like ``torch/fx/passes/graph_drawer.py`` only reads
``node.meta``); it computes no metric.  Every figure is a matplotlib PNG inlined as a
base64 ``data:`` URI, there is no script, stylesheet, font or image from anywhere else, so
the file opens offline and makes no network request.  Every string that comes from the
user or the model (file names, module paths, data specs, messages) goes through
:func:`html.escape`.

Sections, in order: at a glance (the reviewer's four questions, :mod:`.report_glance`);
verdict and checks; architecture (graph drawing, receptive field, breakers grouped by kind
and cause); effective receptive field; equivariance; scales; the machine's support per step
(:mod:`.report_supports`); seed gallery; r(machine) vs
r(IS); novelty; published comparison; settings, versions and hashes.
"""

from __future__ import annotations

import json
from typing import Optional

import numpy as np

from .report_glance import breaker_groups, breaker_table, glance
from .report_graph import graph_figure
from .report_supports import supports_section
from .report_html import _e, _fmt, _gray, _img, _plt, _table, figure_to_data_uri

__all__ = ["render_html", "figure_to_data_uri"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1150px;
color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 7px;font-size:.9em;
vertical-align:middle}th{background:#f3f3f3;text-align:left}
.pass{background:#e5f6e5}.warn{background:#fff4d6}.fail{background:#fbdcdc}
.big{font-size:1.15em}.muted{color:#666;font-size:.9em}code{background:#f4f4f4;padding:0 3px}
img{max-width:100%;height:auto}.gallery img{display:block}
.scroll{overflow-x:auto;max-width:100%}p,li{overflow-wrap:break-word}p code,td code,.nodes{overflow-wrap:anywhere}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(230px,1fr));gap:.7em;margin:.8em 0}
.card{border:1px solid #ddd;border-radius:6px;padding:.6em .8em}.card .q{font-weight:600;font-size:.95em}
.card .n{font-size:1.5em;margin:.15em 0;overflow-wrap:anywhere}.card .n code{font-size:.6em}.card .w{color:#555;font-size:.85em}
details summary{cursor:pointer;color:#345}.nodes{font-size:.85em;color:#444}
"""


# ---------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------
def _verdict(r, s: dict) -> str:
    st = s["structure"]
    verdict = st.get("verdict_line") or ("unknown: " + str(st.get("error", "")))
    n_warn = sum(c.status == "warn" for c in r.checks)
    failed = ", ".join(c.name for c in r.checks if c.status == "fail")
    status = ("fail", f"a check failed ({failed})") if r.exit_code else (
        ("warn", f"checks pass, with {n_warn} warning{'s' if n_warn > 1 else ''}") if n_warn else ("pass", "checks pass"))
    rows = [("structure", _e(verdict))] + (_machine_rows(r, s) if s.get("scope") != "structure" else [
        ("scope", "structure only (<code>--only structure</code>): no sanity check, no machine, no prediction")])
    out = [f'<p class="big {status[0]}">Result: <b>{_e(status[1])}</b> (exit code {r.exit_code})</p>',
           _table(["", ""], [(f"<b>{_e(a)}</b>", b) for a, b in rows])]
    out.append("<h3>Checks</h3>")
    out.append(_table(["check", "status", "value", "threshold", "meaning"],
                      [(_e(c.name), _e(c.status), _e(_fmt(c.value)), _e(_fmt(c.threshold)), _e(c.message))
                       for c in r.checks], [c.status for c in r.checks]))
    if s.get("scope") != "structure":
        out.append(_fidelity_line(s))
    return "".join(out)


def _machine_rows(r, s: dict) -> list[tuple[str, str]]:
    pred = s["prediction"]
    nov = s["novelty"]
    return [
        ("machine", f"<b>{_e(r.choice.kind)}</b> — {_e(r.choice.reason)}"
         + "".join(f"<br><span class=muted>caveat: {_e(c)}</span>" for c in r.choice.caveats)),
        ("median r (fitted machine vs network)", f"<b>{_fmt(pred.get('median_r'))}</b>; true R² "
         f"{_fmt(pred.get('median_r2'))}"),
        ("median r (IS, memorisation baseline)",
         f"{_fmt(pred.get('is_median_r'))}; R² {_fmt(pred.get('is_median_r2'))}"),
        ("machine beats IS on", f"{_fmt(pred.get('win_rate'), 2)} of seeds"),
        ("memorised samples", f"{_fmt(nov.get('memorized_fraction'), 3)} (ratio test, threshold "
         f"{_fmt(nov.get('threshold'), 3)})"),
    ]


def _fidelity_line(s: dict) -> str:
    """The settings this run used, what the plan cut from full fidelity and why, and per
    stage the predicted against the measured seconds."""
    cfg, ff, plan = s["config"], s["full_fidelity"], s.get("plan") or {}
    budget = plan.get("budget_s")
    out = [f"<p class=muted>This run: {cfg['steps']} steps, {cfg['seeds']} seeds, "
           f"{cfg['calibration_seeds']} calibration seeds, dictionary of "
           f"{s['machine']['n_dictionary_images']} of {s['data']['N']} images, scales {_e(cfg['scales'])}; "
           + (f"planned within a budget of {_fmt(budget, 0)} s" if budget is not None else "no time budget")
           + (f" (settings given: {_e(', '.join(plan['given']))})" if plan.get("given") else "") + ". "
           + (("Cut from full fidelity: " + "; ".join(_e(c) for c in plan["cuts"]) + ". ") if plan.get("cuts")
              else "Full fidelity on every planned setting. ")
           + f"Full fidelity: {ff['steps']} steps, {ff['seeds']} seeds, {ff['calibration_seeds']} calibration "
             f"seeds, the whole data set as dictionary (<code>--budget none</code>, or <code>--steps {ff['steps']} "
             f"--seeds {ff['seeds']} --calibration-seeds {ff['calibration_seeds']} --data-limit 0</code>). "
             f"{_e(ff['note'])}</p>"]
    stages = plan.get("stages") or {}
    if any(v.get("predicted_s") is not None for v in stages.values()):
        rows = [(_e(k), _fmt(v.get("predicted_s"), 1), _fmt(v.get("measured_s"), 1), _fmt(v.get("ratio"), 2))
                for k, v in stages.items()]
        out.append("<h3>Plan: predicted and measured seconds</h3>"
                   + _table(["stage", "predicted s", "measured s", "measured / predicted"], rows)
                   + f"<p class=muted>Whole audit predicted {_fmt(plan.get('predicted_total_s'), 1)} s "
                     f"(before the plan {_fmt(plan.get('spent_before_plan_s'), 1)} s; the cost probe "
                     f"{_fmt((plan.get('probe') or {}).get('seconds'), 1)} s on "
                     f"{_e((plan.get('probe') or {}).get('n_probe'))} images).</p>")
    return "".join(out)


def _architecture(r, s: dict) -> str:
    st = s["structure"]
    out = []
    m = s["model"]
    arch = (m.get("arch") or {}).get("name") if isinstance(m.get("arch"), dict) else None
    out.append(_table(["model", "format", "parameters", "dtype", "architecture", "code run at load"],
                      [(_e(m.get("path")), _e(m.get("format")), _e(m.get("n_params")), _e(m.get("dtype")),
                        _e(arch or "carried by the file"), _e(_fmt(m.get("ran_code"))))]))
    if st.get("error"):
        out.append(f"<p class=warn>The network could not be traced: {_e(st['error'])}. The audit continues "
                   f"without the structural analysis (LS machine unless --machine says otherwise).</p>")
        return "".join(out)
    g = graph_figure(r.graph)
    if g:
        out.append(g)
    rf = st.get("theoretical_rf") or {}
    out.append(f"<h3>Receptive field</h3><p>{_e(rf.get('summary'))}</p>")
    out.append(_table(["axis", "size (px)", "extent", "centred side", "period", "covers image"],
                      [(_e(a["axis"]), _e(a["size"]), _e(a["extent"]), _e(a["centred_side"]), _e(a["period"]),
                        _e(_fmt(a["covers_image"]))) for a in rf.get("axes", [])]))
    if rf.get("global_paths"):
        out.append("<p>Global ops (the output depends on every position through them):</p>")
        out.append(_table(["node", "module", "kind", "reason"],
                          [(_e(gp["node"]), _e(gp["module_path"]), _e(gp["kind"]), _e(gp["reason"]))
                           for gp in rf["global_paths"][:40]]))
    out.append(f"<h3>Equivariance breakers</h3><p>verdict: <b>{_e(st.get('verdict_line'))}</b>; boundary band "
               f"{_e(st.get('band_width'))} px; period {_e(st.get('period'))}; partial: {_fmt(st.get('partial'))}</p>")
    br = st.get("breakers") or []
    if br:
        out.append(breaker_table(br))
        out.append(f"<p class=muted>{len(br)} breaking operation(s) in {len(breaker_groups(br))} group(s) of the "
                   f"same kind and cause; each one, with its measured amount, is in summary.json "
                   f"(<code>structure.breakers</code>).</p>")
    else:
        out.append("<p>No breaker: the network is equivariant to circular shifts.</p>")
    if st.get("unsupported_ops"):
        out.append("<p class=warn>Ops without a rule (treated as global, never as harmless): "
                   + _e(", ".join(" ".join(map(str, u)) for u in st["unsupported_ops"])) + "</p>")
    return "".join(out)


def _erf_section(r) -> str:
    erf = r.erf
    if erf is None:
        return "<p>not run</p>"
    plt = _plt()
    maps = erf.maps                                                                  # (T, P, H, W)
    T, P = maps.shape[:2]
    show = sorted(set(np.linspace(0, T - 1, min(T, 5)).round().astype(int).tolist()))
    names = list(erf.pixels)
    fig, axes = plt.subplots(P, len(show), figsize=(1.6 * len(show), 1.7 * P), dpi=80, squeeze=False)
    for pi in range(P):
        for j, ti in enumerate(show):
            ax = axes[pi][j]
            m = maps[ti, pi].astype(np.float64)
            top = float(m.max())
            # log scale over 3 decades: the centre tap (eps ~ x/b at high noise) would hide the rest
            ax.imshow(np.log10(np.maximum(m, top * 1e-3) if top > 0 else m + 1.0), cmap="magma",
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if pi == 0:
                ax.set_title(f"t={erf.times[ti]:.2f}", fontsize=8)
            if j == 0:
                ax.set_ylabel(names[pi], fontsize=8)
    fig.suptitle("ERF maps: log10 of normalised |d eps[p]/dx| (3 decades)", fontsize=9)
    out = [_img(fig, "effective receptive field maps")]
    if getattr(erf, "geometry", "plane") == "torus":
        out.append("<p class=muted>Every boundary of this network is circular: the squares are measured on the "
                   "torus (an edge pixel's field continues on the opposite edge).</p>")
    if r.scope == "structure":
        out.append("<p class=muted>Structure-only audit: these maps measure the weights as given. On untrained "
                   "(random) weights they show how far the architecture's sensitivity reaches at initialisation, "
                   "not the patch sizes a trained model uses; compare them with the theoretical field.</p>")
    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    for n in names:
        ax.plot(erf.times, erf.erf90[n], marker="o", ms=3, label=f"ERF90 {n}")
    ax.plot(erf.times, erf.erf50["centre" if "centre" in names else names[0]], ls="--", label="ERF50 centre")
    ax.plot(erf.times, erf.predicted_patch, color="k", lw=2, label="predicted patch")
    ax.set_xlabel("t")
    ax.set_ylabel("side (px)")
    ax.legend(fontsize=7)
    out.append(_img(fig, "ERF size per step"))
    out.append(f"<p class=muted>{_e(erf.patch_rule)}; {erf.n_samples} inputs per step from {_e(erf.data_source)}.</p>")
    return "".join(out)


def _equivariance_section(r) -> str:
    eq = r.equivariance
    if eq is None:
        return "<p>not run</p>"
    plt = _plt()
    rows = []
    for ti, t in enumerate(eq.times):
        rows.append([_e(f"{t:.2f}")] + [_e(f"{eq.psnr_db[ti][si]:.1f} / {_fmt(eq.psnr_masked_db[ti][si], 1)}"
                                           f" / band {_fmt(eq.effective_band[ti][si])}")
                                        for si in range(len(eq.shifts))])
    out = ["<p>EQ-T (dB, higher = more equivariant; Karras et al. 2021) of f(shift x) vs shift f(x), "
           f"all pixels / outside the {eq.band} border band / effective band (px):</p>",
           _table(["t"] + [f"shift {tuple(s)}" for s in eq.shifts], rows)]
    em = eq.error_maps                                                               # (T, S, H, W)
    T, S = em.shape[:2]
    fig, axes = plt.subplots(T, S, figsize=(1.5 * S, 1.6 * T), dpi=80, squeeze=False)
    for ti in range(T):
        for si in range(S):
            ax = axes[ti][si]
            ax.imshow(em[ti, si], cmap="viridis", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if ti == 0:
                ax.set_title(f"shift {tuple(eq.shifts[si])}", fontsize=7)
            if si == 0:
                ax.set_ylabel(f"t={eq.times[ti]:.2f}", fontsize=7)
    fig.suptitle("mean |f(shift x) - shift f(x)|", fontsize=9)
    out.append(_img(fig, "equivariance error maps"))
    return "".join(out)


def _published_scales_on_grid(pub: list[int], steps: int) -> list[int]:
    """The published 20-step schedule read at our grid times t = (j+1)/steps (nearest)."""
    n = len(pub)
    return [pub[min(n - 1, max(0, int(round((j + 1) / steps * n)) - 1))] for j in range(steps)]


def _scales_section(r, s: dict) -> str:
    plt = _plt()
    steps = len(r.scales)
    times = [(j + 1) / steps for j in range(steps)]
    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    ax.plot(times, r.scales, marker="o", lw=2, label=f"used ({r.scales_source.split(' (')[0]})")
    ax.plot(times, r.scales_predicted, marker="s", ls="--", label="ERF prediction")
    if r.calibration_other is not None:
        ax.plot(times, r.calibration_other.scales, marker="^", ls="-.",
                label=f"calibrated with {r.calibration_other.criterion} (not used)")
    pub = s.get("published")
    if pub:
        ax.plot(times, _published_scales_on_grid(pub["scales"]["scales"], steps), ls=":", color="gray",
                label=f"paper: {pub['scales']['dataset']} {pub['scales']['arch']} {pub['scales']['padding']}")
    ax.set_xlabel("t (scales[j] applied at t = (j+1)/steps)")
    ax.set_ylabel("patch size k")
    ax.legend(fontsize=7)
    out = [_img(fig, "patch size per step"),
           _table(["t"] + [f"{t:.2f}" for t in times],
                  [["used"] + [_e(k) for k in r.scales], ["ERF prediction"] + [_e(k) for k in r.scales_predicted]]
                  + ([["agreement"] + [_fmt(a, 2) for a in r.calibration.agreement]] if r.calibration else [])
                  + ([[_e(f"{r.calibration_other.criterion} criterion")] + [_e(k) for k in r.calibration_other.scales]]
                     if r.calibration_other else [])),
           f"<p class=muted>Source: {_e(r.scales_source)}.</p>"]
    cal = r.calibration
    if cal is not None:
        v = np.asarray(cal.values, dtype=np.float64)                                 # (T, n_cand)
        fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
        # NB: per step (column), 0 = that step's best candidate, 1 = its worst: the criterion's
        # scale changes by orders of magnitude across steps, so one colour scale shows one column
        shown = np.ma.masked_invalid(_per_step_scaled(v, lower_is_better=cal.criterion == "x0").T)
        im = ax.imshow(shown, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1,
                       extent=(0.5 / steps, (steps + 0.5) / steps, -0.5, len(cal.candidates) - 0.5))
        ax.set_yticks(range(len(cal.candidates)))
        ax.set_yticklabels([str(k) for k in cal.candidates], fontsize=6)
        ax.set_xlabel("t")
        ax.set_ylabel("candidate k")
        fig.colorbar(im, ax=ax, label=f"{cal.criterion}, per step: 0 best, 1 worst")
        out.append(_img(fig, "calibration criterion per step and candidate"))
        out.append(f"<p class=muted>Calibration criterion: {_e(cal.criterion)} over {len(cal.seeds)} seed(s) "
                   f"({_e(list(cal.seeds))})"
                   + (f"; the {_e(r.calibration_other.criterion)} criterion's scales are listed beside."
                      if r.calibration_other else "; only this criterion was computed in this run "
                      "(<code>--compare-criteria</code> adds the other; <code>--criterion cosine</code> is the "
                      "paper's).") + "</p>")
    return "".join(out)


def _per_step_scaled(v: np.ndarray, lower_is_better: bool) -> np.ndarray:
    """(T, n) criterion values -> per row 0 (best candidate) .. 1 (worst); NaN stays NaN, a
    row with one value or all equal is 0."""
    v = v if lower_is_better else -v
    with np.errstate(all="ignore"):
        lo, hi = np.nanmin(v, axis=1, keepdims=True), np.nanmax(v, axis=1, keepdims=True)
        span = np.where(hi > lo, hi - lo, 1.0)
        return (v - lo) / span


def _mosaic_rgb(src: np.ndarray, seams: Optional[np.ndarray]) -> np.ndarray:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    rgb = cmap((src % 20) / 19.0)[..., :3]                                           # (H, W, 3)
    if seams is not None:
        rgb[seams] = rgb[seams] * 0.35
    return rgb


def _gallery(r) -> str:
    plt = _plt()
    pr = r.prediction
    nov = r.novelty
    mos = nov.mosaic
    seams = mos.seam_pixels() if mos is not None else None
    lo, hi = (float(v) for v in (r.denoiser.get("data_range") or (-1.0, 1.0)))
    rows = []
    for i, seed in enumerate(pr.seeds):
        fig, axes = plt.subplots(1, 7, figsize=(9.8, 1.55), dpi=72)
        _gray(axes[0], pr.x_T[i] / max(1e-9, float(np.abs(pr.x_T[i]).max())), "seed noise")
        _gray(axes[1], pr.network[i], "network", lo, hi)
        _gray(axes[2], pr.machine_samples[i], f"{r.choice.kind}", lo, hi)
        _gray(axes[3], pr.is_samples[i], "IS", lo, hi)
        if r.nearest_images is not None:
            _gray(axes[4], r.nearest_images[i], "nearest train", lo, hi)
        else:
            axes[4].set_axis_off()
        if mos is not None:
            axes[5].imshow(_mosaic_rgb(mos.source_image[i], seams[i]), interpolation="nearest")
            axes[5].set_title(f"mosaic ({int(mos.n_sources[i])} src)", fontsize=8)
        axes[5].set_xticks([])
        axes[5].set_yticks([])
        axes[6].imshow(nov.locality.novel[i], cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
        axes[6].set_title("novel by locality", fontsize=8)
        axes[6].set_xticks([])
        axes[6].set_yticks([])
        p = pr.per_seed[i]
        rows.append((_e(seed) + ("" if p.label is None else f"<br>label {_e(p.label)}"),
                     _img(fig, f"seed {seed}"), _fmt(p.r), _fmt(p.is_r), _fmt(p.r2),
                     _e(_fmt(p.beats_is))))
    return ('<div class="gallery">' + _table(["seed", "noise | network | fitted machine | IS | nearest training image "
                                              "| mosaic (colour = source image, dark = seam) | novelty map",
                                              "r", "r (IS)", "R²", "beats IS"], rows) + "</div>")


def _scatter(r) -> str:
    plt = _plt()
    pr = r.prediction
    fig, ax = plt.subplots(figsize=(3.6, 3.6), dpi=80)
    ax.scatter(pr.is_r, pr.r, s=18)
    ax.plot([-1, 1], [-1, 1], color="gray", lw=0.8)
    lo = float(np.nanmin(np.concatenate([pr.r, pr.is_r, [0.0]])))
    ax.set_xlim(min(0.0, lo), 1)
    ax.set_ylim(min(0.0, lo), 1)
    ax.set_xlabel("r (IS, memorisation)")
    ax.set_ylabel(f"r ({r.choice.kind}, fitted)")
    ax.set_title("per seed; above the diagonal = machine wins", fontsize=8)
    return _img(fig, "r of the machine vs r of IS")


def _novelty_section(r, s: dict) -> str:
    nov = s["novelty"]
    mem = nov["memorization"]
    out = [f"<p>Copy test (Carlini et al. 2023): nearest / second-nearest L2 distance to the {mem['n_train']} "
           f"training images; memorised below {_fmt(nov['threshold'])}. Median ratio {_fmt(mem['median_ratio'])} "
           f"(training images among themselves: {_fmt(mem['baseline']['median_ratio'])}, of which "
           f"{_fmt(mem['baseline']['memorized_fraction'])} fall below the threshold).</p>"]
    rows = []
    for row in nov["seeds"]:
        rows.append((_e(row["seed"]), _fmt(row["nearest_distance"]), _fmt(row["ratio"]), _e(_fmt(row["memorized"])),
                     _e(row["nearest_index"]), _e(row.get("n_sources", "–")), _fmt(row.get("seam_fraction")),
                     _fmt(row["novel_fraction"])))
    out.append(_table(["seed", "nearest distance", "ratio", "memorised", "nearest image", "mosaic sources",
                       "seam fraction", "novel-by-locality fraction"], rows,
                      ["warn" if row["memorized"] else "" for row in nov["seeds"]]))
    loc = nov["locality"]
    out.append(f"<p class=muted>Novel by locality: pixels within {_fmt(loc['explained_tol'])} of the network for the "
               f"fitted machine and at least {_fmt(loc['unexplained_tol'])} away for IS. The mosaic is read from the "
               f"fitted machine's last step (Theorem 4.1 of the paper).</p>")
    return "".join(out)


def _published_section(s: dict) -> str:
    pub = s.get("published")
    if not pub:
        return "<p>No comparable published setting.</p>"
    rr = pub["r"]
    pred = s["prediction"]
    kind = s["machine"]["kind"]
    rows = [("this audit", _e(f"{kind}"), _fmt(pred.get("median_r"), 2), _fmt(pred.get("is_median_r"), 2),
             _e(f"{s['config']['seeds']} seeds, {s['config']['steps']} steps for network and machine")),
            ("paper", "ELS / LS", f"{_fmt(rr['els'], 2)} / {_fmt(rr['ls'], 2)}", _fmt(rr["is"], 2),
             _e(f"{rr['dataset']} {rr['arch']} {rr['padding']}{' cond.' if rr['conditional'] else ''}; "
                f"{pub['protocol']['statistic']}; network {pub['protocol']['network_steps']} steps, machine "
                f"{pub['protocol']['machine_steps']}"))]
    diff = ", ".join(pub["r_differs"]) or "none"
    return (_table(["", "machine", "median r", "IS median r", "protocol"], rows)
            + f"<p class=muted>Closest published setting (differs in: {_e(diff)}). {_e(pub['protocol']['note'])}.</p>")


def _settings_section(s: dict) -> str:
    out = []
    cfg = s["config"]
    out.append("<h3>Configuration</h3>"
               + _table(["setting", "value"], [(_e(k), _e(json.dumps(v))) for k, v in cfg.items()]))
    den = s["denoiser"]
    out.append("<h3>Model adapter</h3>" + _table(["setting", "value", "source"], [
        (_e(k), _e(json.dumps(den.get(k))), _e((den.get("sources") or {}).get(k, ""))) for k in
        ("call_style", "time_input", "prediction", "schedule", "num_train_steps", "data_range")]))
    data = s["data"]
    out.append("<h3>Data</h3>" + _table(["spec", "source", "images", "shape", "sha256", "from"], [
        (_e(data.get("spec")), _e(data.get("source")), _e(data.get("N")),
         _e(f"{data.get('C')}x{data.get('H')}x{data.get('W')}"), f"<code>{_e(data.get('sha256'))}</code>",
         _e(data.get("spec_source")))]))
    if data.get("notes"):
        out.append("<p class=muted>" + "<br>".join(_e(n) for n in data["notes"]) + "</p>")
    files = s["model"].get("files") or []
    out.append("<h3>Input files</h3>" + _table(["file", "sha256"], [(_e(f["path"]), f"<code>{_e(f['sha256'])}</code>")
                                                                   for f in files]))
    out.append("<h3>Versions</h3>" + _table(["package", "version"], [(_e(k), _e(v)) for k, v in s["versions"].items()]))
    out.append("<h3>Timings (s)</h3>"
               + _table(["stage", "seconds"], [(_e(k), _fmt(v, 2)) for k, v in s["timings"].items()]))
    if s.get("warnings"):
        out.append("<h3>Notes</h3><ul>" + "".join(f"<li>{_e(w)}</li>" for w in s["warnings"]) + "</ul>")
    return "".join(out)


def render_html(result) -> str:
    """Render the report of an audit.

    Args:
        result: an :class:`els_audit.audit.AuditResult`.
    Returns:
        the HTML text of one self-contained page (inline PNGs, inline CSS, no script, no
        external reference).
    """
    s = result.to_dict()
    title = f"els-audit: {result.name}" + (" (structure only)" if s.get("scope") == "structure" else "")
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        'style-src \'unsafe-inline\'">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1><p class=muted>model <code>{_e(s['config']['model'])}</code>, data "
        f"<code>{_e(s['data'].get('spec'))}</code></p>",
        "<h2 id=glance>At a glance</h2>", glance(result, s),
        "<h2 id=verdict>Verdict and checks</h2>", _verdict(result, s),
        "<h2 id=architecture>Architecture</h2>", _architecture(result, s),
        "<h2 id=erf>Effective receptive field per step</h2>", _erf_section(result),
        "<h2 id=equivariance>Equivariance</h2>", _equivariance_section(result),
    ]
    if s.get("scope") != "structure":
        parts += [
            "<h2 id=scales>Scales</h2>", _scales_section(result, s),
            "<h2 id=support>Machine support per step</h2>", supports_section(result),
            "<h2 id=gallery>Seed gallery</h2>", _gallery(result),
            "<h2 id=scatter>r(machine) vs r(IS)</h2>", _scatter(result),
            "<h2 id=novelty>Novelty</h2>", _novelty_section(result, s),
            "<h2 id=published>Beside the paper</h2>", _published_section(s),
        ]
    parts += ["<h2 id=settings>Settings, versions and hashes</h2>", _settings_section(s), "</body></html>"]
    return "\n".join(parts)
