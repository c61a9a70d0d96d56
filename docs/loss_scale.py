"""How big the context loss is next to the denoising loss, read from the demo's training logs.

    python3 run.py demo --out docs/assets/demo     # first: trains both runs (checkpoints kept)
    python docs/loss_scale.py                      # writes docs/assets/demo/loss_scale.md

The demo's checkpoints (``docs/assets/demo/checkpoints/*.pt``) hold the per-step history of both
runs. This script averages the last ``--tail`` steps and writes a small Markdown table that the
Tuning page includes: the point-wise (denoising) loss of both runs, the context loss as the
optimizer sees it (multiplied by lambda) and without lambda, and their ratio.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

DEMO = Path(__file__).resolve().parent / "assets" / "demo"


def _mean(history: list[dict[str, float]], key: str, tail: int) -> float:
    rows = history[-tail:]
    return sum(float(r[key]) for r in rows) / len(rows)


def table(demo: Path, tail: int = 50) -> str:
    """The Markdown table of the loss scales of the demo's two runs."""
    runs = {}
    for name in ("baseline", "context"):
        found = list((demo / "checkpoints").glob(f"{name}-*.pt"))
        if not found:
            raise SystemExit(f"no {name} checkpoint in {demo / 'checkpoints'}: run "
                             f"`python3 run.py demo --out {demo}` first")
        # the latest run: another configuration's checkpoint may sit beside it (names are hashes)
        latest = max(found, key=lambda path: path.stat().st_mtime)
        runs[name] = torch.load(latest, map_location="cpu", weights_only=False)
    ctx = runs["context"]
    weight = float(ctx["config"]["context"]["weight"])
    steps = ctx["step"]
    point_base = _mean(runs["baseline"]["history"], "point_loss", tail)
    point_ctx = _mean(ctx["history"], "point_loss", tail)
    weighted = _mean(ctx["history"], "context_loss", tail)
    layers = ctx["config"]["context"].get("layers") or "the last two decoder blocks"
    weighting = ctx["config"]["context"].get("timestep_weighting", "none")
    if weighting != "none":  # the logged loss carries the per-sample weights (mean 1 over t)
        layers += f", timestep weighting {weighting!r}"
    lines = [
        f"| mean of the last {tail} of {steps} steps | value |",
        "|---|---|",
        f"| denoising loss, baseline run | {point_base:.4f} |",
        f"| denoising loss, run with context prediction | {point_ctx:.4f} |",
        f"| context loss × λ (λ = {weight:g}, summed over {layers}) | {weighted:.4f} |",
        f"| context loss without λ | {weighted / weight:.4f} |",
        f"| weighted context loss / denoising loss | {weighted / point_ctx:.3f} |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, default=DEMO, help="the demo's --out folder")
    parser.add_argument("--tail", type=int, default=50, help="steps averaged at the end")
    args = parser.parse_args(argv)
    text = table(args.demo, args.tail)
    (args.demo / "loss_scale.md").write_text(text)
    print(text, end="")
    print(f"wrote {args.demo / 'loss_scale.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
