r"""Exact optimal transport: batched assignment solvers on the device (subset DP, Hungarian).

.. math::
    W_p^p(a, b) = \min_{\pi \in \Pi(a, b)} \sum_{ij} \pi_{ij}\, \|x_i - y_j\|^p

When both sets carry uniform weights on supports of equal size ``n`` (no weights and ``N == M``,
or 0/1 masks with the same number of valid points on each side, as in the context-prediction loss
when predicted samples are masked like their targets) the vertices of :math:`\Pi(a, b)` are
permutation matrices / n (Birkhoff), so OT is an *assignment problem*. :func:`assignment` solves
it exactly, all problems at once. For ``n <= 8`` it runs a dynamic program over column subsets
(:math:`D_k(S) = \min_{j \in S} D_{k-1}(S \setminus j) + C_{k-1,j}`: ``n`` vectorized levels,
``n 2^{n-1}`` candidate sums per problem, no data-dependent steps). Above, it runs Crouse's
shortest-augmenting-path algorithm (the one behind scipy's
``linear_sum_assignment``), vectorized over problems: phase ``r`` adds row ``r`` to the matching
with at most ``r + 1`` Dijkstra steps, so the solve is at most ``n(n+1)/2`` steps of
``(n, B)`` tensor operations — no Python loop over problems, finished problems masked. On an
accelerator the step count is fixed and data-independent (no host sync); on a CPU, where asking
"how many problems are still searching?" costs nothing, a phase works on the shrinking set of
problems still searching (compacted whenever half of them have finished) and stops when none
is. The
result is exact (the algorithm maintains dual feasibility; ties are broken arbitrarily). The plan
is found without autograd; the value is recomputed from the matched pairs, so its gradient is
the envelope gradient :math:`\partial W / \partial x_i = \tfrac1n \nabla_x \|x_i -
y_{\sigma(i)}\|^p`.

Other weights (unequal support sizes, non-uniform weights) make a transportation problem; for
those problems ``solver="transport"`` (and ``"auto"``, per problem) runs POT's exact network
simplex ``ot.emd`` once per problem on the host (needs the ``ot`` extra; a Python loop, as slow
per problem as the "POT ot.emd2 loop" row of ``docs/results/estimators_cpu.md``) and
differentiates :math:`\langle \pi^*, C(x, y)\rangle`.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import Tensor

from ctxpred.errors import ValueRangeError
from ctxpred.wasserstein._validate import (
    Prepared,
    center,
    float32_core,
    pairwise_cost,
    prepare,
    restore,
    segment_cost,
)
from ctxpred.wasserstein.base import EstimatorModule

__all__ = ["ExactWasserstein", "assignment", "exact_wasserstein"]

Solver = Literal["auto", "assignment", "transport"]

_BIG = 1e30  # "unreachable" in the float-only inner loop; costs must stay far below it


@torch.no_grad()
def assignment(cost: Tensor, row_valid: Tensor | None = None, col_valid: Tensor | None = None
               ) -> Tensor:
    r"""Batched minimum-cost perfect matching between valid rows and valid columns.

    Args:
        cost: ``(B, n, n)`` finite costs, far below ``1e30`` in magnitude (the inner loop uses
            ``1e30`` as "unreachable"; squared distances of float32 data always are).
        row_valid: ``(B, n)`` bool, rows taking part (default all).
        col_valid: ``(B, n)`` bool, columns taking part; each problem must have as many valid
            columns as valid rows (not checked here).

    Returns:
        ``(B, n)`` long: the column matched to each row, ``-1`` for invalid rows. It
            minimizes :math:`\sum_i C_{i\sigma(i)}` over the valid rows.

    Example:
        >>> import torch
        >>> from ctxpred.wasserstein import assignment
        >>> assignment(torch.tensor([[[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]]]))
        tensor([[1, 0, 2]])
    """
    bsz, n, _ = cost.shape
    device = cost.device
    if row_valid is None:
        row_valid = torch.ones(bsz, n, dtype=torch.bool, device=device)
    if col_valid is None:
        col_valid = torch.ones(bsz, n, dtype=torch.bool, device=device)
    if n == 0:
        return torch.empty(bsz, 0, dtype=torch.long, device=device)
    if n <= _DP_MAX_N:
        # chunks keep the (2^n, chunk) table cache-resident on CPUs
        chunk = max(1, _DP_CHUNK_ELEMENTS >> n) if device.type == "cpu" else bsz
        parts = [
            _assignment_subset_dp(cost[i : i + chunk], row_valid[i : i + chunk],
                                  col_valid[i : i + chunk])
            for i in range(0, bsz, chunk)
        ]
        return torch.cat(parts) if len(parts) != 1 else parts[0]
    # Crouse's shortest augmenting path (the algorithm of scipy's linear_sum_assignment), one
    # row per phase, every problem at once. Duals u (rows) and v (columns) change only at the
    # end of a phase; inside it, Dijkstra keeps the path costs `spc` of the unvisited columns.
    # Problems run along the last axis -- (n, B) layout -- so reductions over columns vectorize.
    cost_t = cost.permute(1, 2, 0).contiguous()  # (row, column, problem)
    row_valid, col_valid = row_valid.t(), col_valid.t()
    u = cost.new_zeros(n, bsz)
    v = cost.new_zeros(n, bsz)
    row4col = torch.full((n, bsz), -1, dtype=torch.long, device=device)
    col4row = torch.full((n, bsz), -1, dtype=torch.long, device=device)
    blocked = ~col_valid
    big = _BIG
    rows_f = torch.arange(n, device=device, dtype=cost.dtype).unsqueeze(1)
    row4col_f = cost.new_full((n, bsz), -1.0)  # row4col as float, for the inner loop
    # On a CPU "is every problem done?" costs nothing (there is no device queue to drain), so
    # loops stop early there; on accelerators they run their fixed, data-independent count.
    early_exit = device.type == "cpu"
    blocked_big = blocked.to(cost.dtype) * big
    spc_at_visit = cost.new_zeros(n, bsz)
    visited_f = cost.new_zeros(n, bsz)
    path_f = cost.new_zeros(n, bsz)
    # row r of problem b is cost_t[r, :, b]: a flat take() with these offsets fetches rows
    column_offsets = torch.arange(n * bsz, device=device).view(n, bsz)
    for r in range(n):
        valid = row_valid[r : r + 1]
        # Working set: the problems still searching (CPU: compacted as they finish).
        pid = valid[0].nonzero().squeeze(1) if early_exit else None
        width = bsz if pid is None else pid.numel()

        def pick(t: Tensor, pid: Tensor | None = pid) -> Tensor:
            return t if pid is None else t.index_select(1, pid)

        min_all = sink_all = None
        act = pick(valid.to(cost.dtype))  # 1 while the problem still searches in this phase
        min_val = cost.new_zeros(1, width)
        w_spc_at_visit = cost.new_zeros(n, width)
        spc = cost.new_full((n, width), big)  # path costs of unvisited columns (big: visited)
        neg_v = pick(blocked_big - v)  # -v; +big where blocked (and, below, where visited)
        w_visited = cost.new_zeros(n, width)
        w_path = cost.new_zeros(n, width)
        row_i = cost.new_full((1, width), float(r))
        row_l = torch.full((1, width), r, dtype=torch.long, device=device)
        u_i = pick(u[r : r + 1])
        sink = cost.new_full((1, width), -1.0)
        offsets = pick(column_offsets)
        first_row = pick(cost_t[r])
        if pid is not None:
            spc_at_visit.zero_()
            visited_f.zero_()
            path_f.zero_()
            min_all = cost.new_zeros(1, bsz)
            sink_all = cost.new_full((1, bsz), -1.0)

        # Phase r: at most r + 1 Dijkstra steps (one per matched column, plus the free one).
        # Float arithmetic only (0/1 masks, indices as floats): CPU bool kernels are slow here.
        for step in range(r + 1):
            if width == 0:
                break
            offset = min_val - u_i + (1.0 - act) * big
            if step == 0:
                row = first_row
            else:
                row = cost_t.take(offsets + row_l * (n * bsz))
            reduced = row + neg_v + offset
            better = torch.sign(spc - reduced).clamp_min_(0.0)
            torch.minimum(spc, reduced, out=spc)
            w_path.addcmul_(better, row_i - w_path)
            low = spc.amin(0, keepdim=True)
            key = torch.add(rows_f, torch.sign(spc - low), alpha=n)
            j_f = key.amin(0, keepdim=True)
            min_val.addcmul_(act, low - min_val)
            # one-hot of the visited column (key - j_f is 0 there, an integer >= 1 elsewhere)
            hit = (key - j_f).clamp_max_(1.0).neg_().add_(1.0).mul_(act)
            w_visited.add_(hit)
            w_spc_at_visit.addcmul_(hit, low)
            hit.mul_(big)
            spc.add_(hit)
            neg_v.add_(hit)
            owner = row4col_f.take(offsets[:1] + j_f.long() * bsz)
            free = (-owner).clamp_min_(0.0)  # 1 if the column is unmatched (owner -1)
            done = act * free
            sink.addcmul_(done, j_f - sink)
            row_i.addcmul_(act - done, owner - row_i)
            row_l = row_i.long()
            u_i = u.take(offsets[:1] + row_l * bsz)
            act = act - done
            if pid is not None:  # CPU: count the searching problems, compact when half are done
                remaining = int(act.sum())
                if remaining == 0:
                    break
                if 2 * remaining <= width:
                    _scatter_back(pid, (spc_at_visit, visited_f, path_f, min_all, sink_all),
                                  (w_spc_at_visit, w_visited, w_path, min_val, sink))
                    keep = act[0].nonzero().squeeze(1)
                    pid, width = pid.index_select(0, keep), remaining
                    (act, min_val, w_spc_at_visit, spc, neg_v, w_visited, w_path, row_i, row_l,
                     u_i, sink, offsets) = (
                        t.index_select(1, keep) for t in (
                            act, min_val, w_spc_at_visit, spc, neg_v, w_visited, w_path, row_i,
                            row_l, u_i, sink, offsets))
        if pid is not None:
            _scatter_back(pid, (spc_at_visit, visited_f, path_f, min_all, sink_all),
                          (w_spc_at_visit, w_visited, w_path, min_val, sink))
            min_val, sink = min_all, sink_all
        else:
            spc_at_visit, visited_f, path_f = w_spc_at_visit, w_visited, w_path
        path = path_f.long()
        sink = sink.long()
        # Dual update: visited rows and columns move by min_val minus their path cost.
        shift = visited_f * (min_val - spc_at_visit)
        assigned = (row4col_f + 1.0).clamp_max_(1.0)
        u.scatter_add_(0, row4col.clamp_min(0), assigned * shift)
        u[r : r + 1] += valid.to(cost.dtype) * min_val
        v = v - shift
        # Augment along the alternating path from the sink back to row r.
        going = valid & (sink >= 0)
        j = sink.clamp_min(0)
        for step in range(r + 1):
            if early_exit and step > 0 and not bool(going.any()):
                break
            i = path.gather(0, j)
            row4col.scatter_(0, j, torch.where(going, i, row4col.gather(0, j)))
            row4col_f.scatter_(0, j, torch.where(going, i, row4col.gather(0, j)).to(cost.dtype))
            previous = col4row.gather(0, i)
            col4row.scatter_(0, i, torch.where(going, j, previous))
            going = going & (i != r)
            j = torch.where(going, previous.clamp_min(0), j)
    col4row = col4row.t()
    return torch.where(row_valid.t(), col4row, torch.full_like(col4row, -1))

_DP_CHUNK_ELEMENTS = 1 << 19  # DP table entries per chunk on CPU (2 MiB of float32)
_DP_MAX_N = 8  # subset DP up to n = 8: n 2^(n-1) = 1024 candidate sums per problem


@functools.lru_cache(maxsize=16)
def _subset_levels(n: int) -> list[tuple[list[int], list[list[int]], list[list[int]]]]:
    """For k = 1..n: the masks with k bits, and for each its (predecessor mask, column) pairs."""
    levels = []
    for k in range(1, n + 1):
        masks, preds, cols = [], [], []
        for mask in range(1 << n):
            if bin(mask).count("1") != k:
                continue
            bits = [j for j in range(n) if mask >> j & 1]
            masks.append(mask)
            preds.append([mask ^ (1 << j) for j in bits])
            cols.append(bits)
        levels.append((masks, preds, cols))
    return levels


def _scatter_back(pid: Tensor, full: tuple[Tensor, ...], work: tuple[Tensor, ...]) -> None:
    """Copy the working set's columns (problems ``pid``) into the full-batch tensors."""
    for dst, src in zip(full, work):
        dst.index_copy_(1, pid, src)


