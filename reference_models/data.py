"""Bundled datasets for the reference models: no downloads, everything ships with scikit-image and
scikit-learn.

Every loader returns a channels-first float32 tensor ``(N, 1, H, W)`` with values in ``[-1, 1]``
(grayscale), deterministic for a given ``seed``.

Known names (see :data:`DATASETS`):

* ``"textures"``: random square crops (default ``32 x 32``) of scikit-image's ``brick``,
  ``grass`` and ``gravel`` textures, equal shares, interleaved. ``"brick"``, ``"grass"`` and
  ``"gravel"`` give one texture alone. The ``"train"`` crops come from the top three quarters of
  each 512x512 image (rows ``0..383``), the ``"test"`` crops from the bottom quarter (rows
  ``384..511``): the two splits never share a pixel.
* ``"digits"``: scikit-learn's 8x8 handwritten digits (1797 images), upsampled bilinearly to
  ``16 x 16``; a fixed 80/20 train/test split (``split_seed`` 0).
* ``"faces"``: the 100 face images of scikit-image's ``lfw_subset`` (25x25), resized to
  ``32 x 32``; a fixed 80/20 train/test split.

Example:
    >>> from reference_models.data import load_dataset
    >>> x = load_dataset("textures", "train", num_samples=6, seed=0)
    >>> x.shape, x.dtype, bool(x.min() >= -1), bool(x.max() <= 1)
    (torch.Size([6, 1, 32, 32]), torch.float32, True, True)
    >>> load_dataset("digits", "test").shape
    torch.Size([359, 1, 16, 16])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ctxpred.errors import ValueRangeError

__all__ = [
    "DATASETS",
    "IMAGE_SUFFIXES",
    "TEXTURE_NAMES",
    "ImageData",
    "load_dataset",
    "load_digits_with_labels",
    "load_image_data",
    "texture_crops",
]

Split = Literal["train", "test"]

TEXTURE_NAMES: tuple[str, ...] = ("brick", "grass", "gravel")
DATASETS: tuple[str, ...] = ("textures", *TEXTURE_NAMES, "digits", "faces")

#: Rows of each 512x512 texture reserved for the held-out ("test") crops.
_TEST_ROWS_START = 384
_DEFAULT_SIZE = {"textures": 32, "brick": 32, "grass": 32, "gravel": 32, "digits": 16, "faces": 32}
_DEFAULT_TEXTURE_SAMPLES = {"train": 3072, "test": 768}


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueRangeError(f"split must be 'train' or 'test', got {split!r}")


def _to_unit_range(x: np.ndarray, low: float, high: float) -> Tensor:
    """Map an array with known range ``[low, high]`` to a float32 tensor in ``[-1, 1]``."""
    t = torch.from_numpy(np.asarray(x, dtype=np.float32))
    return ((t - low) / (high - low) * 2.0 - 1.0).clamp_(-1.0, 1.0)


def _resize(x: Tensor, size: int) -> Tensor:
    """Resize ``(N, 1, h, w)`` to ``(N, 1, size, size)`` (bilinear, antialiased when shrinking)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    shrinking = size < min(x.shape[-2:])
    out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                        antialias=shrinking)
    return out.clamp_(-1.0, 1.0)


def _split_indices(n: int, split: Split, split_seed: int, test_fraction: float = 0.2) -> Tensor:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_test = round(n * test_fraction)
    return perm[:n_test] if split == "test" else perm[n_test:]


