"""Exponential moving average of a model's weights (the weights used for sampling)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ctxpred.errors import ValueRangeError

__all__ = ["EMA"]


class EMA(nn.Module):
    r"""Keeps :math:`\theta_{ema} \leftarrow d\,\theta_{ema} + (1-d)\,\theta` after every update,
    with warm-up :math:`d_n = \min(d, \frac{1+n}{10+n})` at update ``n``.

    The copy is made with ``copy.deepcopy`` at construction. Create the EMA *before*
    ``ctxpred.attach`` (or rely on ``attach``'s contract that a deep copy gets inert hooks): the
    context heads live outside the model, so they never enter the EMA, its ``state_dict`` or the
    sampler.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> ema = EMA(net, decay=0.5)
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> ema.update(net)
        >>> bool(torch.allclose(ema.model.weight, net.weight - 0.1))  # d_0 = 0.1
        True
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueRangeError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the averaged weights towards ``model``'s (buffers are copied)."""
        n = int(self.num_updates)
        decay = min(self.decay, (1 + n) / (10 + n))
        ema_params = dict(self.model.named_parameters())
        for name, param in model.named_parameters():
            ema_params[name].lerp_(param.detach(), 1.0 - decay)
        ema_buffers = dict(self.model.named_buffers())
        for name, buf in model.named_buffers():
            ema_buffers[name].copy_(buf)
        self.num_updates += 1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the averaged model."""
        return self.model(*args, **kwargs)
