"""attach(): hooks that capture without detaching, release, removal, EMA copies, checkpointing."""

from __future__ import annotations

import copy
import dataclasses
import gc
import inspect
import io
import pickle
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import ctxpred
from ctxpred import (
    CaptureError,
    ContextPredictionLoss,
    GaussianSamplingHead,
    PixelNeighborhood,
    ValueRangeError,
)


@dataclasses.dataclass
class BlockOutput:
    sample: torch.Tensor
    extra: int = 0


class Block(nn.Module):
    def __init__(self, c_in, c_out, returns="tensor", use_checkpoint=False):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.returns, self.use_checkpoint = returns, use_checkpoint

    def _inner(self, x):
        return torch.nn.functional.silu(self.conv(x))

    def forward(self, x):
        if self.use_checkpoint:
            h = checkpoint(self._inner, x, use_reentrant=False)
        else:
            h = self._inner(x)
        if self.returns == "tuple":
            return h, x.mean()
        if self.returns == "dataclass":
            return BlockOutput(h)
        return h


class Net(nn.Module):
    def __init__(self, returns="tensor", use_checkpoint=False):
        super().__init__()
        self.down = Block(3, 8)
        self.mid = Block(8, 8, returns=returns, use_checkpoint=use_checkpoint)
        self.up = Block(8, 8, use_checkpoint=use_checkpoint)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        h = self.down(x)
        m = self.mid(h)
        if isinstance(m, tuple):
            m = m[0]
        elif isinstance(m, BlockOutput):
            m = m.sample
        return self.out(self.up(m))


def _loss(in_channels=8, **kw):
    return ContextPredictionLoss(
        PixelNeighborhood(strides=(1, 2)),
        GaussianSamplingHead(3, in_channels, num_samples=4, num_strides=2), **kw,
    )


def _step(model, predictor, x, seed=0):
    torch.manual_seed(seed)
    out = model(x)
    return ((out - x) ** 2).mean() + predictor.loss(target=x)


def test_grads_reach_backbone_and_heads():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    predictor = ctxpred.attach(model, {"mid": _loss(), "up": _loss(weight=0.5)})
    torch.manual_seed(1)
    model(x)
    ctx = predictor.loss(target=x)
    ctx.backward()
    # only the context loss was backpropagated: its gradient reached the backbone below the hooks
    assert model.down.conv.weight.grad.abs().sum() > 0
    assert model.out.weight.grad is None  # above the hooked layers, untouched
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in predictor.heads.parameters())
    assert set(predictor.heads) == {"mid", "up"}
    assert set(predictor.last_losses) == {"mid", "up"}
    torch.testing.assert_close(sum(predictor.last_losses.values()), ctx.detach())


def test_wrong_name_lists_close_matches():
    with pytest.raises(ValueRangeError, match=r"no submodule named 'mdi'.*'mid'"):
        ctxpred.attach(Net(), {"mdi": _loss()})
    with pytest.raises(ValueRangeError, match="ContextPredictionLoss"):
        ctxpred.attach(Net(), {"mid": nn.MSELoss()})
    with pytest.raises(ValueRangeError, match="selectors name layers without a loss"):
        ctxpred.attach(Net(), {"mid": _loss()}, selectors={"up": 0})
    shared = _loss()  # one loss object for two layers: its name and head were silently mixed
    with pytest.raises(ValueRangeError, match=r"'mid' and 'up' share one loss object"):
        ctxpred.attach(Net(), {"mid": shared, "up": shared})


@pytest.mark.parametrize("returns", ["tuple", "dataclass"])
def test_non_tensor_output_needs_a_selector(returns):
    model, x = Net(returns), torch.randn(1, 3, 8, 8)
    predictor = ctxpred.attach(model, {"mid": _loss()})
    with pytest.raises(CaptureError, match=r"layer 'mid' returned .*selectors="):
        model(x)
    predictor.remove()
    for selector in (0 if returns == "tuple" else "sample", lambda out: out[0]
                     if isinstance(out, tuple) else out.sample):
        with ctxpred.attach(model, {"mid": _loss()}, selectors={"mid": selector}) as predictor:
            model(x)
            assert predictor.captured["mid"].shape == (1, 8, 8, 8)
            assert torch.isfinite(predictor.loss(target=x))


def test_captures_are_released_and_do_not_leak():
    model, x = Net(), torch.randn(1, 3, 8, 8)
    predictor = ctxpred.attach(model, {"mid": _loss()})
    model(x)
    first = weakref.ref(predictor.captured["mid"])
    model(x)  # a forward without loss(): the capture is overwritten, not accumulated
    gc.collect()
    assert first() is None and len(predictor.captured) == 1
    predictor.loss(target=x)
    assert predictor.captured == {}
    with pytest.raises(CaptureError, match="no captured output"):
        predictor.loss(target=x)


