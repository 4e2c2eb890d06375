"""TensorFlow-Datasets builders for the real datasets (``array_record`` files, no TensorFlow needed).

Each builder reads the raw files of a dataset from its manual directory, in
the dataset's original layout (:mod:`tta_jax.data.layouts`), resizes them
(bicubic images, nearest masks) to the builder config's ``image_size`` and
writes one split per domain part, e.g. ``Domain1_train``, ``Kvasir_SEG``.
Images and masks are stored as zlib-compressed uint8 tensors: TFDS's Image
feature would need TensorFlow to encode PNGs.  Reading goes through
``as_data_source()`` (random access, numpy, no TensorFlow):

    builder = FundusDofe(data_dir=..., config="s256", file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=RAW))
    source = builder.as_data_source(split="Domain1_test")

:class:`TFDSDataset` wraps a built dataset in the project's dataset interface
(``domains``, ``ids``, ``load``), restores the original order (the stored
``order`` field; array_record shuffles by key) and normalises each image
(``minmax``, the fundus papers; or ``imagenet`` mean/std, the polyp papers).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from tta_jax.data import layouts
from tta_jax.data.base import DomainData, minmax_normalise

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclasses.dataclass
class SegmentationConfig(tfds.core.BuilderConfig):
    image_size: int = 256


def _configs():
    return [SegmentationConfig(name=f"s{s}", image_size=s, description=f"{s}×{s} pixels") for s in (128, 256, 512)]


class _SegmentationBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared machinery: one split per domain part, resized images and decoded mask channels."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "native_size: each image's stored (height, width), for distances in native pixels"}
    BUILDER_CONFIGS = _configs()
    NUM_CHANNELS = 1
    CHANNEL_NAMES = ("fg",)

    def _info(self):
        s, c = self.builder_config.image_size, self.NUM_CHANNELS
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB),
                "mask": tfds.features.Tensor(shape=(s, s, c), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB),
                "id": tfds.features.Text(),
                "order": tfds.features.Scalar(dtype=np.int64),
                "native_size": tfds.features.Tensor(shape=(2,), dtype=np.int64),
            }),
            homepage="https://github.com/",
        )

    def pairs(self, root: Path) -> dict:
        raise NotImplementedError

    def decode_mask(self, raw: np.ndarray) -> np.ndarray:
        return layouts.decode_binary_mask(raw)

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"{self.name}: manual directory {root} not found (put the raw dataset there)")
        return {split: self._generate_examples(pairs) for split, pairs in self.pairs(root).items()}

    def _generate_examples(self, pairs):
        size = self.builder_config.image_size
        for order, (sample_id, image_path, mask_path) in enumerate(pairs):
            image = layouts.read_array(image_path)
            if image.ndim == 2:
                image = np.repeat(image[..., None], 3, -1)
            image = image[..., :3]
            if image.dtype != np.uint8:
                image = np.clip(image / max(float(image.max()), 1e-8) * 255, 0, 255).astype(np.uint8)
            mask = self.decode_mask(layouts.read_array(mask_path))
            if mask.shape[:2] != image.shape[:2]:
                raise ValueError(f"{mask_path}: mask {mask.shape[:2]} and image {image.shape[:2]} differ in size")
            native_size = np.asarray(image.shape[:2], np.int64)
            image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
            mask = np.stack([np.asarray(Image.fromarray(mask[..., c] * 255).resize((size, size), Image.NEAREST)) > 127
                             for c in range(mask.shape[-1])], -1).astype(np.uint8)
            yield sample_id, {"image": image, "mask": mask, "id": sample_id, "order": order, "native_size": native_size}


class FundusOdoc(_SegmentationBuilder):
    """GraTa/VPTTA 5-domain fundus OD/OC (CSV lists); channels disc (incl. cup), cup."""

    NUM_CHANNELS, CHANNEL_NAMES = 2, ("disc", "cup")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place the GraTa/VPTTA Fundus folder (with <D>_train.csv, <D>_test.csv) here."

    def pairs(self, root):
        return layouts.fundus_odoc_pairs(root)

    def decode_mask(self, raw):
        return layouts.decode_fundus_mask(raw)


class FundusDofe(_SegmentationBuilder):
    """DoFE 4-domain fundus layout (Domain{1..4}/{train,test}/ROIs/{image,mask})."""

    NUM_CHANNELS, CHANNEL_NAMES = 2, ("disc", "cup")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place the DoFE Fundus folder (Domain1..Domain4) here."

    def pairs(self, root):
        return layouts.fundus_dofe_pairs(root)

    def decode_mask(self, raw):
        return layouts.decode_fundus_mask(raw)


class Polyp(_SegmentationBuilder):
    """Kvasir-SEG, CVC-ClinicDB, ETIS-LaribPolypDB, CVC-ColonDB, CVC-300, BKAI-IGH (binary masks)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place the polyp centres' folders (e.g. Kvasir-SEG/, CVC-ClinicDB/) here."

    def pairs(self, root):
        return layouts.polyp_pairs(root)


