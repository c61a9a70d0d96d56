r"""The context-prediction loss of one layer ("Total objective" on the method page).

.. math::
    L_{ctx}^{l} = \lambda \sum_{s \in S} w_s \; \frac{1}{B} \sum_b
    \frac{1}{|V_b^s|} \sum_{i \in V_b^s} D\big(\hat P_{b,i}^{s},\, P_{b,i}^{s}\big)

where :math:`P_{b,i}^{s}` is the uniform distribution over the *valid* (in-grid) neighbors of
point ``i`` at stride ``s``, :math:`\hat P` the head's prediction, :math:`V_b^s` the query points
of sample ``b`` with at least one valid neighbor at stride ``s`` (a point without one contributes
nothing, and a sample without one contributes 0), and ``D`` the head's divergence:

* :class:`~ctxpred.heads.GaussianSamplingHead` -- :math:`W_p^p` between the ``Q`` samples and the
  valid neighbors, by the Wasserstein ``estimator`` (:func:`sample_divergence`);
* :class:`~ctxpred.heads.NaiveHead` -- mean over valid slots of ``||pred_k - y_k||^2``
  (:func:`naive_divergence`);
* :class:`~ctxpred.heads.MomentHead` -- closed-form Gaussian :math:`W_2^2` to the neighbors'
  empirical mean and covariance (:func:`moment_divergence`);
* :class:`~ctxpred.heads.CategoricalHead` -- W over the codebook (:func:`categorical_divergence`).

The mean is taken per sample and then over the batch, so a sample's value does not depend on the
other samples of the batch. Every divergence core runs in float32 with autocast disabled.

Default estimator: ``"sinkhorn"``. The loss compares ``Q`` predicted samples with a *masked*
set of ``K_s`` neighbors (fewer valid ones at borders), i.e. unequal sizes and non-uniform
weights. The ``"exact"`` estimator solves those on the host, problem by problem (POT's network
simplex), its batched device solver covers only equal, uniform supports; the log-domain Sinkhorn
estimator is batched, differentiable and runs on the device for any sizes and masks. Its default
schedule is tuned for equal, uniform supports: on masked problems in low dimension (pixel targets,
``C = 3``) the value can be a few percent too high (it is the cost of a feasible, slightly
suboptimal plan). Pass ``estimator_options={"scaling": 0.9, "iterations": 100}`` for about 1e-4
relative accuracy at roughly twice the estimator's time, or use ``"exact"`` with
``match_mask=True`` (see :func:`sample_divergence`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

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
from ctxpred.neighborhoods import Neighborhood, gather_points

__all__ = [
    "ContextLossTerms",
    "ContextPredictionLoss",
    "categorical_divergence",
    "group_by_stride",
    "moment_divergence",
    "naive_divergence",
    "reduce_context_loss",
    "resize_target",
    "sample_divergence",
]

Estimator = Callable[[Tensor, Tensor, Tensor | None, Tensor | None], Tensor]
EstimatorSpec = (
    Literal["sinkhorn", "exact", "sliced", "gaussian", "pot", "geomloss"] | Estimator | nn.Module
)
ResizeMode = Literal["auto", "area", "bilinear", "nearest", "none"]
_ESTIMATOR_NAMES = ("sinkhorn", "exact", "sliced", "gaussian", "pot", "geomloss")


def _core_context(device: torch.device) -> torch.autocast:
    device_type = device.type if device.type in {"cpu", "cuda", "xpu", "mps", "hpu"} else "cpu"
    return torch.autocast(device_type=device_type, enabled=False)


def _core(t: Tensor) -> Tensor:
    """Half / bfloat16 -> float32; float32 and float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _NamedEstimator:
    """``wasserstein(..., method=name, **options)`` as a picklable callable."""

    def __init__(self, method: str, options: dict[str, Any]) -> None:
        self.method, self.options = method, options

    def __call__(self, x: Tensor, y: Tensor, xw: Tensor | None, yw: Tensor | None) -> Tensor:
        from ctxpred.wasserstein import wasserstein

        return wasserstein(x, y, xw, yw, method=self.method, **self.options)

    def __repr__(self) -> str:
        return f"wasserstein[{self.method}]"


