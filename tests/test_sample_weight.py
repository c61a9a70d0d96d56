"""Per-sample weights of the context loss against a naive per-sample oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ctxpred
from ctxpred import ContextPredictionLoss, MomentHead, NaiveHead, PixelNeighborhood
from ctxpred.errors import DTypeError, ShapeError, ValueRangeError


def _loss(head: str) -> ContextPredictionLoss:
    torch.manual_seed(0)
    h = (NaiveHead(out_channels=2, in_channels=5, num_strides=2) if head == "naive"
         else MomentHead(out_channels=2, in_channels=5, num_strides=2))
    return ContextPredictionLoss(PixelNeighborhood(strides=(1, 2)), h, weight=0.7,
                                 stride_weights=(0.25, 0.75))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0, 3), min_size=3, max_size=3), st.sampled_from(["naive", "moment"]))
def test_sample_weight_matches_per_sample_oracle(weights, head) -> None:
    loss_fn = _loss(head)
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(3, 5, 6, 6, generator=gen, requires_grad=True)
    target = torch.randn(3, 2, 6, 6, generator=gen)
    w = torch.tensor(weights)
    got = loss_fn(features, target, sample_weight=w)
    # oracle: the loss of each sample alone, weighted, averaged over the batch (divided by B)
    oracle = sum(w[b] * loss_fn(features[b:b + 1], target[b:b + 1]) for b in range(3)) / 3
    assert got.item() == pytest.approx(oracle.item(), rel=1e-5, abs=1e-7)
    g_got, = torch.autograd.grad(got, features)
    g_oracle, = torch.autograd.grad(oracle, features)
    torch.testing.assert_close(g_got, g_oracle, rtol=1e-4, atol=1e-6)


def test_sample_weight_of_ones_changes_nothing_and_zero_removes_a_sample() -> None:
    loss_fn = _loss("naive")
    features, target = torch.randn(2, 5, 4, 4), torch.randn(2, 2, 4, 4)
    plain = loss_fn(features, target)
    assert loss_fn(features, target, sample_weight=torch.ones(2)).item() == pytest.approx(
        plain.item())
    only_first = loss_fn(features, target, sample_weight=torch.tensor([2.0, 0.0]))
    assert only_first.item() == pytest.approx(loss_fn(features[:1], target[:1]).item(), rel=1e-6)
    terms = loss_fn.terms(features, target, sample_weight=torch.tensor([2.0, 0.0]))
    assert terms.total.item() == pytest.approx(only_first.item())


def test_predictor_loss_passes_sample_weight_to_every_layer() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.Conv2d(5, 5, 3, padding=1))
    losses = {"0": _loss("naive"), "1": _loss("moment")}
    predictor = ctxpred.attach(net, losses)
    x = torch.randn(3, 2, 6, 6)
    w = torch.tensor([0.0, 1.0, 2.0])
    net(x)
    got = predictor.losses(target=x, sample_weight=w)
    net(x)
    total = predictor.loss(target=x, sample_weight=w)
    h0 = net[0](x)
    h1 = net[1](h0)
    for name, h in (("0", h0), ("1", h1)):
        oracle = sum(w[b] * losses[name](h[b:b + 1], x[b:b + 1]) for b in range(3)) / 3
        assert got[name].item() == pytest.approx(oracle.item(), rel=1e-5)
    assert total.item() == pytest.approx(sum(v.item() for v in got.values()), rel=1e-6)


@pytest.mark.parametrize("bad, error, match", [
    (torch.ones(3), ShapeError, r"\(B,\) = \(2,\)"),
    (torch.ones(2, 1), ShapeError, "shape"),
    (torch.ones(2, dtype=torch.long), DTypeError, "floating-point"),
    ([1.0, 1.0], DTypeError, "floating-point"),
    (torch.tensor([1.0, -1.0]), ValueRangeError, "finite and >= 0"),
    (torch.tensor([1.0, float("nan")]), ValueRangeError, "finite and >= 0"),
])
def test_bad_sample_weight_is_a_clear_error(bad, error, match) -> None:
    loss_fn = _loss("naive")
    with pytest.raises(error, match=match):
        loss_fn(torch.randn(2, 5, 4, 4), torch.randn(2, 2, 4, 4), sample_weight=bad)
