"""The command's console discipline: what reaches stdout and stderr, and what a signal does.

The command's contract (README, "Security model") is one line on stderr when the audit
cannot run, progress lines otherwise, and only the summary on stdout with ``--json -``.
Libraries and the model's own code do not know that: torch warns from a ``forward``, a
library installs its own stderr handler on import, a ``__del__`` raises, a model prints.

- :class:`ConsoleCapture` keeps every byte they write away from the console while the audit
  runs: ``sys.stdout``/``sys.stderr`` are swapped for buffers, file descriptors 1 and 2
  point at a temporary file (for what C code and already-bound handlers write), Python
  warnings are recorded, and unraisable exceptions (``__del__``) are collected.  The
  command's own lines go to :attr:`ConsoleCapture.err` / :attr:`ConsoleCapture.out`, the
  real streams.
- :func:`signals_raise` turns SIGTERM and SIGHUP into :class:`Terminated`.
- :func:`text` is ``str(exc)`` on one line that cannot itself fail.
"""

from __future__ import annotations

import gc
import io
import os
import signal
import sys
import tempfile
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional, TextIO

__all__ = ["ConsoleCapture", "Terminated", "signals_raise", "text", "silence_after_exit"]


def _printable(c: str) -> str:
    if c.isprintable():
        return c
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def text(obj: object, limit: Optional[int] = None) -> str:
    """``str(obj)`` on one line (cut at ``limit``), or a placeholder when ``str`` itself fails.

    Characters a terminal would act on (escape sequences that move the cursor, erase a line or
    set the window title, from a key name in a downloaded file) are written as ``\\x1b``."""
    try:
        s = " ".join(str(obj).split())
    except BaseException:  # noqa: BLE001 - an exception whose __str__ raises must still be shown
        s = f"<{type(obj).__name__} that cannot be shown as text>"
    if not s.isprintable():
        s = "".join(map(_printable, s))
    return s if limit is None or len(s) <= limit else s[: limit - 3] + "..."


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived (a CI time-out, a closed terminal): unwind like Ctrl-C, so
    that nothing half-written is left behind.  A BaseException, as KeyboardInterrupt is, so
    that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)


#: the signals that raised :class:`Terminated` in the current block: kept, because a library's
#: C code may swallow the exception (Ray's ``ray.get`` turned it into a SystemError, or lost it)
_PENDING: list[int] = []
_INSIDE: list[bool] = []                    # one entry per open signals_raise block


def raise_if_terminated() -> None:
    """Inside a :func:`signals_raise` block: raise :class:`Terminated` again if a signal
    arrived whose exception was lost on the way."""
    if _PENDING and _INSIDE:
        raise Terminated(_PENDING[0])


def pending_termination() -> Optional[Terminated]:
    """The :class:`Terminated` a signal in the current block raised, if one did."""
    return Terminated(_PENDING[0]) if _PENDING else None


@contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Terminated` inside the block (the main thread only);
    the signal is also kept (:func:`raise_if_terminated`)."""
    names = [n for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _PENDING.clear()

    def handler(signum, frame):
        _PENDING.append(signum)
        raise Terminated(signum)

    old = {n: signal.signal(getattr(signal, n), handler) for n in names}
    _INSIDE.append(True)
    try:
        yield
    finally:
        _INSIDE.pop()
        for n, h in old.items():
            signal.signal(getattr(signal, n), h)


class _Buffer(io.StringIO):
    """What stands in for sys.stdout and sys.stderr: a model that closes it does not lose it."""

    def close(self) -> None:
        pass


def _fd_ok(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


class ConsoleCapture:
    """Keep libraries' and the model's output off the console for the block (see the module
    docstring).  ``enabled=False`` (``--debug``) lets everything through.

    Attributes:
        out, err: the real stdout and stderr, for the command's own lines.
        lines: what was captured, one entry per non-empty line (after the block).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.out: TextIO = sys.stdout
        self.err: TextIO = sys.stderr
        self.lines: list[str] = []

    def __enter__(self) -> "ConsoleCapture":
        self.out, self.err = sys.stdout, sys.stderr
        if not self.enabled:
            return self
        self._py = (sys.stdout, sys.stderr)
        self._buf = _Buffer()
        self._fds: list[tuple[int, int]] = []
        self._file = tempfile.TemporaryFile()
        self._warn = self._caught = None
        self._hook = sys.unraisablehook
        try:
            self._redirect()
        except BaseException:
            self.__exit__(None, None, None)           # put back whatever was already swapped
            raise
        return self

    def _redirect(self) -> None:
        for s in self._py:
            try:
                s.flush()
            except (OSError, ValueError, AttributeError):
                pass
        for fd in (1, 2):
            if _fd_ok(fd):
                self._fds.append((fd, os.dup(fd)))
                os.dup2(self._file.fileno(), fd)
        saved = dict(self._fds)
        if 2 in saved and self.err is sys.__stderr__:
            # the command's own lines must reach the real stderr, which fd 2 no longer is
            self.err = os.fdopen(os.dup(saved[2]), "w", buffering=1, closefd=True)
        if 1 in saved and self.out is sys.__stdout__:
            self.out = os.fdopen(os.dup(saved[1]), "w", buffering=1, closefd=True)
        sys.stdout = sys.stderr = self._buf
        self._warn = warnings.catch_warnings(record=True)
        self._caught = self._warn.__enter__()
        sys.unraisablehook = lambda u: self.lines.append(
            f"{type(u.exc_value).__name__} in {text(getattr(u.object, '__qualname__', u.object), 80)}: "
            f"{text(u.exc_value, 200)}")

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.enabled:
            return
        try:
            gc.collect()                      # __del__ of the model's garbage, while the hook listens
        finally:
            sys.unraisablehook = self._hook
            if self._warn is not None:
                self._warn.__exit__(None, None, None)
            sys.stdout, sys.stderr = self._py
            for fd, saved in self._fds:
                os.dup2(saved, fd)
                os.close(saved)
            for mine, theirs in ((self.err, self._py[1]), (self.out, self._py[0])):
                if mine is not theirs:
                    try:
                        mine.close()
                    except OSError:
                        pass
            self.out, self.err = self._py
            self._file.seek(0)
            raw = self._buf.getvalue() + self._file.read().decode("utf-8", "replace")
            self._file.close()
            self.lines += [f"{w.category.__name__}: {text(w.message, 200)}" for w in self._caught or ()]
            self.lines += [ln.strip() for ln in raw.splitlines() if ln.strip()]


def silence_after_exit() -> None:
    """Point stdout and stderr (the file descriptors and Python's objects) at the null device:
    the command has said all it has to say, and code the model left behind (``atexit``
    handlers, daemon threads) must not add to it.  Only for the real process: it does nothing
    when the streams are not the process's own (a test runner's)."""
    if sys.stdout is not sys.__stdout__ or sys.stderr is not sys.__stderr__:
        return
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except (OSError, ValueError, AttributeError):
            pass
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    for fd in (1, 2):
        if _fd_ok(fd):
            os.dup2(null, fd)
    os.close(null)
    sys.stdout = sys.stderr = open(os.devnull, "w")
