"""Draw the docs' explanatory figures: the pipeline, and a point with its neighborhood and samples.

    python docs/draw_figures.py     # writes docs/assets/pipeline.png and neighborhood.png (seconds)

``pipeline.png`` shows where ctxpred sits in a training step. ``neighborhood.png`` is computed with
ctxpred itself, not drawn by hand. Left: a small synthetic RGB image,
one query point and its neighbors at strides 1, 2, 3 (``PixelNeighborhood``, 8 per stride).
Right: the same neighbors as points in colour space (red, green), next to the samples that a
``GaussianSamplingHead`` predicts for that point after it was fitted to them with the exact
Wasserstein loss, one distribution per stride. Needs matplotlib (the ``models`` extra).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import matplotlib.patches

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import ctxpred
from ctxpred.functional import wasserstein

STRIDES = (1, 2, 3)
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c")


def synthetic_image(size: int = 15) -> torch.Tensor:
    """A smooth RGB pattern ``(1, 3, size, size)`` in [0, 1]: neighbors differ with distance."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    red = 0.5 + 0.4 * torch.sin(3.0 * x + 0.8 * y - 1.2)
    green = 0.5 + 0.4 * torch.sin(2.6 * y - 0.6 * x - 0.9)
    blue = 0.6 - 0.3 * x * y
    return torch.stack([red, green, blue])[None]


def fit_head(target: torch.Tensor, steps: int = 600, seed: int = 0) -> torch.Tensor:
    """Fit a head's samples of one point to its neighbors ``(S, 8, C)``; returns ``(S, 8, C)``."""
    torch.manual_seed(seed)
    channels = target.shape[-1]
    head = ctxpred.GaussianSamplingHead(out_channels=channels, in_channels=16,
                                        num_strides=len(STRIDES), num_samples=8)
    z = torch.randn(1, 1, 16)  # the representation of the point, (B, P, C_in)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(steps):
        samples = head(z)[0, 0]  # (S, Q, C)
        loss = wasserstein(samples, target, method="exact").mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return head(z)[0, 0]


def draw(out: Path) -> None:
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    image = synthetic_image()
    size = image.shape[-1]
    center = (size // 2, size // 2)
    point = torch.tensor([center[0] * size + center[1]])
    nb = ctxpred.PixelNeighborhood(strides=STRIDES)(image, points=point)
    target = nb.values[0, 0]  # (S, K_s, C): the neighbors of the point, per stride
    predicted = fit_head(target)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.4), dpi=110)
    left.imshow(image[0].permute(1, 2, 0).numpy(), interpolation="nearest")
    for stride, color in zip(STRIDES, COLORS):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dx == dy == 0:
                    continue
                r, c = center[0] + stride * dy, center[1] + stride * dx
                left.add_patch(plt.Rectangle((c - 0.45, r - 0.45), 0.9, 0.9, fill=False,
                                             edgecolor=color, linewidth=2.2,
                                             label=f"stride {stride}" if dx == dy == -1 else None))
    left.plot(*center[::-1], marker="*", color="white", markersize=16, markeredgecolor="black",
              linestyle="none", label="query point $i$")
    left.set_title("a point $i$ and its neighbors at strides 1, 2, 3", fontsize=10)
    left.set(xticks=[], yticks=[])
    left.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)

    for s, (stride, color) in enumerate(zip(STRIDES, COLORS)):
        right.scatter(target[s, :, 0], target[s, :, 1], s=60, color=color, edgecolor="black",
                      label=f"true neighbors, stride {stride}")
        right.scatter(predicted[s, :, 0], predicted[s, :, 1], s=70, color=color, marker="x",
                      label=f"predicted samples, stride {stride}")
    center_value = image[0, :2, center[0], center[1]]
    right.scatter(*center_value, marker="*", s=250, color="white", edgecolor="black",
                  label="the point itself")
    right.set_title("neighbors and predicted samples in colour space", fontsize=10)
    right.set(xlabel="red",
              ylabel="green")
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def _box(ax: plt.Axes, xy: tuple[float, float], text: str, color: str, width: float = 2.3,
         height: float = 0.9) -> None:
    x, y = xy
    ax.add_patch(matplotlib.patches.FancyBboxPatch(
        (x - width / 2, y - height / 2), width, height,
        boxstyle="round,pad=0.05,rounding_size=0.12", facecolor=color, edgecolor="#444444",
        linewidth=1.2))
    ax.text(x, y, text, ha="center", va="center", fontsize=9)


