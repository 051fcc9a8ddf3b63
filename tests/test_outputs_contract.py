"""Outputs through the command line: checked before any work, nothing of the user's destroyed,
nothing half-written left by an error or a signal (issue 13, cases 4, 5 and 7)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_helpers import one_line_error
from cli_helpers import runner as _runner

from els_audit.cli import main
from els_audit.outputs import MARKER

TINY = ["--data", "mnist5k:size=32:limit=40", "--data-limit", "20", "--steps", "2", "--seeds", "1",
        "--calibration-seeds", "1", "--scales", "erf", "--threads", "1"]


@pytest.fixture
def no_audit(monkeypatch):
    """Fail the test if the audit itself starts: these inputs must be refused before any work."""
    def boom(*a, **k):
        raise AssertionError("the audit ran before the outputs were checked")

    monkeypatch.setattr("els_audit.audit.run_audit", boom)


def _refused(args, *needles):
    res = _runner().invoke(main, ["zoo:resnet-zeros", *TINY, "--quiet", *args])
    return one_line_error(res.exit_code, res.stderr, *needles)


def _tree(d):
    return sorted(str(p.relative_to(d)) for p in Path(d).rglob("*"))


# ----------------------------------------------------------------------------- case 4
@pytest.mark.parametrize("name", ["index.html", "summary.json", "arrays.npz"])
def test_a_folder_holding_only_the_users_own_report_file_is_never_replaced(tmp_path, no_audit, name):
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_text("the user's own")
    _refused(["--out", str(out)], "was not written by els-audit", name)
    assert (out / name).read_text() == "the user's own" and _tree(tmp_path) == ["mine", f"mine/{name}"]


def test_a_report_this_tool_wrote_is_replaced_and_an_empty_folder_used(tmp_path):
    out = tmp_path / "rep"
    out.mkdir()                                               # empty: fine
    res = _runner().invoke(main, ["zoo:resnet-circular", *TINY, "--quiet", "--no-report", "--out", str(out)])
    assert res.exit_code == 0, res.stderr
    assert _tree(tmp_path) == ["rep", f"rep/{MARKER}", "rep/arrays.npz", "rep/summary.json"]
    res = _runner().invoke(main, ["zoo:resnet-circular", *TINY, "--quiet", "--out", str(out)])
    assert res.exit_code == 0, res.stderr                     # its own report: replaced
    assert _tree(tmp_path) == ["rep", f"rep/{MARKER}", "rep/arrays.npz", "rep/index.html", "rep/summary.json"]


# ----------------------------------------------------------------------------- case 7
def test_out_under_a_file(tmp_path, no_audit):
    (tmp_path / "f").write_text("x")
    _refused(["--out", str(tmp_path / "f" / "rep")], "lies under", "which is a file")
    assert _tree(tmp_path) == ["f"]


@pytest.mark.parametrize("where", ["out", "json"])
def test_unwritable_places_are_refused_before_any_work(tmp_path, no_audit, monkeypatch, where):
    # the OS refuses to create files there (EACCES as for a read-only folder, EROFS alike)
    import tempfile

    ro = tmp_path / "ro"
    ro.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):
        if dir is not None and Path(dir) == ro:
            raise PermissionError(13, "Permission denied", str(dir))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    args = ["--out", str(ro / "rep")] if where == "out" else ["--out", str(tmp_path / "rep"), "--json",
                                                               str(ro / "s.json")]
    _refused(args, f"cannot write in {ro} (permission denied)")
    assert _tree(tmp_path) == ["ro"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into read-only folders; the case is covered by the EACCES test above")
def test_read_only_parent_for_real(tmp_path, no_audit):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _refused(["--out", str(ro / "rep")], "permission denied")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("case,needle", [("folder", "is a folder"), ("under-file", "which is a file"),
                                         ("foreign", "is not an els-audit summary"), ("inside-out", "inside the report folder"),
                                         ("empty", "--json is empty")])
def test_bad_json_paths_are_refused_before_any_work(tmp_path, no_audit, case, needle):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("x")
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    path = {"folder": tmp_path / "d", "under-file": tmp_path / "f" / "s.json", "foreign": tmp_path / "notes.json",
            "inside-out": tmp_path / "rep" / "s.json", "empty": ""}[case]
    _refused(["--out", str(tmp_path / "rep"), "--json", str(path)], needle)
    assert _tree(tmp_path) == ["d", "f", "notes.json"] and (tmp_path / "notes.json").read_text() == '{"mine": 1}'


def test_json_and_the_report_folder_are_committed_together(tmp_path, monkeypatch):
    # the --json rename fails: the report folder must not be left behind either
    import els_audit.atomic as atomic

    real = os.replace

    def replace(src, dst):
        if str(dst).endswith("s.json"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    res = _runner().invoke(main, ["zoo:resnet-circular", *TINY, "--quiet", "--no-report", "--out",
                                  str(tmp_path / "rep"), "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 2 and "No space left" in res.stderr
    assert _tree(tmp_path) == []


# ----------------------------------------------------------------------------- case 5
DRIVER = textwrap.dedent("""
    import os, signal, sys
    import els_audit.{module} as target
    from els_audit.cli import main

    real = target.{attr}
    def hook(*a, **k):
        os.kill(os.getpid(), signal.{sig})      # arrives in the middle of writing
        return real(*a, **k)
    setattr(target, "{attr}", hook)
    main(sys.argv[1:])
