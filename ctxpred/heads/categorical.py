r"""The token head and its divergence: W over a codebook (or the exact 0-1 cost).

Example:
    >>> import torch
    >>> from ctxpred.heads import CategoricalHead
    >>> from ctxpred.neighborhoods import token_neighbors
    >>> head = CategoricalHead(num_classes=5, in_channels=8)
    >>> nb = token_neighbors(torch.randint(0, 5, (2, 4, 4)), strides=(1, 2))
    >>> head.divergence(head(torch.randn(2, 16, 8)), nb).shape
    torch.Size([2, 16, 2])
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ctxpred.errors import DTypeError, ShapeError, ValueRangeError, check_floating
from ctxpred.heads.base import (
    ContextHead,
    _core,
    _linear,
    _positive_int,
    _sample_weights,
    float32_core,
    match_strides,
)
from ctxpred.wasserstein import EstimatorSpec, resolve_estimator

__all__ = ["CategoricalHead", "CategoricalPrediction", "categorical_divergence"]


class CategoricalPrediction(NamedTuple):
    """What :class:`CategoricalHead` returns.

    Attributes:
        logits: ``(B, P, S, V)`` over the codebook.
        samples: ``(B, P, S, Q, D)`` Gumbel-softmax token samples mapped to the codebook
            (one-hot vectors, ``D = V``, without a codebook); ``None`` in distribution mode.
        codebook: ``(V, D)`` embedding the ground cost is measured in, or ``None`` for the
            discrete (0-1) cost.

    Example:
        >>> pred = CategoricalHead(num_classes=5, in_channels=8)(torch.randn(2, 3, 8))
        >>> pred.logits.shape, pred.samples is None  # distribution mode: no samples
        (torch.Size([2, 3, 1, 5]), True)
    """

    logits: Tensor
    samples: Tensor | None
    codebook: Tensor | None


def categorical_divergence(
    prediction: CategoricalPrediction,
    ids: Tensor,
    mask: Tensor,
    estimator: EstimatorSpec | None = None,
    match_mask: bool = False,
) -> Tensor:
    r"""W between the predicted token distribution and the neighbor tokens' empirical one.

    * distribution mode (no codebook): :math:`1 - \sum_v \min(p_v, q_v)` (exact W for the
      0-1 ground cost), ``q`` the histogram of the valid neighbor ids;
    * sampling mode: estimator between the ``Q`` Gumbel-softmax samples and the valid neighbors'
      embeddings (one-hot vectors without a codebook).

    Ids must lie in ``[0, V)`` (not checked: that would need a host sync).

    Args:
        prediction: :class:`CategoricalPrediction`, ``logits (B, P, S', V)``.
        ids: ``(B, P, S, K_s)`` long neighbor ids.
        mask: ``(B, P, S, K_s)``.
        estimator: for the sampling mode (``None``: :data:`ctxpred.wasserstein.LOSS_ESTIMATOR`).
        match_mask: in the sampling mode, mask the ``Q == K_s`` samples like their targets (see
            :func:`ctxpred.heads.gaussian.sample_divergence`).

    Returns:
        ``(B, P, S)``.

    Example:
        >>> ids = torch.tensor([[[[1, 1, 2, 0]]]]); m = torch.tensor([[[[1, 1, 1, 0]]]]).bool()
        >>> logits = torch.log(torch.tensor([[[[0.0, 2 / 3, 1 / 3]]]]))
        >>> categorical_divergence(CategoricalPrediction(logits, None, None), ids, m).abs().item()
        0.0
    """
    if ids.is_floating_point():
        raise DTypeError(
            f"a categorical head needs neighbor token ids (integer), got dtype {ids.dtype}; "
            f"use a TokenNeighborhood (its ids) as the neighborhood"
        )
    num_strides = ids.shape[2]
    logits = match_strides(prediction.logits, num_strides, "the categorical head")
    vocab = logits.shape[-1]
    codebook = prediction.codebook
    weight = mask.float()
    with float32_core(logits.device):
        if prediction.samples is not None:
            est = resolve_estimator(estimator) if estimator is None or isinstance(
                estimator, str) else estimator
            samples = match_strides(_core(prediction.samples), num_strides,
                                    "the categorical head")
            target = (F.one_hot(ids, vocab) if codebook is None else codebook[ids])
            target = target.to(samples.dtype)
            return est(samples, target, _sample_weights(samples, mask, match_mask),
                       weight.to(samples.dtype))
        if codebook is not None:
            raise ValueRangeError(
                "a codebook needs the sampling mode (samples=...): the estimators do not "
                "differentiate through the weights of a distribution over codebook entries"
            )
        probs = torch.softmax(_core(logits), dim=-1)
        hist = torch.zeros_like(probs).scatter_add_(-1, ids, weight.to(probs.dtype))
        hist = hist / weight.sum(-1, keepdim=True).clamp_min(1.0)
        value = 1.0 - torch.minimum(probs, hist).sum(-1)
        return value * mask.any(-1).to(value.dtype)


class CategoricalHead(ContextHead):
    r"""Token context: a distribution over a codebook of ``V`` entries per point and stride.

    The target is the empirical distribution of the valid neighbor tokens (its
    :attr:`target_kind` is ``"ids"``: the loss feeds it token ids from a
    :class:`~ctxpred.neighborhoods.TokenNeighborhood`). Divergence: :func:`categorical_divergence`.
    Two modes:

    * **distribution** (``num_samples=None``, no codebook): compare ``p = softmax(logits)`` with
      the neighbor histogram ``q`` under the discrete ground cost ``c(u, v) = [u != v]``, for
      which :math:`W = \mathrm{TV}(p, q) = 1 - \sum_v \min(p_v, q_v)` exactly (cost ``O(V)``
      per point). A codebook requires the sampling mode: the estimators treat weights as
      constants, so a distribution over codebook entries would receive no gradient.
    * **samples** (``num_samples=Q``): draw ``Q`` Gumbel-softmax relaxed tokens (temperature
      ``temperature``, straight-through one-hot when ``hard=True``), embed them with the codebook
      (or keep them one-hot) and compare the ``Q`` samples with the neighbor embeddings.

    Args:
        num_classes: ``V``, the vocabulary size of the token ids (``>= 2``).
        in_channels: ``C_in``, or ``None`` to infer it on the first forward.
        codebook: ``(V, D)`` embedding of the tokens (stored as a detached buffer; refresh it
            with :meth:`set_codebook`; needs ``num_samples``), or ``None`` for the 0-1 cost
            (distribution mode) / one-hot vectors (sampling mode).
        num_samples: ``Q`` for the sampling mode, ``None`` for the distribution mode.
        temperature: Gumbel-softmax temperature ``tau > 0``.
        hard: straight-through one-hot samples (sampling mode).
        num_strides: ``S``, one distribution per stride (``1`` shares it across strides).

    Shape:
        - input ``z``: ``(B, P, C_in)`` or ``(B, C_in, *spatial)``
        - output: :class:`CategoricalPrediction`, ``logits (B, P, S, V)``

    Example:
        >>> head = CategoricalHead(num_classes=10, in_channels=8, codebook=torch.randn(10, 4),
        ...                        num_samples=6)
        >>> pred = head(torch.randn(2, 5, 8))
        >>> pred.logits.shape, pred.samples.shape, head.out_channels
        (torch.Size([2, 5, 1, 10]), torch.Size([2, 5, 1, 6, 4]), 4)
    """

    codebook: Tensor | None
    target_kind: ClassVar[Literal["values", "ids"]] = "ids"

    def __init__(
        self,
        num_classes: int,
        in_channels: int | None = None,
        *,
        codebook: Tensor | None = None,
        num_samples: int | None = None,
        temperature: float = 1.0,
        hard: bool = False,
        num_strides: int = 1,
    ) -> None:
        vocab = _positive_int(num_classes, "num_classes", minimum=2)
        super().__init__(vocab, in_channels, num_strides)
        self.num_classes = vocab
        self.num_samples = None if num_samples is None else _positive_int(
            num_samples, "num_samples")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                and temperature > 0):
            raise ValueRangeError(f"temperature must be a finite float > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.hard = bool(hard)
        if codebook is not None and num_samples is None:
            raise ValueRangeError(
                "CategoricalHead with a codebook needs num_samples (Gumbel-softmax samples): the "
                "Wasserstein estimators do not differentiate through the weights, so a "
                "distribution over codebook entries would get no gradient; without a codebook "
                "the distribution mode uses the exact 0-1 cost (total variation)"
            )
        self.register_buffer("codebook", None)
        if codebook is not None:
            self.set_codebook(codebook)
        self.proj = _linear(in_channels, self.num_strides * vocab)

    def set_codebook(self, codebook: Tensor) -> None:
        """Replace the codebook ``(V, D)`` (a detached copy; ``V`` must equal ``num_classes``)."""
        check_floating(codebook, "codebook")
        if codebook.dim() != 2 or codebook.shape[0] != self.num_classes:
            raise ShapeError(
                f"codebook must be (V={self.num_classes}, D), got shape {tuple(codebook.shape)}"
            )
        self.codebook = codebook.detach().clone()
        self.out_channels = int(codebook.shape[1])

    def forward(self, z: Tensor, generator: torch.Generator | None = None) -> CategoricalPrediction:
        """Logits, and Gumbel-softmax samples in sampling mode; ``generator`` seeds the noise."""
        # (B, P, S * V) -> (B, P, S, V)
        logits = self.proj(self.points(z)).unflatten(-1, (self.num_strides, self.num_classes))
        if self.num_samples is None:
            return CategoricalPrediction(logits, None, self.codebook)
        shape = (*logits.shape[:-1], self.num_samples, self.num_classes)
        device = logits.device if generator is None else generator.device
        exponential = torch.empty(shape, device=device, dtype=torch.float32)
        exponential = exponential.exponential_(generator=generator).to(logits.device)
        gumbel = -exponential.clamp_min(torch.finfo(torch.float32).tiny).log()
        core = _core(logits)  # float32, or float64 for float64 inputs
        soft = torch.softmax((core.unsqueeze(-2) + gumbel.to(core.dtype)) / self.temperature,
                             dim=-1)
        if self.hard:
            hard = nn.functional.one_hot(soft.argmax(-1), self.num_classes).to(soft.dtype)
            soft = hard - soft.detach() + soft
        samples = soft if self.codebook is None else soft @ self.codebook.to(soft.dtype)
        return CategoricalPrediction(logits, samples, self.codebook)

    @property
    def uses_estimator(self) -> bool:
        """Only the sampling mode (``num_samples``) compares samples with an estimator."""
        return self.num_samples is not None

    def divergence(
        self, prediction: CategoricalPrediction, neighbors: Any,
        estimator: EstimatorSpec | None = None, *, match_mask: bool = False,
    ) -> Tensor:
        """:func:`categorical_divergence` against the neighbor ids, ``(B, P, S)``."""
        return categorical_divergence(prediction, neighbors.values, neighbors.mask, estimator,
                                      match_mask)

    def extra_repr(self) -> str:
        mode = "distribution" if self.num_samples is None else f"num_samples={self.num_samples}"
        return (f"{super().extra_repr()}, num_classes={self.num_classes}, {mode}, "
                f"codebook={'none' if self.codebook is None else tuple(self.codebook.shape)}")
