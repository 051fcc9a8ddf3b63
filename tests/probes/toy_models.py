"""Toy networks shared by the probe tests (trace, receptive field, equivariance, ERF).

Every network has the denoiser signature ``forward(x, t, label=None)`` (t is ignored or
used as a per-sample bias) so that it can also serve as an ``eps_fn``.  Sizes are tiny;
each test derives the expected answer by hand in a comment.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ConvStack",
    "StrideThenTranspose",
    "TwoLevelUNet",
    "AttnNet",
    "SDPANet",
    "PosEmbNet",
    "CoordNet",
    "DenseSpaceNet",
    "ChannelLastLinearNet",
    "ControlFlowNet",
    "ShapeBranchNet",
    "TimeEmbNet",
    "PixelShuffleNet",
    "UpsampleNet",
    "PadNet",
    "Conv1dNet",
    "NormNet",
    "SqueezeExciteNet",
    "FlipNet",
    "linear_chain",
    "eps_of",
]


def eps_of(model: nn.Module):
    """The model as an ``eps(x, t, label)`` callable."""
    return lambda x, t, label: model(x, t, label)


class ConvStack(nn.Module):
    """L convs (kernel k, dilation d_i, same padding), ReLU between them, 1 -> c -> 1 channels."""

    def __init__(self, n_layers: int = 3, kernel: int = 3, dilations: Optional[Sequence[int]] = None,
                 padding_mode: str = "zeros", channels: int = 4, relu: bool = True):
        super().__init__()
        dil = list(dilations) if dilations is not None else [1] * n_layers
        layers = []
        for i, d in enumerate(dil):
            cin = 1 if i == 0 else channels
            cout = 1 if i == len(dil) - 1 else channels
            layers.append(nn.Conv2d(cin, cout, kernel, padding=d * (kernel - 1) // 2, dilation=d, padding_mode=padding_mode))
        self.convs = nn.ModuleList(layers)
        self.relu = relu

    def forward(self, x, t, label=None):
        for i, c in enumerate(self.convs):
            x = c(x)
            if self.relu and i < len(self.convs) - 1:
                x = F.relu(x)
        return x


class StrideThenTranspose(nn.Module):
    """conv k3 s2 p1 -> ReLU -> ConvTranspose2d(k, s=2, p)."""

    def __init__(self, k_t: int = 2, p_t: int = 0, padding_mode: str = "zeros"):
        super().__init__()
        self.down = nn.Conv2d(1, 4, 3, stride=2, padding=1, padding_mode=padding_mode)
        self.up = nn.ConvTranspose2d(4, 1, k_t, stride=2, padding=p_t)

    def forward(self, x, t, label=None):
        return self.up(F.relu(self.down(x)))


class TwoLevelUNet(nn.Module):
    """c1 = conv3(x); c2 = conv3(maxpool2(c1)); u = convT k2 s2 (c2); out = conv3(cat(u, c1))."""

    def __init__(self, padding_mode: str = "zeros", ch: int = 4):
        super().__init__()
        self.c1 = nn.Conv2d(1, ch, 3, padding=1, padding_mode=padding_mode)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1, padding_mode=padding_mode)
        self.up = nn.ConvTranspose2d(ch, ch, 2, stride=2)
        self.c3 = nn.Conv2d(2 * ch, 1, 3, padding=1, padding_mode=padding_mode)

    def forward(self, x, t, label=None):
        h1 = F.relu(self.c1(x))
        h2 = F.relu(self.c2(F.max_pool2d(h1, 2)))
        return self.c3(torch.cat([self.up(h2), h1], dim=1))


class AttnNet(nn.Module):
    """conv3 -> GroupNorm -> tokens -> nn.MultiheadAttention (batch_first) + residual -> conv3."""

    def __init__(self, padding_mode: str = "zeros", ch: int = 4):
        super().__init__()
        self.c1 = nn.Conv2d(1, ch, 3, padding=1, padding_mode=padding_mode)
        self.norm = nn.GroupNorm(2, ch)
        self.attn = nn.MultiheadAttention(ch, 2, batch_first=True)
        self.c2 = nn.Conv2d(ch, 1, 3, padding=1, padding_mode=padding_mode)

    def forward(self, x, t, label=None):
        h = self.norm(self.c1(x))
        B, C, H, W = h.shape
        tok = h.flatten(2).transpose(1, 2)                                       # (B, HW, C)
        a, _ = self.attn(tok, tok, tok)
        h = h + a.transpose(1, 2).reshape(B, C, H, W)
        return self.c2(h)


class SDPANet(nn.Module):
    """conv3 -> tokens -> F.scaled_dot_product_attention (no residual) -> conv1."""

    def __init__(self, ch: int = 4):
        super().__init__()
        self.c1 = nn.Conv2d(1, ch, 3, padding=1)
        self.c2 = nn.Conv2d(ch, 1, 1)

    def forward(self, x, t, label=None):
        h = self.c1(x)
        B, C, H, W = h.shape
        tok = h.flatten(2).transpose(1, 2)                                       # (B, HW, C)
        a = F.scaled_dot_product_attention(tok, tok, tok)                        # (B, HW, C)
        return self.c2(a.transpose(1, 2).reshape(B, C, H, W))


class PosEmbNet(nn.Module):
    """conv3 (circular) + a learned (1, C, H, W) position embedding -> conv1."""

    def __init__(self, size: int = 8, ch: int = 4):
        super().__init__()
        self.c1 = nn.Conv2d(1, ch, 3, padding=1, padding_mode="circular")
        self.pos = nn.Parameter(torch.randn(1, ch, size, size))
        self.c2 = nn.Conv2d(ch, 1, 1)

    def forward(self, x, t, label=None):
        return self.c2(F.relu(self.c1(x) + self.pos))


class CoordNet(nn.Module):
    """Concatenates a linspace row-coordinate channel (CoordConv), then a circular conv3."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 1, 3, padding=1, padding_mode="circular")

    def forward(self, x, t, label=None):
        B, C, H, W = x.shape
        ys = torch.linspace(-1.0, 1.0, H).view(1, 1, H, 1).expand(B, 1, H, W)
        return self.c(torch.cat([x, ys], dim=1))


