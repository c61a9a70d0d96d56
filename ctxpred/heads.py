r"""Context heads: small per-point decoders that predict a point's neighborhood distribution.

Every head reads the representation ``z_i`` of a point (one row of ``(B, P, C_in)``, or a
channels-first map ``(B, C_in, *spatial)`` read as ``P = prod(spatial)`` points) and predicts the
context of that point **per stride**: the output always has a stride axis ``S`` of size
``num_strides``. With ``num_strides=1`` one prediction is shared by every stride of the
neighborhood (the loss broadcasts it); with ``num_strides=len(strides)`` (recommended) each stride
gets its own predicted distribution :math:`\hat P_i^{s}`.

=========================  ===========================================  ======================
head                       output                                       compared with
=========================  ===========================================  ======================
:class:`GaussianSamplingHead`  ``(B, P, S, Q, C_out)`` samples          Wasserstein (estimator)
:class:`NaiveHead`         ``(B, P, S, K_s, C_out)``, one per slot      masked squared error
:class:`MomentHead`        :class:`MomentPrediction` (mean, covariance)  Gaussian W2 (Bures)
:class:`CategoricalHead`   :class:`CategoricalPrediction` (logits, ...)  W over the codebook
=========================  ===========================================  ======================

Input channels: pass ``in_channels`` explicitly, or leave it ``None`` to infer it on the first
forward (``nn.LazyLinear``). A lazy head has no parameters until it has seen one input: build the
optimizer only after that (``ContextPredictor.initialize(...)`` in :mod:`ctxpred.attach` runs one
dry forward for this purpose).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ctxpred.errors import ShapeError, ValueRangeError, check_floating

__all__ = [
    "CategoricalHead",
    "CategoricalPrediction",
    "ContextHead",
    "GaussianSamplingHead",
    "MomentHead",
    "MomentPrediction",
    "NaiveHead",
]


def _positive_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueRangeError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _linear(in_channels: int | None, out_features: int) -> nn.Module:
    if in_channels is None:
        return nn.LazyLinear(out_features)
    return nn.Linear(in_channels, out_features)


class ContextHead(nn.Module):
    """Base class of the heads: input normalisation, channel checks and the stride axis.

    Attributes:
        in_channels: ``C_in`` or ``None`` while it is still to be inferred (lazy).
        out_channels: ``C_out``, the channel count of the predicted neighbors.
        num_strides: ``S``, the size of the stride axis of the prediction.
    """

    def __init__(self, out_channels: int, in_channels: int | None, num_strides: int) -> None:
        super().__init__()
        self.out_channels = _positive_int(out_channels, "out_channels")
        self.in_channels = (
            None if in_channels is None else _positive_int(in_channels, "in_channels")
        )
        self.num_strides = _positive_int(num_strides, "num_strides")

    @property
    def initialized(self) -> bool:
        """``False`` while a lazy layer still waits for its first input."""
        return not any(isinstance(p, nn.parameter.UninitializedParameter)
                       for p in self.parameters())

    def _points(self, z: Tensor) -> Tensor:
        """``z`` as ``(B, P, C_in)``; checks dtype and the input channel count."""
        check_floating(z, "z")
        if z.dim() == 3:
            points = z
        elif z.dim() in (4, 5):
            points = z.flatten(2).transpose(1, 2)
        else:
            raise ShapeError(
                f"{type(self).__name__} input must be (B, P, C_in) or a channels-first map "
                f"(B, C_in, *spatial) with 2-3 spatial dims, got shape {tuple(z.shape)}"
            )
        if self.in_channels is not None and points.shape[-1] != self.in_channels:
            raise ShapeError(
                f"{type(self).__name__} expects C_in={self.in_channels} input channels, got "
                f"{points.shape[-1]} (input shape {tuple(z.shape)}); the layer's channel "
                f"count and the head's in_channels must match"
            )
        if self.in_channels is None:
            self.in_channels = int(points.shape[-1])
        return points

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"num_strides={self.num_strides}")


class GaussianSamplingHead(ContextHead):
    r"""The distributional context decoder of the method ("Context decoders" on the method page).

    From ``z_i`` a linear layer predicts, per stride ``s``, a diagonal Gaussian
    :math:`(\mu_i^s, \log\sigma_i^s)` in a latent space of size ``latent_dim``; ``Q`` samples

    .. math::
        h_{iq}^s = \mu_i^s + \sigma_i^s \odot \xi_q, \qquad \xi_q \sim \mathcal N(0, I)

    (reparameterized, so gradients reach ``z``) go through a shared MLP
    ``latent_dim -> hidden_channels -> C_out``. The empirical distribution of the ``Q`` outputs is
    the predicted neighborhood; ``Q`` is independent of the neighbor count.

    Args:
        out_channels: ``C_out``, channels of the target neighbors.
        in_channels: ``C_in``, or ``None`` to infer it on the first forward.
        num_samples: ``Q``.
        latent_dim: size of the Gaussian latent.
        hidden_channels: width of the shared decoder MLP.
        num_strides: ``S``; one Gaussian per stride (``1`` shares it across strides).

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
        hidden_channels: int = 64,
        num_strides: int = 1,
    ) -> None:
        super().__init__(out_channels, in_channels, num_strides)
        self.num_samples = _positive_int(num_samples, "num_samples")
        self.latent_dim = _positive_int(latent_dim, "latent_dim")
        hidden = _positive_int(hidden_channels, "hidden_channels")
        self.encoder = _linear(in_channels, 2 * self.num_strides * self.latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(self.latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, self.out_channels)
        )

    def distribution(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, log_sigma)``, each ``(B, P, S, latent_dim)``; ``log_sigma`` is clamped to
        :attr:`log_sigma_range` so that ``exp`` stays finite in low precision."""
        points = self._points(z)
        stats = self.encoder(points).unflatten(-1, (self.num_strides, 2, self.latent_dim))
        mu, log_sigma = stats.unbind(-2)
        return mu, log_sigma.clamp(*self.log_sigma_range)

    def forward(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Predicted neighbors ``(B, P, S, Q, C_out)``; ``generator`` seeds the noise."""
        mu, log_sigma = self.distribution(z)
        noise = torch.randn(
            (*mu.shape[:-1], self.num_samples, self.latent_dim),
            generator=generator, device=mu.device, dtype=mu.dtype,
        )
        latent = mu.unsqueeze(-2) + log_sigma.exp().unsqueeze(-2) * noise
        return self.decoder(latent)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_samples={self.num_samples}, "
                f"latent_dim={self.latent_dim}")