def _arrow(ax: plt.Axes, start: tuple[float, float], end: tuple[float, float],
           label: str = "", dashed: bool = False) -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops={
        "arrowstyle": "-|>", "color": "#444444", "lw": 1.3,
        "linestyle": "--" if dashed else "-", "shrinkA": 0, "shrinkB": 0})
    if label:
        mid = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
        vertical = start[0] == end[0]
        ax.text(mid[0] + (0.1 if vertical else 0), mid[1] + (0 if vertical else 0.12), label,
                ha="left" if vertical else "center", va="center" if vertical else "bottom",
                fontsize=7.5, color="#333333")


def draw_pipeline(out: Path) -> None:
    """The training step with context prediction: model, hook, head, neighborhood, estimator."""
    model, ctx, data = "#dbe9f6", "#fde3c8", "#e3f1dc"
    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=110)
    ax.set(xlim=(0, 13.2), ylim=(0, 4.6))
    ax.axis("off")
    _box(ax, (1.2, 3.6), "noisy input $x_t$", data, width=1.9)
    _box(ax, (4.4, 3.6), "your denoiser\n(UNet, DiT, ...)", model)
    _box(ax, (8.0, 3.6), "point-wise loss\n$L_\\mathrm{point}$", model)
    _box(ax, (4.4, 1.9), "hooked layer $l$\nfeatures $(B, C, H, W)$", model)
    _box(ax, (8.0, 1.9), "head: $Q$ samples per\npoint and stride", ctx)
    _box(ax, (1.2, 0.5), "clean signal $x_0$", data, width=1.9)
    _box(ax, (4.4, 0.5), "neighborhood:\nstrides 1, 2, 3 + mask", ctx)
    _box(ax, (11.6, 1.2), "Wasserstein\nestimator $\\to L_\\mathrm{ctx}$", ctx, width=2.6)
    _box(ax, (11.6, 3.6), "$L_\\mathrm{point} + \\lambda L_\\mathrm{ctx}$", "#f2f2f2", width=2.6)
    _arrow(ax, (2.15, 3.6), (3.25, 3.6))
    _arrow(ax, (5.55, 3.6), (6.85, 3.6), "prediction")
    _arrow(ax, (4.4, 3.15), (4.4, 2.35), "forward hook")
    _arrow(ax, (5.55, 1.9), (6.85, 1.9), "$P$ query points")
    _arrow(ax, (2.15, 0.5), (3.25, 0.5))
    _arrow(ax, (9.15, 1.75), (10.3, 1.4), "$(B, P, S, Q, C)$")
    _arrow(ax, (5.55, 0.5), (10.3, 1.0), "$(B, P, S, K_s, C)$ + mask")
    _arrow(ax, (9.15, 3.6), (10.3, 3.6))
    _arrow(ax, (11.6, 1.65), (11.6, 3.15))
    ax.text(8.0, 2.55, "training only: the head and the hook are removed for sampling",
            ha="center", fontsize=8, style="italic", color="#8a4b08")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "assets",
                        help="output folder")
    args = parser.parse_args(argv)
    draw_pipeline(args.out / "pipeline.png")
    draw(args.out / "neighborhood.png")
    print(f"wrote {args.out / 'pipeline.png'} and {args.out / 'neighborhood.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
