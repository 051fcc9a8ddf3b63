"""What the command-line tests share: a runner that keeps stderr apart, and the one-line
error contract (exit code 2, one line on stderr starting "els-audit: error: ", no traceback)."""

from click.testing import CliRunner

__all__ = ["runner", "one_line_error"]


def runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)   # click < 8.2
    except TypeError:
        return CliRunner()                   # click >= 8.2 keeps stderr apart


def one_line_error(exit_code: int, stderr: str, *needles: str, stdout: str = "") -> str:
    """Assert the contract and that each needle is in the line; returns the line.  Progress
    lines ("els-audit [ 1.0s] ...") are not errors and are skipped."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and not ln.startswith("els-audit [")]
    assert exit_code == 2, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("els-audit: error: "), lines[0]
    assert "Traceback" not in stderr and "Traceback" not in stdout
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]
