"""ctxpred — context prediction (ConPreDiff) for any diffusion model.

The pipeline, one way: a backbone's tensors -> :mod:`ctxpred.neighborhoods` (gather the
multi-stride context and its validity mask) -> :mod:`ctxpred.heads` (predict a neighborhood
distribution per point) -> :mod:`ctxpred.wasserstein` (compare two distributions) ->
:mod:`ctxpred.loss` (weight and reduce). :func:`ctxpred.attach` is the only part that touches a
foreign model (forward hooks). Every module has a plain function in :mod:`ctxpred.functional`.
"""

from ctxpred import functional
from ctxpred.attach import CaptureError, ContextPredictor, ModelWithHeads, attach
from ctxpred.errors import CtxpredError, DTypeError, ShapeError, ValueRangeError
from ctxpred.heads import (
    CategoricalHead,
    CategoricalPrediction,
    ContextHead,
    GaussianSamplingHead,
    MomentHead,
    MomentPrediction,
    NaiveHead,
)
from ctxpred.loss import ContextLossTerms, ContextPredictionLoss
from ctxpred.neighborhoods import (
    MultiStrideNeighborhood,
    Neighborhood,
    PixelNeighborhood,
    TokenNeighborhood,
)
from ctxpred.wasserstein import (
    ExactWasserstein,
    GaussianWasserstein,
    SinkhornWasserstein,
    SlicedWasserstein,
)

__version__ = "0.1.0"

__all__ = [
    "CaptureError",
    "CategoricalHead",
    "CategoricalPrediction",
    "ContextHead",
    "ContextLossTerms",
    "ContextPredictionLoss",
    "ContextPredictor",
    "CtxpredError",
    "DTypeError",
    "ExactWasserstein",
    "GaussianSamplingHead",
    "GaussianWasserstein",
    "ModelWithHeads",
    "MomentHead",
    "MomentPrediction",
    "MultiStrideNeighborhood",
    "NaiveHead",
    "Neighborhood",
    "PixelNeighborhood",
    "ShapeError",
    "SinkhornWasserstein",
    "SlicedWasserstein",
    "TokenNeighborhood",
    "ValueRangeError",
    "__version__",
    "attach",
    "functional",
]
