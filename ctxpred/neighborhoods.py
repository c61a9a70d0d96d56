r"""Neighborhood extractors: gather each point's multi-stride context and its validity mask.

For a point :math:`i` of a ``d``-dimensional grid, a stride :math:`s` and an odd kernel size
:math:`k`, the :math:`s`-stride neighborhood is

.. math::
    N_i^s = \{\, i + s\,\delta \;:\; \delta \in \{-\tfrac{k-1}{2},\dots,\tfrac{k-1}{2}\}^d
    \setminus \{0\} \,\}

(for ``k=3`` in 2-D: the 8 positions of a 3x3 ring dilated by ``s``). Multi-stride context is the
set over ``strides``, kept on its own axis: a result has a stride axis ``S = len(strides)`` and a
slot axis ``K_s = kernel_size**d - 1`` (``values (B, P, S, K_s, C)``, ``mask (B, P, S, K_s)``).
Neighbors outside the grid are *masked out*, never zero-padded into the target: their slot in
``values`` holds zeros **and** ``mask`` is ``False``.

Slot order within a stride: offsets in row-major (lexicographic) order of ``delta`` with the
centre removed (:func:`neighbor_offsets` lists all ``S * K_s`` offsets stride-major).

Names: :class:`Neighbors` is the *result* (values, mask, points); :class:`PixelNeighborhood`,
:class:`FeatureNeighborhood` and :class:`TokenNeighborhood` are the *extractors* (modules).
``Neighborhood`` and ``MultiStrideNeighborhood`` are deprecated aliases of the last release.

Layouts accepted:

* channels-first maps ``(B, C, *spatial)`` with 1, 2 or 3 spatial dims (images, feature maps,
  volumes/videos), any memory format (``channels_last`` included);
* token sequences ``(B, L, C)`` when ``grid_shape=(h, w)`` (or ``(t, h, w)``, or ``(L,)``) is given
  and ``prod(grid_shape) == L`` (DiT / ViT tokens, row-major).

Points are numbered by their row-major flat index in the grid. ``points`` selects which query points
to evaluate: ``None`` (all ``P = prod(spatial)``), an ``int`` (a uniform random subset of that many
points, drawn on the device with an optional ``generator``), or a long tensor of flat indices,
shape ``(P,)`` (shared by the batch) or ``(B, P)`` (one set per sample).

Example:
    >>> import torch
    >>> nb = PixelNeighborhood(strides=(1, 2))(torch.randn(2, 3, 8, 8))
    >>> nb.values.shape, nb.mask.shape  # (B, P, S, K_s, C), (B, P, S, K_s)
    (torch.Size([2, 64, 2, 8, 3]), torch.Size([2, 64, 2, 8]))
"""

from __future__ import annotations

import itertools
import math
import operator
import warnings
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from ctxpred import _layout
from ctxpred._deprecation import deprecated_names
from ctxpred.errors import (
    ShapeError,
    ValueRangeError,
    _value_check,
    check_floating,
    check_integer,
)

__all__ = [
    "FeatureNeighborhood",
    "Neighbors",
    "PixelNeighborhood",
    "TokenNeighborhood",
    "gather_points",
    "neighbor_offsets",
    "neighbors",
    "standardize_features",
    "token_neighbors",
]

PointsSpec = int | Tensor | None


class Neighbors(NamedTuple):
    """What an extractor returns: the neighbors of each query point, per stride.

    Attributes:
        values: neighbor values ``(B, P, S, K_s, C)`` (floats), or neighbor token ids
            ``(B, P, S, K_s)`` (long) from :func:`token_neighbors`. Masked slots hold 0.
        mask: ``(B, P, S, K_s)`` bool, ``True`` where the neighbor lies inside the grid.
        points: flat row-major indices of the query points, ``(P,)`` or ``(B, P)``.
        strides: the strides, in the order of the ``S`` axis.

    Example:
        >>> nb = neighbors(torch.randn(1, 2, 4, 4), strides=(1, 2))
        >>> nb.values.shape, nb.mask.shape, nb.strides
        (torch.Size([1, 16, 2, 8, 2]), torch.Size([1, 16, 2, 8]), (1, 2))
    """

    values: Tensor
    mask: Tensor
    points: Tensor
    strides: tuple[int, ...]

    @property
    def stride_index(self) -> Tensor:
        """Deprecated: ``(S * K_s,)`` stride of each slot of the old flat slot axis."""
        warnings.warn(
            "Neighbors.stride_index is deprecated: values and mask keep the stride axis "
            "(B, P, S, K_s[, C]) now", DeprecationWarning, stacklevel=2,
        )
        num, per = self.mask.shape[-2], self.mask.shape[-1]
        return torch.arange(num, device=self.mask.device).repeat_interleave(per)


