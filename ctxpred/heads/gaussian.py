r"""The distributional context decoder and its divergence: :math:`W_p^p` to the neighbors.

Example:
    >>> import torch
    >>> from ctxpred.heads import GaussianSamplingHead
    >>> from ctxpred.neighborhoods import neighbors
    >>> head = GaussianSamplingHead(out_channels=3, in_channels=8, num_strides=2)
    >>> nb = neighbors(torch.randn(2, 3, 4, 4), strides=(1, 2))
    >>> head.divergence(head(torch.randn(2, 16, 8)), nb).shape
    torch.Size([2, 16, 2])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ctxpred.heads.base import (
    ContextHead,
    _core,
    _linear,
    _positive_int,
    _sample_weights,
    check_out_channels,
    float32_core,
    match_strides,
)
from ctxpred.wasserstein import EstimatorSpec, resolve_estimator

__all__ = ["GaussianSamplingHead", "sample_divergence"]


def sample_divergence(
    samples: Tensor,
    values: Tensor,
    mask: Tensor,
    estimator: EstimatorSpec | None = None,
    match_mask: bool = False,
) -> Tensor:
    r""":math:`W_p^p` between predicted samples and the valid neighbors, per point and stride.

    The prediction is uniform over its ``Q`` samples, the target uniform over the valid slots
    (``mask`` as weights; masked slots carry no mass). A problem without a valid neighbor gives 0
    (estimator contract). Computed in float32 with autocast off.

    ``match_mask=True`` (needs ``Q == K_s``) masks the samples like their targets: the prediction
    keeps as many samples as there are valid neighbors. The samples are i.i.d., so this is the
    same as drawing fewer of them; every problem then has equal, uniform supports, which the
    ``"exact"`` estimator solves as a batched assignment on the device.

    Args:
        samples: ``(B, P, S', Q, C)`` with ``S'`` in ``{1, S}``.
        values: ``(B, P, S, K_s, C)`` neighbor values (:class:`~ctxpred.neighborhoods.Neighbors`).
        mask: ``(B, P, S, K_s)`` bool.
        estimator: a registered name (``None``: the loss default,
            :data:`ctxpred.wasserstein.LOSS_ESTIMATOR`), a module or a callable
            (:func:`ctxpred.wasserstein.resolve_estimator`).
        match_mask: mask the samples like their targets (see above).

    Returns:
        ``(B, P, S)``.

    Example:
        >>> y = torch.randn(2, 4, 1, 8, 3)
        >>> mask = torch.ones(2, 4, 1, 8, dtype=torch.bool)
        >>> d = sample_divergence(y, y, mask, "sinkhorn")  # perfect prediction
        >>> d.shape, bool(d.abs().max() < 1e-3)
        (torch.Size([2, 4, 1]), True)
        >>> mask[:, :, :, 5:] = False  # fewer valid neighbors: keep as many samples
        >>> sample_divergence(y, y, mask, "exact", match_mask=True).abs().max() < 1e-5
        tensor(True)
    """
    est = resolve_estimator(estimator) if estimator is None or isinstance(estimator, str) \
        else estimator
    check_out_channels(samples.shape[-1], values, "the head")
    samples = match_strides(samples, values.shape[2], "the head")
    with float32_core(samples.device):
        samples = _core(samples)
        return est(samples, _core(values), _sample_weights(samples, mask, match_mask),
                   mask.to(samples.dtype))


class GaussianSamplingHead(ContextHead):
    r"""The distributional context decoder of the method ("Context decoders" on the method page).

    From ``z_i`` a linear layer predicts, per stride ``s``, a diagonal Gaussian
    :math:`(\mu_i^s, \log\sigma_i^s)` in a latent space of size ``latent_dim``; ``Q`` samples

    .. math::
        h_{iq}^s = \mu_i^s + \sigma_i^s \odot \xi_q, \qquad \xi_q \sim \mathcal N(0, I)

    (reparameterized, so gradients reach ``z``) go through a shared MLP
    ``latent_dim -> hidden_channels -> C_out`` (or, with ``hidden_channels=None``, one linear
    layer ``latent_dim -> C_out``: the predicted neighborhood is then itself a Gaussian,
    :math:`\mathcal N(W\mu_i^s + b,\ W \operatorname{diag}(\sigma_i^{s\,2}) W^\top)`, a
    lower-capacity and cheaper decoder). The empirical distribution of the ``Q`` outputs is
    the predicted neighborhood; ``Q`` is independent of the neighbor count. Divergence:
    :func:`sample_divergence` by the loss's Wasserstein estimator.

    Args:
        out_channels: ``C_out``, channels of the target neighbors (3 for RGB pixels, 4 for SD
            latents, the layer's width for the feature context).
        in_channels: ``C_in``, or ``None`` to infer it on the first forward.
        num_samples: ``Q``, samples drawn per point and stride; any count (``Q = K_s``, e.g. 8
            for a 3x3 ring, lets the loss use ``match_mask=True``).
        latent_dim: size of the Gaussian latent.
        hidden_channels: width of the shared decoder MLP; ``None``: a linear decoder (no
            hidden layer).
        num_strides: ``S``; one Gaussian per stride (``1`` shares it across strides). Use
            ``len(strides)`` of the neighborhood.

    Shape:
        - input ``z``: ``(B, P, C_in)`` or ``(B, C_in, *spatial)``
        - output: ``(B, P, S, Q, C_out)``

    Example:
        >>> head = GaussianSamplingHead(out_channels=3, in_channels=16, num_samples=8,
        ...                             num_strides=2)
        >>> head(torch.randn(2, 10, 16)).shape
        torch.Size([2, 10, 2, 8, 3])
        >>> mu, log_sigma = head.distribution(torch.randn(2, 10, 16))
        >>> mu.shape
        torch.Size([2, 10, 2, 16])
    """

    log_sigma_range: tuple[float, float] = (-12.0, 6.0)

    def __init__(
        self,
        out_channels: int,
        in_channels: int | None = None,
        *,
        num_samples: int = 8,
        latent_dim: int = 16,
        hidden_channels: int | None = 64,
        num_strides: int = 1,
    ) -> None:
        super().__init__(out_channels, in_channels, num_strides)
        self.num_samples = _positive_int(num_samples, "num_samples")
        self.latent_dim = _positive_int(latent_dim, "latent_dim")
        self.encoder = _linear(in_channels, 2 * self.num_strides * self.latent_dim)
        self.decoder: nn.Module
        if hidden_channels is None:
            self.decoder = nn.Linear(self.latent_dim, self.out_channels)
        else:
            hidden = _positive_int(hidden_channels, "hidden_channels (None: a linear decoder)")
            self.decoder = nn.Sequential(
                nn.Linear(self.latent_dim, hidden), nn.SiLU(),
                nn.Linear(hidden, self.out_channels),
            )

    def distribution(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, log_sigma)``, each ``(B, P, S, latent_dim)``; ``log_sigma`` is clamped to
        :attr:`log_sigma_range` so that ``exp`` stays finite in low precision."""
        points = self.points(z)
        # (B, P, S * 2 * latent) -> (B, P, S, 2, latent): (mu, log_sigma) per stride
        stats = self.encoder(points).unflatten(-1, (self.num_strides, 2, self.latent_dim))
        mu, log_sigma = stats.unbind(-2)
        return mu, log_sigma.clamp(*self.log_sigma_range)

    def forward(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Predicted neighbors ``(B, P, S, Q, C_out)``; ``generator`` seeds the noise (drawn on
        the generator's device and moved to ``z``'s device when they differ)."""
        mu, log_sigma = self.distribution(z)
        shape = (*mu.shape[:-1], self.num_samples, self.latent_dim)
        if generator is not None and generator.device != mu.device:
            noise = torch.randn(shape, generator=generator, device=generator.device,
                                dtype=mu.dtype).to(mu.device)
        else:
            noise = torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)
        latent = mu.unsqueeze(-2) + log_sigma.exp().unsqueeze(-2) * noise
        return self.decoder(latent)

    def divergence(
        self, prediction: Tensor, neighbors: Any, estimator: EstimatorSpec | None = None, *,
        match_mask: bool = False,
    ) -> Tensor:
        """:func:`sample_divergence` of the samples and the neighbors, ``(B, P, S)``."""
        return sample_divergence(prediction, neighbors.values, neighbors.mask, estimator,
                                 match_mask)

    def extra_repr(self) -> str:
        linear = ", linear decoder" if isinstance(self.decoder, nn.Linear) else ""
        return (f"{super().extra_repr()}, num_samples={self.num_samples}, "
                f"latent_dim={self.latent_dim}{linear}")
