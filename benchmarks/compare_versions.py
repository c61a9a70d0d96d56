"""Paired timing of the context loss in two versions of ctxpred, in one process.

Two git refs (or the working tree) are extracted side by side as ``ctxpred_before`` and
``ctxpred_after`` and imported in one process; the same loss (same seeds, same inputs; the values
must be equal) runs forward + backward alternately in each version, so that the load of a shared
machine hits both alike. Reports the median step time of each and the median of the paired
``after / before`` ratios. Use it to check that a refactor costs no time.

Usage::

    python3 benchmarks/compare_versions.py --before main --after WORKTREE
    python3 benchmarks/compare_versions.py --before main~3 --after main --iterations 400
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_NAME = re.compile(r"\bctxpred(?=[._ \n]|$)")

#: name -> (features shape (B, C, H, W), query points, head)
CONFIGS = {
    "gaussian (2,16,8,8) P=16": ((2, 16, 8, 8), 16, "gaussian"),
    "gaussian (16,64,16,16) P=64": ((16, 64, 16, 16), 64, "gaussian"),
    "naive (2,16,8,8) P=16": ((2, 16, 8, 8), 16, "naive"),
}


def extract(ref: str, alias: str, into: Path) -> None:
    """``ctxpred/`` of ``ref`` (``WORKTREE``: the files on disk) as package ``alias``."""
    target = into / alias
    if ref == "WORKTREE":
        shutil.copytree(ROOT / "ctxpred", target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        data = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "ctxpred"],
                              check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(into / "_tmp", filter="data")
        (into / "_tmp" / "ctxpred").rename(target)
    for path in target.rglob("*.py"):
        path.write_text(_NAME.sub(alias, path.read_text()))


def build(module, shape, points, kind):
    torch.manual_seed(0)
    if kind == "gaussian":
        head = module.GaussianSamplingHead(3, shape[1], num_strides=3)
    else:
        head = module.NaiveHead(3, in_channels=shape[1], num_strides=3)
    return module.ContextPredictionLoss(module.PixelNeighborhood(strides=(1, 2, 3)), head,
                                        points=points)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="main")
    parser.add_argument("--after", default="WORKTREE")
    parser.add_argument("--iterations", type=int, default=300,
                        help="paired steps of the small configs")
    parser.add_argument("--large-iterations", type=int, default=30,
                        help="paired steps of the large config")
    parser.add_argument("--only", default=None, help="run the configs whose name contains this")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        extract(args.before, "ctxpred_before", Path(tmp))
        extract(args.after, "ctxpred_after", Path(tmp))
        sys.path.insert(0, tmp)
        before = importlib.import_module("ctxpred_before")
        after = importlib.import_module("ctxpred_after")
        print(f"before={args.before} after={args.after} threads={args.threads}")
        for name, (shape, points, kind) in CONFIGS.items():
            if args.only and args.only not in name:
                continue
            la, lb = build(before, shape, points, kind), build(after, shape, points, kind)
            features = torch.randn(*shape, requires_grad=True)
            target = torch.randn(shape[0], 3, shape[2], shape[3])
            torch.manual_seed(1)
            va = la(features, target)
            torch.manual_seed(1)
            vb = lb(features, target)
            if not torch.equal(va, vb):
                print(f"{name}: the versions disagree ({va.item()} vs {vb.item()})")
            ta: list[float] = []
            tb: list[float] = []
            steps = args.iterations if shape[0] <= 4 else args.large_iterations
            for i in range(steps + 5):
                order = ((la, ta), (lb, tb)) if i % 2 else ((lb, tb), (la, ta))
                for loss, acc in order:
                    t0 = time.perf_counter()
                    loss(features, target).backward()
                    if i >= 5:
                        acc.append(time.perf_counter() - t0)
            ratio = statistics.median(b / a for a, b in zip(ta, tb))
            print(f"{name}: before {statistics.median(ta) * 1e3:.3f} ms, after "
                  f"{statistics.median(tb) * 1e3:.3f} ms, median paired ratio {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
