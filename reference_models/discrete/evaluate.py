"""Quality of the discrete reference model with vs without token-context prediction.

``python -m reference_models.discrete.evaluate [--dataset digits] [--seeds 0 1 2] ...`` trains
the model twice per seed (``context=False`` / ``context=True``, otherwise identical: same
tokenizer, data order, diffusion noise stream, number of steps), samples token grids, decodes
them to images and scores them against the held-out split with the shared metrics of
:mod:`reference_models.metrics`:

* ``swd``: multi-scale Laplacian-pyramid patch SWD (:func:`reference_models.metrics.swd_laplacian`);
* ``neighborhood``: (pixel, neighbor) statistics at strides 1-3
  (:func:`reference_models.metrics.neighborhood_discrepancy`);
* ``fd``: Frechet distance in the features of the local digits classifier (digits only,
  :func:`reference_models.metrics.frechet_digits_distance`).

Digits are tokenized at their native 8x8 (17 levels) and samples are upsampled to 16x16 exactly
as :mod:`reference_models.data` upsamples the real digits, so the numbers are on the same scale
as the continuous model's. Two reference rows bound what is reachable: ``train data`` (real
training images vs the test split) and ``tokenizer`` (test images through encode/decode: the
codebook's own ceiling, exact for digits).

``--write`` writes the markdown report (``docs/results/quality_discrete.md`` by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from reference_models.discrete.training import (
    DiscreteConfig,
    build_tokenizer,
    generate,
    load_images,
    train,
    upsample_like_data,
)

__all__ = [
    "QUALITY_PRESETS",
    "evaluate_images",
    "format_report",
    "main",
    "quality_section",
    "run_quality",
    "train_and_score",
    "write_section",
]

METRICS = ("swd", "neighborhood", "fd")


def evaluate_images(fake: Tensor, real: Tensor, dataset: str) -> dict[str, float]:
    """Shared metrics of ``fake`` vs ``real`` ``(N, 1, H, W)`` (lower is better)."""
    from reference_models.metrics import (
        frechet_digits_distance,
        neighborhood_discrepancy,
        swd_laplacian,
    )

    out = {
        "swd": float(swd_laplacian(fake, real)["mean"]),
        "neighborhood": float(neighborhood_discrepancy(fake, real)["mean"]),
    }
    if dataset == "digits":
        out["fd"] = float(frechet_digits_distance(fake, real))
    return out


def _to_metric_space(images: Tensor, dataset: str) -> Tensor:
    return upsample_like_data(images, 16) if dataset == "digits" else images


def run_quality(
    dataset: Literal["digits", "textures"] = "digits",
    seeds: Sequence[int] = (0, 1, 2),
    *,
    train_steps: int = 600,
    num_samples: int = 360,
    sample_steps: int = 50,
    context_weight: float = 0.1,
    threads: int | None = 1,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train with and without context prediction for every seed and score the samples.

    Args:
        dataset: ``"digits"`` or ``"textures"``.
        seeds: one run pair per seed.
        train_steps: optimizer steps per run (same for both variants).
        num_samples: generated images per run (and real test images compared against).
        sample_steps: reverse steps of the sampler (``<= num_steps`` of the config).
        context_weight: ``lambda`` of the context variant.
        threads: ``torch.set_num_threads`` (``None``: leave as is).
        progress: tqdm bars.
        overrides: extra :class:`DiscreteConfig` fields.

    Returns:
        ``{"config": ..., "runs": [{"seed", "context", "metrics", "train_s", "sample_s",
        "final_loss", "final_context"}], "references": {name: metrics}, "command": ...}``.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    base = DiscreteConfig(dataset=dataset, train_steps=train_steps,
                          context_weight=context_weight, **(overrides or {}))
    tokenizer = build_tokenizer(base)
    real = load_images(base, "test")
    real = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(0))]
    real = real[:num_samples]
    real_m = _to_metric_space(real, dataset)
    train_imgs = load_images(base, "train", num_samples=len(real), seed=7)
    references = {
        "train data": evaluate_images(_to_metric_space(train_imgs, dataset), real_m, dataset),
        "tokenizer": evaluate_images(
            _to_metric_space(tokenizer.decode(tokenizer.encode(real)), dataset), real_m, dataset
        ),
    }
    runs = []
    for seed in seeds:
        for context in (False, True):
            config = dataclasses.replace(base, seed=int(seed), context=context)
            t0 = time.perf_counter()
            result = train(config, tokenizer=tokenizer, progress=progress)
            t1 = time.perf_counter()
            fake = generate(result, len(real), num_steps=sample_steps, seed=1000 + int(seed))
            t2 = time.perf_counter()
            metrics = evaluate_images(_to_metric_space(fake, dataset), real_m, dataset)
            last = result.history[-50:]
            runs.append({
                "seed": int(seed), "context": context, "metrics": metrics,
                "train_s": t1 - t0, "sample_s": t2 - t1,
                "final_loss": statistics.fmean(r["loss"] for r in last),
                "final_context": statistics.fmean(r["context"] for r in last),
            })
            if progress:
                print(f"seed={seed} context={context} {metrics} "
                      f"train {t1 - t0:.0f}s sample {t2 - t1:.0f}s", file=sys.stderr)
    return {"config": dataclasses.asdict(base), "runs": runs, "references": references,
            "num_samples": len(real), "sample_steps": sample_steps}


#: Per-preset sizes of the discrete runs in ``benchmarks/quality.py --model discrete`` (the
#: preset's own ``steps`` / ``batch_size`` are sized for the UNet and do not transfer). A preset
#: missing here runs with the ``small`` sizes.
QUALITY_PRESETS: dict[str, dict[str, int]] = {
    "smoke": {"train_steps": 3, "batch_size": 4, "dim": 16, "depth": 1, "samples": 8,
              "sample_steps": 2},
    "small": {"train_steps": 600, "batch_size": 64, "dim": 64, "depth": 2, "samples": 256,
              "sample_steps": 50},
    "medium": {"train_steps": 800, "batch_size": 64, "dim": 64, "depth": 2, "samples": 256,
               "sample_steps": 50},
    "cpu": {"train_steps": 1000, "batch_size": 64, "dim": 64, "depth": 2, "samples": 360,
            "sample_steps": 50},
    "gpu": {"train_steps": 8000, "batch_size": 128, "dim": 256, "depth": 6, "samples": 1024,
            "sample_steps": 100},
}


def quality_section(preset: Any, args: Any, benchmark: Any) -> list[Any]:
    """The ``discrete`` section of ``benchmarks/quality.py``: ``baseline`` and ``context`` runs
    per dataset and seed, scored by that benchmark's own ``sample_metrics``.

    ``preset`` is a ``benchmarks.quality.Preset`` (its name, ``args.preset``, picks
    :data:`QUALITY_PRESETS`; its ``seeds``, ``datasets`` and ``context_points`` are used as they
    are), ``args`` the parsed command line (``preset``, ``datasets``, ``device``,
    ``no_progress``), ``benchmark`` the ``benchmarks.quality`` module itself (its ``PRESETS``,
    ``RunSpec``, ``real_images`` and ``sample_metrics``), passed in so that ``reference_models``
    never imports ``benchmarks``.
    """
    presets, run_spec = benchmark.PRESETS, benchmark.RunSpec

    # the preset's name: from the command line, else by value (``benchmarks/quality.py`` run as a
    # script defines its own ``Preset`` class, so compare field values, not instances)
    name = getattr(args, "preset", None) or next(
        (k for k, v in presets.items() if dataclasses.asdict(v) == dataclasses.asdict(preset)),
        "small",
    )
    sizes = dict(QUALITY_PRESETS.get(name, QUALITY_PRESETS["small"]))
    samples, sample_steps = sizes.pop("samples"), sizes.pop("sample_steps")
    tokenizers: dict[str, Any] = {}
    specs = []
    for dataset in args.datasets or preset.datasets:
        for variant in ("baseline", "context"):
            for seed in preset.seeds:
                config = DiscreteConfig(
                    dataset=dataset, seed=seed, context=variant == "context",
                    context_points=min(preset.context_points, 64), checkpoint_every=10**9,
                    **sizes,
                )

                def run(config: DiscreteConfig = config) -> dict[str, Any]:
                    return train_and_score(config, samples, sample_steps, benchmark,
                                           device=args.device, progress=not args.no_progress,
                                           tokenizers=tokenizers)

                specs.append(run_spec(dataset, variant, seed, run))
    return specs


def train_and_score(config: DiscreteConfig, samples: int, sample_steps: int, benchmark: Any, *,
                    device: str = "cpu", progress: bool = False,
                    tokenizers: dict[str, Any] | None = None) -> dict[str, float]:
    """Train one discrete run, sample it and score it with ``benchmark.sample_metrics``.

    The quality benchmark's unit of work (its ``discrete`` section and its ``--stage discrete``):
    ``samples`` token grids with ``sample_steps`` reverse steps (noise seed ``1000 + seed``),
    decoded and scored against the held-out split (``benchmark.real_images``). ``tokenizers``
    caches the tokenizer per dataset across runs (it depends on the data only, so every run of a
    dataset shares it). Returns the metrics plus ``point_loss`` (mean training loss of the last
    50 steps), ``s_per_step`` and, with context, ``context_loss`` (same window).
    """
    cache = {} if tokenizers is None else tokenizers
    if config.dataset not in cache:
        cache[config.dataset] = build_tokenizer(config)
    t0 = time.perf_counter()
    result = train(config, tokenizer=cache[config.dataset], progress=progress, device=device)
    seconds = time.perf_counter() - t0
    fake = generate(result, samples, num_steps=sample_steps, seed=1000 + config.seed)
    real = benchmark.real_images(config.dataset, "test", max(256, samples))
    tail = result.history[-50:]
    out = {
        **benchmark.sample_metrics(_to_metric_space(fake, config.dataset), real, config.dataset),
        "point_loss": statistics.fmean(h["loss"] for h in tail),
        "s_per_step": seconds / config.train_steps,
    }
    if config.context:
        out["context_loss"] = statistics.fmean(h["context"] for h in tail)
    return out


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def format_report(results: dict[str, Any], command: str) -> str:
    """Markdown section with the table of :func:`run_quality`'s results and the command."""
    cfg = results["config"]
    metrics = [m for m in METRICS if m in results["runs"][0]["metrics"]]
    names = {"swd": "SWD (patch, Laplacian)", "neighborhood": "neighborhood stat.",
             "fd": "classifier FD"}
    lines = [
        f"### Discrete (token) model — `{cfg['dataset']}`",
        "",
        f"Command: `{command}`",
        "",
        f"Mask-and-replace diffusion (T={cfg['num_steps']}, gamma_bar_T={cfg['gamma_bar_T']}, "
        f"objective {cfg['objective']}), transformer dim {cfg['dim']} x depth {cfg['depth']}, "
        f"{cfg['train_steps']} steps of batch {cfg['batch_size']}, "
        f"{results['num_samples']} samples with {results['sample_steps']} reverse steps, "
        f"seeds {sorted({r['seed'] for r in results['runs']})}. Context variant: "
        f"CategoricalHead over the codebook (Q={cfg['context_samples']} Gumbel-softmax samples), "
        f"token neighborhoods of x0 at strides {tuple(cfg['context_strides'])}, Sinkhorn, "
        f"lambda={cfg['context_weight']}, {cfg['context_points']} query points per image, "
        f"hooked on the final token features. Lower is better; mean ± std over seeds.",
        "",
        "| variant | " + " | ".join(names[m] for m in metrics) + " | train s / run |",
        "|---|" + "---|" * (len(metrics) + 1),
    ]
    for context in (False, True):
        runs = [r for r in results["runs"] if r["context"] == context]
        cells = [_mean_std([r["metrics"][m] for r in runs]) for m in metrics]
        label = "with context prediction" if context else "without context prediction"
        train_s = statistics.fmean(r["train_s"] for r in runs)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {train_s:.0f} |")
    for name, values in results["references"].items():
        lines.append(f"| reference: {name} | "
                     + " | ".join(f"{values[m]:.4f}" for m in metrics) + " | — |")
    lines += ["", "Per seed:", "",
              "| seed | context | " + " | ".join(metrics) + " | final loss | final ctx loss |",
              "|---|---|" + "---|" * (len(metrics) + 2)]
    for r in results["runs"]:
        lines.append(
            f"| {r['seed']} | {r['context']} | "
            + " | ".join(f"{r['metrics'][m]:.4f}" for m in metrics)
            + f" | {r['final_loss']:.4f} | {r['final_context']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def _wins(results: dict[str, Any], metric: str) -> tuple[int, int]:
    """Seeds where the context run beats its paired baseline on ``metric``."""
    by_seed: dict[int, dict[bool, float]] = {}
    for r in results["runs"]:
        by_seed.setdefault(r["seed"], {})[r["context"]] = r["metrics"][metric]
    pairs = [v for v in by_seed.values() if len(v) == 2]
    return sum(v[True] < v[False] for v in pairs), len(pairs)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("digits", "textures"), default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--num-samples", type=int, default=360)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--context-weight", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", nargs="?", const="docs/results/quality_discrete.md",
                        default=None, help="write the markdown report (default path if bare)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    shown = list(sys.argv[1:] if argv is None else argv)
    if "--write" in shown:  # where the report goes does not change a number: show the default
        at = shown.index("--write")
        if at + 1 < len(shown) and not shown[at + 1].startswith("--"):
            del shown[at + 1]
    command = "python -m reference_models.discrete.evaluate " + " ".join(shown)
    t0 = time.perf_counter()
    results = run_quality(
        args.dataset, args.seeds, train_steps=args.train_steps, num_samples=args.num_samples,
        sample_steps=args.sample_steps, context_weight=args.context_weight,
        threads=args.threads, progress=not args.no_progress,
    )
    report = format_report(results, command.strip())
    wins = {m: _wins(results, m) for m in METRICS if m in results["runs"][0]["metrics"]}
    report += "\nSeeds where context prediction is better (paired by seed): " + ", ".join(
        f"{m} {w}/{n}" for m, (w, n) in wins.items()) + "\n"
    report += f"\nTotal wall time: {time.perf_counter() - t0:.0f} s.\n"
    print(report)
    if args.write:
        write_section(Path(args.write), report, args.dataset)
    return 0


def write_section(path: Path, report: str, dataset: str) -> None:
    """Put ``report`` between the ``dataset``'s result markers of ``path`` (hand-written text
    around them is kept); append the markers if they are missing.

    Markers: ``<!-- discrete-results:DATASET:start -->`` / ``<!-- ...:end -->``.
    """
    start = f"<!-- discrete-results:{dataset}:start -->"
    end = f"<!-- discrete-results:{dataset}:end -->"
    block = f"{start}\n{report}{end}"
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = (text + "\n" if text else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