class NaiveHead(ContextHead):
    r"""The baseline decoder: one prediction per neighbor slot, in the fixed slot order.

    A single linear map (equivalently one linear map per offset) predicts, per stride, the
    ``num_slots`` neighbors in slot order (see :func:`ctxpred.functional.neighbor_offsets`). It is
    compared with the target slot by slot (masked squared error, see
    :func:`ctxpred.functional.naive_divergence`), so it is order-dependent and its cost grows with
    ``|S| * (k^d - 1)``.

    Args:
        out_channels: ``C_out``.
        num_slots: ``K_s``, neighbors per stride (``k**d - 1``: 8 for a 3x3 ring in 2-D).
        in_channels: ``C_in`` or ``None`` (lazy).
        num_strides: ``S``.

    Shape:
        - input ``z``: ``(B, P, C_in)`` or ``(B, C_in, *spatial)``
        - output: ``(B, P, S, K_s, C_out)``

    Example:
        >>> NaiveHead(out_channels=3, in_channels=16, num_strides=3)(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 3, 8, 3])
    """

    def __init__(
        self,
        out_channels: int,
        num_slots: int = 8,
        in_channels: int | None = None,
        *,
        num_strides: int = 1,
    ) -> None:
        super().__init__(out_channels, in_channels, num_strides)
        self.num_slots = _positive_int(num_slots, "num_slots")
        self.proj = _linear(in_channels, self.num_strides * self.num_slots * self.out_channels)

    def forward(self, z: Tensor) -> Tensor:
        """Per-slot predictions ``(B, P, S, K_s, C_out)``."""
        out = self.proj(self._points(z))
        return out.unflatten(-1, (self.num_strides, self.num_slots, self.out_channels))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_slots={self.num_slots}"


