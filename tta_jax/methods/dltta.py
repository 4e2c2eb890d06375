"""``dltta``: dynamic learning rate for test-time adaptation (Yang et al., IEEE TMI 2022).

TENT's entropy minimisation of the BN affine parameters (test-image BN
statistics, Adam), one step per image, with a per-image learning rate: how far
the current prediction lies from what the model predicted for similar earlier
images. The GraTa paper runs DLTTA with TENT's entropy loss, as here.

Memory bank: ring buffer of the last ``memory_size`` images' keys (the
segmentation head's input features, averaged over space) and values (their
probabilities before adaptation, resized to ``value_size²``). For the current
image (:func:`dynamic_learning_rate`):

1. the ``neighbours`` most cosine-similar stored keys, with attention weights
   ``a = softmax(cos / similarity_temperature)``;
2. their probabilities mixed, ``q = Σ a_j q_j``; the current prediction at
   temperature ``prediction_temperature``, ``p = σ(z / T)``, resized likewise;
3. discrepancy ``d`` = symmetric KL, ``KL(p‖q) + KL(q‖p)``, of each pixel's
   Bernoulli distributions, averaged over pixels and channels;
4. ``lr = base_lr · exp(d)`` (the official segmentation variant); while the
   memory holds no more than ``neighbours`` entries, ``lr = base_lr`` (the
   official classification variant's warm-up; the segmentation one scales it
   with the memory size, which gives the first image no update at all).

Then the image (key, pre-update probabilities) enters the memory and the image is
predicted after the update. Documented deviations: the official segmentation
code uses only the first retrieved neighbour (a typo); here all ``neighbours``
are weighted as described. Keys are pooled head features because the method
must work on any segmentor following the model protocol (the official code
flattens a ResUNet bottleneck), and values are compared on a fixed grid so
that the state's shape does not depend on the image size. Official defaults: memory 20, 8 neighbours,
similarity temperature 0.2, prediction temperature 4, base lr 1e-3 with Adam.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tta_jax.bn import forward_test_stats, merge_params, split_bn_params
from tta_jax.hparams import HParamError, bounded
from tta_jax.losses import binary_entropy
from tta_jax.methods.base import Method, check_step_input, keep_if_finite, register
from tta_jax.methods.common import memory_neighbours

PROB_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class DLTTAHParams:
    lr: float = bounded(1e-3, low=0.0)                               # base learning rate (Adam)
    b1: float = bounded(0.9, low=0.0, high=1.0, high_open=True)
    b2: float = bounded(0.999, low=0.0, high=1.0, high_open=True)
    memory_size: int = bounded(20, low=1)
    neighbours: int = bounded(8, low=1)
    similarity_temperature: float = bounded(0.2, low=0.0, low_open=True)
    prediction_temperature: float = bounded(4.0, low=0.0, low_open=True)
    value_size: int = bounded(64, low=1)      # side of the grid the stored predictions are compared on

    def __post_init__(self):
        if self.neighbours > self.memory_size:
            raise HParamError(f"dltta: neighbours={self.neighbours} exceeds memory_size={self.memory_size}")


class DLTTAState(NamedTuple):
    bn_params: Any
    frozen_params: Any
    batch_stats: Any
    opt_state: Any
    keys: jax.Array      # [M, F]
    values: jax.Array    # [M, S, S, C] probabilities before adaptation, on the value grid
    count: jax.Array     # images stored so far (the ring buffer holds min(count, M))


def _bernoulli_kl(p, q):
    return p * (jnp.log(p) - jnp.log(q)) + (1 - p) * (jnp.log1p(-p) - jnp.log1p(-q))


def to_value_grid(prob, size: int):
    """``[H, W, C]`` probabilities resized (linear, antialiased) to ``[size, size, C]``."""
    return jax.image.resize(prob, (size, size, prob.shape[-1]), "linear")


def dynamic_learning_rate(keys, values, count, key, logits, hp: DLTTAHParams):
    """(learning rate, discrepancy d) of the current image (``logits`` ``[H, W, C]``, pooled feature ``key``)
    from the memory bank (module docstring)."""
    weights, top_idx = memory_neighbours(keys, count, key, hp.neighbours, hp.similarity_temperature)
    past = jnp.clip(jnp.einsum("k,khwc->hwc", weights, values[top_idx]), PROB_EPS, 1 - PROB_EPS)
    now = to_value_grid(jax.nn.sigmoid(logits / hp.prediction_temperature), hp.value_size)
    now = jnp.clip(now, PROB_EPS, 1 - PROB_EPS)
    d = jnp.mean(_bernoulli_kl(now, past) + _bernoulli_kl(past, now))
    d = jnp.where(count > hp.neighbours, d, 0.0)   # warm-up: the base rate
    return hp.lr * jnp.exp(d), d


@register("dltta", DLTTAHParams)
def make(model, hp: DLTTAHParams) -> Method:
    adam = optax.scale_by_adam(b1=hp.b1, b2=hp.b2)

    def forward(bn_params, state, images, **options):
        return forward_test_stats(model, merge_params(bn_params, state.frozen_params), state.batch_stats, images,
                                  **options)

    def init(variables, rng):
        del rng
        bn, frozen = split_bn_params(variables["params"], variables["batch_stats"])
        logits, feats = jax.eval_shape(
            lambda v: model.apply(v, jnp.zeros((1, 32, 32, 3)), train=False, return_features=True), variables)
        return DLTTAState(bn, frozen, variables["batch_stats"], adam.init(bn),
                          jnp.zeros((hp.memory_size, feats.shape[-1])),
                          jnp.zeros((hp.memory_size, hp.value_size, hp.value_size, logits.shape[-1])),
                          jnp.zeros((), jnp.int32))

    def step(state, images, rng):
        del rng
        check_step_input(images)
        def entropy(bn):   # one forward gives the loss and the memory's key and value
            logits, feats = forward(bn, state, images, return_features=True)
            return binary_entropy(logits), (jax.lax.stop_gradient(logits), jax.lax.stop_gradient(feats))

        (loss, (logits, feats)), grads = jax.value_and_grad(entropy, has_aux=True)(state.bn_params)
        key = jnp.mean(feats, axis=(0, 1, 2))
        lr, discrepancy = dynamic_learning_rate(state.keys, state.values, state.count, key, logits[0], hp)
        scaled, opt_state = adam.update(grads, state.opt_state)
        bn_params = jax.tree.map(lambda p, u: p - lr * u, state.bn_params, scaled)
        slot = state.count % hp.memory_size
        new = state._replace(bn_params=bn_params, opt_state=opt_state,
                             keys=state.keys.at[slot].set(key),
                             values=state.values.at[slot].set(to_value_grid(jax.nn.sigmoid(logits[0]),
                                                                            hp.value_size)),
                             count=state.count + 1)
        new, ok = keep_if_finite(new, state, loss)
        out = forward(new.bn_params, new, images)
        return new, out, {"loss": loss, "lr": lr, "discrepancy": discrepancy,
                          "skipped": 1.0 - ok.astype(jnp.float32)}

    return Method("dltta", init, step, stream_axes=DLTTAState(bn_params=0, frozen_params=None, batch_stats=None,
                                                             opt_state=0, keys=0, values=0, count=0))
