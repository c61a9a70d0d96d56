"""attach() on real backbones: a tiny diffusers UNet2DModel and a tiny DiT-style transformer.

One training step (grads reach backbone and heads), a few dozen steps on a fixed batch (the
context loss decreases), ``state_dict`` keys unchanged, gradient checkpointing, and sampling after
``remove()`` equal to sampling with a never-hooked model holding the same weights.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ctxpred
from ctxpred import (
    CaptureError,
    ContextPredictionLoss,
    GaussianSamplingHead,
    PixelNeighborhood,
    ShapeError,
)

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.slow


UNET_CONFIG = dict(
    sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
    block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
)


def _unet(seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**UNET_CONFIG)


def _images(batch=4, size=16, seed=0):
    """Smooth random images: neighbors are predictable from a point's features."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, size // 4, size // 4, generator=g) * 2 - 1
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                     align_corners=False)


def _context_losses(channels: dict[str, int], points=None, grid_shape=None):
    return {
        name: ContextPredictionLoss(
            PixelNeighborhood(strides=(1, 2, 3)),
            GaussianSamplingHead(3, c, num_samples=8, latent_dim=8, hidden_channels=32,
                                 num_strides=3),
            weight=0.5, points=points, grid_shape=grid_shape,
        )
        for name, c in channels.items()
    }


def _denoise_step(model, x0, seed, call):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
    alpha = torch.cos(t.float() / 1000 * torch.pi / 2).view(-1, 1, 1, 1)
    x_t = alpha * x0 + (1 - alpha**2).sqrt() * noise
    return ((call(model, x_t, t) - noise) ** 2).mean()


def _unet_call(model, x, t):
    return model(x, t).sample


def _train(model, predictor, call, x0, steps, lr=3e-3):
    opt = torch.optim.Adam([*model.parameters(), *predictor.parameters()], lr=lr)
    history = []
    for step in range(steps):
        opt.zero_grad()
        point_loss = _denoise_step(model, x0, step, call)
        torch.manual_seed(0)  # the same head noise every step: a fixed objective
        ctx = predictor.loss(target=x0)
        (point_loss + ctx).backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0
                       for p in predictor.parameters())
            below = [p for n, p in model.named_parameters() if "down_blocks" in n or "patch" in n]
            assert all(p.grad is not None for p in below) and sum(
                float(p.grad.abs().sum()) for p in below) > 0
        opt.step()
        history.append(float(ctx.detach()))
    return history


def _ddpm_sample(model, call, shape, steps=4):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(shape, generator=g)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = call(model, x, t.expand(shape[0]))
            x = scheduler.step(eps, t, x, generator=g).prev_sample
    return x


def test_unet2d_train_decreases_context_loss_and_remove_restores_sampling():
    unet = _unet()
    keys = list(unet.state_dict())
    x0 = _images()
    predictor = ctxpred.attach(unet, _context_losses({"up_blocks.0": 32, "up_blocks.1": 16},
                                                     points=96))
    assert list(unet.state_dict()) == keys
    history = _train(unet, predictor, _unet_call, x0, steps=30)
    assert sum(history[-5:]) / 5 < 0.8 * sum(history[:5]) / 5, history
    assert list(unet.state_dict()) == keys
    hooked_sample = _ddpm_sample(unet, _unet_call, (2, 3, 16, 16))  # hooks never change output
    predictor.remove()
    fresh = diffusers.UNet2DModel(**UNET_CONFIG)
    fresh.load_state_dict(unet.state_dict())
    after = _ddpm_sample(unet, _unet_call, (2, 3, 16, 16))
    assert torch.equal(after, _ddpm_sample(fresh, _unet_call, (2, 3, 16, 16)))
    assert torch.equal(after, hooked_sample)


