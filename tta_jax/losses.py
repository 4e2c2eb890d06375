"""Losses shared by source training and the test-time methods.

All take logits of sigmoid channels (``[..., C]``); means are over every
element unless stated otherwise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

ENTROPY_EPS = 1e-6


def sigmoid_entropy_plogp(logits: jax.Array) -> jax.Array:
    """GraTa's L_ent (paper Eq. 1, official code): mean over pixels of Σ_c −p log(p + 1e-6).

    ``p = sigmoid(logits)``; only the ``p log p`` term, as in the official
    implementation (DESIGN.md §2), summed over channels, averaged over the
    batch and pixels.
    """
    p = jax.nn.sigmoid(logits)
    return jnp.mean(jnp.sum(-p * jnp.log(p + ENTROPY_EPS), axis=-1))


def binary_entropy(logits: jax.Array) -> jax.Array:
    """Full Bernoulli entropy per sigmoid channel, summed over channels, mean over pixels.

    TENT's objective for multi-label sigmoid outputs: −p log p − (1−p) log(1−p),
    computed stably from logits.
    """
    p = jax.nn.sigmoid(logits)
    ent = -(p * jax.nn.log_sigmoid(logits) + (1 - p) * jax.nn.log_sigmoid(-logits))
    return jnp.mean(jnp.sum(ent, axis=-1))


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean binary cross-entropy with logits (PyTorch ``BCEWithLogitsLoss``)."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets))


def soft_dice_loss(logits: jax.Array, targets: jax.Array, smooth: float = 1.0) -> jax.Array:
    """1 − soft Dice per sample and channel, averaged (source training)."""
    p = jax.nn.sigmoid(logits)
    axes = tuple(range(1, logits.ndim - 1))
    inter = jnp.sum(p * targets, axes)
    denom = jnp.sum(p, axes) + jnp.sum(targets, axes)
    return jnp.mean(1 - (2 * inter + smooth) / (denom + smooth))


def dice_bce_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Source-training objective of the official code: soft Dice + BCE."""
    return soft_dice_loss(logits, targets) + bce_with_logits(logits, targets)


def bernoulli_kl(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    """KL(p ‖ q) between per-channel Bernoulli distributions given by logits, summed over channels.

    ``p = sigmoid(logits_p)``, ``q = sigmoid(logits_q)``; computed from
    log-sigmoids, so saturated logits stay finite. Broadcasts over leading axes.
    """
    p = jax.nn.sigmoid(logits_p)
    log_p, log_1mp = jax.nn.log_sigmoid(logits_p), jax.nn.log_sigmoid(-logits_p)
    log_q, log_1mq = jax.nn.log_sigmoid(logits_q), jax.nn.log_sigmoid(-logits_q)
    return jnp.sum(p * (log_p - log_q) + (1 - p) * (log_1mp - log_1mq), axis=-1)


def lsgan_discriminator_loss(real_scores, fake_scores, anchor_scores=None):
    """½E[(Δ(y) − 1)²] + ½E[(Δ(ỹ) + 1)²] + ½E[(Δ(y_corr) + 1)²] (Eq. 2 with the fake anchors; without
    them when ``anchor_scores`` is None)."""
    loss = jnp.mean((real_scores - 1) ** 2) + jnp.mean((fake_scores + 1) ** 2)
    if anchor_scores is not None:
        loss = loss + jnp.mean((anchor_scores + 1) ** 2)
    return 0.5 * loss


def lsgan_generator_loss(scores, target: float = 0.0):
    """½E[(Δ(Σ(x)) − c)²]: c = 0 in Eq. 2 (training); test-time training uses c = 1 (DESIGN.md §4)."""
    return 0.5 * jnp.mean((scores - target) ** 2)


def label_dice_loss(probabilities: jax.Array, labels: jax.Array, eps: float = 1e-10) -> jax.Array:
    """Karani et al.'s Dice loss: 1 − the mean over images and labels of 2Σpy / (Σp + Σy + ε).

    Takes probabilities, not logits. The official (softmax) loss averages over
    every label including the background; here each sigmoid channel is two
    labels, foreground ``p`` and background ``1 − p``. ``ε`` = 1e-10 as in the
    official ``compute_dice``.
    """
    p = jnp.concatenate([probabilities, 1 - probabilities], axis=-1)
    y = jnp.concatenate([labels, 1 - labels], axis=-1)
    axes = tuple(range(1, p.ndim - 1))
    dice = 2 * jnp.sum(p * y, axes) / (jnp.sum(p, axes) + jnp.sum(y, axes) + eps)
    return 1 - jnp.mean(dice)
