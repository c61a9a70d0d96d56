"""A small transformer denoiser: token ids ``x_t`` ``(B, L)`` and step ``t`` -> logits of
``p(x_0 | x_t)`` ``(B, L, V)``.

Layout: token embedding (``V + 1`` entries, the last one is ``[MASK]``) + learned position
embedding over the row-major token grid, ``depth`` pre-norm blocks (self-attention + MLP) whose
layer norms are modulated by the step embedding (adaptive LayerNorm, as in VQ-Diffusion's and
DiT's blocks), a final LayerNorm (:attr:`TokenTransformer.norm`, whose output ``(B, L, C)`` is
the *token feature* sequence that context prediction reads) and a linear map to ``V`` logits.

Example:
    >>> import torch
    >>> net = TokenTransformer(vocab_size=17, grid_shape=(8, 8), dim=32, depth=2, heads=2)
    >>> logits = net(torch.randint(0, 18, (3, 64)), torch.tensor([1, 5, 9]))
    >>> logits.shape
    torch.Size([3, 64, 17])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ctxpred.errors import ShapeError, ValueRangeError, check_integer

__all__ = ["TokenTransformer"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of integer steps ``t`` ``(B,)`` -> ``(B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float().unsqueeze(1) * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


class _AdaLayerNorm(nn.Module):
    """LayerNorm without affine, then ``(1 + scale) * x + shift`` from the step embedding."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.modulation = nn.Linear(dim, 2 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.modulation(temb).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = _AdaLayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = _AdaLayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.norm1(x, temb)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x, temb))


class TokenTransformer(nn.Module):
    """Transformer denoiser over a row-major token grid, predicting ``p(x_0 | x_t)`` logits.

    Args:
        vocab_size: ``V`` (input ids are ``0..V``, ``V`` = mask; output logits over ``V``).
        grid_shape: the token grid ``(h, w)``; ``L = h * w``.
        dim: token width ``C``.
        depth: number of blocks.
        heads: attention heads (must divide ``dim``).
        mlp_ratio: MLP hidden width / ``dim``.
        dropout: dropout in attention and MLP.

    Shape:
        - x_t: ``(B, L)`` long; t: ``(B,)`` long
        - output: logits ``(B, L, V)``; :meth:`features` gives ``(B, L, C)``
    """

    def __init__(
        self,
        vocab_size: int,
        grid_shape: tuple[int, int],
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueRangeError(f"heads={heads} must divide dim={dim}")
        self.vocab_size = int(vocab_size)
        self.grid_shape = (int(grid_shape[0]), int(grid_shape[1]))
        self.seq_len = self.grid_shape[0] * self.grid_shape[1]
        self.dim = dim
        self.token_embed = nn.Embedding(vocab_size + 1, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, self.seq_len, dim) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(
            [_Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, vocab_size)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def features(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Token features ``(B, L, C)`` (the output of :attr:`norm`)."""
        check_integer(x_t, "x_t")
        if x_t.dim() != 2 or x_t.shape[1] != self.seq_len:
            raise ShapeError(
                f"x_t must be (B, L={self.seq_len}) token ids, got shape {tuple(x_t.shape)}"
            )
        temb = self.time_mlp(timestep_embedding(t, self.dim))
        h = self.token_embed(x_t) + self.pos_embed
        for block in self.blocks:
            h = block(h, temb)
        return self.norm(h)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.to_logits(self.features(x_t, t))
