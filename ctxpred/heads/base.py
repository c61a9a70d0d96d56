r"""The head contract: :class:`ContextHead`, the base every context head derives from.

A head is a plugin of :class:`~ctxpred.loss.ContextPredictionLoss`. The loss knows no concrete
head; per step it calls

1. ``prediction = head(z, generator=generator)`` with ``z (B, P, C_in)``, the layer's
   representation at the query points; ``generator`` drives any sampling noise;
2. ``head.divergence(prediction, neighbors, estimator, match_mask=...)`` with the
   :class:`~ctxpred.neighborhoods.Neighbors` of the same points (``values (B, P, S, K_s, C)``,
   ``mask (B, P, S, K_s)``) and the resolved Wasserstein estimator; it returns ``(B, P, S)``
   values (0 where a point has no valid neighbor at a stride);

then reduces the values. A head's :attr:`~ContextHead.target_kind` says what it compares with:
``"values"`` (float neighbor values, the default) or ``"ids"`` (token ids from a
:class:`~ctxpred.neighborhoods.TokenNeighborhood`). Write your own head by subclassing
:class:`ContextHead` and defining ``forward`` and ``divergence`` (see "Write your own head" in
the docs).

The helpers :func:`match_strides`, :func:`check_out_channels`, :func:`float32_core` are shared by
the built-in divergences and are there for custom heads too.

Example:
    >>> from ctxpred.heads import GaussianSamplingHead, MomentHead
    >>> issubclass(MomentHead, ContextHead), GaussianSamplingHead(3, 8).uses_estimator
    (True, True)
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ctxpred import _layout
from ctxpred.errors import ShapeError, ValueRangeError, check_floating

__all__ = ["ContextHead", "check_out_channels", "float32_core", "match_strides"]


def _positive_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueRangeError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _linear(in_channels: int | None, out_features: int) -> nn.Module:
    if in_channels is None:
        return nn.LazyLinear(out_features)
    return nn.Linear(in_channels, out_features)


def _core(t: Tensor) -> Tensor:
    """Half / bfloat16 -> float32; float32 and float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def float32_core(device: torch.device) -> torch.autocast:
    """Autocast off on ``device`` (a context manager): a divergence core runs in its inputs'
    dtype, which :func:`_core` lifts to float32 from half precision.

    Example:
        >>> with float32_core(torch.device("cpu")):
        ...     (torch.ones(2, dtype=torch.bfloat16).float() * 2).dtype
        torch.float32
    """
    device_type = device.type if device.type in {"cpu", "cuda", "xpu", "mps", "hpu"} else "cpu"
    return torch.autocast(device_type=device_type, enabled=False)


def match_strides(pred: Tensor, num_strides: int, what: str) -> Tensor:
    """Broadcast the stride axis (dim 2) of a prediction from 1 to ``num_strides``.

    Args:
        pred: ``(B, P, S', ...)`` with ``S'`` in ``{1, num_strides}``.
        num_strides: ``S`` of the neighborhood.
        what: the head, for the error message.

    Returns:
        ``(B, P, S, ...)`` (a view).

    Example:
        >>> match_strides(torch.zeros(2, 3, 1, 4), 3, "my head").shape
        torch.Size([2, 3, 3, 4])
    """
    if pred.shape[2] == num_strides:
        return pred
    if pred.shape[2] == 1:
        return pred.expand(*pred.shape[:2], num_strides, *pred.shape[3:])
    raise ShapeError(
        f"{what} predicts {pred.shape[2]} strides but the neighborhood has {num_strides}; "
        f"build the head with num_strides=1 (shared) or num_strides={num_strides}"
    )


def check_out_channels(pred_channels: int, target: Tensor, what: str) -> None:
    """Raise :class:`~ctxpred.errors.ShapeError` unless ``pred_channels == target.shape[-1]``.

    Example:
        >>> check_out_channels(3, torch.zeros(1, 1, 1, 8, 3), "my head")
    """
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


