"""Train a zoo model on mnist5k (32x32) the paper's way, and write it where the zoo reads it.

Usage::

    python -m els_audit.models.zoo.train NAME [--epochs E] [--device cpu|cuda] [--out DIR]
                                       [--max-minutes M] [--set KEY=VALUE ...]

References: Kamb & Ganguli, ICML 2025 (docs/theory.md section 1): eps-prediction with the
cosine-legacy schedule, ``x_t = a_t x_0 + b_t eps``, training times
``t = randint(0, 1000) / 1000`` (a network never sees t = 1); loss ``|eps_hat - eps|^2``.
Ho et al. 2020 for the simple loss; EMA of the weights as is common practice.

Writes into ``--out`` (default ``els_audit/models/zoo/weights/NAME``), replacing it only once
everything is written (no partial output): ``model.safetensors`` (EMA weights, float16),
``config.json``, ``loss.json``, ``loss.png``, ``samples.png`` (16 seeds, 50 DDIM steps).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...atomic import Staging
from ...hashing import file_sha256
from ...sampler import ddim_sample, initial_noise
from ...schedules import get_schedule
from .architectures import ARCHITECTURES, count_parameters
from .catalog import WEIGHTS_DIR, ZOO, ZOO_CONFIG_FORMAT

__all__ = ["TrainConfig", "TrainResult", "train_zoo_model", "write_zoo_model", "check_zoo_out", "ZOO_FILES",
           "sample_grid", "main"]

SCHEDULE = "cosine-legacy"
TRAIN_STEPS = 1000  # t = randint(0, TRAIN_STEPS) / TRAIN_STEPS


@dataclass(frozen=True)
class TrainConfig:
    """Training recipe.  ``max_minutes`` stops early (recorded) so a run fits a time budget."""

    name: str
    epochs: int = 100
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    data: str = "mnist5k:size=32"
    max_minutes: Optional[float] = None
    arch_overrides: dict = field(default_factory=dict)
    sample_steps: int = 50
    sample_seeds: tuple[int, ...] = tuple(range(16))

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["sample_seeds"] = list(self.sample_seeds)
        return d


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced: the EMA module (float32, weights rounded to float16)
    and its record.  ``losses``: mean loss per completed epoch."""

    module: torch.nn.Module
    arch: str
    arch_kwargs: dict
    losses: tuple[float, ...]
    steps: int
    epochs_completed: int
    stopped_early: bool
    wall_time_s: float
    device: str
    data_sha256: Optional[str]
    eps_mse_t05: float
    zero_mse_t05: float
    image_shape: tuple[int, int, int] = (1, 32, 32)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "module"}
        d["losses"] = list(self.losses)
        return d


def _load_images(spec: str) -> tuple[torch.Tensor, Optional[str]]:
    from ...data import load_dataset

    ds = load_dataset(spec)
    return ds.images, ds.sha256                                                 # (N, 1, 32, 32)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return "cpu"


@torch.no_grad()
def one_step_error(model, images: torch.Tensor, t: float = 0.5, seed: int = 1234) -> tuple[float, float]:
    """Mean squared eps error of ``model`` at time t on ``images``, and that of predicting 0.

    Args:
        model: eps-predictor ``model(x, t)`` (unit time).
        images: (N, C, H, W) clean images in [-1, 1].

    Returns:
        (mse(eps_hat, eps), mse(0, eps)).
    """
    sched = get_schedule(SCHEDULE)
    a, b = (float(v) for v in sched.alpha_sigma(t))
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(images.shape, generator=g).to(images.device)              # (N, C, H, W)
    x_t = a * images + b * eps                                                  # (N, C, H, W)
    tt = torch.full((images.shape[0],), t, device=images.device)                # (N,)
    eps_hat = model(x_t, tt)                                                    # (N, C, H, W)
    return F.mse_loss(eps_hat, eps).item(), eps.pow(2).mean().item()


