"""Smoke test of benchmarks/estimators.py on tiny sizes (seconds): it runs, writes JSON + md."""

from __future__ import annotations

import json

import torch

from benchmarks import estimators


def test_estimators_benchmark_quick(tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "estimators_smoke"
    try:
        assert estimators.main(["--quick", "--configs", "24x4x3", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(out.with_suffix(".json").read_text())
    rows = {r["name"]: r for r in doc["configs"][0]["rows"]}
    exact = rows["ctxpred exact (batched assignment)"]
    assert abs(exact["rel_err_mean"]) < 1e-5 and exact["grad_cos_mean"] > 0.999
    assert "POT ot.emd2 loop" in rows and rows["POT ot.emd2 loop"]["extrapolated"]
    assert doc["configs"][0]["targets"]["exact_time_over_scipy_loop"] is not None
    text = out.with_suffix(".md").read_text()
    assert "| ctxpred exact (batched assignment) |" in text and "N=24, K=4, D=3" in text