def _assignment_subset_dp(cost: Tensor, row_valid: Tensor, col_valid: Tensor) -> Tensor:
    r"""Exact assignment for small ``n`` by dynamic programming over column subsets.

    With valid rows and columns moved first, :math:`D_k(S) = \min_{j \in S} D_{k-1}(S
    \setminus j) + C_{k-1, j}` over sets :math:`S` of ``k`` columns; the optimum of a problem
    with ``k`` valid rows is :math:`D_k(\{0..k-1\})`, and a backward pass recovers the matching.
    ``n`` levels of vectorized work over ``(2^n, B)`` — no data-dependent steps at all.
    """
    bsz, n, _ = cost.shape
    device, big = cost.device, _BIG
    order_r = torch.argsort((~row_valid).to(torch.int8), dim=1, stable=True)
    order_c = torch.argsort((~col_valid).to(torch.int8), dim=1, stable=True)
    ordered = cost.gather(1, order_r.unsqueeze(-1).expand(bsz, n, n))
    ordered = ordered.gather(2, order_c.unsqueeze(1).expand(bsz, n, n))
    cost_t = ordered.permute(1, 2, 0).contiguous()  # (row, column, problem)
    count = row_valid.sum(1)  # (B,) valid rows (= valid columns)
    dp = cost.new_full((1 << n, bsz), big)
    dp[0] = 0.0
    for k, (masks, preds, cols) in enumerate(_subset_levels(n), start=1):
        pred = torch.tensor(preds, device=device)  # (C, k)
        col = torch.tensor(cols, device=device)
        size = pred.shape[0]
        cand = dp.index_select(0, pred.flatten()).view(size, k, bsz)
        cand += cost_t[k - 1].index_select(0, col.flatten()).view(size, k, bsz)
        dp.index_copy_(0, torch.tensor(masks, device=device), cand.amin(1))
    # Backward pass: for row k-1, the column whose removal explains D_k(S).
    mask = (1 << count) - 1  # (B,)
    bits = 1 << torch.arange(n, device=device).unsqueeze(1)  # (n, 1)
    columns_f = torch.arange(n, device=device, dtype=cost.dtype).unsqueeze(1)
    chosen = torch.full((n, bsz), -1, dtype=torch.long, device=device)
    for level in range(n, 0, -1):
        active = count >= level
        in_mask = (mask.unsqueeze(0) & bits) != 0  # (n, B)
        prev = torch.where(in_mask, mask.unsqueeze(0) ^ bits, 0)
        value = dp.gather(0, prev) + cost_t[level - 1]
        value = value.masked_fill_(~in_mask, big)
        low = value.amin(0, keepdim=True)
        key = torch.add(columns_f, torch.sign(value - low), alpha=n)
        j = key.amin(0).long()  # (B,)
        chosen[level - 1] = torch.where(active, j, -1)
        mask = torch.where(active, mask ^ (1 << j), mask)
    # Back to the caller's row and column order.
    chosen = chosen.t()  # (B, n) permuted column per permuted row
    original_col = order_c.gather(1, chosen.clamp_min(0))
    result = torch.full((bsz, n), -1, dtype=torch.long, device=device)
    result.scatter_(1, order_r, torch.where(chosen >= 0, original_col, -1))
    return torch.where(row_valid, result, -1)


