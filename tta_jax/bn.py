"""BatchNorm handling shared by every method.

Works for any Flax segmentor that follows the model protocol (README,
"Python API"): ``model.apply(variables, images, train=...)`` returns logits,
and its BatchNorm layers keep their running statistics in ``batch_stats`` and
use them when ``train=False``.

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

import jax
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


def _forward_source(model, params, batch_stats, images, rngs, options):
    return model.apply({"params": params, "batch_stats": batch_stats}, images, train=False, rngs=rngs,
                       **dict(options))


def _forward_test(model, params, batch_stats, images, rngs, options):
    out, _ = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                         mutable=["batch_stats"], rngs=rngs, **dict(options))
    return out


# One nested jitted function per mode, the network and its keyword options static: methods
# forward the same network several times per step (GraTa: at θ, at θ' on six views, at the
# updated θ), and a jitted forward is traced through Flax once and then reused from JAX's
# cache by vmap and by each gradient. XLA inlines the call, so the compiled step is the same.
_jit_source = jax.jit(_forward_source, static_argnums=(0, 5))
_jit_test = jax.jit(_forward_test, static_argnums=(0, 5))


def forward_source_stats(model, params, batch_stats, images, *, rngs=None, **options):
    """Forward with the stored running (source) BN statistics.

    ``options`` are the network's own keyword arguments (hashable: they select
    what it computes); ``rngs`` its RNG streams (e.g. ``{"dropout": key}``).
    """
    return _jit_source(model, params, batch_stats, images, rngs, tuple(sorted(options.items())))


def forward_test_stats(model, params, batch_stats, images, *, rngs=None, **options):
    """Forward normalising with the current batch's own statistics; source statistics untouched."""
    return _jit_test(model, params, batch_stats, images, rngs, tuple(sorted(options.items())))
