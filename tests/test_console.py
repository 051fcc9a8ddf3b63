"""The command's console discipline (els_audit.console)."""

import os
import sys
import warnings

import pytest

from els_audit.console import ConsoleCapture, text


def test_capture_keeps_python_c_level_warning_and_unraisable_output_and_restores_everything(capfd):
    class Bad:
        def __del__(self):
            raise AttributeError("from __del__")

    hook = sys.unraisablehook
    with ConsoleCapture() as con:
        print("to stdout")
        print("to stderr", file=sys.stderr)
        os.write(2, b"raw fd 2\n")
        os.write(1, b"raw fd 1\n")
        warnings.warn("a library warning")
        Bad()                                               # collected at once: __del__ raises
        con.err.write("the command's own line\n")
    out, err = capfd.readouterr()
    assert "to stdout" not in out and "raw fd 1" not in out
    assert err.count("the command's own line") == 1 and "to stderr" not in err and "raw fd 2" not in err
    joined = "\n".join(con.lines)
    for piece in ("to stdout", "to stderr", "raw fd 2", "raw fd 1", "UserWarning: a library warning",
                  "AttributeError in", "from __del__"):
        assert piece in joined, piece
    assert sys.unraisablehook is hook and con.err is sys.stderr
    print("after")                                          # the streams are back
    assert "after" in capfd.readouterr().out


def test_disabled_capture_lets_everything_through(capfd):
    with ConsoleCapture(enabled=False) as con:
        print("visible")
    assert "visible" in capfd.readouterr().out and con.lines == []


def test_text_never_fails():
    class Loop(Exception):
        def __str__(self):
            raise Loop()

    assert text(Loop()) == "<Loop that cannot be shown as text>"
    assert text("a\n  b", limit=10) == "a b" and text("x" * 20, limit=10) == "xxxxxxx..."


def test_a_signal_whose_exception_a_library_swallowed_is_raised_again():
    """C code (Ray's ray.get) can turn the Terminated a signal raised into another error, or
    lose it: the signal is kept, and raise_if_terminated raises it again inside the block."""
    import signal

    from els_audit.console import Terminated, pending_termination, raise_if_terminated, signals_raise

    with signals_raise():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):                        # the handler runs between bytecodes
                pass
        except BaseException:                            # noqa: BLE001 - what a library might do
            pass
        assert str(pending_termination()) == "SIGTERM"
        with pytest.raises(Terminated, match="SIGTERM"):
            raise_if_terminated()
    raise_if_terminated()                                # outside the block: nothing to raise
    with signals_raise():
        assert pending_termination() is None             # a new block starts clean
        raise_if_terminated()


@pytest.mark.parametrize("then", ["raises another error", "returns as if nothing happened"])
def test_the_command_reports_a_swallowed_signal_and_writes_nothing(tmp_path, monkeypatch, then):
    import signal

    from cli_helpers import runner

    from els_audit.cli import main

    def swallowing_audit(*a, **k):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
        except BaseException:                            # noqa: BLE001
            pass
        if then == "raises another error":
            raise SystemError("<built-in method __new__> returned a result with an exception set")
        return object()                                  # never written: the signal is raised first

    monkeypatch.setattr("els_audit.audit.run_audit", swallowing_audit)
    res = runner().invoke(main, ["zoo:resnet-zeros", "--out", str(tmp_path / "r"), "--quiet"])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == ["els-audit: error: terminated by SIGTERM; nothing was written"]
    assert not (tmp_path / "r").exists()
