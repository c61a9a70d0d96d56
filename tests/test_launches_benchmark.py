"""benchmarks/launches.py: operation counts on the meta device (the accelerator code path)."""

from __future__ import annotations

import doctest

from benchmarks import launches
from ctxpred.wasserstein.exact import exact_wasserstein, flow_augmentation_bound
from ctxpred.wasserstein.sinkhorn import sinkhorn_wasserstein


def test_counts_do_not_depend_on_the_number_of_problems() -> None:
    # nothing loops over problems on the accelerator path: one op sequence for any batch
    for fn, masked in [(exact_wasserstein, False), (sinkhorn_wasserstein, True)]:
        assert launches.count_ops(fn, 8, 3, masked, 3) == launches.count_ops(fn, 8, 3, masked, 40)
    with launches.flow_rounds(2):
        assert (launches.count_ops(exact_wasserstein, 8, 3, True, 3)
                == launches.count_ops(exact_wasserstein, 8, 3, True, 40))


def test_the_flow_costs_its_start_plus_the_same_ops_every_round() -> None:
    counts = []
    for rounds in (0, 1, 3):
        with launches.flow_rounds(rounds):
            counts.append(launches.count_ops(exact_wasserstein, 4, 3, True))
    start, one, three = counts
    assert start > 0 and one > start and three - start == 3 * (one - start)
    # the unpatched fixed schedule runs the bound's rounds
    full = launches.count_ops(exact_wasserstein, 4, 3, True)
    assert full == start + flow_augmentation_bound(4, 4) * (one - start)


def test_rounds_needed_and_the_report(tmp_path) -> None:
    assert 1 <= launches.rounds_needed(8, 3, problems=256) <= flow_augmentation_bound(8, 8)
    doc = launches.measure([(4, 3, True), (4, 1, True)], problems=256)
    flow = next(r for r in doc["rows"] if r["estimator"] == "exact" and r["D"] == 3)
    assert flow["ops"] == flow["start"] + flow["bound"] * flow["per_round"]
    sorted_coupling = next(r for r in doc["rows"] if r["estimator"] == "exact" and r["D"] == 1)
    assert "per_round" not in sorted_coupling and sorted_coupling["ops"] < flow["start"]
    text = launches.markdown(doc)
    assert text.count("\n| 4 |") == 2 * len(launches.ESTIMATORS)
    assert "| 4 | 3 | yes | exact |" in text


def test_docstring_examples() -> None:
    assert doctest.testmod(launches).failed == 0


def test_the_triton_solver_is_one_kernel_plus_the_cost_and_gradient(monkeypatch) -> None:
    # the stand-in needs no triton; the count is the cost matrix, the value and its gradient
    # around one kernel, for any K and batch, far below the batched solvers'
    from ctxpred.wasserstein import _triton

    monkeypatch.setattr(_triton, "available", lambda: False)
    counts = {(k, masked, problems): launches.count_ops(exact_wasserstein, k, 3, masked,
                                                        problems, solver="triton")
              for k in (8, 24) for masked in (False, True) for problems in (3, 40)}
    assert counts[8, False, 3] == counts[8, False, 40] == counts[24, False, 3]
    assert counts[8, True, 3] == counts[8, True, 40]
    assert max(counts.values()) < 100 < launches.count_ops(exact_wasserstein, 8, 3, False)
