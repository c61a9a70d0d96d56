r"""Hub-free image-quality metrics for small bundled datasets (no downloaded weights).

All functions take channels-first image batches ``(N, C, H, W)`` with values in ``[-1, 1]`` and
return plain Python floats (they are evaluation code, not losses: host syncs are fine here).
Randomness (projections, subsampling) comes from explicit seeds, so a metric is a deterministic
function of its inputs; identical inputs of identical shape give exactly 0.

* :func:`swd_laplacian` — the ProGAN "SWD": sliced Wasserstein distance between the distributions
  of ``7 x 7`` patches of each Laplacian-pyramid level, per level and averaged.
* :func:`frechet_digits_distance` — Frechet distance
  :math:`\|\mu_1-\mu_2\|^2 + \operatorname{tr}(\Sigma_1+\Sigma_2-2(\Sigma_1^{1/2}\Sigma_2
  \Sigma_1^{1/2})^{1/2})` between Gaussians fitted to the penultimate features of a small digits
  classifier trained locally (:func:`digits_classifier`, cached under ``.cache/``).
* :func:`neighborhood_discrepancy` — sliced Wasserstein distance between the joint distributions
  of ``(pixel, neighbor)`` pairs at strides 1..3 of generated and real images.
* :func:`inpainting_metrics` — masked-region MSE and patch SWD against the ground truth.

Example:
    >>> import torch
    >>> from reference_models.metrics import swd_laplacian
    >>> real = torch.rand(8, 1, 32, 32) * 2 - 1
    >>> swd_laplacian(real, real)["mean"]
    0.0
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctxpred.errors import ShapeError, ValueRangeError, check_floating

__all__ = [
    "DigitsClassifier",
    "digits_classifier",
    "frechet_digits_distance",
    "frechet_distance",
    "inpainting_metrics",
    "laplacian_pyramid",
    "neighborhood_discrepancy",
    "sliced_wasserstein",
    "swd_laplacian",
]

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _check_images(x: Tensor, name: str) -> None:
    check_floating(x, name)
    if x.dim() != 4:
        raise ShapeError(f"{name} must be (N, C, H, W), got shape {tuple(x.shape)}")


def _check_pair(fake: Tensor, real: Tensor) -> None:
    _check_images(fake, "fake")
    _check_images(real, "real")
    if fake.shape[1:] != real.shape[1:]:
        raise ShapeError(
            f"fake and real must share (C, H, W), got {tuple(fake.shape[1:])} vs "
            f"{tuple(real.shape[1:])}"
        )


def _blur(x: Tensor) -> Tensor:
    """Separable 5-tap binomial blur with reflect padding, ``(N, C, H, W) -> same``."""
    c = x.shape[1]
    k = _BINOMIAL.to(x)
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def _pyr_down(x: Tensor) -> Tensor:
    return _blur(x)[:, :, ::2, ::2]


def _pyr_up(x: Tensor, size: tuple[int, int]) -> Tensor:
    up = torch.zeros(*x.shape[:2], *size, dtype=x.dtype, device=x.device)
    up[:, :, ::2, ::2] = x
    return _blur(up) * 4.0


def laplacian_pyramid(x: Tensor, num_levels: int) -> list[Tensor]:
    r"""Laplacian pyramid of ``x`` ``(N, C, H, W)``: ``num_levels`` tensors, finest first.

    Level ``l < L-1`` is :math:`G_l - \mathrm{up}(G_{l+1})` with :math:`G_0 = x` and
    :math:`G_{l+1} = \mathrm{down}(G_l)` (5-tap binomial blur, factor 2); the last level is the
    low-pass residual :math:`G_{L-1}`. Summing the upsampled levels reconstructs ``x`` exactly.

    Example:
        >>> [tuple(t.shape) for t in laplacian_pyramid(torch.zeros(2, 1, 32, 32), 3)]
        [(2, 1, 32, 32), (2, 1, 16, 16), (2, 1, 8, 8)]
    """
    _check_images(x, "x")
    if num_levels < 1:
        raise ValueRangeError(f"num_levels must be >= 1, got {num_levels}")
    levels: list[Tensor] = []
    current = x
    for _ in range(num_levels - 1):
        if min(current.shape[-2:]) < 4:
            raise ValueRangeError(
                f"image {tuple(x.shape[-2:])} too small for {num_levels} pyramid levels"
            )
        down = _pyr_down(current)
        levels.append(current - _pyr_up(down, current.shape[-2:]))
        current = down
    levels.append(current)
    return levels


def _default_levels(size: int, min_resolution: int) -> int:
    levels = 1
    while size // 2 >= min_resolution:
        size //= 2
        levels += 1
    return levels


def _subsample(x: Tensor, n: int, seed: int) -> Tensor:
    """``n`` rows of ``x`` ``(M, D)`` chosen by a permutation seeded by ``seed`` and ``M``."""
    if n >= x.shape[0]:
        return x
    gen = torch.Generator().manual_seed(seed)
    return x[torch.randperm(x.shape[0], generator=gen)[:n].to(x.device)]


def sliced_wasserstein(
    a: Tensor, b: Tensor, num_projections: int = 256, seed: int = 0
) -> float:
    r"""Sliced :math:`W_1` between two equal-size point clouds ``a``, ``b`` ``(M, D)``.

    :math:`\mathrm{SW}_1 = \frac{1}{L}\sum_{l=1}^{L} \frac{1}{M}\sum_{m}
    |(a\theta_l)_{(m)} - (b\theta_l)_{(m)}|` over ``L`` random unit directions :math:`\theta_l`
    (seeded), where :math:`(\cdot)_{(m)}` is the ``m``-th order statistic (exact 1-D OT).

    Example:
        >>> a = torch.randn(100, 3)
        >>> sliced_wasserstein(a, a), sliced_wasserstein(a, a + 1.0) > 0.5
        (0.0, True)
    """
    if a.dim() != 2 or a.shape != b.shape:
        raise ShapeError(
            f"a and b must both be (M, D) of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], num_projections, generator=gen, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(a.device)
    # (L, M) layout: each sort runs over a contiguous row
    pa = torch.sort(theta.T @ a.double().T, dim=-1).values
    pb = torch.sort(theta.T @ b.double().T, dim=-1).values
    return float((pa - pb).abs().mean())


def _patches(x: Tensor, patch_size: int, per_image: int | None, seed: int) -> Tensor:
    """Random ``patch_size`` patches, ``(N * per_image, C * patch_size**2)``.

    The patch positions depend only on ``(seed, x.shape)``: two inputs of equal shape are sampled
    at the same positions.
    """
    n = x.shape[0]
    cols = F.unfold(x, patch_size)  # (N, C*p*p, L)
    num = cols.shape[-1]
    if per_image is not None and per_image < num:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.rand(n, num, generator=gen).argsort(dim=1)[:, :per_image].to(x.device)
        cols = torch.gather(cols, 2, idx[:, None, :].expand(-1, cols.shape[1], -1))
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _normalize(fake: Tensor, real: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """Standardize descriptors per channel with the *real* set's mean and std."""
    r = real.view(real.shape[0], channels, -1)
    mean = r.mean(dim=(0, 2), keepdim=True)
    std = r.std(dim=(0, 2), keepdim=True).clamp_min(1e-8)
    norm = [((t.view(t.shape[0], channels, -1) - mean) / std).flatten(1) for t in (fake, real)]
    return norm[0], norm[1]


