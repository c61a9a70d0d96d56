r"""Gaussian diffusion: cosine schedule, training loss, DDPM / DDIM samplers, RePaint inpainting.

Forward process (``T`` steps, cosine schedule of Nichol & Dhariwal):

.. math::
    q(x_t \mid x_0) = \mathcal N(\sqrt{\bar\alpha_t}\,x_0,\ (1-\bar\alpha_t) I), \qquad
    \bar\alpha_t = \frac{f(t+1)}{f(0)},\ f(u) = \cos^2\!\Big(\frac{u/T + s}{1+s}\frac{\pi}{2}\Big)

(``t = 0..T-1`` indexes the noisy states; per-step :math:`\beta_t` clipped at 0.999). The network
predicts :math:`\epsilon` (``prediction="eps"``) or :math:`v = \sqrt{\bar\alpha_t}\,\epsilon -
\sqrt{1-\bar\alpha_t}\,x_0` (``"v"``); the point-wise loss is the MSE to that target.

Sampling walks a decreasing subsequence :math:`t_K > \dots > t_1` of the ``T`` steps. From
:math:`t` to :math:`s < t`, with :math:`\hat x_0` (clipped to ``[-1, 1]``) and :math:`\hat\epsilon`:

.. math::
    x_s = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1-\bar\alpha_s-\sigma^2}\,\hat\epsilon
    + \sigma z, \quad
    \sigma = \eta\sqrt{\tfrac{1-\bar\alpha_s}{1-\bar\alpha_t}
    \big(1-\tfrac{\bar\alpha_t}{\bar\alpha_s}\big)}

(DDIM; ``eta=1`` is the DDPM ancestral step of the respaced chain, and with all ``T`` steps the
original DDPM sampler). The last step returns :math:`\hat x_0`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctxpred.errors import ShapeError, ValueRangeError

__all__ = [
    "GaussianDiffusion",
    "MaskKind",
    "center_mask",
    "half_mask",
    "make_mask",
    "stroke_mask",
]

Prediction = Literal["eps", "v"]
MaskKind = Literal["center", "half", "strokes"]
Denoiser = Callable[[Tensor, Tensor], Tensor]


def cosine_alphas_cumprod(num_timesteps: int, s: float = 0.008) -> Tensor:
    r""":math:`\bar\alpha_t`, ``t = 0..T-1``, float64, from the cosine schedule (betas <= 0.999).

    Example:
        >>> a = cosine_alphas_cumprod(1000)
        >>> a.shape, bool((a[1:] < a[:-1]).all()), 0.99 < float(a[0]) < 1, float(a[-1]) < 1e-4
        (torch.Size([1000]), True, True, True)
    """
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)


class GaussianDiffusion(nn.Module):
    """Schedule, loss and samplers (buffers follow ``.to(device)``).

    Args:
        num_timesteps: ``T``.
        prediction: what the network outputs, ``"eps"`` or ``"v"``.

    Example:
        >>> from reference_models.continuous import UNet
        >>> diffusion = GaussianDiffusion(num_timesteps=100)
        >>> net = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2))
        >>> x0 = torch.rand(2, 1, 8, 8) * 2 - 1
        >>> diffusion.loss(net, x0).shape
        torch.Size([])
        >>> diffusion.ddim_sample(net, (2, 1, 8, 8), num_steps=3).shape
        torch.Size([2, 1, 8, 8])
    """

    alphas_cumprod: Tensor

    def __init__(self, num_timesteps: int = 1000, prediction: Prediction = "eps") -> None:
        super().__init__()
        if num_timesteps < 2:
            raise ValueRangeError(f"num_timesteps must be >= 2, got {num_timesteps}")
        if prediction not in ("eps", "v"):
            raise ValueRangeError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.num_timesteps = num_timesteps
        self.prediction = prediction
        self.register_buffer(
            "alphas_cumprod", cosine_alphas_cumprod(num_timesteps).float(), persistent=False
        )

    # -- forward process ------------------------------------------------------------------------
    def _abar(self, t: Tensor, like: Tensor) -> Tensor:
        return self.alphas_cumprod.to(like.device)[t].view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        r""":math:`x_t = \sqrt{\bar\alpha_t} x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon`, shapes
        ``(B, C, H, W)`` with ``t`` ``(B,)`` long."""
        abar = self._abar(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The regression target of the network: ``noise`` or ``v``."""
        if self.prediction == "eps":
            return noise
        abar = self._abar(t, x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def loss(
        self,
        model: Denoiser,
        x0: Tensor,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Point-wise loss ``mean((model(x_t, t) - target)^2)`` with uniform ``t`` and Gaussian
        noise (drawn from ``generator`` when not given)."""
        if x0.dim() != 4:
            raise ShapeError(f"x0 must be (B, C, H, W), got shape {tuple(x0.shape)}")
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), generator=generator,
                              device="cpu").to(x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0)
        out = model(self.q_sample(x0, t, noise), t)
        return F.mse_loss(out.float(), self.target(x0, t, noise).float())

    # -- reverse process ------------------------------------------------------------------------
    def predict_x0_eps(self, model_out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(x0_hat clipped to [-1, 1], eps_hat)`` from the network output at ``x_t``."""
        abar = self._abar(t, x_t)
        a, b = abar.sqrt(), (1 - abar).sqrt()
        model_out = model_out.float()
        if self.prediction == "eps":
            x0 = (x_t - b * model_out) / a
        else:
            x0 = a * x_t - b * model_out
        x0 = x0.clamp(-1, 1)
        return x0, (x_t - a * x0) / b

    def timesteps(self, num_steps: int | None) -> list[int]:
        """Decreasing, evenly spaced timesteps ``t_K > ... > t_1`` (``None``: all ``T``)."""
        n = self.num_timesteps if num_steps is None else int(num_steps)
        if not 1 <= n <= self.num_timesteps:
            raise ValueRangeError(f"num_steps must be in [1, {self.num_timesteps}], got {n}")
        steps = torch.linspace(self.num_timesteps - 1, 0, n).round().long().unique()
        return steps.flip(0).tolist()

    def _step(self, model: Denoiser, x: Tensor, t: int, s: int | None, eta: float,
              generator: torch.Generator | None) -> Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, eps = self.predict_x0_eps(model(x, tt), x, tt)
        if s is None:
            return x0
        abar_t, abar_s = self.alphas_cumprod[t], self.alphas_cumprod[s]
        sigma = eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)).clamp_min(0).sqrt()
        direction = (1 - abar_s - sigma**2).clamp_min(0).sqrt()
        out = abar_s.sqrt() * x0 + direction * eps
        if eta > 0:
            out = out + sigma * torch.randn(x.shape, generator=generator, device="cpu").to(x)
        return out

    def _start(self, shape: tuple[int, ...], device: torch.device | str,
               generator: torch.Generator | None) -> Tensor:
        return torch.randn(shape, generator=generator, device="cpu").to(device)

    @torch.no_grad()
    def ddim_sample(
        self,
        model: Denoiser,
        shape: tuple[int, ...],
        num_steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """DDIM sampling over ``num_steps`` respaced steps; ``(B, C, H, W)`` in ``[-1, 1]``.

        ``generator`` (a CPU generator) makes the samples reproducible on any device.
        """
        steps = self.timesteps(num_steps)
        x = self._start(shape, device, generator)
        for k, t in enumerate(steps):
            s = steps[k + 1] if k + 1 < len(steps) else None
            x = self._step(model, x, t, s, eta, generator)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def ddpm_sample(
        self,
        model: Denoiser,
        shape: tuple[int, ...],
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Ancestral DDPM sampling (all ``T`` steps by default, or a respaced chain)."""
        return self.ddim_sample(model, shape, num_steps or self.num_timesteps, eta=1.0,
                                generator=generator, device=device)

    @torch.no_grad()
    def inpaint(
        self,
        model: Denoiser,
        known: Tensor,
        known_mask: Tensor,
        num_steps: int = 50,
        resample: int = 5,
        eta: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""RePaint inpainting (Lugmayr et al. 2022) on a respaced chain.

        At every step ``t -> s``, the known region is re-noised from the data,
        :math:`x_s^{known} \sim q(x_s \mid x_0)`, the unknown region takes the reverse step, and
        the two are merged with ``known_mask``; this is repeated ``resample`` times per step,
        jumping back with :math:`x_t \sim \mathcal N(\sqrt{\bar\alpha_t/\bar\alpha_s}\,x_s,
        (1-\bar\alpha_t/\bar\alpha_s) I)` between repeats. The result keeps the known pixels
        exactly.

        Args:
            known: images ``(B, C, H, W)`` in ``[-1, 1]`` (values in the hole are ignored).
            known_mask: ``(B, 1, H, W)`` or ``(B, C, H, W)``, ``True``/1 where pixels are known.
            resample: RePaint's ``U`` (``1``: plain replacement, no resampling).
        """
        if known.dim() != 4 or known_mask.dim() != 4 or known_mask.shape[0] != known.shape[0] \
                or known_mask.shape[-2:] != known.shape[-2:]:
            raise ShapeError(
                f"known (B, C, H, W) and known_mask (B, 1|C, H, W) must match, got "
                f"{tuple(known.shape)} and {tuple(known_mask.shape)}"
            )
        if resample < 1:
            raise ValueRangeError(f"resample must be >= 1, got {resample}")
        mask = known_mask.to(known.device, torch.bool).expand_as(known)
        steps = self.timesteps(num_steps)
        x = self._start(tuple(known.shape), known.device, generator)
        for k, t in enumerate(steps):
            s = steps[k + 1] if k + 1 < len(steps) else None
            for u in range(resample):
                unknown = self._step(model, x, t, s, eta, generator)
                if s is None:
                    x = unknown
                    break
                noise = torch.randn(known.shape, generator=generator, device="cpu").to(known)
                s_batch = torch.full((known.shape[0],), s, device=known.device, dtype=torch.long)
                x_s = torch.where(mask, self.q_sample(known, s_batch, noise), unknown)
                if u == resample - 1:
                    x = x_s
                    break
                ratio = self.alphas_cumprod[t] / self.alphas_cumprod[s]
                z = torch.randn(known.shape, generator=generator, device="cpu").to(known)
                x = ratio.sqrt() * x_s + (1 - ratio).sqrt() * z
        return torch.where(mask, known, x.clamp(-1, 1))


def center_mask(batch: int, size: int, hole_fraction: float = 0.5) -> Tensor:
    """Known-mask ``(B, 1, S, S)``: a centred square hole of side ``hole_fraction * S``.

    Example:
        >>> m = center_mask(1, 8)
        >>> int((~m).sum()), bool(m[0, 0, 0, 0]), bool(m[0, 0, 4, 4])
        (16, True, False)
    """
    side = max(1, round(size * hole_fraction))
    lo = (size - side) // 2
    mask = torch.ones(batch, 1, size, size, dtype=torch.bool)
    mask[:, :, lo:lo + side, lo:lo + side] = False
    return mask


def half_mask(batch: int, size: int) -> Tensor:
    """Known-mask ``(B, 1, S, S)`` with the right half unknown."""
    mask = torch.ones(batch, 1, size, size, dtype=torch.bool)
    mask[:, :, :, size // 2:] = False
    return mask


def stroke_mask(
    batch: int, size: int, num_strokes: int = 4, width: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Known-mask ``(B, 1, S, S)`` with random thick line strokes unknown (seeded).

    Each stroke is a segment between two uniform random points, thickened to ``width`` pixels
    (default ``max(1, S // 8)``).

    Example:
        >>> m = stroke_mask(2, 16, generator=torch.Generator().manual_seed(0))
        >>> m.shape, bool(m.any()), bool((~m).any())
        (torch.Size([2, 1, 16, 16]), True, True)
    """
    width = max(1, size // 8) if width is None else width
    ends = torch.rand(batch, num_strokes, 2, 2, generator=generator) * (size - 1)
    grid = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1)
    p = grid.float().view(1, 1, size * size, 2)
    a, b = ends[:, :, 0:1], ends[:, :, 1:2]  # (B, N, 1, 2)
    ab = b - a
    u = ((p - a) * ab).sum(-1) / ab.square().sum(-1).clamp_min(1e-6)
    nearest = a + u.clamp(0, 1).unsqueeze(-1) * ab
    dist = (p - nearest).norm(dim=-1)  # (B, N, S*S)
    hole = (dist <= width / 2).any(dim=1).view(batch, 1, size, size)
    return ~hole


def make_mask(kind: MaskKind, batch: int, size: int,
              generator: torch.Generator | None = None) -> Tensor:
    """Known-mask of the given kind: ``"center"``, ``"half"`` or ``"strokes"``."""
    if kind == "center":
        return center_mask(batch, size)
    if kind == "half":
        return half_mask(batch, size)
    if kind == "strokes":
        return stroke_mask(batch, size, generator=generator)
    raise ValueRangeError(f"mask kind must be 'center', 'half' or 'strokes', got {kind!r}")
