"""``benchmarks/overhead.py``: both models build, step and report ratios (smoke sizes)."""

from __future__ import annotations

import pytest

from benchmarks import overhead


@pytest.mark.parametrize("model", ["diffusers", "reference"])
def test_overhead_benchmark_times_every_variant(model: str) -> None:
    pytest.importorskip("diffusers") if model == "diffusers" else None
    args = overhead.parse_args(["--model", model, "--quick", "--steps", "1"])
    result = overhead.measure_time(args)
    names = list(overhead._variants(args))
    assert names[0] == "baseline" and len(names) >= 3
    assert set(result["step_ms"]) == set(names)
    assert set(result["time_ratio"]) == set(names) - {"baseline"}
    assert all(r > 0 for r in result["time_ratio"].values())


def test_reference_variants_train_with_the_context_they_name() -> None:
    args = overhead.parse_args(["--model", "reference", "--quick"])
    variants = overhead.reference_variants()
    assert variants["baseline"] is None
    base = overhead.make_variant(args, None)
    assert base.trainer.predictor is None
    exact = overhead.make_variant(args, variants["exact_matched_points_32"])
    losses = exact.trainer.predictor.loss_modules
    assert losses and all(loss.match_mask and loss.points == 32 for loss in losses.values())
    exact.step()
    assert exact.trainer.step == 1
