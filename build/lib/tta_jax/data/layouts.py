"""Original folder layouts of the real datasets: where each centre's image/mask pairs are.

Each ``*_pairs(root)`` function returns ``{split_name: [(sample_id, image_path, mask_path), ...]}``
in sorted order, and each ``decode_*_mask`` turns a raw mask file into
``[H, W, C]`` uint8 channels.  These are plain functions, so the TFDS
builders (:mod:`tta_jax.data.tfds_builders`) and tests share them.

Pairing is by file stem (or by the layout's documented name rule).  A folder
whose images and masks do not pair one-to-one is rejected with an error naming
the folder and the unmatched names — never paired by position silently.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def split_name(*parts: str) -> str:
    """A TFDS-safe split name (letters, digits, underscores)."""
    return "_".join(re.sub(r"[^0-9A-Za-z]+", "_", p).strip("_") for p in parts if p)


def read_array(path: Path) -> np.ndarray:
    """Read an image file as a numpy array (TIFF through tifffile, others through PIL)."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile
            return np.asarray(tifffile.imread(path))
        with Image.open(path) as im:
            return np.asarray(im)
    except Exception as e:  # PIL/tifffile raise many types for damaged files
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def _files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"expected folder not found: {folder}")
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            out[p.stem] = p
    return out


def pair_folder(image_dir: Path, mask_dir: Path, mask_stem=lambda stem: stem, prefix: str = ""):
    """Pair ``image_dir``/``mask_dir`` by stem (``mask_stem`` maps an image stem to its mask stem)."""
    images, masks = _files(image_dir), _files(mask_dir)
    if not images:
        raise ValueError(f"{image_dir}: no images")
    pairs, unmatched = [], []
    for stem, path in images.items():
        m = masks.get(mask_stem(stem))
        if m is None:
            unmatched.append(stem)
        else:
            pairs.append((prefix + stem, path, m))
    extra = sorted(set(masks) - {mask_stem(s) for s in images})
    if unmatched or extra:
        raise ValueError(
            f"{image_dir.parent}: images and masks do not pair by name (images without mask: "
            f"{unmatched[:4]}, masks without image: {extra[:4]}); refusing to pair them by position")
    return pairs


# --- fundus ------------------------------------------------------------------------

def decode_fundus_mask(raw: np.ndarray) -> np.ndarray:
    """GraTa/VPTTA/DoFE encoding: 255 background, 128 rim, 0 cup → [disc (incl. cup), cup]."""
    grey = raw[..., 0] if raw.ndim == 3 else raw
    return np.stack([grey < 255, grey == 0], -1).astype(np.uint8)


FUNDUS_ODOC_DOMAINS = ("RIM_ONE_r3", "REFUGE", "ORIGA", "REFUGE_Valid", "Drishti_GS")


def fundus_mask_path(root: Path, listed: str) -> Path:
    """The mask file of a CSV row, named as the official GraTa/VPTTA reader opens it.

    That reader replaces a listed ``X.tif`` by ``X-1.tif`` (the RIM-ONE-r3 masks are
    stored so); we take ``X-1.tif`` when it exists and the listed file otherwise.
    """
    path = root / listed
    if path.suffix.lower() == ".tif":
        official = path.with_name(f"{path.stem}-1{path.suffix}")
        if official.exists() or not path.exists():
            return official if official.exists() else path
    return path


def fundus_odoc_pairs(root: Path):
    """GraTa/VPTTA layout: ``<D>_train.csv``/``<D>_test.csv`` (``REFUGE_Valid.csv``) with image,mask columns.

    Paths in the CSVs are relative to ``root``.  Splits: ``<D>_train``, ``<D>_test``,
    ``REFUGE_Valid``; a target domain uses train + test.
    """
    root = Path(root)
    splits = {}
    for domain in FUNDUS_ODOC_DOMAINS:
        files = [(f"{domain}.csv", domain)] if domain == "REFUGE_Valid" else \
            [(f"{domain}_train.csv", f"{domain}_train"), (f"{domain}_test.csv", f"{domain}_test")]
        for csv_name, split in files:
            path = root / csv_name
            if not path.exists():
                continue
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            if rows and not {"image", "mask"} <= set(rows[0]):
                raise ValueError(f"{path}: needs 'image' and 'mask' columns, has {list(rows[0])}")
            splits[split] = [(f"{domain}/{Path(r['image']).stem}", root / r["image"], fundus_mask_path(root, r["mask"]))
                             for r in rows]
    if not splits:
        raise FileNotFoundError(f"{root}: no fundus CSV found (expected e.g. RIM_ONE_r3_train.csv)")
    return splits


