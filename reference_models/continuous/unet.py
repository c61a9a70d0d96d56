"""A small DDPM UNet: residual blocks with a time embedding, attention at low resolution.

Layout (``channel_mults=(1, 2, 2)``, 32x32 input, ``base_channels=32``)::

    conv_in -> down_blocks.0 (32x32, 32ch) -> down_blocks.1 (16x16, 64ch) -> down_blocks.2 (8x8,
    64ch, attention) -> mid (res + attention + res) -> up_blocks.0 (8x8, 64ch, attention)
    -> up_blocks.1 (16x16, 64ch) -> up_blocks.2 (32x32, 32ch) -> conv_out

``up_blocks.{j}`` are the *decoder blocks*: each takes the upsampled decoder state and the
matching encoder skip, and returns a ``(B, C_j, H_j, W_j)`` map. These are the layers the demo
hooks context prediction onto (``ctxpred.attach(unet, {"up_blocks.2": ...})``), exactly as a user
would on any UNet; :meth:`UNet.decoder_channels` tells their channel counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctxpred.errors import ShapeError, ValueRangeError

__all__ = ["UNet", "timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    r"""Sinusoidal embedding of (possibly fractional) timesteps ``t`` ``(B,)`` -> ``(B, dim)``.

    :math:`[\cos(t\,\omega_k), \sin(t\,\omega_k)]_k` with :math:`\omega_k =
    \text{max\_period}^{-k/(dim/2)}`.

    Example:
        >>> timestep_embedding(torch.tensor([0.0, 10.0]), 8).shape
        torch.Size([2, 8])
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, time embedding added in between, 1x1 skip if channels change."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(time_dim, out_channels)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = (nn.Identity() if in_channels == out_channels
                     else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a map, residual, zero-initialized output."""

    def __init__(self, channels: int, num_heads: int = 4) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueRangeError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).view(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # (B, heads, HW, d)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


class DownBlock(nn.Module):
    """Residual blocks (+ attention) at one resolution; returns the map kept as a skip."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, num_res_blocks: int,
                 attention: bool, dropout: float) -> None:
        super().__init__()
        self.res = nn.ModuleList(
            ResBlock(in_channels if i == 0 else out_channels, out_channels, time_dim, dropout)
            for i in range(num_res_blocks)
        )
        self.attn = Attention(out_channels) if attention else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        for block in self.res:
            x = block(x, temb)
        return self.attn(x)


class UpBlock(nn.Module):
    """A decoder block: concatenates the encoder skip, then residual blocks (+ attention)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, time_dim: int,
                 num_res_blocks: int, attention: bool, dropout: float) -> None:
        super().__init__()
        self.res = nn.ModuleList(
            ResBlock((in_channels + skip_channels) if i == 0 else out_channels, out_channels,
                     time_dim, dropout)
            for i in range(num_res_blocks)
        )
        self.attn = Attention(out_channels) if attention else nn.Identity()

    def forward(self, x: Tensor, skip: Tensor, temb: Tensor) -> Tensor:
        x = torch.cat([x, skip], dim=1)
        for block in self.res:
            x = block(x, temb)
        return self.attn(x)


class UNet(nn.Module):
    """Noise-prediction UNet ``(x_t (B, C, H, W), t (B,)) -> (B, C, H, W)``.

    Args:
        in_channels: image channels ``C`` (output has the same).
        base_channels: width of the first level.
        channel_mults: width multiplier per level; ``H`` and ``W`` must be divisible by
            ``2 ** (len(channel_mults) - 1)``.
        num_res_blocks: residual blocks per level (encoder and decoder).
        attention_levels: indices of the levels that get self-attention (default: the coarsest).
        dropout: dropout inside the residual blocks.

    Example:
        >>> net = UNet(in_channels=1, base_channels=16, channel_mults=(1, 2))
        >>> net(torch.randn(2, 1, 16, 16), torch.tensor([3, 500])).shape
        torch.Size([2, 1, 16, 16])
        >>> [name for name, _ in net.named_children() if "up" in name], net.decoder_channels()
        (['up_blocks', 'upsamples'], {'up_blocks.0': 32, 'up_blocks.1': 16})
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attention_levels: Sequence[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not channel_mults or num_res_blocks < 1 or base_channels < 8:
            raise ValueRangeError(
                "need at least one level, num_res_blocks >= 1 and base_channels >= 8; got "
                f"{tuple(channel_mults)}, {num_res_blocks}, {base_channels}"
            )
        levels = len(channel_mults)
        attention_levels = (levels - 1,) if attention_levels is None else tuple(attention_levels)
        widths = [base_channels * m for m in channel_mults]
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.num_levels = levels
        time_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        prev = base_channels
        for i, width in enumerate(widths):
            self.down_blocks.append(
                DownBlock(prev, width, time_dim, num_res_blocks, i in attention_levels, dropout)
            )
            if i < levels - 1:
                self.downsamples.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
            prev = width
        self.mid1 = ResBlock(prev, prev, time_dim, dropout)
        self.mid_attn = Attention(prev)
        self.mid2 = ResBlock(prev, prev, time_dim, dropout)
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        self._decoder_channels: dict[str, int] = {}
        for j, i in enumerate(reversed(range(levels))):
            self.up_blocks.append(
                UpBlock(prev, widths[i], widths[i], time_dim, num_res_blocks,
                        i in attention_levels, dropout)
            )
            self._decoder_channels[f"up_blocks.{j}"] = widths[i]
            prev = widths[i]
            if i > 0:
                self.upsamples.append(nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(prev, prev, 3, padding=1),
                ))
        self.norm_out = _norm(prev)
        self.conv_out = nn.Conv2d(prev, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def decoder_channels(self) -> dict[str, int]:
        """``{"up_blocks.j": channels}`` of the decoder blocks, coarsest (``j = 0``) first."""
        return dict(self._decoder_channels)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        factor = 2 ** (self.num_levels - 1)
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-1] % factor \
                or x.shape[-2] % factor:
            raise ShapeError(
                f"UNet expects (B, {self.in_channels}, H, W) with H, W divisible by {factor}, "
                f"got {tuple(x.shape)}"
            )
        temb = self.time_mlp(timestep_embedding(t, self.base_channels))
        h = self.conv_in(x)
        skips = []
        for i, block in enumerate(self.down_blocks):
            h = block(h, temb)
            skips.append(h)
            if i < self.num_levels - 1:
                h = self.downsamples[i](h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for j, block in enumerate(self.up_blocks):
            h = block(h, skips.pop(), temb)
            if j < self.num_levels - 1:
                h = self.upsamples[j](h)
        return self.conv_out(F.silu(self.norm_out(h)))
