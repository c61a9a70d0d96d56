"""``solver="triton"``: exact plans from one fused Triton kernel, one program per problem.

The kernel tests run where the kernel runs: on CUDA when a GPU is visible, and -- on every machine
with the ``triton`` package, GPU or not -- in Triton's interpreter, which executes the same
program on CPU tensors. The interpreter must be switched on before ``triton`` is first imported,
so ``test_kernel_in_the_interpreter`` runs this file again in a child pytest process with
``TRITON_INTERPRET=1``; in the parent (no GPU) the kernel tests skip and say so.

Oracles: POT ``ot.emd2`` / ``ot.emd`` per problem in float64 (values, marginals) and the batched
min-cost flow ``solver="flow"`` (values and envelope gradients).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxpred.errors import ValueRangeError
from ctxpred.wasserstein import exact_wasserstein
from tests.test_wasserstein import masked_problem, pot_oracle

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
CHILD = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if CHILD else ("cuda" if torch.cuda.is_available() else None)

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the triton package is not installed")
kernel_test = pytest.mark.skipif(
    not HAS_TRITON or DEVICE is None,
    reason="no CUDA device: these run in Triton's interpreter in test_kernel_in_the_interpreter",
)


@needs_triton
@pytest.mark.skipif(CHILD, reason="this is the child process")
def test_kernel_in_the_interpreter():
    """Every kernel test of this file, in a child process whose Triton interprets the program on
    CPU tensors (so the kernel's logic is checked on machines without a GPU)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-x",
         str(Path(__file__).relative_to(ROOT))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    report = run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert " passed" in run.stdout and "no CUDA device" not in run.stdout, report  # none skipped


@needs_triton
@pytest.mark.skipif(CHILD, reason="the interpreter compiles nothing")
@pytest.mark.filterwarnings("ignore::UserWarning")  # triton's notices about its defaults
@pytest.mark.parametrize("arch", [80, 90])
def test_the_kernel_compiles_for_data_center_gpus(arch):
    """Triton's real compiler (not the interpreter) takes the program down to a cubin for A100
    (sm_80) and H100/H200 (sm_90) at every tile size the wrapper launches -- no GPU needed. The
    interpreter is more permissive (loop-carried types, scalar/vector mixing), so this catches
    what the interpreter tests cannot."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ctxpred.wasserstein._triton import num_warps
    from ctxpred.wasserstein._triton_kernel import flow_kernel

    signature = {"cost_ptr": "*fp32", "row_ptr": "*i8", "col_ptr": "*i8", "plan_ptr": "*fp32",
                 "n": "i32", "m": "i32", "BR": "constexpr", "BC": "constexpr"}
    for br, bc in ((2, 2), (8, 8), (16, 8), (32, 32)):
        source = ASTSource(fn=flow_kernel, signature=signature, constexprs={"BR": br, "BC": bc})
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps(br, bc)})
        assert compiled.asm["cubin"] and ".entry flow_program" in compiled.asm["ptx"]


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


@kernel_test
def test_values_and_marginals_equal_pot_on_the_masked_cases():
    """One launch over the cases the issue names: masked rows and columns, ties and duplicate
    points (integer grid), a single valid neighbor, all masked on one side, scales 1e+-4,
    clouds far from the origin, Q != K. Values within 1e-6 relative of ot.emd2 (float64);
    the plan's marginals are exact (1/n_a per valid row, 1/n_b per valid column, 0 elsewhere)."""
    cases = [
        masked_problem(1, 6, 8, 8, 3, 1.0, 0.0, False),
        masked_problem(2, 6, 8, 8, 3, 1.0, 0.0, True),  # ties, duplicates
        masked_problem(3, 4, 8, 8, 64, 1e-4, 0.0, False),
        masked_problem(4, 4, 8, 8, 3, 1e4, 1e7, False),  # far from the origin
        masked_problem(5, 4, 8, 8, 3, 1.0, 1e3, True),
    ]
    for x, y, a, b in cases:
        b[2] = 0.0
        b[2, 5] = 1.0  # a single valid neighbor
        a[3] = 1.0  # every sample valid against a masked neighbor set
        xd, yd, ad, bd = _on(DEVICE, x, y, a, b)
        got = exact_wasserstein(xd, yd, ad, bd, solver="triton", check_finite=False)
        scale = x.abs().max().item() ** 2 + 1e-30
        torch.testing.assert_close(got.double().cpu(), pot_oracle(x, y, a, b), rtol=1e-6,
                                   atol=1e-6 * scale)
    # unequal sizes (Q = 5 samples against K = 8 neighbors), and the plans' marginals
    from ctxpred.wasserstein._triton import triton_transport_plan

    x, y, a, b = masked_problem(6, 8, 5, 8, 3, 1.0, 0.0, True)
    got = exact_wasserstein(*_on(DEVICE, x, y, a, b), solver="triton", check_finite=False)
    torch.testing.assert_close(got.double().cpu(), pot_oracle(x, y, a, b), rtol=1e-6, atol=1e-6)
    cost = ((x[:, :, None] - y[:, None]) ** 2).sum(-1)
    plan = triton_transport_plan(*_on(DEVICE, cost, a > 0, b > 0)).cpu().double()
    nonempty = (a.sum(1) > 0) & (b.sum(1) > 0)
    rows = torch.where(nonempty[:, None], a / a.sum(1, keepdim=True).clamp_min(1), 0.0)
    cols = torch.where(nonempty[:, None], b / b.sum(1, keepdim=True).clamp_min(1), 0.0)
    torch.testing.assert_close(plan.sum(2), rows, rtol=0, atol=1e-7)
    torch.testing.assert_close(plan.sum(1), cols, rtol=0, atol=1e-7)
    assert (plan[~(a > 0)] == 0).all() and (plan.transpose(1, 2)[~(b > 0)] == 0).all()


@kernel_test
@settings(max_examples=6, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 6), st.integers(1, 6), st.integers(1, 4),
       st.booleans())
