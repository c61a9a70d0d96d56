"""Query-point subsets: the head reads the features at exactly the points whose neighbors it is
compared with (issue 13: a mutation making the head read points ``0..P-1`` passed every test).

The oracle is a naive Python loop over samples, reported query points, strides and neighbor
offsets: it reads the layer's features at the point's own grid coordinates, runs the head on that
single vector, gathers the target's in-grid neighbors by explicit coordinates, and averages the
squared errors of a :class:`~ctxpred.NaiveHead` (a deterministic head, so the values must agree
to float precision).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import ctxpred
from ctxpred import ContextPredictionLoss, NaiveHead, PixelNeighborhood

STRIDES = (1, 2)
DELTAS = [d for d in itertools.product((-1, 0, 1), repeat=2) if any(d)]  # slot order


def _oracle(head, weight, feats, target, points, stride_weights=None):
    """``(per_point (B, P, S), total)`` by loops; ``points`` as reported, ``(P,)`` or ``(B, P)``."""
    batch, _, height, width = feats.shape
    if points.dim() == 1:
        points = points.expand(batch, -1)
    per_point = torch.zeros(batch, points.shape[1], len(STRIDES), dtype=feats.dtype)
    valid = torch.zeros(batch, points.shape[1], len(STRIDES), dtype=torch.bool)
    for b in range(batch):
        for j, flat in enumerate(points[b].tolist()):
            r, c = divmod(flat, width)
            z = feats[b, :, r, c].reshape(1, 1, -1)  # the head's input: this point's features
            pred = head(z)[0, 0]  # (S, K_s, C)
            for s, stride in enumerate(STRIDES):
                errors = []
                for k, (dr, dc) in enumerate(DELTAS):
                    rr, cc = r + stride * dr, c + stride * dc
                    if 0 <= rr < height and 0 <= cc < width:
                        errors.append(((pred[s, k] - target[b, :, rr, cc]) ** 2).sum())
                if errors:
                    per_point[b, j, s] = torch.stack(errors).mean()
                    valid[b, j, s] = True
    count = valid.sum(1).clamp_min(1)
    per_stride = ((per_point * valid).sum(1) / count).mean(0)
    w = (torch.full((len(STRIDES),), 1 / len(STRIDES)) if stride_weights is None
         else torch.tensor(stride_weights))
    return per_point, weight * (per_stride * w).sum()


def _loss(points, **kw):
    torch.manual_seed(0)
    head = NaiveHead(3, num_slots=8, in_channels=6, num_strides=len(STRIDES))
    kw.setdefault("weight", 1.0)  # the oracles below sum unweighted divergences
    return ContextPredictionLoss(PixelNeighborhood(strides=STRIDES), head, points=points, **kw)


@pytest.mark.parametrize("points", [5, 0.25, 40], ids=["count", "fraction", "clamped"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_head_reads_the_sampled_points(points, seed):
    g = torch.Generator().manual_seed(100 + seed)
    feats = torch.randn(2, 6, 5, 6, generator=g, dtype=torch.float64)
    target = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    loss_fn = _loss(points, weight=0.7, stride_weights=(1.0, 0.5)).double()
    terms = loss_fn.terms(feats, target, generator=torch.Generator().manual_seed(seed))
    expected_count = {5: 5, 0.25: round(0.25 * 30), 40: 30}[points]
    assert terms.points.shape[-1] == expected_count
    flat = terms.points.reshape(-1, expected_count)
    for row in flat:  # distinct points on the grid
        assert row.unique().numel() == expected_count and 0 <= row.min() and row.max() < 30
    per_point, total = _oracle(loss_fn.head, 0.7, feats, target, terms.points, (1.0, 0.5))
    torch.testing.assert_close(terms.per_point, per_point)
    torch.testing.assert_close(terms.total, total)
    torch.testing.assert_close(
        loss_fn(feats, target, generator=torch.Generator().manual_seed(seed)), total)


def test_subsets_are_random_not_the_first_points():
    feats, target = torch.randn(1, 6, 5, 6), torch.randn(1, 3, 5, 6)
    loss_fn = _loss(5)
    subsets = {tuple(sorted(loss_fn.terms(feats, target, generator=torch.Generator()
                                         .manual_seed(seed)).points.flatten().tolist()))
               for seed in range(6)}
    assert len(subsets) > 1 and tuple(range(5)) not in subsets


def test_attached_predictor_reads_the_sampled_points():
    """Through attach(): the hooked layer's output is read at the subset's points."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Tanh(),
                                torch.nn.Conv2d(6, 3, 1))
    loss_fn = _loss(7).double()
    model.double()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    with ctxpred.attach(model, {"1": loss_fn}) as predictor:
        model(x)
        features = predictor.captured["1"]
        value = predictor.loss(target=x, generator=torch.Generator().manual_seed(9))
    points = loss_fn.terms(features, x, generator=torch.Generator().manual_seed(9)).points
    _, total = _oracle(loss_fn.head, 1.0, features.detach(), x, points)
    torch.testing.assert_close(value.detach(), total)