def test_heads_stay_out_of_the_model_and_its_copies():
    model = Net()
    keys = list(model.state_dict())
    predictor = ctxpred.attach(model, {"mid": _loss(), "up": _loss()})
    assert list(model.state_dict()) == keys
    head_params = {id(p) for p in predictor.heads.parameters()}
    ema = copy.deepcopy(model)
    assert not head_params & {id(p) for p in ema.parameters()}
    assert list(ema.state_dict()) == keys
    ema(torch.randn(1, 3, 8, 8))  # hooks in the copy are inert
    assert predictor.captured == {}
    pickle.loads(pickle.dumps(model))(torch.randn(1, 3, 8, 8))
    torch.save(model, io.BytesIO())
    wrapper = predictor.training_module()
    assert {k.split(".")[0] for k in wrapper.state_dict()} == {"model", "heads"}


def _feature_context(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 3, 3, padding=1))
    loss = ContextPredictionLoss(ctxpred.FeatureNeighborhood((1, 2)),
                                 GaussianSamplingHead(16, 16, num_strides=2), weight=1.0)
    return model, ctxpred.attach(model, {"0": loss})


def test_resuming_from_the_training_checkpoint_keeps_the_scale_anchor():
    """The feature-context loss anchors the features' RMS at its first call (a buffer of the
    loss, not of a head); a resumed run must keep that anchor, or its objective changes (the
    training module's state_dict used to hold model and heads only)."""
    x = torch.randn(4, 3, 8, 8)
    model, predictor = _feature_context()
    assert not any(k.startswith("losses.") for k in predictor.training_module().state_dict())
    model(x)
    predictor.loss()  # anchors
    with torch.no_grad():
        model[0].weight.mul_(3.0)  # the features grow, as training may make them
    model(x)
    before = predictor.loss(generator=torch.Generator().manual_seed(1))
    state = predictor.training_module().state_dict()
    assert torch.equal(state["losses.0.anchor_rms"], predictor.loss_modules["0"].anchor_rms)
    resumed, again = _feature_context(seed=1)
    again.training_module().load_state_dict(state)  # strict: every key has its place
    resumed(x)
    after = again.loss(generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # a checkpoint from before the anchor was saved still loads (the anchor is taken afresh)
    _, old = _feature_context()
    old_state = {k: v for k, v in state.items() if not k.startswith("losses.")}
    old.training_module().load_state_dict(old_state)
    assert torch.isnan(old.loss_modules["0"].anchor_rms)
    # a loss state for a layer this predictor does not have is an unexpected key
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*losses\.mid\.anchor_rms"):
        again.training_module().load_state_dict({**state, "losses.mid.anchor_rms": torch.ones(())})


def test_remove_restores_the_exact_function():
    torch.manual_seed(0)
    model = Net()
    untouched = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    with ctxpred.attach(model, {"mid": _loss()}) as predictor:
        assert predictor.attached
        opt = torch.optim.SGD(predictor.parameters(), lr=0.1)
        _step(model, predictor, x).backward()
        opt.step()  # only heads are optimized here: the model itself is unchanged
        model.zero_grad()
    assert not predictor.attached
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(model(x), untouched(x))


def test_gradient_checkpointing_non_reentrant_matches_and_captures_nothing_in_backward():
    x = torch.randn(2, 3, 8, 8)
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        model = Net(use_checkpoint=use_checkpoint)
        loss_fn = _loss()
        torch.manual_seed(1)
        loss_fn.head(torch.randn(1, 1, 8))
        predictor = ctxpred.attach(model, {"mid": loss_fn, "up": _loss()})
        torch.manual_seed(2)
        predictor.heads["up"].load_state_dict(GaussianSamplingHead(3, 8, num_samples=4,
                                                                   num_strides=2).state_dict())
        _step(model, predictor, x, seed=3).backward()
        assert predictor.captured == {}  # the recomputation in backward did not re-capture
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        predictor.remove()
    torch.testing.assert_close(grads[0], grads[1])


def test_autocast_bf16_on_cpu():
    """Under bf16 autocast the captures are bf16, the loss float32, and loss and backbone
    gradients match the float32 step within bf16 rounding."""
    values, grads = [], []
    for autocast in (False, True):
        torch.manual_seed(0)
        model, x = Net(), torch.randn(2, 3, 8, 8)
        predictor = ctxpred.attach(model, {"mid": _loss(), "up": _loss()})
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
            expected_dtype = torch.bfloat16 if autocast else torch.float32
            assert predictor.captured["mid"].dtype == expected_dtype
            loss = ((out.float() - x) ** 2).mean() + predictor.loss(
                target=x, generator=torch.Generator().manual_seed(1))
        assert loss.dtype == torch.float32
        loss.backward()
        values.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        predictor.remove()
    torch.testing.assert_close(values[1], values[0], rtol=2e-2, atol=1e-3)
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cosine > 0.99, cosine
    torch.testing.assert_close(grads[1].norm(), grads[0].norm(), rtol=5e-2, atol=0)


def test_lazy_heads_initialize_before_the_optimizer():
    model, x = Net(), torch.randn(1, 3, 8, 8)
    predictor = ctxpred.attach(model, {"mid": _loss(in_channels=None)})
    assert not predictor.heads["mid"].initialized
    predictor.initialize(x)
    assert predictor.heads["mid"].initialized and predictor.captured == {}
    assert predictor.heads["mid"].encoder.weight.shape == (2 * 2 * 16, 8)
    torch.optim.Adam(predictor.parameters())


def _naive_oracle(head, feats, target):
    """Loop oracle of a NaiveHead loss with strides (1,): the head read at each cell, mean
    squared error over the in-grid slots (row-major 3x3 ring), mean over cells and batch."""
    batch, _, height, width = feats.shape
    deltas = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc]
    total = 0.0
    for b in range(batch):
        for r in range(height):
            for c in range(width):
                pred = head(feats[b, :, r, c].reshape(1, 1, -1))[0, 0, 0]  # (8, C)
                errors = [((pred[k] - target[b, :, r + dr, c + dc]) ** 2).sum()
                          for k, (dr, dc) in enumerate(deltas)
                          if 0 <= r + dr < height and 0 <= c + dc < width]
                total = total + torch.stack(errors).mean()
    return total / (batch * height * width)


