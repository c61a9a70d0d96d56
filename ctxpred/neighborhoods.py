r"""Neighborhood extractors: gather each point's multi-stride context and its validity mask.

For a point :math:`i` of a ``d``-dimensional grid, a stride :math:`s` and an odd kernel size
:math:`k`, the :math:`s`-stride neighborhood is

.. math::
    N_i^s = \{\, i + s\,\delta \;:\; \delta \in \{-\tfrac{k-1}{2},\dots,\tfrac{k-1}{2}\}^d
    \setminus \{0\} \,\}

(for ``k=3`` in 2-D: the 8 positions of a 3x3 ring dilated by ``s``). Multi-stride context is the
concatenation over ``strides``. Neighbors outside the grid are *masked out*, never zero-padded
into the target: their slot in ``values`` holds zeros **and** ``mask`` is ``False``.

Slot order (the ``K`` axis) is *stride-major*: all offsets of ``strides[0]``, then of
``strides[1]``, ...; within a stride, offsets in row-major (lexicographic) order of ``delta`` with
the centre removed. ``K = len(strides) * (kernel_size**d - 1)``.

Layouts accepted:

* channels-first maps ``(B, C, *spatial)`` with 1, 2 or 3 spatial dims (images, feature maps,
  volumes/videos), any memory format (``channels_last`` included);
* token sequences ``(B, L, C)`` when ``grid_shape=(h, w)`` (or ``(t, h, w)``, or ``(L,)``) is given
  and ``prod(grid_shape) == L`` (DiT / ViT tokens, row-major).

Points are numbered by their row-major flat index in the grid. ``points`` selects which query points
to evaluate: ``None`` (all ``P = prod(spatial)``), an ``int`` (a uniform random subset of that many
points, drawn on the device with an optional ``generator``), or a long tensor of flat indices,
shape ``(P,)`` (shared by the batch) or ``(B, P)`` (one set per sample).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ctxpred.errors import (
    ShapeError,
    ValueRangeError,
    check_floating,
    check_integer,
)

__all__ = [
    "MultiStrideNeighborhood",
    "Neighborhood",
    "PixelNeighborhood",
    "TokenNeighborhood",
    "gather_points",
    "neighbor_offsets",
    "neighbors",
    "token_neighbors",
]

PointsSpec = int | Tensor | None


class Neighborhood(NamedTuple):
    """What an extractor returns.

    Attributes:
        values: neighbor values ``(B, P, K, C)`` (floats), or neighbor token ids ``(B, P, K)``
            (long) from :func:`token_neighbors`. Masked slots hold 0.
        mask: ``(B, P, K)`` bool, ``True`` where the neighbor lies inside the grid.
        stride_index: ``(K,)`` long; slot ``k`` belongs to ``strides[stride_index[k]]``.
        points: flat row-major indices of the query points, ``(P,)`` or ``(B, P)``.
        strides: the strides, in slot order.
    """

    values: Tensor
    mask: Tensor
    stride_index: Tensor
    points: Tensor
    strides: tuple[int, ...]


def _validate_strides_kernel(
    strides: Sequence[int] | int, kernel_size: int
) -> tuple[tuple[int, ...], int]:
    if isinstance(strides, int):
        strides = (strides,)
    strides = tuple(strides)
    if len(strides) == 0:
        raise ValueRangeError("strides must name at least one stride, got ()")
    for s in strides:
        if isinstance(s, bool) or not isinstance(s, int) or s <= 0:
            raise ValueRangeError(f"every stride must be a positive int, got strides={strides}")
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


def _to_points_last(
    x: Tensor, grid_shape: Sequence[int] | None, name: str
) -> tuple[Tensor, tuple[int, ...]]:
    """``x`` as ``(B, P, C)`` (or ``(B, P)`` for ids) plus the spatial shape."""
    if grid_shape is not None:
        grid_shape = tuple(int(g) for g in grid_shape)
        if len(grid_shape) not in (1, 2, 3) or any(g <= 0 for g in grid_shape):
            raise ShapeError(
                f"grid_shape must be 1 to 3 positive sizes, e.g. (h, w), got {grid_shape}"
            )
        if x.dim() != 3:
            raise ShapeError(
                f"{name} with grid_shape must be a token sequence (B, L, C), "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != math.prod(grid_shape):
            raise ShapeError(
                f"grid_shape {grid_shape} has {math.prod(grid_shape)} points but {name} "
                f"(B, L, C) = {tuple(x.shape)} has L = {x.shape[1]}"
            )
        return x, grid_shape
    if x.dim() not in (3, 4, 5):
        raise ShapeError(
            f"{name} must be channels-first (B, C, *spatial) with 1-3 spatial dims (rank 3-5), "
            f"or (B, L, C) with grid_shape=...; got shape {tuple(x.shape)} (rank {x.dim()})"
        )
    spatial = tuple(x.shape[2:])
    # (B, C, *spatial) -> (B, P, C); for a channels_last input this is a view.
    return x.flatten(2).transpose(1, 2), spatial


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
    return points.to(device=device, dtype=torch.long)


def _neighbor_index(
    spatial: tuple[int, ...],
    strides: tuple[int, ...],
    kernel_size: int,
    points: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Flat neighbor indices ``(..., P, K)`` (0 where invalid), mask, and stride_index."""
    offsets, stride_index = neighbor_offsets(len(spatial), strides, kernel_size)
    device = points.device
    offsets = offsets.to(device)
    sizes = torch.tensor(spatial, dtype=torch.long, device=device)
    # Row-major unravel of the query points: coords (..., P, d).
    coords = []
    rem = points
    for n in reversed(spatial):
        coords.append(rem % n)
        rem = torch.div(rem, n, rounding_mode="floor")
    coords = torch.stack(coords[::-1], dim=-1)
    nb = coords.unsqueeze(-2) + offsets  # (..., P, K, d)
    valid = ((nb >= 0) & (nb < sizes)).all(dim=-1)
    strides_rm = torch.tensor(
        [math.prod(spatial[j + 1 :]) for j in range(len(spatial))], dtype=torch.long, device=device
    )
    flat = (nb.clamp(min=0) * strides_rm).sum(-1)
    flat = torch.where(valid, flat, torch.zeros_like(flat))
    return flat, valid, stride_index.to(device)


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

    Use it to read a layer's features at the same points a :class:`Neighborhood` was built for.

    Args:
        x: ``(B, C, *spatial)`` or ``(B, L, C)`` with ``grid_shape``.
        points: flat indices ``(P,)`` or ``(B, P)`` (e.g. ``Neighborhood.points``).
        grid_shape: the token grid, for sequence inputs.

    Returns:
        ``(B, P, C)``.

    Example:
        >>> x = torch.arange(8.).reshape(1, 2, 2, 2)
        >>> gather_points(x, torch.tensor([0, 3])).tolist()
        [[[0.0, 4.0], [3.0, 7.0]]]
    """
    x_pts, _ = _to_points_last(x, grid_shape, "x")
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
) -> Neighborhood:
    strides, kernel_size = _validate_strides_kernel(strides, kernel_size)
    _check_reachable(spatial, strides, allow_empty)
    batch, num = x_pts.shape[0], x_pts.shape[1]
    pts = _resolve_points(points, num, batch, x_pts.device, generator)
    index, valid, stride_index = _neighbor_index(spatial, strides, kernel_size, pts)
    values = _gather(x_pts, index)
    mask = valid if valid.dim() == 3 else valid.unsqueeze(0).expand(batch, *valid.shape)
    m = mask.unsqueeze(-1) if values.dim() == 4 else mask
    values = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return Neighborhood(values, mask, stride_index, pts, strides)


def neighbors(
    x: Tensor,
    strides: Sequence[int] | int = (1,),
    kernel_size: int = 3,
    grid_shape: Sequence[int] | None = None,
    *,
    points: PointsSpec = None,
    generator: torch.Generator | None = None,
    allow_empty: bool = False,
) -> Neighborhood:
    r"""Multi-stride neighbor values of every (or some) grid point, with a validity mask.

    ``values[b, p, k] = x[b, :, q_p + o_k]`` where ``q_p`` is query point ``p`` and ``o_k`` the
    ``k``-th offset (see :func:`neighbor_offsets`); ``mask[b, p, k]`` says whether
    ``q_p + o_k`` is inside the grid. Gradients flow from ``values`` into ``x`` (detach the input
    for a stop-gradient target, or use :class:`MultiStrideNeighborhood`).

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
        :class:`Neighborhood` with ``values (B, P, K, C)``, ``mask (B, P, K)``,
        ``stride_index (K,)`` and ``points``.

    Raises:
        ShapeError: wrong rank, or ``grid_shape`` not matching ``L``.
        DTypeError: integer input (use :func:`token_neighbors`).
        ValueRangeError: even/small kernel, non-positive or unreachable stride, bad ``points``.

    Example:
        >>> img = torch.randn(4, 3, 16, 16)
        >>> nb = neighbors(img, strides=(1, 2, 3))
        >>> nb.values.shape, nb.mask.shape, nb.stride_index.shape
        (torch.Size([4, 256, 24, 3]), torch.Size([4, 256, 24]), torch.Size([24]))
        >>> int(nb.mask[0, 0].sum())  # a corner sees 3 neighbors per stride
        9
    """
    check_floating(x, "x")
    x_pts, spatial = _to_points_last(x, grid_shape, "x")
    return _extract(x_pts, spatial, strides, kernel_size, points, generator, allow_empty)


def token_neighbors(
    ids: Tensor,
    strides: Sequence[int] | int = (1,),
    kernel_size: int = 3,
    grid_shape: Sequence[int] | None = None,
    *,
    points: PointsSpec = None,
    generator: torch.Generator | None = None,
    allow_empty: bool = False,
) -> Neighborhood:
    """Multi-stride neighbor *token ids* of every (or some) grid point.

    Args:
        ids: integer ``(B, *spatial)`` with 1-3 spatial dims, or ``(B, L)`` with ``grid_shape``.
        strides, kernel_size, points, generator, allow_empty: as in :func:`neighbors`.
        grid_shape: ``(h, w)`` etc. for flat sequences ``(B, L)``.

    Returns:
        :class:`Neighborhood` with ``values (B, P, K)`` long (0 in masked slots) and
        ``mask (B, P, K)``.

    Example:
        >>> ids = torch.arange(9).reshape(1, 3, 3)
        >>> nb = token_neighbors(ids, points=torch.tensor([4]))
        >>> nb.values[0, 0].tolist()
        [0, 1, 2, 3, 5, 6, 7, 8]
    """
    check_integer(ids, "ids")
    if grid_shape is not None:
        if ids.dim() != 2:
            raise ShapeError(
                f"ids with grid_shape must be (B, L), got shape {tuple(ids.shape)}"
            )
        x_pts, spatial = _to_points_last(ids.unsqueeze(-1), grid_shape, "ids")
        x_pts = x_pts.squeeze(-1)
    else:
        if ids.dim() not in (2, 3, 4):
            raise ShapeError(
                f"ids must be (B, *spatial) with 1-3 spatial dims (rank 2-4), "
                f"got shape {tuple(ids.shape)} (rank {ids.dim()})"
            )
        spatial = tuple(ids.shape[1:])
        x_pts = ids.reshape(ids.shape[0], -1)
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
        g = f", grid_shape={self.grid_shape}" if self.grid_shape else ""
        return f"strides={self.strides}, kernel_size={self.kernel_size}{g}"


class PixelNeighborhood(_NeighborhoodModule):
    """Context of the clean signal (pixels or latents) around each point.

    A thin module over :func:`neighbors`; the target signal carries no gradient by nature.

    Shape:
        - input: ``(B, C, *spatial)`` or ``(B, L, C)`` with ``grid_shape``
        - output: :class:`Neighborhood` with ``values (B, P, K, C)``, ``mask (B, P, K)``

    Example:
        >>> nb = PixelNeighborhood(strides=(1, 2))(torch.randn(2, 3, 8, 8))
        >>> nb.values.shape
        torch.Size([2, 64, 16, 3])
    """

    def forward(
        self, x: Tensor, points: PointsSpec = None, generator: torch.Generator | None = None
    ) -> Neighborhood:
        return neighbors(
            x, self.strides, self.kernel_size, self.grid_shape,
            points=points, generator=generator, allow_empty=self.allow_empty,
        )


class MultiStrideNeighborhood(_NeighborhoodModule):
    """Context of a *feature map* of the network itself, at several strides.

    The target is detached by default (stop-gradient): otherwise constant features satisfy the
    loss trivially. ``detach=False`` keeps gradients, explicitly.

    Shape:
        - input: ``(B, C, *spatial)`` or ``(B, L, C)`` with ``grid_shape``
        - output: :class:`Neighborhood` with ``values (B, P, K, C)``, ``mask (B, P, K)``

    Example:
        >>> feat = torch.randn(2, 16, 8, 8, requires_grad=True)
        >>> nb = MultiStrideNeighborhood(strides=(1, 2, 3))(feat)
        >>> nb.values.shape, nb.values.requires_grad
        (torch.Size([2, 64, 24, 16]), False)
    """

    def __init__(
        self,
        strides: Sequence[int] | int = (1, 2, 3),
        kernel_size: int = 3,
        grid_shape: Sequence[int] | None = None,
        allow_empty: bool = False,
        detach: bool = True,
    ) -> None:
        super().__init__(strides, kernel_size, grid_shape, allow_empty)
        self.detach = detach

    def forward(
        self, x: Tensor, points: PointsSpec = None, generator: torch.Generator | None = None
    ) -> Neighborhood:
        return neighbors(
            x.detach() if self.detach else x, self.strides, self.kernel_size, self.grid_shape,
            points=points, generator=generator, allow_empty=self.allow_empty,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, detach={self.detach}"


class TokenNeighborhood(_NeighborhoodModule):
    """Neighbor token ids around each point, optionally looked up in a codebook.

    Args:
        strides, kernel_size, grid_shape, allow_empty: as in :func:`token_neighbors`.
        codebook: optional ``(V, C)`` embedding; if given, ``forward`` also returns the
            neighbor embeddings as ``values (B, P, K, C)`` (the ids stay available via
            :meth:`ids`). Stored as a buffer (not trained); pass an ``nn.Embedding``'s weight
            and call :meth:`set_codebook` to refresh it.

    Shape:
        - input: integer ``(B, *spatial)`` or ``(B, L)`` with ``grid_shape``
        - output: :class:`Neighborhood`, ``values (B, P, K)`` long, or ``(B, P, K, C)`` with a
          codebook

    Example:
        >>> ids = torch.randint(0, 17, (2, 8, 8))
        >>> TokenNeighborhood(strides=(1, 2))(ids).values.shape
        torch.Size([2, 64, 16])
        >>> TokenNeighborhood(codebook=torch.randn(17, 4))(ids).values.shape
        torch.Size([2, 64, 8, 4])
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
    ) -> Neighborhood:
        """Neighbor ids ``(B, P, K)`` regardless of the codebook."""
        return token_neighbors(
            ids, self.strides, self.kernel_size, self.grid_shape,
            points=points, generator=generator, allow_empty=self.allow_empty,
        )

    def forward(
        self, ids: Tensor, points: PointsSpec = None, generator: torch.Generator | None = None
    ) -> Neighborhood:
        nb = self.ids(ids, points, generator)
        if self.codebook is None:
            return nb
        vocab = self.codebook.shape[0]
        emb = self.codebook[nb.values.clamp(0, vocab - 1)]
        emb = emb * nb.mask.unsqueeze(-1).to(emb.dtype)
        return nb._replace(values=emb)
