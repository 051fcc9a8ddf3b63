"""Which ``sys.path`` entries point at the current folder without the user asking, and how to
import without them.

``python -m els_audit`` (and ``python -c``, and an empty entry in ``PYTHONPATH``) put the
current folder on ``sys.path``: run from a model's download folder, a planted ``torch.py``,
``typing.py`` or ``evilarch.py`` beside the weights would then be imported as if it were
installed code.  A folder counts as *explicit* only when the user named it in
``PYTHONPATH`` (an empty entry names nothing); the implicit entries are the ones that
resolve to the current folder (or to a folder a caller names: the model's) otherwise.

NB: the package's ``__init__`` runs :func:`drop_implicit_cwd` before it imports anything
else, so this module imports nothing at its top but ``os`` and ``sys``, which Python has
loaded before any of its code runs (no ``from __future__``, no ``typing``).
"""

import os
import sys

__all__ = ["implicit_entries", "drop_implicit_cwd", "import_without_implicit_paths"]


def _norm(entry):
    try:
        return os.path.realpath(entry or os.curdir)
    except (OSError, ValueError):
        return entry


def implicit_entries(extra=()):
    """Indices of ``sys.path`` entries that point at the current folder (or at one of the
    folders ``extra``) without the user having named them in ``PYTHONPATH``."""
    hidden = {_norm(os.curdir)} | {_norm(str(e)) for e in extra}
    explicit = {_norm(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    return [i for i, p in enumerate(sys.path)
            if isinstance(p, str) and _norm(p) in hidden and _norm(p) not in explicit]


def drop_implicit_cwd():
    """When els-audit is the program being run: remove every implicit current-folder entry."""
    for i in reversed(implicit_entries()):
        del sys.path[i]


def import_without_implicit_paths(name, extra=()):
    """``importlib.import_module(name)`` with the implicit entries (and ``extra`` folders)
    off ``sys.path`` for the duration of the import."""
    import importlib

    idx = implicit_entries(extra)
    removed = [(i, sys.path[i]) for i in idx]
    for i in reversed(idx):
        del sys.path[i]
    try:
        return importlib.import_module(name)
    finally:
        for i, p in removed:
            sys.path.insert(i, p)
