"""Quality benchmark: does context prediction improve samples? With vs without, several seeds.

    python benchmarks/quality.py --preset small          # ~20-25 min on 2 shared CPU cores
    python benchmarks/quality.py                         # --preset cpu: < 1 hour on 2 CPU cores
    python benchmarks/quality.py --preset gpu --device cuda

For each dataset (``textures`` 32x32, ``digits`` 16x16) and each variant, one reference model is
trained per seed with the *same* seed, steps, batch and UNet; samples of its EMA weights are
compared with held-out images (``reference_models.metrics``, lower is better):

* ``swd`` — Laplacian-pyramid 7x7-patch sliced Wasserstein distance (mean over levels);
* ``neighbor`` — (pixel, neighbor) joint-distribution discrepancy, mean over strides 1..3;
* ``fd_digits`` — Frechet distance in a locally trained digits classifier's features (digits);
* ``inpaint_mse`` — masked MSE of RePaint centre-hole inpainting of held-out images.

Variants (``--model continuous``):

* ``baseline`` — no context prediction;
* ``context`` — distributional (Gaussian sampling) head + Sinkhorn Wasserstein, strides (1,2,3);
* ``naive-mse`` — ablation: naive per-slot head + MSE, strides (1, 2, 3);
* ``strides-1`` — ablation: distributional head + Sinkhorn, stride (1,) only.

Results are appended run by run to ``<out>/quality_<model>_<preset>.json`` (a rerun skips the runs
already there), then aggregated as mean +- std (sample std over seeds) into
``<out>/quality_<model>_<preset>.md``, which is printed.

Other models plug in through :data:`SECTIONS`: a section is a function
``(preset: Preset, args) -> list[RunSpec]`` of runs, each with a ``run()`` returning a metrics dict.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from reference_models.metrics import (
    frechet_digits_distance,
    inpainting_metrics,
    neighborhood_discrepancy,
    swd_laplacian,
)

__all__ = ["PRESETS", "SECTIONS", "Preset", "RunSpec", "aggregate", "main"]


@dataclass(frozen=True)
class Preset:
    """Compute budget of one benchmark run (per trained model unless noted); samples are drawn
    with the respaced ancestral (DDPM) sampler in ``sample_steps`` steps."""

    steps: int
    batch_size: int
    base_channels: int
    lr: float
    samples: int
    sample_steps: int
    seeds: tuple[int, ...]
    ablation_seeds: tuple[int, ...]
    context_points: int
    inpaint_images: int = 16
    inpaint_steps: int = 10
    resample: int = 2
    datasets: tuple[str, ...] = ("textures", "digits")
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # runnable on today's shared 2-core CPU in ~20-25 min: ablations on one seed only
    "small": Preset(steps=300, batch_size=16, base_channels=16, lr=1e-3, samples=64,
                    sample_steps=25, seeds=(0, 1, 2), ablation_seeds=(0,), context_points=32),
    # the demo's training budget (800 steps); with --datasets textures --variants baseline
    # context it takes ~25 min on today's shared 2-core CPU
    "medium": Preset(steps=800, batch_size=16, base_channels=16, lr=1e-3, samples=64,
                     sample_steps=50, seeds=(0, 1, 2), ablation_seeds=(0, 1, 2),
                     context_points=32),
    # CPU default, < 1 hour on 2 cores: every variant on three seeds
    "cpu": Preset(steps=500, batch_size=16, base_channels=16, lr=1e-3, samples=128,
                  sample_steps=25, seeds=(0, 1, 2), ablation_seeds=(0, 1, 2), context_points=32),
    # seconds: checks that every variant and metric runs (numbers meaningless)
    "smoke": Preset(steps=3, batch_size=4, base_channels=8, lr=1e-3, samples=8, sample_steps=2,
                    seeds=(0, 1), ablation_seeds=(0,), context_points=8, inpaint_images=4,
                    inpaint_steps=2, resample=1),
    # a GPU: longer training, wider UNet, more samples
    "gpu": Preset(steps=6000, batch_size=64, base_channels=64, lr=2e-4, samples=1024,
                  sample_steps=100, seeds=(0, 1, 2), ablation_seeds=(0, 1, 2),
                  context_points=128, inpaint_images=64, inpaint_steps=50, resample=5),
}


@dataclass
class RunSpec:
    """One trained-and-evaluated model: ``key`` identifies it in the results file."""

    dataset: str
    variant: str
    seed: int
    run: Callable[[], dict[str, Any]]

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.variant}/{self.seed}"


# -- metrics ------------------------------------------------------------------------------------
_REAL_CACHE: dict[tuple[str, int, int], torch.Tensor] = {}


def _real(dataset: str, split: str, num: int, seed: int = 0) -> torch.Tensor:
    from reference_models.data import load_dataset

    key = (f"{dataset}:{split}", num, seed)
    if key not in _REAL_CACHE:
        try:
            _REAL_CACHE[key] = load_dataset(dataset, split, num_samples=num, seed=seed)
        except ValueError:  # fewer images than asked for (digits test split): take them all
            _REAL_CACHE[key] = load_dataset(dataset, split, seed=seed)
    return _REAL_CACHE[key]


#: Held-out real images ``(dataset, split, num, seed=0) -> (N, 1, H, W)`` (cached).
real_images = _real


def sample_metrics(samples: torch.Tensor, real: torch.Tensor, dataset: str) -> dict[str, float]:
    """``swd``, ``neighbor`` (and ``fd_digits`` for digits) of ``samples`` vs ``real``."""
    out = {
        "swd": float(swd_laplacian(samples, real)["mean"]),
        "neighbor": float(neighborhood_discrepancy(samples, real, strides=(1, 2, 3))["mean"]),
    }
    if dataset == "digits":
        out["fd_digits"] = frechet_digits_distance(samples, real)
    return out


# -- the continuous section ---------------------------------------------------------------------
def continuous_variants(strides_all: tuple[int, ...] = (1, 2, 3)) -> dict[str, Any]:
    """``{variant: ContextConfig | None}`` of the continuous section."""
    from reference_models.continuous import ContextConfig

    return {
        "baseline": None,
        "context": ContextConfig(strides=strides_all, head="gaussian", estimator="sinkhorn"),
        "naive-mse": ContextConfig(strides=strides_all, head="naive"),
        "strides-1": ContextConfig(strides=(1,), head="gaussian", estimator="sinkhorn"),
    }


def continuous_section(preset: Preset, args: argparse.Namespace) -> list[RunSpec]:
    """Runs of the continuous reference model (see the module docstring)."""
    from reference_models.continuous import TrainConfig, Trainer, center_mask

    variants = continuous_variants()
    specs: list[RunSpec] = []
    for dataset in args.datasets or preset.datasets:
        for variant, context in variants.items():
            seeds = preset.seeds if variant in ("baseline", "context") else preset.ablation_seeds
            for seed in seeds:
                if context is not None:
                    context = dataclasses.replace(context, points=preset.context_points)
                config = TrainConfig(
                    dataset=dataset, steps=preset.steps, batch_size=preset.batch_size,
                    lr=preset.lr, base_channels=preset.base_channels, seed=seed,
                    device=args.device, log_every=50, context=context,
                )

                def run(config: Any = config, dataset: str = dataset) -> dict[str, Any]:
                    trainer = Trainer(config)
                    history = trainer.train(progress=not args.no_progress)
                    samples = trainer.sample(preset.samples, "ddpm",
                                             num_steps=preset.sample_steps, seed=config.seed)
                    real = _real(dataset, "test", max(256, preset.samples))
                    truth = real[: preset.inpaint_images]
                    mask = center_mask(len(truth), truth.shape[-1])
                    inpainted = trainer.diffusion.inpaint(
                        trainer.ema.model.eval(), truth.to(trainer.device),
                        mask.to(trainer.device), num_steps=preset.inpaint_steps,
                        resample=preset.resample,
                        generator=torch.Generator().manual_seed(config.seed),
                    ).cpu()
                    tail = history[-50:]
                    return {
                        **sample_metrics(samples, real, dataset),
                        "inpaint_mse": inpainting_metrics(inpainted, truth, mask)["masked_mse"],
                        "point_loss": sum(h["point_loss"] for h in tail) / len(tail),
                        "s_per_step": history[-1]["time"] / max(1, trainer.step),
                    }

                specs.append(RunSpec(dataset, variant, seed, run))
    return specs


def _floor_runs(preset: Preset, args: argparse.Namespace) -> list[RunSpec]:
    """Held-out real images vs training images: what a perfect model would score."""
    specs = []
    for dataset in args.datasets or preset.datasets:
        def run(dataset: str = dataset) -> dict[str, Any]:
            real = _real(dataset, "test", max(256, preset.samples))
            train = _real(dataset, "train", preset.samples, seed=123)
            return sample_metrics(train, real, dataset)

        specs.append(RunSpec(dataset, "real-vs-real", 0, run))
    return specs


def discrete_section(preset: Preset, args: argparse.Namespace) -> list[RunSpec]:
    """Runs of the discrete (token) reference model: ``baseline`` and ``context`` per seed."""
    from reference_models.discrete.evaluate import quality_section

    return quality_section(preset, args, sys.modules[__name__])


#: ``--model`` name -> section. A section returns the runs of its model (see the module doc).
SECTIONS: dict[str, Callable[[Preset, argparse.Namespace], list[RunSpec]]] = {
    "continuous": continuous_section,
    "discrete": discrete_section,
}


# -- aggregation --------------------------------------------------------------------------------
_METRICS = ("swd", "neighbor", "fd_digits", "inpaint_mse", "point_loss", "s_per_step")


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def aggregate(results: dict[str, dict[str, Any]]) -> str:
    """Markdown tables (one per dataset) of mean +- std over seeds, and the context-vs-baseline
    difference of each metric in units of its pooled std.

    Example:
        >>> res = {"d/baseline/0": {"swd": 1.0}, "d/baseline/1": {"swd": 3.0},
        ...        "d/context/0": {"swd": 1.0}, "d/context/1": {"swd": 1.0}}
        >>> print(aggregate(res).splitlines()[4])
        | baseline | 2 | 2.0000 +- 1.4142 |
    """
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for key, metrics in results.items():
        dataset, variant, _ = key.split("/")
        grouped.setdefault(dataset, {}).setdefault(variant, []).append(metrics)
    lines: list[str] = []
    for dataset, unordered in grouped.items():
        order = {"baseline": 0, "context": 1, "real-vs-real": 3}
        variants = dict(sorted(unordered.items(), key=lambda kv: order.get(kv[0], 2)))
        present = [m for m in _METRICS if any(m in r for rs in variants.values() for r in rs)]
        lines += [f"### {dataset}", "", "| variant | seeds | " + " | ".join(present) + " |",
                  "|---" * (len(present) + 2) + "|"]
        stats: dict[str, dict[str, tuple[float, float | None]]] = {}
        for variant, runs in variants.items():
            cells = []
            stats[variant] = {}
            for metric in present:
                values = [r[metric] for r in runs if metric in r]
                if not values:
                    cells.append("-")
                    continue
                mean, std = _mean_std(values)
                stats[variant][metric] = (mean, std)
                cells.append(f"{mean:.4f}" + (f" +- {std:.4f}" if std is not None else ""))
            lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")
        if "baseline" in stats and "context" in stats:
            lines += ["", "context - baseline (negative = context prediction better; in units "
                      "of the pooled std over seeds):", ""]
            for metric in ("swd", "neighbor", "fd_digits", "inpaint_mse"):
                if metric not in stats["baseline"] or metric not in stats["context"]:
                    continue
                (mb, sb), (mc, sc) = stats["baseline"][metric], stats["context"][metric]
                diff = mc - mb
                pooled = math.sqrt(((sb or 0.0) ** 2 + (sc or 0.0) ** 2) / 2)
                rel = f"{diff / pooled:+.2f} std" if pooled > 0 else "n/a"
                lines.append(f"- {metric}: {diff:+.4f} ({100 * diff / mb:+.1f}%, {rel})")
        lines.append("")
    return "\n".join(lines)


# -- driver -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/quality.py",
        description="With vs without context prediction, several seeds, mean +- std.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", choices=sorted(SECTIONS), default="continuous")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--datasets", nargs="+", default=None, help="default: the preset's")
    p.add_argument("--variants", nargs="+", default=None, help="default: all of the section")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(max(1, args.threads))
    preset = PRESETS[args.preset]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"quality_{args.model}_{args.preset}"
    results_path = stem.with_suffix(".json")
    results: dict[str, dict[str, Any]] = (
        json.loads(results_path.read_text()) if results_path.exists() else {}
    )
    specs = SECTIONS[args.model](preset, args) + _floor_runs(preset, args)
    if args.variants is not None:
        specs = [s for s in specs if s.variant in args.variants or s.variant == "real-vs-real"]
    todo = [s for s in specs if s.key not in results]
    print(f"quality benchmark: model={args.model} preset={args.preset} device={args.device}: "
          f"{len(specs)} runs, {len(specs) - len(todo)} already in {results_path}")
    started = time.perf_counter()
    for i, spec in enumerate(todo, 1):
        t0 = time.perf_counter()
        results[spec.key] = spec.run()
        tmp = results_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(results_path)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in results[spec.key].items())
        print(f"[{i}/{len(todo)}] {spec.key}: {shown} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    command = "python benchmarks/quality.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    wanted = {s.key for s in specs}
    table = aggregate({k: v for k, v in results.items() if k in wanted})
    header = (f"Command: `{command.strip()}` (preset {args.preset}: "
              f"{json.dumps(dataclasses.asdict(preset))})\n")
    stem.with_suffix(".md").write_text(header + "\n" + table)
    print()
    print(header)
    print(table)
    print(f"total {time.perf_counter() - started:.0f} s; wrote {stem}.md and {results_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
