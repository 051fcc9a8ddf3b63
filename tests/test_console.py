"""The command's console discipline (els_audit.console)."""

import os
import sys
import warnings

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
