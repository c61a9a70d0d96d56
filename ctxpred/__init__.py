"""ctxpred — context prediction (ConPreDiff) for any diffusion model.

The pipeline, one way:

```text
_layout -> neighborhoods -> heads (+ their divergence) -> loss (reduce) <- attach
```

A backbone's tensors -> :mod:`ctxpred.neighborhoods` (gather the multi-stride context and its
validity mask) -> :mod:`ctxpred.heads` (predict a neighborhood distribution per point, and
compare it, by the head's own divergence, often a :mod:`ctxpred.wasserstein` estimator) ->
:mod:`ctxpred.loss` (weight and reduce). :func:`ctxpred.attach` is the only part that touches a
foreign model (forward hooks). Every module has a plain function in :mod:`ctxpred.functional`.

The top level holds what a user writes in a training script; plumbing (prediction types,
:class:`~ctxpred.attach.ModelWithHeads`, the estimator modules) lives in its submodule. Names of
the 0.1 release that moved or were renamed still resolve here, with a ``DeprecationWarning``.

Example:
    >>> import torch, ctxpred
    >>> loss_fn = ctxpred.ContextPredictionLoss(
    ...     ctxpred.PixelNeighborhood(strides=(1, 2)),
    ...     ctxpred.GaussianSamplingHead(out_channels=3, in_channels=8, num_strides=2))
    >>> features, image = torch.randn(2, 8, 16, 16), torch.randn(2, 3, 16, 16)
    >>> loss_fn(features, image).shape
    torch.Size([])
"""

from ctxpred import functional, wasserstein
from ctxpred._deprecation import deprecated_names
from ctxpred.attach import CaptureError, ContextPredictor, attach
from ctxpred.errors import CtxpredError, DTypeError, ShapeError, ValueRangeError
from ctxpred.heads import (
    CategoricalHead,
    ContextHead,
    GaussianSamplingHead,
    MomentHead,
    NaiveHead,
)
from ctxpred.loss import ContextPredictionLoss
from ctxpred.neighborhoods import FeatureNeighborhood, PixelNeighborhood, TokenNeighborhood

__version__ = "0.1.0"

__all__ = [
    "CaptureError",
    "CategoricalHead",
    "ContextHead",
    "ContextPredictionLoss",
    "ContextPredictor",
    "CtxpredError",
    "DTypeError",
    "FeatureNeighborhood",
    "GaussianSamplingHead",
    "MomentHead",
    "NaiveHead",
    "PixelNeighborhood",
    "ShapeError",
    "TokenNeighborhood",
    "ValueRangeError",
    "__version__",
    "attach",
    "functional",
    "wasserstein",
]

__getattr__ = deprecated_names(__name__, {
    "CategoricalPrediction": ("ctxpred.heads", "CategoricalPrediction"),
    "MomentPrediction": ("ctxpred.heads", "MomentPrediction"),
    "ModelWithHeads": ("ctxpred.attach", "ModelWithHeads"),
    "ContextLossTerms": ("ctxpred.loss", "ContextLossTerms"),
    "Neighborhood": ("ctxpred.neighborhoods", "Neighbors"),
    "MultiStrideNeighborhood": ("ctxpred.neighborhoods", "FeatureNeighborhood"),
    "ExactWasserstein": ("ctxpred.wasserstein", "ExactWasserstein"),
    "GaussianWasserstein": ("ctxpred.wasserstein", "GaussianWasserstein"),
    "SinkhornWasserstein": ("ctxpred.wasserstein", "SinkhornWasserstein"),
    "SlicedWasserstein": ("ctxpred.wasserstein", "SlicedWasserstein"),
})
