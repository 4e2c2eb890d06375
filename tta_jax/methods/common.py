"""Pieces shared by several methods: BN-adaptation state, frozen predictors, gradient diagnostics.

Methods import from here (and from :mod:`tta_jax.bn`, :mod:`tta_jax.losses`,
:mod:`tta_jax.augment`), never from each other.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from tta_jax.bn import forward_test_stats, merge_params, split_bn_params
from tta_jax.losses import bce_with_logits
from tta_jax.methods.base import Method, check_step_input, keep_if_finite

COSINE_EPS = 1e-12


class FrozenState(NamedTuple):
    params: Any
    batch_stats: Any


def init_frozen_state(variables, rng) -> FrozenState:
    """The state of a method whose weights and statistics never change along a stream."""
    del rng
    return FrozenState(variables["params"], variables["batch_stats"])


def make_frozen_method(name: str, model, forward) -> Method:
    """A method that trains nothing and predicts with ``forward(model, params, batch_stats, images)``."""

    def step(state, images, rng):
        del rng
        check_step_input(images)
        return state, forward(model, state.params, state.batch_stats, images), {}

    return Method(name, init_frozen_state, step, stream_axes=FrozenState(None, None))


class BNAdaptState(NamedTuple):
    """State of methods that train the BN affine parameters only."""

    bn_params: Any
    frozen_params: Any
    batch_stats: Any
    opt_state: Any


# streams share the frozen weights and the source statistics; each has its own BN affine + optimiser
BN_STREAM_AXES = BNAdaptState(bn_params=0, frozen_params=None, batch_stats=None, opt_state=0)


def init_bn_adapt_state(variables, optimizer) -> BNAdaptState:
    """Split the BN affine parameters (trained) from the rest (frozen); ``optimizer`` state for the former."""
    bn_params, frozen = split_bn_params(variables["params"], variables["batch_stats"])
    return BNAdaptState(bn_params, frozen, variables["batch_stats"], optimizer.init(bn_params))


def gradient_cosine(g_a, g_b):
    """Cosine between two gradient pytrees, all leaves flattened together: ⟨a, b⟩ / (‖a‖‖b‖ + 1e-12)."""
    # one flat vector each: three reductions instead of three per leaf (~100 BN leaves)
    a, b = ravel_pytree(g_a)[0], ravel_pytree(g_b)[0]
    return jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + COSINE_EPS)


def supervised_bn_gradient(model, state: BNAdaptState, images, masks):
    """The 'empirical' gradient (GraTa Fig. 4): ∇ BCE(f_θ(x), y) w.r.t. the BN affine parameters.

    Test-image BN statistics. A diagnostic only: the runner calls a method's
    ``analysis`` with the labels and never feeds its output back.
    """

    def loss(bn_params):
        logits = forward_test_stats(model, merge_params(bn_params, state.frozen_params), state.batch_stats, images)
        return bce_with_logits(logits, masks.astype(logits.dtype))

    return jax.grad(loss)(state.bn_params)


def memory_neighbours(keys, count, key, k: int, temperature: float):
    """Attention over a ring-buffer memory (DLTTA, VPTTA): the ``k`` stored keys most cosine-similar to
    ``key`` among the ``min(count, len(keys))`` written, and weights ``softmax(cos / temperature)``.
    Returns ``(weights [k], indices [k])``."""
    size = keys.shape[0]
    valid = jnp.arange(size) < jnp.minimum(count, size)
    unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    cos = jnp.where(valid, unit(keys) @ unit(key), -jnp.inf)
    top_cos, top_idx = jax.lax.top_k(cos, k)
    return jax.nn.softmax(top_cos / temperature), top_idx


def repeated_updates(loss_fn, optimizer, state, field: str, steps: int):
    """``steps`` guarded optimizer updates of ``getattr(state, field)`` on ``loss_fn(params, state)``.

    Each update is kept only if it and its loss are finite (:func:`keep_if_finite`);
    ``state`` carries the optimizer state as ``opt_state``. Returns the new
    state, the last loss and the number of skipped updates (float).
    """
    def one_update(_, carry):
        st, _, n_skipped = carry
        loss, grads = jax.value_and_grad(loss_fn)(getattr(st, field), st)
        updates, opt_state = optimizer.update(grads, st.opt_state, getattr(st, field))
        new = st._replace(**{field: optax.apply_updates(getattr(st, field), updates)}, opt_state=opt_state)
        new, ok = keep_if_finite(new, st, loss)
        return new, loss, n_skipped + (1 - ok.astype(jnp.float32))

    return jax.lax.fori_loop(0, steps, one_update, (state, jnp.zeros(()), jnp.zeros(())))
