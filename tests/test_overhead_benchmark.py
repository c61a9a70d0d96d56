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
    exact = overhead.make_variant(args, variants["exact_matched_points_16"])
    losses = exact.trainer.predictor.loss_modules
    assert losses and all(loss.match_mask and loss.points == 16 for loss in losses.values())
    # the default is the trainer's (the recommended configuration)
    assert variants["default"] == type(variants["default"])()
    exact.step()
    assert exact.trainer.step == 1


def test_reference_report_names_the_model_and_every_variant(tmp_path) -> None:
    names = list(overhead.reference_variants())
    result = {
        "device": "cpu", "command": "python3 run.py bench overhead --model reference",
        "date": "today", "torch": "x", "threads": 1, "machine": "m", "note": "",
        "config": {"model": "reference", "batch": 16, "base_channels": 16, "steps": 1,
                   "warmup": 1},
        "variants": "v", "step_ms": {n: 100.0 + i for i, n in enumerate(names)},
        "step_ms_all": {n: [100.0 + i] for i, n in enumerate(names)},
        "time_ratio": {n: 1.0 + i / 100 for i, n in enumerate(names) if n != "baseline"},
        "peak_mib": dict.fromkeys(names, 10.0),
        "memory_ratio": {n: 1.0 for n in names if n != "baseline"},
        "memory_method": "rss",
    }
    overhead.write_report(result, tmp_path / "report")
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Context-prediction overhead on the reference model (cpu)")
    assert "UNet base width 16" in md
    for i, name in enumerate(names):
        assert f"| {name} | {100.0 + i:.1f} |" in md
    assert "| exact_matched_points_16 | " in md and "1.060" in md
