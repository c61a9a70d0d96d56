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
capacities; see its docstring); 1-D points (``C = 1``, e.g. grayscale pixel targets) take the
sorted quantile coupling instead (:func:`monotone_plan`: a few sorts, no iterations). The
value :math:`\langle \pi^*, C(x, y)\rangle` is differentiated with the plan fixed (the envelope
gradient). On accelerators and under ``torch.compile`` its
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

Example:
    >>> x, y = torch.randn(3, 8, 2), torch.randn(3, 8, 2)
    >>> mask = torch.ones(3, 8)
    >>> mask[:, :3] = 0  # 8 predicted samples against the 5 valid neighbors
    >>> exact_wasserstein(x, y, None, mask).shape
    torch.Size([3])
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Literal

import torch
from torch import Tensor

from ctxpred.errors import DTypeError, ShapeError, ValueRangeError
from ctxpred.wasserstein._validate import (
    Prepared,
    _is_compiling,
    center,
    chunk_size,
    float32_core,
    host_checks_free,
    pairwise_cost,
    plan_cost,
    prepare,
    rescale_costs,
    restore,
    segment_cost,
    simplex_scale,
    weighted_mean,
)
from ctxpred.wasserstein.base import EstimatorModule

__all__ = [
    "ExactWasserstein",
    "assignment",
    "exact_wasserstein",
    "flow_augmentation_bound",
    "monotone_plan",
    "transport_plan",
]

Solver = Literal["auto", "assignment", "flow", "transport", "triton"]

_BIG = 1e30  # "unreachable" in the float-only inner loop; costs must stay far below it
_COMPACT_AT = 0.9  # CPU flow solver: drop finished problems once a tenth of them are done
_TIE_ULPS = 4.0  # flow solver start: arcs within rounding of reduced cost 0 count as tight
_ASCENT_SWEEPS = 2  # flow solver start: coordinate-ascent sweeps over the column duals
_LEAF_PASSES = 2  # flow solver start (CPU): greedy passes over the tight graph's leaves


def _check_solver_inputs(name: str, cost: Tensor, masks: tuple[Tensor | None, Tensor | None],
                         square: bool) -> None:
    """Clear errors for the low-level solvers' inputs: a ``(B, n, m)`` floating cost (square for
    :func:`assignment`) and bool masks ``(B, n)`` / ``(B, m)`` (a uint8 or float mask would be
    read as indices or fail deep inside)."""
    if not (isinstance(cost, Tensor) and cost.dim() == 3 and cost.is_floating_point()):
        raise ShapeError(
            f"{name}: cost must be a floating-point (B, n, m) tensor, got "
            f"{type(cost).__name__ if not isinstance(cost, Tensor) else tuple(cost.shape)}"
            f"{'' if not isinstance(cost, Tensor) else ' ' + str(cost.dtype)}")
    if cost.dtype in (torch.float16, torch.bfloat16):
        raise DTypeError(f"{name}: cost must be float32 or float64 (1e30 marks unreachable "
                         f"arcs), got {cost.dtype}")
    bsz, n, m = cost.shape
    if square and n != m:
        raise ShapeError(f"{name}: cost must be square (B, n, n), got {tuple(cost.shape)}")
    for label, mask, size in (("row_valid", masks[0], n), ("col_valid", masks[1], m)):
        if mask is None:
            continue
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise DTypeError(f"{name}: {label} must be a bool tensor, got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)}; pass mask > 0")
        if tuple(mask.shape) != (bsz, size):
            raise ShapeError(f"{name}: {label} must have shape {(bsz, size)} for cost "
                             f"{tuple(cost.shape)}, got {tuple(mask.shape)}")


