"""Bundled datasets: shapes, ranges, determinism, disjoint splits, clear errors."""

from __future__ import annotations

import pytest
import torch

from ctxpred.errors import CtxpredError
from reference_models.data import DATASETS, load_dataset, load_digits_with_labels, texture_crops


@pytest.mark.parametrize("name", DATASETS)
def test_shapes_range_and_determinism(name: str) -> None:
    x = load_dataset(name, "train", num_samples=5, seed=3)
    size = 16 if name == "digits" else 32
    assert x.shape == (5, 1, size, size)
    assert x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert x.std() > 0.05  # real images, not constants
    assert torch.equal(x, load_dataset(name, "train", num_samples=5, seed=3))


def test_texture_splits_are_disjoint_regions() -> None:
    # a test crop must not equal any train crop (they come from disjoint rows of the image)
    train = texture_crops("gravel", "train", num_samples=200, crop_size=8, seed=0)
    test = texture_crops("gravel", "test", num_samples=50, crop_size=8, seed=0)
    dist = torch.cdist(test.flatten(1), train.flatten(1))
    assert dist.min() > 0


def test_textures_interleave_every_texture() -> None:
    mixed = load_dataset("textures", "train", num_samples=6, seed=0)
    brick = texture_crops("brick", "train", num_samples=2, seed=0)
    assert torch.equal(mixed[0], brick[0]) and torch.equal(mixed[3], brick[1])


def test_digit_splits_are_disjoint_and_labelled() -> None:
    xtr, ytr = load_digits_with_labels("train")
    xte, yte = load_digits_with_labels("test")
    assert len(xtr) + len(xte) == 1797
    assert set(ytr.tolist()) == set(range(10)) == set(yte.tolist())
    assert torch.cdist(xte.flatten(1)[:50], xtr.flatten(1)).min() > 0


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(CtxpredError, match="known datasets: textures, brick"):
        load_dataset("cifar10")
    with pytest.raises(CtxpredError, match="split"):
        load_dataset("digits", "validation")  # type: ignore[arg-type]
    with pytest.raises(CtxpredError, match="exceeds"):
        load_dataset("faces", "test", num_samples=1000)
