"""Datasets: each exposes ``domains``, ``channel_names``, ``ids(domain, split)`` and
``load(domain, split, image_size) -> DomainData``.  This package never imports
methods or the runner."""
from __future__ import annotations

from tta_jax.data.base import DomainData, check_image_batch, minmax_normalise
from tta_jax.data.folders import FolderDataset
from tta_jax.data.synthetic import SyntheticFundus

TFDS_DATASETS = ("fundus_odoc", "fundus_dofe", "polyp", "prostate_saml")
DATASETS = ("synthetic_fundus", "folders", *TFDS_DATASETS)


def get_dataset(name: str, data_dir: str = "", **kwargs):
    """Build a dataset by name; unknown names raise a ValueError listing the choices.

    ``synthetic_fundus`` takes its generator options; ``folders`` a root and its
    :class:`tta_jax.data.folders.FolderOptions`; the
    TFDS datasets take ``data_dir`` (the raw files in their original layout),
    ``tfds_dir`` (where the array_record files go), ``image_size`` and
    ``normalisation``.
    """
    if name == "synthetic_fundus":
        return SyntheticFundus(**kwargs)
    if name == "folders":
        return FolderDataset(data_dir, kwargs)
    if name in TFDS_DATASETS:
        import os
        from tta_jax.data.tfds_builders import TFDSDataset
        if not data_dir:
            raise ValueError(f"dataset {name!r} needs data_dir (the raw dataset in its original layout)")
        if not os.path.isdir(os.path.expanduser(data_dir)):
            raise FileNotFoundError(f"data folder not found: {data_dir}")
        tfds_dir = os.path.expanduser(kwargs.pop("tfds_dir", "~/.cache/tta_jax/tfds"))
        return TFDSDataset(name, os.path.expanduser(data_dir), tfds_dir, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")


__all__ = ["DATASETS", "DomainData", "FolderDataset", "SyntheticFundus", "check_image_batch",
           "get_dataset", "minmax_normalise"]