def resolve_estimator(estimator: EstimatorSpec, **options: Any) -> Estimator:
    """A callable ``(x, y, x_weights, y_weights) -> W_p^p`` from a name, module or callable.

    Names go to :func:`ctxpred.wasserstein.wasserstein` with ``check_finite=False`` (no host
    sync inside the loss) and ``options``.

    Example:
        >>> est = resolve_estimator("sinkhorn")
        >>> x = torch.zeros(4, 3, 2)
        >>> est(x, x, None, None).shape
        torch.Size([4])
    """
    if isinstance(estimator, str):
        if estimator not in _ESTIMATOR_NAMES:
            raise ValueRangeError(
                f"estimator must be one of {_ESTIMATOR_NAMES}, a module or a callable, "
                f"got {estimator!r}"
            )
        return _NamedEstimator(estimator, {"check_finite": False, **options})
    if callable(estimator):
        return estimator
    raise ValueRangeError(
        f"estimator must be a name, a module or a callable, got {type(estimator).__name__}"
    )


def group_by_stride(values: Tensor, mask: Tensor, num_strides: int) -> tuple[Tensor, Tensor]:
    """Split the stride-major slot axis ``K = S * K_s`` into ``(S, K_s)``.

    Args:
        values: ``(B, P, K, C)`` or ``(B, P, K)`` (token ids).
        mask: ``(B, P, K)``.
        num_strides: ``S``.

    Returns:
        ``values (B, P, S, K_s[, C])`` and ``mask (B, P, S, K_s)``.

    Example:
        >>> v, m = group_by_stride(torch.zeros(2, 5, 16, 3), torch.ones(2, 5, 16, dtype=bool), 2)
        >>> v.shape, m.shape
        (torch.Size([2, 5, 2, 8, 3]), torch.Size([2, 5, 2, 8]))
    """
    if mask.shape[-1] % num_strides:
        raise ShapeError(
            f"{mask.shape[-1]} neighbor slots do not split into {num_strides} strides"
        )
    per = mask.shape[-1] // num_strides
    grouped = values.unflatten(2, (num_strides, per))
    return grouped, mask.unflatten(2, (num_strides, per))


def _match_strides(pred: Tensor, num_strides: int, what: str) -> Tensor:
    """Broadcast a stride axis (dim 2) of size 1 to ``num_strides``."""
    if pred.shape[2] == num_strides:
        return pred
    if pred.shape[2] == 1:
        return pred.expand(*pred.shape[:2], num_strides, *pred.shape[3:])
    raise ShapeError(
        f"{what} predicts {pred.shape[2]} strides but the neighborhood has {num_strides}; "
        f"build the head with num_strides=1 (shared) or num_strides={num_strides}"
    )


def _check_channels(pred_channels: int, target: Tensor, what: str) -> None:
    if pred_channels != target.shape[-1]:
        raise ShapeError(
            f"{what} predicts C_out={pred_channels} channels but the target neighbors have "
            f"C={target.shape[-1]} (neighbor values {tuple(target.shape)}); set the head's "
            f"out_channels to the target's channel count"
        )


def _sample_weights(samples: Tensor, mask: Tensor, match_mask: bool) -> Tensor | None:
    if not match_mask:
        return None
    if samples.shape[-2] != mask.shape[-1]:
        raise ShapeError(
            f"match_mask=True keeps one predicted sample per valid neighbor slot, so it needs "
            f"Q == K_s; got Q={samples.shape[-2]} samples and K_s={mask.shape[-1]} slots "
            f"(set the head's num_samples={mask.shape[-1]})"
        )
    return mask.to(samples.dtype)


