"""Small denoiser architectures for the bundled model zoo.

References:
- Kamb & Ganguli, ICML 2025 (arXiv 2412.20292), appendix and docs/theory.md section 3: the
  paper's ResNet (conv3 up-projection, 6 residual conv3+ReLU layers with the time embedding
  added, conv3 down-projection, no normalisation; receptive field 17 px) and its UNet
  (maxpool down, stride-2 transposed conv up, skip concatenation).
- Ho et al. 2020 / diffusers ``UNet2DModel``: the GroupNorm + SiLU residual blocks and the
  spatial self-attention block of :class:`AttentionUNet`.
- Vaswani et al. 2017: the sinusoidal embedding used for the time step.

Every network has the same call signature ``forward(x, t, label=None) -> eps`` with
x (B, C, H, W), t float (B,) in [0, 1] (the "unit" time input) and label (B,) int64 or
None, and returns the predicted noise, shape of x.  All forward passes are
``torch.fx.symbolic_trace``-able: the only Python control flow is on constructor settings
and on ``label is None`` (a Python argument, not a tensor).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "PaperResNet",
    "PaperUNet",
    "AttentionUNet",
    "SinusoidalTimeEmbedding",
    "ARCHITECTURES",
    "count_parameters",
]

_PADDING_MODES = ("zeros", "circular")

# NB: the unit time t in [0, 1] is multiplied by this before the sinusoids, so that the
# frequencies match the usual integer-step embedding of a 1000-step model (the paper trains
# on t = randint(0, 1000) / 1000).  It is internal to the network: the input stays "unit".
_TIME_SCALE = 1000.0


def _check_padding(padding_mode: str) -> str:
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
    return padding_mode


def _check_positive(**kw: int) -> None:
    for k, v in kw.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())


class SinusoidalTimeEmbedding(nn.Module):
    """Sinusoidal embedding of t in [0, 1], followed by a 2-layer MLP.

    Args:
        dim: embedding width (even).
        num_classes: when given, a learned label embedding of width ``dim`` is added.

    Shapes: t (B,) float -> (B, dim).
    """

    def __init__(self, dim: int = 64, num_classes: Optional[int] = None):
        super().__init__()
        _check_positive(dim=dim)
        if dim % 2:
            raise ValueError(f"time_dim must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)                  # (half,)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label_emb = nn.Embedding(num_classes, dim) if num_classes else None

    def forward(self, t: torch.Tensor, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        arg = (t.to(self.freqs.dtype) * _TIME_SCALE)[:, None] * self.freqs[None, :]  # (B, half)
        emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)                # (B, dim)
        emb = self.mlp(emb)                                                     # (B, dim)
        if self.label_emb is not None and label is not None:
            emb = emb + self.label_emb(label)                                   # (B, dim)
        return emb


def _conv3(cin: int, cout: int, padding_mode: str) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, padding_mode=padding_mode)


class PaperResNet(nn.Module):
    """The paper's ResNet denoiser.

    conv3 up-projection, ``n_layers`` residual blocks ``h <- h + relu(conv3(h) + bias(t))``
    where ``bias(t)`` is a per-channel projection of the time embedding, conv3
    down-projection; no normalisation.  Receptive field ``1 + 2 (n_layers + 2)`` px
    (17 px for 6 layers).

    Args:
        in_channels: image channels C.
        width: hidden channels.
        n_layers: number of residual conv3+ReLU blocks.
        padding_mode: "zeros" or "circular" (every conv).
        time_dim: width of the time embedding.
        num_classes: when given, the model is class-conditional (label embedding).

    Shapes: x (B, C, H, W), t (B,) float in [0, 1], label (B,) int64 or None
    -> eps (B, C, H, W).
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 64,
        n_layers: int = 6,
        padding_mode: str = "zeros",
        time_dim: int = 64,
        num_classes: Optional[int] = None,
    ):
        super().__init__()
        _check_positive(in_channels=in_channels, width=width, n_layers=n_layers)
        _check_padding(padding_mode)
        self.time = SinusoidalTimeEmbedding(time_dim, num_classes)
        self.up = _conv3(in_channels, width, padding_mode)
        self.convs = nn.ModuleList([_conv3(width, width, padding_mode) for _ in range(n_layers)])
        self.time_proj = nn.ModuleList([nn.Linear(time_dim, width) for _ in range(n_layers)])
        self.down = _conv3(width, in_channels, padding_mode)

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.time(t, label)                                               # (B, D)
        h = self.up(x)                                                          # (B, W, H, W)
        for conv, proj in zip(self.convs, self.time_proj):
            h = h + F.relu(conv(h) + proj(emb)[:, :, None, None])               # (B, W, H, W)
        return self.down(h)                                                     # (B, C, H, W)


