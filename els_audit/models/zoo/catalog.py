"""The zoo's catalogue: model names, their architectures and training recipes, and paths.

Every bundled model lives in ``els_audit/models/zoo/weights/NAME/``:

- ``model.safetensors``: the weights (EMA), stored as float16 (see the NB below);
- ``config.json``: ``{"format": "els-audit-zoo", "arch": <class in els_audit.models.zoo>,
  "arch_kwargs": ..., "schedule", "time_input", "prediction", "call_style",
  "num_train_steps", "data_range", "data", training record...}``;
- ``loss.json`` / ``loss.png``: the training loss per epoch;
- ``samples.png``: 16 samples drawn with 50 DDIM steps from seeds 0..15.

NB: weights are stored in float16 to keep the package small; loading casts them into the
float32 module (``load_state_dict`` copies with a cast), so the model IS the rounded
weights, and the sample grid was drawn from the rounded weights too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch.nn as nn

from ..settings import ModelLoadError
from .architectures import ARCHITECTURES

__all__ = ["ZOO_CONFIG_FORMAT", "ZooEntry", "ZOO", "WEIGHTS_DIR", "list_zoo_models", "zoo_model_path", "zoo_config", "build_zoo_architecture"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

#: value of the ``format`` key of a zoo config ``config.json``.
ZOO_CONFIG_FORMAT = "els-audit-zoo"


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: architecture class name (in :mod:`els_audit.models.zoo`), its kwargs, a blurb."""

    name: str
    arch: str
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "arch": self.arch, "arch_kwargs": dict(self.arch_kwargs), "description": self.description}


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            "resnet-zeros", "PaperResNet",
            {"in_channels": 1, "width": 64, "n_layers": 6, "padding_mode": "zeros", "time_dim": 64},
            "the paper's ResNet, zero padding (receptive field 17 px)",
        ),
        ZooEntry(
            "resnet-circular", "PaperResNet",
            {"in_channels": 1, "width": 64, "n_layers": 6, "padding_mode": "circular", "time_dim": 64},
            "the paper's ResNet, circular padding (shift-equivariant, receptive field 17 px)",
        ),
        ZooEntry(
            "unet-zeros", "PaperUNet",
            {"in_channels": 1, "base": 32, "levels": 2, "padding_mode": "zeros", "time_dim": 64},
            "the paper's style of UNet: maxpool / transposed conv, skip concatenation, zero padding",
        ),
        ZooEntry(
            "unet-attention", "AttentionUNet",
            {"in_channels": 1, "base": 32, "channel_mults": [1, 2, 2], "padding_mode": "zeros", "time_dim": 64},
            "diffusers-style UNet with GroupNorm and one self-attention block at 8x8",
        ),
    )
}


def list_zoo_models() -> list[str]:
    """Names of the bundled models, sorted."""
    return sorted(ZOO)


def _entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise ModelLoadError(f"zoo:{name}", f"no such zoo model; known: {', '.join(list_zoo_models())}", "fix the model name")
    return ZOO[name]


def zoo_model_path(name: str) -> Path:
    """Path of the bundled weights ``weights/NAME/model.safetensors``.

    Raises:
        ModelLoadError: unknown name, or the weights are not there.
    """
    _entry(name)
    p = WEIGHTS_DIR / name / "model.safetensors"
    if not p.is_file():
        raise ModelLoadError(
            p, f"zoo model {name!r} has no weights in this install", f"train them with: python -m els_audit.models.zoo.train {name}"
        )
    return p


def zoo_config(name: str) -> dict:
    """The bundled model's ``config.json`` as a dict."""
    p = zoo_model_path(name).with_name("config.json")
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(p, f"unreadable zoo config ({exc})", "reinstall els-audit") from None


def build_zoo_architecture(name: str) -> nn.Module:
    """A freshly initialised module of zoo model ``name`` (no weights loaded)."""
    e = _entry(name)
    return ARCHITECTURES[e.arch](**dict(e.arch_kwargs))
