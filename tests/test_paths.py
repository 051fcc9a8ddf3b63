"""Paths as the user typed them (els_audit.paths.display_path)."""

from pathlib import Path

import els_audit
from els_audit.paths import INSTALLED, display_path


def test_paths_under_what_was_typed_keep_the_users_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "unet").mkdir(parents=True)
    for f in ("models/m.safetensors", "models/m.els.toml", "models/unet/config.json"):
        (tmp_path / f).write_text("x")
    assert display_path(tmp_path / "models/m.safetensors", "models/m.safetensors") == "models/m.safetensors"
    assert display_path(tmp_path / "models/m.els.toml", "models/m.safetensors") == "models/m.els.toml"  # beside it
    assert display_path(tmp_path / "models/unet/config.json", "models/") == "models/unet/config.json"
    assert display_path(tmp_path / "models/m.els.toml", "./models/m.safetensors") == "./models/m.els.toml"
    monkeypatch.chdir(tmp_path / "models")
    assert display_path(tmp_path / "models/m.els.toml", "m.safetensors") == "m.els.toml"
    assert display_path(tmp_path / "models/m.safetensors", str(tmp_path / "models/m.safetensors")) == \
        str(tmp_path / "models/m.safetensors")                               # typed absolute: stays absolute


def test_home_is_never_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "m.pt").write_text("x")
    assert display_path(tmp_path / "d" / "m.pt", "~/d/m.pt") == "~/d/m.pt"
    assert display_path(tmp_path / "d" / "m.pt") == "~/d/m.pt"               # not typed, but under home


def test_installed_files_lose_their_install_location():
    own = Path(els_audit.__file__).resolve().parent / "summary_schema.json"
    assert display_path(own) == f"{INSTALLED}/els_audit/summary_schema.json"
    assert display_path(own, "zoo:resnet-zeros") == f"{INSTALLED}/els_audit/summary_schema.json"
