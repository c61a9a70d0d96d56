"""The shared base of the estimator modules (``ExactWasserstein``, ``SinkhornWasserstein``, ...).

Each module is its function with the options fixed at construction; subclass
:class:`EstimatorModule` the same way for an estimator of your own.

Example:
    >>> from ctxpred.wasserstein import ExactWasserstein
    >>> isinstance(ExactWasserstein(), EstimatorModule), ExactWasserstein(p=1).options()["p"]
    (True, 1)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn

__all__ = ["EstimatorModule"]


class EstimatorModule(nn.Module):
    r"""Module form of an estimator function (no parameters).

    ``forward(x, y, x_weights=None, y_weights=None)`` returns
    ``function(x, y, x_weights, y_weights, **options)``, where ``options`` are the keyword
    arguments given to ``__init__``, kept as attributes (changing ``module.p`` changes the next
    call).

    Args:
        **options: the estimator function's keyword options.

    Shape:
        ``x (..., N, D)``, ``y (..., M, D)``, weights ``(..., N)`` / ``(..., M)`` -> ``(...)``.

    Example:
        >>> import torch
        >>> def mean_gap(x, y, x_weights=None, y_weights=None, scale=1.0):
        ...     return scale * (x.mean(-2) - y.mean(-2)).square().sum(-1)
        >>> class MeanGap(EstimatorModule):
        ...     function = staticmethod(mean_gap)
        ...     def __init__(self, scale: float = 1.0) -> None:
        ...         super().__init__(scale=scale)
        >>> MeanGap(scale=2.0)(torch.ones(3, 4, 2), torch.zeros(3, 5, 2))
        tensor([4., 4., 4.])
    """

    function: ClassVar[Callable[..., Tensor]]

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self._option_names = tuple(options)
        for name, value in options.items():
            setattr(self, name, value)

    def options(self) -> dict[str, Any]:
        """The keyword options of the next call."""
        return {name: getattr(self, name) for name in self._option_names}

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        x_weights: Tensor | None = None,
        y_weights: Tensor | None = None,
    ) -> Tensor:
        """``function(x, y, x_weights, y_weights, **options)``: ``x (..., N, D)``,
        ``y (..., M, D)``, weights ``(..., N)`` / ``(..., M)`` -> ``(...)``."""
        return type(self).function(x, y, x_weights, y_weights, **self.options())

    def extra_repr(self) -> str:
        """The options shown in ``repr(module)``."""
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self._option_names
                         if name != "check_finite")
