"""Source-model training (supervised, on the source domain only).

Objective: soft Dice + BCE (the official GraTa/VPTTA source stage).
Optimiser: ``adam`` (default for quick CPU runs) or ``sgd`` — SGD with
Nesterov momentum 0.99, weight decay 5e-4 and the poly schedule
(1 − step/steps)^0.9, as in the official code (use it in ``paper`` configs).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from tta_jax.augment import source_augment
from tta_jax.hparams import bounded
from tta_jax.auxiliary import auxiliary_objective
from tta_jax.losses import dice_bce_loss
from tta_jax.metrics import dice_per_channel


@dataclasses.dataclass(frozen=True)
class SourceTraining:
    """The source stage's settings (config ``source.*``).

    Attributes:
      steps, batch_size, lr, optimizer: the optimisation (``adam`` with cosine
        decay, or the official ``sgd``: Nesterov 0.99, weight decay 5e-4, poly).
      photometric: strength of the photometric jitter of :func:`tta_jax.augment.source_augment`.
      seed: initialisation and batch sampling.
      denoise_std: noise of the denoising auxiliary head, when trained.
      adversarial: train with the mask discriminator (also switched on when a method needs it).
    """

    steps: int = bounded(800, low=1)
    batch_size: int = bounded(8, low=1)
    lr: float = bounded(1e-3, low=0.0, low_open=True)
    optimizer: Literal["adam", "sgd"] = "adam"
    photometric: float = bounded(0.2, low=0.0)
    seed: int = 0
    denoise_std: float = bounded(1.0, low=0.0)
    adversarial: bool = False


class TrainState(NamedTuple):
    params: dict
    batch_stats: dict
    opt_state: optax.OptState


def make_optimizer(name: str, lr: float, steps: int) -> optax.GradientTransformation:
    if name == "adam":
        return optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))
    if name == "sgd":
        poly = optax.polynomial_schedule(lr, 0.0, power=0.9, transition_steps=steps)
        return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(poly, momentum=0.99, nesterov=True))
    raise ValueError(f"unknown source optimizer {name!r}; choose adam or sgd")


def train_source(model, variables, images: np.ndarray, masks: np.ndarray, rng: jax.Array, *,
                 steps: int = 1000, batch_size: int = 8, lr: float = 1e-3, optimizer: str = "adam",
                 photometric: float = 0.2, log_every: int = 100, denoise_std: float = 1.0):
    """Train ``model`` from ``variables`` on (images, masks); returns (variables, loss history).

    If the model has auxiliary branches (``model.aux_heads``), their
    self-supervised losses (:mod:`tta_jax.auxiliary`) are added with weight 1,
    so that GraTa's Table 5 objectives have trained branches to use.
    """
    if len(images) == 0:
        raise ValueError("source training set is empty")
    tx = make_optimizer(optimizer, lr, steps)
    state = TrainState(variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    images_d, masks_d = jnp.asarray(images), jnp.asarray(masks, jnp.float32)

    @jax.jit
    def train_step(state, key):
        k_idx, k_aug = jax.random.split(key)
        idx = jax.random.randint(k_idx, (batch_size,), 0, images_d.shape[0])
        x, y = jax.vmap(lambda k, a, b: source_augment(k, a, b, photometric))(
            jax.random.split(k_aug, batch_size), images_d[idx], masks_d[idx])

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            logits, new_vars = model.apply(variables, x, train=True, mutable=["batch_stats"])
            loss = dice_bce_loss(logits, y)
            for i, name in enumerate(model.aux_heads):
                forward = lambda inp, **options: model.apply(variables, inp, train=True, return_aux=True,
                                                             mutable=["batch_stats"], **options)[0]
                loss = loss + auxiliary_objective(name, forward, jax.random.fold_in(k_aug, 1000 + i), x,
                                                  model.sr_factor, denoise_std)
            return loss, new_vars["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), batch_stats, opt_state), loss

    history, start = [], time.perf_counter()
    for i in range(steps):
        state, loss = train_step(state, jax.random.fold_in(rng, i))
        if (i + 1) % log_every == 0 or i + 1 == steps:
            loss = float(loss)
            if not np.isfinite(loss):
                raise FloatingPointError(f"source training diverged at step {i + 1} (loss {loss})")
            history.append((i + 1, loss))
            rate = (i + 1) / (time.perf_counter() - start)
            logging.info("source training: step %d/%d loss %.4f (%.1f steps/s, ETA %.0f s)",
                         i + 1, steps, loss, rate, (steps - i - 1) / rate)
    return {"params": state.params, "batch_stats": state.batch_stats}, history


@functools.partial(jax.jit, static_argnums=0)
def _source_stats_dice(model, variables, images, masks):
    return dice_per_channel(model.apply(variables, images, train=False), masks)


def evaluate_source_stats(model, variables, images: np.ndarray, masks: np.ndarray, batch_size: int = 32):
    """Per-image Dice [N, C] of the model with its running (source) BN statistics.

    One jitted function for every call (the network static), so evaluating several
    domains or runs in a process compiles once per batch shape.
    """
    out = [np.asarray(_source_stats_dice(model, variables, images[i:i + batch_size], masks[i:i + batch_size]))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)
