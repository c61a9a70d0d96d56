#!/usr/bin/env python3
"""Count the operations each estimator dispatches on an accelerator (about its kernel launches).

Batched solvers of many tiny problems (the loss's 8-vs-8 transport problems) are bound on a GPU
by kernel launches, a few microseconds each, not by arithmetic. This script counts them without
a GPU: it runs each estimator (forward and backward of ``values.sum()``) on PyTorch's ``meta``
device, which takes the accelerator code path (fixed schedules, no host reads, no CPU chunking)
without computing anything, and counts the dispatched aten operations that are not views. In
eager mode on CUDA each such operation is about one kernel launch; ``torch.compile`` fuses
elementwise chains, so it launches fewer.

``exact`` with ``solver="triton"`` runs its whole solve in one fused Triton kernel; on the meta
device a stand-in counts that kernel as one operation (:func:`triton_stand_in`).

For the masked exact estimator (the min-cost flow on unequal supports) the count at the fixed
schedule's bound (:func:`ctxpred.wasserstein.exact.flow_augmentation_bound` rounds, what runs
under ``torch.compile`` and on non-CUDA accelerators) is split into the start and the cost of one
round, and the rounds the benchmark's masked workload actually needs are measured on the CPU
(16384 problems, ``benchmarks/estimators.py``'s mask): CUDA in eager mode stops a few rounds after
that (polled, without a host sync), so it launches about ``start + (needed + lag) x per round``.

Counts do not depend on the number of problems (nothing loops over problems), only on K and on
the code path. Prints a markdown table and writes ``OUT.json`` and ``OUT.md``. Example::

    python benchmarks/launches.py                # docs/results/launches.{json,md}
    python benchmarks/launches.py --out /tmp/l   # elsewhere
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ctxpred  # noqa: E402
from ctxpred.wasserstein import exact as exact_module  # noqa: E402
from ctxpred.wasserstein.exact import exact_wasserstein  # noqa: E402
from ctxpred.wasserstein.sinkhorn import sinkhorn_wasserstein  # noqa: E402

Estimator = Callable[..., torch.Tensor]

#: ``(name, fn, options)``: the rows of the table
ESTIMATORS: list[tuple[str, Estimator, dict[str, Any]]] = [
    ("exact", exact_wasserstein, {}),
    ("exact (solver='triton')", exact_wasserstein, {"solver": "triton"}),
    ("sinkhorn (default)", sinkhorn_wasserstein, {}),
    ("sinkhorn (scaling 0.9, 200 it)", sinkhorn_wasserstein, {"scaling": 0.9, "iterations": 200}),
]
#: ``(K, D, masked)``: the shapes counted
SHAPES: list[tuple[int, int, bool]] = [(8, 3, False), (8, 3, True), (8, 1, True), (8, 64, True),
                                       (24, 3, False)]


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched inside it, views excluded.

    Example:
        >>> with OpCounter() as ops:
        ...     _ = torch.ones(3, device="meta").add(1).view(3, 1)
        >>> ops.count
        2
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def triton_stand_in() -> Iterator[None]:
    """Count ``solver="triton"`` on the meta device: the fused kernel cannot run there, so a
    stand-in takes its place that dispatches what the wrapper does on CUDA for float32 costs and
    bool masks -- the per-problem rescaling of the costs, the two masks cast to int8, the
    kernel, counted as one operation (it writes the plan), and the plan's normalization. Needs
    no triton."""
    from ctxpred.wasserstein import _triton
    from ctxpred.wasserstein._validate import rescale_costs

    def stand_in(cost: torch.Tensor, row_valid: torch.Tensor, col_valid: torch.Tensor
                 ) -> torch.Tensor:
        cost = rescale_costs(cost, row_valid, col_valid, host_checks=False)
        row_valid.to(torch.int8), col_valid.to(torch.int8)
        plan = torch.zeros_like(cost)  # the kernel
        return plan / plan.sum((1, 2), keepdim=True).clamp_min(1)

    with mock.patch.object(_triton, "triton_transport_plan", stand_in):
        yield


def count_ops(fn: Estimator, k: int, d: int, masked: bool, problems: int = 64,
              **options: Any) -> int:
    """Non-view aten operations of ``fn(x, y, None, mask).sum().backward()`` on the meta device
    for ``problems`` problems of ``k`` points in ``R^d`` (``mask``: a ``(problems, k)`` weight
    tensor, which sends exact to its unequal-support solver; the values are never read).

    Example:
        >>> unmasked = count_ops(exact_wasserstein, 8, 3, False)
        >>> unmasked == count_ops(exact_wasserstein, 8, 3, False, problems=4)
        True
    """
    x = torch.empty(problems, k, d, device="meta", requires_grad=True)
    y = torch.empty(problems, k, d, device="meta")
    weights = torch.empty(problems, k, device="meta") if masked else None
    stand_in = triton_stand_in() if options.get("solver") == "triton" else contextlib.nullcontext()
    with stand_in, OpCounter() as ops:
        fn(x, y, None, weights, check_finite=False, **options).sum().backward()
    return ops.count


@contextlib.contextmanager
def flow_rounds(rounds: int) -> Iterator[None]:
    """Run the min-cost flow's fixed schedule for ``rounds`` rounds instead of its bound."""
    with mock.patch.object(exact_module, "flow_augmentation_bound", lambda n, m: rounds):
        yield