def swd_laplacian(
    fake: Tensor,
    real: Tensor,
    *,
    patch_size: int = 7,
    patches_per_image: int | None = 64,
    num_levels: int | None = None,
    min_resolution: int = 8,
    num_projections: int = 256,
    seed: int = 0,
) -> dict[str, float | list[float]]:
    """Multi-scale sliced Wasserstein distance of local patches (ProGAN's SWD metric).

    For each Laplacian-pyramid level (:func:`laplacian_pyramid`; by default as many levels as
    keep the coarsest at least ``min_resolution`` pixels), ``patches_per_image`` random
    ``patch_size x patch_size`` patches per image (``None``: all) are taken from both sets, both
    standardized per channel with the real set's mean and std (so a global contrast change *is*
    measured), subsampled to equal counts, and compared with :func:`sliced_wasserstein`.

    Args:
        fake: generated images ``(N, C, H, W)``.
        real: reference images ``(M, C, H, W)`` (held-out data).

    Returns:
        ``{"levels": [swd per level, finest first], "mean": average over levels}``. Lower is
        better; 0 for identical inputs.

    Example:
        >>> real = torch.rand(8, 1, 32, 32) * 2 - 1
        >>> out = swd_laplacian(real.flip(0)[:4] * 0.2, real)
        >>> len(out["levels"]), out["mean"] > 0.1
        (3, True)
    """
    _check_pair(fake, real)
    size = min(real.shape[-2:])
    if size < patch_size:
        raise ValueRangeError(f"images {tuple(real.shape[-2:])} smaller than patch {patch_size}")
    levels_n = num_levels if num_levels is not None else _default_levels(size, min_resolution)
    channels = real.shape[1]
    per_level: list[float] = []
    pyr_f = laplacian_pyramid(fake.float(), levels_n)
    pyr_r = laplacian_pyramid(real.float(), levels_n)
    for level, (lf, lr) in enumerate(zip(pyr_f, pyr_r)):
        if min(lr.shape[-2:]) < patch_size:
            break
        pf = _patches(lf, patch_size, patches_per_image, seed + level)
        pr = _patches(lr, patch_size, patches_per_image, seed + level)
        pf, pr = _normalize(pf, pr, channels)
        n = min(len(pf), len(pr))
        pf, pr = _subsample(pf, n, seed + 101), _subsample(pr, n, seed + 101)
        per_level.append(sliced_wasserstein(pf, pr, num_projections, seed=seed + level))
    return {"levels": per_level, "mean": sum(per_level) / len(per_level)}


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    r"""Frechet (2-Wasserstein) distance between :math:`N(\mu_1,\Sigma_1)` and
    :math:`N(\mu_2,\Sigma_2)`: :math:`\|\mu_1-\mu_2\|^2 + \operatorname{tr}\Sigma_1 +
    \operatorname{tr}\Sigma_2 - 2\operatorname{tr}(\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2})^{1/2}`.

    Computed in float64 through symmetric eigendecompositions (no complex ``sqrtm``).
    Shapes: ``mu (D,)``, ``sigma (D, D)``.

    Example:
        >>> eye = torch.eye(3)
        >>> round(frechet_distance(torch.zeros(3), eye, torch.ones(3), 4 * eye), 6)
        6.0
    """
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    if mu1.dim() != 1 or s1.shape != (mu1.shape[0],) * 2 or mu2.shape != mu1.shape \
            or s2.shape != s1.shape:
        raise ShapeError(
            f"expected mu (D,) and sigma (D, D) for both; got {tuple(mu1.shape)}, "
            f"{tuple(s1.shape)}, {tuple(mu2.shape)}, {tuple(s2.shape)}"
        )
    evals, evecs = torch.linalg.eigh((s1 + s1.T) / 2)
    sqrt_s1 = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    middle = sqrt_s1 @ s2 @ sqrt_s1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * trace_sqrt
    return float(value.clamp_min(0))


