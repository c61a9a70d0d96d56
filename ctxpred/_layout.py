r"""The one place that works out a tensor's layout (private; every other module calls it).

ctxpred reads two layouts:

* ``"channels_first"``: ``(B, C, *grid)`` with 1-3 grid dims (images, feature maps, volumes, a
  1-D convolution's ``(B, C, L)``), any memory format;
* ``"tokens"``: a sequence ``(B, L, C)`` on a row-major grid ``grid_shape`` with
  ``prod(grid_shape) == L`` (DiT / ViT tokens).

:func:`describe` decides which one a tensor has, from an explicit ``layout``, else from
``grid_shape`` (given: tokens), else from the rank with the caller's rule for rank 3
(``rank3``): ``(B, C, L)`` for the neighbor extractors, ``(B, P, C)`` points for the heads,
ambiguous (an error) for a layer output. :func:`to_points` turns either layout into
``(B, P, C)``, :func:`to_channels_first` into ``(B, C, *grid)``, and :func:`prepare_target`
brings a loss target to a layer's grid (:func:`resize_target`).

Example:
    >>> import torch
    >>> lay = describe(torch.zeros(2, 64, 16), grid_shape=(8, 8))
    >>> lay.kind, lay.grid, lay.channels, to_points(torch.zeros(2, 64, 16), lay).shape
    ('tokens', (8, 8), 16, torch.Size([2, 64, 16]))
    >>> describe(torch.zeros(2, 3, 8, 8)).grid
    (8, 8)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from ctxpred.errors import DTypeError, ShapeError, ValueRangeError

__all__ = [
    "Layout",
    "TensorLayout",
    "describe",
    "describe_layer",
    "ids_to_points",
    "prepare_target",
    "resize_target",
    "to_channels_first",
    "to_points",
]

Layout = Literal["channels_first", "tokens"]
ResizeMode = Literal["auto", "area", "bilinear", "nearest", "none"]
_LAYOUTS = ("channels_first", "tokens")


class TensorLayout(NamedTuple):
    """How a tensor is laid out.

    Attributes:
        kind: ``"channels_first"`` or ``"tokens"``.
        grid: the grid shape (``spatial`` for channels-first, ``grid_shape`` for tokens; ``(L,)``
            for points ``(B, P, C)`` without a grid).
        channels: ``C``.
    """

    kind: Layout
    grid: tuple[int, ...]
    channels: int

    @property
    def token_grid(self) -> tuple[int, ...] | None:
        """The grid of a token layout, ``None`` for channels-first."""
        return self.grid if self.kind == "tokens" else None


def _check_grid_shape(grid_shape: Sequence[int]) -> tuple[int, ...]:
    grid = tuple(int(g) for g in grid_shape)
    if len(grid) not in (1, 2, 3) or any(g <= 0 for g in grid):
        raise ShapeError(f"grid_shape must be 1 to 3 positive sizes, e.g. (h, w), got {grid}")
    return grid


def describe(
    x: Tensor,
    grid_shape: Sequence[int] | None = None,
    layout: Layout | None = None,
    *,
    name: str = "x",
    rank3: Layout | None = "channels_first",
    ranks: Sequence[int] = (3, 4, 5),
) -> TensorLayout:
    """The layout of ``x`` (see the module docstring for the rules).

    Args:
        x: ``(B, C, *grid)`` or ``(B, L, C)``.
        grid_shape: the token grid; given, ``x`` is a token sequence.
        layout: explicit layout (overrides the inference).
        name: how error messages call ``x``.
        rank3: the layout of a rank-3 ``x`` without ``grid_shape`` / ``layout`` (``None``:
            ambiguous, raise).
        ranks: accepted ranks of a channels-first ``x``.

    Returns:
        :class:`TensorLayout`.
    """
    if layout is not None and layout not in _LAYOUTS:
        raise ValueRangeError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if grid_shape is not None and layout != "channels_first":
        grid = _check_grid_shape(grid_shape)
        if x.dim() != 3:
            raise ShapeError(
                f"{name} with grid_shape must be a token sequence (B, L, C), "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != math.prod(grid):
            raise ShapeError(
                f"grid_shape {grid} has {math.prod(grid)} points but {name} "
                f"(B, L, C) = {tuple(x.shape)} has L = {x.shape[1]}"
            )
        return TensorLayout("tokens", grid, int(x.shape[2]))
    kind = layout
    if kind is None and x.dim() == 3:
        kind = rank3
        if kind is None:
            raise ShapeError(
                f"{name}: rank-3 features {tuple(x.shape)} are ambiguous; for "
                f"transformer tokens (B, L, C) pass grid_shape=(h, w) to the loss"
            )
    if kind == "tokens":
        if x.dim() != 3:
            raise ShapeError(
                f"{name} in token layout must be (B, L, C), got shape {tuple(x.shape)}"
            )
        return TensorLayout("tokens", (int(x.shape[1]),), int(x.shape[2]))
    if x.dim() not in ranks:
        spatial = ", ".join(str(r - 2) for r in ranks)
        raise ShapeError(
            f"{name} must be channels-first (B, C, *spatial) with {spatial} spatial dims "
            f"(rank {' or '.join(map(str, ranks))}), or (B, L, C) tokens with grid_shape=...; "
            f"got shape {tuple(x.shape)} (rank {x.dim()})"
        )
    return TensorLayout("channels_first", tuple(int(n) for n in x.shape[2:]), int(x.shape[1]))


def describe_layer(
    features: Tensor, grid_shape: Sequence[int] | None, *, name: str
) -> TensorLayout:
    """The layout of a hooked layer's output.

    Tokens ``(B, L, C)`` when ``grid_shape`` is known and ``features`` has rank 3; otherwise
    channels-first ``(B, C, *spatial)`` with 2-3 spatial dims (a rank-3 output without a grid is
    ambiguous and raises).
    """
    return describe(features, grid_shape if features.dim() == 3 else None, name=name,
                    rank3=None, ranks=(4, 5))


def to_points(x: Tensor, lay: TensorLayout) -> Tensor:
    """``x`` as ``(B, P, C)`` (a view for tokens and for ``channels_last`` maps)."""
    if lay.kind == "tokens":
        return x
    return x.flatten(2).transpose(1, 2)


def to_channels_first(x: Tensor, lay: TensorLayout) -> Tensor:
    """``x`` as ``(B, C, *grid)``."""
    if lay.kind == "tokens":
        return x.transpose(1, 2).unflatten(2, lay.grid)
    return x


def ids_to_points(
    ids: Tensor, grid_shape: Sequence[int] | None = None, name: str = "ids"
) -> tuple[Tensor, tuple[int, ...]]:
    """Token ids ``(B, *grid)`` (or ``(B, L)`` with ``grid_shape``) as ``(B, P)`` and the grid."""
    if grid_shape is not None:
        if ids.dim() != 2:
            raise ShapeError(f"{name} with grid_shape must be (B, L), got shape {tuple(ids.shape)}")
        lay = describe(ids.unsqueeze(-1), grid_shape, name=name)
        return ids, lay.grid
    if ids.dim() not in (2, 3, 4):
        raise ShapeError(
            f"{name} must be (B, *spatial) with 1-3 spatial dims (rank 2-4), "
            f"got shape {tuple(ids.shape)} (rank {ids.dim()})"
        )
    return ids.reshape(ids.shape[0], -1), tuple(int(n) for n in ids.shape[1:])


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


def prepare_target(
    features: Tensor,
    target: Tensor | None,
    lay: TensorLayout,
    neighborhood_grid: Sequence[int] | None,
    resize: ResizeMode,
    name: str,
) -> Tensor:
    """The tensor a loss's neighborhood reads: ``target`` on the layer grid, or the features.

    Args:
        features: the layer output, laid out as ``lay``.
        target: ``None`` (feature context), channels-first ``(B, C, *spatial)``, ids
            ``(B, *spatial)``, or token layout when the neighborhood has a grid.
        lay: the layer's layout (:func:`describe`).
        neighborhood_grid: the neighborhood's ``grid_shape`` (its input is then a token sequence).
        resize: how a channels-first target reaches the layer grid (:func:`resize_target`).
        name: the loss, for error messages.
    """
    if target is None:
        if lay.kind == "tokens" and neighborhood_grid is None:
            return to_channels_first(features, lay)
        if lay.kind == "channels_first" and neighborhood_grid is not None:
            raise ShapeError(
                f"{name}: the neighborhood expects token layout "
                f"(grid_shape={tuple(neighborhood_grid)}) but the layer output is channels-first "
                f"{tuple(features.shape)}"
            )
        return features
    if not isinstance(target, Tensor):
        raise DTypeError(f"{name}: target must be a Tensor, got {type(target).__name__}")
    if target.shape[0] != features.shape[0]:
        raise ShapeError(
            f"{name}: target batch {target.shape[0]} != layer batch "
            f"{features.shape[0]} (target {tuple(target.shape)}, "
            f"layer {tuple(features.shape)})"
        )
    if neighborhood_grid is not None:
        if tuple(neighborhood_grid) != lay.grid:
            raise ShapeError(
                f"{name}: target in token layout with grid_shape {tuple(neighborhood_grid)} but "
                f"the layer grid is {lay.grid}; no resize rule applies to token-layout targets "
                f"(pass a channels-first target and a neighborhood without grid_shape)"
            )
        return target
    return resize_target(target, lay.grid, resize)