class DenseSpaceNet(nn.Module):
    """A Linear over the flattened H*W positions (global and position-dependent)."""

    def __init__(self, size: int = 6):
        super().__init__()
        self.fc = nn.Linear(size * size, size * size)

    def forward(self, x, t, label=None):
        B, C, H, W = x.shape
        return self.fc(x.flatten(2)).view(B, C, H, W)


class ChannelLastLinearNet(nn.Module):
    """conv3 -> permute to (B, H, W, C) -> Linear over channels -> permute back."""

    def __init__(self, ch: int = 4):
        super().__init__()
        self.c = nn.Conv2d(1, ch, 3, padding=1, padding_mode="circular")
        self.fc = nn.Linear(ch, 1)

    def forward(self, x, t, label=None):
        h = self.c(x).permute(0, 2, 3, 1)                                        # (B, H, W, C)
        return self.fc(h).permute(0, 3, 1, 2)                                    # (B, 1, H, W)


class ControlFlowNet(nn.Module):
    """Python control flow on non-tensor arguments: a loop over ``n_blocks`` conv3 blocks
    and an optional skip, decided by the ``use_skip`` flag."""

    def __init__(self, ch: int = 4, max_blocks: int = 4):
        super().__init__()
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Conv2d(ch, ch, 3, padding=1) for _ in range(max_blocks)])
        self.out = nn.Conv2d(ch, 1, 1)

    def forward(self, x, t, label=None, n_blocks: int = 2, use_skip: bool = True):
        h = self.inp(x)
        for i in range(n_blocks):
            r = F.relu(self.blocks[i](h))
            h = h + r if use_skip else r
        return self.out(h)


class ShapeBranchNet(nn.Module):
    """``len(x.shape)`` in forward: symbolic tracing cannot follow it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t, label=None):
        if len(x.shape) == 3:
            x = x[None]
        return self.c(x)


class TimeEmbNet(nn.Module):
    """conv3 (circular) + Linear(t) broadcast as a (B, C, 1, 1) bias -> conv1."""

    def __init__(self, ch: int = 4):
        super().__init__()
        self.c1 = nn.Conv2d(1, ch, 3, padding=1, padding_mode="circular")
        self.temb = nn.Linear(1, ch)
        self.c2 = nn.Conv2d(ch, 1, 1)

    def forward(self, x, t, label=None):
        bias = self.temb(t[:, None])[:, :, None, None]                           # (B, C, 1, 1)
        return self.c2(F.relu(self.c1(x) + bias))


class PixelShuffleNet(nn.Module):
    """conv3 -> PixelUnshuffle(2) -> conv3 -> PixelShuffle(2)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 1, 3, padding=1)
        self.un = nn.PixelUnshuffle(2)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.sh = nn.PixelShuffle(2)

    def forward(self, x, t, label=None):
        return self.sh(self.c2(self.un(self.c1(x))))


