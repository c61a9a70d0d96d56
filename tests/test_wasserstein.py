"""Wasserstein estimators against independent oracles (POT, scipy, brute force) and properties."""

from __future__ import annotations

import itertools
import warnings
from typing import ClassVar
from unittest import mock

import numpy as np
import ot
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog
from torch.utils._python_dispatch import TorchDispatchMode

import ctxpred
from ctxpred import errors as errors_module
from ctxpred import functional as F
from ctxpred.errors import CtxpredError, DTypeError, ShapeError, ValueRangeError, _all_finite
from ctxpred.wasserstein import (
    ExactWasserstein,
    GaussianWasserstein,
    SinkhornWasserstein,
    SlicedWasserstein,
    assignment,
    exact_wasserstein,
    gaussian_w2,
    gaussian_wasserstein,
    random_directions,
    sinkhorn_wasserstein,
    sliced_wasserstein,
    sqrtm_psd,
    wasserstein,
)

SETTINGS = settings(max_examples=25, deadline=None)
FAST = settings(max_examples=12, deadline=None)


def pot_oracle(x, y, a=None, b=None, p=2):
    """ot.emd2 per problem, float64, on (B, N, D) / (B, M, D)."""
    x, y = x.double().numpy(), y.double().numpy()
    out = []
    for k in range(x.shape[0]):
        wa = np.full(x.shape[1], 1.0 / x.shape[1]) if a is None else a[k].double().numpy()
        wb = np.full(y.shape[1], 1.0 / y.shape[1]) if b is None else b[k].double().numpy()
        if wa.sum() == 0 or wb.sum() == 0:
            out.append(0.0)
            continue
        cost = ot.dist(x[k], y[k], metric="sqeuclidean")
        if p != 2:
            cost = np.sqrt(cost) ** p
        out.append(ot.emd2(wa / wa.sum(), wb / wb.sum(), cost))
    return torch.tensor(out, dtype=torch.float64)


def linprog_oracle(x, y, a, b):
    """Transport LP solved by scipy's HiGHS (independent of POT), W_2^2, one problem."""
    x, y, a, b = (t.double().numpy() for t in (x, y, a, b))
    a, b = a / a.sum(), b / b.sum()
    n, m = len(a), len(b)
    cost = ((x[:, None] - y[None]) ** 2).sum(-1).ravel()
    rows = np.kron(np.eye(n), np.ones((1, m)))
    cols = np.kron(np.ones((1, n)), np.eye(m))
    res = linprog(cost, A_eq=np.vstack([rows, cols]), b_eq=np.concatenate([a, b]),
                  bounds=(0, None), method="highs")
    return res.fun


def clouds(seed, batch, n, m, d, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, d, generator=g, dtype=dtype), torch.randn(
        batch, m, d, generator=g, dtype=dtype
    )


# ---------------------------------------------------------------- exact vs oracles


@SETTINGS
@given(st.integers(0, 10**6), st.integers(1, 9), st.integers(1, 6), st.sampled_from([1, 2, 3]))
def test_exact_assignment_matches_pot(seed, n, d, p):
    x, y = clouds(seed, 6, n, n, d)
    got = exact_wasserstein(x, y, p=p, solver="assignment")
    torch.testing.assert_close(got, pot_oracle(x, y, p=p), rtol=1e-5, atol=1e-9)