def test_targets_per_layer_and_feature_targets():
    """A target mapping feeds 'mid'; the feature layer 'up' reads its own features, detached (a
    stop-gradient: its target carries no gradient); both equal a loop oracle, and one target
    tensor gives the same as the mapping (the feature layer takes none)."""
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    pixel = ContextPredictionLoss(PixelNeighborhood(strides=(1,)), ctxpred.NaiveHead(3, 8, 8),
                                  weight=1.0)
    # raw (not standardized) feature context where the extractor offers the choice
    raw = ({"normalize": "none"} if "normalize" in inspect.signature(
        ctxpred.FeatureNeighborhood).parameters else {})
    feature = ContextPredictionLoss(ctxpred.FeatureNeighborhood(strides=(1,), **raw),
                                    ctxpred.NaiveHead(8, 8, 8), weight=1.0)
    predictor = ctxpred.attach(model, {"mid": pixel, "up": feature})
    model(x)
    mid, up = predictor.captured["mid"], predictor.captured["up"]
    losses = predictor.losses({"mid": x})
    assert set(losses) == {"mid", "up"}
    torch.testing.assert_close(losses["mid"], _naive_oracle(pixel.head, mid, x))
    oracle_up = _naive_oracle(feature.head, up, up.detach())
    torch.testing.assert_close(losses["up"], oracle_up)
    (got,) = torch.autograd.grad(losses["up"], up, retain_graph=True)
    (expected,) = torch.autograd.grad(oracle_up, up)
    torch.testing.assert_close(got, expected)  # no gradient through the (detached) target
    model(x)
    single = predictor.losses(x)
    for name in ("mid", "up"):
        torch.testing.assert_close(single[name], losses[name])


def test_token_outputs_with_grid_shape():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 16)
            self.block = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16))

        def forward(self, x):  # (B, 3, h, w) -> tokens (B, h*w, 16)
            return self.block(self.embed(x.flatten(2).transpose(1, 2)))

    model, x = Tokens(), torch.randn(2, 3, 4, 4)
    ids = torch.randint(0, 5, (2, 16))
    loss = ContextPredictionLoss(
        ctxpred.TokenNeighborhood(strides=(1,), grid_shape=(4, 4)), ctxpred.CategoricalHead(5))
    with ctxpred.attach(model, {"block": loss}) as predictor:
        predictor.initialize(x)
        model(x)
        value = predictor.loss(target=ids)
        value.backward()
    assert model.embed.weight.grad.abs().sum() > 0


def test_generator_makes_the_step_reproducible_without_the_global_rng():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    predictor = ctxpred.attach(model, {"mid": _loss(points=5), "up": _loss(points=7)})
    values = []
    for global_seed in (1, 2):
        model(x)
        torch.manual_seed(global_seed)  # the global RNG differs, the generator is the same
        values.append(predictor.losses(target=x, generator=torch.Generator().manual_seed(3)))
    for name in ("mid", "up"):
        torch.testing.assert_close(values[0][name], values[1][name], rtol=0, atol=0)
    model(x)
    other = predictor.loss(target=x, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(other, sum(values[0].values()))
