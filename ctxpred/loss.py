r"""The context-prediction loss of one layer ("Total objective" on the method page).

.. math::
    L_{ctx}^{l} = \lambda \sum_{s \in S} w_s \; \frac{1}{B} \sum_b
    \frac{1}{|V_b^s|} \sum_{i \in V_b^s} D\big(\hat P_{b,i}^{s},\, P_{b,i}^{s}\big)

where :math:`P_{b,i}^{s}` is the uniform distribution over the *valid* (in-grid) neighbors of
point ``i`` at stride ``s``, :math:`\hat P` the head's prediction, :math:`V_b^s` the query points
of sample ``b`` with at least one valid neighbor at stride ``s`` (a point without one contributes
nothing, and a sample without one contributes 0), and ``D`` the head's own divergence
(``head.divergence``, see :mod:`ctxpred.heads`). The loss only orchestrates:

```text
layout (ctxpred._layout) -> neighbors -> head(z) -> head.divergence -> reduce_context_loss
```

It knows no concrete head class: any :class:`~ctxpred.heads.base.ContextHead` subclass plugs in.

The mean is taken per sample and then over the batch, so a sample's value does not depend on the
other samples of the batch (an optional per-sample weight ``sample_weight`` ``(B,)`` multiplies
each sample's value before the batch mean, e.g. to weight by diffusion timestep). Every
divergence core runs in float32 with autocast disabled.

Scale (what ``weight`` = :math:`\lambda` multiplies): a **mean** over strides (``w_s = 1/S`` by
default), query points and samples of one divergence per point. For the sample heads ``D`` is
:math:`W_2^2` with the squared Euclidean ground cost **summed over the target's C channels**
(not averaged), so it grows with ``C`` and with the target's squared units: squared pixel values
for a pixel target in ``[-1, 1]``; for the feature context (``target=None``), squared
*standardized* features (unit variance per channel, see
:class:`~ctxpred.neighborhoods.FeatureNeighborhood`), i.e. about ``C`` times a per-channel
error. A denoising loss is usually a mean over all elements, so compare gradients, not values:
the method page ("What lambda multiplies") gives the gradient-norm ratio that picks ``lambda``.

Default estimator: ``"sinkhorn"`` (:data:`ctxpred.wasserstein.LOSS_ESTIMATOR`). The loss compares
``Q`` predicted samples with a *masked* set of ``K_s`` neighbors (fewer valid ones at borders):
unequal supports. Both batched estimators handle them on the device with no host sync. The
``"exact"`` estimator (a batched min-cost flow; values equal POT's ``ot.emd2``) is unbiased and,
on a CPU, faster than the Sinkhorn default on every measured shape, masked or not
(``docs/results/estimators_cpu.md``); on an accelerator it runs a fixed number of rounds (on
CUDA stopped by polling once every problem is done) whose cost has not been measured yet. It is
not the default: trained with the confirmed recipe (quality study, stages ``exact-default``
and ``exact-default-fresh``, 10 paired seeds each) it did not pass the declared rule against the
baseline in either stage (patch SWD -16.7% and -14.6%, Holm p = 0.09 and 0.14), where the
Sinkhorn recipe did, although head to head neither was shown better; a third stage
(``exact-noninferior``, 20 fresh paired seeds, head to head only) found it non-inferior within
the declared +10% margin (neighbor +0.9% [-7.7, +9.6], patch SWD -1.8% [-9.5, +5.8];
``docs/results/quality_study.md``). What is missing is its cost on a GPU: the batched masked
flow dispatches about 3x Sinkhorn's operations there (``docs/results/launches.md``), and the
fused kernel that avoids that (``estimator_options={"solver": "triton"}``) has not run on one
yet. By the declared rule exact becomes the default once it is measured no slower. The default
Sinkhorn schedule is biased high on masked problems in low dimension (pixel targets, ``C = 3``:
about +1.5% on average and up to about +22% on single problems; grayscale, ``C = 1``: about
+5.7% on average and up to about +130%; the table is on the "Choosing an estimator" page).
``estimator_options={"scaling": 0.9, "iterations": 200}`` bounds that error by 1e-3 at ``C = 3``
(9e-3 at ``C = 1``) at about 5-6x the estimator's time; ``"exact"``, or ``"exact"`` with
``match_mask=True`` (a batched assignment, see :func:`ctxpred.heads.gaussian.sample_divergence`),
removes it; for ``C = 1`` exact takes the 1-D sorted coupling, 0.18x Sinkhorn's time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ctxpred import _checks, _layout
from ctxpred._deprecation import deprecated_names
from ctxpred._layout import Layout, ResizeMode
from ctxpred.errors import DTypeError, ShapeError, ValueRangeError, _all_finite, _value_check
from ctxpred.heads.base import ContextHead
from ctxpred.neighborhoods import Neighbors, gather_points, standardize_features
from ctxpred.wasserstein import EstimatorSpec, _bind_generator
from ctxpred.wasserstein import resolve_estimator as _resolve_estimator

__all__ = [
    "ContextLossTerms",
    "ContextPredictionLoss",
    "reduce_context_loss",
]

_RESIZE_MODES = ("auto", "area", "bilinear", "nearest", "none")


def reduce_context_loss(
    per_point: Tensor,
    valid: Tensor,
    stride_weights: Tensor | None = None,
    sample_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Reduce ``(B, P, S)`` values to per-stride means and their weighted sum.

    ``per_stride[s] = mean_b( a_b * sum_p valid * value / max(1, sum_p valid) )`` and
    ``total = sum_s w_s per_stride[s]`` (``w_s = 1/S`` by default; ``a_b = 1`` without
    ``sample_weight``). The batch mean divides by ``B``, not by ``sum_b a_b``: a weight of 0
    removes a sample's contribution, weights with mean 1 keep the loss's scale. No host sync.

    Args:
        per_point: ``(B, P, S)``.
        valid: ``(B, P, S)`` bool.
        stride_weights: ``(S,)`` or ``None``.
        sample_weight: ``(B,)`` per-sample weights ``a_b`` (e.g. by diffusion timestep) or
            ``None``.

    Returns:
        ``(total (), per_stride (S,))``.

    Example:
        >>> v = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])
        >>> ok = torch.tensor([[[1, 1], [1, 0]]]).bool()
        >>> total, per_stride = reduce_context_loss(v, ok)
        >>> per_stride.tolist(), total.item()
        ([2.0, 2.0], 2.0)
        >>> reduce_context_loss(v, ok, sample_weight=torch.tensor([0.5]))[0].item()
        1.0
    """
    ok = valid.to(per_point.dtype)
    per_sample = (per_point * ok).sum(1) / ok.sum(1).clamp_min(1.0)
    if sample_weight is not None:
        per_sample = per_sample * sample_weight.to(per_sample)[:, None]
    per_stride = per_sample.mean(0)
    if stride_weights is None:
        return per_stride.mean(), per_stride
    return (per_stride * stride_weights.to(per_stride)).sum(), per_stride