@SETTINGS
@given(st.integers(0, 10**6), st.integers(2, 9), st.integers(1, 5))
def test_exact_equal_masks_matches_pot(seed, n, d):
    """0/1 masks with equal counts per problem (the loss's case) -> assignment path."""
    g = torch.Generator().manual_seed(seed)
    x, y = clouds(seed, 8, n, n + 2, d)
    counts = torch.randint(0, n + 1, (8,), generator=g)
    mx = (torch.rand(8, n, generator=g).argsort(-1) < counts[:, None]).double()
    my = (torch.rand(8, n + 2, generator=g).argsort(-1) < counts[:, None]).double()
    got = exact_wasserstein(x, y, mx, 3.0 * my, solver="assignment")
    torch.testing.assert_close(got, pot_oracle(x, y, mx, my), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(exact_wasserstein(x, y, mx, my), got)  # "auto" agrees


@FAST
@given(st.integers(0, 10**6), st.integers(2, 8), st.integers(1, 4))
def test_exact_auto_mixes_solvers_per_problem(seed, n, d):
    """The loss's case: Q uniform samples vs masked neighbors; border problems need transport."""
    g = torch.Generator().manual_seed(seed)
    x, y = clouds(seed, 10, n, n, d)
    mask = (torch.rand(10, n, generator=g) > 0.3).double()
    mask[:5] = 1.0
    got = exact_wasserstein(x, y, None, mask)
    torch.testing.assert_close(got, pot_oracle(x, y, None, mask), rtol=1e-5, atol=1e-9)


@FAST
@given(st.integers(0, 10**6), st.integers(1, 6), st.integers(1, 6), st.integers(1, 4))
def test_exact_transport_matches_linprog(seed, n, m, d):
    g = torch.Generator().manual_seed(seed)
    x, y = clouds(seed, 3, n, m, d)
    a = torch.rand(3, n, generator=g, dtype=torch.float64) * (torch.rand(3, n, generator=g) > 0.2)
    b = torch.rand(3, m, generator=g, dtype=torch.float64)
    a[:, 0] += 0.1  # at least one point with mass
    got = exact_wasserstein(x, y, a, b)
    want = torch.tensor([linprog_oracle(x[k], y[k], a[k], b[k]) for k in range(3)],
                        dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("n", [3, 8, 13])
def test_assignment_subset_dp_and_hungarian_match_scipy(n, monkeypatch):
    """Both exact cores (subset DP for n <= 8, shortest augmenting path above, the latter with
    the CPU's column-reduction start and with the accelerators' fixed schedule) vs scipy."""
    from ctxpred.wasserstein import exact

    g = torch.Generator().manual_seed(n)
    cost = torch.rand(40, n, n, generator=g, dtype=torch.float64)
    cost[:10] = (4 * cost[:10]).round()  # many ties
    row_valid = torch.rand(40, n, generator=g) < 0.7
    col_valid = torch.zeros(40, n, dtype=torch.bool)
    for b in range(40):
        col_valid[b, torch.randperm(n, generator=g)[: int(row_valid[b].sum())]] = True
    every = torch.ones(40, n, dtype=torch.bool)
    # 0: force the Hungarian path; fixed: the accelerators' schedule (no CPU start, no early
    # exit); all valid: the CPU start's unmasked branch
    for limit, fixed, all_valid in ((8, False, False), (0, False, False), (0, True, False),
                                    (0, False, True), (0, True, True)):
        monkeypatch.setattr(exact, "_DP_MAX_N", limit)
        monkeypatch.setattr(exact, "host_checks_free", lambda device, fixed=fixed: not fixed)
        if all_valid:
            row_valid = col_valid = every
        match = assignment(cost, row_valid, col_valid)
        _assert_optimal_matchings(cost, row_valid, col_valid, match, rel=0.0, abs=1e-9)


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("masked", [False, True])
def test_assignment_subset_dp_chunks_match_one_chunk(n, masked, monkeypatch):
    """CPU chunking of the subset DP (ragged last chunk, one shared table): every problem gets the
    matching it gets in a single chunk. A misaligned chunk offset would hand some problems another
    problem's costs."""
    from ctxpred.wasserstein import exact

    g = torch.Generator().manual_seed(10 * n + masked)
    cost = torch.rand(43, n, n, generator=g)
    cost[:8] = (4 * cost[:8]).round()  # ties
    row_valid = torch.rand(43, n, generator=g) < (0.7 if masked else 2.0)
    col_valid = torch.zeros(43, n, dtype=torch.bool)
    for b in range(43):
        col_valid[b, torch.randperm(n, generator=g)[: int(row_valid[b].sum())]] = True
    whole = assignment(cost, row_valid, col_valid)
    monkeypatch.setattr(exact, "_DP_CHUNK_ELEMENTS", 5 << n)  # chunks of 5 problems
    chunked = assignment(cost, row_valid, col_valid)
    value = (cost.gather(2, chunked.clamp_min(0).unsqueeze(-1)).squeeze(-1) * row_valid).sum(1)
    want = (cost.gather(2, whole.clamp_min(0).unsqueeze(-1)).squeeze(-1) * row_valid).sum(1)
    torch.testing.assert_close(value, want, rtol=0, atol=0)
    assert ((chunked >= 0) == row_valid).all()
    for b in range(43):  # a matching: distinct valid columns
        got = chunked[b, row_valid[b]]
        assert col_valid[b, got].all() and got.unique().numel() == got.numel()


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("supports", ["equal", "unequal", "mixed"])
def test_exact_chunked_cost_value_and_gradients_match(p, supports, monkeypatch):
    """CPU chunking of the centered costs, the matched value and the plan gradient (ragged last
    chunk): values equal POT's ``ot.emd2`` per problem and the gradients in ``x`` and ``y`` equal
    the unchunked ones -- for the assignment (equal masks), the flow (unequal) and both routed
    per problem (mixed)."""
    from ctxpred.wasserstein import _validate

    x, y = clouds(3, 37, 6, 6, 5, torch.float32)
    x = (x + 1e3).requires_grad_(True)  # far from the origin: each chunk centers on its own
    y = (y + 1e3).requires_grad_(True)
    wx, wy = torch.ones(37, 6), torch.ones(37, 6)
    wx[::3, 4:] = 0.0
    if supports == "equal":  # masked like their targets (match_mask=True)
        wy[::3, 4:] = 0.0
    elif supports == "unequal":
        wy[:, 5:] = 0.0
    else:
        wy[::2, 3:] = 0.0

    def run():
        value = exact_wasserstein(x, y, wx, wy, p=p)
        grads = torch.autograd.grad((value * torch.arange(37.0)).sum(), (x, y))
        # y constant (a target): the assignment's matched-pair value has its own backward
        fixed = exact_wasserstein(x, y.detach(), wx, wy, p=p)
        (grad_x,) = torch.autograd.grad((fixed * torch.arange(37.0)).sum(), (x,))
        torch.testing.assert_close(fixed, value, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad_x, grads[0], rtol=1e-5, atol=1e-5)
        return (value, *grads, fixed, grad_x)

    whole = run()
    monkeypatch.setattr(_validate, "CHUNK_ELEMENTS", 4 * 6 * 5)  # chunks of 4 problems
    chunked = run()
    xd, yd = x.detach().double(), y.detach().double()
    ax = (wx.double() / wx.sum(1, keepdim=True)).numpy()
    ay = (wy.double() / wy.sum(1, keepdim=True)).numpy()
    want = torch.tensor([
        ot.emd2(ax[k], ay[k], (torch.cdist(xd[k], yd[k]) ** p).numpy()) for k in range(37)],
        dtype=torch.float64)
    torch.testing.assert_close(chunked[0].double(), want, rtol=1e-5, atol=1e-4)
    for got, expected in zip(chunked, whole):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("supports", ["equal", "unequal"])
def test_exact_double_backward_is_the_envelope_hessian(supports):
    """create_graph=True: the gradient 2 r_i (x_i - (pi y)_i / r_i) is differentiable again,
    and with the plan held fixed its derivative along v is 2 r_i v_i (r_i: row mass)."""
    x, y = clouds(5, 6, 5, 5, 3)
    x.requires_grad_(True)
    wy = torch.ones(6, 5, dtype=torch.float64)
    if supports == "unequal":
        wy[:, 3:] = 0.0
    value = exact_wasserstein(x, y, None, wy)
    (grad,) = torch.autograd.grad(value.sum(), x, create_graph=True)
    v = torch.randn_like(x)
    (hvp,) = torch.autograd.grad((grad * v).sum(), x)
    torch.testing.assert_close(hvp, 2.0 * v / 5)


def test_low_level_solvers_reject_bad_inputs_clearly():
    """assignment / transport_plan are public: a uint8 mask used to be read as indices on the
    Hungarian path (valid rows left unmatched, silently); other slips failed deep inside."""
    cost = torch.rand(1, 10, 10)
    rows = torch.ones(1, 10, dtype=torch.uint8)
    for solve in (assignment, transport_plan):
        with pytest.raises(DTypeError, match=r"row_valid must be a bool tensor, got torch.uint8"):
            solve(cost, rows, None)
        with pytest.raises(DTypeError, match=r"col_valid must be a bool tensor, got torch.float32"):
            solve(cost, None, torch.ones(1, 10))
        with pytest.raises(ShapeError, match=r"row_valid must have shape \(1, 10\)"):
            solve(cost, torch.ones(1, 9, dtype=torch.bool), None)
        with pytest.raises(ShapeError, match=r"floating-point \(B, n, m\).*\(10, 10\)"):
            solve(cost[0])
        with pytest.raises(DTypeError, match="float32 or float64"):
            solve(cost.half())
    with pytest.raises(ShapeError, match=r"square \(B, n, n\), got \(1, 3, 4\)"):
        assignment(torch.rand(1, 3, 4))
    transport_plan(torch.rand(1, 3, 4))  # any n x m


@pytest.mark.parametrize("accelerator_schedule", [False, True])
def test_transport_plan_reads_non_finite_costs_as_zero(accelerator_schedule):
    """Non-finite costs (check_finite=False with a NaN target point) leave the plan finite and
    feasible (they are read as 0; the caller's value is NaN all the same): the float-only loop
    never turns a NaN into an index."""
    g = torch.Generator().manual_seed(3)
    cost = torch.rand(4, 5, 3, generator=g)
    cost[0, 1, 2] = float("nan")
    cost[1] = float("nan")  # a whole problem (a NaN target makes every cost NaN)
    cost[2, 0, 0] = float("inf")
    cost[3, :, 1] = float("inf")
    cols = torch.ones(4, 3, dtype=torch.bool)
    cols[0, 2] = False
    with fixed_schedule() if accelerator_schedule else contextlib.nullcontext():
        plan = transport_plan(cost, None, cols)
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    torch.testing.assert_close(plan.sum(2), torch.full((4, 5), 0.2))
    torch.testing.assert_close(plan.sum(1), cols / cols.sum(1, keepdim=True))
    clean = cost[0].clone()
    clean[1, 2] = 0.0  # problem 0's NaN sits on a masked column: the plan of the clean costs
    torch.testing.assert_close(plan[0], transport_plan(clean[None], None, cols[:1])[0])


@pytest.mark.parametrize("fixed", [False, True])
def test_assignment_is_optimal_for_float64_costs_near_1e15(fixed):
    """The Hungarian (n > 8) marks visited columns with +1e30; float64 sums near 1e30 keep a
    cost of ~1e15 only to rounding (ulp 1.4e14), and comparing two of them rewrote a visited
    column's predecessor on the fixed schedule (not even a permutation on half the problems).
    Every matching is now scipy's optimum."""
    g = torch.Generator().manual_seed(0)
    cost = (torch.rand(60, 9, 9, generator=g, dtype=torch.float64) + 1.0) * 1e15
    rows = torch.rand(60, 9, generator=g) < 0.7
    rows[:, 0] = True
    cols = torch.zeros(60, 9, dtype=torch.bool)
    for b in range(60):
        cols[b, torch.randperm(9, generator=g)[: int(rows[b].sum())]] = True
    with fixed_schedule() if fixed else contextlib.nullcontext():
        match = assignment(cost, rows, cols)
    _assert_optimal_matchings(cost, rows, cols, match, rel=1e-12, abs=0.0)


def _assert_optimal_matchings(cost, row_valid, col_valid, match, rel, abs):
    """Each problem's matching: -1 on invalid rows, the valid columns each once, scipy's
    optimal cost."""
    from scipy.optimize import linear_sum_assignment

    for b in range(cost.shape[0]):
        rows, cols = row_valid[b].nonzero()[:, 0], col_valid[b].nonzero()[:, 0]
        sub = cost[b][rows][:, cols].numpy()
        r, c = linear_sum_assignment(sub)
        got = match[b, rows]
        assert (match[b, ~row_valid[b]] == -1).all()
        assert sorted(got.tolist()) == cols.tolist()
        assert cost[b, rows, got].sum().item() == pytest.approx(sub[r, c].sum(), rel=rel, abs=abs)


def test_assignment_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(50, 5, 5, generator=g)
    best = torch.stack(
        [torch.stack([c[range(5), list(s)].sum() for s in itertools.permutations(range(5))]).min()
         for c in cost]
    )
    match = assignment(cost)
    assert (match.sort(-1).values == torch.arange(5)).all()
    torch.testing.assert_close(cost.gather(2, match[..., None]).squeeze(-1).sum(-1), best)


# ---------------------------------------------------------------- metric properties


@SETTINGS
@given(st.integers(0, 10**6), st.integers(1, 8), st.integers(1, 5))
def test_exact_properties(seed, n, d):
    x, y = clouds(seed, 4, n, n, d)
    w = exact_wasserstein(x, y)
    perm_x, perm_y = torch.randperm(n), torch.randperm(n)
    assert torch.all(exact_wasserstein(x, x) == 0)
    torch.testing.assert_close(exact_wasserstein(y, x), w)
    torch.testing.assert_close(exact_wasserstein(x[:, perm_x], y[:, perm_y]), w)
    shift = torch.randn(4, 1, d, dtype=torch.float64) * 10
    torch.testing.assert_close(exact_wasserstein(x + shift, y + shift), w, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(exact_wasserstein(3.0 * x, 3.0 * y), 9.0 * w)
    # a zero-weight point changes nothing, wherever it is
    far = torch.full((4, 1, d), 1e3, dtype=torch.float64)
    xw = torch.cat([torch.ones(4, n, dtype=torch.float64), torch.zeros(4, 1)], 1)
    torch.testing.assert_close(exact_wasserstein(torch.cat([x, far], 1), y, xw), w)


@FAST
@given(st.integers(0, 10**6), st.sampled_from(["sinkhorn", "sliced", "gaussian"]))
def test_other_estimators_invariances(seed, method):
    x, y = clouds(seed, 4, 6, 6, 3)
    opts = {"seed": 0} if method == "sliced" else {}
    w = wasserstein(x, y, method=method, **opts)
    perm = torch.randperm(6)
    torch.testing.assert_close(wasserstein(x[:, perm], y, method=method, **opts), w)
    shift = torch.randn(4, 1, 3, dtype=torch.float64)
    torch.testing.assert_close(wasserstein(x + shift, y + shift, method=method, **opts), w)
    torch.testing.assert_close(wasserstein(2.0 * x, 2.0 * y, method=method, **opts), 4.0 * w)
    far = torch.full((4, 1, 3), 50.0, dtype=torch.float64)
    yw = torch.cat([torch.ones(4, 6, dtype=torch.float64), torch.zeros(4, 1)], 1)
    torch.testing.assert_close(
        wasserstein(x, torch.cat([y, far], 1), None, yw, method=method, **opts), w
    )


def test_sinkhorn_converges_to_exact_as_blur_shrinks():
    x, y = clouds(1, 64, 6, 6, 3)
    exact = exact_wasserstein(x, y)
    errors = [
        ((sinkhorn_wasserstein(x, y, relative_blur=rb, iterations=it) - exact) / exact).abs().max()
        for rb, it in ((1e-1, 40), (1e-2, 80), (1e-3, 200))
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 2e-3
    # the plan is feasible, so the estimate bounds W from above
    assert (sinkhorn_wasserstein(x, y) >= exact * (1 - 1e-9)).all()


def test_sinkhorn_default_accuracy():
    x, y = clouds(2, 512, 8, 8, 64, torch.float32)
    rel = (sinkhorn_wasserstein(x, y) - exact_wasserstein(x, y)) / exact_wasserstein(x, y)
    assert rel.mean().abs() < 3e-3


@FAST
@given(st.integers(0, 10**6), st.integers(1, 7), st.integers(1, 7))
def test_debiased_sinkhorn_nonnegative_and_zero_on_equal(seed, n, m):
    x, y = clouds(seed, 8, n, m, 3)
    s = sinkhorn_wasserstein(x, y, debias=True, iterations=100)
    scale = exact_wasserstein(x, y)
    assert (s >= -1e-6 * scale - 1e-12).all()
    torch.testing.assert_close(
        sinkhorn_wasserstein(x, x, debias=True), torch.zeros(8, dtype=torch.float64),
        atol=1e-9, rtol=0,
    )


@FAST
@given(st.integers(0, 10**6), st.integers(2, 5), st.integers(2, 5), st.integers(1, 4))
def test_gaussian_matches_pot_bures(seed, n, m, d):
    x, y = clouds(seed, 5, n + d, m + d, d)  # full-rank covariances: POT's sqrtm needs them
    got = gaussian_wasserstein(x, y)
    for k in range(5):
        mx, my = x[k].mean(0).numpy(), y[k].mean(0).numpy()
        cx = np.cov(x[k].numpy().T, bias=True).reshape(d, d)
        cy = np.cov(y[k].numpy().T, bias=True).reshape(d, d)
        want = ot.gaussian.bures_wasserstein_distance(mx, my, cx, cy) ** 2
        assert got[k].item() == pytest.approx(float(want), rel=1e-5, abs=1e-8)
        torch.testing.assert_close(
            gaussian_w2(x[k].mean(0), torch.tensor(cx), y[k].mean(0), torch.tensor(cy)),
            got[k], rtol=1e-6, atol=1e-9,
        )
    diag = gaussian_wasserstein(x, y, covariance="diag")
    want_diag = (x.mean(1) - y.mean(1)).pow(2).sum(-1) + (
        x.var(1, unbiased=False).sqrt() - y.var(1, unbiased=False).sqrt()
    ).pow(2).sum(-1)
    torch.testing.assert_close(diag, want_diag)


@FAST
@given(st.integers(0, 10**6), st.integers(1, 8), st.integers(1, 8), st.booleans())
def test_sliced_1d_equals_exact_1d(seed, n, m, weighted):
    g = torch.Generator().manual_seed(seed)
    x, y = clouds(seed, 6, n, m, 1)
    a = torch.rand(6, n, generator=g, dtype=torch.float64) + 0.05 if weighted else None
    b = torch.rand(6, m, generator=g, dtype=torch.float64) + 0.05 if weighted else None
    got = sliced_wasserstein(x, y, a, b, num_projections=3)
    torch.testing.assert_close(got, pot_oracle(x, y, a, b), rtol=1e-6, atol=1e-9)
    got1 = sliced_wasserstein(x, y, a, b, p=1, num_projections=2)
    torch.testing.assert_close(got1, pot_oracle(x, y, a, b, p=1), rtol=1e-6, atol=1e-9)


def test_sliced_reproducible_with_seed_and_generator():
    x, y = clouds(3, 4, 5, 5, 6)
    a = sliced_wasserstein(x, y, seed=7)
    torch.testing.assert_close(sliced_wasserstein(x, y, seed=7), a)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(
        sliced_wasserstein(x, y, generator=g1), sliced_wasserstein(x, y, generator=g2)
    )


# ---------------------------------------------------------------- gradients


def test_exact_gradcheck_and_envelope():
    x, y = clouds(4, 3, 5, 5, 3)
    x.requires_grad_(True)
    y.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: exact_wasserstein(a, b), (x, y))
    assert torch.autograd.gradcheck(lambda a: exact_wasserstein(a, y.detach()), (x,))
    mask = torch.tensor([[1.0, 1, 1, 0, 1]]).expand(3, 5)
    assert torch.autograd.gradcheck(lambda a, b: exact_wasserstein(a, b, mask, mask), (x, y))
    # envelope: dW/dx_i = 2 a_i (x_i - y_sigma(i))
    (grad,) = torch.autograd.grad(exact_wasserstein(x, y).sum(), x)
    cost = ((x[:, :, None] - y[:, None]) ** 2).sum(-1).detach()
    match = assignment(cost)
    want = 2.0 / 5 * (x - y.gather(1, match[..., None].expand(-1, -1, 3))).detach()
    torch.testing.assert_close(grad, want)


def test_exact_transport_gradcheck():
    x, y = clouds(5, 2, 4, 3, 2)
    x.requires_grad_(True)
    a = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).expand(2, 4)
    assert torch.autograd.gradcheck(lambda t: exact_wasserstein(t, y, a), (x,))


def test_sinkhorn_gradcheck_debiased():
    x, y = clouds(6, 2, 4, 5, 2)
    x.requires_grad_(True)

    def fn(t):
        return sinkhorn_wasserstein(t, y, debias=True, blur=2.0, iterations=200,
                                    overrelaxation=1.0)

    assert torch.autograd.gradcheck(fn, (x,), atol=1e-5, rtol=1e-4)


def test_sinkhorn_gradient_is_plan_weighted():
    """Plain estimate: gradient = sum_j pi_ij grad C(x_i, y_j) = close to exact's near-Diracs."""
    x, y = clouds(7, 32, 8, 8, 4)
    x.requires_grad_(True)
    (g_sk,) = torch.autograd.grad(sinkhorn_wasserstein(x, y).sum(), x)
    (g_ex,) = torch.autograd.grad(exact_wasserstein(x, y).sum(), x)
    cos = torch.nn.functional.cosine_similarity(g_sk.flatten(1), g_ex.flatten(1))
    assert cos.mean() > 0.99


def test_sinkhorn_gradient_obeys_the_plan_identities():
    """Exact identities of a plan-weighted W_2^2 gradient, whatever the plan, masks included.

    With ``v = sum_ij pi_ij |x_i - y_j|^2`` for a plan with marginals ``a`` (rows) and ``b``
    (columns) held fixed, ``g_i = dv/dx_i = 2 (a_i x_i - (pi y)_i)`` and ``h_j = dv/dy_j``:
    ``sum_i g_i = 2 (sum_i a_i x_i - sum_j b_j y_j) = -sum_j h_j`` and
    ``v = sum_j b_j |y_j|^2 - sum_i a_i |x_i|^2 + sum_i g_i . x_i``. A gradient taken through the
    iterations, a plan with wrong marginals, or a value/gradient mismatch breaks them.
    """
    x, y = clouds(11, 16, 8, 6, 3)
    wy = torch.ones(16, 6, dtype=torch.float64)
    wy[::2, :3] = 0  # masked neighbors on half the problems
    x.requires_grad_(True)
    y.requires_grad_(True)
    value = sinkhorn_wasserstein(x, y, None, wy)
    g, h = torch.autograd.grad(value.sum(), (x, y))
    a = torch.full((16, 8), 1 / 8, dtype=torch.float64)
    b = wy / wy.sum(-1, keepdim=True)
    xd, yd = x.detach(), y.detach()
    mean_gap = 2 * ((a.unsqueeze(-1) * xd).sum(1) - (b.unsqueeze(-1) * yd).sum(1))
    torch.testing.assert_close(g.sum(1), mean_gap, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(h.sum(1), -mean_gap, rtol=1e-6, atol=1e-9)
    assert (h[::2, :3] == 0).all()  # masked neighbors get no gradient
    identity = (b * yd.pow(2).sum(-1)).sum(-1) - (a * xd.pow(2).sum(-1)).sum(-1)
    identity = identity + (g * xd).sum((-1, -2))
    torch.testing.assert_close(value.detach(), identity, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- degenerate inputs


@pytest.mark.parametrize("method", ["exact", "sinkhorn", "sliced", "gaussian", "pot", "geomloss"])
def test_all_masked_problem_is_zero_with_zero_grad(method):
    x = torch.randn(3, 4, 2, requires_grad=True)
    y = torch.randn(3, 4, 2)
    mask = torch.ones(3, 4)
    mask[1] = 0
    value = wasserstein(x, y, None, mask, method=method)
    assert value[1] == 0 and torch.isfinite(value).all()
    value.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[1] == 0).all()


@pytest.mark.parametrize("method", ["exact", "sinkhorn", "sliced", "gaussian"])
@pytest.mark.parametrize("scale", [0.0, 1e-12, 1e6])
def test_identical_points_and_extreme_scales(method, scale):
    x = torch.ones(2, 5, 3, requires_grad=True)
    value = wasserstein(scale * x, scale * x.detach(), method=method)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(x.grad).all()
    assert value.abs().max() <= 1e-6 * max(scale, 1.0) ** 2
    a, b = clouds(8, 4, 6, 6, 3, torch.float32)
    ref = wasserstein(a, b, method=method, **({"seed": 0} if method == "sliced" else {}))
    if scale > 0:
        got = wasserstein(scale * a, scale * b, method=method,
                          **({"seed": 0} if method == "sliced" else {}))
        torch.testing.assert_close(got / scale**2, ref, rtol=1e-4, atol=0)


@pytest.mark.parametrize("method", ["sliced", "gaussian", "gaussian-diag", "exact", "sinkhorn"])
def test_far_from_the_origin_float32_keeps_the_spread(method):
    """Clouds of spread 0.01 at 1e4 from the origin (float32 rounds coordinates there at 1e-3):
    the value equals the float64 value of the same float32 points. The sliced and Gaussian
    estimators used to project / take moments before centering (up to 10% and 15% off)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 3, generator=g) * 0.01 + 1e4
    y = torch.randn(4, 8, 3, generator=g) * 0.01 + 1e4
    opts = {"method": method.split("-")[0]}
    if method == "sliced":
        opts["projections"] = random_directions(3, 64, seed=0)
    if method == "gaussian-diag":
        opts["covariance"] = "diag"
    got, want = wasserstein(x, y, **opts), wasserstein(x.double(), y.double(), **opts)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("method", ["exact", "sinkhorn", "sliced", "gaussian"])
@pytest.mark.parametrize("n, m", [(0, 4), (4, 0), (0, 0)])
def test_no_points_on_a_side_is_an_empty_problem(method, n, m):
    """Value 0 and zero gradient, as for a fully masked side (Sinkhorn divided by zero and
    sliced indexed out of bounds)."""
    x = torch.randn(2, 3, n, 2, requires_grad=True)
    value = wasserstein(x, torch.randn(2, 3, m, 2), method=method)
    assert value.shape == (2, 3) and torch.equal(value, torch.zeros(2, 3))
    value.sum().backward()
    assert x.grad is not None and not x.grad.any()


def test_sliced_seed_draws_the_same_directions_for_every_dtype():
    x, y = clouds(3, 4, 6, 6, 5, torch.float64)
    torch.testing.assert_close(
        sliced_wasserstein(x.float(), y.float(), seed=0, num_projections=64).double(),
        sliced_wasserstein(x, y, seed=0, num_projections=64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_a_clear_error(bad):
    x = torch.randn(2, 4, 3)
    x[1, 2, 0] = bad
    with pytest.raises(ValueRangeError, match="NaN or Inf"):
        wasserstein(x, torch.randn(2, 4, 3))
    with pytest.raises(ValueRangeError, match="non-negative"):
        wasserstein(torch.randn(2, 4, 3), torch.randn(2, 4, 3), -torch.ones(2, 4))


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64,
                           torch.int64, torch.bool]),
    size=st.integers(0, 40),
    bad=st.lists(st.tuples(st.integers(0, 39), st.sampled_from(
        [float("nan"), float("inf"), -float("inf"), -1.0, -0.0, 0.0])), max_size=3),
    nonnegative=st.booleans(),
)
@example(dtype=torch.float32, size=5, bad=[(2, -1.0)], nonnegative=True)
@example(dtype=torch.float32, size=5, bad=[(4, -0.0)], nonnegative=True)
@example(dtype=torch.float16, size=5, bad=[(0, float("nan"))], nonnegative=False)
@example(dtype=torch.float64, size=5, bad=[(1, -float("inf"))], nonnegative=False)
@example(dtype=torch.bfloat16, size=5, bad=[(3, float("inf"))], nonnegative=True)
@example(dtype=torch.int64, size=5, bad=[(3, -1.0)], nonnegative=True)
def test_all_finite_agrees_with_isfinite(dtype, size, bad, nonnegative):
    """The extremes-based check (``aminmax``) against the element-wise oracle: NaN, +-inf and
    (with ``nonnegative``) negative values at any position, every dtype, empty tensors."""
    x = torch.rand(size, dtype=torch.float64) * 10
    for index, value in bad:
        if index < size:
            x[index] = value
    if not dtype.is_floating_point:
        x = x.nan_to_num(0.0, 0.0, 0.0)
    x = x.to(dtype)
    expected = bool(torch.isfinite(x.double()).all()) and not (nonnegative and bool((x < 0).any()))
    assert bool(_all_finite(x, nonnegative=nonnegative)) == expected
    with mock.patch.object(errors_module, "_AMINMAX_DEVICES", ()):  # the element-wise branch
        assert bool(_all_finite(x, nonnegative=nonnegative)) == expected


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_a_clear_error(bad):
    w = torch.ones(2, 4)
    w[1, 3] = bad
    with pytest.raises(ValueRangeError, match="non-negative"):
        wasserstein(torch.randn(2, 4, 3), torch.randn(2, 4, 3), y_weights=w)


@pytest.mark.parametrize("method", ["exact", "sinkhorn", "sliced", "gaussian"])
@pytest.mark.parametrize("n, d", [(8, 3), (13, 3), (8, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_unchecked_non_finite_target_gives_non_finite_value(method, n, d, masked):
    """check_finite=False (the loss's call): a NaN or inf target (or predicted) point makes its
    problem's value non-finite -- never a finite wrong number, never an exception from inside a
    solver (the Gaussian estimator's SVD raised on CPU) -- and leaves the other problems' values
    as they were."""
    g = torch.Generator().manual_seed(n + d)
    x, y = torch.randn(6, n, d, generator=g), torch.randn(6, n, d, generator=g)
    b = None
    if masked:
        b = torch.ones(6, n)
        b[:, 0] = 0.0
    opts = {"check_finite": False, **({"seed": 0} if method == "sliced" else {})}
    clean = wasserstein(x, y, None, b, method=method, **opts)
    y[1, 3, 0], y[2, 3, 0], x[4, 2, 0] = float("nan"), float("inf"), float("nan")
    got = wasserstein(x, y, None, b, method=method, **opts)
    assert not torch.isfinite(got[[1, 2, 4]]).any()
    torch.testing.assert_close(got[[0, 3, 5]], clean[[0, 3, 5]])


@pytest.mark.parametrize("p", [1, 3])
@pytest.mark.parametrize("solver", ["flow", "assignment", "transport"])
def test_unchecked_nan_point_at_p_not_2_gives_nan(p, solver):
    """p != 2: the cost |d|^p guarded its gradient at d = 0 with a test `|d|^2 > 0`, False for
    NaN, so a NaN point's costs became 0 and its problem's value finite (0.0 on the POT path)."""
    g = torch.Generator().manual_seed(p)
    m = 4 if solver == "assignment" else 3
    x, y = torch.randn(2, 4, 2, generator=g), torch.randn(2, m, 2, generator=g)
    x[0, 1, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT: "problem infeasible" on NaN costs
        value = exact_wasserstein(x, y, p=p, solver=solver, check_finite=False)
    assert torch.isnan(value[0]) and torch.isfinite(value[1])


@pytest.mark.parametrize("method", ["sinkhorn", "sliced", "pot"])
def test_unchecked_nan_point_at_p_3_gives_nan_for_every_estimator(method):
    """The same guard (`> 0` turning NaN into 0) in the sliced estimator's |d|^p and in the POT
    adapter's cost: NaN in, NaN out."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(2, 4, 2, generator=g), torch.randn(2, 3, 2, generator=g)
    x[0, 1, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = wasserstein(x, y, method=method, p=3, check_finite=False)
    assert torch.isnan(value[0]) and torch.isfinite(value[1])


@pytest.mark.parametrize("p", [1, 1.5])
def test_equal_points_cost_zero_at_p_below_2_in_many_dimensions(p):
    """D > 4 with p != 2: the cost matrix came from the expansion |x|^2 + |y|^2 - 2 x.y, whose
    rounding noise between equal points (~eps |x|^2) |.|^(p/2) lifted to ~sqrt(eps) |x|: the
    exact value of two equal distributions was 7e-4 (p = 1, float32), Sinkhorn's self-costs had
    nonzero diagonals. Squared differences per coordinate give exact zeros."""
    from ctxpred.wasserstein import _validate as _validate_module

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 5, generator=g) + 30.0
    y = torch.cat([x, x], 1)  # the same distribution, twice the points: the flow path
    assert (exact_wasserstein(x, y, p=p) == 0).all()
    assert (torch.diagonal(_validate_module.pairwise_cost(x, x, p), dim1=-2, dim2=-1) == 0).all()


@pytest.mark.parametrize("method", ["exact", "pot"])
def test_general_weights_exact_on_tiny_costs(method):
    """POT's network simplex tests optimality with absolute tolerances: costs of ~1e-12 (points
    at scale 1e-4, p = 3) came back 2.6% above the optimum. W_p^p scales as s^p."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, 1, generator=g, dtype=torch.float64)
    y = torch.randn(6, 8, 1, generator=g, dtype=torch.float64) + 0.5
    w = torch.rand(6, 8, generator=g, dtype=torch.float64) + 0.1
    w[:, 0] = 0.0
    big = wasserstein(x, y, None, w, method=method, p=3)
    tiny = wasserstein(x * 1e-4, y * 1e-4, None, w, method=method, p=3)
    torch.testing.assert_close(tiny, big * 1e-12, rtol=1e-9, atol=0.0)


@pytest.mark.parametrize("solver", ["flow", "assignment"])
@pytest.mark.parametrize("side", ["x", "y"])
def test_single_unchecked_problem_with_nan_is_nan_and_inputs_stay(solver, side):
    """B = 1 (a permuted view of one problem's costs is contiguous already): the solvers' work
    must not land in the caller's tensors -- the flow once cleaned its input costs of NaN in
    place, and the value, computed from those costs, came out finite."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(1, 5, 2, generator=g), torch.randn(1, 5 if solver == "assignment" else 3,
                                                           2, generator=g)
    (x if side == "x" else y)[0, 1, 0] = float("nan")
    value = exact_wasserstein(x, y, solver=solver, check_finite=False)
    assert torch.isnan(value).all()
    cost = torch.rand(1, 3, 4, generator=g)
    cost[0, 1, 2] = float("nan")
    for costs in (cost, cost.permute(1, 2, 0).contiguous().permute(2, 0, 1)):
        before = costs.clone()
        transport_plan(costs, None, torch.tensor([[True, True, False, True]]))
        torch.testing.assert_close(costs, before, equal_nan=True)


def test_errors_name_expected_and_actual():
    x = torch.randn(2, 4, 3)
    with pytest.raises(ShapeError, match=r"share the batch dims.*\(2, 4, 3\).*\(3, 4, 3\)"):
        wasserstein(x, torch.randn(3, 4, 3))
    with pytest.raises(ShapeError, match=r"x_weights must have shape \(\.\.\., N\)"):
        wasserstein(x, x, torch.ones(2, 5))
    with pytest.raises(ShapeError):
        wasserstein(torch.randn(4), torch.randn(4))
    with pytest.raises(DTypeError, match="floating-point"):
        wasserstein(x.long(), x)
    with pytest.raises(ValueRangeError, match="method must be one of"):
        wasserstein(x, x, method="hungarian")
    with pytest.raises(ValueRangeError, match=r"'sinkhorn' takes no option 'iteration'"):
        wasserstein(x, x, method="sinkhorn", iteration=3)
    with pytest.raises(ValueRangeError, match="p must be"):
        wasserstein(x, x, p=0.5)
    with pytest.raises(ValueRangeError, match="solver='assignment' needs"):
        exact_wasserstein(x, x, torch.ones(2, 4), torch.tensor([[1.0, 1, 1, 0]] * 2),
                          solver="assignment")
    with pytest.raises(ValueRangeError, match="scaling"):
        sinkhorn_wasserstein(x, x, scaling=1.5)
    with pytest.raises(ValueRangeError, match="gaussian"):
        wasserstein(x, x, method="gaussian", p=1)
    with pytest.raises(ShapeError, match="cov_x"):
        gaussian_w2(torch.zeros(3), torch.eye(2), torch.zeros(3), torch.eye(3))
    assert issubclass(ShapeError, CtxpredError)


# ---------------------------------------------------------------- API plumbing


def test_modules_equal_functions_and_exports():
    x, y = clouds(9, 3, 5, 5, 2)
    mask = torch.ones(3, 5, dtype=torch.float64)
    for module, fn in (
        (ExactWasserstein(), exact_wasserstein),
        (SinkhornWasserstein(), sinkhorn_wasserstein),
        (GaussianWasserstein(), gaussian_wasserstein),
    ):
        torch.testing.assert_close(module(x, y, None, mask), fn(x, y, None, mask))
    torch.testing.assert_close(SlicedWasserstein(seed=1)(x, y), sliced_wasserstein(x, y, seed=1))
    assert F.wasserstein is wasserstein
    with pytest.warns(DeprecationWarning, match="ctxpred.wasserstein.ExactWasserstein"):
        assert ctxpred.ExactWasserstein is ExactWasserstein  # the 0.1 name, for one release


def test_batch_dims_and_unequal_sizes():
    x, y = torch.randn(2, 3, 6, 4), torch.randn(2, 3, 4, 4)
    for method in ("exact", "sinkhorn", "sliced", "gaussian"):
        assert wasserstein(x, y, method=method).shape == (2, 3)
    assert wasserstein(x[:, :0], y[:, :0], method="exact").shape == (2, 0)


def test_low_precision_and_autocast_compute_in_float32():
    x, y = clouds(10, 8, 6, 6, 4, torch.float32)
    xb, yb = x.bfloat16(), y.bfloat16()
    for method in ("exact", "sinkhorn", "gaussian"):
        got = wasserstein(xb, yb, method=method)
        assert got.dtype == torch.bfloat16
        want = wasserstein(xb.float(), yb.float(), method=method)
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = wasserstein(x, y, method=method)
        assert auto.dtype == torch.float32
        torch.testing.assert_close(auto, wasserstein(x, y, method=method))


def test_sqrtm_psd_backward_finite_on_singular():
    a = torch.randn(5, 2, dtype=torch.float64)
    mat = (a @ a.T).requires_grad_(True)  # rank 2, repeated zero eigenvalues
    root = sqrtm_psd(mat)
    torch.testing.assert_close(root @ root, mat.detach())
    root.sum().backward()
    assert torch.isfinite(mat.grad).all()
    spd = (torch.randn(3, 3, dtype=torch.float64) + 3 * torch.eye(3)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: sqrtm_psd(m @ m.T + torch.eye(3)), (spd,))


def test_compile_fullgraph_sinkhorn_sliced_gaussian():
    x, y = torch.randn(4, 5, 3), torch.randn(4, 6, 3)
    mask = torch.ones(4, 6)
    mask[:, 0] = 0

    def all_three(a, b, w):
        return (
            sinkhorn_wasserstein(a, b, None, w, iterations=5, check_finite=False)
            + sliced_wasserstein(a, b, None, w, num_projections=4, check_finite=False)
            + gaussian_wasserstein(a, b, None, w, check_finite=False)
        )

    compiled = torch.compile(all_three, fullgraph=True, backend="eager")
    torch.manual_seed(0)
    want = all_three(x, y, mask)
    torch.manual_seed(0)
    torch.testing.assert_close(compiled(x, y, mask), want)


def test_sinkhorn_slow_schedule_is_accurate_on_masked_unequal_problems():
    """The remedy the loss docs give for masked problems (8 samples vs ~5 valid neighbors)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 8, 3, generator=g), torch.randn(256, 8, 3, generator=g)
    mask = torch.rand(256, 8, generator=g) < 0.6
    mask[:, 0] = True
    exact = wasserstein(x, y, None, mask.float(), method="exact")
    slow = wasserstein(x, y, None, mask.float(), method="sinkhorn", scaling=0.9, iterations=100)
    assert ((slow - exact) / exact).abs().mean() < 1e-3
    assert (slow >= exact * (1 - 1e-5)).all()  # the cost of a feasible plan bounds W from above


# ---------------------------------------------------------------- masked exact (device flow)

import contextlib  # noqa: E402

from ctxpred.wasserstein import _validate as validate_module  # noqa: E402
from ctxpred.wasserstein import exact as exact_module  # noqa: E402
from ctxpred.wasserstein.exact import (  # noqa: E402
    flow_augmentation_bound,
    monotone_plan,
    transport_plan,
)


def pot_plan(x, y, a, b, p=2):
    """POT ot.emd plan per problem (float64) for the cost |x - y|^p, zeros for empty problems."""
    plans = []
    for k in range(x.shape[0]):
        wa, wb = a[k].double().numpy(), b[k].double().numpy()
        if wa.sum() == 0 or wb.sum() == 0:
            plans.append(np.zeros((x.shape[1], y.shape[1])))
            continue
        cost = ot.dist(x[k].double().numpy(), y[k].double().numpy()) ** (p / 2)
        plans.append(ot.emd(wa / wa.sum(), wb / wb.sum(), cost))
    return torch.tensor(np.stack(plans))


@contextlib.contextmanager
def fixed_schedule():
    """Run the solvers as on an accelerator: fixed, data-independent loops, no host reads, the
    flow's masks as bools."""
    mp = pytest.MonkeyPatch()
    mp.setattr(exact_module, "host_checks_free", lambda device: False)
    mp.setattr(exact_module, "_float_masks", lambda device: False)
    try:
        yield
    finally:
        mp.undo()


def masked_problem(seed, batch, n, m, d, scale, offset, grid):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(batch, m, d, generator=g, dtype=torch.float64)
    if grid:  # ties and duplicate points: few distinct integer positions
        x, y = x.mul(0.8).round(), y.mul(0.8).round()
        y[:, 0] = x[:, 0]
    x, y = x * scale, y * scale + offset
    a = (torch.rand(batch, n, generator=g) < 0.75).double()
    b = (torch.rand(batch, m, generator=g) < 0.6).double()
    a[0], b[1] = 0.0, 0.0  # one problem empty on each side
    return x.float(), y.float(), a, b


@settings(max_examples=16, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 8), st.integers(1, 8), st.integers(1, 5),
       st.sampled_from([1e-4, 1.0, 1e4]), st.sampled_from([0.0, 1e3]), st.booleans(),
       st.booleans())
def test_masked_exact_matches_pot(seed, n, m, d, scale, offset, grid, fixed):
    """float32 values within 1e-6 relative of ot.emd2 (float64) on masked, unequal supports --
    ties, duplicates, single valid points, empty problems, scales 1e+-4, far-apart clouds -- on
    the CPU schedule and on the fixed (accelerator) schedule."""
    x, y, a, b = masked_problem(seed, 5, n, m, d, scale, offset * scale, grid)
    with fixed_schedule() if fixed else contextlib.nullcontext():
        got = exact_wasserstein(x, y, a.float(), b.float(), solver="flow", check_finite=False)
    want = pot_oracle(x, y, a, b)
    # float32 data: the exact value of the (float32) points is the reference, in float64
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6 * scale**2)
    plan = transport_plan(pairwise_cost_f64(x, y), a > 0, b > 0)
    nonempty = (a.sum(1) > 0) & (b.sum(1) > 0)
    rows = torch.where(nonempty[:, None], a / a.sum(1, keepdim=True).clamp_min(1), 0.0)
    cols = torch.where(nonempty[:, None], b / b.sum(1, keepdim=True).clamp_min(1), 0.0)
    torch.testing.assert_close(plan.sum(2), rows)  # a feasible plan: marginals exact
    torch.testing.assert_close(plan.sum(1), cols)


@pytest.mark.parametrize("fixed", [False, True])
def test_masked_exact_on_tie_heavy_grids_matches_pot(fixed):
    """Points on a coarse integer grid (many equal costs and zero-length arcs): the flow's
    shortest paths used to be read back from the final distances, and where a node's distance
    later dropped by less than rounding shows, a wrong path was pushed (a feasible plan up to
    40% too expensive, on about 0.1% of such problems). Two found cases, then 1200 random ones."""
    found = [
        ([[1, 0, 1], [0, 3, 2], [2, 2, 1], [0, 3, 0], [3, 2, 1], [0, 3, 2], [2, 2, 2], [0, 2, 0]],
         [[1, 0, 2], [3, 2, 1], [0, 3, 2], [0, 0, 3], [3, 0, 1], [2, 2, 1], [1, 2, 1], [0, 0, 0]],
         [1, 1, 1, 1, 0, 1, 0, 1]),
        ([[0, 3, 0], [0, 3, 3], [1, 3, 0], [0, 2, 3], [0, 2, 2], [0, 0, 0], [3, 1, 0], [3, 1, 0]],
         [[0, 1, 0], [0, 3, 1], [3, 1, 1], [3, 0, 0], [3, 0, 2], [0, 2, 0], [0, 3, 3], [1, 2, 1]],
         [1, 1, 1, 1, 0, 1, 1, 1]),
    ]
    cases = [(torch.tensor([x]) / 3.0, torch.tensor([y]) / 3.0, torch.tensor([mk]).float())
             for x, y, mk in found]
    g = torch.Generator().manual_seed(0)
    for n, m in ((8, 8), (16, 9)):
        x = torch.randint(0, 5, (600, n, 3), generator=g) / 5.0
        y = torch.randint(0, 5, (600, m, 3), generator=g) / 5.0
        mask = (torch.rand(600, m, generator=g) > 0.35).float()
        mask[:, 0] = 1.0
        cases.append((x, y, mask))
    for x, y, mask in cases:
        for dtype in (torch.float32, torch.float64):
            with fixed_schedule() if fixed else contextlib.nullcontext():
                got = exact_wasserstein(x.to(dtype), y.to(dtype), None, mask.to(dtype),
                                        check_finite=False)
            want = pot_oracle(x, y, None, mask)
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 9), st.integers(1, 9),
       st.sampled_from([1.0, 1.5, 2.0, 3.0]), st.booleans(), st.booleans())
def test_one_dimensional_masked_exact_is_the_monotone_coupling(seed, n, m, p, grid, fixed):
    """C = 1 (grayscale pixel targets): unequal uniform supports take the sorted (quantile)
    coupling. Values and envelope gradients against POT at p in {1, 1.5, 2, 3}, ties included;
    the plan has exact marginals and the cost of the min-cost flow's plan (an independent
    solver). A rank off by one, or a masked point sorted among the valid ones, breaks these."""
    x, y, a, b = masked_problem(seed, 6, n, m, 1, 1.0, 0.0, grid)
    x64 = x.double().requires_grad_(True)
    with fixed_schedule() if fixed else contextlib.nullcontext():
        got = exact_wasserstein(x64, y.double(), a, b, p=p, solver="flow", check_finite=False)
    torch.testing.assert_close(got, pot_oracle(x, y, a, b, p=p), rtol=1e-9, atol=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), x64)
    ref = x.double().requires_grad_(True)
    (want,) = torch.autograd.grad(exact_wasserstein(ref, y.double(), a, b, p=p,
                                                    solver="transport").sum(), ref)
    if not grid:  # with ties the optimal plan (so the subgradient) is not unique
        torch.testing.assert_close(grad, want, rtol=1e-7, atol=1e-9)
    plan = monotone_plan(x.double(), y.double(), a > 0, b > 0)
    nonempty = (a.sum(1) > 0) & (b.sum(1) > 0)
    rows = torch.where(nonempty[:, None], a / a.sum(1, keepdim=True).clamp_min(1), 0.0)
    cols = torch.where(nonempty[:, None], b / b.sum(1, keepdim=True).clamp_min(1), 0.0)
    torch.testing.assert_close(plan.sum(2), rows, rtol=0, atol=1e-15)
    torch.testing.assert_close(plan.sum(1), cols, rtol=0, atol=1e-15)
    cost = (x.double() - y.double().transpose(1, 2)).abs() ** p
    flow = transport_plan(cost, a > 0, b > 0)
    torch.testing.assert_close((plan * cost).sum((1, 2)), (flow * cost).sum((1, 2)),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("d", [1, 3])
def test_exact_with_non_finite_points_and_no_check_returns_nan_and_ends(fixed, d):
    """check_finite=False (the loss's setting when the user opts out) with a NaN or inf point:
    the solvers end (the CPU flow loop used to spin forever) and the affected problems are NaN,
    never a finite wrong value; the other problems keep their exact values."""
    x, y, a, b = masked_problem(3, 6, 8, 8, d, 1.0, 0.0, False)
    a[:], b[:, :3] = 1.0, 0.0
    b[:, 3:] = 1.0
    _non_finite_points_spoil_only_their_problems(x, y, a, b, fixed)


def _non_finite_points_spoil_only_their_problems(x, y, a, b, fixed):
    """NaN into y of problem 2 and inf into y of problem 4 (6 problems, valid points 4 and 6):
    those come out non-finite, the others as before."""
    clean = exact_wasserstein(x, y, a, b, check_finite=False)
    y = y.clone()
    y[2, 4, 0], y[4, 6, 0] = float("nan"), float("inf")
    with fixed_schedule() if fixed else contextlib.nullcontext():
        got = exact_wasserstein(x, y, a, b, check_finite=False)
    assert torch.isnan(got[2]) and not torch.isfinite(got[4])
    keep = [0, 1, 3, 5]
    torch.testing.assert_close(got[keep], clean[keep])


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("n", [7, 13])
def test_assignment_with_non_finite_points_and_no_check_returns_nan(fixed, masked, n):
    """The same for equal supports (the subset DP, the shortest-augmenting-path assignment and
    its CPU start), whose matching on NaN costs used to skip the bad point's column and return
    a finite sum of the other pairs: NaN / inf problems come out non-finite, the others exact
    and unchanged."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, n, 3, generator=g), torch.randn(6, n, 3, generator=g)
    b = torch.ones(6, n)
    if masked:  # match_mask-style: the same 3 points off on both sides
        b[:, :3] = 0.0
    clean = exact_wasserstein(x, y, b, b, check_finite=False)
    torch.testing.assert_close(clean, pot_oracle(x, y, b, b).float(), rtol=1e-5, atol=1e-6)
    _non_finite_points_spoil_only_their_problems(x, y, b, b, fixed)


def pairwise_cost_f64(x, y):
    return ((x.double()[:, :, None] - y.double()[:, None]) ** 2).sum(-1)


def test_flow_equals_assignment_and_auto_on_equal_supports():
    x, y = clouds(11, 64, 7, 7, 3, torch.float32)
    mask = torch.rand(64, 7, generator=torch.Generator().manual_seed(1)) < 0.7
    mask[:, 0] = True
    w = mask.float()
    flow = exact_wasserstein(x, y, w, w, solver="flow")
    torch.testing.assert_close(flow, exact_wasserstein(x, y, w, w, solver="assignment"))
    torch.testing.assert_close(flow, exact_wasserstein(x, y, w, w, check_finite=False))


def test_single_valid_neighbor_closed_form_and_all_masked_zero():
    x = torch.randn(4, 8, 3, requires_grad=True)
    y = torch.randn(4, 8, 3)
    mask = torch.zeros(4, 8)
    mask[:3, 2] = 1.0  # one valid neighbor; problem 3 fully masked
    value = exact_wasserstein(x, y, None, mask, check_finite=False)
    want = (x[:3] - y[:3, 2:3]).pow(2).sum(-1).mean(-1)
    torch.testing.assert_close(value[:3], want)
    assert value[3] == 0
    value.sum().backward()
    assert (x.grad[3] == 0).all() and torch.isfinite(x.grad).all()
    with fixed_schedule():  # the accelerator path agrees, zero included
        torch.testing.assert_close(exact_wasserstein(x, y, None, mask, check_finite=False), value)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_masked_exact_gradient_is_envelope_of_pot_plan(p):
    x, y = clouds(12, 16, 8, 8, 3)  # continuous data: a unique optimal plan
    mask = torch.ones(16, 8, dtype=torch.float64)
    mask[:, 5:] = 0.0
    mask[::3, 1] = 0.0
    x.requires_grad_(True)
    value = exact_wasserstein(x, y, None, mask, p=p)
    (grad,) = torch.autograd.grad(value.sum(), x)
    plan = pot_plan(x.detach(), y, torch.ones(16, 8, dtype=torch.float64), mask, p)
    diff = x.detach()[:, :, None] - y[:, None]
    dist = diff.norm(dim=-1, keepdim=True)
    dcost = p * dist.clamp_min(1e-300) ** (p - 2) * diff  # grad_x |x - y|^p
    want = (plan[..., None] * dcost).sum(2)
    torch.testing.assert_close(grad, want)
    mask4 = torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: exact_wasserstein(t, y[:1, :4], None, mask4, p=p),
                                    (x[:1, :5].detach().requires_grad_(True),))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), m=st.integers(1, 5), width=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1))
def test_tight_leaves_against_a_loop(n, m, width, seed):
    """The flow start's leaves: tight arcs between a row with supply and a column with demand
    left whose row or column has no other such arc (a naive loop over every arc)."""
    g = torch.Generator().manual_seed(seed)
    tight = (torch.rand(n, m, width, generator=g) < 0.5).double()
    excess = torch.randint(0, 3, (n, width), generator=g).double()
    deficit = torch.randint(0, 3, (m, width), generator=g).double()
    got = exact_module._tight_leaves(tight, excess, deficit)
    live = [[[bool(tight[i, j, w] and excess[i, w] > 0 and deficit[j, w] > 0) for w in range(width)]
             for j in range(m)] for i in range(n)]
    for i in range(n):
        for j in range(m):
            for w in range(width):
                row = sum(live[i][k][w] for k in range(m))
                col = sum(live[k][j][w] for k in range(n))
                assert got[i, j, w] == float(live[i][j][w] and (row == 1 or col == 1))


@pytest.mark.parametrize("schedule", ["cpu", "fixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, masked", [(8, False), (12, False), (8, True), (12, True)])
def test_exact_is_right_for_points_far_apart(schedule, dtype, n, masked):
    """Squared distances of ~1e31 (points ~3e15 apart) reach the solvers' "unreachable" 1e30:
    every exact solver (the subset DP, the Hungarian, the flow) had returned values off by
    30-400%, silently. Each problem's costs are now rescaled by a power of two. Against POT, on
    the CPU schedule and the accelerators' fixed one; spreads from 1 to 1e17 in one batch."""
    g = torch.Generator().manual_seed(n)
    spread = torch.tensor([1.0, 1e10, 3e15, 1e17]).repeat(3).double().view(-1, 1, 1)
    x = torch.randn(12, n, 3, generator=g, dtype=torch.float64) * spread
    y = torch.randn(12, n, 3, generator=g, dtype=torch.float64) * spread
    b = torch.ones(12, n, dtype=torch.float64)
    if masked:
        b[:, : n // 3] = 0.0
    x, y = x.to(dtype), y.to(dtype)
    with fixed_schedule() if schedule == "fixed" else contextlib.nullcontext():
        got = exact_wasserstein(x, y, None, b.to(dtype))
    want = pot_oracle(x, y, None, b).double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-9,
                               atol=0)


def test_solvers_return_the_same_plan_for_costs_scaled_to_1e31():
    """The low-level solvers on costs far beyond their 1e30 "unreachable": the plan of the
    costs times 2^103 (~1e31) is the plan of the costs themselves (a power-of-two rescaling is
    exact)."""
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(64, 9, 9, generator=g, dtype=torch.float64)
    rows, cols = torch.rand(64, 9, generator=g) < 0.8, torch.rand(64, 9, generator=g) < 0.7
    rows[:, 0] = cols[:, 0] = True
    huge = cost * 2.0**103
    assert torch.equal(transport_plan(huge, rows, cols), transport_plan(cost, rows, cols))
    full = torch.ones(64, 9, dtype=torch.bool)
    for size in (8, 9):  # the subset DP and the Hungarian
        c = cost[:, :size, :size]
        assert torch.equal(assignment(c * 2.0**103, full[:, :size], full[:, :size]),
                           assignment(c, full[:, :size], full[:, :size]))


def test_flow_fixed_bound_is_enough_and_cpu_schedule_agrees():
    assert flow_augmentation_bound(8, 8) == 56 and flow_augmentation_bound(1, 5) == 5
    x, y = clouds(13, 128, 8, 8, 2, torch.float32)
    mask = torch.rand(128, 8, generator=torch.Generator().manual_seed(2)) < 0.6
    mask[:, 3] = True
    eager = exact_wasserstein(x, y, None, mask.float(), check_finite=False)
    with fixed_schedule():
        fixed = exact_wasserstein(x, y, None, mask.float(), check_finite=False)
    torch.testing.assert_close(fixed, eager)


class _LaggedStop:
    """CPU stand-in for the CUDA polled stop: a round's flag becomes readable ``lag`` rounds
    after it was posted (as when the host runs ahead of the device)."""

    instances: ClassVar[list[_LaggedStop]] = []

    def __init__(self, rounds: int, lag: int) -> None:
        self.rounds, self.lag, self.flags = rounds, lag, []
        _LaggedStop.instances.append(self)

    def post(self, any_left: torch.Tensor) -> None:
        assert any_left.shape == () and any_left.dtype == torch.bool
        self.flags.append(any_left.clone())

    def done(self) -> bool:
        ready = self.flags[: max(0, len(self.flags) - self.lag)]
        return any(not bool(f) for f in ready)


@pytest.mark.parametrize("lag", [0, 3, 1000])
def test_flow_fixed_schedule_stops_early_when_polled_and_stays_exact(lag, monkeypatch):
    """The accelerator schedule with the CUDA early stop (``_PolledStop``; here a lagged CPU
    stand-in): it runs far fewer rounds than the bound once every problem is done, and the plan
    is the one of the full schedule (a flag with the wrong sense, or posted before the round's
    augmentation and read as final, would stop too early and leave supply unshipped)."""
    x, y = clouds(21, 256, 8, 8, 3, torch.float32)
    mask = torch.rand(256, 8, generator=torch.Generator().manual_seed(4)) < 0.7
    mask[:, 5] = True
    with fixed_schedule():
        full = exact_wasserstein(x, y, None, mask.float(), check_finite=False)
        _LaggedStop.instances.clear()
        monkeypatch.setattr(exact_module, "_make_stop",
                            lambda rounds, device: _LaggedStop(rounds, lag))
        polled = exact_wasserstein(x, y, None, mask.float(), check_finite=False)
    torch.testing.assert_close(polled, full, rtol=0, atol=0)
    (stop,) = _LaggedStop.instances
    bound = flow_augmentation_bound(8, 8)
    assert stop.rounds == bound
    if lag >= bound:  # never readable: the whole fixed schedule runs
        assert len(stop.flags) == bound
    else:  # a few rounds suffice here; the loop ends `lag` rounds after the first "done" flag
        first_done = next(i for i, f in enumerate(stop.flags) if not bool(f))
        assert first_done < bound // 3 and len(stop.flags) == first_done + lag + 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flow_on_cuda_polls_its_stop_and_matches_cpu(monkeypatch):
    made = []
    real = exact_module._make_stop

    def spy(rounds, device):
        made.append(real(rounds, device))
        return made[-1]

    monkeypatch.setattr(exact_module, "_make_stop", spy)
    x, y = clouds(23, 512, 8, 8, 3, torch.float32)
    mask = torch.rand(512, 8, generator=torch.Generator().manual_seed(5)) < 0.7
    mask[:, 2] = True
    cpu = exact_wasserstein(x, y, None, mask.float(), check_finite=False)
    gpu = exact_wasserstein(x.cuda(), y.cuda(), None, mask.float().cuda(), check_finite=False)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
    stops = [s for s in made if s is not None]
    assert len(stops) == 1 and 1 <= stops[0].posted <= flow_augmentation_bound(8, 8)
    torch.cuda.synchronize()
    assert not bool(stops[0].flags[stops[0].posted - 1])  # it ended with no supply left


def test_assignment_with_unequal_supports_is_an_error_without_check_finite():
    """It used to return silently wrong values with check_finite=False (the loss's setting)."""
    x = torch.randn(2, 4, 3)
    w = torch.tensor([[1.0, 1, 1, 0]] * 2)
    with pytest.raises(ValueRangeError, match="solver='assignment' needs"):
        exact_wasserstein(x, x, None, w, solver="assignment", check_finite=False)
    with pytest.raises(ValueRangeError, match="solver='assignment' needs"):
        exact_wasserstein(x, torch.randn(2, 3, 3), solver="assignment", check_finite=False)
    with fixed_schedule(), pytest.raises(RuntimeError, match="solver='assignment' needs"):
        exact_wasserstein(x, x, None, w, solver="assignment", check_finite=False)  # async assert


def test_auto_routes_general_weights_to_pot_or_asserts_without_sync():
    x, y = clouds(14, 3, 4, 5, 2, torch.float32)
    a = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).expand(3, 4)
    want = pot_oracle(x, y, a, None)
    got = exact_wasserstein(x, y, a, None, check_finite=False)  # CPU: routed to POT, free
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    with fixed_schedule(), pytest.raises(RuntimeError, match="uniform weights"):
        exact_wasserstein(x, y, a, None, check_finite=False)
    with fixed_schedule():  # check_finite=True already syncs: routing is allowed
        torch.testing.assert_close(exact_wasserstein(x, y, a, None).double(), want, rtol=1e-5,
                                   atol=0)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("m", [6, 7])
