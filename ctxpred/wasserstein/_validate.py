"""Shared input handling of the Wasserstein estimators (not public).

Every estimator goes through :func:`prepare`: it checks shapes and dtypes, flattens the batch
dimensions to one problem axis, normalizes the weights per problem, leaves autocast and moves the
points to the compute dtype (float32, or float64 when an input is float64).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from ctxpred.errors import DTypeError, ShapeError, ValueRangeError, check_floating

__all__ = ["Prepared", "float32_core", "pairwise_cost", "prepare", "restore", "segment_cost"]


class Prepared(NamedTuple):
    """Flattened, normalized problems.

    Attributes:
        x: ``(B, N, D)`` points, compute dtype.
        y: ``(B, M, D)`` points, compute dtype.
        a: ``(B, N)`` weights of ``x`` summing to 1 per non-empty problem (all zero when empty).
        b: ``(B, M)`` weights of ``y``, same convention.
        nonempty: ``(B,)`` bool, ``True`` where both sides carry mass.
        batch_shape: the caller's leading dimensions ``(...)``.
        out_dtype: dtype of the result (the caller's).
        weighted: ``True`` when the caller gave any weights.
    """

    x: Tensor
    y: Tensor
    a: Tensor
    b: Tensor
    nonempty: Tensor
    batch_shape: torch.Size
    out_dtype: torch.dtype
    weighted: bool


@contextlib.contextmanager
def float32_core(device: torch.device) -> Iterator[None]:
    """Disable autocast on ``device`` so the OT core runs in the dtype it was given."""
    device_type = device.type if device.type in {"cpu", "cuda", "xpu", "mps", "hpu"} else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def _normalize(w: Tensor | None, shape: tuple[int, int], like: Tensor) -> Tensor:
    if w is None:
        n = shape[1]
        return torch.full(shape, 1.0 / max(n, 1), dtype=like.dtype, device=like.device)
    w = w.detach().to(like.dtype).reshape(shape)
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total > 0, total, torch.ones_like(total))


def prepare(
    x: Tensor,
    y: Tensor,
    x_weights: Tensor | None,
    y_weights: Tensor | None,
    p: float,
    check_finite: bool,
) -> Prepared:
    """Validate and flatten ``x (..., N, D)``, ``y (..., M, D)`` and their optional weights."""
    check_floating(x, "x")
    check_floating(y, "y")
    if x.dim() < 2 or y.dim() < 2:
        raise ShapeError(
            f"x and y must have layout (..., N, D) and (..., M, D), got shapes {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    if x.shape[:-2] != y.shape[:-2] or x.shape[-1] != y.shape[-1]:
        raise ShapeError(
            f"x (..., N, D) and y (..., M, D) must share the batch dims (...) and D, got "
            f"x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    if x.device != y.device:
        raise ValueRangeError(f"x and y must be on one device, got {x.device} and {y.device}")
    if not (isinstance(p, (int, float)) and p >= 1):
        raise ValueRangeError(f"p must be a number >= 1, got {p!r}")
    batch_shape = x.shape[:-2]
    n, m, d = x.shape[-2], y.shape[-2], x.shape[-1]
    for w, name, pts, size in ((x_weights, "x_weights", "N", n), (y_weights, "y_weights", "M", m)):
        if w is None:
            continue
        if not isinstance(w, Tensor):
            raise DTypeError(f"{name} must be a torch.Tensor or None, got {type(w).__name__}")
        if w.is_complex():
            raise DTypeError(f"{name} must be real (float or bool), got dtype {w.dtype}")
        expected = (*batch_shape, size)
        if tuple(w.shape) != expected:
            raise ShapeError(
                f"{name} must have shape (..., {pts}) = {expected}, got {tuple(w.shape)}"
            )
    if check_finite:
        _check_finite(x, y, x_weights, y_weights)
    out_dtype = x.dtype
    compute = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    bsz = batch_shape.numel()
    xf = x.reshape(bsz, n, d).to(compute)
    yf = y.reshape(bsz, m, d).to(compute)
    a = _normalize(x_weights, (bsz, n), xf)
    b = _normalize(y_weights, (bsz, m), xf)
    nonempty = (a.sum(-1) > 0) & (b.sum(-1) > 0)
    weighted = x_weights is not None or y_weights is not None
    return Prepared(xf, yf, a, b, nonempty, batch_shape, out_dtype, weighted)


def _check_finite(
    x: Tensor, y: Tensor, x_weights: Tensor | None, y_weights: Tensor | None
) -> None:
    """One host sync: finite points, finite non-negative weights."""
    flags = [torch.isfinite(x).all(), torch.isfinite(y).all()]
    for w in (x_weights, y_weights):
        if w is not None:
            wf = w.detach().float()
            flags.append(torch.isfinite(wf).all() & (wf >= 0).all())
    ok = torch.stack(flags).cpu().tolist()
    if not (ok[0] and ok[1]):
        bad = "x" if not ok[0] else "y"
        raise ValueRangeError(
            f"{bad} contains NaN or Inf; expected finite points (pass check_finite=False to skip "
            "this check, which is one host sync)"
        )
    if not all(ok[2:]):
        raise ValueRangeError(
            "weights must be finite and non-negative (0 marks a masked-out point); got a "
            "negative, NaN or Inf weight"
        )


def restore(values: Tensor, prep: Prepared) -> Tensor:
    """Zero the empty problems and reshape ``(B,)`` back to the caller's ``(...)`` and dtype."""
    values = torch.where(prep.nonempty, values, torch.zeros_like(values))
    return values.reshape(prep.batch_shape).to(prep.out_dtype)


def pairwise_cost(x: Tensor, y: Tensor, p: float) -> Tensor:
    r"""Cost matrix ``(B, N, M)``: :math:`\|x_i - y_j\|^p` (squared Euclidean for ``p=2``).

    Uses the matmul expansion :math:`|x|^2 + |y|^2 - 2 x\cdot y` (clamped at 0); callers center
    the points first to keep the cancellation small. Meant for plans (no gradient needed).
    """
    x_sq = torch.linalg.vector_norm(x, dim=-1).square_().unsqueeze(-1)
    y_sq = torch.linalg.vector_norm(y, dim=-1).square_().unsqueeze(-2)
    sq = torch.baddbmm(x_sq + y_sq, x, y.transpose(-1, -2), alpha=-2.0) if x.dim() == 3 else (
        x_sq + y_sq - 2.0 * torch.matmul(x, y.transpose(-1, -2))
    )
    sq = sq.clamp_min_(0.0)
    if p == 2:
        return sq
    return sq.pow_(p / 2.0)


def segment_cost(diff: Tensor, p: float) -> Tensor:
    r""":math:`\|d\|^p` over the last axis of differences ``diff (..., D)``, safe to differentiate
    at ``d = 0`` (gradient 0 there, never NaN)."""
    sq = diff.pow(2).sum(-1)
    if p == 2:
        return sq
    positive = sq > 0
    safe = torch.where(positive, sq, torch.ones_like(sq))
    return torch.where(positive, safe.pow(p / 2.0), torch.zeros_like(sq))


def center(x: Tensor, y: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Subtract the ``b``-weighted mean of ``y`` from both sets (W is translation invariant)."""
    mean = (b.unsqueeze(-1) * y).sum(-2, keepdim=True)
    return x - mean, y - mean
