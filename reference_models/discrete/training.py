"""Training of the discrete reference model, with or without token-context prediction.

One call, :func:`train`, builds everything from a :class:`DiscreteConfig`: the tokenizer (fitted
with a fixed seed, so runs that differ only in ``seed`` / ``context`` share it), the token data,
the :class:`~reference_models.discrete.denoiser.TokenTransformer`, the
:class:`~reference_models.discrete.diffusion.MaskAndReplaceDiffusion` objective and, when
``context=True``, the context predictor attached through the public ctxpred API:

.. code-block:: python

    loss_fn = ctxpred.ContextPredictionLoss(
        ctxpred.TokenNeighborhood(strides=(1, 2, 3), grid_shape=(h, w)),
        ctxpred.CategoricalHead(V, in_channels=C, codebook=tokenizer.codebook,
                                num_samples=Q, num_strides=3),
        weight=lam, points=...)
    predictor = ctxpred.attach(model, {"norm": loss_fn})   # token features (B, L, C)
    total = diffusion_loss + predictor.loss(target=x0_ids)   # neighbors of x_0, (B, L) ids

The categorical head predicts, per token and stride, a distribution over the codebook; ``Q``
Gumbel-softmax samples of it, embedded with the codebook, are compared with the embeddings of
the valid neighbor tokens of ``x_0`` by the Sinkhorn estimator (ground cost: squared distance
between codebook embeddings). The heads live outside the model, are saved under their own key
of the checkpoint and are dropped for sampling.

Conveniences: seeds (model init, batches, diffusion noise), a tqdm progress bar, atomic
resumable checkpoints (temporary file + ``os.replace``; a run restarted with the same path and
config continues where it stopped; on the CPU bit-identically, on a GPU the corruption noise
comes from the device generator and is not part of the checkpoint).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

import ctxpred
from ctxpred.errors import ValueRangeError
from reference_models.discrete.denoiser import TokenTransformer
from reference_models.discrete.diffusion import MaskAndReplaceDiffusion
from reference_models.discrete.tokenizers import (
    IntensityTokenizer,
    PatchKMeansTokenizer,
    Tokenizer,
    tokenizer_from_state,
)

__all__ = [
    "DiscreteConfig",
    "TrainResult",
    "atomic_save",
    "build_context_predictor",
    "build_tokenizer",
    "generate",
    "load_images",
    "train",
]


@dataclass
class DiscreteConfig:
    """Everything a discrete reference run depends on (stored in its checkpoint).

    Attributes:
        dataset: ``"digits"`` (native 8x8, 17 intensity tokens, ``L = 64``) or ``"textures"``
            (``image_size`` crops, k-means codebook of ``vocab_size`` ``patch_size``-patches).
        image_size: texture crop side (digits are always tokenized at their native 8x8).
        vocab_size, patch_size, tokenizer_samples: the texture codebook.
        train_samples: training images (``None``: the dataset default).
        num_steps: diffusion steps ``T``; ``gamma_bar_T``: final mask share (see
            :class:`~reference_models.discrete.diffusion.MaskAndReplaceDiffusion`).
        objective, ce_weight: the diffusion objective.
        dim, depth, heads: transformer size.
        batch_size, train_steps, lr, warmup, grad_clip: optimization (AdamW, linear warmup then
            cosine decay to 10%).
        context: attach token-context prediction.
        context_weight: ``lambda``.
        context_strides: strides of the token neighborhoods.
        context_samples: ``Q``, Gumbel-softmax samples per point and stride.
        context_points: query points per image and step (``None``: all).
        context_layer: the hooked submodule (``"norm"``: the final token features).
        seed: model init, batch order and diffusion noise.
        checkpoint_every: steps between checkpoints (when a path is given).
    """

    dataset: Literal["digits", "textures"] = "digits"
    image_size: int = 32
    vocab_size: int = 64
    patch_size: int = 4
    tokenizer_samples: int = 1024
    train_samples: int | None = None
    num_steps: int = 100
    gamma_bar_T: float = 0.9
    objective: Literal["hybrid", "vb", "ce"] = "hybrid"
    ce_weight: float = 1.0
    dim: int = 64
    depth: int = 2
    heads: int = 4
    batch_size: int = 64
    train_steps: int = 1000
    lr: float = 1e-3
    warmup: int = 50
    grad_clip: float = 1.0
    context: bool = False
    context_weight: float = 0.1
    context_strides: tuple[int, ...] = (1, 2, 3)
    context_samples: int = 8
    context_points: int | float | None = 8
    context_layer: str = "norm"
    seed: int = 0
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        if self.dataset not in ("digits", "textures"):
            raise ValueRangeError(f"dataset must be 'digits' or 'textures', got {self.dataset!r}")
        self.context_strides = tuple(int(s) for s in self.context_strides)
        for name in ("train_steps", "batch_size", "num_steps", "dim", "depth", "heads"):
            if getattr(self, name) < 1:
                raise ValueRangeError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model and what is needed to sample and decode."""

    model: TokenTransformer
    diffusion: MaskAndReplaceDiffusion
    tokenizer: Tokenizer
    config: DiscreteConfig
    history: list[dict[str, float]]
    heads: torch.nn.Module | None = None