def test_values_equal_pot_on_random_sizes(seed, n, m, d, grid):
    """Hypothesis: any sizes up to 6 x 6 (padding to the kernel's power-of-two tiles), masks on
    both sides, ties: values equal ot.emd2."""
    x, y, a, b = masked_problem(seed, 3, n, m, d, 1.0, 0.0, grid)
    got = exact_wasserstein(*_on(DEVICE, x, y, a, b), solver="triton", check_finite=False)
    torch.testing.assert_close(got.double().cpu(), pot_oracle(x, y, a, b), rtol=1e-6, atol=1e-6)


@kernel_test
def test_unmasked_assignment_and_k_above_eight():
    """Equal supports (the assignment problem: one unit per row and column) at K = 8 and at
    K = 24 (32 x 32 tiles), against ot.emd2; and K = 33 is refused with the limit named."""
    g = torch.Generator().manual_seed(7)
    for k, batch in ((8, 6), (24, 2)):
        x, y = torch.randn(batch, k, 5, generator=g), torch.randn(batch, k, 5, generator=g)
        got = exact_wasserstein(*_on(DEVICE, x, y), solver="triton", check_finite=False)
        torch.testing.assert_close(got.double().cpu(), pot_oracle(x, y), rtol=1e-6, atol=1e-6)
    x = torch.randn(1, 33, 2, device=DEVICE)
    with pytest.raises(ValueRangeError, match="at most 32 points per side, got N=33"):
        exact_wasserstein(x, x, solver="triton")


