"""Datasets: each exposes ``domains``, ``channel_names``, ``ids(domain, split)`` and
``load(domain, split, image_size) -> DomainData``.  This package never imports
methods or the runner."""
from __future__ import annotations

from tta_jax.data.base import DomainData, check_image_batch, minmax_normalise
from tta_jax.data.folders import FolderDataset
from tta_jax.data.synthetic import SyntheticFundus

DATASETS = ("synthetic_fundus", "folders")


def get_dataset(name: str, data_dir: str = "", **kwargs):
    """Build a dataset by name; unknown names raise a ValueError listing the choices."""
    if name == "synthetic_fundus":
        return SyntheticFundus(**kwargs)
    if name == "folders":
        return FolderDataset(data_dir)
    raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")


__all__ = ["DATASETS", "DomainData", "FolderDataset", "SyntheticFundus", "check_image_batch",
           "get_dataset", "minmax_normalise"]
