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


# -- the user's own images: load_image_data (--data PATH) ----------------------------------------
def _write_pngs(folder, arrays, suffix=".png"):
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"img{i:03d}{suffix}")


def test_load_image_data_from_a_png_folder(tmp_path) -> None:
    import numpy as np

    from reference_models.data import load_image_data

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (12, 20), dtype=np.uint8) for _ in range(10)]
    arrays[0][:] = 255
    arrays[0][:, 4:16] = 0  # the central 12x12 square is black, the side columns white
    _write_pngs(tmp_path / "imgs", arrays)
    data = load_image_data(tmp_path / "imgs", image_size=12, min_test=2)
    assert data.train.shape == (8, 1, 12, 12) and data.test.shape == (2, 1, 12, 12)
    everything = torch.cat([data.train, data.test])
    # center crop, no resize at size 12: image 0 is all -1 (black), nothing from the sides
    assert any(bool((img == -1).all()) for img in everything)
    assert everything.min() >= -1 and everything.max() <= 1
    assert data.describe()["shape"] == [1, 12, 12]
    # the split is seeded and disjoint
    again = load_image_data(tmp_path / "imgs", image_size=12, min_test=2)
    assert torch.equal(again.test, data.test)


def test_load_image_data_rgb_jpeg_and_resize(tmp_path) -> None:
    import numpy as np

    from reference_models.data import load_image_data

    rng = np.random.default_rng(1)
    _write_pngs(tmp_path / "rgb", [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
                                   for _ in range(6)], suffix=".JPG")
    data = load_image_data(tmp_path / "rgb", image_size=8, min_test=1)
    assert data.train.shape == (5, 3, 8, 8) and data.test.shape == (1, 3, 8, 8)


@pytest.mark.parametrize("kind", ["uint8", "float01", "float-11", "rgb"])
def test_load_image_data_from_npy(tmp_path, kind) -> None:
    import numpy as np

    from reference_models.data import load_image_data

    rng = np.random.default_rng(2)
    if kind == "uint8":
        arr = rng.integers(0, 256, (10, 8, 8), dtype=np.uint8)
        arr[0, 0, 0], arr[0, 0, 1] = 0, 255
        expected = torch.from_numpy(arr.astype(np.float32)) / 255 * 2 - 1
        what = "uint8 0-255"
    elif kind == "float01":
        arr = rng.random((10, 8, 8)).astype(np.float32)
        expected = torch.from_numpy(arr) * 2 - 1
        what = "float [0, 1]"
    elif kind == "float-11":
        arr = (rng.random((10, 8, 8)) * 2 - 1).astype(np.float64)
        expected = torch.from_numpy(arr).float()
        what = "float [-1, 1]"
    else:
        arr = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
        expected = torch.from_numpy(arr.astype(np.float32)).permute(0, 3, 1, 2) / 255 * 2 - 1
        what = "uint8 0-255"
    np.save(tmp_path / "x.npy", arr)
    data = load_image_data(tmp_path / "x.npy", image_size=8, min_test=2)
    assert data.value_range == what
    got = torch.cat([data.train, data.test])
    if expected.dim() == 3:
        expected = expected[:, None]
    # the same images, in the split's order: compare as sets of rows
    key = lambda t: sorted(t.flatten(1).sum(1).tolist())  # noqa: E731
    assert key(got) == pytest.approx(key(expected), abs=1e-4)
    assert len(data.test) == 2


@pytest.mark.parametrize("case, match", [
    ("empty", "it is empty"),
    ("no-images", "no image files"),
    ("unreadable", "could not be read"),
    ("mixed", "mixed channel counts"),
    ("too-few", "too few"),
    ("int64", "dtype int64"),
    ("range", r"\[0, 1\] or \[-1, 1\]"),
    ("nan", "NaN"),
    ("channels", "C = 1 or 3"),
    ("missing", "no such file"),
    ("suffix", "expected a .npy file"),
])
def test_load_image_data_errors(tmp_path, case, match) -> None:
    import numpy as np

    from ctxpred.errors import CtxpredError
    from reference_models.data import load_image_data

    rng = np.random.default_rng(3)
    gray = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(10)]
    folder = tmp_path / "d"
    folder.mkdir()
    path = folder
    if case == "no-images":
        (folder / "notes.txt").write_text("hi")
    elif case == "unreadable":
        _write_pngs(folder, gray)
        (folder / "broken.png").write_bytes(b"not a png")
    elif case == "mixed":
        _write_pngs(folder, [*gray, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)])
    elif case == "too-few":
        _write_pngs(folder, gray[:4])
    elif case in ("int64", "range", "nan", "channels"):
        arr = {"int64": rng.integers(0, 256, (10, 8, 8)),
               "range": rng.random((10, 8, 8)) * 255,
               "nan": np.full((10, 8, 8), np.nan),
               "channels": rng.random((10, 8, 8, 2))}[case]
        path = tmp_path / "a.npy"
        np.save(path, arr)
    elif case == "missing":
        path = tmp_path / "nope"
    elif case == "suffix":
        path = tmp_path / "a.txt"
        path.write_text("x")
    with pytest.raises(CtxpredError, match=match) as info:
        load_image_data(path, image_size=8)
    assert isinstance(info.value, ValueError)