@kernel_test
def test_gradients_equal_the_flow_solver_and_p_other_than_two():
    """The value is <plan, C> with the plan fixed: the envelope gradient in x and y equals the
    batched min-cost flow's (no ties: random points), at p = 2 and p = 1.5."""
    x, y, a, b = masked_problem(11, 5, 8, 8, 3, 1.0, 0.0, False)
    for p in (2.0, 1.5):
        grads = []
        for solver, device in (("triton", DEVICE), ("flow", "cpu")):
            xs = x.double().to(device).requires_grad_(True)
            ys = y.double().to(device).requires_grad_(True)
            val = exact_wasserstein(xs, ys, a.to(device), b.to(device), p=p, solver=solver,
                                    check_finite=False)
            grads.append([val.detach().cpu(), *(t.cpu() for t in torch.autograd.grad(
                val.sum(), (xs, ys)))])
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@kernel_test
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy, in the interpreter
def test_non_finite_points_give_nan_and_the_kernel_ends():
    """check_finite=False (the loss's setting) with a NaN or inf point: every program still ends
    (its loops are bounded), the affected problems are not finite, the others exact."""
    x, y, a, b = masked_problem(3, 6, 8, 8, 3, 1.0, 0.0, False)
    a[:], b[:, :3], b[:, 3:] = 1.0, 0.0, 1.0
    clean = exact_wasserstein(*_on(DEVICE, x, y, a, b), solver="triton", check_finite=False)
    y[2, 4, 0], y[4, 6, 0] = float("nan"), float("inf")
    got = exact_wasserstein(*_on(DEVICE, x, y, a, b), solver="triton", check_finite=False).cpu()
    assert torch.isnan(got[2]) and not torch.isfinite(got[4])
    keep = [0, 1, 3, 5]
    torch.testing.assert_close(got[keep], clean.cpu()[keep])


@kernel_test
def test_general_weights_are_refused():
    x = torch.randn(2, 4, 3, device=DEVICE)
    w = torch.tensor([[1.0, 2.0, 1.0, 1.0]] * 2, device=DEVICE)
    with pytest.raises(ValueRangeError, match="solver='triton' needs uniform weights"):
        exact_wasserstein(x, x, w, None, solver="triton")


@kernel_test
def test_in_the_loss():
    """``estimator_options={"solver": "triton"}`` reaches the kernel through the loss; the loss
    equals the one with the batched flow solver."""
    import ctxpred

    torch.manual_seed(0)
    features = torch.randn(1, 4, 4, 4, device=DEVICE)
    image = torch.randn(1, 3, 4, 4, device=DEVICE)
    head = ctxpred.GaussianSamplingHead(out_channels=3, in_channels=4, num_samples=5).to(DEVICE)
    losses = []
    for solver in ("triton", "flow"):
        loss = ctxpred.ContextPredictionLoss(ctxpred.PixelNeighborhood(strides=(1,)), head,
                                             estimator="exact",
                                             estimator_options={"solver": solver})
        generator = torch.Generator(DEVICE).manual_seed(1)
        losses.append(loss(features, target=image, generator=generator))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.skipif(CHILD, reason="the interpreter takes CPU tensors")
def test_cpu_tensors_without_the_interpreter_are_refused():
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueRangeError, match="runs on CUDA tensors"):
        exact_wasserstein(x, x, solver="triton")


def test_missing_triton_is_named(monkeypatch):
    from ctxpred.wasserstein import _triton

    monkeypatch.setattr(_triton, "available", lambda: False)
    x = torch.randn(2, 4, 3)
    with pytest.raises(ModuleNotFoundError, match="needs the triton package"):
        exact_wasserstein(x, x, solver="triton")


