"""Neighborhood extractors against a naive Python-loop oracle, plus properties and errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ctxpred
from ctxpred import functional as F
from ctxpred.errors import CtxpredError, DTypeError, ShapeError, ValueRangeError

SETTINGS = settings(max_examples=30, deadline=None)


def naive_neighbors(x: torch.Tensor, strides, kernel_size):
    """Oracle: loop over every point and offset of a channels-first (B, C, *spatial) tensor."""
    batch, channels, *spatial = x.shape
    r = (kernel_size - 1) // 2
    deltas = [d for d in itertools.product(range(-r, r + 1), repeat=len(spatial)) if any(d)]
    num_k = len(strides) * len(deltas)
    num_p = math.prod(spatial)
    values = torch.zeros(batch, num_p, num_k, channels, dtype=x.dtype)
    mask = torch.zeros(batch, num_p, num_k, dtype=torch.bool)
    for p, pos in enumerate(itertools.product(*[range(n) for n in spatial])):
        k = 0
        for s in strides:
            for d in deltas:
                q = tuple(c + s * o for c, o in zip(pos, d))
                if all(0 <= c < n for c, n in zip(q, spatial)):
                    mask[:, p, k] = True
                    values[:, p, k] = x[(slice(None), slice(None), *q)]
                k += 1
    return values, mask


@st.composite
def grids(draw, max_side=6):
    ndim = draw(st.integers(1, 3))
    side_max = {1: 12, 2: max_side, 3: 4}[ndim]
    spatial = tuple(draw(st.integers(2, side_max)) for _ in range(ndim))
    kernel = draw(st.sampled_from([3, 5] if ndim < 3 else [3]))
    max_s = max(spatial) - 1
    strides = tuple(
        sorted(set(draw(st.lists(st.integers(1, max_s), min_size=1, max_size=3))))
    )
    batch = draw(st.integers(1, 2))
    channels = draw(st.integers(1, 3))
    return batch, channels, spatial, kernel, strides


@SETTINGS
@given(grids(), st.integers(0, 2**31 - 1))
def test_matches_naive_loop(cfg, seed):
    batch, channels, spatial, kernel, strides = cfg
    x = torch.randn(batch, channels, *spatial, generator=torch.Generator().manual_seed(seed))
    nb = F.neighbors(x, strides=strides, kernel_size=kernel)
    values, mask = naive_neighbors(x, strides, kernel)  # flat stride-major slots (B, P, K, C)
    k_per = kernel ** len(spatial) - 1
    values = values.unflatten(2, (len(strides), k_per))
    mask = mask.unflatten(2, (len(strides), k_per))
    assert nb.values.shape == values.shape == (batch, x[0, 0].numel(), len(strides), k_per,
                                               channels)
    assert torch.equal(nb.mask, mask)
    assert torch.equal(nb.values, values)
    assert nb.strides == strides


@pytest.mark.parametrize(
    ("spatial", "point", "expected"),
    [
        ((5, 5), (0, 0), 3),  # corner
        ((5, 5), (0, 2), 5),  # edge
        ((5, 5), (2, 2), 8),  # interior
        ((4,), (0,), 1),
        ((4,), (2,), 2),
        ((3, 3, 3), (0, 0, 0), 7),
        ((3, 3, 3), (1, 1, 1), 26),
        ((3, 3, 3), (1, 1, 0), 17),
    ],
)
def test_valid_counts_at_corners_edges_interior(spatial, point, expected):
    x = torch.randn(1, 1, *spatial)
    flat = 0
    for c, n in zip(point, spatial):
        flat = flat * n + c
    nb = F.neighbors(x, strides=(1,), points=torch.tensor([flat]))
    assert int(nb.mask.sum()) == expected


def test_stride_two_counts():
    nb = F.neighbors(torch.randn(1, 1, 5, 5), strides=(1, 2))
    counts = nb.mask[0].reshape(5, 5, 2, 8).sum(-1)  # (P, S, K_s) -> (h, w, S)
    # stride 2 at the centre of a 5x5 grid reaches the outer ring: all 8 valid.
    assert counts[2, 2].tolist() == [8, 8]
    # stride 2 from (1, 1) leaves the grid up/left: only (1,3),(3,1),(3,3) remain.
    assert counts[1, 1].tolist() == [8, 3]


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 2), st.integers(0, 2**31 - 1))
def test_translation_shifts_neighborhoods(shift, stride, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, 12, 12, generator=g)
    shifted = torch.roll(x, shifts=shift, dims=-1)
    a = F.neighbors(x, strides=(stride,))
    b = F.neighbors(shifted, strides=(stride,))
    va = a.values[0].reshape(12, 12, 8, 2)
    vb = b.values[0].reshape(12, 12, 8, 2)
    ma = a.mask[0].reshape(12, 12, 8)
    mb = b.mask[0].reshape(12, 12, 8)
    lo, hi = stride, 12 - stride - shift  # columns whose neighborhoods stay inside both
    assert torch.equal(vb[:, lo + shift : hi + shift], va[:, lo:hi])
    assert torch.equal(mb[:, lo + shift : hi + shift], ma[:, lo:hi])


@SETTINGS
@given(st.sampled_from([(6,), (4, 5), (2, 3, 4)]), st.integers(0, 2**31 - 1))
def test_sequence_layout_equals_channels_first(grid, seed):
    x = torch.randn(2, 3, *grid, generator=torch.Generator().manual_seed(seed))
    tokens = x.flatten(2).transpose(1, 2)  # (B, L, C), row-major
    a = F.neighbors(x, strides=(1, 2))
    b = F.neighbors(tokens, strides=(1, 2), grid_shape=grid)
    assert torch.equal(a.values, b.values) and torch.equal(a.mask, b.mask)


def test_channels_last_and_dtypes():
    x = torch.randn(2, 4, 6, 7)
    ref = F.neighbors(x, strides=(1, 2))
    cl = F.neighbors(x.contiguous(memory_format=torch.channels_last), strides=(1, 2))
    assert torch.equal(ref.values, cl.values)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        out = F.neighbors(x.to(dtype), strides=(1, 2))
        assert out.values.dtype == dtype
        assert torch.equal(out.values, ref.values.to(dtype))


def test_gradients_flow_unless_detached():
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    F.neighbors(x, strides=(1,)).values.sum().backward()
    # every pixel is the neighbor of as many points as it has in-grid neighbors itself
    counts = F.neighbors(torch.ones(1, 1, 5, 5)).mask[0].sum((-2, -1)).reshape(5, 5).float()
    assert torch.equal(x.grad[0, 0], counts)
    feat = torch.randn(1, 2, 5, 5, requires_grad=True)
    nb = ctxpred.FeatureNeighborhood(strides=(1, 2))(feat)
    assert not nb.values.requires_grad
    nb = ctxpred.FeatureNeighborhood(strides=(1, 2), detach=False)(feat)
    nb.values.sum().backward()
    assert feat.grad is not None and feat.grad.abs().sum() > 0


def test_points_subset_index_and_random():
    x = torch.randn(2, 3, 6, 6)
    full = F.neighbors(x, strides=(1, 2))
    idx = torch.tensor([0, 7, 35])
    sub = F.neighbors(x, strides=(1, 2), points=idx)
    assert torch.equal(sub.values, full.values[:, idx])
    assert torch.equal(sub.points, idx)
    per_batch = torch.tensor([[1, 2], [30, 31]])
    pb = F.neighbors(x, strides=(1,), points=per_batch)
    f1 = F.neighbors(x, strides=(1,))
    assert torch.equal(pb.values[0], f1.values[0, [1, 2]])
    assert torch.equal(pb.values[1], f1.values[1, [30, 31]])
    assert torch.equal(F.gather_points(x, per_batch)[1], x.flatten(2).transpose(1, 2)[1, [30, 31]])
    g = torch.Generator().manual_seed(0)
    rnd = F.neighbors(x, strides=(1,), points=10, generator=g)
    assert rnd.values.shape == (2, 10, 1, 8, 3)
    assert rnd.points.unique().numel() == 10
    assert torch.equal(rnd.values, f1.values[:, rnd.points])
    assert torch.equal(F.gather_points(x, rnd.points), x.flatten(2).transpose(1, 2)[:, rnd.points])


def test_token_neighbors_and_codebook():
    ids = torch.randint(0, 10, (2, 5, 5))
    nb = ctxpred.TokenNeighborhood(strides=(1, 2))(ids)
    ref = F.neighbors(ids.unsqueeze(1).double(), strides=(1, 2))
    assert nb.values.dtype == torch.long
    assert torch.equal(nb.values, ref.values.squeeze(-1).long())
    assert torch.equal(nb.mask, ref.mask)
    seq = F.token_neighbors(ids.flatten(1), strides=(1, 2), grid_shape=(5, 5))
    assert torch.equal(seq.values, nb.values)
    codebook = torch.randn(10, 4)
    emb = ctxpred.TokenNeighborhood(strides=(1, 2), codebook=codebook)(ids)
    assert emb.values.shape == (2, 25, 2, 8, 4)
    expected = codebook[nb.values] * nb.mask.unsqueeze(-1)
    assert torch.equal(emb.values, expected)


def test_codebook_ids_outside_the_vocabulary_are_an_error():
    """They used to be clamped: id -2 read the embedding of id 0, silently."""
    codebook = torch.randn(5, 2)
    nb = ctxpred.TokenNeighborhood((1,), codebook=codebook)
    assert nb(torch.tensor([[[0, 4, 2]]]), points=torch.tensor([1])).values.shape == (1, 1, 1, 8, 2)
    for bad in (7, -2):
        with pytest.raises(ValueRangeError, match=r"token ids must lie in \[0, 5\)"):
            nb(torch.tensor([[[0, 1, bad]]]), points=torch.tensor([1]))  # a neighbor of point 1


def test_standardized_features_keep_float64():
    from ctxpred.neighborhoods import standardize_features

    x = torch.randn(2, 4, 6, 5, dtype=torch.float64) * 3 + 1
    want = (x - x.mean((2, 3), keepdim=True)) / (x.var((2, 3), unbiased=False, keepdim=True)
                                                 + 1e-5).sqrt()
    torch.testing.assert_close(standardize_features(x), want, rtol=1e-12, atol=1e-12)


def test_point_indices_outside_the_grid_are_an_error():
    """An index past the grid used to return "valid" neighbors of a point that does not exist."""
    x = torch.randn(2, 3, 8, 8)
    assert F.neighbors(x, points=torch.tensor([0, 63])).points.tolist() == [0, 63]
    for bad in (torch.tensor([64]), torch.tensor([-1]), torch.tensor([[0], [70]])):
        with pytest.raises(ValueRangeError, match=r"points index must lie in \[0, 64\)"):
            F.neighbors(x, points=bad)


def test_strides_are_distinct_positive_integers():
    """A repeated stride would silently count twice in the loss's mean over strides; integer
    scalars (numpy) are ints."""
    assert ctxpred.PixelNeighborhood(strides=(np.int64(1), 2)).strides == (1, 2)
    with pytest.raises(ValueRangeError, match=r"distinct, got strides=\(1, 1, 2\)"):
        ctxpred.PixelNeighborhood(strides=(1, 1, 2))
    for bad in ((0,), (1.0,), (True,), ("2",)):
        with pytest.raises(ValueRangeError, match="positive int"):
            ctxpred.PixelNeighborhood(strides=bad)


def test_allow_empty_stride():
    x = torch.randn(1, 1, 3, 3)
    with pytest.raises(ValueRangeError, match="stride 3 leaves no valid neighbor"):
        F.neighbors(x, strides=(1, 3))
    nb = F.neighbors(x, strides=(1, 3), allow_empty=True)
    assert not nb.mask[..., 1, :].any() and nb.mask[..., 0, :].any()


@pytest.mark.parametrize(
    ("call", "err", "pattern"),
    [
        (lambda: F.neighbors(torch.randn(2, 3)), ShapeError, r"got shape \(2, 3\)"),
        (lambda: F.neighbors(torch.randn(1, 1, 2, 2, 2, 2)), ShapeError, "rank 6"),
        (lambda: F.neighbors(torch.randn(1, 1, 5, 5), kernel_size=4), ValueRangeError, "odd"),
        (lambda: F.neighbors(torch.randn(1, 1, 5, 5), kernel_size=1), ValueRangeError, ">= 3"),
        (lambda: F.neighbors(torch.randn(1, 1, 5, 5), strides=(0,)), ValueRangeError, "positive"),
        (lambda: F.neighbors(torch.randn(1, 1, 5, 5), strides=(-1,)), ValueRangeError, "-1"),
        (
            lambda: F.neighbors(torch.randn(1, 10, 4), grid_shape=(3, 3)),
            ShapeError,
            "has 9 points but x",
        ),
        (lambda: F.neighbors(torch.zeros(1, 1, 5, 5, dtype=torch.long)), DTypeError, "floating"),
        (lambda: F.token_neighbors(torch.zeros(1, 5, 5)), DTypeError, "integer"),
        (lambda: F.neighbors(torch.randn(1, 1, 4, 4), points=17), ValueRangeError, "points=17"),
        (lambda: F.neighbors(torch.randn(1, 1, 4, 4), points=0.5), ValueRangeError, "float"),
        (
            lambda: F.neighbors(torch.randn(2, 1, 4, 4), points=torch.zeros(3, 2).long()),
            ShapeError,
            r"\(B=2, P\)",
        ),
    ],
)
def test_bad_input_errors(call, err, pattern):
    with pytest.raises(err, match=pattern):
        call()
    assert issubclass(err, CtxpredError)


def test_modules_equal_function():
    x = torch.randn(2, 3, 6, 6)
    a = ctxpred.PixelNeighborhood(strides=(1, 2), kernel_size=5)(x)
    b = F.neighbors(x, strides=(1, 2), kernel_size=5)
    assert torch.equal(a.values, b.values) and torch.equal(a.mask, b.mask)
    assert "strides=(1, 2)" in repr(ctxpred.PixelNeighborhood(strides=(1, 2)))


def test_compile_fullgraph():
    fn = torch.compile(
        lambda t: F.neighbors(t, strides=(1, 2, 3)), fullgraph=True, backend="aot_eager"
    )
    x = torch.randn(2, 3, 8, 8)
    out = fn(x)
    ref = F.neighbors(x, strides=(1, 2, 3))
    assert torch.equal(out.values, ref.values) and torch.equal(out.mask, ref.mask)


def test_offsets_are_built_once_per_grid_and_device(monkeypatch):
    """The offsets and grid constants live on the device after the first call: later calls
    build nothing on the host and copy nothing to the device."""
    from ctxpred import neighborhoods

    x = torch.randn(1, 2, 7, 5)
    first = F.neighbors(x, strides=(1, 3))

    def fail(*args, **kwargs):
        raise AssertionError("neighbor offsets rebuilt on the host")

    monkeypatch.setattr(neighborhoods, "neighbor_offsets", fail)
    again = F.neighbors(x, strides=(1, 3), points=torch.tensor([0, 34]))
    assert torch.equal(again.values, first.values[:, [0, 34]])
    with pytest.raises(AssertionError, match="rebuilt"):
        F.neighbors(x, strides=(1, 2))  # another stride set: a new entry