def check_sample_weight(sample_weight: Tensor | None, batch: int, name: str,
                        check_values: bool = False) -> None:
    """Check that ``sample_weight`` is ``None`` or a floating ``(B,)`` tensor with ``B = batch``;
    ``check_values``: also finite and ``>= 0`` (no host sync: a device-side assert off the CPU,
    like the loss's ``check_finite`` on targets, which passes it).
    """
    if sample_weight is None:
        return
    if not isinstance(sample_weight, Tensor) or not sample_weight.is_floating_point():
        raise DTypeError(
            f"{name}: sample_weight must be a floating-point Tensor of shape (B,), got "
            f"{getattr(sample_weight, 'dtype', type(sample_weight).__name__)}; e.g. "
            f"weights.float()"
        )
    if sample_weight.dim() != 1 or sample_weight.shape[0] != batch:
        raise ShapeError(
            f"{name}: sample_weight must have shape (B,) = ({batch},) like the layer's batch, got "
            f"{tuple(sample_weight.shape)}"
        )
    if check_values:
        _value_check(
            _all_finite(sample_weight, nonnegative=True),
            f"{name}: sample_weight must be finite and >= 0 (a NaN, Inf or negative weight "
            f"makes the loss NaN or rewards a larger context error); pass check_finite=False "
            f"to the ContextPredictionLoss to skip this check", ValueRangeError)


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


