"""Progress at a terminal: one bar per long stage (with the plan's seconds); plain lines elsewhere."""

import os
import pty
import select
import subprocess
import sys

import pytest

from els_audit.stages.clock import Clock
from els_audit.terminal import TerminalProgress

TINY = ["--data", "mnist5k:size=32:limit=60", "--data-limit", "30", "--steps", "3", "--seeds", "2",
        "--calibration-seeds", "1", "--threads", "1", "--scales", "auto", "--no-report"]


def _run_on_a_terminal(args, tmp_path):
    """The CLI with stderr on a pseudo-terminal; returns (exit code, what the terminal showed)."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "120"}
    p = subprocess.Popen([sys.executable, "-m", "els_audit", *args], stdout=subprocess.DEVNULL, stderr=slave,
                         stdin=subprocess.DEVNULL, env=env, cwd=tmp_path)
    os.close(slave)
    out = b""
    while True:
        r, _, _ = select.select([master], [], [], 120)
        if not r:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:                                   # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return p.wait(timeout=60), out.decode("utf-8", "replace")


@pytest.mark.skipif(not hasattr(pty, "openpty"), reason="no pseudo-terminals on this platform")
def test_bars_at_a_terminal_and_lines_in_a_pipe(tmp_path):
    code, shown = _run_on_a_terminal(["zoo:resnet-zeros", *TINY, "--out", str(tmp_path / "a")], tmp_path)
    assert code == 0, shown
    assert "\r" in shown                                              # bars redraw in place
    for stage in ("calibrate", "network", "machine", "IS"):
        assert f"els-audit {stage}: 100%|" in shown, stage
    assert "3/3" in shown and "step 1/3" not in shown                 # steps as bars, not as lines
    assert "report:" in shown and "pass" in shown                     # the lines are still there
    piped = subprocess.run([sys.executable, "-m", "els_audit", "zoo:resnet-zeros", *TINY, "--out",
                            str(tmp_path / "b")], capture_output=True, text=True, cwd=tmp_path)
    assert piped.returncode == 0, piped.stderr
    assert "%|" not in piped.stderr and "\r" not in piped.stderr
    assert "calibrate step 3/3" in piped.stderr


def test_a_clock_sends_every_step_with_the_planned_seconds():
    got = []

    class Sink:
        def __call__(self, line):
            got.append(("line", line))

        def step(self, stage, done, total, planned):
            got.append((stage, done, total, planned))

    clock = Clock(Sink())
    clock.planned["calibrate"] = 12.5
    f = clock.steps("calibrate")
    for i in range(1, 4):
        f("calibrate", i, 3)
    g = clock.steps()
    g("network", 1, 2)
    assert got == [("calibrate", 1, 3, 12.5), ("calibrate", 2, 3, 12.5), ("calibrate", 3, 3, 12.5),
                   ("network", 1, 2, None)]


def test_terminal_progress_shows_the_plan_before_the_first_step(tmp_path):
    f = open(tmp_path / "tty.txt", "w+")
    bars = TerminalProgress(lambda: f)
    bars.step("calibrate", 0, 4, 30.0)
    bars("[  1.0s] machine: bbELS")
    bars.step("calibrate", 4, 4, 30.0)
    bars.step("network", 1, 2, None)
    bars.close()
    f.seek(0)
    text = f.read()
    assert "plan ~30s" in text and "els-audit calibrate: 100%|" in text and "4/4" in text
    assert "machine: bbELS" in text
    assert "els-audit network:  50%|" in text