def _validate_strides_kernel(
    strides: Sequence[int] | int, kernel_size: int
) -> tuple[tuple[int, ...], int]:
    if isinstance(strides, int):
        strides = (strides,)
    strides = tuple(strides)
    if len(strides) == 0:
        raise ValueRangeError("strides must name at least one stride, got ()")
    checked = []
    for s in strides:
        try:  # ints, and integer scalars such as numpy's
            value = None if isinstance(s, bool) else operator.index(s)
        except TypeError:
            value = None
        if value is None or value <= 0:
            raise ValueRangeError(f"every stride must be a positive int, got strides={strides}")
        checked.append(value)
    if len(set(checked)) != len(checked):
        raise ValueRangeError(
            f"strides must be distinct, got strides={tuple(checked)}: a repeated stride would "
            f"count twice in the loss's average over strides (use stride_weights to weight one)"
        )
    strides = tuple(checked)
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise ValueRangeError(f"kernel_size must be an int, got {kernel_size!r}")
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueRangeError(f"kernel_size must be odd and >= 3, got {kernel_size}")
    return strides, kernel_size


def neighbor_offsets(
    ndim: int, strides: Sequence[int] | int = (1,), kernel_size: int = 3
) -> tuple[Tensor, Tensor]:
    """The integer grid offsets of every neighbor slot, in slot (stride-major) order.

    Args:
        ndim: number of spatial dims ``d`` (1, 2 or 3).
        strides: the dilations ``s``.
        kernel_size: odd ``k >= 3``.

    Returns:
        ``(offsets, stride_index)``: offsets ``(K, d)`` long (``s * delta``) and ``(K,)`` long.

    Example:
        >>> off, sidx = neighbor_offsets(2, strides=(1, 2))
        >>> off.shape, off[0].tolist(), off[8].tolist(), sidx.tolist()[7:9]
        (torch.Size([16, 2]), [-1, -1], [-2, -2], [0, 1])
    """
    strides, kernel_size = _validate_strides_kernel(strides, kernel_size)
    if ndim not in (1, 2, 3):
        raise ShapeError(f"ndim must be 1, 2 or 3 spatial dims, got {ndim}")
    r = (kernel_size - 1) // 2
    deltas = [d for d in itertools.product(range(-r, r + 1), repeat=ndim) if any(d)]
    offsets = [[s * c for c in d] for s in strides for d in deltas]
    stride_index = [j for j in range(len(strides)) for _ in deltas]
    return torch.tensor(offsets, dtype=torch.long), torch.tensor(stride_index, dtype=torch.long)


def _check_reachable(
    spatial: tuple[int, ...], strides: tuple[int, ...], allow_empty: bool
) -> None:
    if allow_empty:
        return
    for s in strides:
        if all(s >= n for n in spatial):
            raise ValueRangeError(
                f"stride {s} leaves no valid neighbor on a grid of shape {spatial}: every "
                f"neighbor at stride {s} falls outside (need stride < max grid size "
                f"{max(spatial)}); drop that stride or pass allow_empty=True to get an "
                f"all-False mask for it"
            )


def _resolve_points(
    points: PointsSpec,
    num_points: int,
    batch: int,
    device: torch.device,
    generator: torch.Generator | None,
) -> Tensor:
    if points is None:
        return torch.arange(num_points, device=device)
    if isinstance(points, bool):
        raise ValueRangeError(f"points must be None, an int or an index tensor, got {points}")
    if isinstance(points, int):
        if not 0 < points <= num_points:
            raise ValueRangeError(
                f"points={points} must be between 1 and the number of grid points {num_points}"
            )
        if points == num_points:
            return torch.arange(num_points, device=device)
        perm = torch.randperm(num_points, device=generator.device if generator else device,
                              generator=generator)
        return perm[:points].to(device)
    if isinstance(points, float):
        raise ValueRangeError(
            f"points must be a count or an index tensor, got the float {points}; "
            f"use round(fraction * P) for a fraction"
        )
    check_integer(points, "points")
    if points.dim() not in (1, 2) or (points.dim() == 2 and points.shape[0] != batch):
        raise ShapeError(
            f"points index must have shape (P,) or (B={batch}, P), got {tuple(points.shape)}"
        )
    points = points.to(device=device, dtype=torch.long)
    if points.numel():
        # an index past the grid would read a point that does not exist (silently, as valid)
        _value_check((points.min() >= 0) & (points.max() < num_points),
                     f"points index must lie in [0, {num_points}) (the grid's points), got "
                     f"values outside it", ValueRangeError)
    return points