""")


def _signalled(tmp_path, work, sig, module, attr):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(module=module, attr=attr, sig=sig))
    return subprocess.run([sys.executable, str(script), "zoo:resnet-circular", *TINY, "--quiet", "--out",
                           str(work / "rep"), "--json", str(work / "s.json")],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_signal_while_writing_leaves_nothing_behind(tmp_path, sig):
    work = tmp_path / "work"
    work.mkdir()
    p = _signalled(tmp_path, work, sig, "report", "render_html")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert f"terminated by {sig}; nothing was written" in lines[0]
    assert _tree(work) == []                                  # no .rep.tmp-XXXX, no s.json


def test_a_signal_during_the_final_renames_waits_for_them(tmp_path):
    # a previous report is there; SIGTERM arrives as it is set aside: the renames finish first
    work = tmp_path / "work"
    res = _runner().invoke(main, ["zoo:resnet-zeros", *TINY, "--quiet", "--out", str(work / "rep"), "--json",
                                  str(work / "s.json")])
    assert res.exit_code == 0, res.stderr
    p = _signalled(tmp_path, work, "SIGTERM", "atomic", "_aside")
    assert p.returncode == 2 and "terminated by SIGTERM; the report had been written" in p.stderr, p.stderr
    assert _tree(work) == ["rep", f"rep/{MARKER}", "rep/arrays.npz", "rep/index.html", "rep/summary.json", "s.json"]
    new = json.loads((work / "s.json").read_text())
    assert new == json.loads((work / "rep" / "summary.json").read_text()) and new["name"] == "resnet-circular"


def test_a_marker_does_not_make_a_folder_of_user_data_replaceable(tmp_path, no_audit):
    out = tmp_path / "r"
    (out / "summary.json" / "x").mkdir(parents=True)           # a folder that only has a report file's name
    (out / "summary.json" / "x" / "thesis.tex").write_text("mine")
    (out / MARKER).write_text("planted")
    _refused(["--out", str(out)], "already holds other files (summary.json)")
    assert (out / "summary.json" / "x" / "thesis.tex").read_text() == "mine"


@pytest.mark.parametrize("content", ["schema-copy", "mentions"])
def test_json_overwrites_only_a_real_summary(tmp_path, no_audit, content):
    from els_audit.outputs import summary_schema

    f = tmp_path / "s.json"
    f.write_text(json.dumps(summary_schema()) if content == "schema-copy" else
                 'notes: "schema": "els-audit/summary/1" is what we validate against')
    before = f.read_text()
    _refused(["--out", str(tmp_path / "rep"), "--json", str(f)], "is not an els-audit summary")
    assert f.read_text() == before


def test_names_too_long_for_the_file_system_are_refused_before_any_work(tmp_path, no_audit):
    _refused(["--out", str(tmp_path / "a" / "b" / ("r" * 250))], "too long for the file system")
    _refused(["--out", str(tmp_path / "rep"), "--json", str(tmp_path / "j" / ("s" * 248 + ".json"))],
             "too long for the file system")
    assert _tree(tmp_path) == []


@pytest.mark.parametrize("which", ["out", "json"])
def test_symbolic_links_are_never_replaced(tmp_path, no_audit, which):
    (tmp_path / "target").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / ("target" if which == "out" else "nowhere.json"))
    args = ["--out", str(link)] if which == "out" else ["--out", str(tmp_path / "rep"), "--json", str(link)]
    _refused(args, "is a symbolic link")
    assert link.is_symlink()


def test_a_signal_leaves_no_parent_folders_it_created(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(module="report", attr="render_html", sig="SIGTERM"))
    p = subprocess.run([sys.executable, str(script), "zoo:resnet-circular", *TINY, "--quiet", "--out",
                        str(work / "new" / "deeper" / "rep")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "nothing was written" in p.stderr, p.stderr
    assert _tree(work) == []
