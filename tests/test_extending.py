"""A head and an estimator defined *here*, outside ctxpred, plug into the loss and attach.

Nothing in ctxpred knows ``MeanHead`` or ``"hungarian_loop"``: the head subclasses
``ctxpred.ContextHead`` (forward + divergence), the estimator goes through
``ctxpred.wasserstein.register_estimator``. Both are checked against independent oracles (a
Python loop over grid coordinates; the built-in exact estimator) and trained with ``attach``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import ctxpred
from ctxpred.heads import match_strides
from ctxpred.wasserstein import available_estimators, register_estimator, unregister_estimator


class MeanHead(ctxpred.ContextHead):
    """Predicts the mean of each point's valid neighbors per stride; squared-error divergence."""

    def __init__(self, out_channels, in_channels=None, *, num_strides=1):
        super().__init__(out_channels, in_channels, num_strides)
        self.proj = nn.Linear(in_channels, num_strides * out_channels)

    def forward(self, z, generator=None):
        return self.proj(self.points(z)).unflatten(-1, (self.num_strides, self.out_channels))

    def divergence(self, prediction, neighbors, estimator=None, *, match_mask=False):
        weight = neighbors.mask.unsqueeze(-1).to(prediction.dtype)
        mean = (neighbors.values * weight).sum(-2) / weight.sum(-2).clamp_min(1.0)
        pred = match_strides(prediction, neighbors.values.shape[2], "MeanHead")
        return (pred - mean).square().sum(-1) * neighbors.mask.any(-1)


CALLS: list[dict] = []


def hungarian_loop(x, y, x_weights=None, y_weights=None, *, scale=1.0, **options):
    """Exact W_2^2 problem by problem with scipy (equal numbers of kept points per problem)."""
    CALLS.append({"x": tuple(x.shape), "y": tuple(y.shape), "options": options})
    flat_x, flat_y = x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:])
    xw = None if x_weights is None else x_weights.reshape(-1, x.shape[-2])
    yw = None if y_weights is None else y_weights.reshape(-1, y.shape[-2])
    values = []
    for i in range(flat_x.shape[0]):
        a = flat_x[i] if xw is None else flat_x[i][xw[i] > 0]
        b = flat_y[i] if yw is None else flat_y[i][yw[i] > 0]
        if len(a) == 0 or len(b) == 0:
            values.append(flat_x.new_zeros(()))
            continue
        cost = torch.cdist(a, b).square()
        rows, cols = linear_sum_assignment(cost.detach().numpy())
        values.append(cost[rows, cols].mean())
    return scale * torch.stack(values).reshape(x.shape[:-2])


@pytest.fixture
def registered():
    CALLS.clear()
    register_estimator("hungarian_loop", hungarian_loop)
    yield "hungarian_loop"
    unregister_estimator("hungarian_loop")
    assert "hungarian_loop" not in available_estimators()


def _oracle_means(target, points, strides):
    """Mean of the in-grid neighbors of each point, by a loop over 2-D coordinates."""
    b, c, h, w = target.shape
    out = torch.zeros(b, len(points), len(strides), c, dtype=torch.float64)
    for pi, flat in enumerate(points.tolist()):
        r, q = divmod(flat, w)
        for si, s in enumerate(strides):
            cells = [(r + s * dr, q + s * dq) for dr in (-1, 0, 1) for dq in (-1, 0, 1)
                     if (dr, dq) != (0, 0) and 0 <= r + s * dr < h and 0 <= q + s * dq < w]
            if cells:
                out[:, pi, si] = torch.stack([target[:, :, y, x] for y, x in cells]).mean(0)
    return out


def test_custom_head_matches_an_independent_loop():
    torch.manual_seed(0)
    head = MeanHead(3, in_channels=8, num_strides=2)
    loss_fn = ctxpred.ContextPredictionLoss(ctxpred.PixelNeighborhood(strides=(1, 2)), head,
                                           weight=1.0)
    features, target = torch.randn(2, 8, 5, 5), torch.randn(2, 3, 5, 5)
    terms = loss_fn.terms(features, target)
    pred = head(features.flatten(2).transpose(1, 2)).double()
    means = _oracle_means(target.double(), torch.arange(25), (1, 2))
    want = (pred - means).square().sum(-1)
    torch.testing.assert_close(terms.per_point.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.total.double(), want.mean(1).mean(0).mean(), rtol=1e-5,
                               atol=1e-6)


def test_registered_estimator_is_called_by_name_and_matches_exact(registered):
    torch.manual_seed(0)
    neighborhood = ctxpred.PixelNeighborhood(strides=(1, 2))
    head = ctxpred.GaussianSamplingHead(3, in_channels=8, num_samples=8, num_strides=2)
    features, target = torch.randn(2, 8, 4, 4), torch.randn(2, 3, 4, 4)
    mine = ctxpred.ContextPredictionLoss(neighborhood, head, registered, match_mask=True,
                                         estimator_options={"scale": 2.0})
    exact = ctxpred.ContextPredictionLoss(neighborhood, head, "exact", match_mask=True)
    got = mine.terms(features, target, generator=torch.Generator().manual_seed(1))
    ref = exact.terms(features, target, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got.per_point, 2.0 * ref.per_point, rtol=1e-4, atol=1e-5)
    assert CALLS[-1] == {"x": (2, 16, 2, 8, 3), "y": (2, 16, 2, 8, 3),
                         "options": {"check_finite": False}}
    x = torch.randn(5, 4, 2)
    assert torch.allclose(ctxpred.functional.wasserstein(x, x.flip(1), method=registered),
                          torch.zeros(5), atol=1e-6)


