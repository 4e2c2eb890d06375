"""The method protocol, the registry, and the state guard shared by all methods.

A test-time method is a pair of pure functions (DESIGN.md §1)::

    state = method.init(variables, rng)
    state, logits, info = method.step(state, images, rng)   # adapt, then predict

``images`` is a ``[1, H, W, 3]`` batch (one test image); ``info`` is a dict
of scalars (losses, learning rates, ...) recorded per image by the runner.
The factory that builds a :class:`Method` closes over the (static) network
and hyperparameters, so both functions jit cleanly and hold no hidden state.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class Method(NamedTuple):
    """``init``/``step`` as above; ``analysis`` (optional) computes label-based diagnostics.

    ``analysis(state, images, masks, rng) -> dict`` sees the state the step
    adapts from and the ground truth; the runner calls it only when asked
    (``analysis=True``), records its scalars next to ``info`` and never feeds
    them back: labels cannot reach the adaptation.
    """

    name: str
    init: Callable[[Any, jax.Array], Any]
    step: Callable[[Any, jax.Array, jax.Array], tuple[Any, jax.Array, dict]]
    analysis: Callable[..., dict] | None = None
    # How a batch of independent streams (seeds) holds the state: a prefix of the state's
    # pytree with 0 (one copy per stream, leading axis) or None (one copy shared by all
    # streams: parts that ``init`` makes the same for every seed and ``step`` never changes,
    # e.g. frozen weights). Shared weights keep K vmapped streams' convolutions ordinary
    # batched convolutions instead of grouped ones, and K× less memory.
    stream_axes: Any = 0


def shared_leaves(stream_axes, state) -> list[bool]:
    """Per leaf of ``state`` (flattened order): is it shared by all streams (axis None)?"""
    marks = jax.tree.map(lambda axis, sub: jax.tree.map(lambda _: axis is None, sub),
                         stream_axes, state, is_leaf=lambda x: x is None)
    return jax.tree.leaves(marks)


_REGISTRY: dict[str, Callable[..., Method]] = {}


def register(name: str):
    """Register a factory ``factory(model, hparams) -> Method`` under ``name``."""
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def make_method(name: str, model, hparams=None) -> Method:
    """Build the registered method ``name`` for ``model`` with ``hparams`` (a mapping)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {available_methods()}")
    return _REGISTRY[name](model, dict(hparams or {}))


def supervised_bn_gradient(model, state, images, masks):
    """The 'empirical' gradient (GraTa Fig. 4): ∇ BCE(f_θ(x), y) w.r.t. the BN affine parameters.

    ``state`` has ``bn_params``/``frozen_params``/``batch_stats``; test-image BN statistics.
    """
    from tta_jax.bn import forward_test_stats, merge_params
    from tta_jax.losses import bce_with_logits

    def loss(bn_params):
        logits = forward_test_stats(model, merge_params(bn_params, state.frozen_params), state.batch_stats, images)
        return bce_with_logits(logits, masks.astype(logits.dtype))

    return jax.grad(loss)(state.bn_params)


def check_step_input(images: jax.Array) -> None:
    """Shape/dtype check at trace time (shapes are static under jit)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"a method step takes images of shape [B, H, W, 3], got {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"a method step takes floating-point images, got {images.dtype}")


# Leaves smaller than this are checked together, as one concatenated vector: a hundred tiny
# per-leaf reductions cost XLA:CPU more in dispatch than in arithmetic.
_SMALL_LEAF = 1 << 16


def all_finite(tree) -> jax.Array:
    """True iff every floating leaf of ``tree`` is finite (a traced boolean scalar)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    small = [jnp.ravel(x) for x in leaves if jnp.size(x) < _SMALL_LEAF]
    checks = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.size(x) >= _SMALL_LEAF]
    if small:
        checks.append(jnp.all(jnp.isfinite(jnp.concatenate(small))))
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def keep_if_finite(new_state, old_state, *extra):
    """Return ``(new_state, True)`` if it and ``extra`` are finite, else ``(old_state, False)``.

    An adaptation step that diverges (NaN/inf loss, gradient or parameter)
    must not poison the stream: the state falls back to the previous one and
    the runner records the skip.
    """
    new_leaves, treedef = jax.tree.flatten(new_state)
    old_leaves = jax.tree.leaves(old_state)
    if len(old_leaves) != len(new_leaves):
        raise ValueError("keep_if_finite: the new and old states differ in structure")
    # Only leaves the step changed are checked and guarded: a leaf passed through (frozen
    # weights) is the very value that entered, checked when it was made, and under vmap
    # over streams it stays unbatched.
    changed = [i for i, (a, b) in enumerate(zip(new_leaves, old_leaves)) if a is not b]
    ok = jnp.logical_and(all_finite([new_leaves[i] for i in changed]), all_finite(extra))
    # lax.cond, not a per-leaf jnp.where: XLA:CPU fuses the select (and the
    # all-finite reduction) into every consumer of the parameters, which made
    # a TENT step compile 5x slower (20 s vs 4-6 s measured).
    guarded = jax.lax.cond(ok, lambda: [new_leaves[i] for i in changed], lambda: [old_leaves[i] for i in changed])
    for i, leaf in zip(changed, guarded):
        new_leaves[i] = leaf
    return jax.tree.unflatten(treedef, new_leaves), ok