def texture_crops(
    texture: str,
    split: Split = "train",
    num_samples: int = 1024,
    crop_size: int = 32,
    seed: int = 0,
) -> Tensor:
    """Random ``crop_size x crop_size`` crops of one scikit-image texture, ``(N, 1, S, S)``.

    ``train`` crops lie entirely in rows ``0..383`` of the 512x512 image, ``test`` crops entirely
    in rows ``384..511``; columns are unrestricted. Pixel values ``v`` (uint8) map to
    ``v / 255 * 2 - 1``.

    Args:
        texture: one of :data:`TEXTURE_NAMES`.
        split: ``"train"`` or ``"test"``.
        num_samples: number of crops ``N``.
        crop_size: side ``S`` of a crop, at most 128 (the height of the test region).
        seed: seed of the crop positions.

    Example:
        >>> texture_crops("brick", "test", num_samples=2, crop_size=8).shape
        torch.Size([2, 1, 8, 8])
    """
    import skimage.data

    if texture not in TEXTURE_NAMES:
        raise ValueRangeError(f"unknown texture {texture!r}; known textures: {TEXTURE_NAMES}")
    _check_split(split)
    if not 1 <= crop_size <= 512 - _TEST_ROWS_START:
        raise ValueRangeError(
            f"crop_size must be in [1, {512 - _TEST_ROWS_START}], got {crop_size}"
        )
    if num_samples < 1:
        raise ValueRangeError(f"num_samples must be >= 1, got {num_samples}")
    image = _to_unit_range(getattr(skimage.data, texture)(), 0.0, 255.0)  # (512, 512)
    row_lo, row_hi = (0, _TEST_ROWS_START) if split == "train" else (_TEST_ROWS_START, 512)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(row_lo, row_hi - crop_size + 1, (num_samples,), generator=gen)
    cols = torch.randint(0, image.shape[1] - crop_size + 1, (num_samples,), generator=gen)
    offsets = torch.arange(crop_size)
    r = (rows[:, None] + offsets)[:, :, None]  # (N, S, 1)
    c = (cols[:, None] + offsets)[:, None, :]  # (N, 1, S)
    return image[r, c].unsqueeze(1).contiguous()