def test_registry_refuses_builtin_and_duplicate_names(registered):
    with pytest.raises(ctxpred.ValueRangeError, match="built-in"):
        register_estimator("exact", hungarian_loop)
    with pytest.raises(ctxpred.ValueRangeError, match="already registered"):
        register_estimator(registered, hungarian_loop)
    register_estimator(registered, hungarian_loop, overwrite=True)
    with pytest.raises(ctxpred.ValueRangeError, match="hungarian_loop"):
        ctxpred.functional.wasserstein(torch.zeros(1, 2, 1), torch.zeros(1, 2, 1), method="nope")


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.out(torch.relu(self.mid(torch.relu(self.enc(x)))))


def test_custom_head_and_estimator_train_through_attach(registered):
    torch.manual_seed(0)
    model = TinyNet()
    losses = {
        "enc": ctxpred.ContextPredictionLoss(
            ctxpred.PixelNeighborhood(strides=(1, 2)), MeanHead(3, in_channels=8, num_strides=2)),
        "mid": ctxpred.ContextPredictionLoss(
            ctxpred.PixelNeighborhood(strides=(1,)),
            ctxpred.GaussianSamplingHead(3, in_channels=8, num_samples=8),
            registered, points=6, match_mask=True),
    }
    predictor = ctxpred.attach(model, losses)
    opt = torch.optim.Adam([*model.parameters(), *predictor.heads.parameters()], lr=1e-2)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 6), torch.linspace(-1, 1, 6), indexing="ij")
    image = torch.stack([xx, yy, xx * yy]).expand(2, 3, 6, 6)  # smooth: predictable context
    history = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        out = model(image)
        parts = predictor.losses(target=image, generator=gen)
        total = (out - image).square().mean() + sum(parts.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in parts.items()})
    assert CALLS, "the registered estimator was never called"
    for layer in ("enc", "mid"):
        first = np.mean([h[layer] for h in history[:5]])
        last = np.mean([h[layer] for h in history[-5:]])
        assert last < 0.5 * first, (layer, first, last)
    assert all(p.grad is not None for p in predictor.heads.parameters())
    predictor.remove()


def test_estimator_modules_share_one_base_and_a_new_one_plugs_in():
    from ctxpred.wasserstein import (
        EstimatorModule,
        ExactWasserstein,
        GaussianWasserstein,
        SinkhornWasserstein,
        SlicedWasserstein,
        wasserstein,
    )

    x, y = torch.randn(3, 6, 2), torch.randn(3, 6, 2)
    for module, method, options in [
        (ExactWasserstein(p=1), "exact", {"p": 1}),
        (SinkhornWasserstein(iterations=7, debias=True), "sinkhorn",
         {"iterations": 7, "debias": True}),
        (SlicedWasserstein(num_projections=5, seed=3), "sliced", {"num_projections": 5, "seed": 3}),
        (GaussianWasserstein(covariance="diag"), "gaussian", {"covariance": "diag"}),
    ]:
        assert isinstance(module, EstimatorModule)
        torch.testing.assert_close(module(x, y), wasserstein(x, y, method=method, **options))
        assert all(f"{k}={v!r}" in repr(module) for k, v in options.items())
    module = ExactWasserstein()
    module.p = 1  # options are read at call time
    torch.testing.assert_close(module(x, y), wasserstein(x, y, method="exact", p=1))

    class Hungarian(EstimatorModule):
        function = staticmethod(hungarian_loop)

        def __init__(self, scale=1.0):
            super().__init__(scale=scale)

    loss_fn = ctxpred.ContextPredictionLoss(
        ctxpred.PixelNeighborhood(), ctxpred.GaussianSamplingHead(3, 8, num_samples=8),
        Hungarian(scale=3.0), match_mask=True)
    exact = ctxpred.ContextPredictionLoss(
        ctxpred.PixelNeighborhood(), loss_fn.head, "exact", match_mask=True)
    features, target = torch.randn(1, 8, 3, 3), torch.randn(1, 3, 3, 3)
    torch.testing.assert_close(
        loss_fn(features, target, generator=torch.Generator().manual_seed(0)),
        3.0 * exact(features, target, generator=torch.Generator().manual_seed(0)))


def test_a_head_without_divergence_is_refused_when_the_loss_is_built():
    class NoDivergence(ctxpred.ContextHead):
        def forward(self, z, generator=None):
            return self.points(z)

    with pytest.raises(ctxpred.ValueRangeError, match="does not define divergence"):
        ctxpred.ContextPredictionLoss(ctxpred.PixelNeighborhood(), NoDivergence(3, 4, 1))
    with pytest.raises(ctxpred.ValueRangeError, match="forward and divergence"):
        ctxpred.ContextPredictionLoss(ctxpred.PixelNeighborhood(), ctxpred.ContextHead(3, 4, 1))
