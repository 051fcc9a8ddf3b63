"""Which ``sys.path`` entries Python added on its own, and how to import without them.

``python -m els_audit`` (and ``python script.py``, ``python -c``) put the current folder
(or the script's) first on ``sys.path``: run from a model's download folder, a planted
``torch.py`` or ``evilarch.py`` beside the weights would then be imported as if it were
installed code.  A folder counts as *explicit* only when the user named it in
``PYTHONPATH``; the implicit entries are ``""``, ``"."`` and the current folder, plus any
folder a caller names (the model's).  This module imports nothing heavy, so that the
package's ``__init__`` can use it before it imports torch.
"""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from types import ModuleType
from typing import Iterable, Iterator

__all__ = ["implicit_entries", "drop_implicit_cwd", "import_without_implicit_paths"]


def _norm(entry: str) -> str:
    try:
        return os.path.realpath(entry or os.curdir)
    except (OSError, ValueError):
        return entry


def _explicit() -> set[str]:
    return {_norm(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}


def implicit_entries(extra: Iterable[str] = ()) -> list[int]:
    """Indices of ``sys.path`` entries that point at the current folder (or at one of
    ``extra``) without the user having named them in ``PYTHONPATH``."""
    hidden = {_norm(os.curdir)} | {_norm(str(e)) for e in extra}
    explicit = _explicit()
    return [i for i, p in enumerate(sys.path)
            if isinstance(p, str) and _norm(p) in hidden and _norm(p) not in explicit]


def drop_implicit_cwd() -> None:
    """Under ``python -m els_audit``: remove the current folder Python put first on ``sys.path``."""
    if sys.path and 0 in implicit_entries():
        del sys.path[0]


@contextmanager
def _hidden(extra: Iterable[str]) -> Iterator[None]:
    idx = implicit_entries(extra)
    removed = [(i, sys.path[i]) for i in idx]
    for i in reversed(idx):
        del sys.path[i]
    try:
        yield
    finally:
        for i, p in removed:
            sys.path.insert(i, p)


def import_without_implicit_paths(name: str, extra: Iterable[str] = ()) -> ModuleType:
    """``importlib.import_module(name)`` with the implicit entries (and ``extra`` folders)
    off ``sys.path`` for the duration of the import."""
    with _hidden(extra):
        return importlib.import_module(name)