class DigitsClassifier(nn.Module):
    """A small CNN for 16x16 digits; :meth:`features` gives the 64-d penultimate activations.

    Shapes: ``(N, 1, 16, 16) -> logits (N, 10)``; ``features: -> (N, 64)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        )
        self.out = nn.Linear(64, 10)

    def features(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (16, 16):
            x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False,
                              antialias=True)
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x))


_CLASSIFIER_VERSION = "v1-epochs20-seed0"


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir if cache_dir is not None else os.environ.get("CTXPRED_CACHE", ".cache"))


def _train_digits_classifier(epochs: int = 20, seed: int = 0) -> DigitsClassifier:
    from reference_models.data import load_digits_with_labels

    x, y = load_digits_with_labels("train")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def digits_classifier(cache_dir: str | os.PathLike | None = None) -> DigitsClassifier:
    """The digits feature network, trained once (~seconds on a CPU) and cached.

    Weights are stored at ``<cache_dir>/digits_classifier_<hash>.pt`` (default ``cache_dir``:
    ``$CTXPRED_CACHE`` or ``.cache`` in the working directory; gitignored, never committed),
    written atomically (temporary file + rename). Training is deterministic (seed 0, one thread)
    on the train split of :func:`reference_models.data.load_digits_with_labels`.
    """
    tag = hashlib.sha1(_CLASSIFIER_VERSION.encode()).hexdigest()[:8]
    path = _cache_dir(cache_dir) / f"digits_classifier_{tag}.pt"
    model = DigitsClassifier()
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights whatever the caller's thread count (the cache
    try:  # name cannot tell builds apart: 2 threads moved fd_digits by ~1.7%)
        model = _train_digits_classifier()
    finally:
        torch.set_num_threads(threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model


@torch.no_grad()
def _feature_stats(model: DigitsClassifier, x: Tensor) -> tuple[Tensor, Tensor]:
    feats = torch.cat([model.features(chunk) for chunk in x.float().cpu().split(512)]).double()
    mu = feats.mean(0)
    centered = feats - mu
    return mu, centered.T @ centered / max(len(feats) - 1, 1)


def frechet_digits_distance(
    fake: Tensor, real: Tensor, classifier: DigitsClassifier | None = None
) -> float:
    """Frechet distance between ``fake`` and ``real`` ``(N, 1, H, W)`` in digits-CNN features.

    Images are resized to 16x16 if needed; features are the 64-d penultimate activations of
    :func:`digits_classifier`. Lower is better; 0 for identical sets.
    """
    _check_pair(fake, real)
    if fake.shape[1] != 1:
        raise ShapeError(f"the digits classifier takes 1 channel, got {fake.shape[1]}")
    model = classifier if classifier is not None else digits_classifier()
    return frechet_distance(*_feature_stats(model, fake), *_feature_stats(model, real))


def _pairs(x: Tensor, dy: int, dx: int) -> Tensor:
    """All ``(x[i], x[i + (dy, dx)])`` pairs inside the grid, per channel: ``(M, 2)``."""
    h, w = x.shape[-2:]
    y0, y1 = max(0, -dy), h - max(0, dy)
    x0, x1 = max(0, -dx), w - max(0, dx)
    centre = x[:, :, y0:y1, x0:x1]
    other = x[:, :, y0 + dy:y1 + dy, x0 + dx:x1 + dx]
    return torch.stack([centre.reshape(-1), other.reshape(-1)], dim=1)


def neighborhood_discrepancy(
    fake: Tensor,
    real: Tensor,
    strides: Sequence[int] = (1, 2, 3),
    *,
    max_pairs: int = 8192,
    num_projections: int = 64,
    seed: int = 0,
) -> dict[str, float | dict[int, float]]:
    """Discrepancy of the joint ``(pixel, neighbor)`` distribution at each stride.

    For stride ``s`` and each of the four neighbor directions ``(0, s), (s, 0), (s, s), (s, -s)``
    (the other four of the 3x3 ring give the same pairs mirrored), all in-grid pairs
    ``(x[i], x[i + offset])`` of both sets form 2-D point clouds (channels pooled); at most
    ``max_pairs`` are kept (seeded), and their sliced :math:`W_1` (:func:`sliced_wasserstein`)
    is averaged over the four directions. This is the local statistic context prediction targets.

    Returns:
        ``{"strides": {s: value}, "mean": average over strides}``; 0 for identical inputs.

    Example:
        >>> real = torch.rand(4, 1, 16, 16) * 2 - 1
        >>> smooth = F.avg_pool2d(real, 3, stride=1, padding=1)
        >>> out = neighborhood_discrepancy(smooth, real)
        >>> sorted(out["strides"]), out["mean"] > 0.05
        ([1, 2, 3], True)
    """
    _check_pair(fake, real)
    per_stride: dict[int, float] = {}
    for s in strides:
        if s < 1 or s >= min(real.shape[-2:]):
            raise ValueRangeError(f"stride {s} must be in [1, {min(real.shape[-2:]) - 1}]")
        values = []
        for k, (dy, dx) in enumerate(((0, s), (s, 0), (s, s), (s, -s))):
            pf, pr = _pairs(fake.float(), dy, dx), _pairs(real.float(), dy, dx)
            n = min(len(pf), len(pr), max_pairs)
            pf, pr = _subsample(pf, n, seed + k), _subsample(pr, n, seed + k)
            values.append(sliced_wasserstein(pf, pr, num_projections, seed=seed + s))
        per_stride[int(s)] = sum(values) / len(values)
    return {"strides": per_stride, "mean": sum(per_stride.values()) / len(per_stride)}


def inpainting_metrics(
    prediction: Tensor,
    target: Tensor,
    known_mask: Tensor,
    *,
    patch_size: int = 7,
    max_patches: int = 8192,
    num_projections: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    r"""Inpainting quality inside the hole: masked MSE and masked patch SWD.

    ``known_mask`` ``(N, 1, H, W)`` (bool, or float in {0, 1}) is ``True`` where pixels were given
    to the sampler; the hole is its complement.

    * ``masked_mse`` :math:`= \sum (1-m)\,(\hat x - x)^2 / (C\sum(1-m))`;
    * ``masked_swd``: sliced :math:`W_1` between the ``patch_size`` patches of ``prediction`` and
      of ``target`` whose centre lies in the hole (same positions in both, at most
      ``max_patches`` of them, seeded; standardized with the target's statistics).

    Example:
        >>> x = torch.rand(2, 1, 16, 16) * 2 - 1
        >>> m = torch.ones(2, 1, 16, 16, dtype=torch.bool); m[:, :, 4:12, 4:12] = False
        >>> inpainting_metrics(x, x, m)
        {'masked_mse': 0.0, 'masked_swd': 0.0}
    """
    _check_pair(prediction, target)
    if known_mask.shape != (target.shape[0], 1, *target.shape[-2:]):
        raise ShapeError(
            f"known_mask must be (N, 1, H, W) = {(target.shape[0], 1, *target.shape[-2:])}, "
            f"got {tuple(known_mask.shape)}"
        )
    hole = (~known_mask.bool()).float()
    channels = target.shape[1]
    denom = hole.sum() * channels
    if float(denom) == 0:
        raise ValueRangeError("known_mask has no hole (every pixel is known)")
    mse = float(((prediction.float() - target.float()).square() * hole).sum() / denom)
    pad = patch_size // 2
    cols_p = F.unfold(F.pad(prediction.float(), (pad,) * 4, mode="reflect"), patch_size)
    cols_t = F.unfold(F.pad(target.float(), (pad,) * 4, mode="reflect"), patch_size)
    centres = hole.flatten(1).bool()  # (N, H*W): one unfold column per pixel
    pp = cols_p.transpose(1, 2)[centres]
    pt = cols_t.transpose(1, 2)[centres]
    pp, pt = _subsample(pp, max_patches, seed), _subsample(pt, max_patches, seed)
    pp, pt = _normalize(pp, pt, channels)
    return {"masked_mse": mse, "masked_swd": sliced_wasserstein(pp, pt, num_projections, seed)}
