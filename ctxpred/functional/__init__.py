"""Plain functions underneath every ctxpred module (no state, no parameters).

Example:
    >>> import torch
    >>> from ctxpred import functional as F
    >>> nb = F.neighbors(torch.randn(2, 3, 8, 8), strides=(1, 2))
    >>> nb.values.shape, nb.mask.shape
    (torch.Size([2, 64, 16, 3]), torch.Size([2, 64, 16]))
"""

from ctxpred.loss import (
    categorical_divergence,
    group_by_stride,
    moment_divergence,
    naive_divergence,
    reduce_context_loss,
    resize_target,
    sample_divergence,
)
from ctxpred.neighborhoods import gather_points, neighbor_offsets, neighbors, token_neighbors
from ctxpred.wasserstein import wasserstein

__all__ = [
    "categorical_divergence",
    "gather_points",
    "group_by_stride",
    "moment_divergence",
    "naive_divergence",
    "neighbor_offsets",
    "neighbors",
    "reduce_context_loss",
    "resize_target",
    "sample_divergence",
    "token_neighbors",
    "wasserstein",
]
