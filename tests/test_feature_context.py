"""The feature context cannot run away: a real diffusers UNet, 200 Adam steps at lr 3e-3."""

from __future__ import annotations

import pytest
import torch

import ctxpred
from ctxpred import FeatureNeighborhood, GaussianSamplingHead
from ctxpred.neighborhoods import standardize_features

diffusers = pytest.importorskip("diffusers")

STEPS = 200


def _train(context: str | None, denoise: bool) -> dict:
    from benchmarks.feature_context import train_unet

    return train_unet("instance+anchor" if context else None, denoise, steps=STEPS)


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
        points=None, scale_anchor=0.0, weight=1.0)
    h = torch.randn(2, 4, 5, 5, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    a = loss(h, generator=g)
    g.manual_seed(0)
    b = loss(10 * h + 3 * torch.randn(2, 4, 1, 1), generator=g)
    assert a.item() == pytest.approx(b.item(), rel=1e-4)
    # the scale anchor: beta * (log rms(h) - log rms_0)^2, rms_0 from the first call
    anchored = ctxpred.ContextPredictionLoss(
        FeatureNeighborhood(strides=(1,)), loss.head, points=None, scale_anchor=2.0, weight=1.0)
    g.manual_seed(0)
    first = anchored(h, generator=g)
    assert first.item() == pytest.approx(a.item(), rel=1e-5)  # zero at the anchored scale
    rms0 = h.detach().pow(2).mean().sqrt()
    assert anchored.anchor_rms.item() == pytest.approx(rms0.item())
    g.manual_seed(0)
    scaled = anchored(3 * h, generator=g)
    expected = a.item() + 2.0 * torch.log(torch.tensor(3.0)).item() ** 2
    assert scaled.item() == pytest.approx(expected, rel=1e-4)
    state = anchored.state_dict()
    assert "anchor_rms" in state
    fresh = ctxpred.ContextPredictionLoss(
        FeatureNeighborhood(strides=(1,)), GaussianSamplingHead(out_channels=4, in_channels=4))
    fresh.load_state_dict(state)
    assert fresh.anchor_rms.item() == pytest.approx(rms0.item())
    del state["anchor_rms"]  # a checkpoint from before the anchor: it anchors afresh
    fresh.load_state_dict(state)
    assert torch.isnan(fresh.anchor_rms)
    raw = ctxpred.ContextPredictionLoss(
        FeatureNeighborhood(strides=(1,), normalize="none"), loss.head, points=None)
    g.manual_seed(0)
    c = raw(10 * h, generator=g)
    assert c.item() > 10 * a.item()  # the raw feature context grows with the features
