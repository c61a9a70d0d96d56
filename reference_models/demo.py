"""The demo: train the continuous reference model on bundled textures with and without context
prediction (same seed, same steps), sample from both, and report metrics.

    python -m reference_models.demo                  # CPU defaults (see --help)
    python -m reference_models.demo --steps 4000 --device cuda --batch-size 64 --base-channels 64
    python -m reference_models.demo --data my_images/ --image-size 32   # your own images

``--data`` takes a ``.npy`` array ``(N, H, W)`` / ``(N, H, W, C)`` (uint8 0-255, or float in
``[0, 1]`` or ``[-1, 1]``) or a folder of PNG/JPEG files; the images are center-cropped and
resized to ``--image-size``, 20% are held out for the metrics, and bad input is an error
(never a fallback to the bundled data). The context run prints the gradient-norm ratio
context/denoising at the hooked layers, the number to pick ``--context-weight`` from (it is
linear in lambda), and ``loss_curves.png`` plots it.

Writes to ``--out`` (default ``results/``, gitignored):

* ``samples.png`` — generated samples of both runs beside held-out real crops;
* ``inpainting.png`` — RePaint completions of a centre hole by both runs;
* ``loss_curves.png`` — point-wise loss of both runs and the context loss;
* ``metrics.md`` / ``metrics.json`` — the metrics table (also printed at the end);
* ``checkpoints/`` — resumable checkpoints (re-running the same command resumes or reuses them).

With the defaults it took 497 s in total (162 s + 277 s of training) on a 2-core CPU shared with
other jobs, with one torch thread.

Metrics (``reference_models.metrics``, lower is better): Laplacian-pyramid patch SWD of samples vs
held-out crops, the (pixel, neighbor) joint-distribution discrepancy at strides 1..3, and masked
MSE / SWD of centre-hole inpainting. The "real vs real" row compares training crops with the
held-out crops: the floor a perfect model would reach at this sample size.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reference_models.continuous import ContextConfig, TrainConfig, Trainer, center_mask
from reference_models.data import load_dataset, load_image_data
from reference_models.metrics import inpainting_metrics, neighborhood_discrepancy, swd_laplacian

__all__ = ["evaluate", "main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the demo (``--help`` lists them with their defaults)."""
    p = argparse.ArgumentParser(
        prog="python -m reference_models.demo",
        description="Train the reference diffusion model with and without context prediction.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="textures", help="bundled dataset name")
    p.add_argument("--data", type=Path, default=None,
                   help="your own images instead of --dataset: a .npy (N, H, W[, C]) array "
                   "(uint8 0-255 or float in [0, 1] / [-1, 1]) or a folder of PNG/JPEG files, "
                   "center-cropped and resized to --image-size; 20%% held out for the metrics")
    p.add_argument("--steps", type=int, default=800, help="training steps of each run")
    p.add_argument("--batch-size", type=int, default=16, help="images per training step")
    p.add_argument("--image-size", type=int, default=32,
                   help="side of the square crops (divisible by 4, at most 128 for textures)")
    p.add_argument("--base-channels", type=int, default=16, help="UNet width")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    recipe = ContextConfig()  # the confirmed configuration (see ContextConfig)
    p.add_argument("--context-weight", type=float, default=recipe.weight, help="lambda")
    p.add_argument("--context-points", type=int, default=recipe.points,
                   help="query points per image and step for the context loss")
    p.add_argument("--timestep-weighting", choices=["none", "snr", "cutoff"],
                   default=recipe.timestep_weighting,
                   help="per-sample weight of the context loss by timestep (snr: "
                   "SNR / (1 + SNR), normalized to mean 1; cutoff: only the low-noise "
                   "t < t_cutoff * T)")
    p.add_argument("--t-cutoff", type=float, default=recipe.t_cutoff,
                   help="--timestep-weighting cutoff: fraction of the timesteps kept")
    p.add_argument("--strides", type=int, nargs="+", default=[1, 2, 3],
                   help="neighborhood strides of the context loss")
    p.add_argument("--estimator", default="sinkhorn", help="Wasserstein estimator name")
    p.add_argument("--diagnostic-every", type=int, default=50,
                   help="measure the context/denoising gradient-norm ratio every N steps")
    p.add_argument("--samples", type=int, default=64, help="generated samples per run")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm",
                   help="ancestral DDPM (respaced) or deterministic DDIM")
    p.add_argument("--sample-steps", type=int, default=50, help="sampling steps")
    p.add_argument("--inpaint-images", type=int, default=16,
                   help="held-out images inpainted (centre hole)")
    p.add_argument("--inpaint-steps", type=int, default=25, help="RePaint steps")
    p.add_argument("--resample", type=int, default=4, help="RePaint resampling per step")
    p.add_argument("--seed", type=int, default=0, help="seed of both runs and the sampler")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (1 is fastest on a shared machine)")
    p.add_argument("--out", type=Path, default=Path("results"), help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    return p.parse_args(argv)


def _configs(args: argparse.Namespace) -> dict[str, TrainConfig]:
    base = TrainConfig(
        dataset=args.dataset if args.data is None else f"data:{args.data.name}",
        flip=None if args.data is None else False,
        image_size=args.image_size, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, base_channels=args.base_channels,
        seed=args.seed, device=args.device, log_every=25,
        checkpoint_every=max(50, args.steps // 8), diagnostic_every=args.diagnostic_every,
    )
    context = ContextConfig(strides=tuple(args.strides), estimator=args.estimator,
                            weight=args.context_weight, points=args.context_points,
                            timestep_weighting=args.timestep_weighting, t_cutoff=args.t_cutoff)
    return {"baseline": base, "context": dataclasses.replace(base, context=context)}


def _checkpoint_path(out: Path, name: str, config: TrainConfig,
                     data: dict[str, Any] | None = None) -> Path:
    fields = {k: v for k, v in dataclasses.asdict(config).items()
              if k not in ("steps", "device", "log_every", "checkpoint_every",
                           "diagnostic_every")}
    if data is not None:  # another file or folder under the same name gets its own checkpoint
        fields["data"] = data
    tag = hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return out / "checkpoints" / f"{name}-{tag}.pt"


def evaluate(
    samples: Tensor, real: Tensor, inpainted: Tensor | None = None,
    inpaint_truth: Tensor | None = None, known_mask: Tensor | None = None,
) -> dict[str, Any]:
    """The demo's metrics of one run: SWD (per level + mean), neighbor discrepancy per stride,
    and, when given, centre-hole inpainting masked MSE / SWD."""
    swd = swd_laplacian(samples, real)
    nb = neighborhood_discrepancy(samples, real, strides=(1, 2, 3))
    out: dict[str, Any] = {"swd": swd["mean"], "swd_levels": swd["levels"],
                           "neighbor": nb["mean"], "neighbor_strides": nb["strides"]}
    if inpainted is not None and inpaint_truth is not None and known_mask is not None:
        out.update(inpainting_metrics(inpainted, inpaint_truth, known_mask))
    return out


def _grid(images: Tensor, rows: int) -> Tensor:
    """``(N, C, H, W)`` in [-1, 1] -> one ``(rows*(H+1), cols*(W+1), C)`` image in [0, 1]."""
    n, ch, h, w = images.shape
    cols = -(-n // rows)
    canvas = torch.ones(rows * (h + 1) + 1, cols * (w + 1) + 1, ch)
    for k in range(n):
        r, c = divmod(k, cols)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = \
            (images[k].permute(1, 2, 0) + 1) / 2
    return canvas.squeeze(-1) if ch == 1 else canvas


def _save_panels(path: Path, panels: dict[str, Tensor], rows: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4))
    for ax, (title, images) in zip(axes, panels.items()):
        ax.imshow(_grid(images, rows).numpy(), cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _save_loss_curves(path: Path, histories: dict[str, list[dict[str, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values: list[float], k: int = 25) -> list[float]:
        out, acc = [], 0.0
        for i, v in enumerate(values):
            acc += v - (values[i - k] if i >= k else 0.0)
            out.append(acc / min(i + 1, k))
        return out

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4))
    for name, history in histories.items():
        steps = [h["step"] for h in history]
        ax1.plot(steps, smooth([h["point_loss"] for h in history]), label=name)
        if any(h["context_loss"] for h in history):
            ax2.plot(steps, smooth([h["context_loss"] for h in history]), label=name,
                     color="tab:orange")
        measured = [h for h in history if math.isfinite(h.get("grad_ratio", math.nan))]
        if measured:
            ax3.plot([h["step"] for h in measured], [h["grad_ratio"] for h in measured],
                     marker="o", label=name, color="tab:green")
    ax1.set(title="point-wise denoising loss (moving average 25)", xlabel="step", yscale="log")
    ax2.set(title="context loss (lambda-weighted, moving average 25)", xlabel="step")
    ax3.set(title="gradient-norm ratio context / denoising\nat the hooked layers",
            xlabel="step", yscale="log")
    for ax in (ax1, ax2, ax3):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(value: float) -> str:
    return f"{value:.4f}"


def metrics_table(rows: dict[str, dict[str, Any]]) -> str:
    """A markdown table of :func:`evaluate` results (plus timing columns when present)."""
    header = ("| run | steps | train s | final point loss | SWD mean | SWD per level "
              "| neighbor mean | neighbor s=1 / 2 / 3 | inpaint MSE | inpaint SWD |")
    lines = [header, "|" + "---|" * 10]
    for name, r in rows.items():
        levels = " / ".join(_fmt(v) for v in r["swd_levels"])
        strides = " / ".join(_fmt(r["neighbor_strides"][s]) for s in sorted(r["neighbor_strides"]))
        lines.append(
            f"| {name} | {r.get('steps', '-')} | {r.get('train_seconds', '-')} "
            f"| {r.get('final_point_loss', '-')} | {_fmt(r['swd'])} | {levels} "
            f"| {_fmt(r['neighbor'])} | {strides} "
            f"| {_fmt(r['masked_mse']) if 'masked_mse' in r else '-'} "
            f"| {_fmt(r['masked_swd']) if 'masked_swd' in r else '-'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(max(1, args.threads))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    configs = _configs(args)
    if args.image_size < 4 or args.image_size % 4:
        raise SystemExit(f"--image-size must be a multiple of 4 (the UNet halves the grid "
                         f"twice), got {args.image_size}")
    source = args.dataset if args.data is None else str(args.data)
    print(f"ctxpred demo: {source} {args.image_size}x{args.image_size}, {args.steps} steps "
          f"x batch {args.batch_size} per run, device {args.device}, output in {out}/")

    train_images, data_info = None, None
    if args.data is not None:
        data = load_image_data(args.data, args.image_size)
        data_info = data.describe()
        print(f"--data {args.data}: {data_info}")
        train_images, real = data.train, data.test
        train_ref = data.train[: args.samples]
    else:
        real = load_dataset(args.dataset, "test", image_size=args.image_size,
                            num_samples=max(256, args.samples), seed=args.seed)
        train_ref = load_dataset(args.dataset, "train", image_size=args.image_size,
                                 num_samples=args.samples, seed=args.seed + 99)
    inpaint_truth = real[: args.inpaint_images]
    known_mask = center_mask(len(inpaint_truth), args.image_size)

    rows: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[dict[str, float]]] = {}
    samples: dict[str, Tensor] = {}
    inpaintings: dict[str, Tensor] = {}
    for name, config in configs.items():
        trainer = Trainer(config, checkpoint=_checkpoint_path(out, name, config, data_info),
                          train_images=train_images)
        if trainer.step:
            print(f"[{name}] resuming from step {trainer.step}")
        history = trainer.train(progress=not args.no_progress)
        histories[name] = history
        print(f"[{name}] sampling {args.samples} images ({args.sample_steps} {args.sampler} steps)")
        samples[name] = trainer.sample(args.samples, args.sampler, num_steps=args.sample_steps,
                                       seed=args.seed)
        gen = torch.Generator().manual_seed(args.seed)
        inpaintings[name] = trainer.diffusion.inpaint(
            trainer.ema.model.eval(), inpaint_truth.to(trainer.device),
            known_mask.to(trainer.device), num_steps=args.inpaint_steps,
            resample=args.resample, generator=gen,
        ).cpu()
        tail = history[-50:]
        rows[name] = {
            "steps": trainer.step,
            "train_seconds": round(history[-1]["time"], 1),
            "final_point_loss": round(sum(h["point_loss"] for h in tail) / len(tail), 4),
            **evaluate(samples[name], real, inpaintings[name], inpaint_truth, known_mask),
        }
        ratios = [h["grad_ratio"] for h in history if math.isfinite(h["grad_ratio"])]
        if ratios:
            rows[name]["grad_ratio"] = round(ratios[-1], 4)
            print(f"[{name}] gradient-norm ratio context/denoising at the hooked layers: "
                  f"{ratios[-1]:.3g} (last measurement; {len(ratios)} measured, median "
                  f"{sorted(ratios)[len(ratios) // 2]:.3g}). It scales linearly with lambda: "
                  f"to aim at a ratio r, use --context-weight "
                  f"{args.context_weight:g} * r / {ratios[-1]:.3g}")
        if trainer.predictor is not None:
            trainer.predictor.remove()
    rows["real vs real (floor)"] = evaluate(train_ref, real)

    shown = min(32, args.samples, len(real))
    _save_panels(out / "samples.png", {
        "baseline": samples["baseline"][:shown],
        "with context prediction": samples["context"][:shown],
        "held-out real images": real[:shown],
    }, rows=4)
    _save_panels(out / "inpainting.png", {
        "input (hole grey)": torch.where(known_mask, inpaint_truth, torch.zeros(())),
        "baseline": inpaintings["baseline"],
        "with context prediction": inpaintings["context"],
        "ground truth": inpaint_truth,
    }, rows=4)
    _save_loss_curves(out / "loss_curves.png", histories)

    table = metrics_table(rows)
    note = (f"\nMetrics: lower is better. SWD = sliced Wasserstein distance of 7x7 patches per "
            f"Laplacian level (finest first) vs {len(real)} held-out crops; neighbor = sliced W1 "
            f"of (pixel, neighbor) pairs per stride; inpaint = centre hole, RePaint "
            f"({args.inpaint_steps} steps x {args.resample}). One seed ({args.seed}): see "
            f"benchmarks/quality.py for several seeds with mean +- std.\n")
    (out / "metrics.md").write_text(table + "\n" + note)
    (out / "metrics.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2,
        default=str))
    print()
    print(table)
    print(note)
    print(f"wrote {out}/samples.png, inpainting.png, loss_curves.png, metrics.md, metrics.json "
          f"in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
