"""Stage 1 of an audit: the model, the data, the denoiser adapter (with the sanity check
unless the audit is structure-only) and the labels each seed gets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from ..data import Dataset, balanced_subset_indices, load_dataset
from ..errors import AuditError
from ..machines.supports import DATA_MAX_ELEMENTS
from .clock import Clock


@dataclass
class Inputs:
    """What the audit runs on.

    ``full``: the whole data set; ``dic``: the machines' dictionary (a seeded class-balanced
    subset); ``train_images`` / ``dict_images``: their images in the model's data range;
    ``eval_labels`` / ``cal_labels``: the label of each evaluation / calibration seed
    (``None`` for an unconditional audit); ``notes``: lines for the report's warnings.
    ``label``: the one label every seed gets (``--label``), else ``None``.

    :func:`load_inputs` leaves the dictionary the whole set and the seeds' labels unset;
    :func:`settle_inputs` fixes them once the plan has chosen the settings.
    """

    loaded: Any
    spec: str
    spec_source: str
    full: Dataset
    dic: Dataset
    conditional: bool
    device: torch.device
    shape: tuple[int, int, int]
    den: Any
    in_model_range: bool
    train_images: torch.Tensor
    dict_images: torch.Tensor
    classes: list[int]
    label: Optional[int]
    label_effect: Optional[float]
    notes: list[str] = field(default_factory=list)
    eval_labels: Optional[list[int]] = None
    cal_labels: Optional[list[int]] = None

    def eps_fn(self, x: torch.Tensor, t: torch.Tensor, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The network's eps on the audit's device, without gradients, back on x's device."""
        with torch.no_grad():
            out = self.den.eps(x.to(self.device), t.to(self.device), None if label is None else label.to(self.device))
        return out.to(x.device, x.dtype)

    def eps_grad(self, x: torch.Tensor, t: torch.Tensor, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The same with gradients (the ERF probe)."""
        return self.den.eps(x.to(self.device), t.to(self.device),
                            None if label is None else label.to(self.device)).to(x.device)

    def seed_labels(self, n: int) -> Optional[list[int]]:
        """The labels of n seeds: ``--label`` for each, else the classes in turn (``None``
        when unconditional)."""
        if not self.conditional:
            return None
        if self.label is not None:
            return [self.label] * n
        return [self.classes[i % len(self.classes)] for i in range(n)]

    def labels_for(self, n: int) -> Optional[torch.Tensor]:
        """:meth:`seed_labels` as a (n,) long tensor (``None`` when unconditional)."""
        labels = self.seed_labels(n)
        return None if labels is None else torch.tensor(labels, dtype=torch.long)


def load_inputs(cfg, clock: Clock, *, sanity: bool = True) -> Inputs:
    """Load the model and the data, adapt the model (``sanity``: with the sanity check on a
    seeded class-balanced sample of the data) and assign labels to seeds."""
    from ..models import load_model, make_denoiser

    loaded = clock.stage("load model", load_model, cfg.model, arch=cfg.arch, arch_kwargs=cfg.arch_kwargs,
                         format=cfg.format, state_dict_key=cfg.state_dict_key, trust_model=cfg.trust_model,
                         schedule=cfg.schedule, time_input=cfg.time_input, prediction=cfg.prediction,
                         call_style=cfg.call_style, num_train_steps=cfg.num_train_steps, data_range=cfg.data_range)
    spec, spec_source = data_spec(cfg, loaded)
    full: Dataset = clock.stage("load data", load_dataset, spec)
    if len(full) < 3:
        raise AuditError(f"data {spec!r} holds {len(full)} image(s); the audit needs at least 3")
    conditional = cfg.conditional or cfg.label is not None
    if conditional and full.labels is None:
        raise AuditError(f"--conditional/--label need labelled data, but {spec!r} has no labels; "
                         f"drop the flag or pass labelled data")
    if cfg.label is not None and cfg.label not in full.label_counts():
        raise AuditError(f"--label {cfg.label}: no training image has that label; labels present: "
                         f"{', '.join(map(str, full.label_counts()))}")
    module = loaded.module
    if hasattr(module, "eval"):
        module.eval()
    device = torch.device(cfg.device)
    if cfg.device == "cuda" and hasattr(module, "to"):
        module.to(device)
    C, H, W = (int(s) for s in full.images.shape[1:])
    check_scales_fit(cfg.scales, H, W)
    if getattr(cfg, "support", "square") == "data" and C * H * W > DATA_MAX_ELEMENTS:
        raise AuditError(f"--support data eigendecomposes a pixel covariance of {C}x{H}x{W} = {C * H * W} elements; "
                         f"it is offered up to {DATA_MAX_ELEMENTS}; use --support erf or erf-area")
    # NB: a seeded, class-balanced sample for the sanity check (data sets may be sorted by label)
    check_rows = balanced_subset_indices(full.labels, len(full), 16, cfg.data_seed)
    check_images = full.images[check_rows].to(device)
    # NB: a class-conditional model is checked with each image's own label
    check_labels = torch.as_tensor(full.labels[check_rows], dtype=torch.long).to(device) if conditional else None
    den = clock.stage("adapt", make_denoiser, loaded, check_images=check_images, check_labels=check_labels,
                      check=sanity)
    notes: list[str] = []
    # NB: a model trained on another data range (e.g. [0, 1]) diffuses x_t = a x0 + b eps in
    # ITS range, which is not an affine image of the [-1, 1] process (the noise does not
    # scale with the data).  So the whole audit runs in the model's range: the machines'
    # dictionary and the copy test use the training images mapped into it (the machines and
    # Pearson r do not care about the range; the locality thresholds scale with it).
    in_model_range = tuple(den.data_range) != (-1.0, 1.0)
    if in_model_range:
        notes.append(f"the model works in data range {den.data_range}: samples, machines and the copy test use "
                     f"the training images mapped into that range")
    classes = sorted(full.label_counts()) if conditional else []
    train_images = den.to_model_range(full.images) if in_model_range else full.images        # (N, C, H, W)
    return Inputs(
        loaded=loaded, spec=spec, spec_source=spec_source, full=full, dic=full, conditional=conditional,
        device=device, shape=(C, H, W), den=den, in_model_range=in_model_range, train_images=train_images,
        dict_images=train_images, classes=classes, label=cfg.label,
        label_effect=label_effect(den, check_images, classes) if conditional else None, notes=notes,
    )


def settle_inputs(inp: Inputs, cfg) -> Inputs:
    """``inp`` with the machines' dictionary (a seeded class-balanced subset of
    ``cfg.data_limit`` images; 0 = the whole set) and the labels of the evaluation and
    calibration seeds, for the settings the plan chose (``cfg``)."""
    full = inp.full
    if cfg.data_limit and cfg.data_limit < len(full):
        rows = balanced_subset_indices(full.labels, len(full), cfg.data_limit, cfg.data_seed)
        dic = full.take(rows, note=f"dictionary: seeded class-balanced subset of {cfg.data_limit}, "
                                   f"seed {cfg.data_seed}")
        dict_images = inp.train_images[rows]                                              # (n, C, H, W)
    else:
        dic, dict_images = full, inp.train_images
    return dataclasses.replace(inp, dic=dic, dict_images=dict_images, eval_labels=inp.seed_labels(cfg.seeds),
                               cal_labels=inp.seed_labels(cfg.calibration_seeds))


@torch.no_grad()
def label_effect(den, images: torch.Tensor, classes: list[int], seed: int = 0) -> Optional[float]:
    """How far the model's output moves when only the class label changes: on noisy training
    images at t = 0.5, ``|eps(x, t, y) - eps(x, t, y')| / |eps(x, t, y)|`` with y' the next
    class after y.  0 when the model ignores its label (``None`` with fewer than 2 classes)."""
    if len(classes) < 2:
        return None
    n = images.shape[0]
    y = torch.tensor([classes[i % len(classes)] for i in range(n)], dtype=torch.long, device=images.device)
    y2 = torch.tensor([classes[(i + 1) % len(classes)] for i in range(n)], dtype=torch.long, device=images.device)
    a, b = (float(v) for v in den.schedule.alpha_sigma(0.5))
    g = torch.Generator().manual_seed(seed)
    x_t = a * den.to_model_range(images) + b * torch.randn(images.shape, generator=g).to(images)  # (n, C, H, W)
    t = torch.full((n,), 0.5, dtype=images.dtype, device=images.device)
    e1, e2 = den.eps(x_t, t, y), den.eps(x_t, t, y2)                                            # (n, C, H, W)
    return float((e1 - e2).norm() / e1.norm().clamp_min(1e-12))


def check_scales_fit(scales: Union[str, tuple[int, ...]], H: int, W: int) -> None:
    """Refuse given patch sizes past 2 max(H, W) - 1: from there on every pixel's window holds
    the whole image at every offset, so the machine is the IS machine and larger only costs."""
    if isinstance(scales, str):
        return
    cap = 2 * max(H, W) - 1
    big = sorted({k for k in scales if k > cap})
    if big:
        raise AuditError(f"--scales {','.join(map(str, big))}: patch sizes above {cap} (2 x {max(H, W)} - 1 for "
                         f"{H}x{W} images) see the whole image from every pixel, where the machine already equals "
                         f"IS; give sizes up to {cap}")


def data_spec(cfg, loaded) -> tuple[str, str]:
    """The data spec and where it came from (the argument, else the model's zoo config; an
    empty ``--data`` counts as none given, and the checks warn about it)."""
    if cfg.data and cfg.data.strip():
        return cfg.data, "argument"
    if loaded.data_hint and loaded.data_hint_trusted:
        return loaded.data_hint, loaded.data_hint_source
    if loaded.data_hint:
        raise AuditError(f"{cfg.model}: the {loaded.data_hint_source} names data by path ({loaded.data_hint!r}); a "
                         f"downloaded config may not choose which of your files are read: pass --data yourself "
                         f"(or --trust-model if you trust the config)")
    raise AuditError(f"{cfg.model}: no training data named; pass --data SPEC (e.g. --data mnist5k:size=32 or "
                     f"--data path/to/train.npz): the ELS machine needs the training images or a sample of them")
