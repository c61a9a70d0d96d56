"""Does the feature context run away? Hooked-feature RMS and context loss on a diffusers UNet.

    python benchmarks/feature_context.py            # ~2-5 min on 2 shared CPU cores

A small ``diffusers.UNet2DModel`` (16x16, ``block_out_channels=(16, 32)``) is trained for 200
Adam steps at lr 3e-3 with the feature context on ``up_blocks.1`` (``FeatureNeighborhood``,
strides (1, 2), ``GaussianSamplingHead`` 16 -> 16, 16 query points), once with the context loss
alone (``weight=1``) and once beside the epsilon-prediction loss (``weight=0.1``), for each way
of making the target scale-free:

* ``raw``: ``normalize="none"``, no anchor (ctxpred 0.1's feature context);
* ``batch``: per-channel standardization with batch statistics, target and head input;
* ``instance``: per-sample, per-channel standardization over the grid, target and head input;
* ``instance+anchor``: ``instance`` plus ``scale_anchor`` (the default).

Reported per run: the largest and smallest hooked-feature RMS relative to the same run without
context (context alone: the untrained network), and the largest context loss relative to its
start. The test ``tests/test_feature_context.py`` asserts the default's bounds on the same setup.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.nn import functional as F

import ctxpred

__all__ = ["APPROACHES", "main", "train_unet"]

#: name -> (FeatureNeighborhood normalize, ContextPredictionLoss scale_anchor)
APPROACHES: dict[str, tuple[str, float]] = {
    "raw": ("none", 0.0),
    "batch": ("batch", 0.0),
    "instance": ("instance", 0.0),
    "instance+anchor": ("instance", ctxpred.ContextPredictionLoss.DEFAULT_SCALE_ANCHOR),
}


def _unet() -> torch.nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
    )


def train_unet(
    approach: str | None, denoise: bool, steps: int = 200, batch: int = 4, seed: int = 0
) -> dict[str, Any]:
    """Train the small UNet; ``approach=None`` trains without context (``denoise`` must then
    be ``True`` to train at all). Returns ``{"rms": (steps,), "ctx": (steps,) or None}``: the
    hooked ``up_blocks.1`` output's RMS and the (weighted) context loss at every step."""
    torch.manual_seed(seed)
    net = _unet()
    rms: list[torch.Tensor] = []
    hook = net.up_blocks[1].register_forward_hook(
        lambda _m, _a, out: rms.append(out.detach().pow(2).mean().sqrt()))
    params = list(net.parameters())
    predictor = None
    if approach is not None:
        normalize, anchor = APPROACHES[approach]
        loss = ctxpred.ContextPredictionLoss(
            ctxpred.FeatureNeighborhood(strides=(1, 2), normalize=normalize),
            ctxpred.GaussianSamplingHead(out_channels=16, in_channels=16, num_strides=2),
            weight=0.1 if denoise else 1.0, points=16, scale_anchor=anchor)
        predictor = ctxpred.attach(net, {"up_blocks.1": loss})
        params += list(predictor.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    data = F.avg_pool2d(torch.rand(64, 1, 16, 16, generator=gen) * 2 - 1, 3, 1, 1) * 2
    ctx_losses = []
    for _ in range(steps):
        x0 = data[torch.randint(0, 64, (batch,), generator=gen)]
        t = torch.randint(0, 1000, (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        abar = torch.cos(t.float() / 1000 * math.pi / 2).pow(2)[:, None, None, None]
        out = net(abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t).sample
        total = F.mse_loss(out, noise) if denoise else out.sum() * 0
        if predictor is not None:
            c = predictor.loss()
            ctx_losses.append(c.detach())
            total = total + c
        opt.zero_grad()
        if total.requires_grad:
            total.backward()
            opt.step()
    hook.remove()
    return {"rms": torch.stack(rms), "ctx": torch.stack(ctx_losses) if ctx_losses else None}


def summarize(run: dict[str, Any], reference: torch.Tensor) -> dict[str, float]:
    """RMS ratios to ``reference`` ``(steps,)`` and the context loss's growth."""
    ratio = run["rms"] / reference
    ctx = run["ctx"]
    return {"rms_ratio_max": float(ratio.max()), "rms_ratio_min": float(ratio.min()),
            "ctx_max_over_start": float(ctx.max() / ctx[:5].max()),
            "ctx_end": float(ctx[-5:].mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/feature_context.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--approaches", nargs="+", default=list(APPROACHES), choices=list(APPROACHES))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    reference = train_unet(None, denoise=True)["rms"]
    print("| approach | run | max RMS / no-context RMS | min RMS / no-context RMS "
          "| max context loss / start | context loss at the end |")
    print("|---|---|---|---|---|---|")
    for name in args.approaches:
        for denoise in (False, True):
            run = train_unet(name, denoise)
            ref = reference if denoise else run["rms"][:1].expand_as(run["rms"])
            s = summarize(run, ref)
            print(f"| {name} | {'beside denoising' if denoise else 'context alone'} "
                  f"| {s['rms_ratio_max']:.3g} | {s['rms_ratio_min']:.3g} "
                  f"| {s['ctx_max_over_start']:.3g} | {s['ctx_end']:.3g} |", flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
