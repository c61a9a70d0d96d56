"""The continuous reference model: a small DDPM/DDIM pixel-space diffusion model.

* :class:`UNet` — residual blocks, time embedding, attention at low resolution; its decoder blocks
  ``up_blocks.{j}`` are where context prediction is attached.
* :class:`GaussianDiffusion` — cosine schedule, eps/v loss, DDPM and DDIM samplers, RePaint
  inpainting; :func:`make_mask` gives center / half / random-stroke masks.
* :class:`EMA` — averaged weights for sampling.
* :class:`Trainer` with :class:`TrainConfig` / :class:`ContextConfig` — the training loop
  (ctxpred through its public API only), atomic resumable checkpoints.
"""

from reference_models.continuous.diffusion import (
    GaussianDiffusion,
    center_mask,
    half_mask,
    make_mask,
    stroke_mask,
)
from reference_models.continuous.ema import EMA
from reference_models.continuous.train import (
    ContextConfig,
    TrainConfig,
    Trainer,
    build_context_losses,
)
from reference_models.continuous.unet import UNet

__all__ = [
    "EMA",
    "ContextConfig",
    "GaussianDiffusion",
    "TrainConfig",
    "Trainer",
    "UNet",
    "build_context_losses",
    "center_mask",
    "half_mask",
    "make_mask",
    "stroke_mask",
]
