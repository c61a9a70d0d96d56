"""Training loop of the continuous reference model, with optional context prediction.

Context prediction goes through ctxpred's public API only, as an outside user would write it::

    losses = {name: ctxpred.ContextPredictionLoss(
                  ctxpred.PixelNeighborhood(strides=(1, 2, 3)),
                  ctxpred.GaussianSamplingHead(out_channels=1, in_channels=unet_channels[name],
                                               num_strides=3),
                  estimator="sinkhorn", weight=0.1, points=64)
              for name in ("up_blocks.1", "up_blocks.2")}          # decoder blocks
    predictor = ctxpred.attach(unet, losses)
    point_loss = diffusion.loss(unet, x0)                           # hooks capture the blocks
    loss = point_loss + predictor.loss(target=x0)                   # context of the clean image

The heads are optimized with the UNet but live outside it: the EMA copy, the UNet's
``state_dict`` and the samplers never see them (zero inference cost).

Checkpoints (:meth:`Trainer.save_checkpoint`) hold the UNet, EMA, heads, optimizer, step, every
random-number-generator state and the loss history, and are written atomically (temporary file +
``os.replace``); :meth:`Trainer.train` writes one every ``checkpoint_every`` steps when given a
path, so an interrupted run loses at most the steps since the last one, and a resumed run
continues exactly as the uninterrupted run would have (same device and thread count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

import ctxpred
from ctxpred.errors import ValueRangeError
from reference_models.continuous.diffusion import GaussianDiffusion, Prediction
from reference_models.continuous.ema import EMA
from reference_models.continuous.unet import UNet
from reference_models.data import load_dataset

__all__ = ["ContextConfig", "TrainConfig", "Trainer", "build_context_losses"]

#: Config fields that may change when a run is resumed (length, logging, device).
_RESUMABLE = frozenset({"steps", "log_every", "checkpoint_every", "device", "diagnostic_every"})


@dataclass
class ContextConfig:
    """How context prediction is attached (see the module docstring).

    The defaults are the configuration the quality study confirmed (``px-l0.3-snr`` in
    ``benchmarks/quality.py``; ``docs/results/quality.md``): clean-pixel targets of the two
    finest decoder blocks, strides (1, 2, 3), a Gaussian head with Q = 8, Sinkhorn,
    ``lambda = 0.3``, 32 query points, and the context loss weighted towards low noise
    (``timestep_weighting="snr"``). Until 2026-11-30 they were ``weight=0.1``, ``points=64``,
    ``timestep_weighting="none"``.

    Attributes:
        layers: modules to hook (names in ``unet.named_modules()``: decoder blocks
            ``"up_blocks.j"`` or any submodule, see :func:`layer_channels`); ``None``: the two
            finest decoder blocks.
        strides: neighborhood strides ``S``.
        head: ``"gaussian"`` (distributional head + Wasserstein estimator, the method) or
            ``"naive"`` (one linear prediction per neighbor slot + MSE, the baseline decoder).
        estimator: Wasserstein estimator name for the Gaussian head.
        weight: ``lambda`` of each layer's loss.
        points: query points per image and step (count, fraction or ``None`` for all).
        num_samples: ``Q`` of the Gaussian head.
        latent_dim: latent size of the Gaussian head.
        hidden_channels: width of the Gaussian head's decoder MLP; ``None``: a linear decoder.
        target: ``"pixels"`` (the clean image, resized to each layer's grid) or
            ``"features"`` (the feature context: each layer predicts its own multi-stride
            features, :class:`ctxpred.FeatureNeighborhood` with its default scale-free
            normalization; the head's ``out_channels`` is the layer's channel count).
        timestep_weighting: per-sample weight of the context loss by the sample's timestep
            ``t`` (passed as ``sample_weight`` to ``predictor.loss``), normalized to mean 1
            over uniform ``t`` so that ``weight`` keeps its meaning: ``"none"`` (1),
            ``"snr"`` (``abar_t / mean(abar)``, i.e. ``SNR / (1 + SNR)``: about 1 at low noise,
            0 at high noise, where the clean neighborhood cannot be predicted from ``x_t``) or
            ``"cutoff"`` (context only for ``t < t_cutoff * T``, scaled by
            ``T / #{t < t_cutoff * T}``).
        t_cutoff: fraction of the timesteps that keep the context loss with ``"cutoff"``.
        match_mask: mask the Gaussian head's samples like their targets (needs
            ``num_samples == 8``, the ring size; makes ``estimator="exact"`` a batched
            assignment), see :class:`ctxpred.ContextPredictionLoss`.
    """

    layers: tuple[str, ...] | None = None
    strides: tuple[int, ...] = (1, 2, 3)
    head: Literal["gaussian", "naive"] = "gaussian"
    estimator: str = "sinkhorn"
    weight: float = 0.3
    points: int | float | None = 32
    num_samples: int = 8
    latent_dim: int = 16
    hidden_channels: int | None = 64
    match_mask: bool = False
    target: Literal["pixels", "features"] = "pixels"
    timestep_weighting: Literal["none", "snr", "cutoff"] = "snr"
    t_cutoff: float = 0.5

    def __post_init__(self) -> None:
        # a typo must fail here, not at the first training step (or, worse, silently)
        for name, allowed in (("head", ("gaussian", "naive")), ("target", ("pixels", "features")),
                              ("timestep_weighting", ("none", "snr", "cutoff"))):
            if getattr(self, name) not in allowed:
                raise ValueRangeError(f"ContextConfig.{name} must be one of {allowed}, got "
                                      f"{getattr(self, name)!r}")
        if not 0.0 < self.t_cutoff <= 1.0:
            raise ValueRangeError(f"ContextConfig.t_cutoff must be in (0, 1], got {self.t_cutoff}")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint).

    ``flip``: random horizontal flips of the training images; ``None`` means on, except for
    ``"digits"`` (a mirrored digit is not a digit).

    ``diagnostic_every``: every that many steps the trainer measures the
    gradient-norm ratio ``||d(context)/dh|| / ||d(point)/dh||`` at the hooked layers' outputs
    ``h`` (see :meth:`Trainer.gradient_ratio`); ``0`` never.
    """

    dataset: str = "textures"
    image_size: int | None = None
    num_train_images: int | None = None
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-4
    warmup_steps: int = 50
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    num_timesteps: int = 1000
    prediction: Prediction = "eps"
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    dropout: float = 0.0
    flip: bool | None = None
    seed: int = 0
    device: str = "cpu"
    log_every: int = 25
    checkpoint_every: int = 200
    diagnostic_every: int = 50
    context: ContextConfig | None = field(default=None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of ``dataclasses.asdict`` (tuples and the nested context restored)."""
        data = dict(data)
        ctx = data.pop("context", None)
        for key in ("channel_mults",):
            data[key] = tuple(data[key])
        config = cls(**data)
        if ctx is not None:
            ctx = dict(ctx)
            ctx["strides"] = tuple(ctx["strides"])
            ctx["layers"] = None if ctx["layers"] is None else tuple(ctx["layers"])
            config.context = ContextConfig(**ctx)
        return config


def build_context_losses(
    unet: UNet, context: ContextConfig, image_channels: int
) -> dict[str, ctxpred.ContextPredictionLoss]:
    """``{decoder block name: ContextPredictionLoss}`` for :func:`ctxpred.attach`.

    Example:
        >>> net = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2))
        >>> losses = build_context_losses(net, ContextConfig(), image_channels=1)
        >>> sorted(losses), type(losses["up_blocks.1"].head).__name__
        (['up_blocks.0', 'up_blocks.1'], 'GaussianSamplingHead')
    """
    decoder = unet.decoder_channels()
    layers = context.layers if context.layers is not None else tuple(decoder)[-2:]
    channels = layer_channels(unet, layers)
    num_strides = len(context.strides)
    if context.target not in ("pixels", "features"):
        raise ValueRangeError(f"target must be 'pixels' or 'features', got {context.target!r}")
    losses = {}
    for name in layers:
        out_channels = image_channels if context.target == "pixels" else channels[name]
        if context.head == "gaussian":
            head: ctxpred.ContextHead = ctxpred.GaussianSamplingHead(
                out_channels=out_channels, in_channels=channels[name],
                num_samples=context.num_samples, latent_dim=context.latent_dim,
                hidden_channels=context.hidden_channels, num_strides=num_strides,
            )
        elif context.head == "naive":
            head = ctxpred.NaiveHead(out_channels=out_channels, num_slots=8,
                                     in_channels=channels[name], num_strides=num_strides)
        else:
            raise ValueRangeError(f"head must be 'gaussian' or 'naive', got {context.head!r}")
        neighborhood = (ctxpred.PixelNeighborhood(strides=context.strides)
                        if context.target == "pixels"
                        else ctxpred.FeatureNeighborhood(strides=context.strides))
        sampling = {"estimator": context.estimator, "match_mask": context.match_mask} \
            if head.uses_estimator else {}  # the naive head compares slot by slot
        losses[name] = ctxpred.ContextPredictionLoss(
            neighborhood, head, weight=context.weight, points=context.points, **sampling,
        )
    return losses


def layer_channels(unet: UNet, layers: tuple[str, ...]) -> dict[str, int]:
    """``{name: output channels}`` of modules of ``unet`` (decoder blocks or any submodule,
    e.g. ``"up_blocks.2.res.0.conv2"``, the last convolution before the output), found by one
    small forward pass without gradients.

    Raises:
        ValueRangeError: a name that is not a submodule (the message lists the decoder blocks).

    Example:
        >>> net = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2))
        >>> layer_channels(net, ("up_blocks.1", "up_blocks.1.res.0.conv2"))
        {'up_blocks.1': 8, 'up_blocks.1.res.0.conv2': 8}
    """
    modules = dict(unet.named_modules())
    unknown = [name for name in layers if name not in modules or name == ""]
    if unknown:
        raise ValueRangeError(
            f"unknown layers {unknown}; the UNet's decoder blocks are "
            f"{list(unet.decoder_channels())} (any name of unet.named_modules() works)"
        )
    found: dict[str, int] = {}
    handles = [
        modules[name].register_forward_hook(
            lambda _m, _a, out, name=name: found.__setitem__(name, int(out.shape[1])))
        for name in layers
    ]
    size = 2 ** (unet.num_levels - 1) * 2
    param = next(unet.parameters())
    was_training = unet.training
    unet.eval()
    try:
        with torch.no_grad():
            unet(torch.zeros(1, unet.in_channels, size, size, device=param.device),
                 torch.zeros(1, dtype=torch.long, device=param.device))
    finally:
        for h in handles:
            h.remove()
        unet.train(was_training)
    return {name: found[name] for name in layers}


class Trainer:
    """Builds data, UNet, EMA, diffusion, (optional) context heads and optimizer from a config.

    Args:
        config: the run's :class:`TrainConfig`.
        checkpoint: path of the run's checkpoint; if the file exists, training resumes from it.
        train_images: optional ``(N, C, H, W)`` tensor in ``[-1, 1]`` instead of the dataset.

    Example:
        >>> cfg = TrainConfig(dataset="digits", steps=2, batch_size=4, base_channels=8,
        ...                   channel_mults=(1, 2), num_timesteps=50, context=ContextConfig())
        >>> trainer = Trainer(cfg)
        >>> history = trainer.train(progress=False)
        >>> trainer.step, sorted(history[-1])
        (2, ['context_loss', 'grad_ratio', 'point_loss', 'step', 'time'])
        >>> trainer.sample(2, num_steps=2).shape
        torch.Size([2, 1, 16, 16])
    """

    def __init__(
        self,
        config: TrainConfig,
        checkpoint: str | os.PathLike | None = None,
        train_images: Tensor | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(config.device)
        if train_images is None:
            train_images = load_dataset(config.dataset, "train", image_size=config.image_size,
                                        num_samples=config.num_train_images, seed=config.seed)
        self.data = train_images.to(self.device)
        channels = self.data.shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = UNet(channels, config.base_channels, config.channel_mults,
                              config.num_res_blocks, dropout=config.dropout).to(self.device)
            self.ema = EMA(self.model, config.ema_decay)  # before attach: no hooks, no heads
            self.predictor: ctxpred.ContextPredictor | None = None
            if config.context is not None:
                losses = build_context_losses(self.model, config.context, channels)
                self.predictor = ctxpred.attach(self.model, losses).to(self.device)
        self.diffusion = GaussianDiffusion(config.num_timesteps, config.prediction).to(self.device)
        params = list(self.model.parameters())
        if self.predictor is not None:
            params += list(self.predictor.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        # the global RNGs (dropout, ctxpred's point subsets and head noise) are owned per trainer
        with torch.random.fork_rng(devices=self._cuda_devices()):
            torch.manual_seed(config.seed + 2)
            self._rng_state = self._get_global_rng()
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        if self.checkpoint is not None and self.checkpoint.exists():
            self.load_checkpoint(self.checkpoint)

    # -- random-number generators ---------------------------------------------------------------
    def _cuda_devices(self) -> list[int]:
        if self.device.type == "cuda":
            return [self.device.index if self.device.index is not None
                    else torch.cuda.current_device()]
        return []

    def _get_global_rng(self) -> dict[str, Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_global_rng(self, state: dict[str, Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self._cuda_devices()):
            self._set_global_rng(self._rng_state)
            yield
            self._rng_state = self._get_global_rng()

    @contextlib.contextmanager
    def _context_rng(self) -> Iterator[None]:
        """With dropout, the context term draws its random numbers (query points, head noise)
        from a stream of its own, seeded by the run's seed and the step (no state to
        checkpoint): drawn from the owned stream, they would shift the dropout masks of later
        steps, which the baseline arm does not see, and unpair the arms. Without dropout
        nothing else draws from the owned stream, which it then keeps using, as before."""
        if self.config.dropout == 0:
            yield
            return
        with torch.random.fork_rng(devices=self._cuda_devices()):
            torch.manual_seed((self.config.seed + 3) * 1_000_003 + self.step)
            yield

    # -- training ------------------------------------------------------------------------------
    def _batch(self) -> Tensor:
        idx = torch.randint(0, len(self.data), (self.config.batch_size,), generator=self.generator)
        x0 = self.data[idx.to(self.device)]
        flip_enabled = self.config.flip
        if flip_enabled is None:
            flip_enabled = self.config.dataset != "digits"
        if flip_enabled:
            flip = torch.rand(len(idx), generator=self.generator) < 0.5
            x0 = torch.where(flip.to(self.device)[:, None, None, None], x0.flip(-1), x0)
        return x0

    def gradient_ratio(self, point: Tensor, context: Tensor, features: list[Tensor]) -> Tensor:
        """``||d context / d h|| / ||d point / d h||`` over the hooked outputs ``h`` (a 0-d
        tensor; the norms are taken over all hooked layers together).

        ``context`` is the weighted context loss (``lambda`` included), ``point`` the denoising
        loss, both before backward (their graphs are kept). The ratio says how strongly the
        context term pulls on the features compared with the denoising loss: about ``0.1-1``
        means it matters without dominating; it scales linearly with ``lambda``, so
        ``lambda_new = lambda * r_wanted / r`` retunes it from one measurement.
        """
        gp = torch.autograd.grad(point, features, retain_graph=True, allow_unused=True)
        gc = torch.autograd.grad(context, features, retain_graph=True, allow_unused=True)

        def norm(grads: tuple[Tensor | None, ...]) -> Tensor:
            parts = [g.float().pow(2).sum() for g in grads if g is not None]
            return torch.stack(parts).sum().sqrt() if parts else point.new_zeros(())

        return norm(gc) / norm(gp).clamp_min(1e-30)

    def _draw(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """Timesteps ``(B,)`` and noise like ``x0``, from the run's generator (the same draws,
        in the same order, as :meth:`GaussianDiffusion.loss` makes)."""
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],),
                          generator=self.generator, device="cpu").to(x0.device)
        noise = torch.randn(x0.shape, generator=self.generator, device="cpu").to(x0)
        return t, noise

    def context_sample_weight(self, t: Tensor) -> Tensor | None:
        """Per-sample weight ``(B,)`` of the context loss for timesteps ``t`` ``(B,)`` (see
        ``ContextConfig.timestep_weighting``); ``None`` for ``"none"``.

        Example:
            >>> cfg = TrainConfig(dataset="digits", num_train_images=8, base_channels=8,
            ...                   channel_mults=(1, 2), num_timesteps=10,
            ...                   context=ContextConfig(timestep_weighting="cutoff",
            ...                                         t_cutoff=0.5))
            >>> Trainer(cfg).context_sample_weight(torch.tensor([0, 4, 5, 9])).tolist()
            [2.0, 2.0, 0.0, 0.0]
        """
        ctx = self.config.context
        if ctx is None or ctx.timestep_weighting == "none":
            return None
        abar = self.diffusion.alphas_cumprod.to(t.device)
        if ctx.timestep_weighting == "snr":
            return (abar / abar.mean())[t].float()
        if ctx.timestep_weighting == "cutoff":
            if not 0.0 < ctx.t_cutoff <= 1.0:
                raise ValueRangeError(f"t_cutoff must be in (0, 1], got {ctx.t_cutoff}")
            keep = torch.arange(len(abar), device=t.device) < ctx.t_cutoff * len(abar)
            return (keep.float() * (len(abar) / keep.sum().clamp_min(1)))[t]
        raise ValueRangeError(
            f"timestep_weighting must be 'none', 'snr' or 'cutoff', got "
            f"{ctx.timestep_weighting!r}"
        )

    def train_step(self) -> tuple[Tensor, Tensor, Tensor]:
        """One optimizer step; returns detached ``(point_loss, context_loss, grad_ratio)``
        (context 0 without context prediction; grad_ratio ``nan`` unless measured this step,
        see ``TrainConfig.diagnostic_every``).

        The batch, timesteps and noise come only from the run's generator, so every arm of a
        paired comparison (same seed) sees the same data order and noise.
        """
        cfg = self.config
        self.model.train()
        lr = cfg.lr * min(1.0, (self.step + 1) / max(1, cfg.warmup_steps))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ratio = torch.full((), float("nan"), device=self.device)
        with self._own_rng():
            x0 = self._batch()
            t, noise = self._draw(x0)
            point = self.diffusion.loss(self.model, x0, t=t, noise=noise)
            if self.predictor is not None:
                every = cfg.diagnostic_every
                measure = every > 0 and (self.step + 1) % every == 0
                features = list(self.predictor.captured.values()) if measure else []
                target = x0 if cfg.context.target == "pixels" else None
                with self._context_rng():
                    context = self.predictor.loss(target=target,
                                                  sample_weight=self.context_sample_weight(t))
                if measure:
                    ratio = self.gradient_ratio(point, context, features).detach()
            else:
                context = torch.zeros((), device=self.device)
            self.optimizer.zero_grad(set_to_none=True)
            (point + context).backward()
            if cfg.grad_clip > 0:
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1
        return point.detach(), context.detach(), ratio

    def train(self, steps: int | None = None, progress: bool = True) -> list[dict[str, float]]:
        """Train until ``steps`` (default ``config.steps``) total steps; returns the history.

        Every ``log_every`` steps one record per step is appended to :attr:`history` (``step``,
        ``point_loss``, ``context_loss``, ``time`` = wall seconds of training so far) and shown
        in the tqdm bar; a checkpoint is written every ``checkpoint_every`` steps and at the end
        when the trainer has a checkpoint path.
        """
        from tqdm.auto import tqdm

        target = self.config.steps if steps is None else steps
        start_time = time.perf_counter()
        offset = self.history[-1]["time"] if self.history else 0.0
        pending: list[tuple[int, Tensor, Tensor, Tensor]] = []
        with tqdm(total=target, initial=self.step, disable=not progress,
                  desc="ctx" if self.predictor is not None else "base", leave=False) as bar:
            while self.step < target:
                point, context, ratio = self.train_step()
                pending.append((self.step, point, context, ratio))
                bar.update(1)
                done = self.step == target
                if len(pending) >= self.config.log_every or done:
                    self._flush(pending, offset + time.perf_counter() - start_time, bar)
                    pending = []
                if self.checkpoint is not None and (
                    self.step % self.config.checkpoint_every == 0 or done
                ):
                    self.save_checkpoint(self.checkpoint)
        return self.history

    def _flush(self, pending: list[tuple[int, Tensor, Tensor, Tensor]], elapsed: float,
               bar: Any) -> None:
        values = torch.stack([torch.stack([p, c, r]) for _, p, c, r in pending]).cpu().tolist()
        for (step, _, _, _), (point, context, ratio) in zip(pending, values):
            self.history.append({"step": step, "point_loss": point, "context_loss": context,
                                 "grad_ratio": ratio, "time": elapsed})
        bar.set_postfix(point=f"{values[-1][0]:.4f}", context=f"{values[-1][1]:.4f}")

    # -- sampling ------------------------------------------------------------------------------
    def sample(self, num: int, sampler: Literal["ddpm", "ddim"] = "ddpm", num_steps: int = 50,
               seed: int = 0, batch_size: int = 256) -> Tensor:
        """``num`` samples ``(num, C, H, W)`` in ``[-1, 1]`` from the EMA weights (CPU tensor).

        ``"ddpm"``: ancestral sampling on ``num_steps`` respaced steps (``eta=1``); ``"ddim"``:
        deterministic DDIM (``eta=0``). After short trainings the ancestral sampler gives visibly
        better samples (compare ``python -m reference_models.demo --sampler ddim``).
        """
        gen = torch.Generator().manual_seed(seed)
        shape = tuple(self.data.shape[1:])
        model = self.ema.model.eval()
        out = []
        for start in range(0, num, batch_size):
            n = min(batch_size, num - start)
            if sampler == "ddim":
                x = self.diffusion.ddim_sample(model, (n, *shape), num_steps, generator=gen,
                                               device=self.device)
            else:
                x = self.diffusion.ddpm_sample(model, (n, *shape), num_steps, generator=gen,
                                               device=self.device)
            out.append(x.cpu())
        return torch.cat(out)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly."""
        return {
            "config": dataclasses.asdict(self.config),
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "heads": self.predictor.heads.state_dict() if self.predictor is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "global_rng": self._rng_state,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the configs must agree except for :data:`_RESUMABLE`."""
        saved = {k: v for k, v in state["config"].items() if k not in _RESUMABLE}
        mine = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in _RESUMABLE}
        if saved != mine:
            diff = sorted(k for k in mine if saved.get(k) != mine[k])
            raise ValueRangeError(
                f"checkpoint was written by a run with another config; differing fields {diff}: "
                f"checkpoint {[saved.get(k) for k in diff]}, this run {[mine[k] for k in diff]}"
            )
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        if self.predictor is not None:
            self.predictor.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self._rng_state = state["global_rng"]
        self.step = int(state["step"])
        self.history = list(state["history"])

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` atomically: a temporary file in the same folder, then
        ``os.replace`` (a crash leaves the previous checkpoint intact)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a checkpoint written by :meth:`save_checkpoint` (onto this trainer's device)."""
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.load_state_dict(state)
