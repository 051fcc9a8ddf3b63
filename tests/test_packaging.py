"""The wheel holds every package: setuptools installs only the packages pyproject.toml lists
(an editable install hides a missing one, since it imports from the source tree)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "els_audit").rglob("__init__.py")}
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert cfg["package-dir"]["els_audit_plugins"] == "plugins" and "els_audit_plugins" in listed