class ContextPredictionLoss(nn.Module):
    r"""Context-prediction loss of one layer: neighborhood -> head -> divergence -> reduction.

    ``forward(features, target=None)`` reads the layer's representation ``features`` at the query
    points, lets ``head`` predict each point's neighborhood and compares it with the
    ``neighborhood`` of ``target`` at the same points (see the module docstring for the formula).

    * ``target=None``: the context is taken from ``features`` itself (use a
      :class:`~ctxpred.neighborhoods.FeatureNeighborhood`, which detaches it).
    * ``target`` given (clean pixels / latents ``(B, C, *spatial)``, token ids ``(B, *spatial)``):
      resized to the layer grid when its grid differs (``resize``: area/bilinear for floats,
      nearest for ids). A target in token layout (the neighborhood has a ``grid_shape``) is not
      resized: its grid must equal the layer's.
    * Layer layout: channels-first ``(B, C, *spatial)`` with 2-3 spatial dims, or tokens
      ``(B, L, C)`` when ``grid_shape`` (or the neighborhood's ``grid_shape``) is given. A rank-3
      output is ambiguous without them: ``layout="channels_first"`` reads a 1-D convolution's
      ``(B, C, L)``, ``layout="tokens"`` a 1-D token sequence ``(B, L, C)``.
    * The target is checked before use: its dtype (float values, or integer ids for a
      :class:`~ctxpred.neighborhoods.TokenNeighborhood`), its layout (a missing batch axis, a
      channels-last ``(B, H, W, C)`` tensor), its aspect ratio against the layer grid (an
      upsampled target warns once) and, with ``check_finite``, its values.

    Args:
        neighborhood: a :class:`~ctxpred.neighborhoods.PixelNeighborhood`,
            :class:`~ctxpred.neighborhoods.FeatureNeighborhood` or
            :class:`~ctxpred.neighborhoods.TokenNeighborhood`.
        head: a :class:`~ctxpred.heads.base.ContextHead` (built-in or your own subclass) with
            ``num_strides`` 1 or ``len(neighborhood.strides)``; its ``out_channels`` must equal
            the target's ``C``.
        estimator: Wasserstein estimator handed to ``head.divergence`` (a registered name, a
            module or a callable ``(x, y, x_weights, y_weights) -> W_p^p``); ``None`` =
            :data:`ctxpred.wasserstein.LOSS_ESTIMATOR` (``"sinkhorn"``, see the module doc).
        weight: ``lambda``, the factor of this layer's loss (default ``0.1``; the confirmed
            recipe, the demo and the reference trainer use ``0.3``; the Tuning page says how to
            check it on your model from the context/denoising gradient-norm ratio).
        stride_weights: ``w_s`` per stride (default ``1/S`` each).
        points: query points per step: ``None`` (all), a count (clamped to the grid size) or a
            fraction in ``(0, 1]`` of the layer's points; a fresh uniform subset each call
            (``points=1``, one point, warns: ``1.0`` is every point).
        grid_shape: token grid ``(h, w)`` of ``(B, L, C)`` features.
        layout: ``"channels_first"`` or ``"tokens"`` to state the layer output's layout
            explicitly (needed for rank-3 outputs without ``grid_shape``); ``None`` infers it.
        resize: how a target is brought to the layer grid.
        estimator_options: keyword options for a named estimator, e.g.
            ``{"iterations": 10}`` for ``"sinkhorn"`` (``check_finite=False`` is preset).
        match_mask: for sampling heads with ``num_samples == K_s``: mask the samples like their
            targets, so that every problem has equal uniform supports (then ``"exact"`` is a
            batched assignment on the device; see
            :func:`~ctxpred.heads.gaussian.sample_divergence`).
        check_finite: check that the target has no NaN/Inf and that token ids lie in the
            vocabulary: a plain check on the CPU, an asynchronous device assert on an
            accelerator or under ``torch.compile`` (no host sync either way); ``False`` skips
            it.
        scale_anchor: feature context only (``target=None`` with a normalizing
            :class:`~ctxpred.neighborhoods.FeatureNeighborhood`): weight ``beta`` of the term
            ``beta * (log rms(h) - log rms_0)^2`` added inside ``lambda``, ``rms_0`` being the
            hooked features' RMS at the first call (buffer ``anchor_rms``). The normalized loss
            is blind to the features' scale, and Adam then lets that scale drift by orders of
            magnitude; the anchor holds it (method page, "Feature context"). ``0`` disables it.

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
    #: ``scale_anchor`` when none is given (measured: ``benchmarks/feature_context.py``).
    DEFAULT_SCALE_ANCHOR: float = 3.0

    def __init__(
        self,
        neighborhood: nn.Module,
        head: ContextHead,
        estimator: EstimatorSpec | None = None,
        weight: float = 0.1,
        stride_weights: Sequence[float] | None = None,
        points: int | float | None = None,
        *,
        grid_shape: Sequence[int] | None = None,
        resize: ResizeMode = "auto",
        estimator_options: Mapping[str, Any] | None = None,
        match_mask: bool = False,
        layout: Layout | None = None,
        check_finite: bool = True,
        scale_anchor: float | None = None,
    ) -> None:
        super().__init__()
        num_strides = self._check_pipeline(neighborhood, head)
        self.neighborhood = neighborhood
        self.head = head
        self.weight = _check_weight(weight)
        self.register_buffer("stride_weight_tensor", _stride_weight_tensor(
            stride_weights, num_strides, neighborhood.strides), persistent=False)
        self.points = _check_points(points)
        if resize not in _RESIZE_MODES:
            raise ValueRangeError(
                f"resize must be 'auto', 'area', 'bilinear', 'nearest' or 'none', got {resize!r}"
            )
        self.resize = resize
        self.grid_shape = None if grid_shape is None else tuple(int(g) for g in grid_shape)
        if not getattr(head, "uses_estimator", True) and (
                estimator is not None or estimator_options or match_mask):
            given = [name for name, value in (("estimator", estimator is not None),
                                              ("estimator_options", bool(estimator_options)),
                                              ("match_mask", bool(match_mask))) if value]
            _checks.warn_user(
                f"{type(head).__name__} compares its prediction in closed form and takes no "
                f"Wasserstein estimator: {', '.join(given)} {'is' if len(given) == 1 else 'are'} "
                f"ignored. Drop {'it' if len(given) == 1 else 'them'}, or use a sampling head "
                f"(e.g. GaussianSamplingHead, or CategoricalHead(num_samples=...))"
            )
        self.estimator, self._estimator_fn = _estimator(estimator, estimator_options)
        self.match_mask = bool(match_mask)
        if layout not in (None, "channels_first", "tokens"):
            raise ValueRangeError(
                f"layout must be None, 'channels_first' or 'tokens', got {layout!r}")
        self.layer_layout = layout
        self.check_finite = bool(check_finite)
        self.scale_anchor = _check_weight(
            self.DEFAULT_SCALE_ANCHOR if scale_anchor is None else scale_anchor, "scale_anchor")
        # RMS of the hooked features at the first feature-context call (nan until then)
        self.register_buffer("anchor_rms", torch.full((), float("nan")))
        self._anchor_synced = False  # under torch.distributed: the first anchor is averaged
        self.name = type(self).__name__
        self._warned_upsample = False

    @staticmethod
    def _check_pipeline(neighborhood: nn.Module, head: ContextHead) -> int:
        """Check that ``neighborhood`` and ``head`` fit together; returns ``S``."""
        strides = getattr(neighborhood, "strides", None)
        if not isinstance(neighborhood, nn.Module) or strides is None:
            raise ValueRangeError(
                "neighborhood must be a ctxpred neighborhood module (PixelNeighborhood, "
                f"FeatureNeighborhood, TokenNeighborhood), got {type(neighborhood).__name__}"
            )
        if not isinstance(head, ContextHead):
            raise ValueRangeError(
                f"head must be a ctxpred ContextHead (subclass ctxpred.ContextHead for your own), "
                f"got {type(head).__name__}"
            )
        missing = [m for m in ("forward", "divergence")
                   if getattr(type(head), m) is getattr(ContextHead, m)]
        if missing:
            raise ValueRangeError(
                f"{type(head).__name__} does not define {' and '.join(missing)}: a head "
                f"implements forward(z, generator=None) and divergence(prediction, neighbors, "
                f"estimator=None, *, match_mask=False) -> (B, P, S)"
            )
        num_strides = len(strides)
        if head.num_strides not in (1, num_strides):
            raise ShapeError(
                f"{type(head).__name__} has num_strides={head.num_strides} but the neighborhood "
                f"has {num_strides} strides {tuple(strides)}; use num_strides=1 or {num_strides}"
            )
        is_token = hasattr(neighborhood, "ids")
        if head.target_kind == "ids" and not is_token:
            raise ValueRangeError(
                f"{type(head).__name__} compares token ids: use a TokenNeighborhood, got "
                f"{type(neighborhood).__name__}"
            )
        codebook = getattr(neighborhood, "codebook", None)
        num_classes = getattr(head, "num_classes", None)
        if (head.target_kind == "ids" and codebook is not None and num_classes is not None
                and codebook.shape[0] != num_classes):
            raise ShapeError(
                f"the TokenNeighborhood's codebook has {codebook.shape[0]} rows but "
                f"{type(head).__name__} has num_classes={num_classes}: the ids index both, so "
                f"the vocabularies must match (the head compares ids; give the codebook to the "
                f"head, CategoricalHead(codebook=..., num_samples=...), to compare embeddings)"
            )
        if (is_token and head.target_kind != "ids"
                and getattr(neighborhood, "codebook", None) is None):
            raise ValueRangeError(
                f"a TokenNeighborhood without a codebook yields token ids, which "
                f"{type(head).__name__} cannot predict; use a head that compares ids "
                f"(CategoricalHead) or give the neighborhood a codebook"
            )
        return num_strides

    # -- layout -------------------------------------------------------------------------------
    def layout(self, features: Tensor) -> _layout.TensorLayout:
        """The layer output's layout (channels-first, or tokens with this loss's or the
        neighborhood's ``grid_shape``); see :mod:`ctxpred._layout`."""
        grid = self.grid_shape or getattr(self.neighborhood, "grid_shape", None)
        return _layout.describe_layer(features, grid, name=self.name, layout=self.layer_layout)

    def layer_grid(self, features: Tensor) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """``(spatial, grid_shape)`` of ``features``: ``grid_shape`` is set for token layouts."""
        lay = self.layout(features)
        return lay.grid, lay.token_grid

    def _resolve_points(self, num_points: int) -> int | None:
        if self.points is None:
            return None
        if isinstance(self.points, float):
            return max(1, min(num_points, round(self.points * num_points)))
        return min(self.points, num_points)

    # -- evaluation ---------------------------------------------------------------------------
    def _neighbors(
        self, target: Tensor, points: int | None, generator: torch.Generator | None
    ) -> Neighbors:
        if self.head.target_kind == "ids":
            if target.is_floating_point():
                raise DTypeError(
                    f"{self.name}: {type(self.head).__name__} needs integer token ids as target, "
                    f"got dtype {target.dtype}"
                )
            return self.neighborhood.ids(target, points=points, generator=generator)
        return self.neighborhood(target, points=points, generator=generator)

    def terms(
        self,
        features: Tensor,
        target: Tensor | None = None,
        generator: torch.Generator | None = None,
        sample_weight: Tensor | None = None,
    ) -> ContextLossTerms:
        """The loss with its per-stride and per-point parts (see :class:`ContextLossTerms`;
        with ``sample_weight`` ``(B,)``, ``total`` and ``per_stride`` are sample-weighted, see
        :func:`reduce_context_loss`)."""
        if not isinstance(features, Tensor) or not features.is_floating_point():
            raise DTypeError(
                f"{self.name}: layer output must be a floating-point Tensor, got "
                f"{getattr(features, 'dtype', type(features).__name__)}"
            )
        lay = self.layout(features)
        self._check_channels(features, lay)  # before the target checks, which would blame it
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueRangeError(
                f"{self.name}: generator must be a torch.Generator or None, got "
                f"{type(generator).__name__} {generator!r}; e.g. "
                f"torch.Generator(device=...).manual_seed(seed)"
            )
        _checks.check_devices(features, target if isinstance(target, Tensor) else None,
                              self.head, self.name)
        given = target is not None
        if given:
            target = self._check_target(features, target, lay)
        elif _checks.needs_target(self.neighborhood):
            raise ValueRangeError(
                f"{self.name}: its {type(self.neighborhood).__name__} needs a target, the clean "
                f"signal the context is taken from (pixels or latents (B, C, *grid), or token "
                f"ids): pass loss(features, target) / predictor.loss(target=x0) or "
                f"{{layer: x0}}; to predict the layer's own features use a FeatureNeighborhood, "
                f"which stops the gradient"
            )
        check_sample_weight(sample_weight, features.shape[0], self.name, self.check_finite)
        feature_context = not given
        target = _layout.prepare_target(
            features, target, lay, getattr(self.neighborhood, "grid_shape", None), self.resize,
            self.name,
        )
        if given and self.check_finite:
            _checks.check_finite(target, self.name)
            if not target.is_floating_point():
                vocab = _vocabulary(self.head, self.neighborhood)
                if vocab is not None:
                    _checks.check_ids_in_range(target, vocab, self.name)
        nb = self._neighbors(target, self._resolve_points(math.prod(lay.grid)), generator)
        source = features
        anchor = None
        if feature_context and getattr(self.neighborhood, "normalize", "none") != "none":
            # feature context: the head reads the same scale-free features as the target
            source = standardize_features(features, self.neighborhood.normalize,
                                          token_layout=lay.token_grid is not None)
            if self.scale_anchor > 0:
                anchor = self._scale_anchor(features)
        z = _checks.to_head_dtype(gather_points(source, nb.points, lay.token_grid),
                                 self.head)
        prediction = self.head(z, generator=generator)
        est = self._estimator_fn if self._estimator_fn is not None else self.estimator
        est = _bind_generator(est, generator)  # e.g. the sliced estimator's directions
        per_point = self.head.divergence(prediction, nb, est, match_mask=self.match_mask)
        valid = nb.mask.any(-1)
        total, per_stride = reduce_context_loss(per_point, valid, self.stride_weight_tensor,
                                                sample_weight)
        if anchor is not None:
            total = total + self.scale_anchor * anchor
        return ContextLossTerms(self.weight * total, per_stride, per_point, valid, nb.points)

    def _check_channels(self, features: Tensor, lay: _layout.TensorLayout) -> None:
        """The head's ``in_channels`` against the layer output's channel axis, naming a
        channels-last ``(B, *grid, C)`` output."""
        want = self.head.in_channels
        if (want is not None and lay.channels != want and features.dim() >= 4
                and features.shape[-1] == want):
            order = _checks.channels_first_permute(features.dim())
            raise ShapeError(
                f"{self.name}: the layer output {tuple(features.shape)} has {lay.channels} "
                f"channels on axis 1, but the head expects in_channels={want}, which is the "
                f"last axis: it looks channels-last (B, *grid, C); ctxpred reads channels-first "
                f"(B, C, *grid): pass features.permute({order})"
            )
        self.head.check_in_channels(lay.channels, f"layer output {tuple(features.shape)}")

    def _check_target(self, features: Tensor, target: Any, lay: _layout.TensorLayout) -> Any:
        """The early checks of a given target (see the class docstring); float64 -> float32
        unless the features are float64 too."""
        if not isinstance(target, Tensor):
            return target  # prepare_target names the type
        wants_ids = hasattr(self.neighborhood, "ids")
        _checks.check_target_dtype(target, wants_ids, self.name)
        if self.head.target_kind == "ids" and target.is_floating_point():
            # before any layout check, which would read float ids as values (B, C, *grid)
            raise DTypeError(
                f"{self.name}: {type(self.head).__name__} needs integer token ids as target "
                f"(B, *grid) or (B, L), got dtype {target.dtype} {tuple(target.shape)}; pass "
                f"the ids, e.g. target.long()"
            )
        if target.dtype == torch.float64 and features.dtype != torch.float64:
            target = target.float()  # the divergence core runs in float32, as documented
        if getattr(self.neighborhood, "grid_shape", None) is not None:
            return target  # token layout: prepare_target checks the grid
        if not wants_ids:
            channels = self.head.out_channels if self.head.target_kind == "values" else None
            _checks.check_target_layout(target, lay.grid, channels, self.name)
        source = tuple(target.shape[1:] if wants_ids else target.shape[2:])
        warning = _checks.check_resize(source, lay.grid, self.name)
        if warning is not None and not self._warned_upsample:
            self._warned_upsample = True
            _checks.warn_user(warning)
        return target

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # checkpoints written before the scale anchor existed: anchor afresh
        state_dict.setdefault(prefix + "anchor_rms", torch.full((), float("nan")))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _scale_anchor(self, features: Tensor) -> Tensor:
        """``(log rms(h) - log rms_0)^2`` with ``rms_0`` the features' RMS at the first call
        (averaged over the ranks under ``torch.distributed``; stored in the ``anchor_rms``
        buffer, so checkpoints keep it). No host sync."""
        rms = features.float().pow(2).mean().add(1e-12).sqrt()
        with torch.no_grad():
            first = rms.detach()
            if not self._anchor_synced:  # this process's first call (a host-side flag)
                self._anchor_synced = True
                first = _mean_over_ranks(first)
            ref = torch.where(torch.isnan(self.anchor_rms), first, self.anchor_rms)
            self.anchor_rms.copy_(ref)
        return (rms.log() - ref.log()).pow(2)

    def forward(
        self,
        features: Tensor,
        target: Tensor | None = None,
        generator: torch.Generator | None = None,
        sample_weight: Tensor | None = None,
    ) -> Tensor:
        """The weighted scalar loss ``lambda * sum_s w_s * mean_b a_b mean_i D_{b,i}^s``.

        ``sample_weight``: optional ``(B,)`` weights ``a_b`` of the samples (finite, ``>= 0``,
        checked with ``check_finite``; e.g. by diffusion timestep), applied before the batch
        mean; ``None`` = all 1.
        """
        return self.terms(features, target, generator, sample_weight).total

    @torch.no_grad()
    def initialize(self, features: Tensor) -> None:
        """Materialize a lazy head from one example layer output (no loss computed)."""
        lay = self.layout(features)
        z = gather_points(features, torch.zeros(1, dtype=torch.long, device=features.device),
                          lay.token_grid)
        self.head(z)

    def extra_repr(self) -> str:
        """The options shown in ``repr(module)``."""
        est = self.estimator if isinstance(self.estimator, str) else type(self.estimator).__name__
        layout = "" if self.layer_layout is None else f", layout={self.layer_layout!r}"
        return (f"estimator={est!r}, weight={self.weight}, points={self.points}, "
                f"match_mask={self.match_mask}, "
                f"grid_shape={self.grid_shape}{layout}, resize={self.resize!r}")


