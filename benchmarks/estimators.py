#!/usr/bin/env python3
"""Benchmark ctxpred's Wasserstein estimators against POT, geomloss and scipy, in one run.

For each configuration ``N x K x D`` (N problems of K points in R^D, uniform weights, the
context-prediction loss's shape) it times forward + backward of ``values.mean()`` w.r.t. the
predicted points, measures peak memory and the value's relative error (and the gradient's cosine)
against the exact W_2^2 (scipy ``linear_sum_assignment`` in float64), for:

* ctxpred: ``exact``, ``sinkhorn`` (default; and with geomloss's entropic plan), ``sinkhorn``
  debiased, ``sliced``, ``gaussian`` (full, diag); on CUDA with triton installed also
  ``exact`` with ``solver="triton"`` (the fused kernel, one program per problem; masked
  configurations too);
* POT: ``ot.emd2`` per problem (Python loop; timed on ``--loop-n`` problems and extrapolated),
  ``ot.batch.solve_batch`` log-Sinkhorn (50 iterations, eps = 0.01 x mean cost, envelope grad);
* geomloss: ``SamplesLoss("sinkhorn", blur=0.05, scaling=0.5)`` tensorized, with/without debias
  (its cost is |x-y|^2/2, so values are doubled);
* scipy ``linear_sum_assignment`` per problem on the host + gather (exact, envelope gradient);
* point-wise MSE in a fixed order: the floor (not a transport cost).

A configuration ``N x K x D m`` (suffix ``m``) is the *masked* workload of the loss at image
borders: ``K`` predicted samples against ``K`` neighbors of which, on 60% of the problems, 1 to 5
(uniformly) are masked out -- unequal supports. Its reference is POT ``ot.emd`` per problem in
float64 (value and envelope gradient); its rows are the estimators that take masks (ctxpred exact,
Sinkhorn's default and masked schedules, the POT loop, the masked MSE floor) plus ctxpred exact on
the same points without the mask (the unmasked cost of the same problems). ``1536x8x1m`` is the
reference model's own call (grayscale pixel targets, about 1.5k problems per step), where exact
takes the 1-D sorted coupling.

Prints a markdown table and writes ``OUT.json`` and ``OUT.md``. Example::

    python benchmarks/estimators.py --device cpu --repeats 3
    python benchmarks/estimators.py --quick --out /tmp/smoke   # tiny smoke run

Numbers on a shared machine are noisy; compare ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ctxpred  # noqa: E402
from ctxpred.wasserstein import (  # noqa: E402
    exact_wasserstein,
    gaussian_wasserstein,
    sinkhorn_wasserstein,
    sliced_wasserstein,
)

Estimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DEFAULT_CONFIGS = "1536x8x1m,16384x8x3m,16384x8x64m,16384x8x64,16384x24x64,4096x8x256"
QUICK_CONFIGS = "48x5x4,32x3x8,40x4x3m"
MASKED_FRACTION, MASKED_MIN, MASKED_MAX = 0.6, 1, 5  # the masked workload (see above)


# ----------------------------------------------------------------------------- estimators


def _sqdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x.unsqueeze(2) - y.unsqueeze(1)) ** 2).sum(-1)


def _sqdist_mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Matmul-form squared distances (the anchor benchmark's peer cost)."""
    x2, y2 = (x * x).sum(-1), (y * y).sum(-1)
    return (x2[:, :, None] + y2[:, None, :] - 2.0 * torch.bmm(x, y.transpose(1, 2))).clamp_min(0)