class MomentPrediction(NamedTuple):
    """What :class:`MomentHead` returns.

    Attributes:
        mean: ``(B, P, S, C)``.
        log_variance: ``(B, P, S, C)``, the diagonal part ``D = diag(exp(log_variance))``.
        factor: ``(B, P, S, C, R)`` low-rank factor ``F`` (``None`` when ``rank=0``).
    """

    mean: Tensor
    log_variance: Tensor
    factor: Tensor | None

    def covariance(self) -> Tensor:
        """``Sigma = D + F F^T``, ``(B, P, S, C, C)``."""
        cov = torch.diag_embed(self.log_variance.exp())
        if self.factor is not None:
            cov = cov + self.factor @ self.factor.transpose(-1, -2)
        return cov


class MomentHead(ContextHead):
    r"""Predicts the mean and covariance of the neighborhood, for the closed-form Gaussian W2.

    .. math::
        \Sigma_i^s = \operatorname{diag}(e^{v_i^s}) + F_i^s F_i^{s\top}, \qquad
        W_2^2 = \lVert m_1 - m_2 \rVert^2 + \operatorname{tr}\big(\Sigma_1 + \Sigma_2
        - 2 (\Sigma_2^{1/2} \Sigma_1 \Sigma_2^{1/2})^{1/2}\big)

    against the (mask-weighted) empirical mean and covariance of the valid neighbors.

    Args:
        out_channels: ``C``.
        in_channels: ``C_in`` or ``None`` (lazy).
        rank: ``R``, rank of the low-rank part (``0``: diagonal covariance).
        num_strides: ``S``.

    Shape:
        - input ``z``: ``(B, P, C_in)`` or ``(B, C_in, *spatial)``
        - output: :class:`MomentPrediction` with ``mean (B, P, S, C)``

    Example:
        >>> pred = MomentHead(out_channels=3, in_channels=8, rank=2)(torch.randn(2, 5, 8))
        >>> pred.mean.shape, pred.factor.shape, pred.covariance().shape
        (torch.Size([2, 5, 1, 3]), torch.Size([2, 5, 1, 3, 2]), torch.Size([2, 5, 1, 3, 3]))
    """

    def __init__(
        self,
        out_channels: int,
        in_channels: int | None = None,
        *,
        rank: int = 0,
        num_strides: int = 1,
    ) -> None:
        super().__init__(out_channels, in_channels, num_strides)
        self.rank = _positive_int(rank, "rank", minimum=0)
        self.proj = _linear(in_channels, self.num_strides * self.out_channels * (2 + self.rank))

    def forward(self, z: Tensor) -> MomentPrediction:
        """Mean, log-variance and low-rank factor of each point's neighborhood."""
        out = self.proj(self._points(z)).unflatten(
            -1, (self.num_strides, self.out_channels, 2 + self.rank)
        )
        factor = out[..., 2:] if self.rank else None
        return MomentPrediction(out[..., 0], out[..., 1], factor)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


class CategoricalPrediction(NamedTuple):
    """What :class:`CategoricalHead` returns.

    Attributes:
        logits: ``(B, P, S, V)`` over the codebook.
        samples: ``(B, P, S, Q, D)`` Gumbel-softmax token samples mapped to the codebook
            (one-hot vectors, ``D = V``, without a codebook); ``None`` in distribution mode.
        codebook: ``(V, D)`` embedding the ground cost is measured in, or ``None`` for the
            discrete (0-1) cost.
    """

    logits: Tensor
    samples: Tensor | None
    codebook: Tensor | None


