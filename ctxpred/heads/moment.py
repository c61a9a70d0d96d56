r"""The moment head and its divergence: closed-form Gaussian :math:`W_2^2` (Bures).

Example:
    >>> import torch
    >>> from ctxpred.heads import MomentHead
    >>> from ctxpred.neighborhoods import neighbors
    >>> head = MomentHead(out_channels=3, in_channels=8, rank=1)
    >>> nb = neighbors(torch.randn(2, 3, 4, 4), strides=(1, 2))
    >>> head.divergence(head(torch.randn(2, 16, 8)), nb).shape
    torch.Size([2, 16, 2])
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ctxpred.heads.base import (
    ContextHead,
    _core,
    _linear,
    _positive_int,
    check_out_channels,
    float32_core,
    match_strides,
)
from ctxpred.wasserstein import sqrtm_psd

__all__ = ["MomentHead", "MomentPrediction", "moment_divergence"]


class MomentPrediction(NamedTuple):
    """What :class:`MomentHead` returns.

    Attributes:
        mean: ``(B, P, S, C)``.
        log_variance: ``(B, P, S, C)``, the diagonal part ``D = diag(exp(log_variance))``.
        factor: ``(B, P, S, C, R)`` low-rank factor ``F`` (``None`` when ``rank=0``).

    Example:
        >>> pred = MomentPrediction(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2),
        ...                         torch.ones(1, 1, 1, 2, 1))
        >>> pred.covariance()[0, 0, 0]  # diag(exp(0)) + F F^T
        tensor([[2., 1.],
                [1., 2.]])
    """

    mean: Tensor
    log_variance: Tensor
    factor: Tensor | None

    def covariance(self) -> Tensor:
        """``Sigma = D + F F^T``, ``(B, P, S, C, C)``."""
        cov = torch.diag_embed(self.log_variance.exp())
        if self.factor is not None:
            cov = cov + self.factor @ self.factor.transpose(-1, -2)
        return cov


def _empirical_moments(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The valid neighbors' mean ``(..., C)`` and their centered, sqrt-weighted values
    ``(..., K_s, C)`` (0 on masked slots), whose Gram matrix is the population covariance."""
    weight = mask.to(values.dtype)
    weight = weight / weight.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (weight.unsqueeze(-1) * values).sum(-2)
    return mean, (values - mean.unsqueeze(-2)) * weight.unsqueeze(-1).sqrt()


def moment_divergence(prediction: MomentPrediction, values: Tensor, mask: Tensor) -> Tensor:
    r"""Closed-form Gaussian :math:`W_2^2` between predicted and empirical neighbor moments.

    .. math::
        \lVert m - \bar y \rVert^2 + \operatorname{tr}\big(\Sigma + \hat\Sigma
        - 2 (\hat\Sigma^{1/2} \Sigma \hat\Sigma^{1/2})^{1/2}\big)

    with :math:`\bar y, \hat\Sigma` the mean and (population) covariance of the valid neighbors;
    0 where no neighbor is valid. The Bures term is computed as
    :math:`\operatorname{tr}\Sigma + \operatorname{tr}\hat\Sigma - 2 \lVert Y \Sigma^{1/2}
    \rVert_*` with :math:`\hat\Sigma = Y^\top Y` (:math:`Y` the centered, square-root-weighted
    valid neighbors), equal to the formula above and well conditioned when :math:`\hat\Sigma` is
    singular (fewer valid neighbors than channels).

    Args:
        prediction: :class:`MomentPrediction`, ``mean (B, P, S', C)``.
        values: ``(B, P, S, K_s, C)``.
        mask: ``(B, P, S, K_s)``.

    Returns:
        ``(B, P, S)``.

    Example:
        >>> y = torch.randn(1, 2, 1, 8, 3); m = torch.ones(1, 2, 1, 8, dtype=torch.bool)
        >>> mean = y.mean(-2)
        >>> pred = MomentPrediction(mean, torch.full_like(mean, -30.0), None)
        >>> moment_divergence(pred, y, m).shape
        torch.Size([1, 2, 1])
    """
    check_out_channels(prediction.mean.shape[-1], values, "the moment head")
    num_strides = values.shape[2]
    with float32_core(values.device):
        factor = None if prediction.factor is None else _core(prediction.factor)
        pred = MomentPrediction(_core(prediction.mean), _core(prediction.log_variance), factor)
        mean = match_strides(pred.mean, num_strides, "the moment head")
        cov = match_strides(pred.covariance(), num_strides, "the moment head")
        target_mean, centered = _empirical_moments(_core(values).to(mean.dtype), mask)
        # tr((S^1/2 Sigma S^1/2)^1/2) with S = Y^T Y is the nuclear norm of Y Sigma^1/2: a
        # (K_s, C) matrix, so the target covariance's square root (singular whenever
        # K_s <= C, where rounding noise in its zero eigenvalues biased the value) is never
        # taken; Sigma is positive definite
        cross = torch.linalg.svdvals(centered @ sqrtm_psd(cov)).sum(-1)
        trace = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1) + centered.pow(2).sum((-1, -2))
        value = (mean - target_mean).pow(2).sum(-1) + (trace - 2.0 * cross).clamp_min(0.0)
        return value * mask.any(-1).to(value.dtype)


