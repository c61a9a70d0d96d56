r"""Context heads: small per-point decoders that predict a point's neighborhood distribution.

Every head reads the representation ``z_i`` of a point (one row of ``(B, P, C_in)``, or a
channels-first map ``(B, C_in, *spatial)`` read as ``P = prod(spatial)`` points) and predicts the
context of that point **per stride**: the output always has a stride axis ``S`` of size
``num_strides``. With ``num_strides=1`` one prediction is shared by every stride of the
neighborhood (broadcast); with ``num_strides=len(strides)`` (recommended) each stride gets its
own predicted distribution :math:`\hat P_i^{s}`.

Each head owns its divergence (``head.divergence(prediction, neighbors, estimator)`` returns
``(B, P, S)`` values), so the loss knows no concrete head: a new head is a subclass of
:class:`~ctxpred.heads.base.ContextHead` anywhere, no edit to ctxpred.

The built-in heads: :class:`GaussianSamplingHead` (samples, compared by a Wasserstein
estimator), :class:`NaiveHead` (one prediction per slot), :class:`MomentHead` (mean and
covariance, closed-form Gaussian W2) and :class:`CategoricalHead` (token distribution); the API
page compares them in a table.

Input channels: pass ``in_channels`` explicitly, or leave it ``None`` to infer it on the first
forward (``nn.LazyLinear``). A lazy head has no parameters until it has seen one input: build the
optimizer only after that (``ContextPredictor.initialize(...)`` in :mod:`ctxpred.attach` runs one
dry forward for this purpose).

Example:
    >>> import torch
    >>> from ctxpred.heads import GaussianSamplingHead
    >>> head = GaussianSamplingHead(out_channels=3, in_channels=8, num_samples=4)
    >>> head(torch.randn(2, 5, 8)).shape  # (B, P, S, Q, C) samples of each point's neighborhood
    torch.Size([2, 5, 1, 4, 3])
"""

from ctxpred.heads.base import ContextHead, check_out_channels, float32_core, match_strides
from ctxpred.heads.categorical import CategoricalHead, CategoricalPrediction, categorical_divergence
from ctxpred.heads.gaussian import GaussianSamplingHead, sample_divergence
from ctxpred.heads.moment import MomentHead, MomentPrediction, moment_divergence
from ctxpred.heads.naive import NaiveHead, naive_divergence

__all__ = [
    "CategoricalHead",
    "CategoricalPrediction",
    "ContextHead",
    "GaussianSamplingHead",
    "MomentHead",
    "MomentPrediction",
    "NaiveHead",
    "categorical_divergence",
    "check_out_channels",
    "float32_core",
    "match_strides",
    "moment_divergence",
    "naive_divergence",
    "sample_divergence",
]
