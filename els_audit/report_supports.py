"""The report's support section: the window the machine used at each step, beside the
network's measured x0 ERF map (centre pixel) it can be compared with or was shaped from.

Reads :attr:`AuditResult.support` (:class:`els_audit.stages.machine.SupportsUsed`) and
:attr:`AuditResult.erf`; computes nothing but the crop of the ERF map to the drawn window.
"""

from __future__ import annotations

import numpy as np

from .report_html import _e, _img, _plt, _table

__all__ = ["supports_section"]


def _erf_crops(erf, steps: int, side: int):
    """(T,) x0 ERF maps at the centre pixel cropped to side x side (index 0 = least noise),
    or None when the ERF was not measured on a grid this audit's steps divide."""
    if erf is None or getattr(erf, "x0_maps", None) is None or "centre" not in erf.pixels:
        return None
    try:
        e = erf.on_grid(steps)
    except ValueError:
        return None
    cy, cx = e.pixels["centre"]
    _, H, W = e.image_shape
    r = min(side // 2, cy, cx, H - 1 - cy, W - 1 - cx)
    p = list(e.pixels).index("centre")
    out = []
    for j in range(steps):                                        # maps are in sampler order: t = 1 first
        m = np.asarray(e.x0_maps[steps - 1 - j, p], dtype=np.float64)[cy - r: cy + r + 1, cx - r: cx + r + 1]
        pad = side // 2 - r
        out.append(np.pad(m, pad) if pad > 0 else m)
    return out


def supports_section(r) -> str:
    sup = r.support
    if sup is None:
        return "<p>not run</p>"
    steps = len(sup.sides)
    side = max(sup.sides)
    erf = _erf_crops(r.erf, steps, side)
    plt = _plt()
    rows = 1 if erf is None else 2
    fig, axes = plt.subplots(rows, steps, figsize=(max(6.0, 0.62 * steps), 0.75 * rows + 0.5), dpi=80,
                             squeeze=False)
    for j in range(steps):                                        # columns: t ascending, left to right
        w = sup.weights[j]
        o = (side - w.shape[0]) // 2
        canvas = np.zeros((side, side))
        canvas[o: o + w.shape[0], o: o + w.shape[1]] = w
        ax = axes[rows - 1][j]
        ax.imshow(canvas, cmap="gray", vmin=0, vmax=max(1.0, float(canvas.max())), interpolation="nearest")
        axes[0][j].set_title(f"t={(j + 1) / steps:.2f}", fontsize=6)
        if erf is not None:
            m = erf[j]
            top = float(m.max())
            axes[0][j].imshow(np.log10(np.maximum(m, top * 1e-3)) if top > 0 else m, cmap="magma",
                              interpolation="nearest")
        for row in axes[:, j]:
            row.set_xticks([])
            row.set_yticks([])
    axes[rows - 1][0].set_ylabel("support", fontsize=7)
    if erf is not None:
        axes[0][0].set_ylabel("x0 ERF", fontsize=7)
    fig.suptitle(f"the machine's window per step on a {side} x {side} px canvas"
                 + ("; above it the log10 x0 ERF map of the centre pixel (3 decades)" if erf is not None else ""),
                 fontsize=8)
    body = [["window side"] + [_e(s) for s in sup.sides],
            ["weight sum"] + [f"{float(w.sum()):.1f}" for w in sup.weights]]
    if sup.band_sides is not None:
        body.append(["border band k"] + [_e(k) for k in sup.band_sides])
    return "".join([
        f"<p>Support: <b>{_e(sup.kind)}</b> ({_e(sup.source)}). A square machine weighs every pixel of its k x k "
        "window equally; shaped supports weigh the window by the map shown (white = 1; the weight sum is "
        "the area for 0/1 supports).</p>",
        _img(fig, "machine support per step beside the ERF"),
        _table(["t"] + [f"{(j + 1) / steps:.2f}" for j in range(steps)], body),
        "<p class=muted>bench/fidelity.md compares the supports on the zoo models (median r at equal "
        "settings).</p>"])
