"""The feature context cannot run away: a real diffusers UNet, 200 Adam steps at lr 3e-3."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

import ctxpred
from ctxpred import FeatureNeighborhood, GaussianSamplingHead
from ctxpred.neighborhoods import standardize_features

diffusers = pytest.importorskip("diffusers")

STEPS = 200


def _unet() -> torch.nn.Module:
    return diffusers.UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
    )


def _train(context: str | None, denoise: bool, normalize: str = "instance") -> dict:
    """``context``: None or "features"; returns the hooked RMS and context-loss trajectories."""
    torch.manual_seed(0)
    net = _unet()
    rms: list[torch.Tensor] = []
    hook = net.up_blocks[1].register_forward_hook(
        lambda _m, _a, out: rms.append(out.detach().pow(2).mean().sqrt()))
    params = list(net.parameters())
    predictor = None
    if context is not None:
        loss = ctxpred.ContextPredictionLoss(
            FeatureNeighborhood(strides=(1, 2), normalize=normalize),
            GaussianSamplingHead(out_channels=16, in_channels=16, num_strides=2),
            weight=0.1 if denoise else 1.0, points=16)
        predictor = ctxpred.attach(net, {"up_blocks.1": loss})
        params += list(predictor.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    data = F.avg_pool2d(torch.rand(64, 1, 16, 16, generator=gen) * 2 - 1, 3, 1, 1) * 2
    ctx_losses = []
    for _ in range(STEPS):
        x0 = data[torch.randint(0, 64, (4,), generator=gen)]
        t = torch.randint(0, 1000, (4,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        abar = torch.cos(t.float() / 1000 * math.pi / 2).pow(2)[:, None, None, None]
        out = net(abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t).sample
        total = F.mse_loss(out, noise) if denoise else out.sum() * 0
        if predictor is not None:
            c = predictor.loss()
            ctx_losses.append(c.detach())
            total = total + c
        opt.zero_grad()
        total.backward()
        opt.step()
    hook.remove()
    return {"rms": torch.stack(rms), "ctx": torch.stack(ctx_losses) if ctx_losses else None}


@pytest.fixture(scope="module")
def runs() -> dict:
    return {
        "alone": _train("features", denoise=False),
        "beside": _train("features", denoise=True),
        "reference": _train(None, denoise=True),  # the same run without context
    }


@pytest.mark.parametrize("run", ["alone", "beside"])
def test_feature_context_stays_bounded_on_a_diffusers_unet(runs, run) -> None:
    r = runs[run]
    assert torch.isfinite(r["ctx"]).all()
    # bounded: never far above its start (the raw feature context grew 100x-1e6x here)
    assert float(r["ctx"].max()) <= 1.5 * float(r["ctx"][:5].max())
    # the hooked features keep their scale: within 3x of the same run without context
    # (context alone: the untrained network, whose RMS the run starts from)
    ref = runs["reference"]["rms"] if run == "beside" else r["rms"][:1].expand(STEPS)
    ratio = r["rms"] / ref
    assert float(ratio.max()) <= 3.0 and float(ratio.min()) >= 1 / 3, (
        float(ratio.max()), float(ratio.min()))


def test_scale_free_space_is_invariant_to_scale_and_per_sample_offsets() -> None:
    x = torch.randn(3, 5, 6, 6)
    offset = torch.randn(3, 5, 1, 1) * 10  # e.g. a timestep embedding added per sample
    y = standardize_features(x)
    torch.testing.assert_close(standardize_features(4 * x + offset), y, atol=1e-4, rtol=1e-4)
    # batch statistics do not remove a per-sample offset: that is the collapse direction
    yb = standardize_features(x, "batch")
    assert not torch.allclose(standardize_features(x + offset, "batch"), yb, atol=1e-2)
    tokens = x.flatten(2).transpose(1, 2)  # (B, L, C)
    torch.testing.assert_close(
        standardize_features(tokens, token_layout=True), y.flatten(2).transpose(1, 2))


def test_head_reads_the_standardized_features() -> None:
    """Scaling the layer output changes neither the loss nor (up to the scale) its gradient."""
    loss = ctxpred.ContextPredictionLoss(
        FeatureNeighborhood(strides=(1,)), GaussianSamplingHead(out_channels=4, in_channels=4),
        points=None)
    h = torch.randn(2, 4, 5, 5, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    a = loss(h, generator=g)
    g.manual_seed(0)
    b = loss(10 * h + 3, generator=g)
    assert a.item() == pytest.approx(b.item(), rel=1e-4)
    raw = ctxpred.ContextPredictionLoss(
        FeatureNeighborhood(strides=(1,), normalize="none"), loss.head, points=None)
    g.manual_seed(0)
    c = raw(10 * h, generator=g)
    assert c.item() > 10 * a.item()  # the raw feature context grows with the features