class _ConvBlock(nn.Module):
    """Two conv3+ReLU layers with a per-channel time bias after the first (PaperUNet)."""

    def __init__(self, cin: int, cout: int, time_dim: int, padding_mode: str):
        super().__init__()
        self.conv1 = _conv3(cin, cout, padding_mode)
        self.proj = nn.Linear(time_dim, cout)
        self.conv2 = _conv3(cout, cout, padding_mode)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(h) + self.proj(emb)[:, :, None, None])            # (B, cout, H, W)
        return F.relu(self.conv2(h))                                            # (B, cout, H, W)


class PaperUNet(nn.Module):
    """The paper's style of UNet: maxpool down, stride-2 transposed conv up, skips.

    Level i (0-based) has ``base * 2**i`` channels; each level is a block of two
    conv3+ReLU layers with a time bias; ``levels`` maxpool halvings lead to a bottleneck
    block of ``base * 2**levels`` channels; the way up is ConvTranspose2d(k=2, s=2),
    concatenation with the skip of the same level, and a block.  No attention, no
    normalisation.  H and W must be divisible by ``2**levels``.

    Args:
        in_channels: image channels C.
        base: channels of the first level.
        levels: number of down/up steps.
        padding_mode: "zeros" or "circular" (the 3x3 convs; the k=2 s=2 transposed
            convs need no padding).
        time_dim: width of the time embedding.
        num_classes: when given, the model is class-conditional.

    Shapes: x (B, C, H, W), t (B,) float in [0, 1], label (B,) int64 or None
    -> eps (B, C, H, W).
    """

    def __init__(
        self,
        in_channels: int = 1,
        base: int = 32,
        levels: int = 2,
        padding_mode: str = "zeros",
        time_dim: int = 64,
        num_classes: Optional[int] = None,
    ):
        super().__init__()
        _check_positive(in_channels=in_channels, base=base, levels=levels)
        _check_padding(padding_mode)
        self.time = SinusoidalTimeEmbedding(time_dim, num_classes)
        chans = [base * 2**i for i in range(levels + 1)]
        self.enc = nn.ModuleList()
        cin = in_channels
        for c in chans[:-1]:
            self.enc.append(_ConvBlock(cin, c, time_dim, padding_mode))
            cin = c
        self.mid = _ConvBlock(chans[-2], chans[-1], time_dim, padding_mode)
        self.ups = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in reversed(range(levels)):
            self.ups.append(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2))
            self.dec.append(_ConvBlock(2 * chans[i], chans[i], time_dim, padding_mode))
        self.out = _conv3(base, in_channels, padding_mode)

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.time(t, label)                                               # (B, D)
        h = x
        skips = []
        for block in self.enc:
            h = block(h, emb)                                                   # (B, c_i, H/2^i, W/2^i)
            skips.append(h)
            h = F.max_pool2d(h, 2)                                              # (B, c_i, H/2^(i+1), ..)
        h = self.mid(h, emb)                                                    # (B, c_L, H/2^L, W/2^L)
        for up, block in zip(self.ups, self.dec):
            h = up(h)                                                           # (B, c_i, H/2^i, W/2^i)
            h = block(torch.cat([h, skips.pop()], dim=1), emb)                  # (B, c_i, H/2^i, W/2^i)
        return self.out(h)                                                      # (B, C, H, W)


def _groups(channels: int, max_groups: int = 8) -> int:
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


