"""Stages 4-5 of an audit: the prediction (network, fitted machine and IS from the same
seeds on one grid), novelty (copy test, mosaic, locality map) and the closest published
number to compare with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..novelty import NoveltyResult, assess_novelty
from ..predict import PredictionResult, predict_samples
from ..published import PublishedMatch, closest_published
from .clock import Clock
from .inputs import Inputs
from .machine import FittedMachine
from .probes import Probes


def run_prediction(cfg, clock: Clock, inp: Inputs, fitted: FittedMachine) -> PredictionResult:
    """Network, fitted machine and IS from the evaluation seeds ``seed_offset ..``."""
    seeds = list(range(cfg.seed_offset, cfg.seed_offset + cfg.seeds))
    return clock.stage("predict", predict_samples, inp.eps_fn, fitted.machine, fitted.scales, seeds=seeds,
                       steps=cfg.steps, is_machine=fitted.is_machine, schedule=inp.den.schedule,
                       label=inp.eval_labels, progress=clock.steps("predict"), slow=True,
                       band_scales=fitted.band_scales)


@dataclass(frozen=True, eq=False)
class Novelty:
    """The novelty result and the nearest training image of each network sample (B, C, H, W)."""

    result: NoveltyResult
    nearest_images: np.ndarray


def run_novelty(cfg, clock: Clock, inp: Inputs, fitted: FittedMachine, prediction: PredictionResult) -> Novelty:
    """The copy test against the whole data set (not only the dictionary), the mosaic and
    the locality map."""
    res = clock.stage("novelty", assess_novelty, prediction, inp.train_images, fitted.machine,
                      threshold=float(cfg.memorized_threshold), baseline_limit=min(300, len(inp.full)), seed=0)
    nearest = inp.train_images[torch.from_numpy(res.memorization.nearest_index)].numpy()
    return Novelty(res, nearest)


def published_match(inp: Inputs, probes: Probes) -> Optional[PublishedMatch]:
    """The published number closest to this model (data, architecture family, padding,
    conditioning), or ``None`` with a note saying why there is none."""
    try:
        return closest_published(inp.spec, arch_family(inp.loaded.module, probes.global_paths),
                                 padding_of(probes.structure), inp.conditional)
    except ValueError as exc:
        inp.notes.append(f"no published comparison: {exc}")
        return None


#: global-path kinds that are attention
_ATTENTION = ("attention", "einsum", "sdpa", "mha", "bmm", "matmul")


def arch_family(module, global_paths: list) -> Optional[str]:
    """``ResNet``, ``UNet``, ``UNet+attention`` or ``None``, from the class name and whether
    an attention-like op mixes the whole image."""
    name = type(module).__name__.lower()
    attn = any(g.get("kind") in _ATTENTION for g in global_paths)
    if "resnet" in name:
        return "ResNet"
    if "unet" in name:
        return "UNet+attention" if (attn or "attention" in name) else "UNet"
    return None


def padding_of(structure: dict) -> Optional[str]:
    """``zeros`` (a boundary band), ``circular`` or ``None`` (no structural analysis)."""
    if not structure or structure.get("error"):
        return None
    verdict = structure.get("verdict") or []
    if "boundary-broken" in verdict:
        return "zeros"
    if any(b.get("kind") == "boundary" for b in structure.get("breakers") or []):
        return "zeros"
    return "circular"
