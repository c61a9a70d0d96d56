r"""Exact optimal transport on the device: assignment (subset DP, Hungarian) and min-cost flow.

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

Unequal support sizes with uniform weights — ``Q`` predicted samples against the ``m <= K``
valid neighbors of a border point, the loss's masked problems -- make a transportation problem
with rational weights :math:`1/n_a`, :math:`1/n_b`. :func:`transport_plan` solves it exactly on
the device, all problems at once, as an integer min-cost flow (successive shortest paths with
capacities; see its docstring); the value :math:`\langle \pi^*, C(x, y)\rangle` is differentiated
with the plan fixed (the envelope gradient). On accelerators and under ``torch.compile`` its
schedule is fixed and needs no host sync; on a CPU it stops as soon as every problem is solved.

General (non-uniform) weights: ``solver="transport"`` runs POT's exact network simplex ``ot.emd``
once per problem on the host (needs the ``ot`` extra; a Python loop, as slow per problem as the
"POT ot.emd2 loop" row of ``docs/results/estimators_cpu.md``). ``solver="auto"`` (the default)
picks per problem where reading the per-problem weight classes on the host is free (a CPU
tensor in eager mode) or already paid for (``check_finite=True``); elsewhere it stays on the
device and requires weights uniform on each side's support (0/1 masks), checked by an
asynchronous device-side assert.

Empty problems (zero total weight on a side, e.g. every neighbor masked) have value 0 and zero
gradient on every path.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ctxpred.errors import ValueRangeError
from ctxpred.wasserstein._validate import (
    Prepared,
    center,
    float32_core,
    host_checks_free,
    pairwise_cost,
    plan_cost,
    prepare,
    restore,
    segment_cost,
)
from ctxpred.wasserstein.base import EstimatorModule

__all__ = [
    "ExactWasserstein",
    "assignment",
    "exact_wasserstein",
    "flow_augmentation_bound",
    "transport_plan",
]

Solver = Literal["auto", "assignment", "flow", "transport"]

_BIG = 1e30  # "unreachable" in the float-only inner loop; costs must stay far below it
_COMPACT_AT = 0.5  # CPU flow solver: drop finished problems once half of them are done


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
    early_exit = host_checks_free(device)
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


_TABLES: dict[tuple[int, str], list[tuple[Tensor, Tensor, Tensor]]] = {}


def _subset_tables(n: int, device: torch.device) -> list[tuple[Tensor, Tensor, Tensor]]:
    """:func:`_subset_levels` as index tensors ``(masks, flat predecessors, flat columns)`` on
    ``device``, built once per ``(n, device)`` (no host-to-device copy per call)."""
    key = (n, str(device))
    tables = _TABLES.get(key)
    if tables is None:
        tables = [
            (torch.tensor(masks, device=device), torch.tensor(preds, device=device).flatten(),
             torch.tensor(cols, device=device).flatten())
            for masks, preds, cols in _subset_levels(n)
        ]
        _TABLES[key] = tables
    return tables


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
    for k, (masks, pred, col) in enumerate(_subset_tables(n, device), start=1):
        size = masks.shape[0]
        cand = dp.index_select(0, pred).view(size, k, bsz)
        cand += cost_t[k - 1].index_select(0, col).view(size, k, bsz)
        dp.index_copy_(0, masks, cand.amin(1))
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


def _argmin0(values: Tensor, index_f: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum over dim 0 and the first index attaining it (as float); ``index_f`` holds
    ``arange(K)`` shaped to broadcast. Faster on CPUs than ``min(dim=0)`` over a short axis."""
    low = values.amin(0, keepdim=True)
    key = torch.add(index_f, torch.sign(values - low), alpha=values.shape[0])
    return low[0], key.amin(0)


def _select(tensors: tuple[Tensor, ...], index: Tensor) -> list[Tensor]:
    """The problems ``index`` (last axis) of each tensor."""
    return [t.index_select(t.dim() - 1, index) for t in tensors]