def scipy_loop(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """scipy linear_sum_assignment per problem on the host, then gather from the cost."""
    from scipy.optimize import linear_sum_assignment

    cost = _sqdist_mm(x, y)
    cost_np = cost.detach().double().cpu().numpy()
    cols = np.stack([linear_sum_assignment(c)[1] for c in cost_np])
    idx = torch.from_numpy(cols).to(x.device)
    return cost.gather(2, idx.unsqueeze(-1)).squeeze(-1).mean(-1)


def exact_reference(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 exact W_2^2 and its gradient w.r.t. x (scipy matching, differences recomputed)."""
    from scipy.optimize import linear_sum_assignment

    xd, yd = x.detach().double().cpu(), y.detach().double().cpu()
    cost = _sqdist_mm(xd, yd).numpy()
    cols = torch.from_numpy(np.stack([linear_sum_assignment(c)[1] for c in cost]))
    diff = xd - yd.gather(1, cols.unsqueeze(-1).expand(-1, -1, yd.shape[-1]))
    values = diff.pow(2).sum(-1).mean(-1)
    return values, 2.0 * diff / x.shape[1] / x.shape[0]


def pot_emd2_loop(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    import ot

    cost = _sqdist(x, y)
    k, m = x.shape[1], y.shape[1]
    a = torch.full((k,), 1.0 / k, dtype=x.dtype, device=x.device)
    b = torch.full((m,), 1.0 / m, dtype=x.dtype, device=x.device)
    return torch.stack([ot.emd2(a, b, cost[i]) for i in range(cost.shape[0])])


def pot_batch_sinkhorn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    import ot.batch

    cost = _sqdist(x, y)
    scale = cost.detach().mean(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ot.batch.solve_batch(cost / scale, reg=0.01, method="log_sinkhorn", max_iter=50,
                                   tol=1e-5, grad="envelope")
    return res.value_linear * scale.reshape(-1)


def make_geomloss(debias: bool) -> Estimator:
    import geomloss

    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5, debias=debias,
                                backend="tensorized")
    return lambda x, y: 2.0 * loss(x, y)


def mse_floor(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x - y).pow(2).sum(-1).mean(-1)


def masked_workload(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, k)`` 0/1 float mask: on 60% of the rows, 1-5 (uniformly) of the k neighbors off."""
    rows = torch.rand(n, generator=generator) < MASKED_FRACTION
    count = torch.randint(MASKED_MIN, min(MASKED_MAX, k - 1) + 1, (n,), generator=generator)
    rank = torch.rand(n, k, generator=generator).argsort(1).argsort(1)
    return (~((rank < count.unsqueeze(1)) & rows.unsqueeze(1))).float()


def masked_reference(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 exact W_2^2 per problem with masked y (POT ot.emd) and its gradient w.r.t. x."""
    import ot

    xd, yd, md = (t.detach().double().cpu() for t in (x, y, mask))
    plans = []
    a = np.full(x.shape[1], 1.0 / x.shape[1])
    for k in range(xd.shape[0]):
        b = md[k].numpy() / md[k].sum().item()
        plans.append(torch.from_numpy(ot.emd(a, b, ot.dist(xd[k].numpy(), yd[k].numpy()))))
    plan = torch.stack(plans)
    cost = _sqdist(xd, yd)
    values = (plan * cost).sum((1, 2))
    grad = 2.0 * (plan.sum(-1, keepdim=True) * xd - torch.bmm(plan, yd)) / x.shape[0]
    return values, grad


def pot_emd2_loop_masked(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    import ot

    cost = _sqdist(x, y)
    a = torch.full((x.shape[1],), 1.0 / x.shape[1], dtype=x.dtype, device=x.device)
    b = mask / mask.sum(-1, keepdim=True)
    return torch.stack([ot.emd2(a, b[i], cost[i]) for i in range(cost.shape[0])])


def mse_floor_masked(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((x - y).pow(2).sum(-1) * mask).sum(-1) / mask.sum(-1)


SLOW_SCHEDULE = {"scaling": 0.9, "iterations": 200}


def triton_rows(device: torch.device) -> bool:
    """Whether to time ``solver="triton"`` (the fused kernel): on CUDA, with triton installed
    (on the CPU it would run in Triton's interpreter -- far too slow to time)."""
    from ctxpred.wasserstein import _triton

    return device.type == "cuda" and _triton.available()


TRITON_ROW = "ctxpred triton kernel (exact, solver='triton')"


def build_masked(device: torch.device | None = None) -> list[dict]:
    """The rows of a masked configuration: ``fn(x, y, mask)``."""
    nocheck = {"check_finite": False}
    rows = [
        ("ctxpred exact (masked: device min-cost flow; D=1: sorted coupling)",
         lambda x, y, w: exact_wasserstein(x, y, None, w, **nocheck), "batched",
         "exact; unequal supports on the device", "masked"),
        ("ctxpred exact, same points without the mask", lambda x, y, w: exact_wasserstein(
            x, y, **nocheck), "batched", "equal supports: batched assignment", "unmasked"),
        ("ctxpred sinkhorn (default)", lambda x, y, w: sinkhorn_wasserstein(
            x, y, None, w, **nocheck), "batched", "relative_blur=1e-3, 30 it, overrelaxation 1.6",
         "masked"),
        ("ctxpred sinkhorn (scaling 0.9, 200 it)", lambda x, y, w: sinkhorn_wasserstein(
            x, y, None, w, **SLOW_SCHEDULE, **nocheck), "batched",
         "the accurate masked schedule", "masked"),
        ("POT ot.emd2 loop", pot_emd2_loop_masked, "loop", "exact; subsample, extrapolated",
         "masked"),
        ("MSE, fixed order (floor)", mse_floor_masked, "batched",
         "over the valid neighbors; not a transport cost", "masked"),
    ]
    if device is not None and triton_rows(device):
        rows.insert(2, (TRITON_ROW, lambda x, y, w: exact_wasserstein(
            x, y, None, w, solver="triton", **nocheck), "batched",
            "exact; one program per problem", "masked"))
    return [dict(name=n, fn=f, kind=k, note=note, reference=ref) for n, f, k, note, ref in rows]


def build(quick: bool, device: torch.device | None = None) -> list[dict]:
    """(name, fn, kind, note) of every estimator, ctxpred first."""
    nocheck = {"check_finite": False}
    rows = [
        ("ctxpred exact (batched assignment)", lambda x, y: exact_wasserstein(
            x, y, solver="assignment", **nocheck), "batched", "exact"),
        ("ctxpred sinkhorn (default)", lambda x, y: sinkhorn_wasserstein(x, y, **nocheck),
         "batched", "relative_blur=1e-3, 30 it, overrelaxation 1.6"),
        ("ctxpred sinkhorn (geomloss's plan: blur=0.05*sqrt2)", lambda x, y: sinkhorn_wasserstein(
            x, y, blur=0.05 * math.sqrt(2.0), **nocheck), "batched",
         "same entropic problem as geomloss blur=0.05 on |x-y|^2/2; 30 it"),
        ("ctxpred sinkhorn debias", lambda x, y: sinkhorn_wasserstein(
            x, y, debias=True, **nocheck), "batched", "Sinkhorn divergence, 3 solves"),
        ("ctxpred sliced (64 directions)", lambda x, y: sliced_wasserstein(
            x, y, num_projections=64, **nocheck), "batched", "a different distance (SW)"),
        ("ctxpred gaussian full (Bures)", lambda x, y: gaussian_wasserstein(x, y, **nocheck),
         "batched", "moment-matched, a lower bound"),
        ("ctxpred gaussian diag", lambda x, y: gaussian_wasserstein(
            x, y, covariance="diag", **nocheck), "batched", "moment-matched"),
        ("scipy linear_sum_assignment loop + gather", scipy_loop, "batched",
         "host round-trip, exact"),
        ("POT ot.emd2 loop", pot_emd2_loop, "loop", "exact; subsample, extrapolated"),
        ("POT ot.batch log_sinkhorn (50 it)", pot_batch_sinkhorn, "batched",
         "eps=0.01*mean cost, envelope grad"),
    ]
    try:
        rows += [
            ("geomloss sinkhorn tensorized debias", make_geomloss(True), "batched",
             "blur=0.05, scaling=0.5"),
            ("geomloss sinkhorn tensorized", make_geomloss(False), "batched",
             "blur=0.05, scaling=0.5"),
        ]
    except ImportError:
        pass
    rows.append(("MSE, fixed order (floor)", mse_floor, "batched", "not a transport cost"))
    if device is not None and triton_rows(device):
        rows.insert(1, (TRITON_ROW, lambda x, y: exact_wasserstein(
            x, y, solver="triton", **nocheck), "batched", "exact; one program per problem"))
    return [dict(name=n, fn=lambda x, y, w, f=f: f(x, y), kind=k, note=note,
                 reference="unmasked") for n, f, k, note in rows]


# ----------------------------------------------------------------------------- measurement


class _Malloc:
    """glibc mallopt, so that freed tensors leave RSS while probing peak memory."""

    def __init__(self) -> None:
        self.libc = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError):
                self.libc = ctypes.CDLL("libc.so.6")

    def set(self, threshold: int) -> None:
        if self.libc is not None:
            self.libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
            self.libc.mallopt(-1, threshold)  # M_TRIM_THRESHOLD
            self.libc.malloc_trim(0)


MALLOC = _Malloc()


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory increase of one call: CUDA max-allocated delta, else peak-RSS delta."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        MALLOC.set(64 * 1024)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current RSS
        base = _status_kb("VmRSS")
        fn()
        peak = _status_kb("VmHWM")
        return None if base is None or peak is None else max(0.0, (peak - base) / 1024)
    except OSError:
        return None
    finally:
        MALLOC.set(32 * 2**20)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(fn: Callable, x: torch.Tensor, y: torch.Tensor,
                     mask: torch.Tensor | None = None):
    pred = x.detach().requires_grad_(True)
    values = fn(pred, y, mask)
    values.mean().backward()
    return values.detach(), pred.grad


def time_call(fn: Callable, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None,
              device: torch.device) -> tuple[float, float]:
    """Wall time and process CPU time (all threads) of one forward + backward."""
    sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    forward_backward(fn, x, y, mask)
    sync(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def run_config(n: int, k: int, d: int, masked: bool, args: argparse.Namespace,
               device: torch.device) -> dict:
    """Warm up and measure every estimator, then time them round-robin (``--repeats`` rounds),
    so that load drifting on a shared machine hits all of them alike."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, k, d, generator=g).to(device)
    y = torch.randn(n, k, d, generator=g).to(device)
    mask = masked_workload(n, k, g).to(device) if masked else None
    references = {"unmasked": exact_reference(x, y)}
    if masked:
        references["masked"] = masked_reference(x, y, mask)
    live, rows = [], {}
    for est in (build_masked(device) if masked else build(args.quick, device)):
        if args.skip and any(s.lower() in est["name"].lower() for s in args.skip):
            continue
        sub = n if est["kind"] == "batched" else min(n, args.loop_n)
        w = None if mask is None else mask[:sub]
        try:
            values, grad = forward_backward(est["fn"], x[:sub], y[:sub], w)  # warm-up, accuracy
            memory = peak_memory_mib(
                lambda e=est, a=x[:sub], b=y[:sub], c=w: forward_backward(e["fn"], a, b, c),
                device,
            )
        except Exception as err:  # a peer failing must not stop the run
            rows[est["name"]] = dict(name=est["name"], error=f"{type(err).__name__}: {err}"[:200])
            print(f"  {est['name']:55s} FAILED: {err}", flush=True)
            continue
        exact_values, exact_grad = references[est["reference"]]
        rel = (values.double().cpu() - exact_values[:sub].cpu()) / exact_values[:sub].cpu()
        cos = torch.nn.functional.cosine_similarity(
            grad.double().cpu().flatten(1), exact_grad[:sub].double().flatten(1), dim=1
        )
        rows[est["name"]] = dict(
            name=est["name"], note=est["note"], measured_on=sub, extrapolated=sub < n,
            peak_mem_mib=memory, rel_err_mean=float(rel.mean()),
            rel_err_abs_mean=float(rel.abs().mean()), rel_err_abs_max=float(rel.abs().max()),
            rel_err_abs_p99=float(rel.abs().quantile(0.99)), grad_cos_mean=float(cos.mean()),
            grad_cos_min=float(cos.min()), reference=est["reference"],
        )
        live.append((est, sub))
    walls: dict[str, list[float]] = {est["name"]: [] for est, _ in live}
    cpus: dict[str, list[float]] = {est["name"]: [] for est, _ in live}
    for _ in range(args.repeats):
        for est, sub in live:
            w = None if mask is None else mask[:sub]
            wall, cpu = time_call(est["fn"], x[:sub], y[:sub], w, device)
            walls[est["name"]].append(wall * n / sub)
            cpus[est["name"]].append(cpu * n / sub)
    for est, _ in live:
        row = rows[est["name"]]
        row["seconds"] = statistics.median(walls[est["name"]])
        row["cpu_seconds"] = statistics.median(cpus[est["name"]])
        print(f"  {est['name']:55s} {fmt_time(row['seconds']):>9s} "
              f"(cpu {fmt_time(row['cpu_seconds']):>9s})  mem {fmt_mem(row['peak_mem_mib']):>8s}  "
              f"rel {row['rel_err_mean']:+.2e} (|{row['rel_err_abs_mean']:.1e}|, max "
              f"{row['rel_err_abs_max']:.1e})  cos {row['grad_cos_mean']:.3f}", flush=True)
    ordered = list(rows.values())
    return dict(n=n, k=k, d=d, masked=masked, rows=ordered,
                targets=masked_targets(ordered) if masked else targets(ordered))


def _find(rows: list[dict], prefix: str) -> dict | None:
    return next((r for r in rows if r["name"].startswith(prefix) and "seconds" in r), None)


def masked_targets(rows: list[dict]) -> dict:
    """The issue's targets on the masked workload, as ratios measured in this run."""
    exact = _find(rows, "ctxpred exact (masked")
    unmasked = _find(rows, "ctxpred exact, same points")
    sink, slow = _find(rows, "ctxpred sinkhorn (default)"), _find(rows, "ctxpred sinkhorn (scaling")
    pot, mse = _find(rows, "POT ot.emd2"), _find(rows, "MSE")
    triton = _find(rows, TRITON_ROW)

    def ratio(a: dict | None, b: dict | None, key: str = "seconds") -> float | None:
        if a is None or b is None or not a.get(key) or not b.get(key):
            return None
        return a[key] / b[key]

    return {
        "masked_exact_time_over_sinkhorn_default": ratio(exact, sink),
        "masked_exact_time_over_unmasked_exact": ratio(exact, unmasked),
        "masked_exact_time_over_mse": ratio(exact, mse),
        "masked_exact_cpu_time_over_sinkhorn_default": ratio(exact, sink, "cpu_seconds"),
        "pot_loop_time_over_masked_exact": ratio(pot, exact),
        "masked_exact_rel_err_abs_max": None if exact is None else exact["rel_err_abs_max"],
        "sinkhorn_default_rel_err_abs_max": None if sink is None else sink["rel_err_abs_max"],
        "sinkhorn_slow_rel_err_abs_max": None if slow is None else slow["rel_err_abs_max"],
        "sinkhorn_slow_time_over_default": ratio(slow, sink),
        "triton_exact_seconds": None if triton is None else triton["seconds"],
        "triton_exact_time_over_masked_exact": ratio(triton, exact),
        "triton_exact_rel_err_abs_max": None if triton is None else triton["rel_err_abs_max"],
    }


def targets(rows: list[dict]) -> dict:
    """The issue's targets as ratios measured in this run (None where a row is missing)."""
    exact, scipy_ = _find(rows, "ctxpred exact"), _find(rows, "scipy")
    triton = _find(rows, TRITON_ROW)
    pot, mse = _find(rows, "POT ot.emd2"), _find(rows, "MSE")
    sink, pot_batch = _find(rows, "ctxpred sinkhorn (default)"), _find(rows, "POT ot.batch")
    geo = _find(rows, "geomloss sinkhorn tensorized debias")
    geo_plain = _find(rows, "geomloss sinkhorn tensorized")
    if geo_plain is geo:
        geo_plain = next((r for r in rows if r["name"] == "geomloss sinkhorn tensorized"), None)

    def ratio(a: dict | None, b: dict | None, key: str = "seconds") -> float | None:
        if a is None or b is None or not a.get(key) or not b.get(key):
            return None
        return a[key] / b[key]

    return {
        "exact_time_over_scipy_loop": ratio(exact, scipy_),
        "exact_cpu_time_over_scipy_loop": ratio(exact, scipy_, "cpu_seconds"),
        "pot_loop_cpu_time_over_exact": ratio(pot, exact, "cpu_seconds"),
        "sinkhorn_cpu_time_over_geomloss_debias": ratio(sink, geo, "cpu_seconds"),
        "sinkhorn_cpu_time_over_geomloss": ratio(sink, geo_plain, "cpu_seconds"),
        "sinkhorn_cpu_time_over_pot_batch": ratio(sink, pot_batch, "cpu_seconds"),
        "pot_loop_time_over_exact": ratio(pot, exact),
        "exact_mem_over_mse_mem": ratio(exact, mse, "peak_mem_mib"),
        "exact_time_over_mse": ratio(exact, mse),
        "sinkhorn_time_over_geomloss_debias": ratio(sink, geo),
        "sinkhorn_time_over_geomloss": ratio(sink, geo_plain),
        "sinkhorn_time_over_pot_batch": ratio(sink, pot_batch),
        "sinkhorn_rel_err_mean": None if sink is None else sink["rel_err_mean"],
        "exact_rel_err_abs_mean": None if exact is None else exact["rel_err_abs_mean"],
        "triton_exact_seconds": None if triton is None else triton["seconds"],
        "triton_exact_time_over_exact": ratio(triton, exact),
        "triton_exact_time_over_scipy_loop": ratio(triton, scipy_),
    }


# ----------------------------------------------------------------------------- reporting


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def fmt_mem(m: float | None) -> str:
    return "-" if m is None else f"{m:.0f} MiB"


def environment(device: torch.device, args: argparse.Namespace) -> dict:
    versions = {"torch": torch.__version__, "numpy": np.__version__, "ctxpred": ctxpred.__version__}
    for module in ("scipy", "ot", "geomloss"):
        with contextlib.suppress(ImportError):
            versions[module] = __import__(module).__version__
    info = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        device=str(device), python=platform.python_version(), versions=versions,
        torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
        repeats=args.repeats, loop_n=args.loop_n,
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        info["load_average"] = os.getloadavg()
    return info


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [
        f"# Wasserstein estimators: ctxpred vs POT, geomloss, scipy ({env['device']})",
        "",
        f"Generated by `python benchmarks/estimators.py {doc['command']}` on {env['date']}: "
        f"torch {env['versions']['torch']}, {env['torch_threads']} torch threads, "
        f"{env['cpu_count']} cores"
        + (f", GPU {env['gpu']}" if "gpu" in env else "")
        + (f", load average {env['load_average'][0]:.1f} at the end" if "load_average" in env
           else "")
        + ". Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".",
        "",
        "**The machine was shared with other jobs while this ran: absolute times are noisy; "
        "compare the ratios of rows measured in the same run.**" if env["device"] == "cpu"
        else "",
        "",
        "Time = forward + backward of `values.mean()` w.r.t. the predicted points for *all* N "
        "problems (median of the repeats, taken round-robin over the estimators; `*` = timed on "
        "a subsample and extrapolated); CPU "
        "time = the process's CPU time over the same call (all threads; on a shared machine "
        "the steadier measure of work, since it leaves out time spent descheduled). "
        "Memory = peak increase during one call (CPU: peak RSS; CUDA: max allocated). "
        "rel err = mean signed relative error of the value vs the exact W_2^2 (|mean| in "
        "brackets); grad cos = mean cosine between the estimator's gradient and the exact one. "
        "Data: predicted and true sets i.i.d. N(0, I).",
    ]
    if env["device"] == "cpu":
        lines += ["", "GPU numbers are not in this file: produce them with "
                  "`python benchmarks/estimators.py --device cuda` (writes "
                  "`docs/results/estimators_cuda.md`)."]
    for cfg in doc["configs"]:
        masked = cfg.get("masked", False)
        title = f"## N={cfg['n']}, K={cfg['k']}, D={cfg['d']}" + (
            f", masked ({MASKED_FRACTION:.0%} of problems with {MASKED_MIN}-{MASKED_MAX} of "
            f"{cfg['k']} neighbors masked)" if masked else "")
        lines += ["", title, "", "| estimator | time / call | x MSE floor | peak mem "
                  "| rel err: mean (max abs) | grad cos |", "|---|---|---|---|---|---|"]
        floor = _find(cfg["rows"], "MSE")
        for r in cfg["rows"]:
            if "error" in r:
                lines.append(f"| {r['name']} | failed: {r['error']} | - | - | - | - |")
                continue
            star = "*" if r["extrapolated"] else ""
            has_floor = floor is not None and floor["seconds"] > 0
            xf = f"{r['seconds'] / floor['seconds']:.1f}x" if has_floor else "-"
            worst = r.get("rel_err_abs_max")
            lines.append(
                f"| {r['name']} | {fmt_time(r['seconds'])}{star} | {xf} | "
                f"{fmt_mem(r['peak_mem_mib'])} | {r['rel_err_mean']:+.1e} "
                f"({'-' if worst is None else f'{worst:.1e}'}) | {r['grad_cos_mean']:.3f} |"
            )
        t = cfg["targets"]
        lines += ["", "Targets (ratios from this run):", ""]
        for key, value in t.items():
            shown = "-" if value is None else (f"{value:.3g}" if abs(value) >= 1e-2
                                               else f"{value:.2e}")
            lines.append(f"- `{key}`: {shown}")
    return "\n".join(lines) + "\n"


def parse_config(spec: str) -> tuple[int, int, int, bool]:
    """``"NxKxD"`` -> (N, K, D, False); a trailing ``m`` marks the masked workload."""
    masked = spec.endswith("m")
    n, k, d = (int(v) for v in spec.rstrip("m").split("x"))
    return n, k, d, masked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated NxKxD (default {DEFAULT_CONFIGS})")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-n", type=int, default=256,
                        help="problems timed for looped estimators (POT ot.emd2)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--skip", nargs="*", default=[], help="skip rows whose name contains")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="only re-render the markdown of a previous run's JSON (to --out)")
    parser.add_argument("--out", default=None,
                        help="output path without suffix (writes .json and .md); default "
                             "docs/results/estimators_<device type>")
    args = parser.parse_args(argv)
    if args.render:
        doc = json.loads(Path(args.render).read_text())
        target = Path(args.out).with_suffix(".md") if args.out else Path(args.render).with_suffix(
            ".md")
        target.write_text(markdown(doc))
        print(target.read_text())
        return 0
    if args.quick:
        args.configs = args.configs or QUICK_CONFIGS
        args.repeats = min(args.repeats, 1)
        args.loop_n = min(args.loop_n, 8)
    configs = [parse_config(c) for c in (args.configs or DEFAULT_CONFIGS).split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out) if args.out else ROOT / "docs" / "results" / f"estimators_{device.type}"
    doc = dict(command=" ".join(sys.argv[1:] if argv is None else argv),
               configs=[], environment={})
    for n, k, d, masked in configs:
        print(f"N={n} K={k} D={d}" + (" masked" if masked else ""), flush=True)
        doc["configs"].append(run_config(n, k, d, masked, args, device))
    doc["environment"] = environment(device, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    text = markdown(doc)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
