"""ContextPredictionLoss and its functional parts, against naive loops, POT and scipy."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import ot
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxpred import (
    CategoricalHead,
    ContextPredictionLoss,
    DTypeError,
    FeatureNeighborhood,
    GaussianSamplingHead,
    MomentHead,
    NaiveHead,
    PixelNeighborhood,
    ShapeError,
    TokenNeighborhood,
    ValueRangeError,
)
from ctxpred._layout import resize_target
from ctxpred.functional import (
    categorical_divergence,
    moment_divergence,
    naive_divergence,
    neighbors,
    reduce_context_loss,
    sample_divergence,
)
from ctxpred.heads import CategoricalPrediction, MomentPrediction
from ctxpred.wasserstein import wasserstein

FAST = settings(max_examples=12, deadline=None)


def _random_mask(gen, shape, p=0.7):
    return torch.rand(shape, generator=gen) < p


@FAST
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=3), halvings=st.integers(0, 5),
       data=st.data())
def test_strided_layer_grids_pass_the_aspect_check(sizes, halvings, data):
    """Any chain of stride-2 layers, each rounding up or down per dimension, keeps its grid
    within less than one cell of ``source / 2^k``: the aspect check (which allows less than one
    cell, so that a transposed target on a small grid fails) accepts every such grid."""
    from ctxpred._checks import check_resize

    dest = []
    for s in sizes:
        d = s
        for _ in range(halvings):
            d = -(-d // 2) if data.draw(st.booleans()) or d < 2 else d // 2
        dest.append(d)
    check_resize(tuple(sizes), tuple(dest), "x")  # no ShapeError


# -- functional parts ----------------------------------------------------------------------------
def test_deprecated_group_by_stride_and_stride_index_still_work():
    nb = neighbors(torch.randn(2, 3, 6, 6), strides=(1, 2, 3))
    assert nb.values.shape == (2, 36, 3, 8, 3) and nb.mask.shape == (2, 36, 3, 8)
    flat_values, flat_mask = nb.values.flatten(2, 3), nb.mask.flatten(2, 3)
    with pytest.warns(DeprecationWarning, match="group_by_stride"):
        from ctxpred.functional import group_by_stride
    with pytest.warns(DeprecationWarning, match=r"\(B, P, S, K_s\)"):
        values, mask = group_by_stride(flat_values, flat_mask, 3)
    assert torch.equal(values, nb.values) and torch.equal(mask, nb.mask)
    with pytest.warns(DeprecationWarning):
        same = group_by_stride(nb.values, nb.mask, 3)  # already grouped: returned as it is
    assert same[0] is nb.values and same[1] is nb.mask
    with pytest.warns(DeprecationWarning, match="stride_index"):
        stride_index = nb.stride_index
    for s in range(3):
        sel = stride_index == s
        assert torch.equal(flat_values[:, :, sel], nb.values[:, :, s])
    with pytest.warns(DeprecationWarning), pytest.raises(ShapeError, match="do not split"):
        group_by_stride(flat_values, flat_mask, 5)


@FAST
@given(seed=st.integers(0, 2**16), strides=st.integers(1, 3), c=st.integers(1, 4))
def test_naive_divergence_matches_loop(seed, strides, c):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(2, 3, strides, 8, c, generator=g)
    values = torch.randn(2, 3, strides, 8, c, generator=g)
    mask = _random_mask(g, (2, 3, strides, 8))
    got = naive_divergence(pred, values, mask)
    want = torch.zeros(2, 3, strides)
    for idx in np.ndindex(2, 3, strides):
        errs = [float(((pred[idx][k] - values[idx][k]) ** 2).sum()) for k in range(8)
                if mask[idx][k]]
        want[idx] = sum(errs) / len(errs) if errs else 0.0
    torch.testing.assert_close(got, want)


@FAST
@given(seed=st.integers(0, 2**16), q=st.integers(2, 9))
def test_sample_divergence_matches_pot_emd2(seed, q):
    """Masked W_2^2 per problem vs POT's network simplex on the valid neighbors only.

    ``"exact"`` must agree tightly; the default ``"sinkhorn"`` is an entropic estimate from above
    (its accuracy on unequal problems is the estimator's business, tested there).
    """
    g = torch.Generator().manual_seed(seed)
    samples = torch.randn(2, 3, 2, q, 3, generator=g)
    values = torch.randn(2, 3, 2, 8, 3, generator=g)
    mask = _random_mask(g, (2, 3, 2, 8))
    mask[..., 0] = True
    exact = sample_divergence(samples, values, mask, "exact")
    entropic = sample_divergence(samples, values, mask)
    for idx in np.ndindex(2, 3, 2):
        x = samples[idx].double().numpy()
        y = values[idx][mask[idx]].double().numpy()
        ref = ot.emd2(np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y)),
                      ot.dist(x, y))
        assert exact[idx].item() == pytest.approx(ref, rel=1e-4, abs=1e-5)
        assert entropic[idx].item() >= ref - 1e-3


def test_sample_divergence_masked_slots_never_count_and_shared_head_broadcasts():
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(2, 4, 1, 6, 3, generator=g)
    values = torch.randn(2, 4, 3, 8, 3, generator=g)
    mask = _random_mask(g, (2, 4, 3, 8))
    base = sample_divergence(samples, values, mask, "exact")
    poisoned = torch.where(mask.unsqueeze(-1), values, torch.full_like(values, 1e4))
    torch.testing.assert_close(sample_divergence(samples, poisoned, mask, "exact"), base)
    per_stride = sample_divergence(samples.expand(-1, -1, 3, -1, -1), values, mask, "exact")
    torch.testing.assert_close(per_stride, base)


def test_sample_divergence_plumbing_to_a_custom_estimator():
    seen = {}

    def estimator(x, y, xw, yw):
        seen.update(x=x.shape, y=y.shape, xw=xw, yw=yw)
        return x.sum((-1, -2)) * 0

    samples = torch.randn(2, 5, 3, 4, 2).bfloat16()
    values, mask = torch.randn(2, 5, 3, 8, 2), torch.rand(2, 5, 3, 8) > 0.5
    out = sample_divergence(samples, values, mask, estimator)
    assert out.shape == (2, 5, 3) and out.dtype == torch.float32  # float32 core
    assert seen["x"] == (2, 5, 3, 4, 2) and seen["y"] == (2, 5, 3, 8, 2) and seen["xw"] is None
    assert torch.equal(seen["yw"], mask.float())


def test_perfect_prediction_gives_zero():
    values = torch.randn(2, 3, 2, 8, 4)
    mask = torch.ones(2, 3, 2, 8, dtype=torch.bool)
    assert sample_divergence(values, values, mask, "exact").abs().max() < 1e-5
    assert naive_divergence(values, values, mask).abs().max() == 0
    ids = torch.randint(0, 5, (2, 3, 1, 8))
    hist = torch.nn.functional.one_hot(ids, 5).float().mean(-2)
    pred = CategoricalPrediction(hist.log(), None, None)
    assert categorical_divergence(pred, ids, mask[:, :, :1]).abs().max() < 1e-6


@FAST
@given(seed=st.integers(0, 2**16), rank=st.integers(0, 2))
def test_moment_divergence_matches_scipy(seed, rank):
    g = torch.Generator().manual_seed(seed)
    c = 3
    mean = torch.randn(2, 2, 1, c, generator=g, dtype=torch.float64)
    log_var = torch.randn(2, 2, 1, c, generator=g, dtype=torch.float64)
    factor = torch.randn(2, 2, 1, c, rank, generator=g, dtype=torch.float64) if rank else None
    pred = MomentPrediction(mean, log_var, factor)
    values = torch.randn(2, 2, 1, 8, c, generator=g, dtype=torch.float64)
    mask = _random_mask(g, (2, 2, 1, 8))
    mask[..., :2] = True
    got = moment_divergence(pred, values, mask)
    cov = pred.covariance()
    for idx in np.ndindex(2, 2, 1):
        y = values[idx][mask[idx]].numpy()
        m2, s2 = y.mean(0), np.cov(y.T, bias=True)
        s1 = cov[idx].numpy()
        root = scipy.linalg.sqrtm(s2)
        cross = np.real(scipy.linalg.sqrtm(root @ s1 @ root))
        ref = ((mean[idx].numpy() - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * cross)
        assert got[idx].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("channels", [16, 64])
def test_moment_divergence_in_float32_with_a_singular_target_covariance(channels):
    """8 neighbors in 16 or 64 channels: the target covariance is singular. float32 stays within
    1e-4 of float64 (the square root of the singular covariance, taken before, biased the
    value by 2.5e-4 to 5e-4 relative, and a near-perfect prediction's 3.5e-4 came out 3e-14);
    float64 within 1e-6 of a scipy oracle, and its gradient passes gradcheck."""
    g = torch.Generator().manual_seed(channels)
    values = torch.randn(2, 3, 2, 8, channels, generator=g, dtype=torch.float64)
    mask = _random_mask(g, (2, 3, 2, 8))
    mask[..., :2] = True
    pred = MomentPrediction(0.3 * torch.randn(2, 3, 2, channels, generator=g, dtype=torch.float64),
                            torch.randn(2, 3, 2, channels, generator=g, dtype=torch.float64) - 1,
                            0.5 * torch.randn(2, 3, 2, channels, 2, generator=g,
                                              dtype=torch.float64))
    want = moment_divergence(pred, values, mask)
    got = moment_divergence(MomentPrediction(*(t.float() for t in pred)), values.float(), mask)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)
    cov = pred.covariance()
    for idx in [(0, 0, 0), (1, 2, 1)]:
        y = values[idx][mask[idx]].numpy()
        s2 = np.cov(y.T, bias=True)
        root = scipy.linalg.sqrtm(cov[idx].numpy())
        cross = np.real(scipy.linalg.sqrtm(root @ s2 @ root))
        ref = ((pred.mean[idx].numpy() - y.mean(0)) ** 2).sum() + np.trace(
            cov[idx].numpy() + s2 - 2 * cross)
        assert want[idx].item() == pytest.approx(ref, rel=1e-6)
    mean = pred.mean[:1, :1].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda m: moment_divergence(MomentPrediction(m, pred.log_variance[:1, :1],
                                                     pred.factor[:1, :1]),
                                    values[:1, :1], mask[:1, :1]), (mean,))


def test_moment_divergence_empty_problem_is_zero_with_finite_grad():
    mean = torch.randn(1, 2, 1, 3, requires_grad=True)
    pred = MomentPrediction(mean, torch.zeros(1, 2, 1, 3), None)
    values, mask = torch.randn(1, 2, 1, 8, 3), torch.zeros(1, 2, 1, 8, dtype=torch.bool)
    out = moment_divergence(pred, values, mask)
    assert torch.equal(out, torch.zeros(1, 2, 1))
    out.sum().backward()
    assert torch.isfinite(mean.grad).all()


@FAST
@given(seed=st.integers(0, 2**16), vocab=st.integers(2, 6))
def test_categorical_total_variation_matches_loop(seed, vocab):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 2, vocab, generator=g)
    ids = torch.randint(0, vocab, (2, 3, 2, 8), generator=g)
    mask = _random_mask(g, (2, 3, 2, 8))
    got = categorical_divergence(CategoricalPrediction(logits, None, None), ids, mask)
    probs = logits.softmax(-1)
    for idx in np.ndindex(2, 3, 2):
        valid = ids[idx][mask[idx]].tolist()
        if not valid:
            assert got[idx] == 0
            continue
        q = np.bincount(valid, minlength=vocab) / len(valid)
        ref = 0.5 * np.abs(probs[idx].numpy() - q).sum()  # TV = 1/2 L1 = 1 - sum min
        assert got[idx].item() == pytest.approx(ref, abs=1e-5)


def test_categorical_sampling_mode_uses_codebook_embeddings():
    codebook = torch.randn(4, 3)
    ids = torch.randint(0, 4, (1, 2, 1, 8))
    mask = torch.ones(1, 2, 1, 8, dtype=torch.bool)
    samples = codebook[ids]  # a "prediction" that samples exactly the neighbors
    pred = CategoricalPrediction(torch.zeros(1, 2, 1, 4), samples, codebook)
    assert categorical_divergence(pred, ids, mask, "exact").abs().max() < 1e-5
    with pytest.raises(DTypeError, match="token ids"):
        categorical_divergence(pred, ids.float(), mask)


def test_reduce_is_per_sample_mean_then_batch_mean():
    g = torch.Generator().manual_seed(3)
    values = torch.rand(3, 5, 2, generator=g)
    valid = _random_mask(g, (3, 5, 2))
    valid[2] = False  # a sample with no valid point contributes 0
    total, per_stride = reduce_context_loss(values, valid, torch.tensor([0.25, 2.0]))
    want = torch.zeros(2)
    for s in range(2):
        for b in range(3):
            v = values[b, :, s][valid[b, :, s]]
            want[s] += (v.mean() if len(v) else 0.0) / 3
    torch.testing.assert_close(per_stride, want)
    torch.testing.assert_close(total, 0.25 * want[0] + 2.0 * want[1])
    # batch independence: sample 0 alone gives its own value
    alone, _ = reduce_context_loss(values[:1], valid[:1])
    mixed, _ = reduce_context_loss(values[:2], valid[:2])
    other, _ = reduce_context_loss(values[1:2], valid[1:2])
    torch.testing.assert_close(mixed, (alone + other) / 2)


def test_resize_target_rules():
    img = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(resize_target(img, (4, 4)),
                               torch.nn.functional.avg_pool2d(img, 2))
    up = resize_target(img, (16, 16))
    torch.testing.assert_close(up, torch.nn.functional.interpolate(
        img, size=(16, 16), mode="bilinear", align_corners=False))
    ids = torch.randint(0, 9, (2, 8, 8))
    assert torch.equal(resize_target(ids, (4, 4)), ids[:, ::2, ::2])
    assert torch.equal(resize_target(ids, (16, 16)), ids.repeat_interleave(2, 1)
                       .repeat_interleave(2, 2))
    assert resize_target(img, (8, 8)) is img
    with pytest.raises(ShapeError, match="resize='none'"):
        resize_target(img, (4, 4), "none")
    with pytest.raises(ShapeError, match="no resize rule"):
        resize_target(img, (4, 4, 4))
    with pytest.raises(ValueRangeError, match="nearest"):
        resize_target(ids, (4, 4), "area")


# -- the module ----------------------------------------------------------------------------------
def _pixel_loss(**kw):
    return ContextPredictionLoss(
        PixelNeighborhood(strides=(1, 2)),
        GaussianSamplingHead(out_channels=3, in_channels=8, num_samples=6, num_strides=2), **kw,
    )


def _grid_neighbors(target, b, r, c, stride):
    """Valid neighbors of grid cell (r, c) of ``target[b]`` at ``stride``, in slot order: a list
    of ``(slot, value (C,) or id)`` by explicit coordinates (an oracle for the extractors)."""
    height, width = target.shape[-2:]
    deltas = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc]
    out = []
    for k, (dr, dc) in enumerate(deltas):
        rr, cc = r + stride * dr, c + stride * dc
        if 0 <= rr < height and 0 <= cc < width:
            out.append((k, target[b, ..., rr, cc] if target.dim() == 3 else target[b, :, rr, cc]))
    return out


def _reduce_oracle(per_point, valid, weight, stride_weights):
    """lambda * sum_s w_s * mean_b (mean over valid points of sample b)."""
    per_stride = ((per_point * valid).sum(1) / valid.sum(1).clamp_min(1)).mean(0)
    return weight * (per_stride * torch.as_tensor(stride_weights, dtype=per_stride.dtype)).sum()


def test_loss_matches_an_independent_pot_oracle():
    """Value and gradient against a loop: area resize = 2x2 average pool, neighbors by explicit
    coordinates, W2^2 and its optimal plan by POT's exact solver (``ot.emd``), the backbone
    gradient through the plan (envelope theorem)."""
    loss_fn = _pixel_loss(estimator="exact", stride_weights=(1.0, 0.5), weight=0.3)
    feats = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    loss_fn.double()
    terms = loss_fn.terms(feats, target, generator=torch.Generator().manual_seed(5))
    (grad,) = torch.autograd.grad(terms.total, feats)

    small = torch.nn.functional.avg_pool2d(target, 2)
    z = feats.flatten(2).transpose(1, 2)
    samples = loss_fn.head(z, generator=torch.Generator().manual_seed(5))  # (B, P, S, Q, C)
    per_point = torch.zeros(2, 16, 2, dtype=torch.float64)
    valid = torch.zeros(2, 16, 2, dtype=torch.bool)
    for b, p, s in np.ndindex(2, 16, 2):
        ys = torch.stack([v for _, v in _grid_neighbors(small, b, p // 4, p % 4, (1, 2)[s])])
        x = samples[b, p, s]
        cost = torch.cdist(x, ys).square()
        plan = ot.emd(np.full(len(x), 1 / len(x)), np.full(len(ys), 1 / len(ys)),
                      cost.detach().numpy())
        per_point[b, p, s] = (torch.from_numpy(plan) * cost).sum()
        valid[b, p, s] = True
    torch.testing.assert_close(terms.per_point, per_point.detach())
    oracle_total = _reduce_oracle(per_point, valid, 0.3, (1.0, 0.5))
    torch.testing.assert_close(terms.total, oracle_total)
    (oracle_grad,) = torch.autograd.grad(oracle_total, feats)
    torch.testing.assert_close(grad, oracle_grad)
    assert grad.abs().sum() > 0


def test_points_subsampling_count_and_fraction():
    """A subset's per-point values are the full evaluation's at the reported points (a
    deterministic head), for a count, a fraction (rounded) and a count above the grid size."""
    g = torch.Generator().manual_seed(0)
    feats, target = torch.randn(2, 8, 6, 6, generator=g), torch.randn(2, 3, 6, 6, generator=g)
    loss_fn = ContextPredictionLoss(PixelNeighborhood(strides=(1, 2)),
                                    NaiveHead(3, in_channels=8, num_strides=2), weight=1.0)
    full = loss_fn.terms(feats, target).per_point  # (2, 36, 2)
    for points, count in ((10, 10), (0.25, 9), (0.3, 11), (1000, 36)):
        loss_fn.points = points
        terms = loss_fn.terms(feats, target, generator=torch.Generator().manual_seed(3))
        assert terms.per_point.shape == (2, count, 2)
        index = terms.points.expand(2, -1) if terms.points.dim() == 1 else terms.points
        assert all(row.unique().numel() == count for row in index)
        expected = torch.stack([full[b, index[b]] for b in range(2)])
        torch.testing.assert_close(terms.per_point, expected)
        torch.testing.assert_close(terms.total, expected.mean((0, 1)).mean())
    for bad in (0, 1.5, -0.1, True, "all"):
        with pytest.raises(ValueRangeError, match="points"):
            _pixel_loss(points=bad)


def test_points_one_as_an_int_warns_and_the_fraction_means_all():
    """``points=1`` is a count (one point per image): a likely slip for "all", so it warns;
    ``points=1.0`` (a fraction) evaluates every point, silently."""
    with pytest.warns(UserWarning, match=r"points=1 \(an int\) is a count.*points=1\.0"):
        one = _pixel_loss(points=1)
    feats, target = torch.randn(2, 8, 6, 6), torch.randn(2, 3, 6, 6)
    assert one.terms(feats, target).per_point.shape[1] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        every = _pixel_loss(points=1.0)
        two = _pixel_loss(points=2)
    assert every.terms(feats, target).per_point.shape[1] == 36
    assert two.terms(feats, target).per_point.shape[1] == 2


def test_point_without_valid_neighbor_contributes_nothing_and_no_nan():
    head = GaussianSamplingHead(3, 4, num_samples=4, num_strides=2)
    loss_fn = ContextPredictionLoss(PixelNeighborhood(strides=(1, 5), allow_empty=True), head)
    feats = torch.randn(1, 4, 3, 3, requires_grad=True)
    terms = loss_fn.terms(feats, torch.randn(1, 3, 3, 3))
    assert not terms.valid[..., 1].any() and terms.valid[..., 0].all()
    assert torch.equal(terms.per_point[..., 1], torch.zeros(1, 9))
    assert terms.per_stride[1] == 0 and torch.isfinite(terms.total)
    terms.total.backward()
    assert torch.isfinite(feats.grad).all()


def test_feature_target_is_detached_and_token_layout():
    loss_fn = ContextPredictionLoss(
        FeatureNeighborhood(strides=(1,)), GaussianSamplingHead(5, 5, num_samples=4),
        grid_shape=(3, 4),
    )
    tokens = torch.randn(2, 12, 5, requires_grad=True)
    terms = loss_fn.terms(tokens)
    assert terms.per_point.shape == (2, 12, 1)
    # the same features as a channels-first map give the same value (same noise)
    fmap = tokens.detach().transpose(1, 2).reshape(2, 5, 3, 4)
    a = loss_fn(tokens, generator=torch.Generator().manual_seed(0))
    b = ContextPredictionLoss(FeatureNeighborhood(strides=(1,)), loss_fn.head)(
        fmap, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


def _total_variation_oracle(head, feats_points, ids_grid, strides):
    """Loop: p = softmax(head logits at the point), q = histogram of the valid neighbor ids,
    TV = 1 - sum_v min(p_v, q_v); reduced like the loss (equal stride weights)."""
    batch, height, width = ids_grid.shape
    per_point = torch.zeros(batch, height * width, len(strides))
    for b, p in np.ndindex(batch, height * width):
        logits = head(feats_points[b, p].reshape(1, 1, -1)).logits[0, 0]  # (S, V)
        for s, stride in enumerate(strides):
            q = torch.zeros(head.num_classes)
            found = _grid_neighbors(ids_grid, b, p // width, p % width, stride)
            for _, token in found:
                q[token] += 1 / len(found)
            probs = torch.softmax(logits[s if len(logits) > 1 else 0], -1)
            per_point[b, p, s] = 1 - torch.minimum(probs, q).sum()
    valid = torch.ones_like(per_point, dtype=torch.bool)
    return _reduce_oracle(per_point, valid, 1.0, [1 / len(strides)] * len(strides))


def test_token_ids_with_categorical_head():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    head = CategoricalHead(6, in_channels=8, num_strides=2)
    loss_fn = ContextPredictionLoss(TokenNeighborhood(strides=(1, 2), grid_shape=(4, 4)), head,
                                    weight=1.0)
    tokens = torch.randn(2, 16, 8, generator=g, requires_grad=True)
    ids = torch.randint(0, 6, (2, 16), generator=g)
    loss = loss_fn(tokens, ids)
    with torch.no_grad():
        expected = _total_variation_oracle(head, tokens, ids.reshape(2, 4, 4), (1, 2))
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert tokens.grad.abs().sum() > 0
    # a channels-first id map is resized by nearest to a smaller layer grid: every other id
    head_cf = CategoricalHead(6, 8)
    loss_cf = ContextPredictionLoss(TokenNeighborhood(strides=(1,)), head_cf, weight=1.0)
    fmap, big = torch.randn(2, 8, 4, 4, generator=g), torch.randint(0, 6, (2, 8, 8), generator=g)
    with torch.no_grad():
        expected = _total_variation_oracle(head_cf, fmap.flatten(2).transpose(1, 2),
                                           big[:, ::2, ::2], (1,))
    torch.testing.assert_close(loss_cf(fmap, big).detach(), expected)


def test_bf16_autocast_keeps_a_float32_core():
    """Under bf16 autocast the estimator receives float32 tensors with autocast off, and the value
    matches the float32 loss within bf16 rounding of the head."""
    seen = []

    def recording_exact(x, y, x_weights, y_weights):
        seen.append((x.dtype, y.dtype, torch.is_autocast_enabled("cpu")))
        return wasserstein(x, y, x_weights, y_weights, method="exact")

    loss_fn = _pixel_loss(estimator=recording_exact)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 8, 4, 4, generator=g, requires_grad=True)
    target = torch.randn(2, 3, 4, 4, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(feats, target, generator=torch.Generator().manual_seed(1))
    assert seen and all(entry == (torch.float32, torch.float32, False) for entry in seen)
    reference = loss_fn(feats, target, generator=torch.Generator().manual_seed(1))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=3e-2, atol=1e-3)
    loss.backward()
    (reference_grad,) = torch.autograd.grad(reference, feats)
    torch.testing.assert_close(feats.grad, reference_grad, rtol=0.1, atol=5e-3)


def _naive_or_moment_oracle(head, feats, target, strides):
    """Loop over samples, points and strides: the head read at the point; naive: mean squared
    error over the valid slots; moment: Gaussian W2^2 to the valid neighbors' mean and
    (population) covariance with scipy's sqrtm."""
    batch, _, height, width = feats.shape
    per_point = torch.zeros(batch, height * width, len(strides), dtype=feats.dtype)
    valid = torch.zeros(batch, height * width, len(strides), dtype=torch.bool)
    for b, p in np.ndindex(batch, height * width):
        pred = head(feats[b, :, p // width, p % width].reshape(1, 1, -1))
        for s, stride in enumerate(strides):
            found = _grid_neighbors(target, b, p // width, p % width, stride)
            if not found:  # no valid neighbor: the point does not count at this stride
                continue
            valid[b, p, s] = True
            if isinstance(head, NaiveHead):
                per_point[b, p, s] = torch.stack(
                    [((pred[0, 0, s, k] - y) ** 2).sum() for k, y in found]).mean()
                continue
            y = torch.stack([v for _, v in found]).detach().numpy()
            m1 = pred.mean[0, 0, s].detach().numpy()
            s1 = pred.covariance()[0, 0, s].detach().numpy()
            s2 = np.cov(y.T, bias=True)
            root = scipy.linalg.sqrtm(s2)
            cross = np.real(scipy.linalg.sqrtm(root @ s1 @ root))
            per_point[b, p, s] = float(((m1 - y.mean(0)) ** 2).sum()
                                       + np.trace(s1 + s2 - 2 * cross))
    return _reduce_oracle(per_point, valid, 1.0, [1 / len(strides)] * len(strides))


@pytest.mark.parametrize("make_head", [lambda: NaiveHead(2, in_channels=3, num_strides=2),
                                       lambda: MomentHead(2, 3, rank=1, num_strides=2)],
                         ids=["naive", "moment"])
def test_other_heads_train_through_the_module(make_head):
    """The value equals a loop oracle, and the gradient w.r.t. the layer output passes a float64
    finite-difference check (gradcheck) through the whole module. (2 channels on a 4x4 grid:
    every point has >= 3 neighbors per stride, so the empirical covariances are regular and the
    Bures term is differentiable.)"""
    torch.manual_seed(0)
    head = make_head().double()
    loss_fn = ContextPredictionLoss(PixelNeighborhood(strides=(1, 2)), head, weight=1.0)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)
    expected = _naive_or_moment_oracle(head, feats, target, (1, 2))
    torch.testing.assert_close(loss_fn(feats, target), expected.to(torch.float64),
                               rtol=1e-5, atol=1e-6)
    assert torch.autograd.gradcheck(lambda f: loss_fn(f, target), (feats,))


def test_loss_errors_are_clear():
    nb = PixelNeighborhood(strides=(1, 2, 3))
    with pytest.raises(ShapeError, match=r"num_strides=2 .* 3 strides"):
        ContextPredictionLoss(nb, GaussianSamplingHead(3, num_strides=2))
    with pytest.raises(ValueRangeError, match="TokenNeighborhood"):
        ContextPredictionLoss(nb, CategoricalHead(4))
    with pytest.raises(ValueRangeError, match="CategoricalHead"):
        ContextPredictionLoss(TokenNeighborhood(), GaussianSamplingHead(3))
    with pytest.raises(ShapeError, match="stride_weights has 2"):
        ContextPredictionLoss(nb, GaussianSamplingHead(3), stride_weights=(1.0, 1.0))
    with pytest.raises(ValueRangeError, match="estimator"):
        ContextPredictionLoss(nb, GaussianSamplingHead(3), estimator="hungarian")
    loss_fn = _pixel_loss()
    with pytest.raises(ShapeError, match=r"C_out=3 .* C=4"):
        loss_fn(torch.randn(2, 8, 4, 4), torch.randn(2, 4, 4, 4))
    with pytest.raises(ShapeError, match="ambiguous"):
        loss_fn(torch.randn(2, 16, 8), torch.randn(2, 3, 4, 4))
    with pytest.raises(ShapeError, match="batch"):
        loss_fn(torch.randn(2, 8, 4, 4), torch.randn(3, 3, 4, 4))
    with pytest.raises(ShapeError, match="resize='none'"):
        _pixel_loss(resize="none")(torch.randn(2, 8, 4, 4), torch.randn(2, 3, 8, 8))
    with pytest.raises(ShapeError, match="C_in=8"):
        loss_fn(torch.randn(2, 6, 4, 4), torch.randn(2, 3, 4, 4))
    token_loss = ContextPredictionLoss(TokenNeighborhood(grid_shape=(4, 4)), CategoricalHead(5))
    with pytest.raises(ShapeError, match="no resize rule"):
        token_loss(torch.randn(2, 4, 2, 2), torch.randint(0, 5, (2, 16)))
    with pytest.raises(DTypeError, match="integer token ids"):
        token_loss(torch.randn(2, 16, 4), torch.randn(2, 16, 4))
    with pytest.raises(ShapeError, match="num_slots=8"):
        ContextPredictionLoss(PixelNeighborhood(), NaiveHead(3, num_slots=4))(
            torch.randn(1, 4, 3, 3), torch.randn(1, 3, 3, 3))


def test_float64_gradcheck_of_the_divergences():
    g = torch.Generator().manual_seed(0)
    mask = _random_mask(g, (1, 2, 2, 8))
    values = torch.randn(1, 2, 2, 8, 2, generator=g, dtype=torch.float64)
    pred = torch.randn(1, 2, 2, 8, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: naive_divergence(p, values, mask), (pred,))
    ids = torch.randint(0, 4, (1, 2, 2, 8), generator=g)
    logits = torch.randn(1, 2, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda lg: categorical_divergence(CategoricalPrediction(lg, None, None), ids, mask),
        (logits,))
    mean = torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    log_var = torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    full = torch.ones_like(mask)
    assert torch.autograd.gradcheck(
        lambda m, v: moment_divergence(MomentPrediction(m, v, None), values, full),
        (mean, log_var))


def test_loss_module_pickles_and_takes_estimator_options():
    loss_fn = _pixel_loss(estimator_options={"iterations": 5})
    clone = pickle.loads(pickle.dumps(loss_fn))
    feats, target = torch.randn(1, 8, 4, 4), torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(
        clone(feats, target, generator=torch.Generator().manual_seed(0)),
        loss_fn(feats, target, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueRangeError, match="estimator_options"):
        _pixel_loss(estimator=lambda x, y, a, b: x.sum((-1, -2)), estimator_options={"p": 1})
    # a typo'd key fails when the loss is built, naming the estimator's real options (it used
    # to construct fine and raise a bare TypeError at the first forward)
    with pytest.raises(ValueRangeError, match=r"takes no option 'iteration'.*iterations"):
        _pixel_loss(estimator="sinkhorn", estimator_options={"iteration": 10})
    with pytest.raises(ValueRangeError, match="takes no option 'x_weights'"):
        _pixel_loss(estimator="exact", estimator_options={"x_weights": None})


def test_token_layout_target_gets_the_reshape_advice():
    """A (B, L, C) target for a map-shaped loss on tokens: the reshape to apply or the
    neighborhood's grid_shape (the advice was 'it looks unbatched')."""
    loss_fn = ContextPredictionLoss(
        PixelNeighborhood(strides=(1,)), GaussianSamplingHead(3, 16), grid_shape=(4, 8))
    tokens, target = torch.randn(2, 32, 16), torch.randn(2, 32, 3)
    with pytest.raises(ShapeError, match=r"looks like tokens.*reshape\(2, 3, 4, 8\).*grid_shape"):
        loss_fn(tokens, target)
    assert torch.isfinite(loss_fn(tokens, target.transpose(1, 2).reshape(2, 3, 4, 8)))


def test_token_codebook_and_head_vocabularies_must_match():
    with pytest.raises(ShapeError, match=r"codebook has 12 rows but CategoricalHead has "
                                         r"num_classes=10"):
        ContextPredictionLoss(TokenNeighborhood((1,), codebook=torch.randn(12, 2)),
                              CategoricalHead(10, 16))
    ContextPredictionLoss(TokenNeighborhood((1,), codebook=torch.randn(10, 2)),
                          CategoricalHead(10, 16))


def test_float_token_ids_are_named_as_a_dtype_slip():
    """Float ids for a CategoricalHead: a DTypeError naming the ids (it used to be read as a
    float (B, C, *grid) target and fail on a grid-shape mismatch)."""
    loss_fn = ContextPredictionLoss(TokenNeighborhood(strides=(1, 2)),
                                    CategoricalHead(10, 16, num_strides=2))
    feats, ids = torch.randn(2, 16, 8, 8), torch.randint(0, 10, (2, 8, 8))
    assert torch.isfinite(loss_fn(feats, ids))
    with pytest.raises(DTypeError, match=r"needs integer token ids.*float32 \(2, 8, 8\).*long"):
        loss_fn(feats, ids.float())


def test_channels_last_layer_output_is_named_before_the_target_checks():
    """A (B, H, W, C) layer output passed straight to the loss: named as channels-last with the
    permute to apply (it was blamed on the target, as an aspect-ratio mismatch)."""
    loss_fn = _pixel_loss()
    feats, target = torch.randn(2, 8, 6, 6), torch.randn(2, 3, 6, 6)
    with pytest.raises(ShapeError, match=r"channels-last.*features\.permute\(0, 3, 1, 2\)"):
        loss_fn(feats.permute(0, 2, 3, 1), target)
    with pytest.raises(ShapeError, match=r"expects C_in=8 input channels, got 5"):
        loss_fn(torch.randn(2, 5, 6, 6), target)


@pytest.mark.parametrize("options", [{}, {"seed": 5}])
def test_the_generator_drives_the_sliced_estimator(options):
    """The step's generator draws every random number of the step, the sliced estimator's
    directions too (they came from the global RNG); a fixed ``seed`` option still wins."""
    loss_fn = _pixel_loss(estimator="sliced", estimator_options=options)
    feats, target = torch.randn(2, 8, 6, 6), torch.randn(2, 3, 6, 6)
    values = []
    for global_seed in (3, 4):
        torch.manual_seed(global_seed)
        values.append(loss_fn(feats, target, generator=torch.Generator().manual_seed(7)))
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)
    other = loss_fn(feats, target, generator=torch.Generator().manual_seed(8))
    assert bool(other != values[0])  # the heads' samples differ with the generator


@FAST
@given(seed=st.integers(0, 2**16))
def test_order_free_and_bounded_by_the_naive_slot_error(seed):
    """W is invariant to permuting samples or neighbor slots, and <= the slot-by-slot error."""
    g = torch.Generator().manual_seed(seed)
    samples = torch.randn(1, 3, 1, 8, 2, generator=g)
    values = torch.randn(1, 3, 1, 8, 2, generator=g)
    full = torch.ones(1, 3, 1, 8, dtype=torch.bool)
    base = sample_divergence(samples, values, full, "exact")
    perm_q, perm_k = torch.randperm(8, generator=g), torch.randperm(8, generator=g)
    torch.testing.assert_close(
        sample_divergence(samples[..., perm_q, :], values[..., perm_k, :], full, "exact"), base)
    assert (base <= naive_divergence(samples, values, full) + 1e-5).all()


def test_loss_module_compiles_without_graph_breaks():
    """fullgraph=True: no host sync, no data-dependent Python branch inside the loss."""
    loss_fn = _pixel_loss(points=16)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="eager")
    feats, target = torch.randn(2, 8, 6, 6, requires_grad=True), torch.randn(2, 3, 6, 6)
    torch.manual_seed(0)
    got = compiled(feats, target)
    torch.manual_seed(0)
    torch.testing.assert_close(got, loss_fn(feats, target))
    got.backward()
    assert torch.isfinite(feats.grad).all()


def test_match_mask_keeps_one_sample_per_valid_neighbor():
    g = torch.Generator().manual_seed(4)
    samples = torch.randn(2, 3, 2, 8, 3, generator=g)
    values = torch.randn(2, 3, 2, 8, 3, generator=g)
    mask = _random_mask(g, (2, 3, 2, 8))
    mask[..., 0] = True
    got = sample_divergence(samples, values, mask, "exact", match_mask=True)
    for idx in np.ndindex(2, 3, 2):
        x = samples[idx][mask[idx]].double().numpy()
        y = values[idx][mask[idx]].double().numpy()
        w = np.full(len(x), 1 / len(x))
        assert got[idx].item() == pytest.approx(ot.emd2(w, w, ot.dist(x, y)), rel=1e-4, abs=1e-5)
    with pytest.raises(ShapeError, match="Q == K_s"):
        sample_divergence(samples[..., :5, :], values, mask, match_mask=True)
    loss_fn = ContextPredictionLoss(
        PixelNeighborhood(strides=(1, 2)),
        GaussianSamplingHead(3, 8, num_samples=8, num_strides=2), "exact", match_mask=True)
    feats = torch.randn(2, 8, 4, 4, requires_grad=True)
    loss_fn(feats, torch.randn(2, 3, 4, 4)).backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0


def test_default_estimators_are_read_from_one_place(monkeypatch):
    """wasserstein() defaults to DEFAULT_ESTIMATOR, the loss and divergences to LOSS_ESTIMATOR:
    flipping a constant flips every default (read at call / construction time)."""
    from ctxpred import wasserstein as W

    assert (W.DEFAULT_ESTIMATOR, W.LOSS_ESTIMATOR) == ("exact", "sinkhorn")
    assert _pixel_loss().estimator == "sinkhorn"
    calls = []

    def spy(x, y, xw=None, yw=None, **options):
        calls.append(options)
        return x.sum((-1, -2)) * 0
    W.register_estimator("spy_default", spy)
    try:
        monkeypatch.setattr(W, "LOSS_ESTIMATOR", "spy_default")
        assert _pixel_loss().estimator == "spy_default"
        values = torch.randn(1, 2, 1, 8, 3)
        sample_divergence(values, values, torch.ones(1, 2, 1, 8, dtype=torch.bool))
        assert calls == [{"check_finite": False}]
        monkeypatch.setattr(W, "DEFAULT_ESTIMATOR", "spy_default")
        W.wasserstein(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1))
        assert calls[-1] == {}
    finally:
        W.unregister_estimator("spy_default")
