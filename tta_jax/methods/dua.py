"""``dua``: Dynamic Unsupervised Adaptation (Mirza et al., "The Norm Must Go On", CVPR 2022).

Backward-free: only the BN running statistics move. For the k-th test image
(k = 1, 2, ...) of a stream:

1. the momentum decays, ``m_k = m_0 · d^k + m_min`` (official defaults m_0 0.1,
   d 0.94, m_min 0.005: the floor is added, not a clip);
2. ``copies`` augmented views of the image (:func:`crop_flip_rotate_views`)
   are forwarded once with every BN layer normalising by the views' batch
   statistics (PyTorch train mode), and each layer's running statistics move
   towards them: ``μ ← (1 − m_k) μ + m_k μ_B``, ``σ² ← (1 − m_k) σ² + m_k σ²_B · n/(n − 1)``
   (the unbiased batch variance, as PyTorch's running update uses; n = views × H × W
   at that layer);
3. the image is predicted with the updated running statistics (eval mode).

Update-then-predict, as the official code. Choices the paper leaves to the
user, documented: the crop padding is 1/8 of the side (CIFAR's 4 px of 32);
the statistics persist along the stream and reset with the method state (per
target under ``per_target``). The official CIFAR script reports the best
error over its 80-sample trajectory, a selection with labels that is not
reproduced here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from tta_jax.augment import crop_flip_rotate_views
from tta_jax.bn import batch_statistics, forward_source_stats, forward_with_statistics
from tta_jax.hparams import bounded
from tta_jax.methods.base import Method, check_step_input, keep_if_finite, register


@dataclasses.dataclass(frozen=True)
class DUAHParams:
    """Augmented views per image and the momentum schedule m_k = initial · decay^k + minimum."""

    copies: int = bounded(64, low=2)
    initial_momentum: float = bounded(0.1, low=0.0, high=1.0)
    decay: float = bounded(0.94, low=0.0, high=1.0)
    min_momentum: float = bounded(0.005, low=0.0, high=1.0)
    crop_padding: float = bounded(0.125, low=0.0, high=1.0)   # fraction of the image side


class DUAState(NamedTuple):
    params: Any
    batch_stats: Any       # the running statistics DUA adapts
    momentum: jax.Array    # m_0 · d^k of the last image (before the floor)


def updated_running_statistics(batch_stats, views_stats, counts, momentum):
    """Each layer's running (mean, var) moved towards its batch statistics with ``momentum``;
    the batch variance made unbiased with that layer's count n (PyTorch's running update)."""
    running, batch = traverse_util.flatten_dict(batch_stats), traverse_util.flatten_dict(views_stats)
    out = {}
    for key, value in running.items():
        if key not in batch:     # a BN layer the forward does not reach (an auxiliary branch) keeps its own
            out[key] = value
            continue
        *path, stat = key
        new = batch[key]
        if stat == "var":
            n = counts[tuple(path)]
            new = new * n / max(n - 1, 1)
        out[key] = (1 - momentum) * value + momentum * new
    return traverse_util.unflatten_dict(out)


@register("dua", DUAHParams)
def make(model, hp: DUAHParams) -> Method:
    counts = {}   # per BN layer: values each statistic is taken over (static shapes, filled at trace)

    def views_statistics(layer, x):
        counts[layer.path] = math.prod(x.shape[:-1])
        return batch_statistics(layer, x)

    def init(variables, rng):
        del rng
        return DUAState(variables["params"], variables["batch_stats"], jnp.asarray(hp.initial_momentum))

    def step(state, images, rng):
        check_step_input(images)
        decayed = state.momentum * hp.decay
        momentum = decayed + hp.min_momentum
        padding = int(round(hp.crop_padding * images.shape[1]))
        views = jnp.concatenate([crop_flip_rotate_views(k, x, hp.copies, padding)
                                 for k, x in zip(jax.random.split(rng, images.shape[0]), images)])
        _, views_stats = forward_with_statistics(model, state.params, state.batch_stats, views, views_statistics)
        running = updated_running_statistics(state.batch_stats, views_stats, counts, momentum)
        new_state, ok = keep_if_finite(state._replace(batch_stats=running, momentum=decayed), state)
        logits = forward_source_stats(model, new_state.params, new_state.batch_stats, images)
        return new_state, logits, {"momentum": momentum, "skipped": 1.0 - ok.astype(jnp.float32)}

    return Method("dua", init, step, stream_axes=DUAState(params=None, batch_stats=0, momentum=0))
