r"""The baseline per-slot decoder and its divergence: masked squared error, slot by slot.

Example:
    >>> import torch
    >>> from ctxpred.heads import NaiveHead
    >>> from ctxpred.neighborhoods import neighbors
    >>> head = NaiveHead(out_channels=3, in_channels=8)
    >>> nb = neighbors(torch.randn(2, 3, 4, 4), strides=(1,))
    >>> head.divergence(head(torch.randn(2, 16, 8)), nb).shape
    torch.Size([2, 16, 1])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ctxpred.errors import ShapeError
from ctxpred.heads.base import (
    ContextHead,
    _core,
    _linear,
    _positive_int,
    check_out_channels,
    float32_core,
    match_strides,
)

__all__ = ["NaiveHead", "naive_divergence"]


def naive_divergence(prediction: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    r"""Slot-by-slot squared error of the naive head, per point and stride.

    .. math::
        D_i^s = \frac{1}{|V_i^s|} \sum_{k \in V_i^s} \lVert \hat y_{ik}^s - y_{ik}^s \rVert^2

    (0 when no slot is valid). With equal sizes it upper-bounds :math:`W_2^2` of the same sets.

    Args:
        prediction: ``(B, P, S', K_s, C)``, ``S'`` in ``{1, S}``.
        values: ``(B, P, S, K_s, C)``.
        mask: ``(B, P, S, K_s)``.

    Returns:
        ``(B, P, S)``.

    Example:
        >>> y = torch.zeros(1, 1, 1, 8, 2); m = torch.zeros(1, 1, 1, 8, dtype=torch.bool)
        >>> m[..., :2] = True
        >>> naive_divergence(y + 1.0, y, m).tolist()  # ||(1, 1)||^2 on the 2 valid slots
        [[[2.0]]]
    """
    check_out_channels(prediction.shape[-1], values, "the naive head")
    prediction = match_strides(prediction, values.shape[2], "the naive head")
    if prediction.shape[3] != values.shape[3]:
        raise ShapeError(
            f"the naive head predicts {prediction.shape[3]} slots per stride but the "
            f"neighborhood has K_s={values.shape[3]}; set NaiveHead(num_slots={values.shape[3]})"
        )
    with float32_core(prediction.device):
        err = (_core(prediction) - _core(values)).square().sum(-1)
        weight = mask.to(err.dtype)
        return (err * weight).sum(-1) / weight.sum(-1).clamp_min(1.0)


class NaiveHead(ContextHead):
    r"""The baseline decoder: one prediction per neighbor slot, in the fixed slot order.

    A single linear map (equivalently one linear map per offset) predicts, per stride, the
    ``num_slots`` neighbors in slot order (see :func:`ctxpred.functional.neighbor_offsets`). It is
    compared with the target slot by slot (masked squared error, :func:`naive_divergence`), so it
    is order-dependent and its cost grows with ``|S| * (k^d - 1)``.

    Args:
        out_channels: ``C_out``, channels of the target neighbors.
        num_slots: ``K_s``, neighbors per stride (``k**d - 1``: 8 for a 3x3 ring in 2-D).
        in_channels: ``C_in``, or ``None`` to infer it on the first forward.
        num_strides: ``S``, one prediction per stride (``1`` shares it across strides).

    Shape:
        - input ``z``: ``(B, P, C_in)`` or ``(B, C_in, *spatial)``
        - output: ``(B, P, S, K_s, C_out)``

    Example:
        >>> NaiveHead(out_channels=3, in_channels=16, num_strides=3)(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 3, 8, 3])
    """

    def __init__(
        self,
        out_channels: int,
        num_slots: int = 8,
        in_channels: int | None = None,
        *,
        num_strides: int = 1,
    ) -> None:
        super().__init__(out_channels, in_channels, num_strides)
        self.num_slots = _positive_int(num_slots, "num_slots")
        self.proj = _linear(in_channels, self.num_strides * self.num_slots * self.out_channels)

    def forward(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-slot predictions ``(B, P, S, K_s, C_out)`` (deterministic: ``generator`` unused)."""
        out = self.proj(self.points(z))
        # (B, P, S * K_s * C) -> (B, P, S, K_s, C)
        return out.unflatten(-1, (self.num_strides, self.num_slots, self.out_channels))

    @property
    def uses_estimator(self) -> bool:
        """``False``: a closed-form divergence, no Wasserstein estimator."""
        return False

    def divergence(
        self, prediction: Tensor, neighbors: Any, estimator: Any = None, *,
        match_mask: bool = False,
    ) -> Tensor:
        """:func:`naive_divergence`, ``(B, P, S)`` (no estimator)."""
        return naive_divergence(prediction, neighbors.values, neighbors.mask)

    def extra_repr(self) -> str:
        """The options shown in ``repr(module)``."""
        return f"{super().extra_repr()}, num_slots={self.num_slots}"
