"""``folders``: a generic reader for any centre laid out as ``ROOT/<domain>/{images,masks}``.

* one sub-folder per domain (centre); each has ``images/`` and ``masks/``;
  other sub-folders and files are ignored;
* an image and its mask share the file stem; extensions may differ
  (``x.jpg`` with ``x.png``); JPEG, PNG, BMP and TIFF are read;
* images keep their dynamic range: 8-bit RGB is resized as 8-bit (bicubic),
  16-bit and float images (TIFF/PNG) channel by channel in float32; grey
  images are repeated to 3 channels, an alpha channel is dropped; a NaN or
  inf pixel is an error naming the file; then every image is min-max
  normalised by its own range (:func:`tta_jax.data.base.minmax_normalise`);
* masks are decoded by ``mask_encoding`` (:class:`FolderOptions`) and resized
  with nearest interpolation; a mask whose size differs from its image's is
  an error (``resize_masks=True`` resizes it instead); a domain whose masks
  are all empty is an error naming the folder and the values found
  (``allow_empty_masks=True`` accepts it).

Mask encodings:

* ``auto`` (default) — binary masks in any common form: {0, 255}, {0, 1}, any
  single foreground value, coloured (e.g. red on black) or palette masks: the
  pixel's largest channel (or palette index) is its value, and with two
  values the larger one is foreground; a lossy mask (JPEG: many grey levels)
  is thresholded at half its type's range. A few discrete levels (e.g.
  0/128/255) are ambiguous: an error that names them and the encodings below;
* ``binary`` — threshold at half the type's range, whatever the levels;
* ``fundus`` — the GraTa/VPTTA/DoFE optic disc/cup encoding (255 background,
  128 rim, 0 cup): channels ``disc`` (incl. cup) and ``cup``;
* ``labels`` — a class-index map: channel ``k`` is label ``k + 1`` (0 is background);
* ``labels_nested`` — as ``labels``, channel ``k`` is every label ``>= k + 1``
  (nested structures such as disc ⊃ cup with labels 1 = rim, 2 = cup).

``channels`` names the output channels (comma-separated; defaults ``fg`` or
``disc,cup``; for the label encodings it also sets how many classes there are).

Splits: a folder domain has no split of its own.  ``all`` is every pair in
sorted-stem order (the stream order of a target); ``train``/``test`` are a
deterministic 80/20 split (every 5th pair in sorted order is ``test``), so a
source model is scored on images it never trained on.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from tta_jax.data.base import DomainData, minmax_normalise
from tta_jax.hparams import from_mapping

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# a mask with more distinct levels than this is taken as lossy (JPEG) and thresholded
DISCRETE_LEVELS = 8


@dataclasses.dataclass(frozen=True)
class FolderOptions:
    """How a ``folders`` dataset decodes its masks (config ``folders.*``)."""

    mask_encoding: Literal["auto", "binary", "fundus", "labels", "labels_nested"] = "auto"
    channels: str = ""
    allow_empty_masks: bool = False
    resize_masks: bool = False

    def channel_names(self) -> tuple[str, ...]:
        names = tuple(c.strip() for c in self.channels.split(",") if c.strip())
        if names:
            if self.mask_encoding in ("auto", "binary") and len(names) != 1:
                raise ValueError(f"folders.channels={self.channels!r}: a binary mask has one channel")
            if self.mask_encoding == "fundus" and len(names) != 2:
                raise ValueError(f"folders.channels={self.channels!r}: the fundus encoding has two channels")
            return names
        return ("disc", "cup") if self.mask_encoding == "fundus" else ("fg",)


def _listing(folder: Path) -> dict[str, Path]:
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            if p.stem in files:
                raise ValueError(f"{folder}: two files share the stem {p.stem!r} ({files[p.stem].name}, {p.name})")
            files[p.stem] = p
    return files


def _read_raw(path: Path, what: str) -> tuple[np.ndarray, bool]:
    """(pixels as stored, is it a palette image); TIFF through tifffile (any bit depth, float, RGB)."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile
            return np.asarray(tifffile.imread(path)), False
        with Image.open(path) as im:
            palette = im.mode == "P"
            if im.mode in ("I;16", "I;16B", "I;16L"):
                return np.asarray(im, dtype=np.uint16), False
            return np.asarray(im), palette
    except Exception as e:  # PIL/tifffile raise many types for damaged or oversized files
        raise ValueError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e


def _resize_float(channel: np.ndarray, image_size: int, resample) -> np.ndarray:
    im = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32), mode="F")
    return np.asarray(im.resize((image_size, image_size), resample), dtype=np.float32)


