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

from ctxpred.errors import DTypeError, ShapeError, ValueRangeError, _all_finite, check_floating

__all__ = [
    "Prepared",
    "float32_core",
    "host_checks_free",
    "pairwise_cost",
    "plan_cost",
    "prefix_sum",
    "prepare",
    "restore",
    "segment_cost",
]


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
    flags = [_all_finite(x), _all_finite(y)]
    flags += [_all_finite(w, nonnegative=True) for w in (x_weights, y_weights) if w is not None]
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

    Up to ``D = 4``, and for every ``D`` when ``p != 2``, it sums squared coordinate differences
    (exact zeros between equal points); above, for ``p = 2``, it uses the matmul expansion
    :math:`|x|^2 + |y|^2 - 2 x\cdot y` (clamped at 0), and callers center the points first to
    keep the cancellation small. Works in place only where autograd does not
    need the intermediates (no gradient recorded), so it is safe to differentiate; at
    :math:`x_i = y_j` the gradient of ``p < 2`` is not finite (use :func:`plan_cost`, which is).
    """
    tracked = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    # few coordinates, or p != 2: sum of squared differences, one per axis. For p != 2 always:
    # the expansion leaves rounding noise of ~eps |x|^2 where x_i = y_j, which |.|^(p/2) (a
    # square root at p = 1) turns into ~sqrt(eps) |x| -- nonzero costs between equal points
    if 0 < x.shape[-1] <= _DIFF_MAX_D or (p != 2 and x.shape[-1] > 0):
        sq = _squared_differences(x, y, tracked)
        if p == 2:
            return sq
        return sq.pow(p / 2.0) if tracked else sq.pow_(p / 2.0)
    x_sq = torch.linalg.vector_norm(x, dim=-1).square().unsqueeze(-1)
    y_sq = torch.linalg.vector_norm(y, dim=-1).square().unsqueeze(-2)
    sq = torch.baddbmm(x_sq + y_sq, x, y.transpose(-1, -2), alpha=-2.0) if x.dim() == 3 else (
        x_sq + y_sq - 2.0 * torch.matmul(x, y.transpose(-1, -2))
    )
    sq = sq.clamp_min(0.0) if tracked else sq.clamp_min_(0.0)
    if p == 2:
        return sq
    return sq.pow(p / 2.0) if tracked else sq.pow_(p / 2.0)


_DIFF_MAX_D = 4  # pairwise_cost: coordinate-wise differences up to this dimension


def _squared_differences(x: Tensor, y: Tensor, tracked: bool) -> Tensor:
    r""":math:`\sum_d (x_{id} - y_{jd})^2` as ``(..., N, M)``, one coordinate at a time: for small
    ``D`` faster on CPUs than the matmul form (tiny batched GEMMs), and free of cancellation."""
    diff = x[..., :, None, 0] - y[..., None, :, 0]
    sq = diff.square()
    for d in range(1, x.shape[-1]):
        if tracked:
            diff = x[..., :, None, d] - y[..., None, :, d]
            sq = sq + diff.square()
        else:
            torch.sub(x[..., :, None, d], y[..., None, :, d], out=diff)
            sq.addcmul_(diff, diff)
    return sq


def segment_cost(diff: Tensor, p: float) -> Tensor:
    r""":math:`\|d\|^p` over the last axis of differences ``diff (..., D)``, safe to differentiate
    at ``d = 0`` (gradient 0 there, never NaN)."""
    sq = diff.pow(2).sum(-1)
    if p == 2:
        return sq
    return _safe_power(sq, p / 2.0)


def _safe_power(values: Tensor, exponent: float) -> Tensor:
    """``values ** exponent`` (``values >= 0``) with gradient 0 (not NaN) where ``values = 0``;
    NaN stays NaN (a test on ``values > 0`` would have turned a NaN point's cost into 0, a
    finite wrong value)."""
    zero = values == 0
    safe = torch.where(zero, torch.ones_like(values), values)
    return torch.where(zero, torch.zeros_like(values), safe.pow(exponent))


def simplex_scale(cost: Tensor, dims: tuple[int, ...] = (-1, -2)) -> Tensor:
    """The largest ``|cost|`` over ``dims`` (kept), 1 where that is 0 or not finite: POT's
    network simplex tests optimality with absolute tolerances, so costs of ~1e-12 came back
    2.6% above the optimum; a plan is optimal for ``cost / scale`` too, which is what it is
    given."""
    scale = cost.detach().abs().amax(dims, keepdim=True)
    return torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))


#: :func:`rescale_costs` leaves costs up to this magnitude as they are on a CPU: the exact
#: solvers' path lengths then stay far below their "unreachable" 1e30 in float32 and float64
SAFE_COST = 2.0**40


def rescale_costs(cost: Tensor, row_valid: Tensor | None, col_valid: Tensor | None,
                  host_checks: bool) -> Tensor:
    """``cost (B, n, m)`` divided per problem by the power of two :math:`2^k \\ge 1` just above
    its largest ``|cost|`` over the valid arcs (non-finite costs ignored), so that the solvers'
    costs stay within ``[-1, 1]`` or as they were, far below their "unreachable" ``1e30``:
    costs of ~1e31 (points ~3e15 apart) had given values off by 30-400%, silently. Dividing by a
    power of two is exact (the same plans); costs are never scaled up (the masked arcs' may be
    anything). With ``host_checks`` (a CPU) it is skipped when every ``|cost|`` is at most
    :data:`SAFE_COST` (the usual case: one read of the extremes); elsewhere always done (no
    host sync).

    Example:
        >>> import torch
        >>> rescale_costs(torch.tensor([[[3e31, -1e31]], [[0.5, 0.25]]]), None, None, False)
        tensor([[[ 0.7396, -0.2465]],
        <BLANKLINE>
                [[ 0.5000,  0.2500]]])
    """
    if cost.numel() == 0:
        return cost
    if host_checks:  # host: CPU eager only, where the read is free (no device queue)
        low, high = torch.aminmax(cost)
        if bool((low >= -SAFE_COST) & (high <= SAFE_COST)):  # NaN: rescale
            return cost
    size = cost.abs().nan_to_num_(0.0, 0.0, 0.0)
    if row_valid is not None:
        size.mul_(row_valid.unsqueeze(2))
    if col_valid is not None:
        size.mul_(col_valid.unsqueeze(1))
    top = size.amax((1, 2), keepdim=True).clamp_min_(1.0)
    return cost / top.log2_().ceil_().exp2_()


def _zero_value(x: Tensor, y: Tensor) -> Tensor:
    """``(B,)`` zeros, the value of problems with no points on a side, connected to ``x`` and
    ``y`` (zero gradients, not ``None``)."""
    return (x.sum((-1, -2)) + y.sum((-1, -2))) * 0.0


def weighted_mean(y: Tensor, b: Tensor) -> Tensor:
    """``(..., 1, D)`` the ``b``-weighted mean of ``y`` (weights summing to 1): one pass over
    ``y``, no temporary."""
    return torch.matmul(b.unsqueeze(-2), y)


def center(x: Tensor, y: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Subtract the ``b``-weighted mean of ``y`` from both sets (W is translation invariant)."""
    mean = weighted_mean(y, b)
    return x - mean, y - mean