@pytest.mark.parametrize("d", [3, 9])
def test_auto_mixed_batch_splits_routes_and_keeps_each_problem_aligned(p, m, d):
    """One call with every route -- equal uniform supports (assignment), unequal ones (flow),
    general weights (POT), an empty problem -- and N != M: each problem's value and gradient are
    POT's for that problem (a misaligned plan or point subset would swap them). D = 3: each
    group solved on its own points; D = 9 > max(N, M): one plan for all."""
    g = torch.Generator().manual_seed(21)
    scale = torch.arange(1.0, 9.0, dtype=torch.float64)[:, None, None]
    x = torch.randn(8, 6, d, generator=g, dtype=torch.float64) * scale
    y = torch.randn(8, m, d, generator=g, dtype=torch.float64) + 5.0
    a = torch.ones(8, 6, dtype=torch.float64)
    b = torch.ones(8, m, dtype=torch.float64)
    b[0, 6:] = 0.0  # 6 vs 6: assignment
    b[1, :3] = 0.0  # 6 vs m - 3: flow
    a[2, 0], b[2, 1:3] = 0.0, 0.0  # 5 vs m - 2: flow (masked rows too)
    a[3] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=torch.float64)  # general: POT
    b[4] = 0.0  # empty
    a[5, :2], b[5, :m - 4] = 0.0, 0.0  # 4 vs 4 after masking: assignment
    x.requires_grad_(True)
    value = exact_wasserstein(x, y, a, b, p=p, check_finite=False)
    torch.testing.assert_close(value.detach(), pot_oracle(x.detach(), y, a, b, p), rtol=1e-9,
                               atol=1e-9)
    (grad,) = torch.autograd.grad(value.sum(), x)
    for k in range(8):  # one problem at a time: the same value and gradient
        xk = x.detach()[k : k + 1].clone().requires_grad_(True)
        alone = exact_wasserstein(xk, y[k : k + 1], a[k : k + 1], b[k : k + 1], p=p,
                                  check_finite=False)
        torch.testing.assert_close(value[k : k + 1].detach(), alone.detach())
        (want,) = torch.autograd.grad(alone.sum(), xk)
        torch.testing.assert_close(grad[k : k + 1], want)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 9])
