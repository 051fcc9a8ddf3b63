"""Write files and folders so that nobody ever sees half of them: the one atomic writer.

Every output is first written to a temporary beside its final place (same parent, so the
final rename never crosses file systems), and a :class:`Staging` renames all of its
outputs into place together at the end, or none of them:

    with Staging() as st:
        folder = st.folder(Path("reports/m"))          # a fresh temporary folder to fill
        (folder / "summary.json").write_text(text)
        st.file(Path("summary.json"), text)            # a file, written now, placed at commit
    # leaving the block without an exception commits; an exception discards the temporaries

An output that already exists is moved aside first and deleted only once every rename
has succeeded; when one rename fails, the ones before it are undone and the old outputs
put back.  Temporaries are named ``.NAME.tmp-XXXX`` and set aside outputs ``.NAME.old-XXXX``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

__all__ = ["Staging", "write_file_atomic", "default_mode"]


def default_mode(folder: bool) -> int:
    """The permissions an ordinary new file (0666) or folder (0777) gets under the umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class Staging:
    """Outputs written to temporaries now and renamed into place together by :meth:`commit`."""

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []            # (temporary, final)

    def folder(self, final: Union[str, Path], mode: Optional[int] = None) -> Path:
        """A new, empty temporary folder that becomes ``final`` at commit (``mode``: its
        permissions, default an ordinary folder's)."""
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        self._staged.append((tmp, final))
        tmp.chmod(default_mode(True) if mode is None else mode)   # mkdtemp makes 0700
        return tmp

    def file(self, final: Union[str, Path], data: Union[str, bytes]) -> Path:
        """Write ``data`` (text as UTF-8) to a temporary that becomes ``final`` at commit."""
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
        tmp = Path(name)
        self._staged.append((tmp, final))
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        tmp.chmod(default_mode(False))                            # mkstemp makes 0600
        return tmp

    def commit(self) -> None:
        """Rename every temporary into place; on failure undo what was done, and re-raise."""
        done: list[tuple[Path, Path, Optional[Path]]] = []       # (temporary, final, set aside)
        try:
            for tmp, final in self._staged:
                aside = None
                if final.exists() or final.is_symlink():
                    aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent)) / final.name
                    os.replace(final, aside)
                done.append((tmp, final, aside))
                os.replace(tmp, final)
        except BaseException:
            for tmp, final, aside in reversed(done):
                if not tmp.exists() and (final.exists() or final.is_symlink()):
                    os.replace(final, tmp)                      # undo the rename; discarded below
                if aside is not None:
                    os.replace(aside, final)
                    aside.parent.rmdir()
            self.discard()
            raise
        for _, _, aside in done:
            if aside is not None:
                _remove(aside.parent)
        self._staged = []

    def discard(self) -> None:
        """Remove every temporary not yet committed."""
        for tmp, _ in self._staged:
            _remove(tmp)
        self._staged = []

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
