"""ctxpred — context prediction (ConPreDiff) for any diffusion model.

The pipeline, one way: a backbone's tensors -> :mod:`ctxpred.neighborhoods` (gather the
multi-stride context and its validity mask) -> :mod:`ctxpred.heads` (predict a neighborhood
distribution per point) -> :mod:`ctxpred.wasserstein` (compare two distributions) ->
:mod:`ctxpred.loss` (weight and reduce). :func:`ctxpred.attach` is the only part that touches a
foreign model (forward hooks). Every module has a plain function in :mod:`ctxpred.functional`.
"""

from ctxpred import functional
from ctxpred.errors import CtxpredError, DTypeError, ShapeError, ValueRangeError
from ctxpred.neighborhoods import (
    MultiStrideNeighborhood,
    Neighborhood,
    PixelNeighborhood,
    TokenNeighborhood,
)

__version__ = "0.1.0"

__all__ = [
    "CtxpredError",
    "DTypeError",
    "MultiStrideNeighborhood",
    "Neighborhood",
    "PixelNeighborhood",
    "ShapeError",
    "TokenNeighborhood",
    "ValueRangeError",
    "__version__",
    "functional",
]
