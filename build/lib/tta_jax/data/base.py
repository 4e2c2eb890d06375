"""Containers and preprocessing shared by every dataset reader."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class DomainData(NamedTuple):
    """All images of one domain (centre), in stream order.

    images: ``[N, H, W, 3]`` float32, preprocessed (per-image min-max to [0, 1]).
    masks: ``[N, H, W, C]`` uint8 in {0, 1}, one channel per class.
    ids: a stable identifier per image (file stem or synthetic index), recorded
      in results so the stream order can be checked and reproduced.
    native_sizes: ``[N, 2]`` (height, width) of each image as stored, before
      resizing; None when the stored images already have the array's size
      (synthetic data). Used to report surface distances in native pixels.
    """

    name: str
    images: np.ndarray
    masks: np.ndarray
    ids: tuple[str, ...]
    native_sizes: np.ndarray | None = None

    def pixel_spacing(self, i: int) -> tuple[float, float]:
        """Native pixels per resized pixel of image ``i`` along (height, width)."""
        if self.native_sizes is None:
            return 1.0, 1.0
        h, w = self.images.shape[1:3]
        return float(self.native_sizes[i][0]) / h, float(self.native_sizes[i][1]) / w

    @property
    def size(self) -> int:
        """Number of images (``len()`` of a NamedTuple is its field count, 4)."""
        return len(self.ids)


def minmax_normalise(image: np.ndarray, where: str = "image") -> np.ndarray:
    """Per-image global min-max to [0, 1] over all channels (GraTa/VPTTA preprocessing).

    A constant image has no range: it maps to all zeros rather than dividing by
    zero.  Non-finite pixels are rejected, naming ``where``.
    """
    image = np.asarray(image, dtype=np.float32)
    if not np.all(np.isfinite(image)):
        raise ValueError(f"{where}: image contains non-finite pixel values (NaN or inf)")
    lo, hi = float(image.min()), float(image.max())
    if hi - lo <= 0:
        return np.zeros_like(image)
    return (image - lo) / (hi - lo)


def check_image_batch(images, where: str = "images") -> None:
    """Raise a clear error unless ``images`` is a finite float ``[N, H, W, 3]`` array."""
    if not hasattr(images, "shape") or images.ndim != 4:
        raise ValueError(f"{where}: expected an image batch of rank 4 [N, H, W, C], got shape {getattr(images, 'shape', None)}")
    if not np.issubdtype(np.asarray(images).dtype, np.floating):
        raise TypeError(f"{where}: expected floating-point pixels, got dtype {images.dtype}")
    if not np.all(np.isfinite(images)):
        raise ValueError(f"{where}: contains non-finite pixel values (NaN or inf)")