@torch.no_grad()
def assignment(cost: Tensor, row_valid: Tensor | None = None, col_valid: Tensor | None = None
               ) -> Tensor:
    r"""Batched minimum-cost perfect matching between valid rows and valid columns.

    Args:
        cost: ``(B, n, n)`` finite costs, any magnitude (each problem's are rescaled by a
            power of two when they exceed ``2^40``: the inner loop uses ``1e30`` as
            "unreachable").
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
    _check_solver_inputs("assignment", cost, (row_valid, col_valid), square=True)
    bsz, n, _ = cost.shape
    device = cost.device
    cost = rescale_costs(cost, row_valid, col_valid, host_checks_free(device))
    if row_valid is None:
        row_valid = torch.ones(bsz, n, dtype=torch.bool, device=device)
    if col_valid is None:
        col_valid = torch.ones(bsz, n, dtype=torch.bool, device=device)
    if n == 0:
        return torch.empty(bsz, 0, dtype=torch.long, device=device)
    if n <= _DP_MAX_N:
        return _assignment_subset_dp(cost, row_valid, col_valid)
    # Crouse's shortest augmenting path (the algorithm of scipy's linear_sum_assignment), one
    # row per phase, every problem at once. Duals u (rows) and v (columns) change only at the
    # end of a phase; inside it, Dijkstra keeps the path costs `spc` of the unvisited columns.
    # Problems run along the last axis -- (n, B) layout -- so reductions over columns vectorize.
    # On a CPU "is every problem done?" costs nothing (there is no device queue to drain), so
    # loops stop early there; on accelerators they run their fixed, data-independent count.
    early_exit = host_checks_free(device)
    big = _BIG
    # CPU start (column reduction, as in Jonker-Volgenant): v_j = min over valid rows of C_ij
    # keeps the duals feasible (u = 0); each row that is the first minimum of some columns takes
    # the first of them (a tight arc): about 1 - 1/e of the rows; a second pass below matches
    # more. Matched rows skip their phase; the others' paths may then pass every matched row.
    # The fixed schedule of the accelerators starts empty instead (phase r needs at most r + 1
    # steps: n(n+1)/2 in all).
    # Computed in the (problem, row, column) layout: one min-with-index over rows and one
    # scatter-min, no (row, column, problem) copy of the costs.
    v = cost.new_zeros(n, bsz)
    col4row = torch.full((n, bsz), -1, dtype=torch.long, device=device)
    row4col = torch.full((n, bsz), -1, dtype=torch.long, device=device)
    if early_exit:
        col_cost = cost if bool(row_valid.all()) else torch.where(
            row_valid.unsqueeze(2), cost, big)
        low, arg_row = col_cost.min(1)  # (problem, column): the minimum and a row attaining it
        v = torch.where(col_valid, low, 0.0).t().contiguous()
        # each row takes the first column it is the minimum of (invalid columns: a dummy row n)
        columns = torch.arange(n, device=device).expand(bsz, n)
        first = torch.full((bsz, n + 1), n, dtype=torch.long, device=device).scatter_reduce_(
            1, torch.where(col_valid, arg_row, n), columns, reduce="amin")[:, :n]
        taken = (first < n) & row_valid
        col4row = torch.where(taken, first, -1)
        owner = torch.full((bsz, n + 1), -1, dtype=torch.long, device=device)  # n: a dummy
        owner.scatter_(1, torch.where(taken, first, n), columns)
        # then each free row whose cheapest column under C - v is still free takes it (the
        # first such row of each column), with u_i = min_j C_ij - v_j: still dual feasible
        row_low, arg_col = torch.where(col_valid.unsqueeze(1), col_cost, big).sub_(
            low.unsqueeze(1)).min(2)  # (problem, row)
        wants = row_valid & ~taken & (owner.gather(1, arg_col) < 0)
        winner = torch.full((bsz, n + 1), n, dtype=torch.long, device=device).scatter_reduce_(
            1, torch.where(wants, arg_col, n), columns, reduce="amin")[:, :n]  # (problem, col)
        gets = wants & (winner.gather(1, arg_col) == columns)
        col4row = torch.where(gets, arg_col, col4row).t().contiguous()
        owner.scatter_(1, torch.where(gets, arg_col, n), columns)
        u = torch.where(gets, row_low, 0.0).t().contiguous()
        row4col = owner[:, :n].t().contiguous()
        cost_t = None
    else:
        cost_t = cost.permute(1, 2, 0).contiguous()  # (row, column, problem)
        u = cost.new_zeros(n, bsz)
    row_valid, col_valid = row_valid.t(), col_valid.t()
    blocked = ~col_valid
    rows_f = torch.arange(n, device=device, dtype=cost.dtype).unsqueeze(1)
    blocked_big = blocked.to(cost.dtype) * big
    # Inside a phase row r of problem b is fetched whole from the (B n, n) layout (one
    # contiguous read per problem, then transposed): several times faster than a strided take.
    cost_rows = cost.reshape(bsz * n, n)
    problems = torch.arange(bsz, device=device).unsqueeze(0)  # (1, B)
    # the matching as floats (-1: unmatched): float columns are cheaper to gather and copy
    row4col_f, col4row_f = row4col.to(cost.dtype), col4row.to(cost.dtype)

    def steps(r: int) -> int:  # phase r: at most one step per matched row, plus the free one
        return n if early_exit else r + 1

    for r in range(n):
        valid = row_valid[r : r + 1] & (col4row_f[r : r + 1] < 0)  # free rows search a path
        # The phase's problems: all, in order (accelerators), or those whose row r is free
        # (CPU). Inside the phase the working set (`loc`: positions among them, `prob`: problem
        # indices) shrinks as problems finish (CPU: compacted when half of them have).
        phase = valid[0].nonzero().squeeze(1) if early_exit else None
        width = bsz if phase is None else phase.numel()

        def pick(t: Tensor, phase: Tensor | None = phase) -> Tensor:
            return t if phase is None else t.index_select(1, phase)

        act = pick(valid.to(cost.dtype))  # 1 while the problem still searches in this phase
        min_val = cost.new_zeros(1, width)
        spc_at_visit = cost.new_zeros(n, width)
        spc = cost.new_full((n, width), big)  # path costs of unvisited columns (big: visited)
        neg_v = pick(blocked_big - v)  # -v; +big where blocked (and, below, where visited)
        visited_f = cost.new_zeros(n, width)
        path_f = cost.new_zeros(n, width)
        row_i = cost.new_full((1, width), float(r))
        row_l = torch.full((1, width), r, dtype=torch.long, device=device)
        u_i = pick(u[r : r + 1])
        sink = cost.new_full((1, width), -1.0)
        prob = pick(problems)
        if cost_t is not None:  # accelerators: all problems, in order
            first_row = cost_t[r]
        else:  # CPU: the searching problems' row r
            first_row = cost_rows.index_select(0, prob[0] * n + r).t().contiguous()
        # the phase's results, by position among its problems (CPU: kept as problems leave)
        results = (spc_at_visit, visited_f, path_f, min_val, sink)
        loc = None if phase is None else torch.arange(width, device=device)

        # Phase r: one Dijkstra step per matched column at most, plus the free one (r + 1 from
        # the empty start; n from the CPU's column reduction).
        # Float arithmetic only (0/1 masks, indices as floats): CPU bool kernels are slow here.
        for step in range(steps(r)):
            if width == 0:
                break
            offset = min_val - u_i + (1.0 - act) * big
            if step == 0:
                row = first_row
            else:
                row = cost_rows.index_select(0, prob[0] * n + row_l[0]).t().contiguous()
            reduced = row + neg_v + offset
            # (visited columns excluded explicitly: their path costs carry +big, and in float64
            # sums near 1e30 keep costs of ~1e15 only to rounding, so comparing two of them
            # could rewrite a visited column's predecessor)
            better = torch.sign(spc - reduced).sub_(visited_f).clamp_min_(0.0)
            torch.minimum(spc, reduced, out=spc)
            path_f.addcmul_(better, row_i - path_f)
            low = spc.amin(0, keepdim=True)
            key = torch.add(rows_f, torch.sign(spc - low), alpha=n)
            j_f = key.amin(0, keepdim=True)
            min_val.addcmul_(act, low - min_val)
            # one-hot of the visited column (key - j_f is 0 there, an integer >= 1 elsewhere)
            hit = (key - j_f).clamp_max_(1.0).neg_().add_(1.0).mul_(act)
            visited_f.add_(hit)
            spc_at_visit.addcmul_(hit, low)
            hit.mul_(big)
            spc.add_(hit)
            neg_v.add_(hit)
            owner = row4col_f.take(prob + j_f.long() * bsz)
            free = (-owner).clamp_min_(0.0)  # 1 if the column is unmatched (owner -1)
            done = act * free
            sink.addcmul_(done, j_f - sink)
            row_i.addcmul_(act - done, owner - row_i)
            row_l = row_i.long()
            u_i = u.take(prob + row_l * bsz)
            act = act - done
            if loc is not None:  # CPU: count the searching problems, compact when half are done
                remaining = int(act.sum())
                if remaining == 0:
                    break
                if 2 * remaining <= width:
                    _scatter_back(loc, results, (spc_at_visit, visited_f, path_f, min_val, sink))
                    keep = act[0].nonzero().squeeze(1)
                    loc, width = loc.index_select(0, keep), remaining
                    (act, min_val, spc_at_visit, spc, neg_v, visited_f, path_f, row_i, row_l,
                     u_i, sink, prob) = (
                        t.index_select(1, keep) for t in (
                            act, min_val, spc_at_visit, spc, neg_v, visited_f, path_f, row_i,
                            row_l, u_i, sink, prob))
        if loc is not None:
            _scatter_back(loc, results, (spc_at_visit, visited_f, path_f, min_val, sink))
        spc_at_visit, visited_f, path_f, min_val, sink = results
        # End of the phase, on its problems only: dual update, then augmentation.
        # Dual update: visited rows and columns move by min_val minus their path cost.
        p_u, p_v = pick(u), pick(v)
        p_r4c, p_c4r = pick(row4col_f).long(), pick(col4row_f).long()
        p_valid = pick(valid)
        shift = visited_f * (min_val - spc_at_visit)
        p_u.scatter_add_(0, p_r4c.clamp_min(0), (p_r4c >= 0).to(cost.dtype) * shift)
        p_u[r : r + 1] += p_valid.to(cost.dtype) * min_val
        p_v = p_v - shift
        # Augment along the alternating path from the sink back to row r.
        path = path_f.long()
        sink_l = sink.long()
        going = p_valid & (sink_l >= 0)
        j = sink_l.clamp_min(0)
        for step in range(steps(r)):
            if early_exit and step > 0 and not bool(going.any()):
                break
            i = path.gather(0, j)
            p_r4c.scatter_(0, j, torch.where(going, i, p_r4c.gather(0, j)))
            previous = p_c4r.gather(0, i)
            p_c4r.scatter_(0, i, torch.where(going, j, previous))
            going = going & (i != r)
            j = torch.where(going, previous.clamp_min(0), j)
        p_r4c_f, p_c4r_f = p_r4c.to(cost.dtype), p_c4r.to(cost.dtype)
        if phase is None:  # p_u is u (changed in place)
            v, row4col_f, col4row_f = p_v, p_r4c_f, p_c4r_f
        else:
            for full, part in ((u, p_u), (v, p_v), (row4col_f, p_r4c_f), (col4row_f, p_c4r_f)):
                full.index_copy_(1, phase, part)
    col4row = col4row_f.t().long()
    return torch.where(row_valid.t(), col4row, torch.full_like(col4row, -1))

_DP_CHUNK_ELEMENTS = 1 << 19  # DP table entries per chunk on CPU (2 MiB of float32)
_DP_MAX_N = 8  # subset DP up to n = 8: n 2^(n-1) = 1024 candidate sums per problem


def _subset_levels(n: int) -> list[tuple[list[int], list[int]]]:
    """For k = 1..n, grouped by column j = 0..n-1: every mask with k bits that holds j, and that
    mask without j -- the pairs ``(predecessors, targets)`` of the DP's level ``k``, column-major
    (each column's group has ``C(n-1, k-1)`` entries)."""
    levels = []
    for k in range(1, n + 1):
        preds, targets = [], []
        for j in range(n):
            for mask in range(1 << n):
                if mask >> j & 1 and bin(mask).count("1") == k:
                    preds.append(mask ^ (1 << j))
                    targets.append(mask)
        levels.append((preds, targets))
    return levels


_TABLES: dict[tuple[int, str], list[tuple[Tensor, Tensor]]] = {}


def _subset_tables(n: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """:func:`_subset_levels` as index tensors ``(predecessors, targets)`` on ``device``, built
    once per ``(n, device)`` (no host-to-device copy per call)."""
    key = (n, str(device))
    tables = _TABLES.get(key)
    if tables is None:
        tables = [(torch.tensor(preds, device=device), torch.tensor(targets, device=device))
                  for preds, targets in _subset_levels(n)]
        _TABLES[key] = tables
    return tables


def _scatter_back(loc: Tensor, full: tuple[Tensor, ...], work: tuple[Tensor, ...]) -> None:
    """Copy the working set's columns (at positions ``loc``) into the wider tensors ``full``
    (nothing to do while the working set still is ``full``)."""
    for dst, src in zip(full, work):
        if src is not dst:
            dst.index_copy_(1, loc, src)


def _assignment_subset_dp(cost: Tensor, row_valid: Tensor, col_valid: Tensor) -> Tensor:
    r"""Exact assignment for small ``n`` by dynamic programming over column subsets.

    With valid rows and columns moved first, :math:`D_k(S) = \min_{j \in S} D_{k-1}(S
    \setminus j) + C_{k-1, j}` over sets :math:`S` of ``k`` columns; the optimum of a problem
    with ``k`` valid rows is :math:`D_k(\{0..k-1\})`, and a backward pass recovers the matching.
    ``n`` levels of vectorized work over ``(2^n, B)`` -- no data-dependent steps at all. On a CPU
    the forward levels go in chunks of problems whose ``(2^n, chunk)`` slice of the table stays
    cache-resident, each followed by its backward pass, all chunks sharing one table and one
    candidate buffer (fresh memory costs more than the arithmetic there).
    """
    bsz, n, _ = cost.shape
    device, big = cost.device, _BIG
    count = row_valid.sum(1)  # (B,) valid rows (= valid columns)
    # host: CPU eager only, where the read is free: a batch without masks (the usual case)
    # skips the reordering
    ordered = not (host_checks_free(device) and bool(count.eq(n).all()))
    if ordered:
        order_r = torch.argsort((~row_valid).to(torch.int8), dim=1, stable=True)
        order_c = torch.argsort((~col_valid).to(torch.int8), dim=1, stable=True)
        flat = (order_r.unsqueeze(-1) * n + order_c.unsqueeze(1)).view(bsz, n * n)
        cost = cost.reshape(bsz, n * n).gather(1, flat).view(bsz, n, n)
    cost_t = cost.permute(1, 2, 0).contiguous()  # (row, column, problem)
    chunk = min(bsz, max(1, _DP_CHUNK_ELEMENTS >> n)) if device.type == "cpu" else bsz
    tables = _subset_tables(n, device)
    table = cost.new_empty((1 << n) * chunk)  # one DP table and one candidate buffer, reused
    cand = cost.new_empty(max(pred.numel() for pred, _ in tables) * chunk)
    bits = 1 << torch.arange(n, device=device).unsqueeze(1)  # (n, 1)
    columns_f = torch.arange(n, device=device, dtype=cost.dtype).unsqueeze(1)
    chosen = torch.full((n, bsz), -1, dtype=torch.long, device=device)
    for lo in range(0, bsz, chunk):
        width = min(chunk, bsz - lo)
        part = cost_t[:, :, lo : lo + width]
        dp = table[: (1 << n) * width].view(1 << n, width).fill_(big)
        dp[0] = 0.0
        for k, (pred, target) in enumerate(tables, start=1):
            # column-major candidates: D_{k-1}(S \ j) + C_{k-1, j}, a broadcast add per column
            # j; each set S then takes the minimum of its k candidates (a scatter-min, no gather)
            sums = torch.index_select(dp, 0, pred, out=cand[: pred.numel() * width].view(-1, width))
            sums.view(n, -1, width).add_(part[k - 1].unsqueeze(1))
            dp.scatter_reduce_(0, target.unsqueeze(1).expand(-1, width), sums, "amin")
        # Backward pass: for row k-1, the column whose removal explains D_k(S) (the sums are
        # recomputed exactly as in the forward pass, so the minimum is met exactly).
        flat = dp.view(-1)
        offset = torch.arange(width, device=device)
        part_count = count[lo : lo + width]
        mask = (1 << part_count) - 1  # (W,) the set of the valid columns
        for level in range(n, 0, -1):
            active = part_count >= level
            prev = mask ^ bits  # (n, W): S without column j where j is in S (then prev < S)
            value = flat.take(prev * width + offset).add_(part[level - 1])
            value = torch.where(prev < mask, value, big)
            j = _argmin_dim(value, 0, columns_f)[1].long()  # (W,)
            chosen[level - 1, lo : lo + width] = torch.where(active, j, -1)
            mask = torch.where(active, mask ^ (1 << j), mask)
    chosen = chosen.t().contiguous()  # (B, n) permuted column per permuted row
    if not ordered:
        return chosen
    # Back to the caller's row and column order.
    original_col = order_c.gather(1, chosen.clamp_min(0))
    result = torch.full((bsz, n), -1, dtype=torch.long, device=device)
    result.scatter_(1, order_r, torch.where(chosen >= 0, original_col, -1))
    return torch.where(row_valid, result, -1)


def _argmin_dim(values: Tensor, dim: int, index_f: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum over ``dim`` and the first index attaining it (as float); ``index_f`` holds
    ``arange`` shaped to broadcast along ``dim``. Faster on CPUs than ``min(dim)`` over a short
    axis."""
    low = values.amin(dim, keepdim=True)
    key = torch.add(index_f, torch.sign(values - low), alpha=values.shape[dim])
    return low.squeeze(dim), key.amin(dim)


def _sorted_rows(values: Tensor, count: int | None = None) -> Tensor:
    """The ``count`` (default all ``n``) smallest entries of each column of ``values (n, W)``,
    in ascending order: ``(count, W)``. On a CPU for ``n <= 8`` by ``count`` bubble passes on
    whole rows (min/max, no max in the last pass; ``count = n`` is the full bubble sort's
    ``n (n - 1) / 2`` compare-exchanges), which beats ``sort`` there; ``sort`` above and on
    accelerators (one kernel instead of many small ones)."""
    n = values.shape[0]
    count = n if count is None else min(count, n)
    if n > 8 or values.device.type != "cpu":
        return values.sort(0).values[:count]
    rows = list(values.unbind(0))
    for lead in range(count):  # pass `lead` bubbles the smallest of rows lead.. up to `lead`
        for i in range(n - 1, lead, -1):
            low = torch.minimum(rows[i - 1], rows[i])
            if lead < count - 1:
                rows[i] = torch.maximum(rows[i - 1], rows[i])
            rows[i - 1] = low
    return torch.stack(rows[:count])


def _tight_leaves(tight: Tensor, excess: Tensor, deficit: Tensor) -> Tensor:
    """The leaves of the tight graph that can still carry flow: of the tight arcs ``(n, m, W)``
    (0/1) between rows with supply left (``excess (n, W)``) and columns with demand left
    (``deficit (m, W)``, whole units), those whose row or column has no other. A row's supply
    can go nowhere else, a column's demand come from nowhere else, and some maximum flow on the
    tight arcs carries all it can on such an arc; so :func:`transport_plan`'s greedy (a start:
    the rounds make any start optimal) fills them first, before rows in order take columns that
    a leaf needs."""
    live = tight * excess.clamp_max(1.0).unsqueeze(1) * deficit.clamp_max(1.0).unsqueeze(0)
    lone = (live.sum(1, keepdim=True) == 1) | (live.sum(0, keepdim=True) == 1)
    return live * lone.to(live.dtype)


def _exclusive_cumsum_rows(values: Tensor) -> Tensor:
    """Sums of the rows above each row of ``values (m, W)`` (whole numbers, so exact): on a CPU
    by ``m - 1`` row additions (several times faster there than ``cumsum`` along dim 0); else an
    integer ``cumsum`` (a float one has no deterministic CUDA kernel: it raises under
    ``torch.use_deterministic_algorithms(True)``)."""
    if values.device.type != "cpu":
        return values.to(torch.int32).cumsum(0).to(values.dtype).sub_(values)
    rows = list(values.unbind(0))
    out = [torch.zeros_like(rows[0])]
    for row in rows[:-1]:
        out.append(out[-1] + row)
    return torch.stack(out)


def _select_last(t: Tensor, index: Tensor) -> Tensor:
    """``t.index_select(-1, index)`` for a contiguous ``t``, taken on its 2-D view
    ``(rest, last)``: on CPUs ~5x faster than selecting along the last axis of a 3-D tensor."""
    return t.view(-1, t.shape[-1]).index_select(1, index).view(*t.shape[:-1], index.numel())


def _float_masks(device: torch.device) -> bool:
    """Whether :func:`transport_plan`'s rounds keep their masks as 0/1 floats (CPU: bool kernels
    are several times slower there) rather than bools (fewer operations, i.e. launches)."""
    return device.type == "cpu"


def _big_where_none(amount: Tensor, floats: bool) -> Tensor:
    """``0`` where ``amount`` (whole units, >= 0) is positive, else :data:`_BIG`."""
    if floats:
        return amount.clamp_max(1.0).neg_().add_(1.0).mul_(_BIG)
    return torch.where(amount > 0.5, 0.0, _BIG)


def _relax(dist: Tensor, low: Tensor, when: Tensor, sweep: int, floats: bool
           ) -> tuple[Tensor, Tensor, Tensor]:
    """One side of a Bellman-Ford sweep: where ``low < dist`` (strictly), ``dist`` takes ``low``
    and ``when`` the ``sweep``; returns ``(dist, when, improved)``. ``floats`` (CPU): in float
    arithmetic, ``improved`` as 0/1 (``sign(dist - low)^+``) and ``when`` updated in place --
    bool kernels are several times slower there; else with a bool mask (fewer operations, i.e.
    kernel launches on accelerators). Finite inputs: the two agree."""
    if floats:
        improved = (dist - low).sign_().clamp_min_(0.0)
        return torch.minimum(dist, low), when.addcmul_(improved, float(sweep) - when), improved
    improved = low < dist
    return torch.where(improved, low, dist), torch.where(improved, float(sweep), when), improved


def _augment(flow: Tensor, excess: Tensor, deficit: Tensor, preds: tuple[Tensor, Tensor],
             sink: Tensor, found: Tensor, early_exit: bool) -> None:
    """Push the bottleneck amount along each problem's shortest path ``sink <- row <- column
    <- ... <- source`` (in place): ``flow (n, m, W)``, ``excess (n, W)``, ``deficit (m, W)``
    (whole units); ``preds`` the columns' predecessor rows ``(m, W)`` and the rows'
    predecessor columns ``(n, W)`` (float indices, as recorded by the sweeps); ``sink (W,)``
    long; ``found (W,)`` 1.0 where a path exists, else 0.0. The path's source is the first row
    on it with supply left (a source's distance is 0 and never improves: it has no
    predecessor).

    The path is followed backwards from the sink by flat indices (a few operations per step:
    on a CPU, where the tail rounds have few problems, their count is the cost), then its
    bottleneck is taken over all steps at once and the flow changes along it are added in one
    pass. A problem off its path (arrived, or none found) keeps following valid indices with a
    factor of 0.
    """
    n, m, width = flow.shape
    device = flow.device
    wi = torch.arange(width, device=device)
    # (nodes never reached point at row/column 0: never on a path)
    pred_of_col = preds[0].remainder(n).long()  # (m, W) rows
    pred_of_row = preds[1].remainder(m).long()  # (n, W) columns
    # flat indices: per column (m, W) its predecessor row's in (n, W), per row (n, W) its
    # predecessor column's in (m, W); the arc of row index r = i W + w and column index
    # c = j W + w in (n, m, W) is (i m + j) W + w = r m + c - w m
    col_to_row = (pred_of_col * width + wi).view(-1)
    row_to_col = (pred_of_row * width + wi).view(-1)
    wm = wi * m
    flat_f, flat_e = flow.view(-1), excess.view(-1)
    at_sink = sink * width + wi
    at_col, going = at_sink, found
    # follow the path (indices only); the bottleneck is taken afterwards, over all its steps
    forward, backward, on_path, at_sources, visited_rows = [], [], [], [], []
    for _ in range(min(n, m)):  # a path holds at most min(n, m) rows
        at_row = col_to_row.take(at_col)
        at_source = flat_e.take(at_row).clamp_max_(1.0).mul_(going)  # supply left: the source
        next_col = row_to_col.take(at_row)  # (at the source: any column, weighted 0)
        forward.append(torch.add(at_col - wm, at_row, alpha=m))
        backward.append(torch.add(next_col - wm, at_row, alpha=m))
        on_path.append(going)
        at_sources.append(at_source)
        visited_rows.append(at_row)
        going = going - at_source
        if early_exit and not bool(going.amax() > 0.0):
            break
        at_col = next_col
    on = torch.stack(on_path)  # (L, W): 1 while the step is on the path
    at_src = torch.stack(at_sources)  # 1 at the step that reached the source
    back_idx, row_idx = torch.stack(backward), torch.stack(visited_rows)
    # bottleneck: the sink's demand, the flow on each back arc the path takes (steps on it
    # past which it goes on), the source's supply
    limit = torch.minimum(torch.where(on - at_src > 0.5, flat_f.take(back_idx), _BIG),
                          torch.where(at_src > 0.5, flat_e.take(row_idx), _BIG)).amin(0)
    delta = torch.minimum(deficit.view(-1).take(at_sink), limit).mul_(at_src.sum(0))
    deficit.view(-1).index_add_(0, at_sink, -delta)
    flat_f.index_add_(0, torch.stack(forward).view(-1), (on * delta).view(-1))
    flat_f.index_add_(0, back_idx.view(-1), ((at_src - on) * delta).view(-1))
    flat_e.index_add_(0, row_idx.view(-1), (at_src * delta).neg_().view(-1))


def flow_augmentation_bound(n: int, m: int) -> int:
    """Augmentations that always suffice for :func:`transport_plan` on ``n`` x ``m`` problems.

    A problem with ``n_a`` valid rows and ``n_b`` valid columns carries
    :math:`\\operatorname{lcm}(n_a, n_b)` units of integer flow and every augmentation moves at
    least one, so the bound is the largest such lcm.

    Example:
        >>> flow_augmentation_bound(8, 8)  # 8 samples against 7 of 8 neighbors: lcm(8, 7)
        56
    """
    bound = 0
    for a in range(1, n + 1):
        for b in range(1, m + 1):
            bound = max(bound, a * b // math.gcd(a, b))
    return bound


class _PolledStop:
    """Stop a fixed-schedule loop early on CUDA without a host sync: after each round the
    device writes "is any work left?" into pinned host memory (a non-blocking copy) and records
    an event; the host reads a flag only once its event has completed (``Event.query``, which
    never waits), so the loop stops a few rounds after the work ran out, however far the host
    runs ahead of the device. Every extra round is a no-op, so stopping late is exact.
    """

    def __init__(self, rounds: int) -> None:
        self.flags = torch.ones(rounds, dtype=torch.bool, pin_memory=True)
        self.events: collections.deque[tuple[int, torch.cuda.Event]] = collections.deque()
        self.posted = 0

    @staticmethod
    def usable(device: torch.device) -> bool:
        """On CUDA, eagerly, outside CUDA-graph capture."""
        return (device.type == "cuda" and not _is_compiling()
                and not torch.cuda.is_current_stream_capturing())

    def post(self, any_left: Tensor) -> None:
        self.flags[self.posted].copy_(any_left, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.events.append((self.posted, event))
        self.posted += 1

    def done(self) -> bool:
        """``True`` once a completed round reported no work left (never waits)."""
        while self.events and self.events[0][1].query():
            index, _ = self.events.popleft()
            if not bool(self.flags[index]):
                return True
        return False


def _make_stop(rounds: int, device: torch.device) -> _PolledStop | None:
    """The early stop of :func:`transport_plan`'s fixed schedule (``None``: run all rounds)."""
    return _PolledStop(rounds) if _PolledStop.usable(device) else None


@torch.no_grad()
def transport_plan(cost: Tensor, row_valid: Tensor | None = None,
                   col_valid: Tensor | None = None) -> Tensor:
    r"""Batched optimal transport plan between uniform weights on valid rows and valid columns.

    Solves :math:`\min_\pi \sum_{ij} \pi_{ij} C_{ij}` over plans with row sums :math:`1/n_a` on
    the ``n_a`` valid rows and column sums :math:`1/n_b` on the ``n_b`` valid columns -- any
    sizes, so ``Q`` predicted samples against the ``m <= K`` valid neighbors of a border point.
    Scaled by :math:`n_a n_b / g` (:math:`g = \gcd(n_a, n_b)`) this is an integer min-cost flow
    (row supplies :math:`n_b/g`, column demands :math:`n_a/g`), solved exactly by successive
    shortest paths with capacities:

    1. start: column duals :math:`v` from two sweeps of exact coordinate ascent on the
       semi-dual :math:`F(v) = \sum_j v_j/n_b + \sum_i \min_l (C_{il} - v_l)/n_a` (the
       maximizer in :math:`v_j` is the :math:`\lceil n_a/n_b \rceil`-th smallest of
       :math:`C_{ij} - \min_{l \ne j}(C_{il} - v_l)`), row duals
       :math:`u_i = \min_j C_{ij} - v_j`, greedy flow on the tight arcs;
    2. rounds: multi-source shortest paths from the rows with supply left, on reduced costs
       :math:`C_{ij} - u_i - v_j \ge 0` (row -> column arcs, and column -> row arcs of
       length 0 where flow runs), by Bellman-Ford sweeps over every node of every problem at
       once; duals move by the distances (dual feasibility is kept) and the bottleneck of the
       path to the nearest column with demand left is pushed. The path is read back from the
       distances and the sweep at which each node last improved (levels fall along it, so
       zero-length cycles cannot trap it).

    All problems run together; finished ones are masked. On an accelerator (and under
    ``torch.compile``) the schedule is fixed -- at most :func:`flow_augmentation_bound` rounds
    of ``min(n, m) + 2`` sweeps -- with no host sync; on CUDA in eager mode the rounds also stop
    a few rounds after every problem is done, polled without waiting (each round posts "supply
    left?" to pinned host memory with a non-blocking copy and an event; the host reads it once
    the event has completed: 8-9 rounds of the bound's 56 on the 8-vs-masked-8 workload of
    ``benchmarks/estimators.py``). On a CPU, where the check is free, sweeps stop when nothing
    changes, rounds when no problem has supply left, and finished problems leave the work.

    Args:
        cost: ``(B, n, m)`` finite costs, any magnitude (rescaled per problem by a power of
            two when they exceed ``2^40``); non-finite ones are read as 0 (the plan stays
            feasible but means nothing for them).
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
    _check_solver_inputs("transport_plan", cost, (row_valid, col_valid), square=False)
    bsz, n, m = cost.shape
    device, dtype, big = cost.device, cost.dtype, _BIG
    cost = rescale_costs(cost, row_valid, col_valid, host_checks_free(device))
    if row_valid is None:
        row_valid = torch.ones(bsz, n, dtype=torch.bool, device=device)
    if col_valid is None:
        col_valid = torch.ones(bsz, m, dtype=torch.bool, device=device)
    if n == 0 or m == 0 or bsz == 0:
        return cost.new_zeros(bsz, n, m)
    early_exit = host_checks_free(device)
    floats = _float_masks(device)  # the rounds' masks as 0/1 floats (see _relax)
    n_a, n_b = row_valid.sum(1), col_valid.sum(1)
    gcd = torch.gcd(n_a, n_b).clamp_min(1)
    total = (n_a * (n_b // gcd)).to(dtype).clamp_min(1.0)
    # Problems run along the last axis: (row, column, problem) layout, as in `assignment`.
    # Arcs touching a masked row or column cost `big`: never tight, never on a shortest path.
    row_f = row_valid.t().to(dtype).contiguous()
    col_f = col_valid.t().to(dtype).contiguous()
    masked_arc = ((1.0 - row_f).unsqueeze(1) + (1.0 - col_f).unsqueeze(0)).clamp_max_(1.0)
    # Non-finite costs (check_finite=False with a NaN target point) are read as 0: the
    # float-only loop stays finite (a NaN never becomes an index) and the plan feasible; the
    # caller's value, computed from the original costs, is NaN all the same.
    # (a copy always: with B = 1 the permuted view is contiguous already, and `.contiguous()`
    # would hand back the caller's own memory to the in-place edits below)
    cst = cost.permute(1, 2, 0).clone(memory_format=torch.contiguous_format)
    cst.nan_to_num_(0.0, 0.0, 0.0).addcmul_(masked_arc, cost.new_tensor(big))
    excess = row_f * (n_b // gcd).to(dtype)  # supply left per row
    deficit = col_f * (n_a // gcd).to(dtype)  # demand left per column
    flow = cost.new_zeros(n, m, bsz)
    cols_f = torch.arange(m, device=device, dtype=dtype).unsqueeze(1)
    rows_f3 = torch.arange(n, device=device, dtype=dtype).view(n, 1, 1)  # for (n, m, W) keys
    cols_f3 = cols_f.view(1, m, 1)

    # Start: column duals v from _ASCENT_SWEEPS sweeps of exact coordinate ascent on the
    # semi-dual F(v) = sum_j v_j / n_b + sum_i min_l (C_il - v_l) / n_a (concave): with the other
    # columns fixed, F is maximized in v_j at the k-th smallest (k = ceil(n_a / n_b)) of
    # C_ij - min_{l != j} (C_il - v_l) over the rows. Then u_i = min_j C_ij - v_j (dual
    # feasible) and greedy flow on the tight arcs (reduced cost 0 up to rounding): first on the
    # leaves of the tight graph (_tight_leaves: where the flow is forced), then on all of it.
    v = torch.where(col_f > 0.5, cst.amin(0), 0.0)
    kth = (torch.div(n_a + n_b - 1, n_b.clamp_min(1), rounding_mode="floor") - 1).clamp(0, n - 1)
    # the order statistics needed: up to the largest k (free to read on a CPU), else all
    ranks = int(kth.max()) + 1 if early_exit else n
    shifted = cst - v.unsqueeze(0)  # C_il - v_l
    for _ in range(_ASCENT_SWEEPS):
        # min_{l != j} (C_il - v_l) = min(prefix over l < j, updated in this sweep; suffix
        # over l > j, from before it): two row minima per column instead of an (n, m, B) one
        suffix = [shifted[:, m - 1]]
        for j in range(m - 2, 0, -1):
            suffix.append(torch.minimum(suffix[-1], shifted[:, j]))
        suffix.reverse()  # suffix[j - 1] = min over l >= j, for j = 1..m-1
        prefix = None
        for j in range(m):
            others = suffix[j] if j < m - 1 else None  # over l > j
            if prefix is not None:  # over l < j
                others = prefix if others is None else torch.minimum(prefix, others)
            if others is None:  # m = 1: no other column
                others = torch.full_like(cst[:, j], big)
            gap = cst[:, j] - others  # (n, B)
            best = _sorted_rows(gap, ranks).gather(0, kth.unsqueeze(0)).squeeze(0)
            v[j] = torch.where(col_f[j] > 0.5, best, 0.0)
            shifted[:, j] = cst[:, j] - v[j]
            prefix = shifted[:, j] if prefix is None else torch.minimum(prefix, shifted[:, j])
    u = torch.where(row_f > 0.5, shifted.amin(1), 0.0)
    # reduced costs C_ij - u_i - v_j >= 0: from here on only they, not C, u, v, are kept
    reduced = shifted.sub_(u.unsqueeze(1))
    tol = (cst.abs() + u.abs().unsqueeze(1) + v.abs().unsqueeze(0)) * (
        _TIE_ULPS * torch.finfo(dtype).eps)
    tight = (reduced <= tol).to(dtype)
    reduced.clamp_min_(0.0)  # rounding may leave -1 ulp
    # Leaf passes: 2 on a CPU, where each pass leaves fewer problems to the rounds' working set
    # (on the masked workload of benchmarks/estimators.py 53% instead of 72% after two, ~10-15%
    # less time); 1 on the fixed schedule, whose rounds run for every problem anyway.
    for arcs in [None] * (_LEAF_PASSES if early_exit else 1) + [tight]:
        if arcs is None:
            arcs = _tight_leaves(tight, excess, deficit)
        for i in range(n):  # row i fills its tight columns in order: a prefix sum per problem
            room = deficit * arcs[i]  # (m, B), whole units
            before = _exclusive_cumsum_rows(room)
            amount = torch.minimum((excess[i] - before).clamp_min_(0.0), room)
            flow[i] += amount
            excess[i] -= amount.sum(0)
            deficit -= amount

    # Rounds of successive shortest paths. Working set (CPU): the problems still moving flow;
    # a finished problem's flow is stored and it leaves the work (its duals are not needed).
    # The bound holds on every device (the CPU's early exit stops sooner).
    rounds = flow_augmentation_bound(n, m)
    # CUDA, eagerly: the fixed schedule still stops a few rounds after every problem is done
    # (polled, never waiting); typical batches need far fewer rounds than the bound
    stop = None if early_exit else _make_stop(rounds, device)
    # Bellman-Ford sweeps: a simple path visits at most min(n, m) columns, so min(n, m) + 1
    # sweeps settle every distance; one more leaves the last sweep without change.
    steps = min(n, m) + 2
    work = [reduced, flow, excess, deficit]
    pid: Tensor | None = None  # problems of the working set (None: all, in order)
    done_rounds = 0
    while done_rounds < rounds:
        done_rounds += 1
        r, f, e, d = work
        if early_exit:
            active = e.amax(0) > 0.5  # supply left (amounts are whole units)
            n_active = int(active.sum())
            width = active.shape[0]
            if n_active < _COMPACT_AT * width or n_active == 0:
                finished = (~active).nonzero().squeeze(1)
                flow.index_copy_(2, finished if pid is None else pid[finished],
                                 _select_last(f, finished))
                if n_active == 0:
                    pid = None
                    break
                keep = active.nonzero().squeeze(1)
                pid = keep if pid is None else pid[keep]
                work = [_select_last(t, keep) for t in work]
                r, f, e, d = work
        width = r.shape[-1]
        # Multi-source shortest paths (Bellman-Ford, all nodes at once) on the reduced costs:
        # rows with supply left start at 0; row -> column arcs always exist, column -> row arcs
        # where flow > 0 (tight, so of length 0). Predecessors change only on strict
        # improvement: no cycles. On a CPU in float arithmetic (`floats`: bool kernels are
        # several times slower there), elsewhere with bool masks (fewer operations: launches).
        back = _big_where_none(f, floats)  # 0 where flow runs (a back arc), else big
        sink_pen = _big_where_none(d, floats)  # 0 at columns with demand left
        d_row = _big_where_none(e, floats)  # 0 at rows with supply left
        d_col = cost.new_full((m, width), big)
        # Predecessors: a node's is the first neighbour that attained its distance at the sweep
        # of its last (strict) improvement -- what recording them during the sweeps would give,
        # found afterwards from each sweep's distances (kept, small) and the sweep of every
        # node's last improvement. With arc lengths >= 0 they form a tree: the path read back
        # from the sink cannot cycle through zero-length arcs. (Reading them back from the
        # final distances instead fails where a node's distance later dropped by less than
        # rounding shows in its successors' sums: tie-heavy problems then got a wrong path.)
        seen_rows, seen_cols = [], []  # per sweep: the rows' distances the columns were
        # computed from, the columns' distances the rows were computed from
        when_col = cost.new_zeros(m, width)  # sweep of the last improvement
        when_row = cost.new_zeros(n, width)
        scratch = torch.empty_like(r)  # the sweeps' (n, m, W) sums, one buffer for all
        for t in range(steps):
            seen_rows.append(d_row)
            low = torch.add(d_row.unsqueeze(1), r, out=scratch).amin(0)
            d_col, when_col, _ = _relax(d_col, low, when_col, t, floats)
            seen_cols.append(d_col)
            reach = (d_col + sink_pen).amin(0)  # distance of the nearest column with demand
            low = torch.add(d_col.unsqueeze(0), back, out=scratch).amin(1)
            # nodes at or beyond the sink do not matter: moved out of reach (to big or past it)
            if floats:
                low.add_((low - reach).sign_().add_(1.0).clamp_max_(1.0).mul_(big))
            else:
                low = torch.where(low < reach, low, big)
            d_row, when_row, better = _relax(d_row, low, when_row, t, floats)
            if early_exit and not bool(better.amax() > 0.0):
                break
        # the same float sums as at those sweeps, each >= the node's distance: sign() is 0
        # exactly where a neighbour attains it (in place on the gathered copies: no more
        # full-size temporaries)
        then = torch.stack(seen_rows, 1).gather(  # (n, m, W): d_row at column j's sweep
            1, when_col.long().unsqueeze(0).expand(n, m, width))
        pred_col = then.add_(r).sub_(d_col).sign_().mul_(n).add_(rows_f3).amin(0)
        then = torch.stack(seen_cols, 0).gather(  # (n, m, W): d_col at row i's sweep
            0, when_row.long().unsqueeze(1).expand(n, m, width))
        pred_row = then.add_(back).sub_(d_row.unsqueeze(1)).sign_().mul_(m).add_(cols_f3).amin(1)
        reach, sink = _argmin_dim(d_col + sink_pen, 0, cols_f)
        found = (0.5 * big - reach).sign_().clamp_min_(0.0)  # 1.0 where a sink is reached
        _augment(f, e, d, (pred_col, pred_row), sink.long(), found, early_exit)
        # Duals: every node moves by (sink distance - its distance)^+ (u_i up, v_j down), so
        # the reduced cost of arc ij changes by shift_j - shift_i: arcs stay >= 0 and the
        # shortest path to the sink becomes tight.
        shift_row = (reach - d_row).clamp_min_(0.0).mul_(found)
        shift_col = (reach - d_col).clamp_min_(0.0).mul_(found)
        r.add_(shift_col.unsqueeze(0)).sub_(shift_row.unsqueeze(1)).clamp_min_(0.0)
        if stop is not None:
            stop.post((e > 0.5).any())
            if stop.done():
                break
    if pid is not None:  # CPU, stopped by the bound (never, with finite costs): store the work
        flow.index_copy_(2, pid, work[1])
    return (flow / total).permute(2, 0, 1)


@torch.no_grad()
def monotone_plan(x: Tensor, y: Tensor, row_valid: Tensor, col_valid: Tensor) -> Tensor:
    r"""Optimal plan between uniform weights on the valid points of 1-D clouds: the monotone
    (quantile) coupling, optimal for every convex cost :math:`|x - y|^p`, :math:`p \ge 1`.

    With the valid points sorted, row of rank :math:`r` holds the interval
    :math:`[r/n_a, (r+1)/n_a)` of mass, column of rank :math:`s` the interval
    :math:`[s/n_b, (s+1)/n_b)`, and :math:`\pi_{ij}` is the length of their overlap -- computed
    in integer units of :math:`1/(n_a n_b)`, so the marginals are as exact as
    :func:`transport_plan`'s. A few sorts and one broadcast: no iterations (ties are broken
    arbitrarily; every monotone coupling is optimal).

    Args:
        x: ``(B, N, 1)`` points. y: ``(B, M, 1)`` points.
        row_valid: ``(B, N)`` bool. col_valid: ``(B, M)`` bool.

    Returns:
        ``(B, N, M)`` plan in ``x``'s dtype (0 for empty problems).

    Example:
        >>> import torch
        >>> from ctxpred.wasserstein.exact import monotone_plan
        >>> x = torch.tensor([[[2.0], [0.0], [1.0]]])
        >>> y = torch.tensor([[[5.0], [-1.0]]])
        >>> monotone_plan(x, y, torch.ones(1, 3, dtype=torch.bool),
        ...               torch.ones(1, 2, dtype=torch.bool)) * 6
        tensor([[[2., 0.],
                 [0., 2.],
                 [1., 1.]]])
    """
    dtype = x.dtype
    n_a = row_valid.sum(1, keepdim=True)
    n_b = col_valid.sum(1, keepdim=True)

    def units(points: Tensor, valid: Tensor, width: Tensor) -> tuple[Tensor, Tensor]:
        """``(lo, hi)`` of each point's mass interval in units of ``1 / (n_a n_b)``."""
        keys = points.squeeze(-1).masked_fill(~valid, math.inf)  # invalid points sort last
        order = keys.argsort(1)
        ranks = torch.empty_like(order).scatter_(
            1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        lo = torch.where(valid, ranks * width, 0)
        hi = torch.where(valid, lo + width, 0)
        return lo, hi

    lo_x, hi_x = units(x, row_valid, n_b)
    lo_y, hi_y = units(y, col_valid, n_a)
    overlap = (torch.minimum(hi_x.unsqueeze(2), hi_y.unsqueeze(1))
               - torch.maximum(lo_x.unsqueeze(2), lo_y.unsqueeze(1))).clamp_min_(0)
    total = (n_a * n_b).clamp_min(1).unsqueeze(2)
    return overlap.to(dtype) / total.to(dtype)


def _uniform_plan(cost: Tensor, x: Tensor, y: Tensor, rows: Tensor, cols: Tensor,
                  index: Tensor | None = None) -> Tensor:
    """The optimal plan of uniform weights on any supports: :func:`monotone_plan` for 1-D
    points (``C = 1``, e.g. grayscale pixel targets), else :func:`transport_plan`. ``index``:
    the problems of ``x`` and ``y`` that ``cost``, ``rows`` and ``cols`` hold (default all)."""
    if x.shape[-1] == 1:
        if index is not None:
            x, y = x[index], y[index]
        return monotone_plan(x, y, rows, cols).to(cost.dtype)
    return transport_plan(cost, rows, cols)


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
    general weights.

    Points with few coordinates (``D <= max(N, M)``: a problem's points take no more room than
    its cost matrix): each group is solved as a batch of its own (its own costs, value and
    gradient, e.g. the assignment's matched-pair value) and the values put back in order. More
    coordinates: copying each group's points would cost more than it saves, so only the
    ``(B, N, M)`` costs are split between the solvers and the value and its gradient come from
    one plan for all problems.
    """
    device = prep.x.device
    groups = [
        (chosen.nonzero().squeeze(1).to(device), solve)
        for chosen, solve in ((uniform & equal, _solve_assignment), (uniform & ~equal, _solve_flow),
                              (~uniform, _solve_transport))
    ]
    for index, solve in groups:
        if index.numel() == prep.x.shape[0]:
            return solve(prep, p)
    x, y, a, b = prep.x, prep.y, prep.a, prep.b
    if x.shape[-1] <= max(x.shape[-2], y.shape[-2]):
        parts = [(index, solve(_subset(prep, index), p)) for index, solve in groups
                 if index.numel()]
        order = torch.cat([i for i, _ in parts])
        values = torch.cat([v for _, v in parts])
        return values.new_zeros(x.shape[0]).index_copy(0, order, values)
    mean = _center_of(y, b)
    with torch.no_grad():
        cost = _centered_cost(x.detach(), y.detach(), mean, p)
        plan = torch.zeros_like(cost)
        (assign, _), (flow, _), (general, _) = groups
        if assign.numel():
            plan[assign] = _assignment_plan(cost[assign], a[assign], b[assign])
        if flow.numel():
            plan[flow] = _uniform_plan(cost[flow], x.detach(), y.detach(), a[flow] > 0,
                                       b[flow] > 0, flow)
        if general.numel():
            plan[general] = _pot_plans(_subset(prep, general), p).to(cost.dtype)
    return plan_cost(plan, x, y, p, cost if p == 2 else None, mean)


def _assignment_plan(cost: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``(B, N, M)`` plan of the optimal matching between the ``a > 0`` rows and the ``b > 0``
    columns (equal uniform supports, as the caller routes them): ``a_i`` on each matched pair."""
    bsz, n_x, n_y = cost.shape
    n = max(n_x, n_y)
    rows, cols = a > 0, b > 0
    if n_x < n or n_y < n:  # pad to square with masked rows / columns
        padded = cost.new_zeros(bsz, n, n)
        padded[:, :n_x, :n_y] = cost
        cost = padded
        rows = torch.cat([rows, rows.new_zeros(bsz, n - n_x)], 1)
        cols = torch.cat([cols, cols.new_zeros(bsz, n - n_y)], 1)
    match = assignment(cost, rows, cols)
    plan = torch.zeros(bsz, n, n, dtype=cost.dtype, device=cost.device)
    plan.scatter_(2, match.clamp_min(0).unsqueeze(-1), 1.0)
    return plan[:, :n_x, :n_y] * a.unsqueeze(-1)  # a = 0 on unmatched rows


def _solve_flow(prep: Prepared, p: float, kernel: bool = False) -> Tensor:
    """Device min-cost flow (:func:`transport_plan`) for uniform weights on any supports;
    ``kernel``: each problem solved by one program of the fused Triton kernel instead
    (:mod:`ctxpred.wasserstein._triton`, ``solver="triton"``)."""
    x, y, a, b = prep.x, prep.y, prep.a, prep.b
    mean = _center_of(y, b)
    with torch.no_grad():
        cost = _centered_cost(x.detach(), y.detach(), mean, p)
        if kernel:
            from ctxpred.wasserstein._triton import triton_transport_plan

            plan = triton_transport_plan(cost, a > 0, b > 0)
        else:
            plan = _uniform_plan(cost, x.detach(), y.detach(), a > 0, b > 0)
    return plan_cost(plan, x, y, p, cost if p == 2 else None, mean)


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
        cost = _centered_cost(x.detach(), y.detach(), _center_of(y, b), p, matching_only=True)
        match = assignment(cost, a > 0, b > 0)
    index = match.clamp_min(0)
    # A non-finite target point (check_finite=False) makes the center, a weighted mean of y,
    # and so every cost of its problem NaN or inf; the matching found on such costs may skip
    # its column, and the sum over the matched pairs alone would be finite and wrong. NaN
    # instead, like on the other solvers: 0 * (one cost of the problem) is 0 or NaN.
    poison = cost[:, :1, :1].sum((1, 2)).mul_(0.0)
    if p == 2 and not (torch.is_grad_enabled() and y.requires_grad):
        return _MatchedSquaredCost.apply(x, y.detach(), index, a) + poison
    return (a * segment_cost(x - _take_rows(y, index), p)).sum(-1) + poison


def _centered_cost(x: Tensor, y: Tensor, mean: Tensor, p: float, matching_only: bool = False
                   ) -> Tensor:
    r"""``(B, N, M)`` cost matrix :math:`\|x_i - y_j\|^p` of points centered on ``mean``
    ``(B, 1, D)`` (:func:`_center_of`: far-off clouds lose no precision), without gradient.

    ``matching_only`` (``p = 2``): only :math:`-2 \langle x_i, y_j \rangle` -- :math:`|x_i|^2`
    and :math:`|y_j|^2` are row and column constants, which leave an optimal matching unchanged
    (for an assignment, whose value comes from the matched differences). On a CPU the problems
    go in chunks (:func:`~ctxpred.wasserstein._validate.chunk_size`), so the centered copies
    stay small and reuse the same memory.
    """
    bsz, n, d = x.shape
    m = y.shape[1]

    def block(lo: int, hi: int) -> Tensor:  # the cost of problems lo:hi
        c = mean[lo:hi]
        xc, yc = x[lo:hi] - c, y[lo:hi] - c
        if p == 2 and matching_only:
            return torch.bmm(xc, yc.transpose(1, 2)).mul_(-2.0)
        return pairwise_cost(xc, yc, p)

    chunk = chunk_size(bsz, max(n, m) * d, x.device)
    if chunk >= bsz:
        return block(0, bsz)
    cost = x.new_empty(bsz, n, m)
    for i in range(0, bsz, chunk):
        cost[i : i + chunk] = block(i, i + chunk)
    return cost


def _center_of(y: Tensor, b: Tensor) -> Tensor:
    """``(B, 1, D)`` the center of both sets, the ``b``-weighted mean of ``y`` (no gradient: the
    value is translation invariant, so its gradient through the center is 0)."""
    return weighted_mean(y.detach(), b)


def _take_rows(y: Tensor, index: Tensor) -> Tensor:
    """``y[b, index[b, i]]`` for ``y (B, M, D)``, ``index (B, N)`` -> ``(B, N, D)``: whole rows
    by ``index_select`` (about twice as fast on CPUs as ``gather`` with an expanded index)."""
    bsz, m, d = y.shape
    rows = index + torch.arange(bsz, device=index.device).unsqueeze(1) * m
    return y.reshape(bsz * m, d).index_select(0, rows.reshape(-1)).view(*index.shape, d)


class _MatchedSquaredCost(torch.autograd.Function):
    r""":math:`\sum_i a_i \|x_i - y_{\sigma(i)}\|^2` per problem with a one-pass backward
    :math:`2 a_i (x_i - y_{\sigma(i)})` (y constant: the usual case, a target).

    Nothing of size ``(B, N, D)`` is kept between the passes: both go in chunks of problems on
    a CPU (small, cache-resident temporaries), the backward gathering :math:`y_{\sigma(i)}`
    again -- one full-size allocation per call, the gradient itself, written once.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, y: Tensor, index: Tensor, a: Tensor
    ) -> Tensor:
        bsz, n, d = x.shape
        chunk = chunk_size(bsz, n * d, x.device)
        value = x.new_empty(bsz)
        for i in range(0, bsz, chunk):
            diff = _take_rows(y[i : i + chunk], index[i : i + chunk])
            torch.sub(x[i : i + chunk], diff, out=diff)
            sq = torch.linalg.vector_norm(diff, dim=-1).square_()
            torch.sum(sq.mul_(a[i : i + chunk]), -1, out=value[i : i + chunk])
        ctx.save_for_backward(x, y, index, a)
        return value

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor):  # type: ignore[override]
        x, y, index, a = ctx.saved_tensors
        scale = (2.0 * a * grad.unsqueeze(-1)).unsqueeze(-1)
        if torch.is_grad_enabled():  # create_graph=True: out-of-place, differentiable in x
            return (x - _take_rows(y, index)) * scale, None, None, None
        # in chunks: each chunk's gathered rows stay in cache, the output is written once
        bsz, n, d = x.shape
        chunk = chunk_size(bsz, n * d, x.device)
        if chunk >= bsz:
            out = _take_rows(y, index)
            torch.sub(x, out, out=out)
            return out.mul_(scale), None, None, None
        out = torch.empty_like(x)
        for i in range(0, bsz, chunk):
            rows = _take_rows(y[i : i + chunk], index[i : i + chunk])
            torch.sub(x[i : i + chunk], rows, out=rows)
            torch.mul(rows, scale[i : i + chunk], out=out[i : i + chunk])
        return out, None, None, None


def _pot_plans(prep: Prepared, p: float) -> Tensor:
    """``(B, N, M)`` float64 optimal plans from POT's network simplex ``ot.emd``, one problem at
    a time on the host (general weights; zeros for empty problems)."""
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
        cost = pairwise_cost(xc.double(), yc.double(), p)
        cost = (cost / simplex_scale(cost)).cpu().numpy()  # (absolute tolerances in the simplex)
        a_np, b_np = a.double().cpu().numpy(), b.double().cpu().numpy()
        nonempty = prep.nonempty.cpu().tolist()
        plans = torch.zeros(cost.shape, dtype=torch.float64)
        for k in range(cost.shape[0]):
            if nonempty[k]:
                wa, wb = a_np[k], b_np[k]
                plans[k] = torch.from_numpy(ot.emd(wa / wa.sum(), wb / wb.sum(), cost[k]))
    return plans.to(x.device)


def _solve_transport(prep: Prepared, p: float) -> Tensor:
    plans = _pot_plans(prep, p).to(prep.x.dtype)
    diff = prep.x.unsqueeze(2) - prep.y.unsqueeze(1)
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
            accelerators. ``"flow"``: the device min-cost flow (:func:`transport_plan`; the
            sorted coupling :func:`monotone_plan` for 1-D points) for uniform weights on any
            supports. ``"transport"``: POT ``ot.emd`` per problem on the
            host, any weights. ``"triton"``: the problems of ``"flow"`` (uniform weights on any
            supports, ``N, M <= 32``), each solved whole by one program of a fused Triton kernel
            (:mod:`ctxpred.wasserstein._triton`): one launch instead of the batched solvers'
            hundreds to thousands of operations. CUDA tensors and the ``triton`` package (part of
            PyTorch's CUDA wheels on Linux); eager mode; costs compared in float32. A solver
            given weights it cannot handle raises :class:`~ctxpred.errors.ValueRangeError`
            (CPU, or ``check_finite=True``) or fails a device-side assert (accelerators: the
            error surfaces at the next synchronization).
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
    if solver not in ("auto", "assignment", "flow", "transport", "triton"):
        raise ValueRangeError(
            f"solver must be 'auto', 'assignment', 'flow', 'transport' or 'triton', got {solver!r}"
        )
    prep = prepare(x, y, x_weights, y_weights, p, check_finite)
    with float32_core(prep.x.device):
        # Reading per-problem flags on the host is free on a CPU in eager mode, and already paid
        # for when check_finite=True (that check syncs); elsewhere nothing may wait for the device.
        routable = check_finite or host_checks_free(prep.x.device)
        if not prep.weighted and solver in ("auto", "flow", "triton"):
            if solver == "auto" and x.shape[-2] == y.shape[-2]:
                return restore(_solve_assignment(prep, p), prep)
            return restore(_SOLVE.get(solver, _solve_flow)(prep, p), prep)
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
        message = _NEEDS.get(solver, _FLOW_NEEDS)
        if routable:
            if not bool(ok.all()):
                raise ValueRangeError(message)
        else:  # no host sync: a device-side assert (it fails the call asynchronously)
            torch._assert_async(ok.all(), message)
        solve = _SOLVE.get(solver, _solve_flow)
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
_TRITON_NEEDS = (
    "solver='triton' needs uniform weights on each side's support (0/1 masks); for general "
    "weights use solver='transport' (POT on the host), or 'auto' with check_finite=True"
)
_NEEDS = {"assignment": _ASSIGNMENT_NEEDS, "triton": _TRITON_NEEDS}  # else _FLOW_NEEDS
_SOLVE = {"assignment": _solve_assignment,  # else _solve_flow
          "triton": functools.partial(_solve_flow, kernel=True)}


class ExactWasserstein(EstimatorModule):
    r"""Module form of :func:`exact_wasserstein`, its options fixed (no learnable parameters).

    Args:
        p: cost exponent ``>= 1``; the value is :math:`W_p^p` (``p=2``: squared Euclidean cost).
        solver: ``"auto"``, ``"assignment"``, ``"flow"``, ``"transport"`` or ``"triton"`` (see
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
