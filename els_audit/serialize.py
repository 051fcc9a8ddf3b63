"""One JSON policy for every result the audit writes.

Every ``to_dict()`` and ``summary.json`` go through :func:`json_safe`, so the rules are
stated once: NaN and infinities become ``null`` (JSON has no such numbers, and a gate reads
``null`` as "undefined", see :mod:`els_audit.checks`); numpy scalars and arrays become
Python numbers and lists; tuples become lists; mapping keys become strings; paths become
strings; anything else becomes ``default(x)`` (``str`` unless the caller says otherwise).
"""

from __future__ import annotations

import json
import math
from pathlib import PurePath
from typing import Any, Callable, Mapping, Optional

import numpy as np

__all__ = ["json_safe", "json_float", "dumps"]


def json_float(v: Any) -> Optional[float]:
    """``float(v)``, or ``None`` when it is NaN or infinite."""
    v = float(v)
    return v if math.isfinite(v) else None


def json_safe(x: Any, default: Callable[[Any], Any] = str) -> Any:
    """A copy of ``x`` that ``json.dumps(..., allow_nan=False)`` accepts (see the module docstring).

    Args:
        x: nested dicts, lists, tuples, numbers, numpy values, strings, paths, ...
        default: what to make of any other object (``str`` by default).
    """
    if x is None or isinstance(x, str):
        return x
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return json_float(x)
    if isinstance(x, Mapping):
        return {str(k): json_safe(v, default) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v, default) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist(), default)
    if isinstance(x, PurePath):
        return str(x)
    return default(x)


def dumps(obj: Any) -> str:
    """``obj`` as indented JSON text (through :func:`json_safe`), ending in a newline."""
    return json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n"
