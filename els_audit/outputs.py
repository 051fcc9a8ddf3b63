"""What an audit writes: the report folder (``index.html``, ``summary.json``, ``arrays.npz``).

:func:`check_output_dir` refuses a folder that must not be replaced before any work is
done; :func:`write_outputs` writes the folder atomically (:mod:`els_audit.atomic`);
:func:`summary_schema` is the JSON Schema ``summary.json`` follows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import numpy as np

from .atomic import Staging
from .audit import AuditError, AuditResult
from .serialize import dumps

__all__ = ["REPORT_FILES", "check_output_dir", "write_outputs", "summary_schema"]

#: the files a report folder holds (an existing --out folder may hold only these)
REPORT_FILES = ("index.html", "summary.json", "arrays.npz")


def summary_schema() -> dict:
    """The JSON Schema of summary.json (``els_audit/summary_schema.json``, shipped with the package)."""
    from importlib.resources import files

    return json.loads(files("els_audit").joinpath("summary_schema.json").read_text(encoding="utf-8"))


def check_output_dir(out_dir: Union[str, Path]) -> Path:
    """Refuse an output folder that :func:`write_outputs` must not replace (checked before the
    audit runs, so that minutes of work are not lost at the end).

    Returns:
        the resolved path.
    Raises:
        AuditError: ``out_dir`` is a file, or a folder holding anything but a previous report.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise AuditError(f"--out {out} exists and is not a folder; choose another --out")
    if out.is_dir():
        # NB: an existing folder is replaced as a whole, so only a previous report may be
        # (never a folder holding anything else, e.g. --out . or --out ~)
        others = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES)
        if others:
            raise AuditError(f"--out {out} already holds other files ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}); choose a new or empty folder")
    return out


def write_outputs(result: AuditResult, out_dir: Union[str, Path], *, html: bool = True) -> Path:
    """Write ``index.html``, ``summary.json`` and ``arrays.npz`` into ``out_dir``, atomically.

    Everything is written into a temporary folder beside ``out_dir`` (same parent, so the
    final rename does not cross file systems) and renamed into place at the end; an
    existing ``out_dir`` is replaced only then, and only if it holds nothing but a previous
    report's files (:data:`REPORT_FILES`).  On any error nothing is left behind.

    Args:
        result: from :func:`run_audit`.
        out_dir: the report folder.
        html: also write the HTML report.
    Returns:
        the report folder.
    """
    out = check_output_dir(out_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AuditError(f"cannot create the output folder {out.parent} ({exc.strerror or exc}); "
                         f"choose another --out") from None
    with Staging() as st:
        tmp = st.folder(out)
        (tmp / "summary.json").write_text(dumps(result.to_dict()))
        np.savez_compressed(tmp / "arrays.npz", **result.arrays())
        if html:
            from .report import render_html

            (tmp / "index.html").write_text(render_html(result), encoding="utf-8")
    return out
