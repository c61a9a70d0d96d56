"""Plain functions underneath every ctxpred module (no state, no parameters).

* neighborhoods: :func:`neighbors`, :func:`token_neighbors`, :func:`gather_points`,
  :func:`neighbor_offsets`;
* head divergences: :func:`sample_divergence`, :func:`naive_divergence`,
  :func:`moment_divergence`, :func:`categorical_divergence`;
* the loss reduction :func:`reduce_context_loss`;
* estimators: :func:`wasserstein`.

Example:
    >>> import torch
    >>> from ctxpred import functional as F
    >>> nb = F.neighbors(torch.randn(2, 3, 8, 8), strides=(1, 2))
    >>> nb.values.shape, nb.mask.shape
    (torch.Size([2, 64, 2, 8, 3]), torch.Size([2, 64, 2, 8]))
"""

from ctxpred._deprecation import deprecated_names
from ctxpred.heads import (
    categorical_divergence,
    moment_divergence,
    naive_divergence,
    sample_divergence,
)
from ctxpred.loss import reduce_context_loss
from ctxpred.neighborhoods import gather_points, neighbor_offsets, neighbors, token_neighbors
from ctxpred.wasserstein import wasserstein

__all__ = [
    "categorical_divergence",
    "gather_points",
    "moment_divergence",
    "naive_divergence",
    "neighbor_offsets",
    "neighbors",
    "reduce_context_loss",
    "sample_divergence",
    "token_neighbors",
    "wasserstein",
]

__getattr__ = deprecated_names(__name__, {
    "group_by_stride": ("ctxpred.loss", "group_by_stride"),
    "resize_target": ("ctxpred._layout", "resize_target"),
})