class MomentHead(ContextHead):
    r"""Predicts the mean and covariance of the neighborhood, for the closed-form Gaussian W2.

    .. math::
        \Sigma_i^s = \operatorname{diag}(e^{v_i^s}) + F_i^s F_i^{s\top}, \qquad
        W_2^2 = \lVert m_1 - m_2 \rVert^2 + \operatorname{tr}\big(\Sigma_1 + \Sigma_2
        - 2 (\Sigma_2^{1/2} \Sigma_1 \Sigma_2^{1/2})^{1/2}\big)

    against the (mask-weighted) empirical mean and covariance of the valid neighbors
    (:func:`moment_divergence`).

    Args:
        out_channels: ``C``, channels of the target neighbors.
        in_channels: ``C_in``, or ``None`` to infer it on the first forward.
        rank: ``R``, rank of the low-rank part (``0``: diagonal covariance).
        num_strides: ``S``, one mean and covariance per stride (``1`` shares them).

    Shape:
        - input ``z``: ``(B, P, C_in)`` or ``(B, C_in, *spatial)``
        - output: :class:`MomentPrediction` with ``mean (B, P, S, C)``

    Example:
        >>> pred = MomentHead(out_channels=3, in_channels=8, rank=2)(torch.randn(2, 5, 8))
        >>> pred.mean.shape, pred.factor.shape, pred.covariance().shape
        (torch.Size([2, 5, 1, 3]), torch.Size([2, 5, 1, 3, 2]), torch.Size([2, 5, 1, 3, 3]))
    """

    def __init__(
        self,
        out_channels: int,
        in_channels: int | None = None,
        *,
        rank: int = 0,
        num_strides: int = 1,
    ) -> None:
        super().__init__(out_channels, in_channels, num_strides)
        self.rank = _positive_int(rank, "rank", minimum=0)
        self.proj = _linear(in_channels, self.num_strides * self.out_channels * (2 + self.rank))

    def forward(self, z: Tensor, generator: torch.Generator | None = None) -> MomentPrediction:
        """Mean, log-variance and low-rank factor of each point's neighborhood
        (deterministic: ``generator`` unused)."""
        # (B, P, S * C * (2 + R)) -> (B, P, S, C, 2 + R): mean, log-variance, R factor columns
        out = self.proj(self.points(z)).unflatten(
            -1, (self.num_strides, self.out_channels, 2 + self.rank)
        )
        factor = out[..., 2:] if self.rank else None
        return MomentPrediction(out[..., 0], out[..., 1], factor)

    @property
    def uses_estimator(self) -> bool:
        """``False``: a closed-form divergence, no Wasserstein estimator."""
        return False

    def divergence(
        self, prediction: MomentPrediction, neighbors: Any, estimator: Any = None, *,
        match_mask: bool = False,
    ) -> Tensor:
        """:func:`moment_divergence`, ``(B, P, S)`` (closed form, no estimator)."""
        return moment_divergence(prediction, neighbors.values, neighbors.mask)

    def extra_repr(self) -> str:
        """The options shown in ``repr(module)``."""
        return f"{super().extra_repr()}, rank={self.rank}"
