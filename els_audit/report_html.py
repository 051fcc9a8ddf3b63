"""What every part of the HTML report draws with: escaping, number formats, tables, inline
PNG figures (see :mod:`els_audit.report`)."""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Iterable, Optional, Sequence

import numpy as np

__all__ = ["figure_to_data_uri"]


def _e(x: Any) -> str:
    """Escape anything for HTML text or attribute context."""
    return html.escape("" if x is None else str(x), quote=True)


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not np.isfinite(v):
            return "–"
        return f"{v:.{nd}f}"
    return str(v)


def figure_to_data_uri(fig) -> str:
    """A matplotlib figure as a ``data:image/png;base64,...`` URI (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(fig, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="{figure_to_data_uri(fig)}">'


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], classes: Optional[Sequence[str]] = None) -> str:
    """A table in a box that scrolls sideways on a narrow screen (the page itself never does)."""
    out = ["<div class=scroll><table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cls = f' class="{_e(classes[i])}"' if classes else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    out.append("</table></div>")
    return "".join(out)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _gray(ax, img: np.ndarray, title: str = "", lo: float = -1.0, hi: float = 1.0) -> None:
    """Draw a (C, H, W) image in [lo, hi] (grey for C = 1, RGB for C = 3)."""
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] == 1:
        ax.imshow(a[0], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    elif a.ndim == 3:
        ax.imshow(np.clip((a[:3].transpose(1, 2, 0) - lo) / (hi - lo), 0, 1), interpolation="nearest")
    else:
        ax.imshow(a, cmap="gray", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