def _write_back(full: tuple[Tensor, ...], work: tuple[Tensor, ...], index: Tensor | None
                ) -> tuple[Tensor, ...]:
    """Store a compacted working set (problems ``index``, or all when ``None``) into ``full``."""
    if index is None:
        return work
    for dst, src in zip(full, work):
        dst.index_copy_(dst.dim() - 1, index, src)
    return full


def flow_augmentation_bound(n: int, m: int) -> int:
    """Augmentations that always suffice for :func:`transport_plan` on ``n`` x ``m`` problems.

    A problem with ``n_a`` valid rows and ``n_b`` valid columns carries
    :math:`\\operatorname{lcm}(n_a, n_b)` units of integer flow and every augmentation moves at
    least one, so the bound is the largest such lcm.
    """
    bound = 0
    for a in range(1, n + 1):
        for b in range(1, m + 1):
            bound = max(bound, a * b // math.gcd(a, b))
    return bound


@torch.no_grad()
def transport_plan(cost: Tensor, row_valid: Tensor | None = None,
                   col_valid: Tensor | None = None) -> Tensor:
    r"""Batched optimal transport plan between uniform weights on valid rows and valid columns.

    Solves :math:`\min_\pi \sum_{ij} \pi_{ij} C_{ij}` over plans with row sums :math:`1/n_a` on
    the ``n_a`` valid rows and column sums :math:`1/n_b` on the ``n_b`` valid columns -- any
    sizes, so ``Q`` predicted samples against the ``m <= K`` valid neighbors of a border point.
    Scaled by :math:`n_a n_b / g` (:math:`g = \gcd(n_a, n_b)`) this is an integer min-cost flow
    (row supplies :math:`n_b/g`, column demands :math:`n_a/g`), solved exactly by successive
    shortest paths: a Jonker-Volgenant start (column and row reductions, greedy flow on tight
    arcs), then per round one multi-source Dijkstra over the ``n + m`` nodes of every problem
    (reduced costs, duals updated after it) and one augmentation by the path's bottleneck. All
    problems run together; finished ones are masked. On an accelerator (and under
    ``torch.compile``) the schedule is fixed -- :func:`flow_augmentation_bound` rounds of
    ``n + m`` Dijkstra steps -- with no host sync; on a CPU, where the check is free, rounds and
    steps stop when no problem needs them and finished problems are dropped from the work.

    Args:
        cost: ``(B, n, m)`` finite costs, far below ``1e30`` in magnitude.
        row_valid: ``(B, n)`` bool, rows carrying mass (default all).
        col_valid: ``(B, m)`` bool, columns carrying mass (default all).

    Returns:
        ``(B, n, m)`` plan :math:`\pi` in ``cost``'s dtype: row sums :math:`1/n_a` on valid
            rows, column sums :math:`1/n_b` on valid columns, 0 elsewhere and for empty problems.

    Example:
        >>> import torch
        >>> from ctxpred.wasserstein.exact import transport_plan
        >>> transport_plan(torch.tensor([[[0.0, 4.0], [1.0, 1.0], [4.0, 0.0]]])) * 6
        tensor([[[2., 0.],
                 [1., 1.],
                 [0., 2.]]])
    """
    bsz, n, m = cost.shape
    device, dtype, big = cost.device, cost.dtype, _BIG
    if row_valid is None:
        row_valid = torch.ones(bsz, n, dtype=torch.bool, device=device)
    if col_valid is None:
        col_valid = torch.ones(bsz, m, dtype=torch.bool, device=device)
    if n == 0 or m == 0 or bsz == 0:
        return cost.new_zeros(bsz, n, m)
    early_exit = host_checks_free(device)
    n_a, n_b = row_valid.sum(1), col_valid.sum(1)
    gcd = torch.gcd(n_a, n_b).clamp_min(1)
    total = (n_a * (n_b // gcd)).to(dtype).clamp_min(1.0)
    # Problems run along the last axis: (row, column, problem) layout, as in `assignment`.
    cost_t = cost.permute(1, 2, 0).contiguous()
    row_f = row_valid.t().to(dtype).contiguous()
    col_f = col_valid.t().to(dtype).contiguous()
    excess = row_f * (n_b // gcd).to(dtype)  # supply left per row
    deficit = col_f * (n_a // gcd).to(dtype)  # demand left per column
    col_big = (1.0 - col_f) * big
    flow = cost.new_zeros(n, m, bsz)
    nodes_f = torch.arange(m + n, device=device, dtype=dtype).unsqueeze(1)  # columns, then rows
    rows_f, cols_f = nodes_f[:n], nodes_f[:m]
    rows_l, cols_l = rows_f.long(), cols_f.long()
    every = torch.arange(bsz, device=device)
    flat_flow, flat_excess, flat_deficit = flow.view(-1), excess.view(-1), deficit.view(-1)
    big_t = cost.new_tensor(big)

    # Start: v_j = min_i C_ij, greedy flow on those tight arcs; u_i = min_j C_ij - v_j, greedy.
    v, best_row = _argmin0(cost_t + ((1.0 - row_f) * big).unsqueeze(1), rows_f.view(n, 1, 1))
    v = v * col_f
    for j in range(m):
        i = best_row[j].long()
        amount = torch.minimum(flat_excess.take(i * bsz + every), deficit[j]) * col_f[j]
        flat_flow.index_add_(0, (i * m + j) * bsz + every, amount)
        flat_excess.index_add_(0, i * bsz + every, -amount)
        deficit[j] -= amount
    reduced = (cost_t - v.unsqueeze(0) + col_big.unsqueeze(0)).transpose(0, 1)
    u, best_col = _argmin0(reduced, cols_f.view(m, 1, 1))
    u = u * row_f
    for i in range(n):
        j = best_col[i].long()
        amount = torch.minimum(excess[i], flat_deficit.take(j * bsz + every)) * row_f[i]
        flat_flow.index_add_(0, (i * m + j) * bsz + every, amount)
        flat_deficit.index_add_(0, j * bsz + every, -amount)
        excess[i] -= amount

    rounds = None if early_exit else flow_augmentation_bound(n, m)
    full_state = (cost_t, flow, u, v, excess, deficit, col_big)
    cst, flw, u_w, v_w, exc, dfc, cbig = full_state
    pid = None  # CPU: the problems still moving flow (compacted when half have finished)
    width = bsz
    done_rounds = 0
    while rounds is None or done_rounds < rounds:
        done_rounds += 1
        src = (exc > 0.5).to(dtype)
        active = src.amax(0)
        if early_exit:
            n_active = int(active.sum())
            if n_active == 0:
                break
            if n_active <= _COMPACT_AT * width:
                if pid is not None:
                    _write_back(full_state, (cst, flw, u_w, v_w, exc, dfc, cbig), pid)
                keep = active.nonzero().squeeze(1)
                pid = keep if pid is None else pid.index_select(0, keep)
                cst, flw, u_w, v_w, exc, dfc, cbig = _select(full_state, pid)
                src, active = src.index_select(1, keep), active.index_select(0, keep)
                width = n_active
        # Multi-source Dijkstra on reduced costs C_ij - u_i - v_j >= 0: rows with supply left
        # start at 0; row -> column arcs always exist, column -> row arcs where flow > 0 (tight,
        # so of reduced cost 0). Nodes: columns 0..m-1, rows m..m+n-1. Problems without supply
        # left start "found" and stay inert.
        start = cst - u_w.unsqueeze(1) - v_w.unsqueeze(0) + ((1.0 - src) * big).unsqueeze(1)
        d_col, pred_col = _argmin0(start, rows_f.view(n, 1, 1))
        full = (
            torch.cat([d_col + cbig, (1.0 - src) * big], 0),  # distances, (m + n, width)
            torch.cat([torch.zeros_like(d_col), src], 0),  # visited
            torch.cat([pred_col, torch.zeros_like(src)], 0),  # column: its row; row: its column
            1.0 - active,  # found
            cost.new_zeros(width),  # distance of the sink
            cost.new_zeros(width),  # the sink column
        )
        wid = None  # CPU: the problems still searching (indices into the round's problems)
        w_in = (cst, flw, u_w, v_w, dfc, cbig)
        w_cst, w_flw, w_u, w_v, w_dfc, w_cbig = w_in
        w_dist, w_seen, w_pred, w_found, w_reach, w_sink = full
        ww = -1
        for _ in range(n + m):
            if ww != w_found.shape[0]:  # index bases for this width
                ww = w_found.shape[0]
                wi = torch.arange(ww, device=device)
                col_base = rows_l * (m * ww) + wi  # (n, ww): C / flow entry (i, 0) of problem
                row_base = cols_l * ww + wi  # (m, ww): C entry (0, j)
                flat_cst, flat_flw = w_cst.reshape(-1), w_flw.reshape(-1)
                flat_dfc, flat_u = w_dfc.reshape(-1), w_u.reshape(-1)
            val, idx = _argmin0(torch.addcmul(w_dist, w_seen, big_t), nodes_f)
            searching = 1.0 - w_found
            is_col = (idx < m).to(dtype)
            j_l = idx.clamp_max(m - 1).long()
            i_l = (idx - m).clamp_min(0).long()
            free = (flat_dfc.take(j_l * ww + wi) > 0.5).to(dtype)
            new = searching * is_col * free
            w_sink = torch.lerp(w_sink, idx, new)
            w_reach = torch.lerp(w_reach, val, new)
            w_found = w_found + new
            w_seen = torch.addcmul(w_seen, (nodes_f == idx).to(dtype), searching - new)
            # a saturated column: its rows with flow are reached at the same distance (val is
            # the smallest unvisited distance, so no unvisited row is closer)
            via_col = (searching * is_col - new) > 0.5
            col_flow = flat_flw.take(col_base + j_l * ww)
            to_row = (col_flow > 0.5) & (w_seen[m:] < 0.5) & via_col
            # a row: relax every column
            via_row = (searching * (1.0 - is_col)) > 0.5
            row = flat_cst.take(row_base + i_l * (m * ww)) - flat_u.take(i_l * ww + wi) - w_v
            cand = row.add_(w_cbig).add_(val)
            d_col = w_dist[:m]
            to_col = (cand < d_col) & (w_seen[:m] < 0.5) & via_row
            w_dist = torch.cat([torch.where(to_col, cand, d_col),
                                torch.where(to_row, val, w_dist[m:])])
            w_pred = torch.cat([torch.where(to_col, idx - m, w_pred[:m]),
                                torch.where(to_row, idx, w_pred[m:])])
            if early_exit:
                left = int((w_found < 0.5).sum())
                if left == 0:
                    break
                if left <= _COMPACT_AT * ww:  # compact: write back the finished, keep the rest
                    work = (w_dist, w_seen, w_pred, w_found, w_reach, w_sink)
                    full = _write_back(full, work, wid)
                    keep = (w_found < 0.5).nonzero().squeeze(1)
                    wid = keep if wid is None else wid.index_select(0, keep)
                    w_cst, w_flw, w_u, w_v, w_dfc, w_cbig = _select(w_in, wid)
                    w_dist, w_seen, w_pred, w_found, w_reach, w_sink = _select(work, keep)
        full = _write_back(full, (w_dist, w_seen, w_pred, w_found, w_reach, w_sink), wid)
        dist, seen, pred, found, reach, sink = full
        # Duals: visited nodes move by (sink distance - their distance); arcs stay >= 0.
        shift = seen * (reach - dist).clamp_min(0.0)
        u_w += shift[m:]
        v_w -= shift[:m]
        # Augment along the path sink <- row <- column <- ... <- source by its bottleneck.
        wi = torch.arange(width, device=device)
        going = (found > 0.5) & (active > 0.5)
        sink_l = sink.long()
        delta = torch.where(going, dfc.reshape(-1).take(sink_l * width + wi), 0.0)
        col = sink_l
        flat_f, flat_p = flw.reshape(-1), pred.reshape(-1)
        flat_e, flat_s = exc.reshape(-1), src.reshape(-1)
        path = []
        arrived = torch.zeros_like(going)
        for _ in range(min(n, m)):
            row_i = flat_p.take(col * width + wi).long()
            at_source = going & (flat_s.take(row_i * width + wi) > 0.5)
            delta = torch.where(at_source,
                                torch.minimum(delta, flat_e.take(row_i * width + wi)), delta)
            arrived = arrived | at_source
            onward = going & ~at_source
            back = flat_p.take((row_i + m) * width + wi).long()
            delta = torch.where(
                onward, torch.minimum(delta, flat_f.take((row_i * m + back) * width + wi)), delta)
            path.append((row_i, col, back, going, at_source))
            col = torch.where(onward, back, col)
            going = onward
            if early_exit and not bool(going.any()):
                break
        delta = torch.where(arrived, delta, 0.0)
        dfc -= (cols_f == sink).to(dtype) * delta
        for row_i, col, back, on_path, at_source in path:
            flat_f.index_add_(0, (row_i * m + col) * width + wi, torch.where(on_path, delta, 0.0))
            flat_e.index_add_(0, row_i * width + wi, -torch.where(at_source, delta, 0.0))
            flat_f.index_add_(0, (row_i * m + back) * width + wi,
                              -torch.where(on_path & ~at_source, delta, 0.0))
    if pid is not None:
        _write_back(full_state, (cst, flw, u_w, v_w, exc, dfc, cbig), pid)
    return (flow / total).permute(2, 0, 1)


def _weight_classes(prep: Prepared) -> tuple[Tensor, Tensor]:
    """``(B,)`` bools ``(uniform, equal)``: both sides carry uniform weights on their supports
    (0/1 masks, or none), and the supports have equal sizes. Empty problems count as both."""
    a, b = prep.a, prep.b
    na, nb = (a > 0).sum(-1).to(a.dtype), (b > 0).sum(-1).to(b.dtype)
    tol = 1e-5 if a.dtype == torch.float32 else 1e-10
    ua = ((a - 1.0 / na.clamp_min(1).unsqueeze(-1)).abs() <= tol) | (a == 0)
    ub = ((b - 1.0 / nb.clamp_min(1).unsqueeze(-1)).abs() <= tol) | (b == 0)
    empty = ~prep.nonempty
    return (ua.all(-1) & ub.all(-1)) | empty, (na == nb) | empty


def _subset(prep: Prepared, index: Tensor) -> Prepared:
    return prep._replace(
        x=prep.x[index], y=prep.y[index], a=prep.a[index], b=prep.b[index],
        nonempty=prep.nonempty[index],
    )


def _solve_mixed(prep: Prepared, p: float, uniform: Tensor, equal: Tensor) -> Tensor:
    """Per problem (host-side routing, for when reading the flags costs nothing): the assignment
    solver for equal uniform supports, the device flow solver for unequal uniform ones, POT for
    general weights."""
    groups = (
        (uniform & equal, _solve_assignment),
        (uniform & ~equal, _solve_flow),
        (~uniform, _solve_transport),
    )
    values = prep.x.new_zeros(prep.x.shape[0])
    for chosen, solve in groups:
        index = chosen.nonzero().squeeze(1).to(prep.x.device)
        if index.numel() == prep.x.shape[0]:
            return solve(prep, p)
        if index.numel():
            values = values.index_put((index,), solve(_subset(prep, index), p))
    return values


def _solve_flow(prep: Prepared, p: float) -> Tensor:
    """Device min-cost flow (:func:`transport_plan`) for uniform weights on any supports."""
    x, y, a, b = prep.x, prep.y, prep.a, prep.b
    with torch.no_grad():
        xc, yc = center(x.detach(), y.detach(), b)
        cost = pairwise_cost(xc, yc, p)
        plan = transport_plan(cost, a > 0, b > 0)
    xc, yc = center(x, y, b)
    return plan_cost(plan, xc, yc, p, cost if p == 2 else None)


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
        solver: ``"auto"`` (default): equal uniform supports go to the assignment solver,
            unequal uniform ones (masks) to the device min-cost flow, general weights to POT on
            the host -- chosen per problem where that costs no host sync (CPU eager, or
            ``check_finite=True``); on accelerators and under ``torch.compile`` with
            ``check_finite=False``, masks only (every problem goes to the flow solver; other
            weights fail a device-side assert). ``"assignment"``: batched subset DP / Hungarian
            on the device, for uniform weights on supports of equal size (e.g. predicted samples
            masked like their targets, ``match_mask=True``); the fastest fixed schedule on
            accelerators. ``"flow"``: the device min-cost flow (:func:`transport_plan`) for
            uniform weights on any supports. ``"transport"``: POT ``ot.emd`` per problem on the
            host, any weights. A solver given weights it cannot handle raises
            :class:`~ctxpred.errors.ValueRangeError` (CPU, or ``check_finite=True``) or fails a
            device-side assert (accelerators: the error surfaces at the next synchronization).
        check_finite: check for NaN/Inf points and negative weights -- one host sync; pass
            ``False`` in training loops. (Named like this for every estimator; it also checks the
            weights.)

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
    if solver not in ("auto", "assignment", "flow", "transport"):
        raise ValueRangeError(
            f"solver must be 'auto', 'assignment', 'flow' or 'transport', got {solver!r}"
        )
    prep = prepare(x, y, x_weights, y_weights, p, check_finite)
    with float32_core(prep.x.device):
        # Reading per-problem flags on the host is free on a CPU in eager mode, and already paid
        # for when check_finite=True (that check syncs); elsewhere nothing may wait for the device.
        routable = check_finite or host_checks_free(prep.x.device)
        if not prep.weighted and solver in ("auto", "flow"):
            if solver == "auto" and x.shape[-2] == y.shape[-2]:
                return restore(_solve_assignment(prep, p), prep)
            return restore(_solve_flow(prep, p), prep)
        if not prep.weighted or solver == "transport":
            solve = _solve_assignment if solver == "assignment" else _solve_transport
            if solver == "assignment" and x.shape[-2] != y.shape[-2]:
                raise ValueRangeError(_ASSIGNMENT_NEEDS)
            return restore(solve(prep, p), prep)
        uniform, equal = _weight_classes(prep)
        if solver == "auto" and routable:
            flags = torch.stack([uniform, equal]).cpu()  # free here (see above)
            return restore(_solve_mixed(prep, p, flags[0], flags[1]), prep)
        ok = uniform & equal if solver == "assignment" else uniform
        message = _ASSIGNMENT_NEEDS if solver == "assignment" else _FLOW_NEEDS
        if routable:
            if not bool(ok.all()):
                raise ValueRangeError(message)
        else:  # no host sync: a device-side assert (it fails the call asynchronously)
            torch._assert_async(ok.all(), message)
        solve = _solve_assignment if solver == "assignment" else _solve_flow
        return restore(solve(prep, p), prep)


_ASSIGNMENT_NEEDS = (
    "solver='assignment' needs uniform weights on supports of equal size in every problem (e.g. "
    "0/1 masks with equal counts on both sides); use solver='auto' or 'flow' for unequal "
    "supports, 'transport' for general weights"
)
_FLOW_NEEDS = (
    "solver='flow' (and 'auto' with check_finite=False on an accelerator or under torch.compile) "
    "needs uniform weights on each side's support (0/1 masks); for general weights use "
    "solver='transport' (POT on the host), or 'auto' with check_finite=True"
)


class ExactWasserstein(EstimatorModule):
    r"""Module form of :func:`exact_wasserstein`, its options fixed (no learnable parameters).

    Args:
        p: cost exponent ``>= 1``; the value is :math:`W_p^p` (``p=2``: squared Euclidean cost).
        solver: ``"auto"``, ``"assignment"``, ``"flow"`` or ``"transport"`` (see
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
