"""Overhead of context prediction on a UNet training step: time and peak memory, as ratios.

One run measures a DDPM training step of a diffusers ``UNet2DModel`` (Adam, MSE on the noise)
without and with context prediction attached to two decoder blocks (``up_blocks.1`` and
``up_blocks.2``, pixel context at 3 strides, :class:`ctxpred.GaussianSamplingHead`, the loss's
default estimator), and reports ``with / without``:

* **step time**: median over ``--steps`` timed steps after ``--warmup`` steps; the variants
  (baseline; context prediction with each ``--points`` value and the default estimator; and with
  each ``--exact-points`` value, ``estimator="exact"`` and ``match_mask=True``) alternate step by
  step in one process so that load drift on a shared machine hits all alike;
* **peak memory** of a step above the memory at rest before it (weights and Adam state at rest are
  excluded; activations, gradients and temporaries included): on CUDA from
  ``torch.cuda.max_memory_allocated``; on CPU from the resident set size polled by a thread, in a
  fresh subprocess per variant. CPU numbers include allocator behaviour and are coarser.

Usage::

    python3 run.py bench overhead                      # CPU, writes docs/results/overhead_cpu.*
    python3 run.py bench overhead --device cuda        # GPU, writes docs/results/overhead_cuda.*
    python3 run.py bench overhead --quick              # tiny smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ctxpred  # noqa: E402

LAYERS = ("up_blocks.1", "up_blocks.2")
STRIDES = (1, 2, 3)


def build_unet(args: argparse.Namespace) -> nn.Module:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    channels = tuple(args.channels)
    return UNet2DModel(
        sample_size=args.size, in_channels=3, out_channels=3, layers_per_block=args.layers,
        block_out_channels=channels, norm_num_groups=8,
        down_block_types=("DownBlock2D",) * (len(channels) - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (len(channels) - 1),
    )


def layer_channels(args: argparse.Namespace) -> dict[str, int]:
    reversed_channels = list(reversed(args.channels))
    return {name: reversed_channels[int(name.split(".")[1])] for name in LAYERS}


Setting = tuple[int, str, bool] | None  # (points, estimator, match_mask); None = no context


def reference_variants() -> dict[str, Any]:
    """``{name: ContextConfig | None}`` timed with ``--model reference``: the trainer's default
    (the recommended configuration: the quality study's confirmed ``px-l0.3-tcut``), cheaper
    options, and the former default."""
    from reference_models.continuous import ContextConfig

    r = dataclasses.replace
    default = ContextConfig()
    return {
        "baseline": None,
        "default": default,
        "points_16": r(default, points=16),
        "exact_matched": r(default, estimator="exact", match_mask=True),
        "exact_matched_points_16": r(default, estimator="exact", match_mask=True, points=16),
        "study_q16": r(default, num_samples=16, timestep_weighting="none"),
        "former_default": r(default, weight=0.1, points=64, timestep_weighting="none"),
    }


def _variants(args: argparse.Namespace) -> dict[str, Any]:
    if args.model == "reference":
        return reference_variants()
    out: dict[str, Setting] = {"baseline": None}
    out.update({f"context_points_{p}": (p, "sinkhorn", False) for p in args.points})
    out.update({f"context_points_{p}_exact_matched": (p, "exact", True)
                for p in args.exact_points})
    return out


class _Timed:
    """What :func:`measure_time` needs of a variant: ``device``, ``opt``, ``step()`` and
    ``sync()`` (waits for the device's queued work; nothing on CPU)."""

    device: torch.device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class ReferenceVariant(_Timed):
    """The reference model's :class:`~reference_models.continuous.Trainer` (32x32 textures, the
    demo's UNet and batch) with ``context`` (``None``: no context prediction); one step is
    ``Trainer.train_step`` (data, noise, denoising + context loss, clipping, AdamW, EMA), with the
    gradient-ratio diagnostic off."""

    def __init__(self, args: argparse.Namespace, context: Any) -> None:
        from reference_models.continuous import TrainConfig, Trainer

        config = TrainConfig(dataset="textures", batch_size=args.batch,
                             base_channels=args.base_channels, lr=1e-3, diagnostic_every=0,
                             device=args.device, context=context)
        self.trainer = Trainer(config)
        self.device = self.trainer.device
        self.opt = self.trainer.optimizer

    def step(self) -> None:
        self.trainer.train_step()


def make_variant(args: argparse.Namespace, setting: Any) -> _Timed:
    return ReferenceVariant(args, setting) if args.model == "reference" else Variant(args, setting)


class Variant(_Timed):
    """A model, optimizer and (optionally) attached context prediction, with one train step."""

    def __init__(self, args: argparse.Namespace, setting: Setting) -> None:
        self.device = torch.device(args.device)
        self.model = build_unet(args).to(self.device)
        self.predictor = None
        params = list(self.model.parameters())
        if setting is not None:
            points, estimator, match_mask = setting
            losses = {
                name: ctxpred.ContextPredictionLoss(
                    ctxpred.PixelNeighborhood(strides=STRIDES),
                    ctxpred.GaussianSamplingHead(3, c, num_samples=args.samples,
                                                 num_strides=len(STRIDES)),
                    estimator, weight=0.1, points=points, match_mask=match_mask,
                )
                for name, c in layer_channels(args).items()
            }
            self.predictor = ctxpred.attach(self.model, losses).to(self.device)
            params += list(self.predictor.parameters())
        self.opt = torch.optim.Adam(params, lr=1e-4)
        g = torch.Generator().manual_seed(0)
        shape = (args.batch, 3, args.size, args.size)
        self.x0 = (torch.rand(shape, generator=g) * 2 - 1).to(self.device)
        self.noise = torch.randn(shape, generator=g).to(self.device)
        self.t = torch.randint(0, 1000, (args.batch,), generator=g).to(self.device)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        alpha = torch.cos(self.t.float() / 1000 * torch.pi / 2).view(-1, 1, 1, 1)
        x_t = alpha * self.x0 + (1 - alpha**2).sqrt() * self.noise
        loss = ((self.model(x_t, self.t).sample - self.noise) ** 2).mean()
        if self.predictor is not None:
            loss = loss + self.predictor.loss(target=self.x0)
        loss.backward()
        self.opt.step()



def measure_time(args: argparse.Namespace) -> dict[str, Any]:
    variants = {name: make_variant(args, setting) for name, setting in _variants(args).items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, float] = {}
    for _ in range(args.warmup):
        for v in variants.values():
            v.step()
    for name, v in variants.items():
        v.sync()
        if v.device.type == "cuda":
            v.opt.zero_grad(set_to_none=True)  # at rest: weights and Adam state only
            torch.cuda.reset_peak_memory_stats(v.device)
            base = torch.cuda.memory_allocated(v.device)
            v.step()
            v.sync()
            peaks[name] = (torch.cuda.max_memory_allocated(v.device) - base) / 2**20
    for _ in range(args.steps):
        for name, v in variants.items():
            v.sync()
            start = time.perf_counter()
            v.step()
            v.sync()
            times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    out: dict[str, Any] = {
        "step_ms": median,
        "step_ms_all": {k: [round(t * 1e3, 1) for t in v] for k, v in times.items()},
        "time_ratio": {k: median[k] / median["baseline"] for k in median if k != "baseline"},
    }
    if peaks:
        out["peak_mib"] = peaks
        out["memory_ratio"] = {k: peaks[k] / peaks["baseline"] for k in peaks if k != "baseline"}
        out["memory_method"] = ("torch.cuda.max_memory_allocated over one step, above the "
                                "allocation at rest before it (weights and Adam state excluded; "
                                "activations, gradients and temporaries included)")
    return out


class _RssSampler:
    """Peak resident set size (bytes) seen by a thread polling ``/proc/self/statm``."""

    def __init__(self, interval: float = 5e-4) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> _RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _child_peak(args: argparse.Namespace, variant: str) -> float:
    """In a fresh process: peak RSS above the resting RSS during 3 steps after warmup (MiB)."""
    v = make_variant(args, _variants(args)[variant])
    for _ in range(args.warmup):
        v.step()
    v.opt.zero_grad(set_to_none=True)
    gc.collect()
    with _RssSampler() as sampler:
        rest = sampler.rss()
        for _ in range(3):
            v.step()
    return (sampler.peak - rest) / 2**20


def measure_cpu_memory(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    peaks = {}
    for variant in _variants(args):
        cmd = [sys.executable, __file__, *argv, "--child-memory", variant]
        # glibc: every block >= 64 KiB is its own mmap, returned to the OS on free, so the
        # resident set follows the live tensors instead of the allocator's cache.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        result = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        peaks[variant] = float(result.stdout.strip().splitlines()[-1])
    return {
        "peak_mib": peaks,
        "memory_ratio": {k: peaks[k] / peaks["baseline"] for k in peaks if k != "baseline"},
        "memory_method": "peak resident set size (polled every 0.5 ms from /proc/self/statm) "
                         "during 3 steps, above the resting RSS before them (weights and Adam "
                         "state excluded; activations, gradients and temporaries included), one "
                         "fresh subprocess per variant, glibc MALLOC_MMAP_THRESHOLD_=65536 so "
                         "that freed tensors leave the resident set",
    }


def _fields(config: Any) -> str:
    """The fields of a dataclass that differ from their defaults, as ``k=v`` (``""``: all
    defaults)."""
    default = type(config)()
    return ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
                     if getattr(config, f.name) != getattr(default, f.name))


def write_report(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    cfg = result["config"]
    if cfg.get("model") == "reference":
        title = "Context-prediction overhead on the reference model"
        model = (f"Model: the reference DDPM trainer (`reference_models.continuous.Trainer`, "
                 f"32x32 textures, UNet base width {cfg['base_channels']}, batch {cfg['batch']}"
                 f"; a step = `Trainer.train_step`: denoising + context loss, clipping, AdamW, "
                 f"EMA). Variants: {result['variants']}.")
    else:
        title = "Context-prediction overhead"
        model = (f"Model: diffusers `UNet2DModel`, {cfg['size']}x{cfg['size']} RGB, block "
                 f"channels {tuple(cfg['channels'])}, {cfg['layers']} layers per block, batch "
                 f"{cfg['batch']}; context on `{LAYERS[0]}` and `{LAYERS[1]}`, strides "
                 f"{STRIDES}, GaussianSamplingHead with Q={cfg['samples']}, `points` query "
                 f"points per sample and layer, estimator `{result['estimator']}`.")
    lines = [
        f"# {title} ({result['device']})",
        "",
        f"Written by `{result['command']}` on {result['date']}.",
        "",
        model,
        "",
        "| variant | step time (median, ms) | min-max (ms) | time ratio | "
        "peak step memory (MiB) | memory ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name in result["step_ms"]:
        ratio_t = result["time_ratio"].get(name)
        ratio_m = result["memory_ratio"].get(name)
        every = result["step_ms_all"][name]
        lines.append(
            f"| {name} | {result['step_ms'][name]:.1f} | {min(every):.0f}-{max(every):.0f} | "
            f"{'-' if ratio_t is None else f'{ratio_t:.3f}'} | "
            f"{result['peak_mib'][name]:.1f} | {'-' if ratio_m is None else f'{ratio_m:.3f}'} |"
        )
    lines += [
        "",
        "Targets: time ratio <= 1.15, memory ratio <= 1.20.",
        "",
        f"Memory: {result['memory_method']}.",
        "",
        f"Machine: {result['machine']}; torch {result['torch']}, {result['threads']} intra-op "
        f"thread(s). {result['note']}",
        "",
    ]
    path.with_suffix(".md").write_text("\n".join(lines))


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The benchmark's options (``--quick`` shrinks every size to a smoke run)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=("diffusers", "reference"), default="diffusers",
                        help="diffusers: a UNet2DModel step; reference: the reference trainer")
    parser.add_argument("--base-channels", type=int, default=16,
                        help="--model reference: UNet base width (the demo's: 16)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 128, 128])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--points", type=int, nargs="+", default=[32, 64],
                        help="query points per sample and layer; one context variant each")
    parser.add_argument("--exact-points", type=int, nargs="*", default=[32, 64],
                        help="points for variants with estimator='exact' and match_mask=True")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, writes nothing")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.base_channels = 8
        args.batch, args.size, args.channels, args.layers = 2, 16, [16, 32, 32], 1
        args.points, args.exact_points, args.steps, args.warmup = [16], [16], 2, 1
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_memory:
        print(_child_peak(args, args.child_memory))
        return 0
    result: dict[str, Any] = {
        "device": args.device,
        "command": "python3 run.py bench overhead " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
                    else f"{platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} thread(s)"),
        "estimator": "sinkhorn (the ContextPredictionLoss default); *_exact_matched: "
                     "estimator='exact' with match_mask=True (Q = K_s = 8)",
        "config": {k: v for k, v in vars(args).items()
                   if k in (("model", "batch", "base_channels", "steps", "warmup")
                            if args.model == "reference" else
                            ("batch", "size", "channels", "layers", "points", "exact_points",
                             "samples", "steps", "warmup"))},
        "note": ("Shared, noisy CPU machine (other jobs running): treat the ratios as rough."
                 if args.device == "cpu" else ""),
    }
    if args.model == "reference":
        result["variants"] = "; ".join(
            f"`{name}` = " + ("no context" if cfg is None else
                              f"`ContextConfig({_fields(cfg)})`")
            for name, cfg in reference_variants().items())
    result.update(measure_time(args))
    if "peak_mib" not in result:
        result.update(measure_cpu_memory(args, argv))
    print(json.dumps({k: result[k] for k in ("step_ms", "time_ratio", "peak_mib",
                                             "memory_ratio")}, indent=2))
    if not args.quick:
        stem = "overhead_reference" if args.model == "reference" else "overhead"
        out = args.out or ROOT / "docs" / "results" / f"{stem}_{torch.device(args.device).type}"
        write_report(result, out)
        print(f"wrote {out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