def test_sorted_rows_network_equals_sort(n):
    values = torch.randn(n, 300, generator=torch.Generator().manual_seed(n)).round(decimals=1)
    torch.testing.assert_close(exact_module._sorted_rows(values), values.sort(0).values)
    for count in range(1, n + 1):  # the partial passes: the `count` smallest, in order (ties)
        torch.testing.assert_close(exact_module._sorted_rows(values, count),
                                   values.sort(0).values[:count])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_exclusive_row_sums_equal_cumsum(m, width, seed):
    """The greedy start's prefix sums (row additions on a CPU) equal cumsum minus the row."""
    values = torch.randint(0, 9, (m, width), generator=torch.Generator().manual_seed(seed))
    got = exact_module._exclusive_cumsum_rows(values.float())
    torch.testing.assert_close(got, (values.cumsum(0) - values).float())


@pytest.mark.parametrize("d", [1, 2, 3, 7, 8, 9])
@pytest.mark.parametrize("centered", [False, True])
def test_plan_gradient_padded_gemm_equals_formula(d, centered, monkeypatch):
    """The plan gradient (CPU: 1 < D < 8 multiplied through zero-padded columns, in chunks with
    a ragged last one) equals ``scale (rowsum(P) (a - c) - P (b - c))`` in float64."""
    from ctxpred.wasserstein import _validate

    monkeypatch.setattr(_validate, "CHUNK_ELEMENTS", 3 * 6 * max(d, 8))  # chunks of 3 or so
    g = torch.Generator().manual_seed(d)
    plan = torch.rand(11, 5, 6, generator=g)
    a, b = torch.randn(11, 5, d, generator=g), torch.randn(11, 6, d, generator=g)
    mean = torch.randn(11, 1, d, generator=g) if centered else None
    scale = torch.rand(11, 1, 1, generator=g)
    with torch.no_grad():
        got = _validate._plan_gradient(plan, a, b, mean, scale)
    c = mean.double() if centered else 0.0
    pd = plan.double()
    want = scale.double() * (pd.sum(-1, keepdim=True) * (a.double() - c)
                             - pd @ (b.double() - c))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [2, 9])
