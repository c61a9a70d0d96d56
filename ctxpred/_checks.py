"""Early checks of what a user hands to a loss (private; issue 13: no silent failures).

Every function raises a :class:`~ctxpred.errors.CtxpredError` subclass that names the argument,
the expected and actual value and the fix, or returns a warning text for the caller to emit once.
None of them synchronizes with a device: value checks (NaN/Inf, id ranges) run as a plain check on
the CPU and as an asynchronous device assert (``torch._assert_async``) on accelerators and inside
``torch.compile``.

Example:
    >>> import torch
    >>> check_resize((16, 32), (8, 8), "loss")
    Traceback (most recent call last):
    ...
    ctxpred.errors.ShapeError: loss: the target grid (16, 32) and the layer grid (8, 8) have \
different aspect ratios; ...
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ctxpred.errors import DTypeError, ShapeError, ValueRangeError, _all_finite, _value_check

__all__ = [
    "check_devices",
    "check_finite",
    "check_ids_in_range",
    "check_resize",
    "check_target_dtype",
    "check_target_layout",
    "needs_target",
    "to_head_dtype",
    "warn_user",
]

_INTERNAL_DIRS = tuple(os.path.dirname(os.path.abspath(path)) + os.sep
                       for path in (__file__, torch.__file__))


def warn_user(message: str) -> None:
    """``warnings.warn(message, UserWarning)`` attributed to the first caller outside ctxpred and
    torch (so the warning points at the user's line, whatever the call depth in between)."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
            _INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def needs_target(neighborhood: nn.Module) -> bool:
    """Whether a neighborhood reads a target (clean pixels, latents, token ids) rather than the
    layer's own features; a custom module may say so with a ``needs_target`` attribute."""
    explicit = getattr(neighborhood, "needs_target", None)
    if explicit is not None:
        return bool(explicit)
    from ctxpred.neighborhoods import PixelNeighborhood, TokenNeighborhood

    return isinstance(neighborhood, (PixelNeighborhood, TokenNeighborhood))


def check_finite(target: Tensor, name: str) -> None:
    """No NaN or Inf in a floating-point ``target`` (see :func:`_value_check` for the cost)."""
    if not target.is_floating_point() or target.device.type == "meta":
        return
    _value_check(
        _all_finite(target),
        f"{name}: the target contains NaN or Inf values; a single one makes the loss and the "
        f"backbone's gradients NaN. Clean the data, or pass check_finite=False to the "
        f"ContextPredictionLoss to skip this check",
        ValueRangeError,
    )


def check_ids_in_range(ids: Tensor, num_classes: int, name: str) -> None:
    """Token ids within ``[0, num_classes)`` (see :func:`_value_check` for the cost)."""
    if ids.device.type == "meta":
        return
    _value_check(
        ((ids >= 0) & (ids < num_classes)).all(),
        f"{name}: target token ids must lie in [0, {num_classes}) (the head's num_classes); "
        f"some are negative or >= {num_classes}: map them to the vocabulary or enlarge "
        f"num_classes",
        ValueRangeError,
    )


def check_target_dtype(target: Tensor, wants_ids: bool, name: str) -> None:
    """A float target for value heads; integer ids only go with a token neighborhood."""
    if wants_ids or target.is_floating_point():
        return
    hint = " / 255" if target.dtype == torch.uint8 else ""
    raise DTypeError(
        f"{name}: the target has dtype {target.dtype}, but this loss compares float values "
        f"(pixels, latents, features): convert it to float, e.g. target.float(){hint}, scaled "
        f"like the model's input; integer token ids belong only to a TokenNeighborhood (with a "
        f"CategoricalHead, or a codebook)"
    )


def channels_first_permute(rank: int) -> str:
    """The ``permute`` arguments that bring a channels-last ``(B, *grid, C)`` tensor of ``rank``
    dims to channels-first ``(B, C, *grid)``, for error messages: ``"0, 3, 1, 2"`` at rank 4."""
    return ", ".join(str(d) for d in (0, rank - 1, *range(1, rank - 1)))


def check_target_layout(
    target: Tensor, grid: Sequence[int], channels: int | None, name: str
) -> None:
    """A channels-first target ``(B, C, *grid')`` with as many grid dims as the layer.

    Names the two usual slips: a missing batch axis and a channels-last ``(B, *grid, C)`` tensor.
    """
    rank = len(grid) + 2
    shape = tuple(target.shape)
    if target.dim() == 3 and len(grid) > 1 and shape[1] == math.prod(grid):
        raise ShapeError(
            f"{name}: the target {shape} looks like tokens (B, L, C) with L={shape[1]} points "
            f"of the layer grid {tuple(grid)}, but this loss reads a channels-first grid "
            f"(B, C, *grid): pass target.transpose(1, 2).reshape({shape[0]}, {shape[2]}, "
            f"{', '.join(map(str, grid))}), or give the neighborhood grid_shape={tuple(grid)} "
            f"to take token targets as they are"
        )
    if target.dim() == rank - 1:
        raise ShapeError(
            f"{name}: the target {shape} has rank {target.dim()}, but a channels-first target "
            f"for a {len(grid)}-D layer grid {tuple(grid)} is (B, C, *grid) (rank {rank}); it "
            f"looks unbatched: pass the whole batch (or target.unsqueeze(0) for one sample)"
        )
    if (channels is not None and target.dim() == rank and shape[1] != channels
            and shape[-1] == channels):
        order = channels_first_permute(rank)
        raise ShapeError(
            f"{name}: the target {shape} looks channels-last (B, *grid, C) with C={channels} "
            f"last, but ctxpred reads channels-first (B, C, *grid): pass "
            f"target.permute({order})"
        )


def check_resize(source: Sequence[int], dest: Sequence[int], name: str) -> str | None:
    """Check bringing a target grid ``source`` to a layer grid ``dest``.

    Raises :class:`ShapeError` when the two grids have different aspect ratios: no common scale
    factor ``f`` with every layer size within less than one cell of ``source / f`` (strided
    layers round by less than that: ``ceil`` or ``floor`` of ``s / 2`` at each halving stays
    within ``1 - 2^-k`` of ``s / 2^k``; a whole cell more would let a transposed target through
    on a small layer grid, e.g. ``(24, 32)`` onto ``(4, 3)``); returns a
    warning text when some dimension is upsampled (the target then carries less detail than the
    layer), ``None`` otherwise.
    """
    source, dest = tuple(int(s) for s in source), tuple(int(d) for d in dest)
    if source == dest or len(source) != len(dest):
        return None
    low = max(s / (d + 1) for s, d in zip(source, dest))
    high = min(s / (d - 1) if d > 1 else math.inf for s, d in zip(source, dest))
    if low >= high:
        raise ShapeError(
            f"{name}: the target grid {source} and the layer grid {dest} have different aspect "
            f"ratios; resizing would distort the target. Pass a target with the layer's aspect "
            f"ratio (crop or pad it like the model's input), or hook a layer whose grid matches"
        )
    if any(s < d for s, d in zip(source, dest)):
        return (
            f"{name}: the target grid {source} is smaller than the layer grid {dest} in some "
            f"dimension: it is upsampled, so the neighbors carry no more detail than the target; "
            f"pass the full-resolution target (clean pixels or latents) or hook a coarser layer "
            f"(warned once per loss)"
        )
    return None


def check_devices(
    features: Tensor, target: Tensor | None, head: nn.Module, name: str
) -> None:
    """The head and the target live where the layer output does (a generator may live on the
    CPU: the draws move to the device)."""
    param = next(head.parameters(), None)
    if param is not None and param.device != features.device:
        raise ValueRangeError(
            f"{name}: the head's parameters are on {param.device} but the layer output is on "
            f"{features.device}; move the heads with predictor.to({str(features.device)!r}) (or "
            f"loss.to(...)) after moving the model"
        )
    if target is not None and target.device != features.device:
        raise ValueRangeError(
            f"{name}: the target is on {target.device} but the layer output is on "
            f"{features.device}; pass target.to({str(features.device)!r})"
        )


def to_head_dtype(z: Tensor, head: nn.Module) -> Tensor:
    """``z`` in the dtype of the head's parameters (a bfloat16 model with float32 heads, ...).

    Under autocast the head's layers choose their own compute dtype: ``z`` is left alone.
    """
    param = next(head.parameters(), None)
    if (param is None or not param.is_floating_point() or z.dtype == param.dtype
            or torch.is_autocast_enabled(z.device.type)):
        return z
    return z.to(param.dtype)