def test_unet2d_gradient_checkpointing_gives_the_same_gradients():
    x0 = _images(batch=2)
    grads = []
    for use_checkpointing in (False, True):
        unet = _unet()
        if use_checkpointing:
            unet.enable_gradient_checkpointing()
        losses = _context_losses({"up_blocks.0": 32, "up_blocks.1": 16}, points=32)
        torch.manual_seed(7)
        for loss in losses.values():  # identical head initialization in both runs
            loss.head.load_state_dict(GaussianSamplingHead(
                3, loss.head.in_channels, num_samples=8, latent_dim=8, hidden_channels=32,
                num_strides=3).state_dict())
        with ctxpred.attach(unet, losses) as predictor:
            unet.train()
            point_loss = _denoise_step(unet, x0, 0, _unet_call)
            torch.manual_seed(0)
            (point_loss + predictor.loss(target=x0)).backward()
            assert predictor.captured == {}
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_unet2d_bad_inputs_fail_loudly():
    unet, x0 = _unet(), _images(batch=2)
    with pytest.raises(ctxpred.ValueRangeError, match="close matches"):
        ctxpred.attach(unet, _context_losses({"up_block.0": 32}))
    with ctxpred.attach(unet, _context_losses({"down_blocks.0": 16})):
        with pytest.raises(CaptureError, match="returned tuple"):
            _unet_call(unet, x0, torch.zeros(2, dtype=torch.long))
    with ctxpred.attach(unet, _context_losses({"up_blocks.1": 24})):
        with pytest.raises(ShapeError, match=r"'up_blocks.1' outputs 16 channels.*=24"):
            _unet_call(unet, x0, torch.zeros(2, dtype=torch.long))
    with ctxpred.attach(unet, _context_losses({"up_blocks.1": 16})) as predictor:
        _unet_call(unet, x0, torch.zeros(2, dtype=torch.long))
        with pytest.raises(ShapeError, match=r"layer 'up_blocks.1': .*C_out=3"):
            predictor.loss(target=torch.randn(2, 4, 16, 16))


# -- a tiny DiT ----------------------------------------------------------------------------------
class DiTBlock(nn.Module):
    """adaLN-zero style transformer block on (B, L, C) tokens."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.modulation = nn.Linear(dim, 4 * dim)

    def forward(self, h, cond):
        shift1, scale1, shift2, scale2 = self.modulation(cond).unsqueeze(1).chunk(4, dim=-1)
        a = self.norm1(h) * (1 + scale1) + shift1
        h = h + self.attn(a, a, a, need_weights=False)[0]
        return h + self.mlp(self.norm2(h) * (1 + scale2) + shift2)


class TinyDiT(nn.Module):
    def __init__(self, channels=3, size=16, patch=2, dim=32, depth=2, heads=4):
        super().__init__()
        self.grid = size // patch
        self.patch, self.channels = patch, channels
        self.patchify = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, self.grid**2, dim) * 0.02)
        self.time = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))
        self.out = nn.Linear(dim, patch * patch * channels)

    def forward(self, x, t):
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.pos
        cond = self.time(t.float().view(-1, 1) / 1000)
        for block in self.blocks:
            h = block(h, cond)
        out = self.out(h).view(x.shape[0], self.grid, self.grid, self.channels, self.patch,
                               self.patch)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(x.shape)


def _dit_call(model, x, t):
    return model(x, t)


def test_dit_tokens_train_and_remove_restores_sampling():
    torch.manual_seed(0)
    dit = TinyDiT()
    keys = list(dit.state_dict())
    x0 = _images()
    losses = _context_losses({"blocks.0": 32, "blocks.1": 32}, grid_shape=(8, 8))
    predictor = ctxpred.attach(dit, losses)
    history = _train(dit, predictor, _dit_call, x0, steps=30)
    assert sum(history[-5:]) / 5 < 0.8 * sum(history[:5]) / 5, history
    assert list(dit.state_dict()) == keys
    predictor.remove()
    fresh = TinyDiT()
    fresh.load_state_dict(dit.state_dict())
    assert torch.equal(_ddpm_sample(dit, _dit_call, (2, 3, 16, 16)),
                       _ddpm_sample(fresh, _dit_call, (2, 3, 16, 16)))