def test_compile_fullgraph_exact_assignment(n):
    """No host sync on the assignment path either (the flow path: the estimator template): the
    subset DP (n <= 8) and the shortest-augmenting-path schedule (n = 9)."""
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(3, n, 2, generator=g), torch.randn(3, n, 2, generator=g)
    mask = torch.ones(3, n)
    mask[1, : n // 2], mask[2] = 0.0, 0.0

    def call(a, b, w):
        return exact_wasserstein(a, b, w, w, solver="assignment", check_finite=False)

    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, y, mask), call(x, y, mask))


# ---------------------------------------------------------------- Sinkhorn at p != 2


@pytest.mark.parametrize("p", [1, 1.5, 3])
@pytest.mark.parametrize("debias", [False, True])
def test_sinkhorn_backward_any_p_matches_exact_gradient(p, debias):
    """Used to crash: pairwise_cost modified in place a tensor autograd needed."""
    x, y = clouds(15, 32, 8, 8, 3, torch.float32)
    x.requires_grad_(True)
    value = wasserstein(x, y, method="sinkhorn", p=p, debias=debias, scaling=0.9, iterations=100)
    (g_sk,) = torch.autograd.grad(value.sum(), x)
    (g_ex,) = torch.autograd.grad(wasserstein(x, y, method="exact", p=p).sum(), x)
    assert torch.isfinite(g_sk).all()
    cos = torch.nn.functional.cosine_similarity(g_sk.flatten(1), g_ex.flatten(1))
    assert cos.mean() > 0.99 and cos.min() > 0.9
    exact_value = wasserstein(x, y, method="exact", p=p)
    if not debias:
        rel = (value - exact_value) / exact_value
        assert rel.min() > -1e-5 and rel.mean() < 1e-2


