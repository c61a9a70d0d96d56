r"""Exact small transport problems in one fused Triton kernel: one program per problem.

The device solvers of :mod:`ctxpred.wasserstein.exact` run *batched tensor operations*: every
step of their schedule is a handful of PyTorch operations over all problems, so on a GPU their
cost is kernel launches (``docs/results/launches.md``: ~280 operations for an unmasked 8x8
assignment, ~3.6k for the masked min-cost flow in eager mode). This module runs the whole solve
of a problem inside one program of one kernel instead: the ``(n, m)`` costs, duals and flow
live in registers, and the schedule is data-dependent per problem (a program stops when its
problem is solved) at no host cost.

Algorithm (per program): the primal-dual (Hungarian) method for the transportation problem with
integer supplies. Uniform weights on ``n_a`` valid rows and ``n_b`` valid columns, scaled by
:math:`n_a n_b / g` (:math:`g = \gcd(n_a, n_b)`), are row supplies :math:`n_b/g` and column
demands :math:`n_a/g`. Start: :math:`u_i = \min_j C_{ij}`, :math:`v_j = \min_i C_{ij} - u_i`
(dual feasible), no flow. Each round runs Dijkstra on reduced costs
:math:`r_{ij} = C_{ij} - u_i - v_j \ge 0` from every row with supply left (row -> column arcs
of length :math:`r_{ij}`, column -> row arcs of length 0 where flow runs, which complementary
slackness keeps tight) to the nearest column with demand left, at distance :math:`D^*`; duals move
by :math:`u_i \mathrel{+}= (D^* - d_i)^+`, :math:`v_j \mathrel{-}= (D^* - d_j)^+` over the scanned
nodes (reduced costs stay :math:`\ge 0`, the path becomes tight), and the bottleneck of the path
(source supply, sink demand, flow on its backward arcs: at least one unit) is pushed. When no
supply is left, the flow and the duals satisfy complementary slackness: the plan is optimal. At
most :math:`n_a n_b / g` rounds of at most ``m`` Dijkstra steps, each ``O(n m)`` register work.

Used by ``solver="triton"`` (:func:`~ctxpred.wasserstein.exact.exact_wasserstein`) on CUDA
tensors. With ``TRITON_INTERPRET=1`` set before ``triton`` is imported, the same program runs in
Triton's interpreter on CPU tensors instead (numpy, one program after another: slow, for tests),
so its results are checked on machines without a GPU (``tests/test_triton_solver.py``, which
also compiles it down to sm_80 / sm_90 cubins with Triton's real compiler). Every loop is
bounded, so NaN costs (``check_finite=False``) end in a NaN value, not a hang.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
from torch import Tensor

from ctxpred.errors import ShapeError, ValueRangeError
from ctxpred.wasserstein._validate import _is_compiling, rescale_costs

__all__ = ["TRITON_MAX_SIZE", "available", "triton_transport_plan"]

TRITON_MAX_SIZE = 32
"""Largest ``n`` and ``m`` the kernel takes (its ``(n, m)`` tiles live in registers)."""


def available() -> bool:
    """``True`` when the ``triton`` package can be imported (it ships with PyTorch's CUDA wheels
    on Linux)."""
    return importlib.util.find_spec("triton") is not None


def _kernel():
    """The kernel (importing ``triton`` on first use, not with ctxpred)."""
    from ctxpred.wasserstein._triton_kernel import flow_kernel

    return flow_kernel


def interpreting() -> bool:
    """``True`` when Triton runs kernels in its interpreter (``TRITON_INTERPRET=1`` set before
    ``triton`` was imported): CPU tensors only, numpy, slow -- how the tests check the program
    on machines without a GPU."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kernel(), InterpretedFunction)