def _assignment_compatible(prep: Prepared) -> Tensor:
    """``(B,)`` bool: the problem is uniform on supports of equal size (or empty)."""
    a, b = prep.a, prep.b
    na, nb = (a > 0).sum(-1).to(a.dtype), (b > 0).sum(-1).to(b.dtype)
    tol = 1e-5 if a.dtype == torch.float32 else 1e-10
    ua = ((a - 1.0 / na.clamp_min(1).unsqueeze(-1)).abs() <= tol) | (a == 0)
    ub = ((b - 1.0 / nb.clamp_min(1).unsqueeze(-1)).abs() <= tol) | (b == 0)
    return ((na == nb) & ua.all(-1) & ub.all(-1)) | ~prep.nonempty


def _subset(prep: Prepared, index: Tensor) -> Prepared:
    return prep._replace(
        x=prep.x[index], y=prep.y[index], a=prep.a[index], b=prep.b[index],
        nonempty=prep.nonempty[index],
    )


def _solve_mixed(prep: Prepared, p: float, compatible: Tensor) -> Tensor:
    """Assignment solver where the weights allow it, transport solver elsewhere."""
    fast = compatible.nonzero().squeeze(1)
    slow = (~compatible).nonzero().squeeze(1)
    values_fast = _solve_assignment(_subset(prep, fast), p)
    values_slow = _solve_transport(_subset(prep, slow), p)
    values = values_fast.new_zeros(prep.x.shape[0])
    return values.index_put((fast,), values_fast).index_put((slow,), values_slow)


