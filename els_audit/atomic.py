"""Write files and folders so that nobody ever sees half of them: the one atomic writer.

Every output is first written to a temporary beside its final place (same parent, so the
final rename never crosses file systems), and a :class:`Staging` renames all of its
outputs into place together at the end, or none of them:

    with Staging() as st:
        folder = st.folder(Path("reports/m"))          # a fresh temporary folder to fill
        (folder / "summary.json").write_text(text)
        st.file(Path("summary.json"), text)            # a file, written now, placed at commit
    # leaving the block without an exception commits; an exception discards the temporaries

An output that already exists is moved aside first (within its folder) and deleted only
once every rename has succeeded; when one rename fails, the ones before it are undone and
the old outputs put back.  SIGINT, SIGTERM and SIGHUP are held back while the renames run
(they are delivered right after), so a signal never leaves half of the outputs in place.
Temporaries are named ``.NAME.tmp-XXXX`` and set aside outputs ``.NAME.old-XXXX``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

__all__ = ["Staging", "write_file_atomic", "default_mode"]


def default_mode(folder: bool) -> int:
    """The permissions an ordinary new file (0666) or folder (0777) gets under the umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


_HELD = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back for the block: their handlers are swapped for one
    that only records them, and each recorded signal is raised again, to its own handler,
    when the block ends.  (Python runs handlers in the main thread, whichever thread the OS
    delivered to, so this holds where a thread's signal mask would not.)"""
    if threading.current_thread() is not threading.main_thread():   # handlers are the main thread's
        yield
        return
    pending: list[int] = []

    def hold(signum, frame):
        pending.append(signum)

    old = {s: signal.signal(s, hold) for s in _HELD}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def _mode_of(final: Path, folder: bool) -> int:
    """The permissions of the output ``final`` replaces (a replaced report keeps a private
    folder private), else those of an ordinary new file or folder."""
    try:
        if not final.is_symlink() and (final.is_dir() if folder else final.is_file()):
            return final.stat().st_mode & 0o777
    except OSError:
        pass
    return default_mode(folder)


def _aside(final: Path) -> Path:
    """A free name beside ``final`` to move it to (same folder: no permission on it needed)."""
    while True:
        p = final.parent / f".{final.name}.old-{secrets.token_hex(4)}"
        if not (p.exists() or p.is_symlink()):
            return p


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class Staging:
    """Outputs written to temporaries now and renamed into place together by :meth:`commit`."""

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []            # (temporary, final)
        self._made: list[Path] = []                            # folders created for them, outermost first

    def _parent(self, final: Path) -> None:
        """Create ``final``'s missing parent folders, remembering them (removed on discard)."""
        missing = []
        p = final.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self._made.append(d)

    def folder(self, final: Union[str, Path], mode: Optional[int] = None) -> Path:
        """A new, empty temporary folder that becomes ``final`` at commit (``mode``: its
        permissions; by default those of the folder it replaces, else an ordinary folder's)."""
        final = Path(final)
        self._parent(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        self._staged.append((tmp, final))
        tmp.chmod(_mode_of(final, True) if mode is None else mode)   # mkdtemp makes 0700
        return tmp

    def file(self, final: Union[str, Path], data: Union[str, bytes]) -> Path:
        """Write ``data`` (text as UTF-8) to a temporary that becomes ``final`` at commit."""
        final = Path(final)
        self._parent(final)
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
        tmp = Path(name)
        self._staged.append((tmp, final))
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        tmp.chmod(_mode_of(final, False))                         # mkstemp makes 0600
        return tmp

    def commit(self) -> None:
        """Rename every temporary into place; on failure undo what was done, and re-raise."""
        with _signals_held():
            self._commit()

    def _commit(self) -> None:
        done: list[tuple[Path, Path, Optional[Path]]] = []       # (temporary, final, set aside)
        try:
            for tmp, final in self._staged:
                aside = None
                if final.exists() or final.is_symlink():
                    aside = _aside(final)
                    os.replace(final, aside)
                done.append((tmp, final, aside))
                os.replace(tmp, final)
        except BaseException:
            for tmp, final, aside in reversed(done):
                if not tmp.exists() and (final.exists() or final.is_symlink()):
                    os.replace(final, tmp)                      # undo the rename; discarded below
                if aside is not None:
                    os.replace(aside, final)
            self.discard()
            raise
        for _, _, aside in done:
            if aside is not None:
                _remove(aside)
        self._staged, self._made = [], []

    def discard(self) -> None:
        """Remove every temporary not yet committed, and the folders created for them."""
        for tmp, _ in self._staged:
            _remove(tmp)
        for d in reversed(self._made):
            try:
                d.rmdir()                                      # only while empty
            except OSError:
                pass
        self._staged, self._made = [], []

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_file_atomic(path: Union[str, Path], data: Union[str, bytes]) -> Path:
    """Write one file atomically (see :class:`Staging`); returns ``path``."""
    with Staging() as st:
        st.file(path, data)
    return Path(path)