def masked_workload(seed, n, k, d):
    """The benchmark's masked workload: on 60% of problems 1-5 of k neighbors masked."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, k, d, generator=g), torch.randn(n, k, d, generator=g)
    rows = torch.rand(n, generator=g) < 0.6
    count = torch.randint(1, 6, (n,), generator=g)
    rank = torch.rand(n, k, generator=g).argsort(1).argsort(1)
    return x, y, (~((rank < count[:, None]) & rows[:, None])).float()


def test_sinkhorn_default_schedule_two_sided_on_masked_low_dimension():
    """Documented accuracy of the default schedule on masked D=3 problems (docs/estimators.md):
    never below the exact value (a feasible plan's cost), and at most this far above it."""
    x, y, mask = masked_workload(3, 512, 8, 3)
    exact = wasserstein(x, y, None, mask, method="exact").double()
    rel = (wasserstein(x, y, None, mask, method="sinkhorn").double() - exact) / exact
    assert rel.min() >= -1e-5
    assert 1e-3 < rel.mean() < 3e-2  # biased high on average on this workload (documented)
    assert rel.max() < 0.35


# ---------------------------------------------------------------- one template, every estimator

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ESTIMATORS = {  # name: (function, module class, options; smooth enough for gradcheck)
    "exact": (exact_wasserstein, ExactWasserstein, {}),
    "sinkhorn": (sinkhorn_wasserstein, SinkhornWasserstein,
                 {"debias": True, "blur": 2.0, "iterations": 60, "overrelaxation": 1.0}),
    "sliced": (sliced_wasserstein, SlicedWasserstein, {"num_projections": 8}),
    "gaussian": (gaussian_wasserstein, GaussianWasserstein, {}),
}


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.mark.parametrize("name", list(ESTIMATORS))
class TestEstimatorTemplate:
    """The same contract for every estimator (kornia BaseTester style)."""

    @staticmethod
    def inputs(device, dtype, batch=3, n=4, m=5, d=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, n, d, generator=g, dtype=torch.float64).to(device, dtype)
        y = torch.randn(batch, m, d, generator=g, dtype=torch.float64).to(device, dtype)
        w = torch.ones(batch, m, dtype=dtype, device=device)
        w[0, 1] = 0.0
        w[1, 3:] = 0.0
        return x, y, w

    def test_function_equals_module(self, name, device, dtype):
        fn, module, opts = ESTIMATORS[name]
        x, y, w = self.inputs(device, dtype)
        torch.manual_seed(0)
        got = module(**opts)(x, y, None, w)
        torch.manual_seed(0)
        want = fn(x, y, None, w, **opts)
        assert got.dtype == dtype and got.device.type == device.type and got.shape == (3,)
        torch.testing.assert_close(got, want)

    def test_perfect_prediction_gives_zero(self, name, device, dtype):
        fn, _, opts = ESTIMATORS[name]
        x, _, w = self.inputs(device, dtype, n=5)
        perm = torch.tensor([3, 0, 4, 1, 2], device=device)
        torch.manual_seed(0)
        value = fn(x, x[:, perm], w, w[:, perm], **opts)
        assert value.abs().max() < (1e-5 if dtype == torch.float32 else 1e-9)

    def test_gradcheck_float64(self, name, device):
        fn, _, opts = ESTIMATORS[name]
        x, y, w = self.inputs(device, torch.float64, batch=2)
        x.requires_grad_(True)
        opts = {**opts, "seed": 0} if name == "sliced" else opts
        assert torch.autograd.gradcheck(lambda t: fn(t, y, None, w, **opts), (x,),
                                        atol=1e-5, rtol=1e-4)

    def test_compile_fullgraph(self, name, device):
        """One graph, no host sync (the accelerator path), same values and gradients as eager
        (with the gradient traced: the backward's code is in the graph too)."""
        fn, _, opts = ESTIMATORS[name]
        x, y, w = self.inputs(device, torch.float32, batch=2, n=2, m=2)
        w[1] = torch.tensor([1.0, 0.0])
        opts = {**opts, "iterations": 3, "debias": False} if name == "sinkhorn" else opts

        def call(a, b, c):
            return fn(a, b, None, c, check_finite=False, **opts)

        compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
        results = []
        for f in (compiled, call):
            xg = x.detach().clone().requires_grad_(True)
            torch.manual_seed(0)
            value = f(xg, y, w)
            results.append((value.detach(), *torch.autograd.grad(value.sum(), xg)))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want)


