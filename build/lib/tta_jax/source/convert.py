"""Convert a PyTorch ResUNet ``state_dict`` (official GraTa/VPTTA layout) into Flax variables.

The official network (``networks/ResUnet.py`` of GraTa/VPTTA, released as
``last-Res_Unet.pth``) names its parameters ``res.conv1.weight``,
``res.layer1.0.bn1.running_mean``, ``res.layer2.0.downsample.0.weight``,
``up1.tr_conv.weight``, ``up5.weight``, ``bnout.bias``, ``seg_head.weight``...
This module maps each onto :class:`tta_jax.models.ResUNet`:

* conv ``OIHW`` → Flax ``HWIO``; transposed conv ``(in, out, kH, kW)`` →
  ``(kH, kW, in, out)`` flipped in both spatial axes (Flax's ``ConvTranspose``
  with ``transpose_kernel=False`` correlates where PyTorch convolves; checked
  against PyTorch logits in ``tests/test_torch_reference.py``);
* BN ``weight``/``bias`` → ``params/scale``/``bias``; ``running_mean``/
  ``running_var`` → ``batch_stats/mean``/``var``; ``num_batches_tracked`` dropped;
* a ``module.`` prefix (DataParallel) is stripped.

The official checkpoint also holds the auxiliary branches of GraTa's Table 5
(``recon*``, ``denoise*``, ``supres*``, ``rotate_head``) and the classifier
``res.fc`` that the official ResNet always builds and never uses; they are
reported in ``ignored`` since the segmentation network does not use them.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np
from flax import traverse_util

from tta_jax.checkpoints import CheckpointError

UNUSED_PREFIXES = ("recon", "denoise", "supres", "rotate_head", "pool", "res.fc.")


def _flax_path(key: str) -> tuple[str, tuple[str, ...], str] | None:
    """Map one PyTorch key to (collection, module path, leaf) or None if unknown."""
    parts = key.split(".")
    leaf = parts[-1]
    if parts[0] == "res":
        parts = parts[1:]
        m = re.fullmatch(r"layer(\d)", parts[0])
        if m:
            block = f"layer{m.group(1)}_{parts[1]}"
            if parts[2] == "downsample":
                module = (block, "downsample_conv" if parts[3] == "0" else "downsample_bn")
            else:
                module = (block, parts[2])
        else:
            module = (parts[0],)
    else:
        module = tuple(parts[:-1])
    is_bn = module[-1].startswith("bn") or module[-1] == "downsample_bn"
    if is_bn:
        table = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                 "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
        if leaf not in table:
            return None
        collection, name = table[leaf]
        return collection, module, name
    if leaf not in ("weight", "bias"):
        return None
    return "params", module, "kernel" if leaf == "weight" else "bias"


def _to_flax_array(key: str, value: np.ndarray, module: tuple[str, ...], name: str) -> np.ndarray:
    if name != "kernel":
        return value
    if module[-1] == "tr_conv" or module == ("up5",):
        return np.ascontiguousarray(value.transpose(2, 3, 0, 1)[::-1, ::-1])  # -> (kH, kW, in, out), flipped
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)        # (out, in, kH, kW) -> (kH, kW, in, out)
    raise CheckpointError(f"{key}: unexpected kernel rank {value.ndim}")


def torch_state_dict_to_flax(state_dict: Mapping[str, np.ndarray], template) -> tuple[dict, list[str]]:
    """Build Flax variables shaped like ``template`` from a PyTorch state_dict.

    Returns ``(variables, ignored_keys)``.  Raises :class:`CheckpointError`
    naming the key on an unknown key, a shape mismatch or a missing parameter.
    """
    want = traverse_util.flatten_dict(template)
    got, ignored = {}, []
    for raw_key, value in state_dict.items():
        key = raw_key[len("module."):] if raw_key.startswith("module.") else raw_key
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith(UNUSED_PREFIXES):
            ignored.append(key)
            continue
        mapped = _flax_path(key)
        if mapped is None:
            raise CheckpointError(f"state_dict key {raw_key!r} has no counterpart in the Flax ResUNet")
        collection, module, name = mapped
        path = (collection, *module, name)
        if path not in want:
            raise CheckpointError(f"state_dict key {raw_key!r} maps to {'/'.join(path)}, which the model "
                                  f"does not have (another backbone?)")
        array = _to_flax_array(key, np.asarray(value, dtype=np.float32), module, name)
        if array.shape != np.shape(want[path]):
            raise CheckpointError(f"state_dict key {raw_key!r}: shape {array.shape} after conversion, the "
                                  f"model expects {np.shape(want[path])} at {'/'.join(path)}")
        got[path] = array
    missing = sorted("/".join(p) for p in set(want) - set(got))
    if missing:
        raise CheckpointError(f"state_dict lacks {len(missing)} model parameters, e.g. {missing[:3]}")
    return traverse_util.unflatten_dict(got), ignored


def load_torch_state_dict(path) -> dict[str, np.ndarray]:
    """Read a ``.pth`` file (needs PyTorch) into numpy arrays; accepts a bare or wrapped state_dict."""
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"reading {path} needs PyTorch: pip install -r requirements-torch.txt") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no PyTorch checkpoint at {path}") from None
    except Exception as e:  # torch raises many types for damaged files
        raise CheckpointError(f"PyTorch checkpoint {path} is corrupt or unreadable: {type(e).__name__}: {e}") from e
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state_dict (got {type(obj).__name__})")
    return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}
