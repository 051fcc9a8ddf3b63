"""Keep what libraries print while a model loads: warnings and log lines, as text, not on stderr.

torch (and diffusers, safetensors) warn and log while they read files: a deprecation
warning, or a whole traceback logged at WARNING level before a corrupt ``.pt2`` is
refused.  The audit's contract is one line on stderr, so :func:`capture_library_output`
collects them, and the loader summarises them into the model's notes (or the one-line
error) with :func:`summarise`.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

from ..console import text

__all__ = ["capture_library_output", "summarise"]

#: libraries that read model files; their loggers (children included) are captured, and the root
_LIBRARIES = ("torch", "diffusers", "safetensors", "huggingface_hub", "transformers")


class _Collect(logging.Handler):
    def __init__(self, out: list[str]):
        super().__init__(logging.DEBUG)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING:
            return
        line = text(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            line += f": {type(exc).__name__}: {text(exc)}"
        self.out.append(f"{record.name or 'root'}: {line}")


def _library_loggers() -> list[logging.Logger]:
    """The root logger and every existing logger of the libraries in :data:`_LIBRARIES`."""
    out = [logging.root]
    for name in _LIBRARIES:
        out.append(logging.getLogger(name))
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger) and any(name.startswith(lib + ".") for lib in _LIBRARIES):
            out.append(lg)
    return out


@contextmanager
def capture_library_output() -> Iterator[list[str]]:
    """Collect warnings and WARNING-or-worse log records raised inside the block.

    Yields the list the lines are appended to (one line each).  The libraries' own handlers
    are detached for the block and put back afterwards.
    """
    lines: list[str] = []
    handler = _Collect(lines)
    saved = []
    for lg in _library_loggers():
        saved.append((lg, lg.handlers[:], lg.propagate))
        lg.handlers = [handler] if lg is logging.root else []
        lg.propagate = lg is not logging.root
    try:
        with warnings.catch_warnings(record=True) as caught:   # the filters in force stay
            yield lines
        for w in caught:
            lines.append(f"{w.category.__name__}: {text(w.message)}")
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers = handlers
            lg.propagate = propagate


def summarise(lines: list[str], limit: int = 200) -> str:
    """One line for the captured output: the first line (cut at ``limit``) and how many more."""
    if not lines:
        return ""
    first = lines[0] if len(lines[0]) <= limit else lines[0][: limit - 3] + "..."
    return first + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else "")