@kernel_test
def test_the_estimators_benchmark_times_the_kernel(tmp_path, monkeypatch):
    """benchmarks/estimators.py adds the kernel's rows (unmasked and masked configurations) where
    it runs, measures them against the float64 references and reports them in the targets."""
    import json

    from benchmarks import estimators

    monkeypatch.setattr(estimators, "triton_rows", lambda device: True)
    threads = torch.get_num_threads()
    out = tmp_path / "estimators_triton"
    try:
        assert estimators.main(["--quick", "--device", DEVICE, "--configs", "16x4x3,12x4x3m",
                                "--skip", "geomloss", "POT ot.batch", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(out.with_suffix(".json").read_text())
    for config, key in zip(doc["configs"], ("triton_exact_time_over_exact",
                                            "triton_exact_time_over_masked_exact")):
        row = next(r for r in config["rows"] if r["name"] == estimators.TRITON_ROW)
        assert row["rel_err_abs_max"] < 1e-5 and row["grad_cos_min"] > 0.9999, row
        assert config["targets"][key] is not None


@kernel_test
def test_the_plan_function_checks_its_masks():
    from ctxpred.wasserstein._triton import triton_transport_plan

    cost = torch.zeros(3, 4, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"col_valid must be \(3, 5\)"):
        triton_transport_plan(cost, None, torch.ones(3, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match=r"cost must be \(B, n, m\)"):
        triton_transport_plan(cost[0])


@kernel_test
def test_float64_and_bfloat16_inputs():
    """float64 points: the plan's weights are exact in float64 (row sums 1/n_a to 1e-15, so the
    value carries no float32 rounding of 1/56-type weights; the costs are still compared in
    float32); bfloat16 points are computed in float32 and returned in bfloat16."""
    from ctxpred.wasserstein._triton import triton_transport_plan

    x, y, a, b = masked_problem(21, 6, 8, 8, 3, 1.0, 0.0, False)
    a[:] = 1.0
    b[:, :1] = 0.0  # 8 samples against 7 neighbors: weights 1/8 and 1/7, 56 units
    b[:, 1:] = 1.0
    cost = ((x.double()[:, :, None] - y.double()[:, None]) ** 2).sum(-1)
    plan = triton_transport_plan(*_on(DEVICE, cost, a > 0, b > 0)).cpu()
    assert plan.dtype == torch.float64
    torch.testing.assert_close(plan.sum(2), torch.full((6, 8), 1 / 8, dtype=torch.float64),
                               rtol=0, atol=1e-15)
    got = exact_wasserstein(*_on(DEVICE, x.double(), y.double(), a, b), solver="triton",
                            check_finite=False)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.cpu(), pot_oracle(x, y, a, b), rtol=1e-9, atol=1e-12)
    low = exact_wasserstein(*_on(DEVICE, x.bfloat16(), y.bfloat16(), a, b), solver="triton",
                            check_finite=False)
    assert low.dtype == torch.bfloat16
    want = pot_oracle(x.bfloat16().float(), y.bfloat16().float(), a, b)
    torch.testing.assert_close(low.cpu().double(), want, rtol=1e-2, atol=1e-3)


@kernel_test
def test_costs_far_beyond_the_kernels_unreachable_give_the_same_plan():
    """The kernel's "unreachable" is 1e30: costs of ~1e31 had stopped the solve early (a plan
    with the wrong marginals, rescaled to mass 1: values off by ~50%). The wrapper rescales each
    problem by a power of two, so costs times 2^103 give the plan of the costs themselves, and
    points ~3e15 apart the value of POT."""
    from ctxpred.wasserstein._triton import triton_transport_plan

    x, y, a, b = masked_problem(31, 6, 8, 8, 3, 1.0, 0.0, False)
    cost = ((x[:, :, None] - y[:, None]) ** 2).sum(-1)
    plan = triton_transport_plan(*_on(DEVICE, cost, a > 0, b > 0)).cpu()
    huge = triton_transport_plan(*_on(DEVICE, cost * 2.0**103, a > 0, b > 0)).cpu()
    torch.testing.assert_close(huge, plan, rtol=0, atol=0)
    far = [t.double() * 3e15 for t in (x, y)]
    got = exact_wasserstein(*_on(DEVICE, *far, a, b), solver="triton", check_finite=False)
    torch.testing.assert_close(got.cpu(), pot_oracle(*far, a, b), rtol=1e-6, atol=0)


@needs_triton
@pytest.mark.skipif(CHILD, reason="compiles in the parent")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_is_refused_with_a_clear_error():
    """Untested under torch.compile (no GPU has run the kernel): refused by name, not left to
    fail somewhere inside the compiler."""
    compiled = torch.compile(lambda x: exact_wasserstein(x, x, solver="triton"))
    with pytest.raises(ValueRangeError, match="solver='triton' runs in eager mode"):
        compiled(torch.randn(2, 4, 3))