def load_images(config: DiscreteConfig, split: Literal["train", "test"],
                num_samples: int | None = None, seed: int = 0) -> Tensor:
    """The images ``(N, 1, H, W)`` in ``[-1, 1]`` a config trains / is evaluated on.

    Digits come at their native 8x8 size (exactly 17 levels); textures as ``image_size`` crops.
    """
    from reference_models.data import load_dataset

    if config.dataset == "digits":
        return load_dataset("digits", split, num_samples=num_samples, image_size=8, seed=seed)
    return load_dataset("textures", split, num_samples=num_samples,
                        image_size=config.image_size, seed=seed)


def build_tokenizer(config: DiscreteConfig) -> Tokenizer:
    """The config's tokenizer; the texture codebook is fitted with seed 0 on train crops."""
    if config.dataset == "digits":
        return IntensityTokenizer(17)
    images = load_images(config, "train", num_samples=config.tokenizer_samples, seed=12345)
    return PatchKMeansTokenizer.fit(images, config.vocab_size, config.patch_size, seed=0)


def build_context_predictor(
    model: TokenTransformer, tokenizer: Tokenizer, config: DiscreteConfig
) -> ctxpred.ContextPredictor:
    """Attach token-context prediction to ``model`` (public ctxpred API only)."""
    neighborhood = ctxpred.TokenNeighborhood(strides=config.context_strides,
                                             grid_shape=model.grid_shape)
    head = ctxpred.CategoricalHead(
        tokenizer.vocab_size, in_channels=model.dim, codebook=tokenizer.codebook,
        num_samples=config.context_samples, num_strides=len(config.context_strides),
    )
    loss_fn = ctxpred.ContextPredictionLoss(
        neighborhood, head, estimator="sinkhorn", weight=config.context_weight,
        points=config.context_points,
    )
    return ctxpred.attach(model, {config.context_layer: loss_fn})


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _lr_factor(step: int, config: DiscreteConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.train_steps - config.warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _config_key(config: DiscreteConfig) -> dict[str, Any]:
    key = dataclasses.asdict(config)
    key.pop("checkpoint_every")
    return key


def train(
    config: DiscreteConfig,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    tokenizer: Tokenizer | None = None,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> TrainResult:
    """Train the discrete reference model; resumes from ``checkpoint`` if it exists.

    Args:
        config: the run.
        checkpoint: path of the resumable checkpoint (written every ``checkpoint_every`` steps
            and at the end, atomically); ``None``: no checkpoint.
        tokenizer: a fitted tokenizer to reuse (default: :func:`build_tokenizer`).
        progress: show a tqdm bar.
        device: where to train.

    Returns:
        :class:`TrainResult` (the model is in eval mode, hooks removed).
    """
    from tqdm.auto import tqdm

    state: dict[str, Any] | None = None
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        want = _config_key(config)
        if state["config"] != want:
            differ = sorted(k for k in want if state["config"].get(k) != want[k])
            raise ValueRangeError(
                f"checkpoint {checkpoint} was written for another config (differing keys: "
                f"{differ}); delete it or use another path"
            )
        tokenizer = tokenizer_from_state(state["tokenizer"])
    if tokenizer is None:
        tokenizer = build_tokenizer(config)

    images = load_images(config, "train", num_samples=config.train_samples)
    tokens = tokenizer.encode(images).flatten(1).to(device)  # (N, L)
    grid = tokenizer.grid_shape(*images.shape[-2:])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = TokenTransformer(tokenizer.vocab_size, grid, dim=config.dim,
                                 depth=config.depth, heads=config.heads).to(device)
        predictor = build_context_predictor(model, tokenizer, config) if config.context else None
    diffusion = MaskAndReplaceDiffusion(
        tokenizer.vocab_size, config.num_steps, gamma_bar_T=config.gamma_bar_T,
        objective=config.objective, ce_weight=config.ce_weight,
    ).to(device)
    if predictor is not None:
        predictor.to(device)
    params = list(model.parameters())
    if predictor is not None:
        params += list(predictor.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    gen = torch.Generator(device="cpu").manual_seed(config.seed + 1)
    step, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        if predictor is not None:
            predictor.heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, history = state["step"], state["history"]

    def save(step: int) -> None:
        if checkpoint is None:
            return
        atomic_save({
            "global_rng": torch.get_rng_state(),
            "config": _config_key(config), "step": step, "history": history,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "heads": None if predictor is None else predictor.heads.state_dict(),
            "generator": gen.get_state(), "tokenizer": tokenizer.state(),
        }, checkpoint)

    model.train()
    bar = tqdm(total=config.train_steps, initial=step, disable=not progress,
               desc=f"discrete {config.dataset} ctx={config.context} seed={config.seed}")
    # ctxpred draws its query points and Gumbel noise from the global generator: seed it (inside
    # fork_rng, so the caller's stream is untouched) and keep its state in the checkpoint.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 2)
        if state is not None:
            torch.set_rng_state(state["global_rng"])
        try:
            while step < config.train_steps:
                idx = torch.randint(0, tokens.shape[0], (config.batch_size,), generator=gen)
                x0 = tokens[idx.to(device)]
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * _lr_factor(step, config)
                noise_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
                noise_gen = torch.Generator(device="cpu").manual_seed(noise_seed)
                t = torch.randint(1, config.num_steps + 1, (config.batch_size,),
                                  generator=noise_gen)
                # the corruption noise from a generator of its own on every device: on an
                # accelerator the global one is also ctxpred's (query points, Gumbel noise), so
                # a context arm would see other x_t than its baseline from the second step on
                q_gen = noise_gen if torch.device(device).type == "cpu" else torch.Generator(
                    device=device).manual_seed(noise_seed)
                out = diffusion.loss(model, x0, t.to(device), generator=q_gen)
                total, ctx = out.loss, torch.zeros(())
                if predictor is not None:
                    ctx = predictor.loss(target=x0)
                    total = total + ctx
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                step += 1
                record = {"step": step, "loss": float(out.loss.detach()),
                          "vb": float(out.vb.detach()), "ce": float(out.ce.detach()),
                          "context": float(ctx.detach())}
                history.append(record)
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", ctx=f"{record['context']:.3f}")
                if step % config.checkpoint_every == 0 or step == config.train_steps:
                    save(step)
        finally:
            bar.close()
            if predictor is not None:
                predictor.remove()  # the context decoder is dropped: sampling runs the model alone
    model.eval()
    return TrainResult(model, diffusion, tokenizer, config, history,
                       None if predictor is None else predictor.heads)


@torch.no_grad()
def generate(
    result: TrainResult,
    num_samples: int,
    *,
    num_steps: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> Tensor:
    """Sample token grids and decode them: images ``(num_samples, 1, H, W)`` in ``[-1, 1]``."""
    model, diffusion, tok = result.model, result.diffusion, result.tokenizer
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    chunks: list[Tensor] = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        ids = diffusion.sample(model, n, model.seq_len, num_steps=num_steps, generator=gen,
                               device=device)
        chunks.append(tok.decode(ids.view(n, *model.grid_shape)).clamp(-1, 1))
    return torch.cat(chunks).cpu()


def upsample_like_data(images: Tensor, size: int) -> Tensor:
    """Bilinear resize as :mod:`reference_models.data` does it (digits 8x8 -> 16x16)."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear",
                         align_corners=False).clamp(-1, 1)