class _ResBlock(nn.Module):
    """diffusers-style residual block: GN-SiLU-conv, + time bias, GN-SiLU-conv, skip."""

    def __init__(self, cin: int, cout: int, time_dim: int, padding_mode: str):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = _conv3(cin, cout, padding_mode)
        self.proj = nn.Linear(time_dim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = _conv3(cout, cout, padding_mode)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                                   # (B, cout, H, W)
        h = h + self.proj(F.silu(emb))[:, :, None, None]                        # (B, cout, H, W)
        h = self.conv2(F.silu(self.norm2(h)))                                   # (B, cout, H, W)
        return self.skip(x) + h                                                 # (B, cout, H, W)


class _SelfAttention(nn.Module):
    """Single-head spatial self-attention over all H*W pixels, with a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.o = nn.Linear(channels, channels)
        self.scale = 1.0 / math.sqrt(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).flatten(2).transpose(1, 2)                             # (B, HW, C)
        q, k, v = self.q(h), self.k(h), self.v(h)                               # (B, HW, C) each
        att = torch.softmax(q @ k.transpose(1, 2) * self.scale, dim=-1)         # (B, HW, HW)
        out = self.o(att @ v)                                                   # (B, HW, C)
        return x + out.transpose(1, 2).reshape(x.shape)                         # (B, C, H, W)


class AttentionUNet(nn.Module):
    """A small diffusers-style UNet: GroupNorm, SiLU, residual blocks, one self-attention.

    conv3 in; per level a residual block (``base * mult`` channels) whose output is kept as
    a skip, then a stride-2 conv3 downsample (except after the last level); a middle of
    resblock / self-attention over all pixels / resblock at the lowest resolution; on the
    way up nearest-neighbour x2 upsampling + conv3, concatenation with the skip, a
    residual block; GroupNorm, SiLU, conv3 out.  H and W must be divisible by
    ``2**(len(channel_mults) - 1)``.

    Args:
        in_channels: image channels C.
        base: channels of the first level.
        channel_mults: channel multiplier per level (default (1, 2, 2): 3 resolutions).
        padding_mode: "zeros" or "circular" (every 3x3 conv).
        time_dim: width of the time embedding.
        num_classes: when given, the model is class-conditional.

    Shapes: x (B, C, H, W), t (B,) float in [0, 1], label (B,) int64 or None
    -> eps (B, C, H, W).
    """

    def __init__(
        self,
        in_channels: int = 1,
        base: int = 32,
        channel_mults: tuple[int, ...] = (1, 2, 2),
        padding_mode: str = "zeros",
        time_dim: int = 64,
        num_classes: Optional[int] = None,
    ):
        super().__init__()
        channel_mults = tuple(channel_mults)
        _check_positive(in_channels=in_channels, base=base, **{f"channel_mults[{i}]": m for i, m in enumerate(channel_mults)})
        if len(channel_mults) < 2:
            raise ValueError(f"channel_mults needs at least 2 levels, got {channel_mults}")
        _check_padding(padding_mode)
        chans = [base * m for m in channel_mults]
        self.time = SinusoidalTimeEmbedding(time_dim, num_classes)
        self.conv_in = _conv3(in_channels, base, padding_mode)
        self.down_blocks = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        cin = base
        for i, c in enumerate(chans):
            self.down_blocks.append(_ResBlock(cin, c, time_dim, padding_mode))
            if i < len(chans) - 1:
                self.downsamplers.append(nn.Conv2d(c, c, 3, stride=2, padding=1, padding_mode=padding_mode))
            cin = c
        self.mid1 = _ResBlock(chans[-1], chans[-1], time_dim, padding_mode)
        self.attn = _SelfAttention(chans[-1])
        self.mid2 = _ResBlock(chans[-1], chans[-1], time_dim, padding_mode)
        self.upsamplers = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(len(chans) - 1)):
            self.upsamplers.append(_conv3(chans[i + 1], chans[i + 1], padding_mode))
            self.up_blocks.append(_ResBlock(chans[i + 1] + chans[i], chans[i], time_dim, padding_mode))
        self.norm_out = nn.GroupNorm(_groups(base), base)
        self.conv_out = _conv3(base, in_channels, padding_mode)

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.time(t, label)                                               # (B, D)
        h = self.conv_in(x)                                                     # (B, base, H, W)
        skips = []
        for i, block in enumerate(self.down_blocks):
            h = block(h, emb)                                                   # (B, c_i, H/2^i, W/2^i)
            if i < len(self.downsamplers):
                skips.append(h)
                h = self.downsamplers[i](h)                                     # (B, c_i, H/2^(i+1), ..)
        h = self.mid2(self.attn(self.mid1(h, emb)), emb)                        # (B, c_L, H/2^L, W/2^L)
        for up, block in zip(self.upsamplers, self.up_blocks):
            h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))          # (B, c_{i+1}, H/2^i, ..)
            h = block(torch.cat([h, skips.pop()], dim=1), emb)                  # (B, c_i, H/2^i, W/2^i)
        return self.conv_out(F.silu(self.norm_out(h)))                          # (B, C, H, W)


#: name -> class, for configs that name an architecture inside the package.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "PaperResNet": PaperResNet,
    "PaperUNet": PaperUNet,
    "AttentionUNet": AttentionUNet,
}
