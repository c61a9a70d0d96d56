"""Tokenizers: images ``(B, C, H, W)`` in ``[-1, 1]`` <-> token-id grids ``(B, h, w)``.

No VQ-VAE weights can be downloaded, so the codebooks are built here from bundled data:

* :class:`PatchKMeansTokenizer` -- a k-means codebook over non-overlapping ``p x p`` patches
  (default ``4 x 4``). ``encode`` maps each patch to the id of its nearest centroid (squared
  Euclidean distance), ``decode`` pastes the centroids back. The codebook embedding ``(V, D)``
  with ``D = C * p * p`` is the centroid matrix itself, so the ground cost between two tokens is
  the squared distance between their patches.
* :class:`IntensityTokenizer` -- one token per pixel, ``levels`` evenly spaced intensities
  (17 for scikit-learn digits, whose pixels take the values ``0..16``). Embedding ``(V, 1)``:
  the intensity of each level.

Both store their state in a plain dict (:meth:`state`) and round-trip through :func:`save_tokenizer`
/ :func:`load_tokenizer`.

Example:
    >>> import torch
    >>> from reference_models.discrete.tokenizers import IntensityTokenizer
    >>> tok = IntensityTokenizer(levels=17)
    >>> ids = tok.encode(torch.tensor([[[[-1.0, 0.0], [0.5, 1.0]]]]))
    >>> ids.tolist(), tok.decode(ids).tolist()
    ([[[0, 8], [12, 16]]], [[[[-1.0, 0.0], [0.5, 1.0]]]])
"""

from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ctxpred.errors import ShapeError, ValueRangeError, check_floating, check_integer

__all__ = [
    "IntensityTokenizer",
    "PatchKMeansTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "save_tokenizer",
]


def _check_images(images: Tensor, channels: int | None = None) -> None:
    check_floating(images, "images")
    if images.dim() != 4:
        raise ShapeError(
            f"images must be (B, C, H, W), got shape {tuple(images.shape)} (rank {images.dim()})"
        )
    if channels is not None and images.shape[1] != channels:
        raise ShapeError(
            f"images must have C={channels} channels (B, {channels}, H, W), "
            f"got shape {tuple(images.shape)}"
        )


def _check_ids(ids: Tensor, vocab_size: int) -> None:
    check_integer(ids, "ids")
    if ids.dim() != 3:
        raise ShapeError(f"ids must be (B, h, w), got shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueRangeError(
            f"ids must lie in [0, {vocab_size - 1}], got range "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )


class Tokenizer(ABC):
    """Common interface: ``encode``, ``decode``, ``codebook``, ``vocab_size``, ``patch_size``.

    ``patch_size`` is the side of the image block one token covers, so an ``H x W`` image gives
    an ``(H / patch_size) x (W / patch_size)`` token grid.
    """

    kind: str = ""
    patch_size: int = 1
    channels: int = 1

    @property
    def vocab_size(self) -> int:
        """``V``, the number of token ids."""
        return int(self.codebook.shape[0])

    @property
    @abstractmethod
    def codebook(self) -> Tensor:
        """Embedding of every token, ``(V, D)`` float32 (the ground-cost space)."""

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(h, w)`` of an ``H x W`` image."""
        p = self.patch_size
        if height % p or width % p:
            raise ShapeError(
                f"image size ({height}, {width}) must be divisible by patch_size={p}"
            )
        return height // p, width // p

    @abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """Token ids ``(B, h, w)`` long of images ``(B, C, H, W)``."""

    @abstractmethod
    def decode(self, ids: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` of token ids ``(B, h, w)``."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild the tokenizer (tensors and plain values)."""


class IntensityTokenizer(Tokenizer):
    r"""One token per pixel: ``levels`` evenly spaced intensities in ``[low, high]``.

    ``id = round((x - low) / (high - low) * (levels - 1))`` (clamped), and
    ``decode(id) = low + id * (high - low) / (levels - 1)``. Round-trip error is at most half a
    level, ``(high - low) / (2 (levels - 1))``; inputs already on the grid (scikit-learn digits
    mapped to ``[-1, 1]`` at their native 8x8 size) round-trip exactly.

    Args:
        levels: number of intensity levels ``V`` (>= 2); 17 for digits.
        low, high: the intensity range.

    Shape:
        - encode: ``(B, 1, H, W)`` -> ``(B, H, W)``
        - decode: ``(B, H, W)`` -> ``(B, 1, H, W)``
        - codebook: ``(V, 1)``

    Example:
        >>> tok = IntensityTokenizer(17)
        >>> tok.vocab_size, tok.codebook.shape, tok.codebook[8].tolist()
        (17, torch.Size([17, 1]), [0.0])
    """

    kind = "intensity"

    def __init__(self, levels: int = 17, low: float = -1.0, high: float = 1.0) -> None:
        if levels < 2:
            raise ValueRangeError(f"levels must be >= 2, got {levels}")
        if not high > low:
            raise ValueRangeError(f"need high > low, got low={low}, high={high}")
        self.levels, self.low, self.high = int(levels), float(low), float(high)

    @property
    def codebook(self) -> Tensor:
        return torch.linspace(self.low, self.high, self.levels).unsqueeze(1)

    def encode(self, images: Tensor) -> Tensor:
        _check_images(images, 1)
        scaled = (images[:, 0] - self.low) / (self.high - self.low) * (self.levels - 1)
        return scaled.round().clamp(0, self.levels - 1).long()

    def decode(self, ids: Tensor) -> Tensor:
        _check_ids(ids, self.levels)
        step = (self.high - self.low) / (self.levels - 1)
        return (self.low + ids.float() * step).unsqueeze(1)

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "levels": self.levels, "low": self.low, "high": self.high}