def host_checks_free(device: torch.device) -> bool:
    """``True`` where reading a device value on the host costs nothing: a CPU tensor, eager mode.

    There "how many problems are left?" is a plain memory read (no queue to drain), so solvers may
    stop early and route problems; on accelerators, and while ``torch.compile`` traces, they run
    their fixed, data-independent schedules instead.
    """
    return device.type == "cpu" and not _is_compiling()


def prefix_sum(values: Tensor) -> Tensor:
    """Inclusive prefix sums along the last dimension, ``out[..., k] = sum_{l <= k} v[..., l]``,
    that also run under ``torch.use_deterministic_algorithms(True)`` off the CPU: CUDA has no
    deterministic kernel for a floating-point ``cumsum`` and raises there, so in that mode the
    sums are a product with a triangular matrix of ones (``values (..., n)``, any float dtype;
    ``n`` is small here: points per problem). Otherwise ``cumsum``.

    Example:
        >>> prefix_sum(torch.tensor([[0.25, 0.5, 0.25]]))
        tensor([[0.2500, 0.7500, 1.0000]])
    """
    if _float_cumsum_allowed(values.device):
        return values.cumsum(-1)
    n = values.shape[-1]
    upper = torch.ones(n, n, dtype=values.dtype, device=values.device).triu_()
    return torch.matmul(values, upper)


def _float_cumsum_allowed(device: torch.device) -> bool:
    """``False`` where a floating-point ``cumsum`` would raise: deterministic algorithms on,
    off the CPU."""
    return device.type == "cpu" or not torch.are_deterministic_algorithms_enabled()


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    check = getattr(compiler, "is_compiling", None)  # torch >= 2.3
    if check is None:  # pragma: no cover - torch 2.2
        from torch._dynamo import is_compiling as check
    return bool(check())