class UpsampleNet(nn.Module):
    """conv k3 s2 p1 -> F.interpolate(x2, mode) -> conv3."""

    def __init__(self, mode: str = "nearest"):
        super().__init__()
        self.mode = mode
        self.down = nn.Conv2d(1, 2, 3, stride=2, padding=1)
        self.c = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x, t, label=None):
        h = F.interpolate(self.down(x), scale_factor=2.0, mode=self.mode)
        return self.c(h)


class PadNet(nn.Module):
    """F.pad(mode) by 1 then a valid conv3, twice."""

    def __init__(self, mode: str = "reflect"):
        super().__init__()
        self.mode = mode
        self.c1 = nn.Conv2d(1, 2, 3)
        self.c2 = nn.Conv2d(2, 1, 3)

    def forward(self, x, t, label=None):
        h = self.c1(F.pad(x, (1, 1, 1, 1), mode=self.mode))
        return self.c2(F.pad(F.relu(h), (1, 1, 1, 1), mode=self.mode))


class Conv1dNet(nn.Module):
    """Two Conv1d layers (k3 then k5 dilation 2) on (B, C, L) signals."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(1, 2, 3, padding=1)
        self.c2 = nn.Conv1d(2, 1, 5, padding=4, dilation=2)

    def forward(self, x, t, label=None):
        return self.c2(F.relu(self.c1(x)))


class NormNet(nn.Module):
    """conv3 (circular) -> a norm -> conv1.  ``kind``: batch (eval), instance, layer_chw,
    layer_c (LayerNorm over channels on a channel-last view)."""

    def __init__(self, kind: str = "batch", size: int = 6, ch: int = 4):
        super().__init__()
        self.kind = kind
        self.c1 = nn.Conv2d(1, ch, 3, padding=1, padding_mode="circular")
        if kind == "batch":
            self.norm = nn.BatchNorm2d(ch)
        elif kind == "instance":
            self.norm = nn.InstanceNorm2d(ch)
        elif kind == "layer_chw":
            self.norm = nn.LayerNorm([ch, size, size])
        elif kind == "layer_c":
            self.norm = nn.LayerNorm(ch)
        else:
            raise ValueError(kind)
        self.c2 = nn.Conv2d(ch, 1, 1)

    def forward(self, x, t, label=None):
        h = self.c1(x)
        if self.kind == "layer_c":
            h = self.norm(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            h = self.norm(h)
        return self.c2(h)


class SqueezeExciteNet(nn.Module):
    """conv3 (circular) gated by sigmoid(Linear(AdaptiveAvgPool(h))) (global pooling)."""

    def __init__(self, ch: int = 4):
        super().__init__()
        self.c = nn.Conv2d(1, ch, 3, padding=1, padding_mode="circular")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, ch)
        self.out = nn.Conv2d(ch, 1, 1)

    def forward(self, x, t, label=None):
        h = self.c(x)
        gate = torch.sigmoid(self.fc(self.pool(h).flatten(1)))[:, :, None, None]  # (B, C, 1, 1)
        return self.out(h * gate)


class FlipNet(nn.Module):
    """conv3 then torch.flip along W: an op the probes have no rule for."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular")

    def forward(self, x, t, label=None):
        return torch.flip(self.c(x), dims=(-1,))


def linear_chain(n_layers: int = 2, kernel_1d: Sequence[float] = (1.0, 2.0, 1.0)) -> nn.Module:
    """A single-channel, bias-free, zero-padded chain of separable convs with kernel
    ``outer(k, k)``: a linear map whose Jacobian is known in closed form."""
    k = torch.tensor(list(kernel_1d), dtype=torch.float32)
    K = torch.outer(k, k)
    convs = []
    for _ in range(n_layers):
        c = nn.Conv2d(1, 1, len(kernel_1d), padding=len(kernel_1d) // 2, bias=False)
        with torch.no_grad():
            c.weight.copy_(K[None, None])
        convs.append(c)
    seq = nn.Sequential(*convs)

    class _Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = seq

        def forward(self, x, t, label=None):
            return self.seq(x)

    return _Chain().eval()


def tiny_diffusers_unet(size: int = 8):
    """A seeded two-level diffusers UNet2DModel with attention at the low level (1 channel);
    skips the test when diffusers is not installed."""
    import pytest

    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=size, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=2, attention_head_dim=4,
    ).eval()