def sample_divergence(
    samples: Tensor,
    values: Tensor,
    mask: Tensor,
    estimator: EstimatorSpec = "sinkhorn",
    match_mask: bool = False,
) -> Tensor:
    r""":math:`W_p^p` between predicted samples and the valid neighbors, per point and stride.

    The prediction is uniform over its ``Q`` samples, the target uniform over the valid slots
    (``mask`` as weights; masked slots carry no mass). A problem without a valid neighbor gives 0
    (estimator contract). Computed in float32 with autocast off.

    ``match_mask=True`` (needs ``Q == K_s``) masks the samples like their targets: the prediction
    keeps as many samples as there are valid neighbors. The samples are i.i.d., so this is the
    same as drawing fewer of them; every problem then has equal, uniform supports, which the
    ``"exact"`` estimator solves as a batched assignment on the device.

    Args:
        samples: ``(B, P, S', Q, C)`` with ``S'`` in ``{1, S}``.
        values: ``(B, P, S, K_s, C)`` neighbor values (see :func:`group_by_stride`).
        mask: ``(B, P, S, K_s)`` bool.
        estimator: a name (see :func:`resolve_estimator`), module or callable.
        match_mask: mask the samples like their targets (see above).

    Returns:
        ``(B, P, S)``.

    Example:
        >>> y = torch.randn(2, 4, 1, 8, 3)
        >>> mask = torch.ones(2, 4, 1, 8, dtype=torch.bool)
        >>> d = sample_divergence(y, y, mask, "sinkhorn")  # perfect prediction
        >>> d.shape, bool(d.abs().max() < 1e-3)
        (torch.Size([2, 4, 1]), True)
        >>> mask[:, :, :, 5:] = False  # fewer valid neighbors: keep as many samples
        >>> sample_divergence(y, y, mask, "exact", match_mask=True).abs().max() < 1e-5
        tensor(True)
    """
    est = resolve_estimator(estimator) if isinstance(estimator, str) else estimator
    _check_channels(samples.shape[-1], values, "the head")
    samples = _match_strides(samples, values.shape[2], "the head")
    with _core_context(samples.device):
        samples = _core(samples)
        return est(samples, _core(values), _sample_weights(samples, mask, match_mask),
                   mask.to(samples.dtype))


