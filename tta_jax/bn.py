"""BatchNorm handling shared by every method.

A BatchNorm layer is recognised by owning running statistics: a parameter
belongs to a BN layer iff its module path also appears in ``batch_stats``.
This avoids relying on module names.

Two forward modes matter at test time:

* :func:`forward_source_stats` — normalise with the stored (source) running
  statistics (``no_adapt``);
* :func:`forward_test_stats` — normalise with the statistics of the batch
  being forwarded (batch size 1 → the image's own statistics), and drop the
  would-be running-statistic update so the source statistics never move.
"""
from __future__ import annotations

from flax import traverse_util


def _bn_modules(batch_stats) -> set[tuple[str, ...]]:
    flat = traverse_util.flatten_dict(batch_stats)
    return {path[:-1] for path in flat}


def split_bn_params(params, batch_stats):
    """Split ``params`` into (BN affine parameters, everything else), both nested dicts."""
    bn_modules = _bn_modules(batch_stats)
    flat = traverse_util.flatten_dict(params)
    bn = {k: v for k, v in flat.items() if k[:-1] in bn_modules}
    if not bn:
        raise ValueError("no BatchNorm parameters found: the model has no batch_stats")
    rest = {k: v for k, v in flat.items() if k[:-1] not in bn_modules}
    return traverse_util.unflatten_dict(bn), traverse_util.unflatten_dict(rest)


def merge_params(*trees):
    """Inverse of :func:`split_bn_params`: merge disjoint nested parameter dicts."""
    flat = {}
    for tree in trees:
        flat.update(traverse_util.flatten_dict(tree))
    return traverse_util.unflatten_dict(flat)


def forward_source_stats(model, params, batch_stats, images, **kwargs):
    """Forward with the stored running (source) BN statistics."""
    return model.apply({"params": params, "batch_stats": batch_stats}, images, train=False, **kwargs)


def forward_test_stats(model, params, batch_stats, images, **kwargs):
    """Forward normalising with the current batch's own statistics; source statistics untouched."""
    out, _ = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                         mutable=["batch_stats"], **kwargs)
    return out
