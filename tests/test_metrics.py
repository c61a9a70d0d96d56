"""Quality metrics on known cases: identical sets give 0, shifted / blurred / noisy sets more."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from scipy.stats import wasserstein_distance

from ctxpred.errors import CtxpredError
from reference_models.data import load_dataset, load_digits_with_labels
from reference_models.metrics import (
    digits_classifier,
    frechet_digits_distance,
    frechet_distance,
    inpainting_metrics,
    laplacian_pyramid,
    neighborhood_discrepancy,
    sliced_wasserstein,
    swd_laplacian,
)


@pytest.fixture(scope="module")
def textures() -> tuple[torch.Tensor, torch.Tensor]:
    return (load_dataset("textures", "train", num_samples=48, seed=1),
            load_dataset("textures", "test", num_samples=48, seed=2))


def _blur(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, stride=1)


def test_laplacian_pyramid_reconstructs() -> None:
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    levels = laplacian_pyramid(x, 3)
    from reference_models.metrics import _pyr_up

    rec = levels[-1]
    for lap in reversed(levels[:-1]):
        rec = lap + _pyr_up(rec, lap.shape[-2:])
    torch.testing.assert_close(rec, x)


def test_sliced_wasserstein_1d_matches_scipy() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 1, generator=gen), torch.rand(300, 1, generator=gen) * 3
    # in 1-D every unit direction is +-1, so SW_1 equals W_1
    expected = wasserstein_distance(a[:, 0].numpy(), b[:, 0].numpy())
    assert sliced_wasserstein(a, b, num_projections=8) == pytest.approx(expected, rel=1e-6)


def test_swd_known_cases(textures) -> None:
    train, test = textures
    same = swd_laplacian(test, test)
    assert same["mean"] == 0.0 and len(same["levels"]) == 3
    held_out = swd_laplacian(train, test)["mean"]
    blurred = swd_laplacian(_blur(train), test)["mean"]
    shifted = swd_laplacian((train * 0.5 + 0.3).clamp(-1, 1), test)["mean"]
    noise = swd_laplacian(torch.rand_like(train) * 2 - 1, test)["mean"]
    assert held_out < blurred and held_out < shifted and held_out < noise
    assert held_out < 0.5 * noise


def test_frechet_distance_matches_scipy_sqrtm() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    s1, s2 = a @ a.T + 0.1 * torch.eye(5), b @ b.T
    mu1, mu2 = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    covmean = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = float(((mu1 - mu2) ** 2).sum()) + np.trace(s1.numpy() + s2.numpy() - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_digits_classifier_trains_on_one_thread_whatever_the_caller(tmp_path, monkeypatch):
    """Its weights (so fd_digits) depended on the caller's thread count (2 threads moved
    fd_digits by ~1.7%), which the cache name does not record: it trains on one thread."""
    from reference_models import metrics

    seen = []

    def fake_training():
        seen.append(torch.get_num_threads())
        return metrics.DigitsClassifier()

    monkeypatch.setattr(metrics, "_train_digits_classifier", fake_training)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        digits_classifier(cache_dir=tmp_path)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_digits_classifier_cached_accurate_and_frechet(tmp_path) -> None:
    model = digits_classifier(cache_dir=tmp_path)
    assert len(list(tmp_path.glob("digits_classifier_*.pt"))) == 1
    x, y = load_digits_with_labels("test")
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean()
    assert accuracy > 0.9
    again = digits_classifier(cache_dir=tmp_path)  # loaded from the cache, same weights
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    train = load_dataset("digits", "train", num_samples=359)
    assert frechet_digits_distance(x, x, model) == pytest.approx(0.0, abs=1e-6)
    held_out = frechet_digits_distance(train, x, model)
    blurred = frechet_digits_distance(_blur(_blur(train)), x, model)
    noise = frechet_digits_distance(torch.rand_like(train) * 2 - 1, x, model)
    assert held_out < blurred < noise


def test_neighborhood_discrepancy_known_cases(textures) -> None:
    train, test = textures
    same = neighborhood_discrepancy(test, test)
    assert same["mean"] == 0.0 and sorted(same["strides"]) == [1, 2, 3]
    held_out = neighborhood_discrepancy(train, test)["mean"]
    blurred = neighborhood_discrepancy(_blur(train), test)["mean"]
    # i.i.d. noise with the *same marginals* (pixels shuffled): only the joint statistic differs
    perm = torch.randperm(train.numel(), generator=torch.Generator().manual_seed(0))
    shuffled = train.flatten()[perm].view_as(train)
    shuffled_score = neighborhood_discrepancy(shuffled, test)
    assert held_out < blurred and held_out < shuffled_score["mean"]


def test_inpainting_metrics_known_cases(textures) -> None:
    _, test = textures
    known = torch.ones(len(test), 1, 32, 32, dtype=torch.bool)
    known[:, :, 8:24, 8:24] = False
    perfect = inpainting_metrics(test, test, known)
    assert perfect == {"masked_mse": 0.0, "masked_swd": 0.0}
    # errors only outside the hole do not count
    outside = torch.where(known, torch.zeros_like(test), test)
    assert inpainting_metrics(outside, test, known)["masked_mse"] == 0.0
    filled = torch.where(known, test, torch.zeros_like(test))
    noisy = torch.where(known, test, test + 0.3 * torch.randn_like(test))
    m_fill = inpainting_metrics(filled, test, known)
    m_noise = inpainting_metrics(noisy, test, known)
    expected_mse = float((test[:, :, 8:24, 8:24] ** 2).mean())
    assert m_fill["masked_mse"] == pytest.approx(expected_mse, rel=1e-5)
    assert m_fill["masked_swd"] > 0 and m_noise["masked_swd"] > 0


def test_errors_name_shapes() -> None:
    with pytest.raises(CtxpredError, match=r"share \(C, H, W\)"):
        swd_laplacian(torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 16, 16))
    with pytest.raises(CtxpredError, match=r"\(N, C, H, W\)"):
        neighborhood_discrepancy(torch.zeros(32, 32), torch.zeros(32, 32))
    with pytest.raises(CtxpredError, match="known_mask"):
        inpainting_metrics(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), torch.ones(2, 8, 8))


def test_quality_aggregate_mean_std_and_difference() -> None:
    from benchmarks.quality import aggregate

    results = {"d/baseline/0": {"swd": 1.0}, "d/baseline/1": {"swd": 3.0},
               "d/context/0": {"swd": 0.5}, "d/context/1": {"swd": 1.5},
               "d/naive-mse/0": {"swd": 2.0}}
    text = aggregate(results)
    assert "| baseline | 2 | 2.0000 +- 1.4142 |" in text
    assert "| context | 2 | 1.0000 +- 0.7071 |" in text
    assert "| naive-mse | 1 | 2.0000 |" in text
    assert "- swd: -1.0000 (-50.0%, -0.89 std)" in text