def fundus_dofe_pairs(root: Path):
    """DoFE layout: ``Domain{1..4}/{train,test}/ROIs/{image,mask}/*.png``; splits ``Domain1_train``..."""
    root = Path(root)
    splits = {}
    for domain in sorted(d.name for d in root.iterdir() if d.is_dir() and d.name.startswith("Domain")):
        for part in ("train", "test"):
            base = root / domain / part / "ROIs"
            if base.is_dir():
                splits[split_name(domain, part)] = pair_folder(base / "image", base / "mask",
                                                               prefix=f"{domain}/{part}/")
    if not splits:
        raise FileNotFoundError(f"{root}: no Domain*/{{train,test}}/ROIs folders found")
    return splits


# --- polyp -------------------------------------------------------------------------

def decode_binary_mask(raw: np.ndarray, threshold: int = 127) -> np.ndarray:
    """Any channel above the threshold is foreground (also BKAI-IGH's red/green colour masks)."""
    arr = raw if raw.ndim == 2 else raw[..., :3].max(-1)
    if arr.dtype != np.uint8:
        arr = (arr > 0).astype(np.uint8) * 255 if arr.max() <= 1 else arr
    return (arr > threshold).astype(np.uint8)[..., None]


# Candidate layouts per centre, first existing wins: (image dir, mask dir, mask stem rule).
POLYP_LAYOUTS = {
    "Kvasir-SEG": [("Kvasir-SEG/images", "Kvasir-SEG/masks", None), ("Kvasir/images", "Kvasir/masks", None)],
    "CVC-ClinicDB": [("CVC-ClinicDB/Original", "CVC-ClinicDB/Ground Truth", None),
                     ("CVC-ClinicDB/images", "CVC-ClinicDB/masks", None)],
    "ETIS-LaribPolypDB": [("ETIS-LaribPolypDB/ETIS-LaribPolypDB", "ETIS-LaribPolypDB/GroundTruth", "p{}"),
                          ("ETIS-LaribPolypDB/images", "ETIS-LaribPolypDB/masks", None)],
    "CVC-ColonDB": [("CVC-ColonDB/images", "CVC-ColonDB/masks", None)],
    "CVC-300": [("CVC-300/images", "CVC-300/masks", None)],
    "BKAI-IGH": [("BKAI-IGH/train/train", "BKAI-IGH/train_gt/train_gt", None),
                 ("BKAI-IGH/images", "BKAI-IGH/masks", None)],
}


def polyp_pairs(root: Path):
    """The six polyp centres in their usual layouts (official downloads or the PraNet TestDataset)."""
    root = Path(root)
    splits = {}
    for centre, candidates in POLYP_LAYOUTS.items():
        for image_dir, mask_dir, rule in candidates:
            if (root / image_dir).is_dir() and (root / mask_dir).is_dir():
                stem_rule = (lambda s, r=rule: r.format(s)) if rule else (lambda s: s)
                splits[split_name(centre)] = pair_folder(root / image_dir, root / mask_dir, stem_rule,
                                                         prefix=f"{centre}/")
                break
    if not splits:
        raise FileNotFoundError(f"{root}: none of the polyp centres {list(POLYP_LAYOUTS)} found")
    return splits


# --- prostate ----------------------------------------------------------------------

PROSTATE_SITES = ("BIDMC", "BMC", "HK", "I2CVB", "RUNMC", "UCL")


def prostate_saml_pairs(root: Path, on_mismatch: str = "error"):
    """SAML slice layout: ``{site}/{train,test}/{image,mask}/*.png``; splits ``BIDMC_train``...

    Image and mask must share names: a folder whose names are offset (as in
    the sample's ``I2CVB/train``) is refused with an error naming both lists
    (``on_mismatch="error"``), or left out with a warning (``"skip"``).
    """
    if on_mismatch not in ("error", "skip"):
        raise ValueError(f"on_mismatch must be 'error' or 'skip', got {on_mismatch!r}")
    root = Path(root)
    splits = {}
    for site in PROSTATE_SITES:
        for part in ("train", "test"):
            base = root / site / part
            if base.is_dir():
                try:
                    splits[split_name(site, part)] = pair_folder(base / "image", base / "mask",
                                                                 prefix=f"{site}/{part}/")
                except ValueError as e:
                    if on_mismatch == "error":
                        raise
                    import warnings
                    warnings.warn(f"skipping {base}: {e}")
    if not splits:
        raise FileNotFoundError(f"{root}: no {{site}}/{{train,test}}/{{image,mask}} folders found")
    return splits
