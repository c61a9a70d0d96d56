"""Reference models that use ctxpred exactly as an outside user would (public API only).

* :mod:`reference_models.data` — bundled datasets (textures, digits, faces), no downloads.
* :mod:`reference_models.metrics` — hub-free image-quality metrics (the benchmarks import them;
  nothing here imports ``benchmarks/``).
* :mod:`reference_models.continuous` — a small DDPM/DDIM pixel-space diffusion model.
* :mod:`reference_models.discrete` — a VQ-Diffusion-style (mask-and-replace) token model with
  token-context prediction; ``python -m reference_models.discrete.evaluate`` compares both arms.
* :mod:`reference_models.demo` — ``python -m reference_models.demo``: train with and without
  context prediction, sample, and report metrics.
"""
