"""``sar``: Sharpness-Aware and Reliable entropy minimisation (Niu et al., ICLR 2023).

Per test image (test-image BN statistics, BN affine parameters trained, the
last encoder stage's BN layers frozen as the official code freezes ``layer4``):

1. **Reliable pixels.** The entropy of each pixel's prediction (per sigmoid
   channel, Bernoulli) is kept when below ``margin = margin_factor · ln 2`` (the
   official 0.4 · ln C with C = 2 classes per channel); the loss is its mean
   over the reliable pixels (:func:`reliable_entropy`).
2. **Sharpness-aware step** (SAM, ρ = 0.05, not adaptive): the parameters move
   to ``θ + ε`` with ``ε = ρ g / (‖g‖ + 1e-12)`` (:func:`sam_perturbation`; one
   global norm over every adapted parameter), the reliable-entropy loss is taken
   again there over the pixels reliable at θ and at θ + ε, and its gradient
   updates θ with SGD (momentum 0.9).
3. **Model recovery.** ``ema ← 0.9 ema + 0.1 loss₂`` (the first loss starts it);
   when ``ema < reset_threshold`` the parameters and the optimiser return to
   the source model's and the EMA restarts. The official threshold, 0.2 nats
   for ImageNet's 1000 classes, is rescaled like the margin, by ln 2 / ln 1000
   (≈ 0.02): unscaled, every binary pixel that passes the margin (< 0.28 nats)
   would push the EMA under 0.2 and reset the model after every image.

Choices documented: the official per-sample filter becomes a per-pixel one
(one image per batch); with no reliable pixel the loss is 0, nothing moves and
the EMA keeps its value (the official code averages an empty tensor, a NaN it
leaves out of the EMA); adapt-then-predict as this
project's other fine-tuning methods (the official code predicts from the
forward before the update); the learning rate is not stated by the GraTa
paper: 1e-3 (the official ImageNet batch-1 rate is 1.5625e-5 for SGD on 2048
classes), override with ``--config.sar.lr``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from tta_jax.bn import forward_test_stats, merge_params, split_bn_params
from tta_jax.hparams import bounded
from tta_jax.methods.base import Method, check_step_input, keep_if_finite, register

SAM_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class SARHParams:
    lr: float = bounded(1e-3, low=0.0)
    momentum: float = bounded(0.9, low=0.0, high=1.0, high_open=True)
    rho: float = bounded(0.05, low=0.0)
    margin_factor: float = bounded(0.4, low=0.0, low_open=True)   # reliable: entropy < factor · ln 2
    reset_threshold: float = bounded(0.2 * math.log(2) / math.log(1000), low=0.0)
    ema_decay: float = bounded(0.9, low=0.0, high=1.0)
    frozen_stage: str = "layer4"    # BN layers under top-level modules with this prefix stay fixed ("": none)


class SARState(NamedTuple):
    bn_params: Any          # adapted BN affine parameters
    fixed_params: Any       # everything else, including the frozen stage's BN
    batch_stats: Any
    source_bn: Any          # for model recovery
    opt_state: Any
    ema: jax.Array          # moving average of the second loss; NaN until the first one


def pixel_entropy(logits):
    """Bernoulli entropy of every pixel and sigmoid channel, ``[..., C]``."""
    p = jax.nn.sigmoid(logits)
    return -(p * jax.nn.log_sigmoid(logits) + (1 - p) * jax.nn.log_sigmoid(-logits))


def reliable_entropy(entropy, reliable):
    """Mean entropy over the ``reliable`` entries; 0 when there is none."""
    count = jnp.sum(reliable)
    return jnp.sum(jnp.where(reliable, entropy, 0.0)) / jnp.maximum(count, 1)


def sam_perturbation(grads, rho: float):
    """SAM's ascent step ``ε = ρ g / (‖g‖ + 1e-12)`` with one L2 norm over the whole gradient pytree."""
    norm = optax.global_norm(grads)
    return jax.tree.map(lambda g: rho * g / (norm + SAM_EPS), grads)


def _split_frozen_stage(bn_params, prefix: str):
    flat = traverse_util.flatten_dict(bn_params)
    frozen = {k: v for k, v in flat.items() if prefix and k[0].startswith(prefix)}
    trained = {k: v for k, v in flat.items() if k not in frozen}
    return traverse_util.unflatten_dict(trained), traverse_util.unflatten_dict(frozen) if frozen else {}


@register("sar", SARHParams)
def make(model, hp: SARHParams) -> Method:
    optimizer = optax.sgd(hp.lr, momentum=hp.momentum)
    margin = hp.margin_factor * jnp.log(2.0)

    def entropy_at(bn, state, images):
        logits = forward_test_stats(model, merge_params(bn, state.fixed_params), state.batch_stats, images)
        return pixel_entropy(logits)

    def init(variables, rng):
        del rng
        bn, rest = split_bn_params(variables["params"], variables["batch_stats"])
        trained, frozen_bn = _split_frozen_stage(bn, hp.frozen_stage)
        return SARState(trained, merge_params(rest, frozen_bn), variables["batch_stats"], trained,
                        optimizer.init(trained), jnp.asarray(jnp.nan))

    def step(state, images, rng):
        del rng
        check_step_input(images)

        def first_loss(bn):
            ent = entropy_at(bn, state, images)
            reliable = jax.lax.stop_gradient(ent < margin)
            return reliable_entropy(ent, reliable), reliable

        (loss1, reliable), g1 = jax.value_and_grad(first_loss, has_aux=True)(state.bn_params)
        perturbed = jax.tree.map(jnp.add, state.bn_params, sam_perturbation(g1, hp.rho))

        def second_loss(bn):
            ent = entropy_at(bn, state, images)
            kept = reliable & jax.lax.stop_gradient(ent < margin)
            return reliable_entropy(ent, kept), jnp.any(kept)

        (loss2, any_kept), g2 = jax.value_and_grad(second_loss, has_aux=True)(perturbed)
        updates, opt_state = optimizer.update(g2, state.opt_state, state.bn_params)
        # an image without reliable pixels has no loss (the official mean is NaN): the EMA does not move
        moved = jnp.where(jnp.isnan(state.ema), loss2, hp.ema_decay * state.ema + (1 - hp.ema_decay) * loss2)
        ema = jnp.where(any_kept, moved, state.ema)
        new = state._replace(bn_params=optax.apply_updates(state.bn_params, updates), opt_state=opt_state, ema=ema)
        new, ok = keep_if_finite(new, state, loss1, loss2)
        logits = forward_test_stats(model, merge_params(new.bn_params, state.fixed_params), state.batch_stats,
                                    images)
        reset = new.ema < hp.reset_threshold
        # only the adapted leaves are recovered: the shared ones stay one copy for every stream
        pick = lambda r, n: jax.tree.map(lambda a, b: jnp.where(reset, a, b), r, n)
        new = new._replace(bn_params=pick(state.source_bn, new.bn_params),
                           opt_state=pick(optimizer.init(state.source_bn), new.opt_state),
                           ema=jnp.where(reset, jnp.nan, new.ema))
        return new, logits, {"loss": loss1, "loss_perturbed": loss2, "ema": ema, "reset": reset.astype(jnp.float32),
                             "reliable_fraction": jnp.mean(reliable), "skipped": 1.0 - ok.astype(jnp.float32)}

    return Method("sar", init, step, stream_axes=SARState(bn_params=0, fixed_params=None, batch_stats=None,
                                                          source_bn=None, opt_state=0, ema=0))