def read_image(path: Path, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``[S, S, 3]`` float32 in [0, 1] (own range) and the stored ``(height, width)``."""
    raw, palette = _read_raw(path, "image")
    if palette:
        with Image.open(path) as im:
            raw = np.asarray(im.convert("RGB"))
    if raw.ndim == 2:
        raw = np.repeat(raw[..., None], 3, -1)
    if raw.ndim != 3 or raw.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image {path}: expected grey, RGB or RGBA pixels, got shape {raw.shape}")
    raw = np.repeat(raw, 3, -1) if raw.shape[-1] == 1 else raw[..., :3]
    if raw.dtype.kind == "f" and not np.all(np.isfinite(raw)):
        raise ValueError(f"image {path}: contains non-finite pixel values (NaN or inf)")
    if raw.dtype == np.uint8:
        arr = np.asarray(Image.fromarray(raw).resize((image_size, image_size), Image.BICUBIC), np.float32)
    else:
        arr = np.stack([_resize_float(raw[..., c], image_size, Image.BICUBIC) for c in range(3)], -1)
    return minmax_normalise(arr, where=str(path)), raw.shape[:2]


def _mask_values(raw: np.ndarray, palette: bool) -> np.ndarray:
    """One value per pixel: the palette index, or the largest colour channel (alpha dropped)."""
    if raw.ndim == 3:
        raw = raw[..., :3] if raw.shape[-1] in (3, 4) else raw[..., :1]
        raw = raw.max(axis=-1)
    if raw.dtype.kind == "f" and not np.all(np.isfinite(raw)):
        raise ValueError("contains non-finite values (NaN or inf)")
    return raw


def _half_range(values: np.ndarray) -> float:
    if values.dtype.kind in "ui":
        return np.iinfo(values.dtype).max / 2
    return 0.5 if values.max() <= 1 else 127.5


def decode_mask(values: np.ndarray, palette: bool, options: FolderOptions, where: str) -> np.ndarray:
    """``[H, W, C]`` uint8 channels from a mask's per-pixel values (see the module docstring)."""
    encoding, n = options.mask_encoding, len(options.channel_names())
    if encoding == "fundus":
        return np.stack([values < 255, values == 0], -1).astype(np.uint8)
    if encoding in ("labels", "labels_nested"):
        labels = values.astype(np.int64)
        if labels.max(initial=0) > n:
            raise ValueError(f"mask {where}: label {int(labels.max())} but folders.channels names {n} classes")
        cmp = (lambda k: labels >= k) if encoding == "labels_nested" else (lambda k: labels == k)
        return np.stack([cmp(k + 1) for k in range(n)], -1).astype(np.uint8)
    if encoding == "binary":
        return (values > _half_range(values))[..., None].astype(np.uint8)
    levels = np.unique(values)
    if len(levels) <= 1:
        return (values > 0)[..., None].astype(np.uint8)
    if len(levels) == 2:
        return (values == levels[1])[..., None].astype(np.uint8)
    if palette or len(levels) <= DISCRETE_LEVELS:
        shown = ", ".join(str(v) for v in levels[:DISCRETE_LEVELS])
        raise ValueError(f"mask {where}: {len(levels)} discrete levels ({shown}) are not a binary mask; set "
                         "folders.mask_encoding to fundus (255 background, 128 rim, 0 cup), labels or "
                         "labels_nested (with folders.channels), or binary (threshold at half range)")
    return (values > _half_range(values))[..., None].astype(np.uint8)


def read_mask(path: Path, image_size: int, options: FolderOptions = FolderOptions(),
              image_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(``[S, S, C]`` uint8 channels, the distinct raw values seen) of one mask file."""
    raw, palette = _read_raw(path, "mask")
    try:
        values = _mask_values(raw, palette)
    except ValueError as e:
        raise ValueError(f"mask {path}: {e}") from None
    if image_shape is not None and values.shape[:2] != tuple(image_shape) and not options.resize_masks:
        raise ValueError(f"mask {path} is {values.shape[1]}x{values.shape[0]} but its image is "
                         f"{image_shape[1]}x{image_shape[0]} (set folders.resize_masks=True to resize it)")
    channels = decode_mask(values, palette, options, str(path))
    resized = np.stack([np.asarray(Image.fromarray(channels[..., c] * 255).resize(
        (image_size, image_size), Image.NEAREST)) > 127 for c in range(channels.shape[-1])], -1)
    return resized.astype(np.uint8), np.unique(values)[:DISCRETE_LEVELS + 1]


class FolderDataset:
    """Reader for ``ROOT/<domain>/{images,masks}`` (e.g. ``shared/data/polyp``)."""

    name = "folders"

    def __init__(self, data_dir: str, options=None):
        if not data_dir:
            raise ValueError("dataset 'folders' needs data_dir (a folder with one sub-folder per domain)")
        self.options = options if isinstance(options, FolderOptions) else from_mapping(FolderOptions, options, "folders")
        self.channel_names = self.options.channel_names()
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
        images, masks, shapes, seen = [], [], [], set()
        for _, image_path, mask_path in pairs:
            image, shape = read_image(image_path, image_size)
            mask, values = read_mask(mask_path, image_size, self.options, shape)
            shapes.append(shape)
            images.append(image)
            masks.append(mask)
            seen.update(values.tolist())
        masks = np.stack(masks)
        if not masks.any() and not self.options.allow_empty_masks:
            shown = ", ".join(str(v) for v in sorted(seen)[:DISCRETE_LEVELS])
            raise ValueError(f"{self.root / domain / 'masks'}: every mask of this split is empty (values found: "
                             f"{shown}); check folders.mask_encoding, or set folders.allow_empty_masks=True")
        return DomainData(domain, np.stack(images), masks, tuple(stem for stem, _, _ in pairs),
                          np.asarray(shapes, np.int64).reshape(-1, 2))