def num_warps(br: int, bc: int) -> int:
    """Warps per program for ``(br, bc)`` tiles: about 64 tile elements per warp (2 per thread).
    A guess, not a measurement (no GPU has run the kernel): compiled for sm_90 (triton 3.9), a
    32 x 32 tile fits in registers with 2, 4 or 8 warps too and spills only with 1, and fewer
    warps mean fewer cross-warp barriers in the reductions -- tune on a GPU."""
    return max(1, min(16, br * bc // 64))


def _block(size: int) -> int:
    return max(2, 1 << max(size - 1, 0).bit_length())


@torch.no_grad()
def triton_transport_plan(cost: Tensor, row_valid: Tensor | None = None,
                          col_valid: Tensor | None = None) -> Tensor:
    r"""Optimal plans between uniform weights on valid rows and valid columns, one Triton program
    per problem (see the module docstring for the algorithm).

    Same contract as :func:`~ctxpred.wasserstein.exact.transport_plan`: row sums
    :math:`1/n_a` on the ``n_a`` valid rows, column sums :math:`1/n_b` on the ``n_b`` valid
    columns, 0 elsewhere and for empty problems.

    Args:
        cost: ``(B, n, m)`` finite costs (computed in float32), ``n, m <= 32``; a CUDA tensor
            (compiled kernel) or a CPU tensor (Triton's interpreter: slow, for tests).
        row_valid: ``(B, n)`` bool (default all valid).
        col_valid: ``(B, m)`` bool (default all valid).

    Returns:
        ``(B, n, m)`` plan in ``cost``'s dtype.

    Example:
        >>> import torch
        >>> from ctxpred.wasserstein._triton import available, triton_transport_plan
        >>> from ctxpred.wasserstein.exact import transport_plan
        >>> cost = torch.tensor([[[0.0, 4.0], [1.0, 1.0], [4.0, 0.0]]])
        >>> gpu = torch.cuda.is_available() and available()
        >>> plan = triton_transport_plan(cost.cuda()).cpu() if gpu else transport_plan(cost)
        >>> plan * 6  # the same plan as the batched solver's (which stands in without a GPU)
        tensor([[[2., 0.],
                 [1., 1.],
                 [0., 2.]]])
    """
    if not available():
        raise ModuleNotFoundError(
            "solver='triton' needs the triton package (it ships with PyTorch's CUDA wheels on "
            "Linux; or pip install triton)"
        )
    if _is_compiling():
        raise ValueRangeError(
            "solver='triton' runs in eager mode (under torch.compile it is untested: the kernel "
            "has not run on a GPU yet); use solver='auto' inside compiled code"
        )
    if cost.dim() != 3:
        raise ShapeError(f"cost must be (B, n, m), got shape {tuple(cost.shape)}")
    bsz, n, m = cost.shape
    if max(n, m) > TRITON_MAX_SIZE:
        raise ValueRangeError(
            f"solver='triton' takes at most {TRITON_MAX_SIZE} points per side, got N={n}, "
            f"M={m}; use solver='auto'"
        )
    device = cost.device
    expected = "cpu" if interpreting() else "cuda"
    if device.type != expected:
        raise ValueRangeError(
            f"solver='triton' runs on CUDA tensors (CPU tensors only in Triton's interpreter, "
            f"TRITON_INTERPRET=1), got a tensor on {device}"
            + (" while TRITON_INTERPRET=1 is set" if expected == "cpu" else "")
        )
    if row_valid is None:
        row_valid = torch.ones(bsz, n, dtype=torch.bool, device=device)
    if col_valid is None:
        col_valid = torch.ones(bsz, m, dtype=torch.bool, device=device)
    for name, mask, size in (("row_valid", row_valid, n), ("col_valid", col_valid, m)):
        if tuple(mask.shape) != (bsz, size) or mask.device != device:
            raise ShapeError(f"{name} must be ({bsz}, {size}) on {device} for cost "
                             f"{tuple(cost.shape)}, got {tuple(mask.shape)} on {mask.device}")
    plan = torch.empty(bsz, n, m, dtype=torch.float32, device=device)
    if plan.numel() == 0:
        return plan.to(cost.dtype)
    br, bc = _block(n), _block(m)
    kernel = _kernel()
    warps = num_warps(br, bc)
    # costs in [-1, 1] per problem (a power-of-two rescaling: the same plans): the kernel's
    # "unreachable" is 1e30, and costs near it had stopped the solve early, silently
    cost = rescale_costs(cost.detach(), row_valid, col_valid, host_checks=False)
    args = (cost.to(torch.float32).contiguous(), row_valid.to(torch.int8).contiguous(),
            col_valid.to(torch.int8).contiguous(), plan, n, m)
    # Triton launches on the current CUDA device: make it the tensors' (cuda:1 while cuda:0 is
    # current would read another device's memory).
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[(bsz,)](*args, BR=br, BC=bc, num_warps=warps)
    # whole units (small integers, exact in float32) -> weights, in the cost's dtype
    plan = plan.to(cost.dtype)
    return plan / plan.sum((1, 2), keepdim=True).clamp_min(1)