def train_zoo_model(cfg: TrainConfig, *, log=print) -> TrainResult:
    """Train zoo model ``cfg.name`` from scratch.

    Args:
        cfg: the recipe.
        log: progress printer.

    Returns:
        :class:`TrainResult` (EMA module on CPU, weights rounded through float16).
    """
    if cfg.name not in ZOO:
        raise ValueError(f"unknown zoo model {cfg.name!r}; known: {', '.join(sorted(ZOO))}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda asked for but no CUDA device is visible; use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    entry = ZOO[cfg.name]
    arch_kwargs = {**dict(entry.arch_kwargs), **cfg.arch_overrides}
    torch.manual_seed(cfg.seed)
    model = ARCHITECTURES[entry.arch](**arch_kwargs).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    images, data_sha = _load_images(cfg.data)
    images = images.to(device)                                                  # (N, C, H, W)
    N = images.shape[0]
    bs = min(cfg.batch_size, N)
    steps_per_epoch = N // bs

    sched = get_schedule(SCHEDULE)
    n_grid = torch.arange(TRAIN_STEPS, dtype=torch.float64) / TRAIN_STEPS      # (1000,)
    a_tab, b_tab = (v.to(torch.float32).to(device) for v in sched.alpha_sigma(n_grid))  # (1000,) each

    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    losses: list[float] = []
    step = 0
    stopped_early = False
    t_start = time.time()
    log(f"[{cfg.name}] {entry.arch}({arch_kwargs}) {count_parameters(model)} params, {N} images, "
        f"{steps_per_epoch} steps/epoch, device {_device_name(device)}")
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(N, generator=gen, device=device)                  # (N,)
        total = torch.zeros((), device=device)
        for i in range(steps_per_epoch):
            x0 = images[perm[i * bs:(i + 1) * bs]]                              # (B, 1, H, W)
            n = torch.randint(0, TRAIN_STEPS, (bs,), generator=gen, device=device)  # (B,)
            t = n.to(torch.float32) / TRAIN_STEPS                               # (B,)
            eps = torch.randn(x0.shape, generator=gen, device=device)           # (B, 1, H, W)
            x_t = a_tab[n][:, None, None, None] * x0 + b_tab[n][:, None, None, None] * eps
            loss = F.mse_loss(model(x_t, t), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            for gparam in opt.param_groups:
                gparam["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
            opt.step()
            step += 1
            # NB: EMA decay warms up as (1 + s) / (10 + s) so short runs are not stuck at init.
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, model_params, 1 - d)
            total += loss.detach()
        losses.append(total.item() / steps_per_epoch)
        elapsed = time.time() - t_start
        if epoch % 10 == 0 or epoch == cfg.epochs - 1:
            log(f"[{cfg.name}] epoch {epoch + 1}/{cfg.epochs} loss {losses[-1]:.4f} ({elapsed:.0f}s)")
        if cfg.max_minutes is not None and elapsed > 60 * cfg.max_minutes and epoch < cfg.epochs - 1:
            stopped_early = True
            log(f"[{cfg.name}] stopped after {epoch + 1} epochs: --max-minutes {cfg.max_minutes} reached")
            break
    wall = time.time() - t_start
    # NB: the shipped weights are float16; round now so everything below (the recorded
    # error, the samples) describes the model as shipped.
    ema = ema.cpu()
    with torch.no_grad():
        for p in ema.parameters():
            p.copy_(p.to(torch.float16).to(torch.float32))
    ema = ema.to(device)
    err, zero = one_step_error(ema, images[:1000])
    return TrainResult(
        module=ema.cpu(), arch=entry.arch, arch_kwargs=arch_kwargs, losses=tuple(losses), steps=step,
        epochs_completed=len(losses), stopped_early=stopped_early, wall_time_s=round(wall, 2),
        device=_device_name(device), data_sha256=data_sha, eps_mse_t05=err, zero_mse_t05=zero,
        image_shape=tuple(int(v) for v in images.shape[1:]),
    )


@torch.no_grad()
def sample_grid(module, seeds: Sequence[int], steps: int, shape=(1, 32, 32), device="cpu") -> torch.Tensor:
    """Samples of an eps-model (unit time, cosine-legacy) by DDIM; (len(seeds), C, H, W) in [-1, 1]."""
    module = module.to(device).eval()

    def eps_fn(x, t, label):
        return module(x, t.to(x.device))

    x_T = initial_noise(seeds, shape).to(device)                                # (S, C, H, W)
    return ddim_sample(eps_fn, x_T, steps=steps, schedule=SCHEDULE).x0.clamp(-1, 1).cpu()


def _save_grid_png(samples: torch.Tensor, path: Path, scale: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    S, C, H, W = samples.shape
    cols = int(math.ceil(math.sqrt(S)))
    rows = int(math.ceil(S / cols))
    pad = 2
    # NB: grey images as one channel, RGB as three (other channel counts show their first)
    ch = 3 if C == 3 else 1
    grid = np.ones((rows * (H + pad) + pad, cols * (W + pad) + pad, ch), dtype=np.float32)
    img = ((samples[:, :ch].permute(0, 2, 3, 1).clamp(-1, 1) + 1) / 2).numpy()    # (S, H, W, ch) in [0, 1]
    for k in range(S):
        r, c = divmod(k, cols)
        grid[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = img[k]
    grid = np.kron(grid, np.ones((scale, scale, 1), dtype=np.float32))
    if ch == 1:
        plt.imsave(path, grid[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        plt.imsave(path, grid)


def _save_loss_png(losses: Sequence[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.semilogy(np.arange(1, len(losses) + 1), losses)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean eps MSE")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


#: the files a zoo model folder holds (an existing --out folder is replaced only if it holds these)
ZOO_FILES = ("model.safetensors", "config.json", "loss.json", "loss.png", "samples.png")


def check_zoo_out(out: Path) -> None:
    """Refuse an output folder that is not empty and not a zoo model folder this script wrote
    (only :data:`ZOO_FILES`, its config.json of format ``els-audit-zoo``): it is replaced whole.

    Raises:
        ValueError: one line saying why.
    """
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"--out {out} is not a folder; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    names = sorted(p.name for p in out.iterdir())
    try:
        ours = json.loads((out / "config.json").read_text()).get("format") == ZOO_CONFIG_FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        ours = False
    if not ours or any(n not in ZOO_FILES or not (out / n).is_file() for n in names):
        raise ValueError(f"--out {out} holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''} and is not a "
                         f"zoo model folder this script wrote; choose a new or empty folder")


def write_zoo_model(cfg: TrainConfig, res: TrainResult, out: Path, *, log=print) -> Path:
    """Write weights, config, loss curve and sample grid into ``out`` atomically (an existing
    ``out`` only if :func:`check_zoo_out` allows).

    Returns:
        ``out``.
    """
    from safetensors.torch import save_file

    out = Path(out)
    check_zoo_out(out)
    with Staging() as st:
        tmp = st.folder(out, mode=0o755)  # the folder ships as package data
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in res.module.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": ZOO_CONFIG_FORMAT, "name": cfg.name})
        samples = sample_grid(res.module, cfg.sample_seeds, cfg.sample_steps, shape=res.image_shape,
                              device=cfg.device)
        _save_grid_png(samples, tmp / "samples.png")
        (tmp / "loss.json").write_text(json.dumps({"epoch_mean_loss": list(res.losses)}, indent=0) + "\n")
        _save_loss_png(res.losses, tmp / "loss.png", f"{cfg.name}: training loss")
        config = {
            "format": ZOO_CONFIG_FORMAT,
            "name": cfg.name,
            "arch": res.arch,
            "arch_kwargs": res.arch_kwargs,
            "call_style": "x-t",
            "schedule": SCHEDULE,
            "time_input": "unit",
            "prediction": "eps",
            "num_train_steps": TRAIN_STEPS,
            "data_range": [-1.0, 1.0],
            "data": cfg.data,
            "data_sha256": res.data_sha256,
            "training": {
                **{k: v for k, v in cfg.to_dict().items() if k not in ("name", "data", "device")},
                "train_times": f"randint(0, {TRAIN_STEPS}) / {TRAIN_STEPS}",
                "optimizer": "Adam",
                "weights": "EMA",
                "epochs_completed": res.epochs_completed,
                "stopped_early": res.stopped_early,
                "steps": res.steps,
                "final_loss": res.losses[-1],
                "device": res.device,
                "torch": torch.__version__,
                "wall_time_s": res.wall_time_s,
            },
            "n_params": count_parameters(res.module),
            "weights_dtype": "float16",
            "weights_sha256": file_sha256(tmp / "model.safetensors"),
            "eval": {"t": 0.5, "n_images": 1000, "eps_mse": res.eps_mse_t05, "zero_mse": res.zero_mse_t05},
            "samples": {"steps": cfg.sample_steps, "seeds": list(cfg.sample_seeds), "sampler": "els_audit.sampler.ddim_sample"},
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
    log(f"[{cfg.name}] wrote {out} (eps mse at t=0.5: {res.eps_mse_t05:.4f} vs {res.zero_mse_t05:.4f} for zero)")
    return out


def _parse_set(items: Sequence[str]) -> dict:
    out: dict[str, Any] = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {it!r}")
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m els_audit.models.zoo.train", description="Train a zoo model on mnist5k.")
    ap.add_argument("name", choices=sorted(ZOO))
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the package's weights/NAME)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop early after this much training time")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an architecture argument")
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--data", default="mnist5k:size=32")
    args = ap.parse_args(argv)
    cfg = TrainConfig(
        name=args.name, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        device=args.device, data=args.data, max_minutes=args.max_minutes, arch_overrides=_parse_set(args.set),
        sample_steps=args.sample_steps,
    )
    out = args.out or (WEIGHTS_DIR / cfg.name)
    try:
        check_zoo_out(out)                           # before the training, not after it
        res = train_zoo_model(cfg)
        write_zoo_model(cfg, res, out)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
