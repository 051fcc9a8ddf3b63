"""What an audit writes, checked before any work and committed all together or not at all.

The outputs are the report folder (``index.html``, ``summary.json``, ``arrays.npz`` and
the marker :data:`MARKER`), with ``--json PATH`` a copy of ``summary.json``, and with
``--model-card PATH`` a Hugging Face model card (:mod:`els_audit.model_card`).

- :func:`plan_outputs` checks every output path before the audit runs, so that minutes of
  work are never lost to an output that cannot be written: a file where a folder is
  wanted (or a folder where a file is), a path under a file, a folder that cannot be
  written to, ``--json`` inside the report folder.
- Nothing the tool did not write is replaced.  A report folder holds :data:`MARKER`; an
  existing folder is replaced only when it holds that marker and nothing but a report's
  files (an empty folder is used as it is).  An existing ``--json`` file is replaced only
  when it is an els-audit summary, an existing ``--model-card`` file only when it holds the
  card marker.
- :func:`write_outputs` stages every output beside its final place and renames them all
  into place together (:class:`els_audit.atomic.Staging`); on any error, or a signal,
  nothing is left behind and what was there before is kept.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from . import __version__
from .atomic import Staging
from .audit import AuditError, AuditResult
from .serialize import dumps

__all__ = ["REPORT_FILES", "MARKER", "OutputPlan", "plan_outputs", "check_output_dir", "check_json_path",
           "check_card_path", "write_outputs", "summary_schema"]

#: the files a report folder holds
REPORT_FILES = ("index.html", "summary.json", "arrays.npz")
#: the file that says a folder is a report this tool wrote (and may replace)
MARKER = ".els-audit-report"
#: ``summary.json``'s schema id (a ``--json`` file holding it may be replaced)
SUMMARY_SCHEMA_ID = "els-audit/summary/1"

PathLike = Union[str, Path]


def summary_schema() -> dict:
    """The JSON Schema of summary.json (``els_audit/summary_schema.json``, shipped with the package)."""
    from importlib.resources import files

    return json.loads(files("els_audit").joinpath("summary_schema.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------
# checks before any work
# ---------------------------------------------------------------------------------------
def _why(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    return exc.strerror or type(exc).__name__


#: what the staging adds to a name (".NAME.tmp-" and 8 random characters, or ".old-")
_STAGING_EXTRA = len("..tmp-") + 8


def _writable_folder(path: Path, flag: str, shown: str) -> None:
    """Refuse ``path`` unless it can be staged and placed: not a symbolic link, names short
    enough for the file system (with the staging's temporary name), and the nearest existing
    ancestor a folder we can create files in."""
    if path.is_symlink():
        raise AuditError(f"{flag} {shown} is a symbolic link; give the real path (a link is not replaced)")
    a = path.parent
    missing = [path.name]
    while not a.exists():
        if a.is_symlink():                           # a dangling link
            raise AuditError(f"{flag} {shown}: {a} is a broken link; choose another {flag}")
        missing.append(a.name)
        a = a.parent
    if not a.is_dir():
        raise AuditError(f"{flag} {shown} lies under {a}, which is a file, not a folder; choose another {flag}")
    try:
        name_max = os.pathconf(a, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    too_long = [n for n in missing if len(os.fsencode(n)) + (_STAGING_EXTRA if n == path.name else 0) > name_max]
    if too_long:
        raise AuditError(f"{flag} {shown}: the name {too_long[0][:40]}... is too long for the file system "
                         f"(at most {name_max - _STAGING_EXTRA} characters for the last part); choose a shorter {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".els-audit-probe-", dir=a)
    except OSError as exc:
        raise AuditError(f"{flag} {shown}: cannot write in {a} ({_why(exc)}); choose another {flag}") from None
    os.close(fd)
    os.unlink(probe)


def check_output_dir(out_dir: PathLike, flag: str = "--out") -> Path:
    """The report folder, refused unless :func:`write_outputs` may write or replace it.

    Returns:
        the absolute path.
    Raises:
        AuditError: a file, a folder this tool did not write (or holding other files), or a
            place that cannot be written.
    """
    shown = str(out_dir)
    out = Path(os.path.abspath(Path(out_dir).expanduser()))
    if out.exists() and not out.is_dir():
        raise AuditError(f"{flag} {shown} exists and is not a folder; choose another {flag}")
    if out.is_dir() and not out.is_symlink():
        names = sorted(p.name for p in out.iterdir())
        others = [n for n in names if n not in REPORT_FILES and n != MARKER]
        # NB: a report's files are plain files; a folder called summary.json is the user's
        others += [n for n in names if n not in others and not _plain_file(out / n)]
        if names and MARKER not in names:
            # NB: an existing folder is replaced as a whole; only what this tool wrote may be
            # (never the user's own index.html, nor --out . or --out ~)
            raise AuditError(f"{flag} {shown} already exists and was not written by els-audit "
                             f"(it holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); "
                             f"choose a new or empty folder")
        if others:
            raise AuditError(f"{flag} {shown} already holds other files ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}); choose a new or empty folder")
    _writable_folder(out, flag, shown)
    return out


def _plain_file(p: Path) -> bool:
    return p.is_file() and not p.is_symlink()


def _is_summary(path: Path) -> bool:
    """Whether ``path`` is a summary.json this tool wrote (read whole, up to 64 MB)."""
    try:
        if not _plain_file(path) or path.stat().st_size > 64 << 20:
            return False
        d = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(d, dict) and d.get("schema") == SUMMARY_SCHEMA_ID and {"checks", "exit_code", "config"} <= set(d)


def _output_file(given: PathLike, flag: str, folder_hint: str, ours: Callable[[Path], bool], not_ours: str,
                 out: Optional[Path], inside_out: str, merge_hint: str = "") -> Path:
    """An output file the tool may write (``--json``, ``--model-card``), else AuditError: a
    symbolic link, a folder, an existing file ``ours`` does not recognise, a path inside the
    report folder ``out``, or a place that cannot be written."""
    path = Path(os.path.abspath(Path(given).expanduser()))
    if path.is_symlink():
        raise AuditError(f"{flag} {given} is a symbolic link; give the real path (a link is not replaced)")
    if path.is_dir():
        raise AuditError(f"{flag} {given} is a folder; give a file path{folder_hint}")
    if path.exists() and not ours(path):
        raise AuditError(f"{flag} {given} exists and {not_ours}; choose another path (nothing the tool did not "
                         f"write is overwritten{merge_hint})")
    if out is not None and (path == out or out in path.parents):
        raise AuditError(f"{flag} {given} lies inside the report folder, which {inside_out}; choose a path outside it")
    _writable_folder(path, flag, str(given))
    return path


def check_json_path(json_out: Optional[str], out: Optional[Path] = None) -> Optional[Path]:
    """The ``--json`` file (``None`` for none or ``-``, stdout), refused unless it may be written.

    Raises:
        AuditError: a folder, a file that is not an els-audit summary, a path inside the
            report folder ``out``, or a place that cannot be written.
    """
    if json_out is None or json_out == "-":
        return None
    if not str(json_out).strip():
        raise AuditError("--json is empty; give a file path, or - for stdout")
    return _output_file(json_out, "--json", "", _is_summary, "is not an els-audit summary", out,
                        "already holds summary.json")


def _is_card(path: Path) -> bool:
    """Whether ``path`` is a model card this tool wrote (its marker within the first 64 kB)."""
    from .model_card import CARD_MARKER

    try:
        if not _plain_file(path):
            return False
        with open(path, "rb") as f:
            return CARD_MARKER.encode() in f.read(64 << 10)
    except OSError:
        return False


def check_card_path(card: Optional[PathLike], out: Optional[Path] = None, json_path: Optional[Path] = None) -> Optional[Path]:
    """The ``--model-card`` file, refused unless it may be written (as :func:`check_json_path`:
    an existing file is replaced only when this tool wrote it)."""
    if card is None:
        return None
    if not str(card).strip():
        raise AuditError("--model-card is empty; give a file path, e.g. README.md")
    path = _output_file(card, "--model-card", f", e.g. {Path(card) / 'README.md'}", _is_card,
                        "was not written by els-audit", out, "is replaced as a whole",
                        "; merge the cards with huggingface_hub")
    if json_path is not None and path == json_path:
        raise AuditError(f"--model-card {card} is also the --json file; give two paths")
    return path


@dataclass(frozen=True)
class OutputPlan:
    """Where an audit's outputs go, checked (:func:`plan_outputs`).

    ``folder``: the report folder; ``json``: the ``--json`` file or None; ``stdout``: also
    print the summary; ``html``: write ``index.html``; ``card``: the ``--model-card`` file
    or None.
    """

    folder: Path
    json: Optional[Path] = None
    stdout: bool = False
    html: bool = True
    card: Optional[Path] = None


def plan_outputs(out_dir: PathLike, json_out: Optional[str] = None, *, html: bool = True,
                 card: Optional[PathLike] = None) -> OutputPlan:
    """Check every output path before any work (see the module docstring).

    Raises:
        AuditError: the one-line reason an output cannot be written.
    """
    folder = check_output_dir(out_dir)
    json_path = check_json_path(json_out, folder)
    return OutputPlan(folder=folder, json=json_path, stdout=json_out == "-", html=html,
                      card=check_card_path(card, folder, json_path))


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------
def write_outputs(result: AuditResult, out: Union[OutputPlan, PathLike], *, html: bool = True) -> Path:
    """Write the report folder (and the ``--json`` file) all together or not at all.

    Args:
        result: from :func:`els_audit.audit.run_audit`.
        out: an :class:`OutputPlan`, or the report folder (checked here).
        html: also write the HTML report (when ``out`` is a folder; a plan says it itself).

    Returns:
        the report folder.
    """
    plan = out if isinstance(out, OutputPlan) else plan_outputs(out, html=html)
    plan = plan_outputs(plan.folder, None if plan.json is None else str(plan.json), html=plan.html,
                        card=plan.card)                                                  # again: time passed
    text = dumps(result.to_dict())
    with Staging() as st:
        tmp = st.folder(plan.folder)
        (tmp / "summary.json").write_text(text)
        np.savez_compressed(tmp / "arrays.npz", **result.arrays())
        if plan.html:
            from .report import render_html

            (tmp / "index.html").write_text(render_html(result), encoding="utf-8")
        (tmp / MARKER).write_text(f"written by els-audit {__version__}; the next audit written here replaces "
                                  f"this folder as a whole\n")
        if plan.json is not None:
            st.file(plan.json, text)
        if plan.card is not None:
            from .model_card import model_card

            st.file(plan.card, model_card(json.loads(text)))              # reads what summary.json holds
    return plan.folder