def _solve_assignment(prep: Prepared, p: float) -> Tensor:
    x, y, a, b = prep.x, prep.y, prep.a, prep.b
    bsz, n_x, d = x.shape
    n_y = y.shape[1]
    n = max(n_x, n_y)
    if n_x < n:
        x = torch.cat([x, x.new_zeros(bsz, n - n_x, d)], 1)
        a = torch.cat([a, a.new_zeros(bsz, n - n_x)], 1)
    if n_y < n:
        y = torch.cat([y, y.new_zeros(bsz, n - n_y, d)], 1)
        b = torch.cat([b, b.new_zeros(bsz, n - n_y)], 1)
    with torch.no_grad():
        xc, yc = center(x.detach(), y.detach(), b)
        cost = pairwise_cost(xc, yc, p)
        match = assignment(cost, a > 0, b > 0)
    index = match.clamp_min(0)
    if p == 2 and not (torch.is_grad_enabled() and y.requires_grad):
        return _MatchedSquaredCost.apply(x, y.detach(), index, a)
    matched = torch.gather(y, 1, index.unsqueeze(-1).expand(-1, -1, d))
    return (a * segment_cost(x - matched, p)).sum(-1)


class _MatchedSquaredCost(torch.autograd.Function):
    r""":math:`\sum_i a_i \|x_i - y_{\sigma(i)}\|^2` per problem with a one-pass backward
    :math:`2 a_i (x_i - y_{\sigma(i)})` (y constant: the usual case, a target)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, y: Tensor, index: Tensor, a: Tensor
    ) -> Tensor:
        diff = x - torch.gather(y, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        ctx.save_for_backward(diff, a)
        return (a * torch.linalg.vector_norm(diff, dim=-1).square()).sum(-1)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor):  # type: ignore[override]
        diff, a = ctx.saved_tensors
        return diff * (2.0 * a * grad.unsqueeze(-1)).unsqueeze(-1), None, None, None


def _solve_transport(prep: Prepared, p: float) -> Tensor:
    try:
        import ot
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "exact OT with unequal support sizes or non-uniform weights uses POT's network "
            "simplex: pip install 'ctxpred[ot]' (or pip install pot)"
        ) from err
    x, y, a, b = prep.x, prep.y, prep.a, prep.b
    with torch.no_grad():
        xc, yc = center(x.detach(), y.detach(), b)
        # host: POT's network simplex runs on the CPU, one problem at a time (documented fallback)
        cost = pairwise_cost(xc.double(), yc.double(), p).cpu().numpy()
        a_np, b_np = a.double().cpu().numpy(), b.double().cpu().numpy()
        nonempty = prep.nonempty.cpu().tolist()
        plans = torch.zeros(cost.shape, dtype=torch.float64)
        for k in range(cost.shape[0]):
            if nonempty[k]:
                wa, wb = a_np[k], b_np[k]
                plans[k] = torch.from_numpy(ot.emd(wa / wa.sum(), wb / wb.sum(), cost[k]))
        plans = plans.to(device=x.device, dtype=x.dtype)
    diff = x.unsqueeze(2) - y.unsqueeze(1)
    return (plans * segment_cost(diff, p)).sum((-1, -2))


def exact_wasserstein(
    x: Tensor,
    y: Tensor,
    x_weights: Tensor | None = None,
    y_weights: Tensor | None = None,
    *,
    p: float = 2,
    solver: Solver = "auto",
    check_finite: bool = True,
) -> Tensor:
    r"""Exact :math:`W_p^p` between weighted point clouds, batched over leading dimensions.

    .. math::
        W_p^p = \min_{\pi \in \Pi(a, b)} \sum_{ij} \pi_{ij}\, \|x_i - y_j\|^p,
        \qquad a = \frac{w_x}{\sum w_x},\; b = \frac{w_y}{\sum w_y}

    (squared Euclidean cost for ``p=2``, so the value is :math:`W_2^2`). Weights are constants
    (no gradient); the gradient w.r.t. the points is the envelope gradient through the optimal
    plan. A problem whose weights sum to 0 on either side is *empty*: its value is 0 with zero
    gradient.

    Args:
        x: ``(..., N, D)`` points (e.g. predicted neighbor samples).
        y: ``(..., M, D)`` points (e.g. true neighbors).
        x_weights: ``(..., N)`` non-negative weights (0 = masked out); ``None`` = uniform.
        y_weights: ``(..., M)`` same for ``y``.
        p: cost exponent, ``>= 1``.
        solver: ``"assignment"`` (batched Hungarian on the device; requires uniform weights on
            supports of equal size), ``"transport"`` (POT ``ot.emd`` per problem on the host, any
            weights), or ``"auto"``: per problem, the assignment solver where the weights allow
            it and the transport one elsewhere. With weights given, ``"auto"`` decides with one
            host sync; pass ``"assignment"`` in training loops to avoid it (then every problem
            must qualify, e.g. predicted samples masked like their targets).
        check_finite: check for NaN/Inf points and negative weights, and (for
            ``"assignment"``) that the weights allow it -- one host sync; pass ``False`` to skip.
            (Named like this for every estimator; it also checks the weights.)

    Returns:
        ``(...)`` values :math:`W_p^p`, in ``x``'s dtype (computed in float32 or float64).

    Example:
        >>> import torch
        >>> from ctxpred.wasserstein import exact_wasserstein
        >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
        >>> y = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
        >>> exact_wasserstein(x, y)
        tensor(1.)
        >>> mask = torch.tensor([True, False])
        >>> exact_wasserstein(x, y, mask.float(), torch.tensor([0.0, 1.0]))
        tensor(1.)
    """
    if solver not in ("auto", "assignment", "transport"):
        raise ValueRangeError(
            f"solver must be 'auto', 'assignment' or 'transport', got {solver!r}"
        )
    prep = prepare(x, y, x_weights, y_weights, p, check_finite)
    with float32_core(prep.x.device):
        if solver == "auto":
            if not prep.weighted:
                solver = "assignment" if x.shape[-2] == y.shape[-2] else "transport"
            else:
                compatible = _assignment_compatible(prep)
                n_compatible = int(compatible.sum())  # the one host sync of "auto"
                if n_compatible == compatible.numel():
                    solver = "assignment"
                elif n_compatible == 0:
                    solver = "transport"
                else:
                    return restore(_solve_mixed(prep, p, compatible), prep)
        elif (
            solver == "assignment" and check_finite and not bool(_assignment_compatible(prep).all())
        ):
            raise ValueRangeError(
                "solver='assignment' needs uniform weights on supports of equal size in every "
                "problem (e.g. equal 0/1 masks counts); use solver='transport' or 'auto'"
            )
        if solver == "assignment":
            values = _solve_assignment(prep, p)
        else:
            values = _solve_transport(prep, p)
    return restore(values, prep)


class ExactWasserstein(EstimatorModule):
    r"""Module form of :func:`exact_wasserstein`, its options fixed (no learnable parameters).

    Args:
        p: cost exponent ``>= 1``; the value is :math:`W_p^p` (``p=2``: squared Euclidean cost).
        solver: ``"auto"``, ``"assignment"`` or ``"transport"`` (see
            :func:`exact_wasserstein`).
        check_finite: check for NaN/Inf points and negative weights (one host sync); ``False``
            in training loops.

    Shape:
        ``x (..., N, D)``, ``y (..., M, D)``, weights ``(..., N)`` / ``(..., M)`` -> ``(...)``.

    Example:
        >>> import torch
        >>> from ctxpred.wasserstein import ExactWasserstein
        >>> x = torch.randn(4, 8, 3)
        >>> ExactWasserstein()(x, x.flip(1)).abs().max() < 1e-6
        tensor(True)
    """

    function = staticmethod(exact_wasserstein)

    def __init__(self, p: float = 2, solver: Solver = "auto", check_finite: bool = True) -> None:
        super().__init__(p=p, solver=solver, check_finite=check_finite)
