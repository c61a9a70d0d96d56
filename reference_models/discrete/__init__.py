"""The discrete (token) reference model: VQ-Diffusion-style mask-and-replace diffusion over token
grids, with token-context prediction through the public ctxpred API.

* :mod:`~reference_models.discrete.tokenizers` -- images <-> token grids: a k-means codebook of
  4x4 patches (textures) and the 17-level intensity tokenizer (digits), with save/load;
* :mod:`~reference_models.discrete.diffusion` -- forward process (closed-form marginals),
  posterior, objective and sampler;
* :mod:`~reference_models.discrete.denoiser` -- the transformer predicting ``p(x_0 | x_t)``;
* :mod:`~reference_models.discrete.training` -- :func:`train` (seeds, progress, atomic resumable
  checkpoints, ``context=True`` attaches the categorical context head) and :func:`generate`;
* :mod:`~reference_models.discrete.evaluate` -- ``python -m reference_models.discrete.evaluate``:
  with vs without context prediction, shared metrics, several seeds.

Example:
    >>> from reference_models.discrete import DiscreteConfig, train, generate
    >>> config = DiscreteConfig(dataset="digits", train_samples=32, dim=16, depth=1, heads=2,
    ...                         batch_size=4, train_steps=2, num_steps=5, context=True)
    >>> result = train(config, progress=False)
    >>> generate(result, 2, num_steps=2).shape
    torch.Size([2, 1, 8, 8])
"""

from reference_models.discrete.denoiser import TokenTransformer
from reference_models.discrete.diffusion import DiffusionLoss, MaskAndReplaceDiffusion
from reference_models.discrete.tokenizers import (
    IntensityTokenizer,
    PatchKMeansTokenizer,
    Tokenizer,
    load_tokenizer,
    save_tokenizer,
)
from reference_models.discrete.training import (
    DiscreteConfig,
    TrainResult,
    build_context_predictor,
    build_tokenizer,
    generate,
    train,
)

__all__ = [
    "DiffusionLoss",
    "DiscreteConfig",
    "IntensityTokenizer",
    "MaskAndReplaceDiffusion",
    "PatchKMeansTokenizer",
    "TokenTransformer",
    "Tokenizer",
    "TrainResult",
    "build_context_predictor",
    "build_tokenizer",
    "generate",
    "load_tokenizer",
    "save_tokenizer",
    "train",
]
