"""The Triton program of :mod:`ctxpred.wasserstein._triton` (imported only when that module
builds its kernel: importing it imports ``triton``). Kept apart so that its ``tl.constexpr``
annotations are real objects (Triton reads them), not the strings of postponed annotations."""

import triton
import triton.language as tl

__all__ = ["flow_kernel"]


def flow_program(cost_ptr, row_ptr, col_ptr, plan_ptr, n, m, BR: tl.constexpr,
                 BC: tl.constexpr):
    """Program ``pid`` solves problem ``pid``: ``cost_ptr`` ``(B, n, m)`` float32 costs,
    ``row_ptr`` ``(B, n)`` / ``col_ptr`` ``(B, m)`` int8 validity, ``plan_ptr`` ``(B, n, m)``
    float32 output: the optimal flow in whole units (``n_b / g`` per valid row, ``n_a / g`` per
    valid column; the caller divides by their total).
    ``BR >= n`` and ``BC >= m`` are the power-of-two tile sizes. The algorithm is described in
    :mod:`ctxpred.wasserstein._triton`."""
    # One program = one problem. Tiles are (BR, BC) >= (n, m), padded rows/columns invalid.
    pid = tl.program_id(0).to(tl.int64)
    ri = tl.arange(0, BR)
    cj = tl.arange(0, BC)
    rin = ri < n
    cin = cj < m
    rv = tl.load(row_ptr + pid * n + ri, mask=rin, other=0) != 0
    cv = tl.load(col_ptr + pid * m + cj, mask=cin, other=0) != 0
    inb = rv[:, None] & cv[None, :]
    cell = pid * n * m + ri[:, None] * m + cj[None, :]
    inside = rin[:, None] & cin[None, :]
    c = tl.load(cost_ptr + cell, mask=inside, other=0.0).to(tl.float32)
    inf = float("inf")

    # Units: supplies n_b / g on valid rows, demands n_a / g on valid columns.
    na = tl.sum(rv.to(tl.int32), 0)
    nb = tl.sum(cv.to(tl.int32), 0)
    ga = na
    gb = nb
    while gb > 0:
        gt = ga % gb
        ga = gb
        gb = gt
    g = tl.maximum(ga, 1)
    supply = tl.where(rv, nb // g, 0)
    demand = tl.where(cv, na // g, 0)

    # Dual-feasible start: row then column reduction.
    cm = tl.where(inb, c, 1e30)  # finite: a row or column with no valid partner stays finite
    u = tl.where(rv, tl.min(cm, 1), 0.0)
    v = tl.where(cv, tl.min(cm - u[:, None], 0), 0.0)

    flow = tl.zeros([BR, BC], dtype=tl.int32)
    left = tl.sum(supply, 0)
    rounds = left * 0
    while (left > 0) & (rounds < BR * BC):
        red = tl.where(inb, tl.maximum(c - u[:, None] - v[None, :], 0.0), inf)
        # Dijkstra from every row with supply left.
        seen_r = supply > 0
        dist_r = tl.where(seen_r, 0.0, inf)
        pred_r = tl.full([BR], -1, tl.int32)
        reach = tl.where(seen_r[:, None], red, inf)
        dist_c = tl.min(reach, 0)
        pred_c = tl.argmin(reach, 0).to(tl.int32)
        seen_c = cj < 0
        found = left * 0
        sink = left * 0
        dstar = tl.sum(tl.zeros([BR], dtype=tl.float32), 0)  # a float32 scalar 0
        steps = left * 0
        while (found == 0) & (steps < BC):
            open_c = tl.where(seen_c | (~cv), inf, dist_c)
            dj = tl.min(open_c, 0)
            j = tl.argmin(open_c, 0).to(tl.int32)
            at_j = cj == j
            seen_c = seen_c | at_j
            is_sink = tl.sum(tl.where(at_j, demand, 0), 0) > 0
            col_flow = tl.sum(tl.where(at_j[None, :], flow, 0), 1)
            # Rows behind the column (flow runs on their arcs) are reached at the same distance.
            # (If the column is the sink the search ends here: those rows' dual change is 0.)
            new = (col_flow > 0) & (~seen_r)
            dist_r = tl.where(new, dj, dist_r)
            pred_r = tl.where(new, j, pred_r)
            seen_r = seen_r | new
            reach = tl.where(new[:, None], dj + red, inf)
            via = tl.min(reach, 0)
            via_row = tl.argmin(reach, 0).to(tl.int32)
            better = via < dist_c  # never a scanned column: via >= dj >= their distances
            dist_c = tl.where(better, via, dist_c)
            pred_c = tl.where(better, via_row, pred_c)
            found = tl.where(is_sink, 1, 0) * tl.where(dj < 1e30, 1, 0)
            sink = j
            dstar = tl.where(dj < 1e30, dj, 0.0)
            steps += 1
        # Dual update over the scanned nodes (the sink's own change is 0; none if no sink was
        # reached, which only NaN costs cause: distances are >= 0 and dstar is then 0).
        ok = found > 0
        dstar = tl.where(ok, dstar, 0.0)
        u = u + tl.where(seen_r, tl.maximum(dstar - dist_r, 0.0), 0.0)
        v = v - tl.where(seen_c, tl.maximum(dstar - dist_c, 0.0), 0.0)
        # Walk the path back from the sink: its arcs and its bottleneck.
        fwd = tl.zeros([BR, BC], dtype=tl.int32)
        back = tl.zeros([BR, BC], dtype=tl.int32)
        bottleneck = tl.sum(tl.where(cj == sink, demand, 0), 0)
        source = left * 0
        col = sink
        walking = found
        hops = left * 0
        while (walking > 0) & (hops < BR + BC):
            at_j = cj == col
            i = tl.sum(tl.where(at_j, pred_c, 0), 0)
            at_i = ri == i
            pj = tl.sum(tl.where(at_i, pred_r, 0), 0)
            arc_back = at_i[:, None] & (cj[None, :] == pj)
            fwd = fwd + tl.where(at_i[:, None] & at_j[None, :], 1, 0)
            back = back + tl.where(arc_back, 1, 0)
            at_source = pj < 0
            room = tl.where(at_source, tl.sum(tl.where(at_i, supply, 0), 0),
                            tl.sum(tl.sum(tl.where(arc_back, flow, 0), 1), 0))
            bottleneck = tl.minimum(bottleneck, room)
            source = i
            walking = tl.where(at_source, 0, 1)
            col = tl.where(at_source, col, pj)
            hops += 1
        push = tl.where(ok, bottleneck, 0)
        flow = flow + push * (fwd - back)
        supply = supply - tl.where(ri == source, push, 0)
        demand = demand - tl.where(cj == sink, push, 0)
        left = tl.where(ok, left - push, 0)
        rounds += 1

    tl.store(plan_ptr + cell, flow.to(tl.float32), mask=inside)


flow_kernel = triton.jit(flow_program)
"""The program as a kernel: compiled for the GPU, or -- when ``TRITON_INTERPRET=1`` was set
before ``triton`` was first imported -- run by Triton's interpreter (numpy, CPU tensors)."""