def rounds_needed(k: int, d: int, problems: int = 16384, seed: int = 0) -> int:
    """Rounds of successive shortest paths the CPU solver (which stops when every problem is
    done) runs on ``benchmarks/estimators.py``'s masked workload: the most any problem needs,
    from the accelerators' start (one greedy pass over the tight graph's leaves; a CPU runs
    ``_LEAF_PASSES``)."""
    from benchmarks.estimators import masked_workload

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(problems, k, d, generator=gen)
    y = torch.randn(problems, k, d, generator=gen)
    mask = masked_workload(problems, k, gen)
    calls = 0
    original = exact_module._augment

    def counting(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        original(*args, **kwargs)

    with mock.patch.object(exact_module, "_augment", counting), \
            mock.patch.object(exact_module, "_LEAF_PASSES", 1):
        exact_wasserstein(x, y, None, mask, check_finite=False)
    return calls


def measure(shapes: list[tuple[int, int, bool]] | None = None, problems: int = 16384
            ) -> dict[str, Any]:
    """Every row of the table (see the module doc); ``problems``: the masked workload's size
    for :func:`rounds_needed`."""
    rows = []
    for k, d, masked in shapes or SHAPES:
        for name, fn, options in ESTIMATORS:
            row: dict[str, Any] = {"estimator": name, "K": k, "D": d, "masked": masked,
                                   "ops": count_ops(fn, k, d, masked, **options)}
            flow = fn is exact_wasserstein and masked and d > 1 and not options
            if flow:
                with flow_rounds(0):
                    start = count_ops(fn, k, d, masked)
                with flow_rounds(1):
                    per_round = count_ops(fn, k, d, masked) - start
                needed = rounds_needed(k, d, problems)
                row.update(bound=exact_module.flow_augmentation_bound(k, k), start=start,
                           per_round=per_round, rounds_needed=needed,
                           ops_at_needed=start + needed * per_round)
            rows.append(row)
    return {"torch": torch.__version__, "ctxpred": ctxpred.__version__, "rows": rows}


def markdown(doc: dict[str, Any]) -> str:
    """The table of :func:`measure`'s rows."""
    lines = [
        "# Operations per estimator call on an accelerator", "",
        "Generated by `python benchmarks/launches.py` (torch " + doc["torch"] + ", ctxpred "
        + doc["ctxpred"] + "). Do not edit by hand.", "",
        "Non-view aten operations of one forward + backward, counted on the meta device (the "
        "accelerator code path); about one CUDA kernel launch each in eager mode. They do not "
        "depend on the number of problems. Masked: the points carry weights (the loss's border "
        "problems); exact then runs its min-cost flow (D > 1) or the 1-D sorted coupling "
        "(D = 1). For the flow: the fixed schedule's count at its bound, its start, one round, "
        "and the rounds 16384 problems of `benchmarks/estimators.py`'s masked workload need "
        "(measured on the CPU; CUDA eager stops a few rounds after that). `solver='triton'`: "
        "the whole solve is one fused kernel, counted as one operation (the rest is the cost "
        "matrix, the value and its gradient).", "",
        "| K | D | masked | estimator | ops (fixed schedule) | flow: bound | start | per round "
        "| rounds needed | ops at rounds needed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        extra = ([str(r["bound"]), str(r["start"]), str(r["per_round"]), str(r["rounds_needed"]),
                  str(r["ops_at_needed"])] if "per_round" in r else ["-"] * 5)
        lines.append("| " + " | ".join([str(r["K"]), str(r["D"]), "yes" if r["masked"] else "no",
                                        r["estimator"], str(r["ops"]), *extra]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "launches",
                        help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    doc = measure()
    text = markdown(doc)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
