"""Plain functions underneath every ctxpred module (no state, no parameters).

Example:
    >>> import torch
    >>> from ctxpred import functional as F
    >>> nb = F.neighbors(torch.randn(2, 3, 8, 8), strides=(1, 2))
    >>> nb.values.shape, nb.mask.shape
    (torch.Size([2, 64, 16, 3]), torch.Size([2, 64, 16]))
"""

from ctxpred.neighborhoods import gather_points, neighbor_offsets, neighbors, token_neighbors

__all__ = ["gather_points", "neighbor_offsets", "neighbors", "token_neighbors"]