def _vocabulary(head: ContextHead, neighborhood: nn.Module) -> int | None:
    """How many token ids a target may use: the head's ``num_classes`` or the neighborhood's
    codebook size (``None``: unknown, not checked)."""
    if head.target_kind == "ids" and isinstance(getattr(head, "num_classes", None), int):
        return head.num_classes
    codebook = getattr(neighborhood, "codebook", None)
    return None if codebook is None else int(codebook.shape[0])


def _check_weight(weight: float, name: str = "weight") -> float:
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
        raise ValueRangeError(f"{name} must be a finite number >= 0, got {weight!r}")
    return float(weight)


def _stride_weight_tensor(
    stride_weights: Sequence[float] | None, num_strides: int, strides: Sequence[int]
) -> Tensor | None:
    if stride_weights is None:
        return None
    sw = [float(w) for w in stride_weights]
    if len(sw) != num_strides:
        raise ShapeError(
            f"stride_weights has {len(sw)} entries but the neighborhood has "
            f"{num_strides} strides {tuple(strides)}"
        )
    if any(not math.isfinite(w) or w < 0 for w in sw):
        raise ValueRangeError(f"stride_weights must be finite and >= 0, got {sw}")
    return torch.tensor(sw)


def _check_points(points: int | float | None) -> int | float | None:
    if points is None:
        return None
    bad = isinstance(points, bool) or not isinstance(points, (int, float))
    if bad or (isinstance(points, int) and points < 1) or (
        isinstance(points, float) and not 0.0 < points <= 1.0
    ):
        raise ValueRangeError(
            f"points must be None, a count >= 1 or a fraction in (0, 1], got {points!r}"
        )
    if points == 1 and isinstance(points, int):
        _checks.warn_user(
            "points=1 (an int) is a count: one query point per image per step. For every point "
            "pass points=None or the fraction points=1.0 (if one point is meant, filter this "
            "warning)"
        )
    return points


