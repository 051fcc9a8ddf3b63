"""Paths as the user typed them, for everything the audit writes down.

A report or ``summary.json`` travels (into a registry, a review, a repository), so it must
not carry the layout of the machine it ran on.  :func:`display_path` writes a file the
audit read:

- under what the user typed (the model or data path, or the folder it lies in): in the
  user's own spelling, relative staying relative and ``~`` staying ``~``;
- inside an installed package (the zoo's weights, a data set shipped in a wheel):
  ``<installed>/package/...``, without the install location;
- under the home folder: ``~/...``;
- anywhere else: as it is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Union

__all__ = ["display_path", "INSTALLED"]

#: how a path inside an installed package starts
INSTALLED = "<installed>"

PathLike = Union[str, "os.PathLike[str]"]


def _real(p: PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(p))))


def _under(path: Path, base: Path) -> Optional[str]:
    try:
        rel = path.relative_to(base)
    except ValueError:
        return None
    return rel.as_posix()


def _join(base: str, rel: str) -> str:
    if rel in ("", "."):
        return base
    if base in ("", "."):
        return rel
    return base.rstrip("/\\") + "/" + rel


def _installed_roots() -> list[Path]:
    """Folders packages are imported from: ``sys.path`` entries and the one holding this package."""
    here = _real(os.curdir)
    # NB: the current folder is where the user's own files live, not an install (``python -m``
    # puts it on sys.path); this package's own folder is an install wherever it is
    roots = {_real(p) for p in sys.path if isinstance(p, str) and p and os.path.isdir(p)} - {here}
    roots.add(_real(Path(__file__).resolve().parent.parent))
    return sorted((r for r in roots if r != Path(r.anchor)), key=lambda r: -len(r.parts))


def display_path(actual: PathLike, typed: Optional[str] = None) -> str:
    """``actual`` written as the module docstring says.

    Args:
        actual: a file or folder the audit read.
        typed: what the user typed for the input it belongs to (a model or data path), if any.
    """
    real = _real(actual)
    if typed and not typed.startswith("zoo:"):
        t = _real(typed)
        for base_typed, base_real in ((typed, t), (os.path.dirname(typed.rstrip("/\\")), t.parent)):
            rel = _under(real, base_real)
            if rel is not None:
                return _join(base_typed, rel)
    for root in _installed_roots():
        rel = _under(real, root)
        if rel is not None:
            return _join(INSTALLED, rel)
    home = _real("~")
    rel = _under(real, home) if home != Path(home.anchor) else None
    if rel is not None:
        return _join("~", rel)
    return str(real)