def load_digits_with_labels(
    split: Split = "train", image_size: int = 16, split_seed: int = 0
) -> tuple[Tensor, Tensor]:
    """scikit-learn digits as ``(images (N, 1, S, S) in [-1, 1], labels (N,) long)``.

    The 8x8 images (values 0..16) are mapped to ``[-1, 1]`` and upsampled bilinearly to
    ``image_size``. The split is a fixed permutation (``split_seed``), 20% held out.

    Example:
        >>> x, y = load_digits_with_labels("train")
        >>> x.shape, y.shape, int(y.max())
        (torch.Size([1438, 1, 16, 16]), torch.Size([1438]), 9)
    """
    from sklearn.datasets import load_digits

    _check_split(split)
    bunch = load_digits()
    images = _to_unit_range(bunch.images, 0.0, 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    idx = _split_indices(len(images), split, split_seed)
    return _resize(images[idx], image_size), labels[idx]


def _load_faces(split: Split, image_size: int, split_seed: int) -> Tensor:
    import skimage.data

    faces = skimage.data.lfw_subset()[:100]  # the first 100 of the 200 images are faces
    images = _to_unit_range(faces, 0.0, 1.0).unsqueeze(1)
    return _resize(images[_split_indices(len(images), split, split_seed)], image_size)


def load_dataset(
    name: str,
    split: Split = "train",
    *,
    num_samples: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
) -> Tensor:
    """Load a bundled dataset as a float32 tensor ``(N, 1, H, W)`` with values in ``[-1, 1]``.

    Args:
        name: one of :data:`DATASETS`.
        split: ``"train"`` or ``"test"`` (disjoint).
        num_samples: number of images. Texture crops are drawn afresh, so any number works
            (default 3072 train / 768 test, split equally between textures for ``"textures"``);
            for ``digits``/``faces`` it keeps the first ``num_samples`` of a seeded shuffle of the
            split (default: the whole split).
        image_size: side of the square images (default 32 for textures/faces, 16 for digits).
        seed: seed of the crop positions / the subset shuffle.

    Raises:
        ValueRangeError: unknown ``name`` (the message lists the known names), bad split or size.

    Example:
        >>> load_dataset("faces", "train", num_samples=4, image_size=16).shape
        torch.Size([4, 1, 16, 16])
        >>> try:
        ...     load_dataset("cifar10")
        ... except ValueError as err:
        ...     print(err)
        unknown dataset 'cifar10'; known datasets: textures, brick, grass, gravel, digits, faces
    """
    if name not in DATASETS:
        raise ValueRangeError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    _check_split(split)
    size = _DEFAULT_SIZE[name] if image_size is None else int(image_size)
    if size < 1:
        raise ValueRangeError(f"image_size must be >= 1, got {size}")
    if num_samples is not None and num_samples < 1:
        raise ValueRangeError(f"num_samples must be >= 1, got {num_samples}")

    if name in TEXTURE_NAMES or name == "textures":
        total = _DEFAULT_TEXTURE_SAMPLES[split] if num_samples is None else num_samples
        names = TEXTURE_NAMES if name == "textures" else (name,)
        counts = [total // len(names) + (i < total % len(names)) for i in range(len(names))]
        parts = [
            texture_crops(t, split, max(n, 1), size, seed=seed * 1000 + 17 * i)[:n]
            for i, (t, n) in enumerate(zip(names, counts))
        ]
        # interleave so that any prefix of the result holds every texture
        order = torch.cat([torch.arange(n) * len(names) + i for i, n in enumerate(counts)])
        out = torch.empty(total, 1, size, size)
        out[order] = torch.cat(parts)
        return out

    if name == "digits":
        images, _ = load_digits_with_labels(split, image_size=size)
    else:
        images = _load_faces(split, size, split_seed=0)
    if num_samples is not None:
        if num_samples > len(images):
            raise ValueRangeError(
                f"num_samples={num_samples} exceeds the {len(images)} images of {name}/{split}"
            )
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        images = images[perm[:num_samples]]
    return images.contiguous()


# -- the user's own images (--data PATH) -------------------------------------------------------
#: File suffixes read from an image folder (case-insensitive).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")


@dataclass
class ImageData:
    """A user's images split for training and evaluation (see :func:`load_image_data`).

    Attributes:
        train: ``(N_train, C, S, S)`` float32 in ``[-1, 1]``.
        test: ``(N_test, C, S, S)`` float32 in ``[-1, 1]``, held out from training.
        source: the path they came from.
        value_range: how the values were read (``"uint8 0-255"``, ``"float [0, 1]"``, ...).
    """

    train: Tensor
    test: Tensor
    source: str
    value_range: str

    def describe(self) -> dict[str, object]:
        """A JSON-able summary (path, counts, shape, value range) for result records."""
        return {"source": self.source, "train": len(self.train), "test": len(self.test),
                "shape": list(self.train.shape[1:]), "value_range": self.value_range}


def _center_crop_resize(x: Tensor, size: int) -> Tensor:
    """``(N, C, h, w)`` -> center square crop -> ``(N, C, size, size)`` (antialiased bilinear)."""
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[..., top:top + side, left:left + side]
    if side == size:
        return x.contiguous()
    out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                        antialias=size < side)
    return out.clamp_(-1.0, 1.0)


def _array_to_unit(array: np.ndarray, source: str) -> tuple[Tensor, str]:
    """A ``(N, H, W)`` / ``(N, H, W, C)`` array -> ``(N, C, H, W)`` in ``[-1, 1]`` and its range.

    uint8 is read as 0-255; a float array with values in ``[0, 1]`` as ``[0, 1]``, otherwise one
    in ``[-1, 1]`` as ``[-1, 1]``; anything else is an error.
    """
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueRangeError(
            f"{source}: expected an array of shape (N, H, W) or (N, H, W, C) with C = 1 or 3, "
            f"got shape {array.shape}; put the images on the first axis and channels last"
        )
    if array.shape[0] == 0 or min(array.shape[1:3]) < 1:
        raise ValueRangeError(f"{source}: the array holds no images (shape {array.shape})")
    if array.dtype == np.uint8:
        values = torch.from_numpy(array.astype(np.float32)) / 255.0 * 2.0 - 1.0
        what = "uint8 0-255"
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueRangeError(f"{source}: the float array contains NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        values = torch.from_numpy(array.astype(np.float32))
        if low >= 0.0 and high <= 1.0:
            values = values * 2.0 - 1.0
            what = "float [0, 1]"
        elif low >= -1.0 and high <= 1.0:
            what = "float [-1, 1]"
        else:
            raise ValueRangeError(
                f"{source}: float values must lie in [0, 1] or [-1, 1], got [{low:.4g}, "
                f"{high:.4g}]; rescale the array (or save it as uint8 0-255)"
            )
    else:
        raise ValueRangeError(
            f"{source}: dtype {array.dtype} is not supported; use uint8 (0-255) or float32 in "
            f"[0, 1] or [-1, 1]"
        )
    return values.permute(0, 3, 1, 2).contiguous(), what


def _read_folder(folder: Path) -> list[Tensor]:
    """Every PNG/JPEG of ``folder`` (sorted by name) as ``(C, H, W)`` in ``[-1, 1]``."""
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        others = sorted(p.name for p in folder.iterdir())[:5]
        raise ValueRangeError(
            f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder"
            + (f" (it holds e.g. {others})" if others else " (it is empty)")
            + "; point --data at a folder of PNG/JPEG files or a .npy array"
        )
    images, bad = [], []
    modes: dict[int, list[str]] = {}
    for path in files:
        try:
            with Image.open(path) as img:
                img.load()
                if img.mode in ("L", "I", "I;16", "F", "1", "LA"):
                    img = img.convert("L")
                else:
                    img = img.convert("RGB")
                array = np.asarray(img, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            bad.append(f"{path.name} ({type(err).__name__})")
            continue
        array = array[..., None] if array.ndim == 2 else array
        modes.setdefault(array.shape[-1], []).append(path.name)
        images.append(torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0)
    if bad:
        raise ValueRangeError(
            f"{folder}: {len(bad)} of {len(files)} image files could not be read: "
            f"{', '.join(bad[:5])}; remove or re-save them"
        )
    if len(modes) > 1:
        counts = ", ".join(f"{len(names)} with {c} channel(s) (e.g. {names[0]})"
                           for c, names in sorted(modes.items()))
        raise ValueRangeError(
            f"{folder}: mixed channel counts: {counts}; convert all images to grayscale or all "
            f"to RGB"
        )
    return images


def load_image_data(
    path: str | Path,
    image_size: int,
    *,
    test_fraction: float = 0.2,
    min_test: int = 4,
    split_seed: int = 0,
) -> ImageData:
    """The user's images from ``path``, center-cropped and resized, split into train / held-out.

    ``path`` is either

    * a ``.npy`` array ``(N, H, W)`` or ``(N, H, W, C)`` (``C`` 1 or 3): ``uint8`` values are read
      as 0-255; ``float`` values must lie in ``[0, 1]`` (read as such when the minimum is
      ``>= 0``) or else in ``[-1, 1]``; other dtypes are rejected;
    * or a folder of PNG/JPEG files (grayscale images give ``C = 1``, everything else is
      converted to RGB, ``C = 3``; a folder mixing the two is rejected).

    Every image is center-cropped to a square and resized (antialiased bilinear) to
    ``image_size``; values end in ``[-1, 1]``. A seeded permutation (``split_seed``) holds out
    ``round(test_fraction * N)`` images (at least ``min_test``) for the metrics.

    Raises:
        ValueRangeError: a missing path, an empty folder, unreadable files, mixed channel
            counts, a wrong shape, dtype or value range, or too few images for the held-out
            split. The message names the problem and the fix; nothing falls back to bundled
            data.

    Example:
        >>> import numpy as np, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "x.npy")
        >>> np.save(path, np.random.default_rng(0).integers(0, 256, (30, 20, 24), np.uint8))
        >>> data = load_image_data(path, image_size=16)
        >>> data.train.shape, data.test.shape, data.value_range
        (torch.Size([24, 1, 16, 16]), torch.Size([6, 1, 16, 16]), 'uint8 0-255')
    """
    path = Path(path)
    if not 0.0 < test_fraction < 1.0:
        raise ValueRangeError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if image_size < 1:
        raise ValueRangeError(f"image_size must be >= 1, got {image_size}")
    if not path.exists():
        raise ValueRangeError(f"--data {path}: no such file or folder")
    if path.is_dir():
        images = [_center_crop_resize(img[None], image_size)[0] for img in _read_folder(path)]
        x = torch.stack(images)
        what = "uint8 0-255 (image files)"
    elif path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueRangeError(f"{path}: not a readable .npy array ({err})") from err
        x, what = _array_to_unit(array, str(path))
        x = _center_crop_resize(x, image_size)
    else:
        raise ValueRangeError(
            f"--data {path}: expected a .npy file or a folder of PNG/JPEG images, got a "
            f"{path.suffix or 'suffix-less'} file"
        )
    n = len(x)
    n_test = max(min_test, round(test_fraction * n))
    if n - n_test < 1 or n_test < min_test:
        raise ValueRangeError(
            f"{path}: {n} images are too few to hold out {n_test} (at least {min_test}) for the "
            f"metrics and still train; give at least {min_test + max(1, min_test)} images "
            f"(more is better: the metrics compare samples with the held-out set)"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return ImageData(x[perm[n_test:]].contiguous(), x[perm[:n_test]].contiguous(), str(path),
                     what)
