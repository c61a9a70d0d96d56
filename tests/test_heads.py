"""Context heads: shapes, lazy inputs, reparameterization, Gumbel samples, errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxpred import (
    CategoricalHead,
    ContextHead,
    ContextPredictionLoss,
    GaussianSamplingHead,
    MomentHead,
    NaiveHead,
    PixelNeighborhood,
    ShapeError,
    TokenNeighborhood,
    ValueRangeError,
)
from ctxpred import functional as F
from ctxpred.wasserstein import resolve_estimator


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
    torch.manual_seed(0)  # the head's init and input: not whatever earlier tests left
    head = CategoricalHead(5, 3, num_samples=50, temperature=0.01)
    samples = head(torch.randn(1, 2, 3), generator=torch.Generator().manual_seed(0)).samples
    assert (samples.max(-1).values > 0.99).float().mean() > 0.9


@pytest.mark.parametrize("hidden", [None, 16])
def test_gaussian_head_samples_are_its_latent_gaussian_through_its_decoder(hidden):
    """Oracle: the samples are ``decoder(mu + sigma * xi)`` with the same noise, drawn by hand;
    ``hidden_channels=None`` makes that decoder one affine map, so the predicted neighborhood is
    a Gaussian with mean ``W mu + b``."""
    torch.manual_seed(0)
    head = GaussianSamplingHead(3, 5, num_samples=4000, latent_dim=6, hidden_channels=hidden,
                                num_strides=2).double()
    z = torch.randn(1, 2, 5, dtype=torch.float64)
    out = head(z, generator=torch.Generator().manual_seed(3))
    mu, log_sigma = head.distribution(z)
    xi = torch.randn((1, 2, 2, 4000, 6), generator=torch.Generator().manual_seed(3),
                     dtype=torch.float64)
    latent = mu.unsqueeze(-2) + log_sigma.exp().unsqueeze(-2) * xi
    if hidden is None:
        assert isinstance(head.decoder, torch.nn.Linear) and "linear decoder" in repr(head)
        w, b = head.decoder.weight, head.decoder.bias
        expected = latent @ w.T + b
        torch.testing.assert_close(out.mean(-2), mu @ w.T + b, atol=0.15, rtol=0)
    else:
        assert "linear decoder" not in repr(head)
        expected = head.decoder[2](torch.nn.functional.silu(head.decoder[0](latent)))
    torch.testing.assert_close(out, expected)


def test_head_argument_errors():
    with pytest.raises(ValueRangeError, match="out_channels"):
        GaussianSamplingHead(0)
    with pytest.raises(ValueRangeError, match=r"hidden_channels \(None: a linear decoder\)"):
        GaussianSamplingHead(3, hidden_channels=0)
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


# -- one template for every head (kornia BaseTester style) ----------------------------------------
# Each head is checked the same way: the module equals its function, every float dtype and every
# available device, a float64 gradcheck through forward + divergence, and torch.compile with
# fullgraph=True. A new head joins by adding one HeadCase.
@dataclasses.dataclass(frozen=True)
class HeadCase:
    name: str
    make: Callable[[], ContextHead]
    function: Callable[..., torch.Tensor]  # (prediction, values, mask, estimator, match_mask)
    estimator: str | None = None
    match_mask: bool = False
    noise_in_input_dtype: bool = False  # float64 draws differ from float32 ones

    def target(self, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
        if self.make().target_kind == "ids":
            return torch.randint(0, 5, (2, 4, 4), generator=gen)
        return torch.randn(2, 2, 4, 4, generator=gen).to(dtype)  # same draws for every dtype

    def neighbors(self, target: torch.Tensor):
        if target.is_floating_point():
            return F.neighbors(target, strides=(1, 2))
        return F.token_neighbors(target, strides=(1, 2))


def _codebook_head():
    torch.manual_seed(0)
    return CategoricalHead(5, 6, codebook=torch.randn(5, 2), num_samples=8, num_strides=2)


HEAD_CASES = [
    HeadCase("gaussian", lambda: GaussianSamplingHead(2, 6, num_samples=8, latent_dim=4,
                                                      hidden_channels=8, num_strides=2),
             F.sample_divergence, "exact", True, noise_in_input_dtype=True),
    HeadCase("naive", lambda: NaiveHead(2, 8, 6, num_strides=2),
             lambda p, v, m, est, mm: F.naive_divergence(p, v, m)),
    HeadCase("moment", lambda: MomentHead(2, 6, rank=1, num_strides=2),
             lambda p, v, m, est, mm: F.moment_divergence(p, v, m)),
    HeadCase("categorical", lambda: CategoricalHead(5, 6, num_strides=2),
             F.categorical_divergence),
    HeadCase("categorical_codebook", _codebook_head, F.categorical_divergence, "exact", True),
]
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(params=HEAD_CASES, ids=[c.name for c in HEAD_CASES])
def case(request) -> HeadCase:
    return request.param


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def _built(case: HeadCase, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    head = case.make().to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    target = case.target(gen, dtype).to(device)
    z = torch.randn(2, 16, 6, generator=gen).to(device=device, dtype=dtype)
    return head, case.neighbors(target), z, target


def _divergence(head, nb, z, case, seed=2):
    gen = torch.Generator(device=z.device).manual_seed(seed)
    return head.divergence(head(z, generator=gen), nb, case.estimator, match_mask=case.match_mask)


def test_template_module_equals_function_and_loss(case):
    head, nb, z, target = _built(case)
    gen = torch.Generator().manual_seed(2)
    prediction = head(z, generator=gen)
    by_module = head.divergence(prediction, nb, case.estimator, match_mask=case.match_mask)
    by_function = case.function(prediction, nb.values, nb.mask, case.estimator, case.match_mask)
    assert by_module.shape == (2, 16, 2)
    torch.testing.assert_close(by_module, by_function)
    loss_fn = ContextPredictionLoss(
        TokenNeighborhood(strides=(1, 2)) if head.target_kind == "ids"
        else PixelNeighborhood(strides=(1, 2)),
        head, case.estimator, match_mask=case.match_mask)
    features = z.transpose(1, 2).unflatten(2, (4, 4))  # the same points as a (B, C, H, W) map
    terms = loss_fn.terms(features, target, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(terms.per_point, by_module)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["float32", "float64", "bfloat16"])
def test_template_dtypes_and_devices(case, device, dtype):
    head, nb, z, _ = _built(case, device, dtype)
    value = _divergence(head, nb, z, case)
    assert value.device.type == device and value.shape == (2, 16, 2)
    # float64 stays float64; half precision is lifted to a float32 core
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(value).all() and (value >= -1e-4).all()
    ref_head, ref_nb, ref_z, _ = _built(case)
    reference = _divergence(ref_head, ref_nb, ref_z, case)
    same_draws = dtype == torch.float32 or not case.noise_in_input_dtype
    if dtype != torch.bfloat16 and device == "cpu" and same_draws:
        torch.testing.assert_close(value.float(), reference, rtol=1e-4, atol=1e-5)


def test_template_float64_gradcheck(case):
    head, nb, z, _ = _built(case, dtype=torch.float64)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: _divergence(head, nb, t, case), (z,), fast_mode=True, atol=1e-5)


def test_template_compiles_fullgraph(case):
    head, nb, z, _ = _built(case)
    # a short Sinkhorn schedule keeps the trace small (the estimators have their own tests)
    estimator = resolve_estimator("sinkhorn", iterations=3, scaling=0.3)

    def step(t):
        prediction = head(t)
        return head.divergence(prediction, nb, estimator)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    torch.manual_seed(3)
    got = compiled(z)
    torch.manual_seed(3)
    torch.testing.assert_close(got, step(z))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("head", [GaussianSamplingHead(3, 6, num_samples=4),
                                  CategoricalHead(5, 6, num_samples=4)],
                         ids=["gaussian", "categorical"])
def test_cpu_generator_drives_a_cuda_head(head):
    """A CPU generator draws on the CPU and the noise moves to the device, reproducibly."""
    head = head.cuda()
    z = torch.randn(2, 3, 6, device="cuda")
    a = head(z, generator=torch.Generator().manual_seed(0))
    b = head(z, generator=torch.Generator().manual_seed(0))
    a = a if isinstance(a, torch.Tensor) else a.samples
    b = b if isinstance(b, torch.Tensor) else b.samples
    assert a.device.type == "cuda" and torch.equal(a, b)
