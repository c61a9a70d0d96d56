"""Context heads: shapes, lazy inputs, reparameterization, Gumbel samples, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxpred import (
    CategoricalHead,
    GaussianSamplingHead,
    MomentHead,
    NaiveHead,
    ShapeError,
    ValueRangeError,
)


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 3), points=st.integers(1, 6), c_in=st.integers(1, 9),
    c_out=st.integers(1, 5), q=st.integers(1, 7), strides=st.integers(1, 3),
)
def test_gaussian_head_shapes(batch, points, c_in, c_out, q, strides):
    head = GaussianSamplingHead(c_out, c_in, num_samples=q, latent_dim=4, num_strides=strides)
    out = head(torch.randn(batch, points, c_in))
    assert out.shape == (batch, points, strides, q, c_out)
    mu, log_sigma = head.distribution(torch.randn(batch, points, c_in))
    assert mu.shape == log_sigma.shape == (batch, points, strides, 4)


def test_gaussian_head_is_reparameterized_and_seeded():
    head = GaussianSamplingHead(3, 5, num_samples=4)
    z = torch.randn(2, 7, 5, requires_grad=True)
    a = head(z, generator=torch.Generator().manual_seed(1))
    b = head(z, generator=torch.Generator().manual_seed(1))
    c = head(z, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    a.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters())


def test_gaussian_head_zero_sigma_gives_decoded_mean():
    """With sigma -> 0 every sample equals decoder(mu): the noise path is the only randomness."""
    head = GaussianSamplingHead(2, 3, num_samples=5, latent_dim=4)
    with torch.no_grad():
        head.encoder.bias[4:] = -40.0  # log_sigma part of (mu, log_sigma), clamped to -12
        head.encoder.weight[4:] = 0.0
    z = torch.randn(1, 3, 3)
    out = head(z)
    mu, _ = head.distribution(z)
    expected = head.decoder(mu).unsqueeze(-2).expand_as(out)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_channels_first_map_input():
    head = NaiveHead(3, in_channels=4, num_strides=2)
    fmap = torch.randn(2, 4, 3, 5)
    out = head(fmap)
    assert out.shape == (2, 15, 2, 8, 3)
    torch.testing.assert_close(out, head(fmap.flatten(2).transpose(1, 2)))


def test_lazy_in_channels():
    head = GaussianSamplingHead(3)
    assert not head.initialized and head.in_channels is None
    head(torch.randn(1, 2, 11))
    assert head.initialized and head.in_channels == 11
    assert head.encoder.weight.shape == (32, 11)
    with pytest.raises(ShapeError, match="C_in=11"):
        head(torch.randn(1, 2, 12))


@pytest.mark.parametrize(
    "head",
    [GaussianSamplingHead(3, 8), NaiveHead(3, in_channels=8), MomentHead(3, 8),
     CategoricalHead(5, 8)],
    ids=["gaussian", "naive", "moment", "categorical"],
)
def test_wrong_input_channels_name_both(head):
    with pytest.raises(ShapeError, match=r"C_in=8.*got 6"):
        head(torch.randn(2, 3, 6))
    with pytest.raises(ShapeError, match="input must be"):
        head(torch.randn(2, 8))


def test_moment_head_covariance_is_psd():
    pred = MomentHead(4, 6, rank=2, num_strides=3)(torch.randn(2, 5, 6))
    assert pred.mean.shape == pred.log_variance.shape == (2, 5, 3, 4)
    assert pred.factor.shape == (2, 5, 3, 4, 2)
    cov = pred.covariance()
    torch.testing.assert_close(cov, cov.transpose(-1, -2))
    assert torch.linalg.eigvalsh(cov).min() > 0
    diag = MomentHead(4, 6)(torch.randn(2, 5, 6))
    assert diag.factor is None
    torch.testing.assert_close(diag.covariance(), torch.diag_embed(diag.log_variance.exp()))


def test_categorical_head_modes():
    z = torch.randn(2, 5, 8)
    dist = CategoricalHead(7, 8, num_strides=2)(z)
    assert dist.logits.shape == (2, 5, 2, 7) and dist.samples is None and dist.codebook is None
    onehot = CategoricalHead(7, 8, num_samples=4, hard=True)(z)
    assert onehot.samples.shape == (2, 5, 1, 4, 7)
    torch.testing.assert_close(onehot.samples.sum(-1), torch.ones(2, 5, 1, 4))
    assert set(onehot.samples.detach().unique().tolist()) <= {0.0, 1.0}
    codebook = torch.randn(7, 3)
    head = CategoricalHead(7, 8, codebook=codebook, num_samples=4, hard=True)
    pred = head(z)
    assert head.out_channels == 3 and pred.samples.shape == (2, 5, 1, 4, 3)
    rows = (pred.samples.unsqueeze(-2) - codebook).norm(dim=-1).min(-1).values
    assert rows.max() < 1e-5  # hard samples are codebook rows
    pred.samples.sum().backward()  # straight-through gradient reaches the head
    assert head.proj.weight.grad.abs().sum() > 0


def test_categorical_low_temperature_soft_samples_are_nearly_one_hot():
    head = CategoricalHead(5, 3, num_samples=50, temperature=0.01)
    samples = head(torch.randn(1, 2, 3), generator=torch.Generator().manual_seed(0)).samples
    assert (samples.max(-1).values > 0.99).float().mean() > 0.9


def test_head_argument_errors():
    with pytest.raises(ValueRangeError, match="out_channels"):
        GaussianSamplingHead(0)
    with pytest.raises(ValueRangeError, match="num_samples"):
        GaussianSamplingHead(3, num_samples=0)
    with pytest.raises(ValueRangeError, match="num_strides"):
        NaiveHead(3, num_strides=0)
    with pytest.raises(ValueRangeError, match="rank"):
        MomentHead(3, rank=-1)
    with pytest.raises(ValueRangeError, match="temperature"):
        CategoricalHead(4, num_samples=2, temperature=0.0)
    with pytest.raises(ValueRangeError, match="needs num_samples"):
        CategoricalHead(4, codebook=torch.randn(4, 2))
    with pytest.raises(ShapeError, match="V=4"):
        CategoricalHead(4, num_samples=2, codebook=torch.randn(5, 2))
