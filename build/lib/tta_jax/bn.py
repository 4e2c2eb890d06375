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

from typing import NamedTuple

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


def channel_axes(x) -> tuple[int, ...]:
    """The axes a channels-last BatchNorm reduces over (every axis but the last)."""
    return tuple(range(x.ndim - 1))


class BNLayer(NamedTuple):
    """What a statistics rule sees of one BatchNorm layer."""

    path: tuple[str, ...]      # module path, as in ``batch_stats``
    source_mean: jax.Array     # the stored running statistics
    source_var: jax.Array
    epsilon: float


def batch_statistics(layer: BNLayer, x):
    """The batch's own per-channel mean and (biased) variance of a channels-last ``x``."""
    del layer
    axes = channel_axes(x)
    return x.mean(axes), x.var(axes)


def forward_with_statistics(model, params, batch_stats, images, statistics, *, rngs=None, **options):
    """Forward normalising every BatchNorm layer with statistics chosen by ``statistics``.

    ``statistics(layer, x) -> (mean, var)`` is called once per BN layer with a
    :class:`BNLayer` (its module path, stored running statistics and ε) and its
    input ``x`` (channels last); the layer then computes
    ``scale · (x − mean) / √(var + ε) + bias`` with its own scale and bias. This
    is how a method refines the normalisation (DUA's running statistics, MedBN's
    median, DIGA's and DomainAdaptor's source/test mixtures) on any Flax segmentor
    whose BN layers are ``flax.linen.BatchNorm`` over the last axis: the layers are
    intercepted, never named. The network runs in its ``train=False`` mode, so
    nothing else (dropout) changes.

    Returns ``(logits, used)``: ``used`` mirrors ``batch_stats`` and holds the
    ``mean``/``var`` each layer normalised with.
    """
    import flax.linen as nn
    from jax import lax

    used = {}

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, nn.BatchNorm) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if module.axis not in (-1, args[0].ndim - 1):
            raise ValueError(f"BatchNorm {'/'.join(module.path)}: forward_with_statistics needs channels-last "
                             f"normalisation (axis=-1), got axis={module.axis}")
        x = args[0]
        stats = module.variables["batch_stats"]
        mean, var = statistics(BNLayer(tuple(module.path), stats["mean"], stats["var"], module.epsilon), x)
        y = (x - mean) * lax.rsqrt(var + module.epsilon)
        if module.use_scale:
            y = y * module.variables["params"]["scale"]
        if module.use_bias:
            y = y + module.variables["params"]["bias"]
        used[tuple(module.path)] = {"mean": mean, "var": var}
        return y.astype(x.dtype)

    with nn.intercept_methods(intercept):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False, rngs=rngs,
                             **options)
    return logits, traverse_util.unflatten_dict(
        {path + (k,): v for path, d in used.items() for k, v in d.items()})