def _estimator(
    estimator: EstimatorSpec | None, options: Mapping[str, Any] | None
) -> tuple[EstimatorSpec, Any]:
    """``(the estimator as given, the resolved callable for a name or None)``."""
    if estimator is None:
        from ctxpred import wasserstein

        estimator = wasserstein.LOSS_ESTIMATOR
    if not isinstance(estimator, str):
        if options:
            raise ValueRangeError(
                "estimator_options apply to an estimator given by name; configure a module or "
                "callable estimator directly"
            )
        _resolve_estimator(estimator)  # type check
        return estimator, None
    return estimator, _resolve_estimator(estimator, **(options or {}))


def _mean_over_ranks(value: Tensor) -> Tensor:
    """``value`` averaged over the ranks of an initialized default process group (each rank
    sees other data: an anchor taken alone would give every rank another objective), else
    ``value``. A collective: every rank calls it at the same step."""
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()):
        return value
    total = value.clone()
    distributed.all_reduce(total)
    return total / distributed.get_world_size()


def group_by_stride(values: Tensor, mask: Tensor, num_strides: int) -> tuple[Tensor, Tensor]:
    """Deprecated: :class:`~ctxpred.neighborhoods.Neighbors` keeps the stride axis already.

    Splits a stride-major slot axis ``K = S * K_s`` into ``(S, K_s)``; a result that already has
    the stride axis (``mask (B, P, S, K_s)``) is returned as it is.
    """
    import warnings

    warnings.warn(
        "group_by_stride is deprecated: neighbors()/token_neighbors() return values "
        "(B, P, S, K_s[, C]) and mask (B, P, S, K_s) already", DeprecationWarning, stacklevel=2,
    )
    if mask.dim() == 4:
        return values, mask
    if mask.shape[-1] % num_strides:
        raise ShapeError(
            f"{mask.shape[-1]} neighbor slots do not split into {num_strides} strides"
        )
    per = mask.shape[-1] // num_strides
    return values.unflatten(2, (num_strides, per)), mask.unflatten(2, (num_strides, per))


__getattr__ = deprecated_names(__name__, {
    "resize_target": ("ctxpred._layout", "resize_target"),
    "resolve_estimator": ("ctxpred.wasserstein", "resolve_estimator"),
    "sample_divergence": ("ctxpred.heads", "sample_divergence"),
    "naive_divergence": ("ctxpred.heads", "naive_divergence"),
    "moment_divergence": ("ctxpred.heads", "moment_divergence"),
    "categorical_divergence": ("ctxpred.heads", "categorical_divergence"),
})