# ------------------------------------------------- torch.use_deterministic_algorithms(True)

#: aten operations that raise on CUDA under torch.use_deterministic_algorithms(True) (its
#: documentation's list), by overload packet name; cumsum only with a floating-point input
_NONDETERMINISTIC_ON_CUDA = {
    "put_", "histc", "bincount", "nll_loss_forward", "nll_loss2d_forward",
    "avg_pool3d_backward", "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward",
    "adaptive_max_pool2d_backward", "fractional_max_pool2d_backward",
    "fractional_max_pool3d_backward", "max_unpool2d", "max_unpool3d",
    "upsample_linear1d_backward", "upsample_bilinear2d_backward", "upsample_bicubic2d_backward",
    "upsample_trilinear3d_backward", "reflection_pad1d_backward", "reflection_pad2d_backward",
    "reflection_pad3d_backward", "_ctc_loss_backward", "grid_sampler_2d_backward",
    "grid_sampler_3d_backward",
}


class _RaisingOpsSpy(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        first = args[0] if args else None
        strings = [a for a in (*args, *kwargs.values()) if isinstance(a, str)]
        if (name in _NONDETERMINISTIC_ON_CUDA
                or (name == "median" and func._overloadname.startswith("dim"))
                or (name in ("scatter_reduce", "scatter_reduce_") and "prod" in strings)
                or (name in ("cumsum", "cumsum_") and isinstance(first, torch.Tensor)
                    and first.is_floating_point()
                    and kwargs.get("dtype") not in (torch.int32, torch.int64))):
            self.found.append(str(func))
        return func(*args, **kwargs)


@contextlib.contextmanager
def _deterministic_spy():
    """``torch.use_deterministic_algorithms(True)`` and a :class:`_RaisingOpsSpy` inside."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with _RaisingOpsSpy() as spy:
            yield spy
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("name", ["exact", "sinkhorn", "sliced", "gaussian"])
@pytest.mark.parametrize("masked", [False, True])
def test_estimators_dispatch_no_op_that_raises_on_cuda_in_deterministic_mode(name, masked):
    """The meta device takes the accelerator code path without a GPU: forward and backward
    must not dispatch an op that CUDA refuses under use_deterministic_algorithms(True) (the
    flow's start and the sliced quantiles used a float cumsum, which does)."""
    fn = ESTIMATORS[name][0]
    x = torch.empty(16, 8, 3, device="meta", requires_grad=True)
    y = torch.empty(16, 8, 3, device="meta")
    w = torch.empty(16, 8, device="meta") if masked else None
    with _deterministic_spy() as spy:
        fn(x, y, None, w, check_finite=False).sum().backward()
    assert spy.found == []


def test_prefix_sum_without_float_cumsum_equals_cumsum(monkeypatch):
    g = torch.Generator().manual_seed(3)
    values = torch.rand(5, 4, 7, generator=g, dtype=torch.float64)
    x, y = torch.randn(6, 5, 2, generator=g), torch.randn(6, 7, 2, generator=g)
    w = (torch.rand(6, 7, generator=g) < 0.7).float()
    w[:, 0] = 1.0
    theta = torch.randn(2, 16, generator=g)
    before = sliced_wasserstein(x, y, None, w, projections=theta)
    monkeypatch.setattr(validate_module, "_float_cumsum_allowed", lambda device: False)
    torch.testing.assert_close(validate_module.prefix_sum(values), values.cumsum(-1))
    torch.testing.assert_close(sliced_wasserstein(x, y, None, w, projections=theta), before)


def _meta_losses():
    """``{name: (loss, features, target)}``: the loss's configurations on the meta device."""
    pixel = (torch.empty(2, 16, 8, 8, device="meta"), torch.empty(2, 3, 16, 16, device="meta"))
    tokens = (torch.empty(2, 64, 32, device="meta"), torch.zeros(2, 8, 8, dtype=torch.long,
                                                                   device="meta"))
    intensity = torch.linspace(0, 1, 16)[:, None]

    def pixel_loss(head, **options):
        return ctxpred.ContextPredictionLoss(ctxpred.PixelNeighborhood(strides=(1, 2)), head,
                                             weight=0.1, points=32, **options)

    gaussian = {"out_channels": 3, "in_channels": 16, "num_strides": 2}
    cases = {f"pixel-{e}": (pixel_loss(ctxpred.GaussianSamplingHead(**gaussian), estimator=e),
                            *pixel) for e in ("exact", "sinkhorn", "sliced")}
    cases["moment"] = (pixel_loss(ctxpred.MomentHead(**gaussian)), *pixel)
    cases["naive"] = (pixel_loss(ctxpred.NaiveHead(**gaussian)), *pixel)
    cases["token-distribution"] = (ctxpred.ContextPredictionLoss(
        ctxpred.TokenNeighborhood(strides=(1, 2)),
        ctxpred.CategoricalHead(num_classes=16, in_channels=32, num_strides=2),
        weight=0.1, grid_shape=(8, 8)), *tokens)
    cases["token-sampling"] = (ctxpred.ContextPredictionLoss(
        ctxpred.TokenNeighborhood(strides=(1, 2), codebook=intensity),
        ctxpred.CategoricalHead(num_classes=16, in_channels=32, codebook=intensity,
                                num_samples=8, num_strides=2),
        weight=0.1, points=32, grid_shape=(8, 8)), *tokens)
    return cases


@pytest.mark.parametrize("case", ["pixel-exact", "pixel-sinkhorn", "pixel-sliced", "moment",
                                  "naive", "token-distribution", "token-sampling"])
def test_the_loss_dispatches_no_op_that_raises_on_cuda_in_deterministic_mode(case):
    """The whole loss (neighborhood, head, estimator; pixel targets at twice the features'
    grid, tokens) on the meta device, forward and backward, as above. Running there at all
    also shows that the accelerator path reads nothing back to the host."""
    loss_fn, features, target = _meta_losses()[case]
    loss_fn = loss_fn.to("meta")
    features.requires_grad_(True)
    with _deterministic_spy() as spy:
        loss_fn(features, target=target).backward()
    assert spy.found == []


def test_the_spy_sees_the_ops_it_looks_for():
    """The spy itself: a float cumsum and an in-place scatter_reduce_ with "prod" are caught,
    an integer cumsum and "amin" are not."""
    v = torch.empty(4, 3, device="meta")
    index = torch.zeros(4, 3, dtype=torch.long, device="meta")
    with _deterministic_spy() as spy:
        v.cumsum(-1)
        v.to(torch.int32).cumsum(-1)
        v.clone().scatter_reduce_(0, index, v, "amin")
        v.clone().scatter_reduce_(0, index, v, "prod")
    assert [f.split(".")[1] for f in spy.found] == ["cumsum", "scatter_reduce_"]
