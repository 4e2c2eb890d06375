"""``folders``: a generic reader for any centre laid out as ``ROOT/<domain>/{images,masks}``.

* one sub-folder per domain (centre); each has ``images/`` and ``masks/``;
  other sub-folders and files are ignored;
* an image and its mask share the file stem; extensions may differ
  (``x.jpg`` with ``x.png``); JPEG, PNG, BMP and TIFF are read;
* masks are read as grey levels and thresholded at > 127 (one channel);
* images are resized with bicubic and masks with nearest interpolation, then
  min-max normalised per image (:func:`tta_jax.data.base.minmax_normalise`).

Splits: a folder domain has no split of its own.  ``all`` is every pair in
sorted-stem order (the stream order of a target); ``train``/``test`` are a
deterministic 80/20 split (every 5th pair in sorted order is ``test``), so a
source model is scored on images it never trained on.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from tta_jax.data.base import DomainData, minmax_normalise

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _listing(folder: Path) -> dict[str, Path]:
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            if p.stem in files:
                raise ValueError(f"{folder}: two files share the stem {p.stem!r} ({files[p.stem].name}, {p.name})")
            files[p.stem] = p
    return files


def read_image(path: Path, image_size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return minmax_normalise(arr, where=str(path))


def read_mask(path: Path, image_size: int, threshold: int = 127) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("L").resize((image_size, image_size), Image.NEAREST)
            arr = np.asarray(im)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read mask {path}: {e}") from e
    return (arr > threshold).astype(np.uint8)[..., None]


class FolderDataset:
    """Reader for ``ROOT/<domain>/{images,masks}`` (e.g. ``shared/data/polyp``)."""

    name = "folders"
    channel_names = ("fg",)

    def __init__(self, data_dir: str):
        if not data_dir:
            raise ValueError("dataset 'folders' needs data_dir (a folder with one sub-folder per domain)")
        self.root = Path(os.path.expanduser(data_dir))
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder not found: {self.root}")
        self.domains = tuple(sorted(
            d.name for d in self.root.iterdir()
            if d.is_dir() and (d / "images").is_dir() and (d / "masks").is_dir()))
        if not self.domains:
            raise ValueError(f"{self.root}: no domain sub-folder with images/ and masks/ found")

    def pairs(self, domain: str) -> list[tuple[str, Path, Path]]:
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r} in {self.root}; domains are {list(self.domains)}")
        images = _listing(self.root / domain / "images")
        masks = _listing(self.root / domain / "masks")
        if not images:
            raise ValueError(f"{self.root / domain / 'images'}: empty domain (no image files)")
        missing = sorted(set(images) ^ set(masks))
        if missing:
            raise ValueError(
                f"{self.root / domain}: image/mask mismatch: {len(images)} images, {len(masks)} masks; "
                f"stems without a partner: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return [(stem, images[stem], masks[stem]) for stem in sorted(images)]

    def ids(self, domain: str, split: str) -> list[str]:
        return [stem for stem, _, _ in self._split(self.pairs(domain), split)]

    @staticmethod
    def _split(pairs, split):
        if split == "all":
            return pairs
        if split == "test":
            return pairs[4::5]
        if split == "train":
            return [p for i, p in enumerate(pairs) if i % 5 != 4]
        raise ValueError(f"unknown split {split!r}; use train, test or all")

    def load(self, domain: str, split: str, image_size: int) -> DomainData:
        pairs = self._split(self.pairs(domain), split)
        images = np.stack([read_image(ip, image_size) for _, ip, _ in pairs])
        masks = np.stack([read_mask(mp, image_size) for _, _, mp in pairs])
        return DomainData(domain, images, masks, tuple(stem for stem, _, _ in pairs))