def _patchify(images: Tensor, p: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, h, w, C * p * p)``."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, h // p, w // p, c * p * p)


def _unpatchify(patches: Tensor, c: int, p: int) -> Tensor:
    """``(B, h, w, C * p * p)`` -> ``(B, C, h * p, w * p)``."""
    b, h, w, _ = patches.shape
    x = patches.reshape(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h * p, w * p)


class PatchKMeansTokenizer(Tokenizer):
    r"""k-means codebook over non-overlapping ``p x p`` patches.

    ``encode`` assigns each patch :math:`u \in \mathbb{R}^{C p^2}` to
    :math:`\arg\min_v \lVert u - e_v \rVert^2` over the centroids :math:`e_v`; ``decode`` tiles
    the centroids. ``fit`` runs scikit-learn's ``KMeans`` (k-means++ init, seeded) on at most
    ``max_patches`` randomly chosen training patches. The round-trip error of a patch is its
    distance to the nearest centroid, i.e. the k-means quantization error.

    Args:
        codebook: centroids ``(V, C * p * p)``; use :meth:`fit` to learn them.
        patch_size: ``p``.
        channels: ``C``.

    Shape:
        - encode: ``(B, C, H, W)`` -> ``(B, H / p, W / p)``
        - decode: ``(B, h, w)`` -> ``(B, C, h p, w p)``
        - codebook: ``(V, C p^2)``

    Example:
        >>> imgs = torch.rand(8, 1, 8, 8) * 2 - 1
        >>> tok = PatchKMeansTokenizer.fit(imgs, vocab_size=4, patch_size=4, seed=0)
        >>> ids = tok.encode(imgs)
        >>> ids.shape, tok.codebook.shape, tok.decode(ids).shape
        (torch.Size([8, 2, 2]), torch.Size([4, 16]), torch.Size([8, 1, 8, 8]))
    """

    kind = "patch_kmeans"

    def __init__(self, codebook: Tensor, patch_size: int = 4, channels: int = 1) -> None:
        check_floating(codebook, "codebook")
        if codebook.dim() != 2 or codebook.shape[1] != channels * patch_size**2:
            raise ShapeError(
                f"codebook must be (V, C * p * p) = (V, {channels * patch_size**2}), "
                f"got shape {tuple(codebook.shape)}"
            )
        self._codebook = codebook.detach().float().clone()
        self.patch_size, self.channels = int(patch_size), int(channels)

    @classmethod
    def fit(
        cls,
        images: Tensor,
        vocab_size: int = 64,
        patch_size: int = 4,
        *,
        max_patches: int = 20000,
        seed: int = 0,
    ) -> PatchKMeansTokenizer:
        """Learn a ``vocab_size``-entry codebook from training images ``(N, C, H, W)``."""
        from sklearn.cluster import KMeans

        _check_images(images)
        if patch_size < 1:
            raise ValueRangeError(f"patch_size must be >= 1, got {patch_size}")
        channels = images.shape[1]
        cls(torch.zeros(1, channels * patch_size**2), patch_size, channels).grid_shape(
            *images.shape[-2:]
        )
        patches = _patchify(images.detach().float().cpu(), patch_size).reshape(
            -1, channels * patch_size**2
        )
        if patches.shape[0] < vocab_size:
            raise ValueRangeError(
                f"need at least vocab_size={vocab_size} patches, got {patches.shape[0]}"
            )
        gen = torch.Generator().manual_seed(seed)
        if patches.shape[0] > max_patches:
            patches = patches[torch.randperm(patches.shape[0], generator=gen)[:max_patches]]
        km = KMeans(n_clusters=vocab_size, n_init=1, random_state=seed, max_iter=100)
        km.fit(patches.double().numpy())
        return cls(torch.from_numpy(km.cluster_centers_).float(), patch_size, channels)

    @property
    def codebook(self) -> Tensor:
        return self._codebook

    def encode(self, images: Tensor) -> Tensor:
        _check_images(images, self.channels)
        self.grid_shape(*images.shape[-2:])
        patches = _patchify(images.float(), self.patch_size)  # (B, h, w, D)
        book = self._codebook.to(patches.device)
        # ||u - e||^2 = ||u||^2 - 2 u.e + ||e||^2; the first term does not change the argmin.
        score = (book * book).sum(-1) - 2.0 * patches @ book.T
        return score.argmin(-1)

    def decode(self, ids: Tensor) -> Tensor:
        _check_ids(ids, self.vocab_size)
        patches = self._codebook.to(ids.device)[ids]
        return _unpatchify(patches, self.channels, self.patch_size)

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "codebook": self._codebook,
            "patch_size": self.patch_size,
            "channels": self.channels,
        }


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.state`."""
    state = dict(state)
    kind = state.pop("kind", None)
    if kind == IntensityTokenizer.kind:
        return IntensityTokenizer(**state)
    if kind == PatchKMeansTokenizer.kind:
        return PatchKMeansTokenizer(**state)
    raise ValueRangeError(
        f"unknown tokenizer kind {kind!r}; expected 'intensity' or 'patch_kmeans'"
    )


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike[str]) -> None:
    """Write a fitted tokenizer to ``path`` atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(tokenizer.state(), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Read a tokenizer written by :func:`save_tokenizer`."""
    return tokenizer_from_state(torch.load(path, map_location="cpu", weights_only=True))