class CategoricalHead(ContextHead):
    r"""Token context: a distribution over a codebook of ``V`` entries per point and stride.

    The target is the empirical distribution of the valid neighbor tokens. Two modes:

    * **distribution** (``num_samples=None``, no codebook): compare ``p = softmax(logits)`` with
      the neighbor histogram ``q`` under the discrete ground cost ``c(u, v) = [u != v]``, for
      which :math:`W = \mathrm{TV}(p, q) = 1 - \sum_v \min(p_v, q_v)` exactly (cost ``O(V)``
      per point). A codebook requires the sampling mode: the estimators treat weights as
      constants, so a distribution over codebook entries would receive no gradient.
    * **samples** (``num_samples=Q``): draw ``Q`` Gumbel-softmax relaxed tokens (temperature
      ``temperature``, straight-through one-hot when ``hard=True``), embed them with the codebook
      (or keep them one-hot) and compare the ``Q`` samples with the neighbor embeddings.

    Args:
        num_classes: ``V``.
        in_channels: ``C_in`` or ``None`` (lazy).
        codebook: ``(V, D)`` embedding of the tokens (stored as a detached buffer; refresh it
            with :meth:`set_codebook`; needs ``num_samples``), or ``None`` for the 0-1 cost
            (distribution mode) / one-hot vectors (sampling mode).
        num_samples: ``Q`` for the sampling mode, ``None`` for the distribution mode.
        temperature: Gumbel-softmax temperature ``tau > 0``.
        hard: straight-through one-hot samples.
        num_strides: ``S``.

    Shape:
        - input ``z``: ``(B, P, C_in)`` or ``(B, C_in, *spatial)``
        - output: :class:`CategoricalPrediction`, ``logits (B, P, S, V)``

    Example:
        >>> head = CategoricalHead(num_classes=10, in_channels=8, codebook=torch.randn(10, 4),
        ...                        num_samples=6)
        >>> pred = head(torch.randn(2, 5, 8))
        >>> pred.logits.shape, pred.samples.shape, head.out_channels
        (torch.Size([2, 5, 1, 10]), torch.Size([2, 5, 1, 6, 4]), 4)
    """

    codebook: Tensor | None

    def __init__(
        self,
        num_classes: int,
        in_channels: int | None = None,
        *,
        codebook: Tensor | None = None,
        num_samples: int | None = None,
        temperature: float = 1.0,
        hard: bool = False,
        num_strides: int = 1,
    ) -> None:
        vocab = _positive_int(num_classes, "num_classes", minimum=2)
        super().__init__(vocab, in_channels, num_strides)
        self.num_classes = vocab
        self.num_samples = None if num_samples is None else _positive_int(
            num_samples, "num_samples")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                and temperature > 0):
            raise ValueRangeError(f"temperature must be a finite float > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.hard = bool(hard)
        if codebook is not None and num_samples is None:
            raise ValueRangeError(
                "CategoricalHead with a codebook needs num_samples (Gumbel-softmax samples): the "
                "Wasserstein estimators do not differentiate through the weights, so a "
                "distribution over codebook entries would get no gradient; without a codebook "
                "the distribution mode uses the exact 0-1 cost (total variation)"
            )
        self.register_buffer("codebook", None)
        if codebook is not None:
            self.set_codebook(codebook)
        self.proj = _linear(in_channels, self.num_strides * vocab)

    def set_codebook(self, codebook: Tensor) -> None:
        """Replace the codebook ``(V, D)`` (a detached copy; ``V`` must equal ``num_classes``)."""
        check_floating(codebook, "codebook")
        if codebook.dim() != 2 or codebook.shape[0] != self.num_classes:
            raise ShapeError(
                f"codebook must be (V={self.num_classes}, D), got shape {tuple(codebook.shape)}"
            )
        self.codebook = codebook.detach().clone()
        self.out_channels = int(codebook.shape[1])

    def forward(self, z: Tensor, generator: torch.Generator | None = None) -> CategoricalPrediction:
        """Logits, and Gumbel-softmax samples in sampling mode; ``generator`` seeds the noise."""
        logits = self.proj(self._points(z)).unflatten(-1, (self.num_strides, self.num_classes))
        if self.num_samples is None:
            return CategoricalPrediction(logits, None, self.codebook)
        shape = (*logits.shape[:-1], self.num_samples, self.num_classes)
        exponential = torch.empty(shape, device=logits.device, dtype=torch.float32)
        exponential.exponential_(generator=generator)
        gumbel = -exponential.clamp_min(torch.finfo(torch.float32).tiny).log()
        soft = torch.softmax((logits.float().unsqueeze(-2) + gumbel) / self.temperature, dim=-1)
        if self.hard:
            hard = nn.functional.one_hot(soft.argmax(-1), self.num_classes).to(soft.dtype)
            soft = hard - soft.detach() + soft
        samples = soft if self.codebook is None else soft @ self.codebook.float()
        return CategoricalPrediction(logits, samples, self.codebook)

    def extra_repr(self) -> str:
        mode = "distribution" if self.num_samples is None else f"num_samples={self.num_samples}"
        return (f"{super().extra_repr()}, num_classes={self.num_classes}, {mode}, "
                f"codebook={'none' if self.codebook is None else tuple(self.codebook.shape)}")
