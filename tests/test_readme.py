"""README.md gives the two set-up commands, and .ci/run runs the test one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    return [ln for block in re.findall(r"```bash\n(.*?)```", section, re.S)
            for ln in block.splitlines() if ln and not ln.startswith("#")]


def test_readme_has_exactly_two_setup_commands():
    cmds = _commands()
    assert len(cmds) == 2
    assert "els-audit" in cmds[0] and "pytest" in cmds[1]
    for c in cmds:
        assert c.startswith("python3 -m venv .venv") and "torch==2.13.0" in c


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _commands()[1] in ci
