"""The one atomic writer (els_audit.atomic): all outputs placed together, or none."""

import os

import pytest

from els_audit.atomic import Staging, write_file_atomic


def _names(d):
    return sorted(p.name for p in d.iterdir())


def test_commit_places_folder_and_file_together_and_replaces_old(tmp_path):
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "old.txt").write_text("old")
    with Staging() as st:
        f = st.folder(tmp_path / "rep")
        (f / "new.txt").write_text("new")
        st.file(tmp_path / "s.json", "{}\n")
        assert not (tmp_path / "s.json").exists()                # nothing visible before the commit
    assert _names(tmp_path) == ["rep", "s.json"]                 # no temporaries, no set-aside copies
    assert _names(tmp_path / "rep") == ["new.txt"]
    assert (tmp_path / "s.json").read_text() == "{}\n"
    assert oct((tmp_path / "s.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_exception_in_block_discards_everything(tmp_path):
    (tmp_path / "s.json").write_text("mine")
    with pytest.raises(RuntimeError):
        with Staging() as st:
            st.folder(tmp_path / "rep")
            st.file(tmp_path / "s.json", "theirs")
            raise RuntimeError("boom")
    assert _names(tmp_path) == ["s.json"] and (tmp_path / "s.json").read_text() == "mine"


def test_a_failed_second_rename_undoes_the_first(tmp_path, monkeypatch):
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "old.txt").write_text("old")
    (tmp_path / "s.json").write_text("old json")
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((str(src), str(dst)))
        if str(dst) == str(tmp_path / "s.json") and ".tmp-" in str(src):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError):
        with Staging() as st:
            (st.folder(tmp_path / "rep") / "new.txt").write_text("new")
            st.file(tmp_path / "s.json", "new json")
    assert _names(tmp_path) == ["rep", "s.json"]
    assert _names(tmp_path / "rep") == ["old.txt"] and (tmp_path / "s.json").read_text() == "old json"


def test_write_file_atomic_creates_parents(tmp_path):
    p = write_file_atomic(tmp_path / "a" / "b.txt", b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01" and _names(tmp_path / "a") == ["b.txt"]


def test_a_replaced_output_keeps_its_permissions(tmp_path):
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep").chmod(0o700)
    (tmp_path / "s.json").write_text("{}")
    (tmp_path / "s.json").chmod(0o600)
    with Staging() as st:
        st.folder(tmp_path / "rep")
        st.file(tmp_path / "s.json", "{}")
    assert oct((tmp_path / "rep").stat().st_mode & 0o777) == oct(0o700)
    assert oct((tmp_path / "s.json").stat().st_mode & 0o777) == oct(0o600)
