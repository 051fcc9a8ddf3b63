"""Sidecar files: ``MODEL.els.toml`` next to a model says what detection cannot.

A sidecar is looked for ONLY next to the model (never in the working directory or a
config folder).  It arrives with the download, so the code it names goes through the trust
policy (:mod:`els_audit.models.trust`): ``arch`` must be a registered architecture unless
the user passes ``--trust-model``, and even then a ``torch.nn.Module`` subclass.  Names
tried, first found wins:

- for a file ``dir/NAME.EXT``: ``dir/NAME.els.toml``, then ``dir/NAME.EXT.els.toml``;
- for a directory ``dir/NAME/``: ``dir/NAME/els.toml``, then ``dir/NAME.els.toml``.

Example::

    arch = "PaperResNet"                # a registered architecture (or, trusted, "mypkg.nets:UNet")
    arch_kwargs = { width = 64 }        # plain data
    state_dict_key = "ema"              # entry of a checkpoint dict holding the weights
    format = "state-dict"               # force a loader
    call_style = "t-x"                  # x-t | t-x | diffusers
    time_input = "index"                # unit | index | sigma
    prediction = "v"                    # eps | x0 | v | score
    schedule = "linear"                 # a schedule name
    num_train_steps = 1000
    data_range = [0, 1]

Unknown keys and wrong types are errors naming the sidecar and the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from ..hashing import file_sha256
from .settings import SETTING_NAMES, ModelLoadError, validate_setting

__all__ = ["Sidecar", "find_sidecar", "read_sidecar", "SIDECAR_KEYS"]

#: key -> accepted python types (after TOML parsing)
SIDECAR_KEYS: dict[str, tuple[type, ...]] = {
    "arch": (str,),
    "arch_kwargs": (dict,),
    "state_dict_key": (str,),
    "format": (str,),
    "call_style": (str,),
    "time_input": (str,),
    "prediction": (str,),
    "schedule": (str,),
    "num_train_steps": (int,),
    "data_range": (list, str),
}


@dataclass(frozen=True)
class Sidecar:
    """A parsed sidecar: ``path``, ``sha256`` of its bytes, and validated ``values``."""

    path: str
    sha256: str
    values: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "values": {k: v for k, v in self.values.items()}}


def find_sidecar(model_path: Path) -> Optional[Path]:
    """The sidecar next to ``model_path``, or None."""
    p = Path(model_path)
    if p.is_dir():
        candidates = [p / "els.toml", p.parent / f"{p.name}.els.toml"]
    else:
        candidates = [p.with_name(f"{p.stem}.els.toml"), p.with_name(f"{p.name}.els.toml")]
    for c in candidates:
        if c.is_file():
            return c
    return None


def read_sidecar(path: Path) -> Sidecar:
    """Parse and validate a sidecar.

    Args:
        path: the ``.els.toml`` file.

    Returns:
        :class:`Sidecar`.

    Raises:
        ModelLoadError: unreadable TOML, unknown key, wrong type or value.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ModelLoadError(path, f"cannot read the sidecar: {exc}", "fix or remove the sidecar") from None
    except RecursionError:
        raise ModelLoadError(path, "cannot read the sidecar: it is nested too deeply", "fix or remove the sidecar") from None
    values: dict[str, Any] = {}
    for k, v in data.items():
        if k not in SIDECAR_KEYS:
            raise ModelLoadError(path, f"unknown sidecar key {k!r}; known: {', '.join(SIDECAR_KEYS)}", "fix or remove the sidecar")
        types = SIDECAR_KEYS[k]
        if isinstance(v, bool) or not isinstance(v, types):
            raise ModelLoadError(
                path, f"sidecar key {k!r} must be {' or '.join(t.__name__ for t in types)}, got {type(v).__name__}", "fix the sidecar"
            )
        values[k] = validate_setting(k, v, str(path)) if k in SETTING_NAMES else v
    return Sidecar(path=str(path), sha256=file_sha256(path), values=values)