def naive_divergence(prediction: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    r"""Slot-by-slot squared error of the naive head, per point and stride.

    .. math::
        D_i^s = \frac{1}{|V_i^s|} \sum_{k \in V_i^s} \lVert \hat y_{ik}^s - y_{ik}^s \rVert^2

    (0 when no slot is valid). With equal sizes it upper-bounds :math:`W_2^2` of the same sets.

    Args:
        prediction: ``(B, P, S', K_s, C)``, ``S'`` in ``{1, S}``.
        values: ``(B, P, S, K_s, C)``.
        mask: ``(B, P, S, K_s)``.

    Returns:
        ``(B, P, S)``.

    Example:
        >>> y = torch.zeros(1, 1, 1, 8, 2); m = torch.zeros(1, 1, 1, 8, dtype=torch.bool)
        >>> m[..., :2] = True
        >>> naive_divergence(y + 1.0, y, m).tolist()  # ||(1, 1)||^2 on the 2 valid slots
        [[[2.0]]]
    """
    _check_channels(prediction.shape[-1], values, "the naive head")
    prediction = _match_strides(prediction, values.shape[2], "the naive head")
    if prediction.shape[3] != values.shape[3]:
        raise ShapeError(
            f"the naive head predicts {prediction.shape[3]} slots per stride but the "
            f"neighborhood has K_s={values.shape[3]}; set NaiveHead(num_slots={values.shape[3]})"
        )
    with _core_context(prediction.device):
        err = (_core(prediction) - _core(values)).square().sum(-1)
        weight = mask.to(err.dtype)
        return (err * weight).sum(-1) / weight.sum(-1).clamp_min(1.0)


def _empirical_moments(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    weight = mask.to(values.dtype)
    weight = weight / weight.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (weight.unsqueeze(-1) * values).sum(-2)
    centered = (values - mean.unsqueeze(-2)) * weight.unsqueeze(-1).sqrt()
    return mean, centered.transpose(-1, -2) @ centered


def moment_divergence(prediction: MomentPrediction, values: Tensor, mask: Tensor) -> Tensor:
    r"""Closed-form Gaussian :math:`W_2^2` between predicted and empirical neighbor moments.

    .. math::
        \lVert m - \bar y \rVert^2 + \operatorname{tr}\big(\Sigma + \hat\Sigma
        - 2 (\hat\Sigma^{1/2} \Sigma \hat\Sigma^{1/2})^{1/2}\big)

    with :math:`\bar y, \hat\Sigma` the mean and (population) covariance of the valid neighbors;
    0 where no neighbor is valid. The Bures term comes from the estimator package
    (:func:`ctxpred.wasserstein.gaussian_w2`).

    Args:
        prediction: :class:`~ctxpred.heads.MomentPrediction`, ``mean (B, P, S', C)``.
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
    from ctxpred.wasserstein import gaussian_w2

    _check_channels(prediction.mean.shape[-1], values, "the moment head")
    num_strides = values.shape[2]
    with _core_context(values.device):
        factor = None if prediction.factor is None else _core(prediction.factor)
        pred = MomentPrediction(_core(prediction.mean), _core(prediction.log_variance), factor)
        mean = _match_strides(pred.mean, num_strides, "the moment head")
        cov = _match_strides(pred.covariance(), num_strides, "the moment head")
        target_mean, target_cov = _empirical_moments(_core(values).to(mean.dtype), mask)
        value = gaussian_w2(mean, cov, target_mean, target_cov)
        return value * mask.any(-1).to(value.dtype)


def categorical_divergence(
    prediction: CategoricalPrediction,
    ids: Tensor,
    mask: Tensor,
    estimator: EstimatorSpec = "sinkhorn",
    match_mask: bool = False,
) -> Tensor:
    r"""W between the predicted token distribution and the neighbor tokens' empirical one.

    * distribution mode (no codebook): :math:`1 - \sum_v \min(p_v, q_v)` (exact W for the
      0-1 ground cost), ``q`` the histogram of the valid neighbor ids;
    * sampling mode: estimator between the ``Q`` Gumbel-softmax samples and the valid neighbors'
      embeddings (one-hot vectors without a codebook).

    Ids must lie in ``[0, V)`` (not checked: that would need a host sync).

    Args:
        prediction: :class:`~ctxpred.heads.CategoricalPrediction`, ``logits (B, P, S', V)``.
        ids: ``(B, P, S, K_s)`` long neighbor ids.
        mask: ``(B, P, S, K_s)``.
        estimator: for the sampling mode.
        match_mask: in the sampling mode, mask the ``Q == K_s`` samples like their targets (see
            :func:`sample_divergence`).

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
    logits = _match_strides(prediction.logits, num_strides, "the categorical head")
    vocab = logits.shape[-1]
    codebook = prediction.codebook
    weight = mask.float()
    with _core_context(logits.device):
        if prediction.samples is not None:
            est = resolve_estimator(estimator) if isinstance(estimator, str) else estimator
            samples = _match_strides(prediction.samples.float(), num_strides,
                                     "the categorical head")
            target = (F.one_hot(ids, vocab).float() if codebook is None
                      else codebook.float()[ids])
            return est(samples, target, _sample_weights(samples, mask, match_mask), weight)
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


def reduce_context_loss(
    per_point: Tensor, valid: Tensor, stride_weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""Reduce ``(B, P, S)`` values to per-stride means and their weighted sum.

    ``per_stride[s] = mean_b( sum_p valid * value / max(1, sum_p valid) )`` and
    ``total = sum_s w_s per_stride[s]`` (``w_s = 1/S`` by default). No host sync.

    Args:
        per_point: ``(B, P, S)``.
        valid: ``(B, P, S)`` bool.
        stride_weights: ``(S,)`` or ``None``.

    Returns:
        ``(total (), per_stride (S,))``.

    Example:
        >>> v = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])
        >>> ok = torch.tensor([[[1, 1], [1, 0]]]).bool()
        >>> total, per_stride = reduce_context_loss(v, ok)
        >>> per_stride.tolist(), total.item()
        ([2.0, 2.0], 2.0)
    """
    ok = valid.to(per_point.dtype)
    per_sample = (per_point * ok).sum(1) / ok.sum(1).clamp_min(1.0)
    per_stride = per_sample.mean(0)
    if stride_weights is None:
        return per_stride.mean(), per_stride
    return (per_stride * stride_weights.to(per_stride)).sum(), per_stride


class ContextLossTerms(NamedTuple):
    """Everything :meth:`ContextPredictionLoss.terms` computes (for logging).

    Attributes:
        total: scalar, the weighted loss (what ``forward`` returns).
        per_stride: ``(S,)`` unweighted mean divergence per stride.
        per_point: ``(B, P, S)`` divergence per query point and stride (0 where invalid).
        valid: ``(B, P, S)`` bool, point has at least one valid neighbor at that stride.
        points: flat indices of the query points on the layer grid, ``(P,)`` or ``(B, P)``.
    """

    total: Tensor
    per_stride: Tensor
    per_point: Tensor
    valid: Tensor
    points: Tensor


def _nearest_ids(ids: Tensor, size: tuple[int, ...]) -> Tensor:
    out = ids
    for dim, (old, new) in enumerate(zip(ids.shape[1:], size), start=1):
        if old != new:
            index = (torch.arange(new, device=ids.device) * old) // new
            out = out.index_select(dim, index)
    return out


def resize_target(target: Tensor, size: Sequence[int], mode: ResizeMode = "auto") -> Tensor:
    """Resize a channels-first target ``(B, C, *spatial)`` or ids ``(B, *spatial)`` to ``size``.

    ``"auto"``: area averaging when shrinking every dim, (bi/tri)linear otherwise, nearest for
    integer ids. ``"none"`` raises unless the sizes already match.

    Example:
        >>> resize_target(torch.ones(2, 3, 32, 32), (8, 8)).shape
        torch.Size([2, 3, 8, 8])
        >>> resize_target(torch.arange(16).reshape(1, 4, 4), (2, 2)).tolist()
        [[[0, 2], [8, 10]]]
    """
    size = tuple(int(s) for s in size)
    is_ids = not target.is_floating_point()
    spatial = tuple(target.shape[1:] if is_ids else target.shape[2:])
    layout = "(B, *spatial) ids" if is_ids else "(B, C, *spatial)"
    if len(spatial) != len(size):
        raise ShapeError(
            f"target {layout} has {len(spatial)} spatial dims {spatial} but the layer grid is "
            f"{size}; no resize rule maps between different numbers of dims"
        )
    if spatial == size:
        return target
    if mode == "none":
        raise ShapeError(
            f"target grid {spatial} differs from the layer grid {size} and resize='none'"
        )
    if is_ids:
        if mode not in ("auto", "nearest"):
            raise ValueRangeError(f"token ids resize only with 'nearest', got resize={mode!r}")
        return _nearest_ids(target, size)
    if mode == "auto":
        mode = "area" if all(a >= b for a, b in zip(spatial, size)) else "bilinear"
    if mode == "area":
        return F.interpolate(target, size=size, mode="area")
    if mode == "nearest":
        return F.interpolate(target, size=size, mode="nearest")
    linear = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(target, size=size, mode=linear, align_corners=False)


class ContextPredictionLoss(nn.Module):
    r"""Context-prediction loss of one layer: neighborhood -> head -> divergence -> reduction.

    ``forward(features, target=None)`` reads the layer's representation ``features`` at the query
    points, lets ``head`` predict each point's neighborhood and compares it with the
    ``neighborhood`` of ``target`` at the same points (see the module docstring for the formula).

    * ``target=None``: the context is taken from ``features`` itself (use a
      :class:`~ctxpred.neighborhoods.MultiStrideNeighborhood`, which detaches it).
    * ``target`` given (clean pixels / latents ``(B, C, *spatial)``, token ids ``(B, *spatial)``):
      resized to the layer grid when its grid differs (``resize``: area/bilinear for floats,
      nearest for ids). A target in token layout (the neighborhood has a ``grid_shape``) is not
      resized: its grid must equal the layer's.
    * Layer layout: channels-first ``(B, C, *spatial)``, or tokens ``(B, L, C)`` when
      ``grid_shape`` (or the neighborhood's ``grid_shape``) is given.

    Args:
        neighborhood: a :class:`~ctxpred.neighborhoods.PixelNeighborhood`,
            :class:`~ctxpred.neighborhoods.MultiStrideNeighborhood` or
            :class:`~ctxpred.neighborhoods.TokenNeighborhood`.
        head: a :class:`~ctxpred.heads.ContextHead` with ``num_strides`` 1 or
            ``len(neighborhood.strides)``; its ``out_channels`` must equal the target's ``C``.
        estimator: Wasserstein estimator for sample/codebook heads (name, module or callable
            ``(x, y, x_weights, y_weights) -> W_p^p``); default ``"sinkhorn"`` (see module doc).
        weight: ``lambda``.
        stride_weights: ``w_s`` per stride (default ``1/S`` each).
        points: query points per step: ``None`` (all), a count (clamped to the grid size) or a
            fraction in ``(0, 1]`` of the layer's points; a fresh uniform subset each call.
        grid_shape: token grid ``(h, w)`` of ``(B, L, C)`` features.
        resize: how a target is brought to the layer grid.
        estimator_options: keyword options for a named estimator, e.g.
            ``{"iterations": 10}`` for ``"sinkhorn"`` (``check_finite=False`` is preset).
        match_mask: for sampling heads with ``num_samples == K_s``: mask the samples like their
            targets, so that every problem has equal uniform supports (then ``"exact"`` is a
            batched assignment on the device; see :func:`sample_divergence`).

    Example:
        >>> from ctxpred import PixelNeighborhood, GaussianSamplingHead
        >>> loss_fn = ContextPredictionLoss(
        ...     PixelNeighborhood(strides=(1, 2)),
        ...     GaussianSamplingHead(out_channels=3, in_channels=16, num_strides=2),
        ...     weight=0.1, points=32)
        >>> features = torch.randn(2, 16, 8, 8, requires_grad=True)
        >>> loss = loss_fn(features, target=torch.randn(2, 3, 16, 16))
        >>> loss.shape, loss.requires_grad
        (torch.Size([]), True)
        >>> loss_fn.terms(features, torch.randn(2, 3, 16, 16)).per_point.shape
        torch.Size([2, 32, 2])
    """

    stride_weight_tensor: Tensor | None

    def __init__(
        self,
        neighborhood: nn.Module,
        head: ContextHead,
        estimator: EstimatorSpec = "sinkhorn",
        weight: float = 1.0,
        stride_weights: Sequence[float] | None = None,
        points: int | float | None = None,
        *,
        grid_shape: Sequence[int] | None = None,
        resize: ResizeMode = "auto",
        estimator_options: Mapping[str, Any] | None = None,
        match_mask: bool = False,
    ) -> None:
        super().__init__()
        strides = getattr(neighborhood, "strides", None)
        if not isinstance(neighborhood, nn.Module) or strides is None:
            raise ValueRangeError(
                "neighborhood must be a ctxpred neighborhood module (PixelNeighborhood, "
                f"MultiStrideNeighborhood, TokenNeighborhood), got {type(neighborhood).__name__}"
            )
        if not isinstance(head, ContextHead):
            raise ValueRangeError(f"head must be a ctxpred ContextHead, got {type(head).__name__}")
        num_strides = len(strides)
        if head.num_strides not in (1, num_strides):
            raise ShapeError(
                f"{type(head).__name__} has num_strides={head.num_strides} but the neighborhood "
                f"has {num_strides} strides {tuple(strides)}; use num_strides=1 or {num_strides}"
            )
        is_token = hasattr(neighborhood, "ids")
        if isinstance(head, CategoricalHead) and not is_token:
            raise ValueRangeError(
                "CategoricalHead compares token ids: use a TokenNeighborhood, got "
                f"{type(neighborhood).__name__}"
            )
        if (is_token and not isinstance(head, CategoricalHead)
                and getattr(neighborhood, "codebook", None) is None):
            raise ValueRangeError(
                f"a TokenNeighborhood without a codebook yields token ids, which "
                f"{type(head).__name__} cannot predict; use CategoricalHead or give the "
                f"neighborhood a codebook"
            )
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueRangeError(f"weight must be a finite number >= 0, got {weight!r}")
        self.register_buffer("stride_weight_tensor", None, persistent=False)
        if stride_weights is not None:
            sw = [float(w) for w in stride_weights]
            if len(sw) != num_strides:
                raise ShapeError(
                    f"stride_weights has {len(sw)} entries but the neighborhood has "
                    f"{num_strides} strides {tuple(strides)}"
                )
            if any(not math.isfinite(w) or w < 0 for w in sw):
                raise ValueRangeError(f"stride_weights must be finite and >= 0, got {sw}")
            self.stride_weight_tensor = torch.tensor(sw)
        if points is not None:
            bad = isinstance(points, bool) or not isinstance(points, (int, float))
            if bad or (isinstance(points, int) and points < 1) or (
                isinstance(points, float) and not 0.0 < points <= 1.0
            ):
                raise ValueRangeError(
                    f"points must be None, a count >= 1 or a fraction in (0, 1], got {points!r}"
                )
        if resize not in ("auto", "area", "bilinear", "nearest", "none"):
            raise ValueRangeError(
                f"resize must be 'auto', 'area', 'bilinear', 'nearest' or 'none', got {resize!r}"
            )
        self.neighborhood = neighborhood
        self.head = head
        self.estimator = estimator
        if estimator_options and not isinstance(estimator, str):
            raise ValueRangeError(
                "estimator_options apply to an estimator given by name; configure a module or "
                "callable estimator directly"
            )
        self._estimator_fn = (resolve_estimator(estimator, **(estimator_options or {}))
                              if isinstance(estimator, str) else None)
        self.weight = float(weight)
        self.points = points
        self.grid_shape = None if grid_shape is None else tuple(int(g) for g in grid_shape)
        self.resize = resize
        self.match_mask = bool(match_mask)
        self.name = type(self).__name__

    # -- layout -------------------------------------------------------------------------------
    def layer_grid(self, features: Tensor) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """``(spatial, grid_shape)`` of ``features``: ``grid_shape`` is set for token layouts."""
        grid = self.grid_shape or getattr(self.neighborhood, "grid_shape", None)
        if features.dim() == 3 and grid is not None:
            if features.shape[1] != math.prod(grid):
                raise ShapeError(
                    f"{self.name}: token features (B, L, C) = {tuple(features.shape)} do not fit "
                    f"grid_shape {grid} (L = {math.prod(grid)})"
                )
            return tuple(grid), tuple(grid)
        if features.dim() == 3:
            raise ShapeError(
                f"{self.name}: rank-3 features {tuple(features.shape)} are ambiguous; for "
                f"transformer tokens (B, L, C) pass grid_shape=(h, w) to the loss"
            )
        if features.dim() not in (4, 5):
            raise ShapeError(
                f"{self.name}: layer output must be (B, C, *spatial) with 2-3 spatial dims or "
                f"(B, L, C) tokens with grid_shape, got shape {tuple(features.shape)}"
            )
        return tuple(features.shape[2:]), None

    def _prepare_target(
        self, features: Tensor, target: Tensor | None, spatial: tuple[int, ...],
        token_grid: tuple[int, ...] | None,
    ) -> Tensor:
        nb_grid = getattr(self.neighborhood, "grid_shape", None)
        if target is None:
            target = features
            if token_grid is not None and nb_grid is None:  # (B, L, C) -> (B, C, *grid)
                return target.transpose(1, 2).unflatten(2, token_grid)
            if token_grid is None and nb_grid is not None:
                raise ShapeError(
                    f"{self.name}: the neighborhood expects token layout (grid_shape={nb_grid}) "
                    f"but the layer output is channels-first {tuple(features.shape)}"
                )
            return target
        if not isinstance(target, Tensor):
            raise DTypeError(f"{self.name}: target must be a Tensor, got {type(target).__name__}")
        if target.shape[0] != features.shape[0]:
            raise ShapeError(
                f"{self.name}: target batch {target.shape[0]} != layer batch "
                f"{features.shape[0]} (target {tuple(target.shape)}, "
                f"layer {tuple(features.shape)})"
            )
        if nb_grid is not None:
            if tuple(nb_grid) != spatial:
                raise ShapeError(
                    f"{self.name}: target in token layout with grid_shape {tuple(nb_grid)} but the "
                    f"layer grid is {spatial}; no resize rule applies to token-layout targets "
                    f"(pass a channels-first target and a neighborhood without grid_shape)"
                )
            return target
        return resize_target(target, spatial, self.resize)

    def _resolve_points(self, num_points: int) -> int | None:
        if self.points is None:
            return None
        if isinstance(self.points, float):
            return max(1, min(num_points, round(self.points * num_points)))
        return min(self.points, num_points)

    # -- evaluation ---------------------------------------------------------------------------
    def _divergence(self, prediction: Any, nb: Neighborhood) -> tuple[Tensor, Tensor]:
        num_strides = len(nb.strides)
        values, mask = group_by_stride(nb.values, nb.mask, num_strides)
        est = self._estimator_fn if self._estimator_fn is not None else self.estimator
        head = self.head
        if isinstance(head, CategoricalHead):
            value = categorical_divergence(prediction, values, mask, est, self.match_mask)
        elif isinstance(head, GaussianSamplingHead):
            value = sample_divergence(prediction, values, mask, est, self.match_mask)
        elif isinstance(head, NaiveHead):
            value = naive_divergence(prediction, values, mask)
        elif isinstance(head, MomentHead):
            value = moment_divergence(prediction, values, mask)
        elif hasattr(head, "divergence"):
            value = head.divergence(prediction, values, mask, est)
        else:
            raise CtxpredError(
                f"no divergence known for {type(head).__name__}; subclass one of the ctxpred "
                f"heads or define divergence(prediction, values, mask, estimator) -> (B, P, S)"
            )
        return value, mask.any(-1)

    def terms(
        self,
        features: Tensor,
        target: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> ContextLossTerms:
        """The loss with its per-stride and per-point parts (see :class:`ContextLossTerms`)."""
        if not isinstance(features, Tensor) or not features.is_floating_point():
            raise DTypeError(
                f"{self.name}: layer output must be a floating-point Tensor, got "
                f"{getattr(features, 'dtype', type(features).__name__)}"
            )
        spatial, token_grid = self.layer_grid(features)
        target = self._prepare_target(features, target, spatial, token_grid)
        points = self._resolve_points(math.prod(spatial))
        if isinstance(self.head, CategoricalHead):
            if target.is_floating_point():
                raise DTypeError(
                    f"{self.name}: CategoricalHead needs integer token ids as target, got dtype "
                    f"{target.dtype}"
                )
            nb = self.neighborhood.ids(target, points=points, generator=generator)
        else:
            nb = self.neighborhood(target, points=points, generator=generator)
        z = gather_points(features, nb.points, token_grid)
        if isinstance(self.head, (GaussianSamplingHead, CategoricalHead)):
            prediction = self.head(z, generator=generator)
        else:
            prediction = self.head(z)
        per_point, valid = self._divergence(prediction, nb)
        total, per_stride = reduce_context_loss(per_point, valid, self.stride_weight_tensor)
        return ContextLossTerms(self.weight * total, per_stride, per_point, valid, nb.points)

    def forward(
        self,
        features: Tensor,
        target: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The weighted scalar loss ``lambda * sum_s w_s * mean_i D_i^s``."""
        return self.terms(features, target, generator).total

    @torch.no_grad()
    def initialize(self, features: Tensor) -> None:
        """Materialize a lazy head from one example layer output (no loss computed)."""
        _, token_grid = self.layer_grid(features)
        z = gather_points(features, torch.zeros(1, dtype=torch.long, device=features.device),
                          token_grid)
        self.head(z)

    def extra_repr(self) -> str:
        est = self.estimator if isinstance(self.estimator, str) else type(self.estimator).__name__
        return (f"estimator={est!r}, weight={self.weight}, points={self.points}, "
                f"match_mask={self.match_mask}, "
                f"grid_shape={self.grid_shape}, resize={self.resize!r}")
