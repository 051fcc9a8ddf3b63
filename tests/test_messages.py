"""Every flag a message (or any text of the package) names exists (issue 13, case 8).

The package's strings are read from the source (every string constant and f-string part,
docstrings included) and each ``--flag`` in them must be an option of ``els-audit --help``;
the zoo trainer's strings must be options of its own command.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from els_audit.cli import main

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
#: flags of other programs the package mentions: the C compiler and pip
OTHER_PROGRAMS = {"--version", "--force-reinstall", "--head"}         # pip, ray start
TRAINER = ROOT / "els_audit" / "models" / "zoo" / "train.py"


def _strings(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def _named(paths):
    out = {}
    for p in paths:
        for line, text in _strings(p):
            for f in FLAG.findall(text):
                out.setdefault(f, f"{p.relative_to(ROOT)}:{line}")
    return out


def _options(help_text: str) -> set[str]:
    return set(FLAG.findall(help_text))


def test_every_flag_the_package_names_is_an_option_of_the_command():
    help_text = CliRunner().invoke(main, ["--help"]).output
    options = _options(help_text)
    sources = [p for p in (ROOT / "els_audit").rglob("*.py") if p != TRAINER] + list((ROOT / "plugins").glob("*.py"))
    named = _named(sources)
    assert len(named) > 20                                       # the scan sees the messages
    missing = {f: where for f, where in named.items() if f not in options and f not in OTHER_PROGRAMS}
    assert not missing, f"flags named but not in els-audit --help: {missing}"


def test_the_zoo_trainer_names_only_its_own_options():
    p = subprocess.run([sys.executable, "-m", "els_audit.models.zoo.train", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    missing = {f: w for f, w in _named([TRAINER]).items() if f not in _options(p.stdout) and f not in OTHER_PROGRAMS}
    assert not missing, missing
