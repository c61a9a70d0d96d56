r"""Batched, differentiable Wasserstein estimators between weighted point clouds.

One call compares many small distributions at once -- e.g. one problem per point and stride of a
feature map. Every estimator takes ``x (..., N, D)``, ``y (..., M, D)`` and optional non-negative
weights ``(..., N)`` / ``(..., M)`` (normalized per problem; 0 masks a point out) and returns one
value per problem, shape ``(...)``, in the caller's dtype (the core runs in float32 even under
autocast, float64 for float64 inputs). The cost is :math:`\|x - y\|^p` (squared Euclidean for
``p=2``), so the exact value is :math:`W_p^p`. A problem with zero total weight on a side is
*empty*: value 0, zero gradient, never NaN.

=================  =====================================================================
method             what it computes
=================  =====================================================================
``"exact"``        :func:`exact_wasserstein`: the optimum (batched Hungarian on the device)
``"sinkhorn"``     :func:`sinkhorn_wasserstein`: entropic OT, fixed budget, envelope gradient
``"sliced"``       :func:`sliced_wasserstein`: mean of exact 1-D costs over random directions
``"gaussian"``     :func:`gaussian_wasserstein`: closed form between moment-matched Gaussians
``"pot"``          :func:`pot_wasserstein`: POT ``ot.emd2`` per problem (optional extra)
``"geomloss"``     :func:`geomloss_wasserstein`: geomloss ``SamplesLoss`` (optional extra)
=================  =====================================================================

``check_finite=True`` (the default) checks inputs for NaN/Inf and negative weights at the cost of
one host sync; training loops pass ``check_finite=False``.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from ctxpred.errors import ValueRangeError
from ctxpred.wasserstein.adapters import geomloss_wasserstein, pot_wasserstein
from ctxpred.wasserstein.exact import ExactWasserstein, assignment, exact_wasserstein
from ctxpred.wasserstein.gaussian import (
    GaussianWasserstein,
    gaussian_w2,
    gaussian_wasserstein,
    sqrtm_psd,
)
from ctxpred.wasserstein.sinkhorn import SinkhornWasserstein, sinkhorn_wasserstein
from ctxpred.wasserstein.sliced import SlicedWasserstein, random_directions, sliced_wasserstein

__all__ = [
    "ExactWasserstein",
    "GaussianWasserstein",
    "Method",
    "SinkhornWasserstein",
    "SlicedWasserstein",
    "assignment",
    "exact_wasserstein",
    "gaussian_w2",
    "gaussian_wasserstein",
    "geomloss_wasserstein",
    "pot_wasserstein",
    "random_directions",
    "sinkhorn_wasserstein",
    "sliced_wasserstein",
    "sqrtm_psd",
    "wasserstein",
]

Method = Literal["exact", "sinkhorn", "sliced", "gaussian", "pot", "geomloss"]

_METHODS = {
    "exact": exact_wasserstein,
    "sinkhorn": sinkhorn_wasserstein,
    "sliced": sliced_wasserstein,
    "gaussian": gaussian_wasserstein,
    "pot": pot_wasserstein,
    "geomloss": geomloss_wasserstein,
}


def wasserstein(
    x: Tensor,
    y: Tensor,
    x_weights: Tensor | None = None,
    y_weights: Tensor | None = None,
    *,
    method: Method = "exact",
    p: float = 2,
    **opts: Any,
) -> Tensor:
    r"""Transport cost :math:`W_p^p` between ``x`` and ``y`` per problem, by ``method``.

    .. math::
        W_p^p(a, b) = \min_{\pi \in \Pi(a, b)} \sum_{ij} \pi_{ij}\, \|x_i - y_j\|^p

    Args:
        x: ``(..., N, D)`` points (e.g. predicted neighbor samples ``(B*P*S, Q, C)``).
        y: ``(..., M, D)`` points (e.g. true neighbors ``(B*P*S, K, C)``).
        x_weights: ``(..., N)`` non-negative weights, ``None`` = uniform.
        y_weights: ``(..., M)`` non-negative weights, e.g. the validity mask as float.
        method: one of ``"exact"``, ``"sinkhorn"``, ``"sliced"``, ``"gaussian"``, ``"pot"``,
            ``"geomloss"``.
        p: cost exponent (``"gaussian"`` supports only 2).
        **opts: the chosen estimator's keyword options (e.g. ``blur``, ``iterations``,
            ``debias`` for sinkhorn; ``solver`` for exact; ``check_finite`` for all).

    Returns:
        ``(...)`` values in ``x``'s dtype; 0 for empty problems.

    Example:
        >>> import torch
        >>> from ctxpred.functional import wasserstein
        >>> x = torch.randn(16, 8, 3)
        >>> y = x[:, torch.randperm(8)]
        >>> wasserstein(x, y, method="exact").abs().max() < 1e-5
        tensor(True)
        >>> mask = torch.ones(16, 8).index_fill_(1, torch.tensor([0, 5]), 0.0)
        >>> wasserstein(x, y, y_weights=mask, method="sinkhorn").shape
        torch.Size([16])
    """
    try:
        fn = _METHODS[method]
    except KeyError:
        raise ValueRangeError(
            f"method must be one of {sorted(_METHODS)}, got {method!r}"
        ) from None
    if method == "gaussian":
        if p != 2:
            raise ValueRangeError(f"method='gaussian' computes W_2^2 only; got p={p!r}")
        return fn(x, y, x_weights, y_weights, **opts)
    return fn(x, y, x_weights, y_weights, p=p, **opts)