class ProstateSaml(_SegmentationBuilder):
    """SAML multi-site prostate T2 slices (BIDMC, BMC, HK, I2CVB, RUNMC, UCL)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place the SAML slice folders ({site}/{train,test}/{image,mask}) here."
    on_mismatch = "error"

    def pairs(self, root):
        return layouts.prostate_saml_pairs(root, self.on_mismatch)


BUILDERS = {"fundus_odoc": FundusOdoc, "fundus_dofe": FundusDofe, "polyp": Polyp, "prostate_saml": ProstateSaml}
# A domain is a group of splits: the fundus/prostate domains pool their train and test parts.
NORMALISATIONS = ("minmax", "imagenet")


def build(name: str, manual_dir, data_dir, image_size: int = 256, **options):
    """Prepare (once) and return the TFDS builder ``name`` for ``image_size``."""
    if name not in BUILDERS:
        raise ValueError(f"unknown TFDS dataset {name!r}; choose one of {sorted(BUILDERS)}")
    cls = BUILDERS[name]
    config = next((c for c in cls.BUILDER_CONFIGS if c.image_size == image_size), None) or \
        SegmentationConfig(name=f"s{image_size}", image_size=image_size)
    tfds.disable_progress_bar()
    builder = cls(data_dir=str(data_dir), config=config, file_format="array_record")
    for k, v in options.items():
        setattr(builder, k, v)
    if manual_dir is not None and not Path(manual_dir).is_dir():
        raise FileNotFoundError(f"raw data folder not found: {manual_dir}")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


class TFDSDataset:
    """A built TFDS dataset in the project's dataset interface.

    Domains: split names with a ``_train``/``_test`` suffix are pooled into one
    domain (``Domain1`` = ``Domain1_train`` + ``Domain1_test``); ``load(domain,
    "train"|"test")`` reads one part, ``"all"`` both (train first), each in the
    original file order.  A domain without parts (a polyp centre) is split
    like a ``folders`` domain: every 5th image is ``test``, the rest ``train``.
    """

    def __init__(self, name: str, manual_dir, data_dir, image_size: int = 256, normalisation: str = "minmax",
                 **options):
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {normalisation!r}; choose one of {list(NORMALISATIONS)}")
        self.name, self.normalisation = name, normalisation
        self.builder = build(name, manual_dir, data_dir, image_size, **options)
        self.channel_names = BUILDERS[name].CHANNEL_NAMES
        self.splits = sorted(self.builder.info.splits.keys())
        domains = []
        for s in self.splits:
            d = s[: -len("_train")] if s.endswith("_train") else s[: -len("_test")] if s.endswith("_test") else s
            if d not in domains:
                domains.append(d)
        self.domains = tuple(domains)

    def _parts(self, domain: str, split: str) -> list[str]:
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r} in {self.name}; domains are {list(self.domains)}")
        if split not in ("train", "test", "all"):
            raise ValueError(f"unknown split {split!r}; use train, test or all")
        parts = [p for p in (f"{domain}_train", f"{domain}_test") if p in self.splits] or [domain]
        if split == "all" or parts == [domain]:
            return parts
        if len(parts) == 1:   # a domain with a single part (e.g. REFUGE_Valid) serves both
            return parts
        chosen = [p for p in parts if p.endswith("_" + split)]
        if not chosen:
            raise ValueError(f"domain {domain!r} has no {split!r} part (parts: {parts})")
        return chosen

    def _read(self, part: str):
        source = self.builder.as_data_source(split=part)
        examples = sorted((source[i] for i in range(len(source))), key=lambda e: int(e["order"]))
        return examples

    def _examples(self, domain: str, split: str) -> list[dict]:
        parts = self._parts(domain, split)
        examples = [e for part in parts for e in self._read(part)]
        if parts == [domain] and split != "all":
            examples = examples[4::5] if split == "test" else [e for i, e in enumerate(examples) if i % 5 != 4]
        return examples

    def ids(self, domain: str, split: str) -> list[str]:
        return [e["id"].decode() if isinstance(e["id"], bytes) else e["id"] for e in self._examples(domain, split)]

    def normalise(self, image_u8: np.ndarray, where: str) -> np.ndarray:
        if self.normalisation == "imagenet":
            return (image_u8.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        return minmax_normalise(image_u8, where=where)

    def load(self, domain: str, split: str, image_size: int | None = None) -> DomainData:
        if image_size is not None and image_size != self.builder.builder_config.image_size:
            raise ValueError(f"{self.name} was built at {self.builder.builder_config.image_size}², "
                             f"asked for {image_size}²")
        examples = self._examples(domain, split)
        if not examples:
            raise ValueError(f"{self.name}: domain {domain!r} has no {split!r} images")
        ids = tuple(e["id"].decode() if isinstance(e["id"], bytes) else e["id"] for e in examples)
        images = np.stack([self.normalise(e["image"], f"{self.name}/{i}") for e, i in zip(examples, ids)])
        masks = np.stack([e["mask"] for e in examples])
        return DomainData(domain, images, masks, ids, np.stack([e["native_size"] for e in examples]))