_INDEX_CACHE: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}


def _index_constants(
    spatial: tuple[int, ...], strides: tuple[int, ...], kernel_size: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Offsets ``(K, d)``, grid sizes ``(d,)`` and row-major strides ``(d,)`` on ``device``.

    Built on the host once per (grid, strides, kernel, device) and kept: later calls copy
    nothing to the device (no host-to-device transfer inside the training loop).
    """
    key = (spatial, strides, kernel_size, str(device))
    cached = None if torch.compiler.is_compiling() else _INDEX_CACHE.get(key)
    if cached is not None:
        return cached
    offsets, _ = neighbor_offsets(len(spatial), strides, kernel_size)
    row_major = [math.prod(spatial[j + 1:]) for j in range(len(spatial))]
    constants = (
        offsets.to(device),
        torch.tensor(spatial, dtype=torch.long, device=device),
        torch.tensor(row_major, dtype=torch.long, device=device),
    )
    if not torch.compiler.is_compiling():
        if len(_INDEX_CACHE) >= 256:
            _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = constants
    return constants


def _neighbor_index(
    spatial: tuple[int, ...],
    strides: tuple[int, ...],
    kernel_size: int,
    points: Tensor,
) -> tuple[Tensor, Tensor]:
    """Flat neighbor indices ``(..., P, K)`` (0 where invalid) and their validity mask."""
    offsets, sizes, row_major = _index_constants(spatial, strides, kernel_size, points.device)
    # Row-major unravel of the query points: coords (..., P, d).
    coords = []
    rem = points
    for n in reversed(spatial):
        coords.append(rem % n)
        rem = torch.div(rem, n, rounding_mode="floor")
    coords = torch.stack(coords[::-1], dim=-1)
    nb = coords.unsqueeze(-2) + offsets  # (..., P, K, d)
    valid = ((nb >= 0) & (nb < sizes)).all(dim=-1)
    flat = (nb.clamp(min=0) * row_major).sum(-1)
    flat = torch.where(valid, flat, torch.zeros_like(flat))
    return flat, valid


def _gather(x_pts: Tensor, index: Tensor) -> Tensor:
    """Rows of ``x_pts`` ``(B, N, C)`` / ``(B, N)`` at ``index`` ``(P, K)`` / ``(B, P, K)``."""
    batch = x_pts.shape[0]
    if index.dim() == 2:  # shared across the batch
        index = index.unsqueeze(0).expand(batch, *index.shape)
    idx = index.reshape(batch, -1)
    if x_pts.dim() == 3:
        out = torch.gather(x_pts, 1, idx.unsqueeze(-1).expand(-1, -1, x_pts.shape[-1]))
        return out.reshape(*index.shape, x_pts.shape[-1])
    return torch.gather(x_pts, 1, idx).reshape(index.shape)


def gather_points(
    x: Tensor, points: Tensor, grid_shape: Sequence[int] | None = None
) -> Tensor:
    """The representation at the query points, ``(B, P, C)``.

    Use it to read a layer's features at the same points a :class:`Neighbors` result was built for.

    Args:
        x: ``(B, C, *spatial)`` or ``(B, L, C)`` with ``grid_shape``.
        points: flat indices ``(P,)`` or ``(B, P)`` (e.g. ``Neighbors.points``).
        grid_shape: the token grid, for sequence inputs.

    Returns:
        ``(B, P, C)``.

    Example:
        >>> x = torch.arange(8.).reshape(1, 2, 2, 2)
        >>> gather_points(x, torch.tensor([0, 3])).tolist()
        [[[0.0, 4.0], [3.0, 7.0]]]
    """
    x_pts = _layout.to_points(x, _layout.describe(x, grid_shape, name="x"))
    if points.dim() == 1:
        return x_pts[:, points]
    return _gather(x_pts, points.unsqueeze(-1)).squeeze(-2)


def _extract(
    x_pts: Tensor,
    spatial: tuple[int, ...],
    strides: Sequence[int] | int,
    kernel_size: int,
    points: PointsSpec,
    generator: torch.Generator | None,
    allow_empty: bool,
) -> Neighbors:
    strides, kernel_size = _validate_strides_kernel(strides, kernel_size)
    _check_reachable(spatial, strides, allow_empty)
    batch, num = x_pts.shape[0], x_pts.shape[1]
    pts = _resolve_points(points, num, batch, x_pts.device, generator)
    index, valid = _neighbor_index(spatial, strides, kernel_size, pts)
    values = _gather(x_pts, index)
    mask = valid if valid.dim() == 3 else valid.unsqueeze(0).expand(batch, *valid.shape)
    m = mask.unsqueeze(-1) if values.dim() == 4 else mask
    values = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device))
    # stride-major slots (B, P, S * K_s[, C]) -> (B, P, S, K_s[, C]): a view, no copy
    split = (len(strides), mask.shape[-1] // len(strides))
    return Neighbors(values.unflatten(2, split), mask.unflatten(2, split), pts, strides)


def neighbors(
    x: Tensor,
    strides: Sequence[int] | int = (1,),
    kernel_size: int = 3,
    grid_shape: Sequence[int] | None = None,
    *,
    points: PointsSpec = None,
    generator: torch.Generator | None = None,
    allow_empty: bool = False,
) -> Neighbors:
    r"""Multi-stride neighbor values of every (or some) grid point, with a validity mask.

    ``values[b, p, s, k] = x[b, :, q_p + o_{s,k}]`` where ``q_p`` is query point ``p`` and
    ``o_{s,k}`` the ``k``-th offset of stride ``s`` (see :func:`neighbor_offsets`);
    ``mask[b, p, s, k]`` says whether ``q_p + o_{s,k}`` is inside the grid. Gradients flow from
    ``values`` into ``x`` (detach the input for a stop-gradient target, or use
    :class:`FeatureNeighborhood`).

    Args:
        x: floating ``(B, C, *spatial)`` with 1-3 spatial dims, or ``(B, L, C)`` with
            ``grid_shape``.
        strides: the dilations, e.g. ``(1, 2, 3)``.
        kernel_size: odd ``k >= 3``.
        grid_shape: ``(h, w)`` / ``(t, h, w)`` / ``(L,)`` for token sequences.
        points: ``None`` (all), a count (random subset) or flat indices ``(P,)`` / ``(B, P)``.
        generator: random source for ``points=int``.
        allow_empty: allow a stride that leaves no neighbor in the grid (all-False mask for it)
            instead of raising.

    Returns:
        :class:`Neighbors` with ``values (B, P, S, K_s, C)``, ``mask (B, P, S, K_s)``,
            ``points`` and ``strides``.

    Raises:
        ShapeError: wrong rank, or ``grid_shape`` not matching ``L``.
        DTypeError: integer input (use :func:`token_neighbors`).
        ValueRangeError: even/small kernel, non-positive or unreachable stride, bad ``points``.

    Example:
        >>> img = torch.randn(4, 3, 16, 16)
        >>> nb = neighbors(img, strides=(1, 2, 3))
        >>> nb.values.shape, nb.mask.shape
        (torch.Size([4, 256, 3, 8, 3]), torch.Size([4, 256, 3, 8]))
        >>> nb.mask[0, 0].sum(-1).tolist()  # a corner sees 3 neighbors per stride
        [3, 3, 3]
    """
    check_floating(x, "x")
    lay = _layout.describe(x, grid_shape, name="x")
    return _extract(
        _layout.to_points(x, lay), lay.grid, strides, kernel_size, points, generator, allow_empty
    )


def token_neighbors(
    ids: Tensor,
    strides: Sequence[int] | int = (1,),
    kernel_size: int = 3,
    grid_shape: Sequence[int] | None = None,
    *,
    points: PointsSpec = None,
    generator: torch.Generator | None = None,
    allow_empty: bool = False,
) -> Neighbors:
    """Multi-stride neighbor *token ids* of every (or some) grid point.

    Args:
        ids: integer ``(B, *spatial)`` with 1-3 spatial dims, or ``(B, L)`` with ``grid_shape``.
        strides, kernel_size, points, generator, allow_empty: as in :func:`neighbors`.
        grid_shape: ``(h, w)`` etc. for flat sequences ``(B, L)``.

    Returns:
        :class:`Neighbors` with ``values (B, P, S, K_s)`` long (0 in masked slots) and
            ``mask (B, P, S, K_s)``.

    Example:
        >>> ids = torch.arange(9).reshape(1, 3, 3)
        >>> nb = token_neighbors(ids, points=torch.tensor([4]))
        >>> nb.values[0, 0, 0].tolist()
        [0, 1, 2, 3, 5, 6, 7, 8]
    """
    check_integer(ids, "ids")
    x_pts, spatial = _layout.ids_to_points(ids, grid_shape)
    return _extract(x_pts.long(), spatial, strides, kernel_size, points, generator, allow_empty)


class _NeighborhoodModule(nn.Module):
    def __init__(
        self,
        strides: Sequence[int] | int = (1,),
        kernel_size: int = 3,
        grid_shape: Sequence[int] | None = None,
        allow_empty: bool = False,
    ) -> None:
        super().__init__()
        self.strides, self.kernel_size = _validate_strides_kernel(strides, kernel_size)
        self.grid_shape = tuple(grid_shape) if grid_shape is not None else None
        self.allow_empty = allow_empty

    def extra_repr(self) -> str:
        """The options shown in ``repr(module)``."""
        g = f", grid_shape={self.grid_shape}" if self.grid_shape else ""
        return f"strides={self.strides}, kernel_size={self.kernel_size}{g}"


class PixelNeighborhood(_NeighborhoodModule):
    """Context of the clean signal (pixels or latents) around each point.

    A thin module over :func:`neighbors`; the target signal carries no gradient by nature.

    Args:
        strides: the dilations, e.g. ``(1, 2, 3)``.
        kernel_size: odd ``k >= 3``.
        grid_shape: token grid of ``(B, L, C)`` inputs.
        allow_empty: allow a stride with no neighbor in the grid (all-False mask).

    Shape:
        - input: ``(B, C, *spatial)`` or ``(B, L, C)`` with ``grid_shape``
        - output: :class:`Neighbors` with ``values (B, P, S, K_s, C)``, ``mask (B, P, S, K_s)``

    Example:
        >>> nb = PixelNeighborhood(strides=(1, 2))(torch.randn(2, 3, 8, 8))
        >>> nb.values.shape
        torch.Size([2, 64, 2, 8, 3])
    """

    def forward(
        self, x: Tensor, points: PointsSpec = None, generator: torch.Generator | None = None
    ) -> Neighbors:
        """Neighbors of ``x`` ``(B, C, *spatial)`` (``(B, L, C)`` with ``grid_shape``) at the
        query ``points`` (``None``: all; a count drawn with ``generator``; or indices ``(P,)`` /
        ``(B, P)``): :class:`Neighbors` with ``values (B, P, S, K_s, C)`` and ``mask (B, P, S,
        K_s)``, as in the class example."""
        return neighbors(
            x, self.strides, self.kernel_size, self.grid_shape,
            points=points, generator=generator, allow_empty=self.allow_empty,
        )


FeatureNorm = Literal["instance", "batch", "none"]
_FEATURE_NORMS = ("instance", "batch", "none")


def standardize_features(
    x: Tensor, mode: FeatureNorm = "instance", token_layout: bool = False, eps: float = 1e-5
) -> Tensor:
    r"""Per-channel standardization without affine parameters (the feature context's scale-free
    space).

    ``"instance"``: :math:`(x - \mu_{b,c}) / \sqrt{\sigma^2_{b,c} + \epsilon}` with the mean
    and variance of each sample ``b`` and channel ``c`` over the grid; ``"batch"``: statistics
    over the batch and the grid per channel; ``"none"``: ``x`` unchanged. Differentiable (the
    statistics are not detached).

    Args:
        x: ``(B, C, *spatial)``, or ``(B, L, C)`` with ``token_layout=True``.
        mode: ``"instance"``, ``"batch"`` or ``"none"``.
        token_layout: ``x`` is ``(B, L, C)`` (the grid is axis 1).
        eps: added to the variance.

    Example:
        >>> x = 5 + 3 * torch.randn(2, 4, 8, 8)
        >>> y = standardize_features(x)
        >>> bool(y.mean((2, 3)).abs().max() < 1e-5)
        True
        >>> bool((y.var((2, 3), unbiased=False) - 1).abs().max() < 1e-3)
        True
        >>> torch.allclose(standardize_features(7 * x + 2), y, atol=1e-4)
        True
    """
    if mode not in _FEATURE_NORMS:
        raise ValueRangeError(
            f"feature normalization must be one of {_FEATURE_NORMS}, got {mode!r}"
        )
    if mode == "none":
        return x
    if token_layout:
        dims: tuple[int, ...] = (1,) if mode == "instance" else (0, 1)
    else:
        grid = tuple(range(2, x.dim()))
        dims = grid if mode == "instance" else (0, *grid)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 at least, float64 kept
    var, mean = torch.var_mean(xf, dim=dims, keepdim=True, correction=0)
    return ((xf - mean) * torch.rsqrt(var + eps)).to(x.dtype)


class FeatureNeighborhood(_NeighborhoodModule):
    """Context of a *feature map* of the network itself (feature context), at several strides.

    The same extraction as :class:`PixelNeighborhood`, but the target is detached by default
    (stop-gradient): otherwise constant features satisfy the loss trivially. ``detach=False``
    keeps gradients, explicitly. (Named ``MultiStrideNeighborhood`` in 0.1; that name is a
    deprecated alias.)

    **Scale-free by default** (``normalize="instance"``): the target features are standardized
    per sample and channel over the grid (:func:`standardize_features`) before their neighbors
    are taken, and :class:`~ctxpred.ContextPredictionLoss` feeds the head the same standardized
    features (with gradient) as its input. Growing or shrinking the features then changes
    neither the target nor the head's input, and a component that is constant over the grid (a
    per-sample bias such as a timestep embedding) is removed from both, so the backbone cannot
    lower the loss by inflating it: the raw feature context runs away (see the method page,
    "Feature context"). ``normalize="batch"`` uses batch statistics per channel (it leaves the
    per-sample constant in, which lets features collapse onto it); ``"none"`` is the raw 0.1
    behaviour.

    Args:
        strides: the dilations.
        kernel_size: odd ``k >= 3``.
        grid_shape: token grid of ``(B, L, C)`` inputs.
        allow_empty: allow a stride with no neighbor in the grid (all-False mask).
        detach: stop the gradient into the target features.
        normalize: ``"instance"`` (default), ``"batch"`` or ``"none"``, see above.

    Shape:
        - input: ``(B, C, *spatial)`` or ``(B, L, C)`` with ``grid_shape``
        - output: :class:`Neighbors` with ``values (B, P, S, K_s, C)``, ``mask (B, P, S, K_s)``

    Example:
        >>> feat = torch.randn(2, 16, 8, 8, requires_grad=True)
        >>> nb = FeatureNeighborhood(strides=(1, 2, 3))(feat)
        >>> nb.values.shape, nb.values.requires_grad
        (torch.Size([2, 64, 3, 8, 16]), False)
        >>> torch.allclose(FeatureNeighborhood()(10 * feat).values, nb.values, atol=1e-4)
        True
    """

    def __init__(
        self,
        strides: Sequence[int] | int = (1, 2, 3),
        kernel_size: int = 3,
        grid_shape: Sequence[int] | None = None,
        allow_empty: bool = False,
        detach: bool = True,
        normalize: FeatureNorm = "instance",
    ) -> None:
        super().__init__(strides, kernel_size, grid_shape, allow_empty)
        if normalize not in _FEATURE_NORMS:
            raise ValueRangeError(
                f"normalize must be one of {_FEATURE_NORMS}, got {normalize!r}"
            )
        self.detach = detach
        self.normalize = normalize

    def prediction_space(self, x: Tensor) -> Tensor:
        """The features as the head reads them: :func:`standardize_features` of ``x`` with this
        neighborhood's ``normalize`` (differentiable; ``x`` in the neighborhood's layout)."""
        return standardize_features(x, self.normalize, token_layout=self.grid_shape is not None)

    def forward(
        self, x: Tensor, points: PointsSpec = None, generator: torch.Generator | None = None
    ) -> Neighbors:
        """Neighbors of the features ``x`` ``(B, C, *spatial)`` (``(B, L, C)`` with
        ``grid_shape``) at the query ``points`` (``None``: all; a count drawn with
        ``generator``; or indices ``(P,)`` / ``(B, P)``): :class:`Neighbors` with ``values
        (B, P, S, K_s, C)`` and ``mask (B, P, S, K_s)``, detached unless ``detach=False``,
        standardized by ``normalize``."""
        x = x.detach() if self.detach else x
        return neighbors(
            self.prediction_space(x), self.strides, self.kernel_size, self.grid_shape,
            points=points, generator=generator, allow_empty=self.allow_empty,
        )

    def extra_repr(self) -> str:
        """The options shown in ``repr(module)``."""
        return f"{super().extra_repr()}, detach={self.detach}, normalize={self.normalize!r}"


class TokenNeighborhood(_NeighborhoodModule):
    """Neighbor token ids around each point, optionally looked up in a codebook.

    Args:
        strides: the dilations, e.g. ``(1, 2)``.
        kernel_size: odd ``k >= 3``.
        grid_shape: token grid of ``(B, L)`` id sequences, e.g. ``(h, w)`` with ``h * w = L``.
        allow_empty: allow a stride with no neighbor in the grid (all-False mask).
        codebook: optional ``(V, C)`` embedding; if given, ``forward`` also returns the
            neighbor embeddings as ``values (B, P, S, K_s, C)`` (the ids stay available via
            :meth:`ids`). Stored as a buffer (not trained); pass an ``nn.Embedding``'s weight
            and call :meth:`set_codebook` to refresh it.

    Shape:
        - input: integer ``(B, *spatial)`` or ``(B, L)`` with ``grid_shape``
        - output: :class:`Neighbors`, ``values (B, P, S, K_s)`` long, or
          ``(B, P, S, K_s, C)`` with a codebook

    Example:
        >>> ids = torch.randint(0, 17, (2, 8, 8))
        >>> TokenNeighborhood(strides=(1, 2))(ids).values.shape
        torch.Size([2, 64, 2, 8])
        >>> TokenNeighborhood(codebook=torch.randn(17, 4))(ids).values.shape
        torch.Size([2, 64, 1, 8, 4])
    """

    codebook: Tensor | None

    def __init__(
        self,
        strides: Sequence[int] | int = (1,),
        kernel_size: int = 3,
        grid_shape: Sequence[int] | None = None,
        allow_empty: bool = False,
        codebook: Tensor | None = None,
    ) -> None:
        super().__init__(strides, kernel_size, grid_shape, allow_empty)
        self.register_buffer("codebook", None)
        if codebook is not None:
            self.set_codebook(codebook)

    def set_codebook(self, codebook: Tensor) -> None:
        """Replace the codebook ``(V, C)`` (detached copy)."""
        check_floating(codebook, "codebook")
        if codebook.dim() != 2:
            raise ShapeError(f"codebook must be (V, C), got shape {tuple(codebook.shape)}")
        self.codebook = codebook.detach().clone()

    def ids(
        self, ids: Tensor, points: PointsSpec = None, generator: torch.Generator | None = None
    ) -> Neighbors:
        """Neighbor ids ``(B, P, S, K_s)`` regardless of the codebook."""
        return token_neighbors(
            ids, self.strides, self.kernel_size, self.grid_shape,
            points=points, generator=generator, allow_empty=self.allow_empty,
        )

    def forward(
        self, ids: Tensor, points: PointsSpec = None, generator: torch.Generator | None = None
    ) -> Neighbors:
        """Neighbors of token ``ids`` ``(B, *grid)`` (or ``(B, L)`` with ``grid_shape``) at the
        query ``points``: :meth:`ids`, then, with a codebook ``(V, D)``, each id's embedding:
        ``values (B, P, S, K_s, D)`` (0 on masked slots), ``mask (B, P, S, K_s)``."""
        nb = self.ids(ids, points, generator)
        if self.codebook is None:
            return nb
        vocab = self.codebook.shape[0]
        if nb.values.device.type != "meta":  # a clamped id would read another token's entry
            _value_check((((nb.values >= 0) & (nb.values < vocab)) | ~nb.mask).all(),
                         f"TokenNeighborhood: token ids must lie in [0, {vocab}) (the codebook's "
                         f"rows), got ids outside it", ValueRangeError)
        emb = self.codebook[nb.values.clamp(0, vocab - 1)]
        emb = emb * nb.mask.unsqueeze(-1).to(emb.dtype)
        return nb._replace(values=emb)


__getattr__ = deprecated_names(__name__, {
    "Neighborhood": ("ctxpred.neighborhoods", "Neighbors"),
    "MultiStrideNeighborhood": ("ctxpred.neighborhoods", "FeatureNeighborhood"),
})