def plan_cost(plan: Tensor, x: Tensor, y: Tensor, p: float, cost: Tensor | None = None,
              mean: Tensor | None = None) -> Tensor:
    r""":math:`\sum_{ij} \pi_{ij} \|x_i - y_j\|^p` per problem with the plan ``(B, N, M)`` held
    fixed (the envelope gradient), differentiable in ``x (B, N, D)`` and ``y (B, M, D)``.

    For ``p=2`` the value comes from ``cost`` (the centered cost matrix, when given) and the
    gradient from :math:`2 (r_i (x_i - c) - (\pi (y - c))_i)`, one batched matmul, no
    ``(B, N, M, D)`` temporary; ``mean`` ``(B, 1, D)`` is the center :math:`c` when ``x`` and
    ``y`` are not centered already (then, on a CPU, the gradient goes in chunks of problems and
    allocates only itself). For other ``p`` the gradient is 0 (not NaN) where :math:`x_i = y_j`.
    """
    plan = plan.contiguous()
    if p == 2:
        if cost is None:
            cost = pairwise_cost(x.detach(), y.detach(), 2.0)
        return _PlanSquaredCost.apply(plan, cost, x, y, mean)
    if mean is not None:
        x, y = x - mean, y - mean
    # squared differences coordinate by coordinate (not the matmul expansion): exact zeros
    # between equal points, which |.|^(p/2) would otherwise lift to ~sqrt(eps) |x|
    tracked = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    return (plan * _safe_power(_squared_differences(x, y, tracked), p / 2.0)).sum((-1, -2))


# CPU: numbers per chunk of problems (1 MiB of float32, a core's L2 on the benchmark machine):
# 8-12% faster than 2^16 at D = 64 and 256 in interleaved A/B, equal at D = 3 and K = 24;
# 2^20 was 1.5x slower (its temporaries stop being reused)
CHUNK_ELEMENTS = 1 << 18


def chunk_size(problems: int, per_problem: int, device: torch.device) -> int:
    """Problems per chunk: on a CPU about :data:`CHUNK_ELEMENTS` numbers, so temporaries stay
    cache-resident and reuse memory (fresh full-size temporaries cost more in page faults than in
    arithmetic there); elsewhere all problems at once (one kernel each)."""
    if device.type != "cpu":
        return max(1, problems)
    return max(1, CHUNK_ELEMENTS // max(1, per_problem))


def _plan_gradient(plan: Tensor, a: Tensor, b: Tensor, mean: Tensor | None,
                   scale: Tensor) -> Tensor:
    """``scale * (rowsum(plan) * (a - c) - plan @ (b - c))`` for ``plan (B, N, M)``,
    ``a (B, N, D)``, ``b (B, M, D)``: in chunks, into one output tensor (out of place while
    autograd records, i.e. under ``create_graph=True``)."""
    if torch.is_grad_enabled():  # create_graph=True: out of place, differentiable
        if mean is not None:
            a, b = a - mean, b - mean
        return scale * (plan.sum(-1, keepdim=True) * a - torch.bmm(plan, b))
    bsz, n, m = plan.shape
    d = a.shape[-1]
    out = torch.empty_like(a)
    chunk = chunk_size(bsz, max(a[0].numel(), b[0].numel()), a.device)
    # CPU batched GEMMs with 1 < D < 8 columns take a slow path (D = 3 about 1.5x the time of
    # D = 8 on the benchmark machine): multiply by zero-padded 8 columns instead
    pad = _GEMM_PAD if a.device.type == "cpu" and 1 < d < _GEMM_PAD else d
    if pad != d:
        rows = min(chunk, bsz)
        padded_b = b.new_zeros(rows, m, pad)
        product = a.new_empty(rows, n, pad)
    for i in range(0, bsz, chunk):
        part, pa, pb = plan[i : i + chunk], a[i : i + chunk], b[i : i + chunk]
        k = part.shape[0]
        if mean is not None:
            pa, pb = pa - mean[i : i + chunk], pb - mean[i : i + chunk]
        if pad != d:  # (an assignment, not out=: torch.compile takes no non-contiguous out=)
            padded_b[:k, :, :d] = pb
            o = out[i : i + chunk].copy_(torch.bmm(part, padded_b[:k], out=product[:k])[..., :d])
        else:
            o = torch.bmm(part, pb, out=out[i : i + chunk])
        o.neg_().addcmul_(part.sum(-1, keepdim=True), pa).mul_(scale[i : i + chunk])
    return out


_GEMM_PAD = 8  # _plan_gradient: CPU GEMM column count to pad 1 < D < 8 to


class _PlanSquaredCost(torch.autograd.Function):
    """``<plan, C>`` per problem with the envelope gradient of the squared Euclidean cost."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, plan: Tensor, cost: Tensor, x: Tensor,
        y: Tensor, mean: Tensor | None
    ) -> Tensor:
        ctx.save_for_backward(plan, x, y, mean)
        return (plan * cost).sum((-1, -2))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor):  # type: ignore[override]
        plan, x, y, mean = ctx.saved_tensors
        scale = (2.0 * grad).view(-1, 1, 1)
        grad_x = grad_y = None
        if ctx.needs_input_grad[2]:
            grad_x = _plan_gradient(plan, x, y, mean, scale)
        if ctx.needs_input_grad[3]:
            grad_y = _plan_gradient(plan.transpose(1, 2), y, x, mean, scale)
        return None, None, grad_x, grad_y, None