class ContextHead(nn.Module):
    """Base class of the heads: the plugin contract, input normalisation and the stride axis.

    Subclasses define :meth:`forward` and :meth:`divergence`; :meth:`points` turns the input
    into ``(B, P, C_in)`` and checks its channel count (once; the loss and
    :func:`~ctxpred.attach` rely on it).

    Args:
        out_channels: ``C_out``, the channel count of the predicted neighbors.
        in_channels: ``C_in``, or ``None`` to infer it on the first forward.
        num_strides: ``S``, the size of the stride axis of the prediction (1: shared).

    Attributes:
        target_kind: ``"values"`` (compares float neighbor values) or ``"ids"`` (token ids).

    Example:
        >>> class MeanHead(ContextHead):
        ...     def __init__(self, out_channels, in_channels):
        ...         super().__init__(out_channels, in_channels, num_strides=1)
        ...         self.proj = nn.Linear(in_channels, out_channels)
        ...     def forward(self, z, generator=None):
        ...         return self.proj(self.points(z)).unsqueeze(2)  # (B, P, 1, C)
        ...     def divergence(self, prediction, neighbors, estimator=None, *, match_mask=False):
        ...         mean = (neighbors.values * neighbors.mask.unsqueeze(-1)).sum(-2)
        ...         mean = mean / neighbors.mask.sum(-1, keepdim=True).clamp_min(1)
        ...         return (prediction - mean).square().sum(-1)  # (B, P, S)
        >>> head = MeanHead(3, in_channels=8)
        >>> head(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 1, 3])
    """

    target_kind: ClassVar[Literal["values", "ids"]] = "values"

    @property
    def uses_estimator(self) -> bool:
        """Whether :meth:`divergence` reads the loss's Wasserstein ``estimator`` and
        ``match_mask`` (sampling heads); a loss given either for a head that does not warns
        that it is ignored."""
        return True

    def __init__(self, out_channels: int, in_channels: int | None, num_strides: int) -> None:
        super().__init__()
        self.out_channels = _positive_int(out_channels, "out_channels")
        self.in_channels = (
            None if in_channels is None else _positive_int(in_channels, "in_channels")
        )
        self.num_strides = _positive_int(num_strides, "num_strides")

    @property
    def initialized(self) -> bool:
        """``False`` while a lazy layer still waits for its first input."""
        return not any(isinstance(p, nn.parameter.UninitializedParameter)
                       for p in self.parameters())

    def points(self, z: Tensor) -> Tensor:
        """``z`` as ``(B, P, C_in)``; checks dtype and the input channel count.

        Accepts points ``(B, P, C_in)`` or a channels-first map ``(B, C_in, *spatial)`` with 2-3
        spatial dims (read as ``P = prod(spatial)`` points).
        """
        check_floating(z, "z")
        lay = _layout.describe(z, name=f"{type(self).__name__} input", rank3="tokens",
                               ranks=(4, 5))
        self.check_in_channels(lay.channels, f"input shape {tuple(z.shape)}")
        if self.in_channels is None:
            self.in_channels = lay.channels
        return _layout.to_points(z, lay)

    def check_in_channels(self, channels: int, source: str) -> None:
        """Raise :class:`~ctxpred.errors.ShapeError` unless ``channels`` equals ``in_channels``
        (no check while a lazy head has not seen an input); ``source`` names the input.

        The one check of the input channel count: :meth:`points` and :func:`ctxpred.attach`
        (at capture time, naming the layer) both call it.
        """
        if self.in_channels is not None and channels != self.in_channels:
            raise ShapeError(
                f"{type(self).__name__} expects C_in={self.in_channels} input channels, got "
                f"{channels} ({source}); the layer's channel count and the head's "
                f"in_channels={self.in_channels} must match"
            )

    _points = points  # the 0.1 name, kept for subclasses written against it

    def forward(self, z: Tensor, generator: torch.Generator | None = None) -> Any:
        """Predict each point's neighborhood from ``z`` ``(B, P, C_in)``; ``generator`` seeds
        any noise. The return value is whatever :meth:`divergence` reads."""
        raise NotImplementedError(f"{type(self).__name__} must define forward(z, generator=None)")

    def divergence(
        self,
        prediction: Any,
        neighbors: Any,
        estimator: Any = None,
        *,
        match_mask: bool = False,
    ) -> Tensor:
        """``(B, P, S)`` divergence between ``prediction`` and the neighborhood distribution.

        Args:
            prediction: what :meth:`forward` returned.
            neighbors: :class:`~ctxpred.neighborhoods.Neighbors`, ``values (B, P, S, K_s, C)``
                (ids ``(B, P, S, K_s)`` for ``target_kind="ids"``), ``mask (B, P, S, K_s)``.
            estimator: the loss's Wasserstein estimator (a callable
                ``(x, y, x_weights, y_weights) -> values``, or a registered name); heads that
                do not transport samples ignore it.
            match_mask: the loss's ``match_mask`` option (sampling heads).

        Returns:
            ``(B, P, S)`` values, 0 where ``mask`` has no valid slot.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must define divergence(prediction, neighbors, estimator, "
            f"*, match_mask=False) -> (B, P, S)"
        )

    def extra_repr(self) -> str:
        """The options shown in ``repr(module)``."""
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"num_strides={self.num_strides}")
