"""``diga``: Dynamically Instance-Guided Adaptation (Wang et al., CVPR 2023), backward-free.

Two parts, both without gradients:

* **Distribution adaptation.** Every BN layer normalises with a fixed mixture of
  the source running statistics and the current image's own:
  ``μ = λ μ_s + (1 − λ) μ_t``, ``σ² = λ σ²_s + (1 − λ) σ²_t`` (λ = ``bn_lambda``;
  the variances mixed directly; the source statistics never change).
* **Semantic adaptation.** Prototypes (mean features of confidently predicted
  pixels per class; the features are the segmentation head's input) classify
  each pixel by distance, ``p_k ∝ exp(−‖f − c_k‖ / τ)`` over the classes that have
  a prototype. An instance classifier (this image's prototypes) and a running
  one (``c ← (1 − ρ) c + ρ c_instance`` along the stream; a class seen for the
  first time is copied) are mixed, ``p_proto = λ_p p_run + (1 − λ_p) p_inst``, and
  the result with the source head, ``p = λ_f p_proto + (1 − λ_f) p_source``.

Choices for this project's sigmoid (multi-label) heads, documented: each output
channel is its own two-class problem (background, foreground) with
probabilities (1 − p, p); a pixel is confident when max(p, 1 − p) ≥
``confidence``. The official code updates the running prototypes with the
**ground-truth** labels of the current image; labels are never available at
test time here, so the update uses the same confident pseudo-labels as the
instance prototypes (before the current image is predicted, as the official
order). Where no class of a channel has a prototype the official code divides
by zero; here that channel keeps the source probability. Defaults are the
official ones (all mixing weights 0.8, confidence 0.9, ρ 0.1, τ 1). The step
returns logits, ``log p − log(1 − p)`` of the mixed probability.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tta_jax.bn import channel_axes, forward_with_statistics
from tta_jax.hparams import bounded
from tta_jax.methods.base import Method, check_step_input, keep_if_finite, register

PROB_CLIP = 1e-6


@dataclasses.dataclass(frozen=True)
class DIGAHParams:
    bn_lambda: float = bounded(0.8, low=0.0, high=1.0)        # weight of the source BN statistics
    proto_lambda: float = bounded(0.8, low=0.0, high=1.0)     # running vs instance prototype classifier
    fusion_lambda: float = bounded(0.8, low=0.0, high=1.0)    # prototype classifiers vs source head
    confidence: float = bounded(0.9, low=0.5, high=1.0)       # pseudo-label threshold on max(p, 1 − p)
    proto_rho: float = bounded(0.1, low=0.0, high=1.0)        # running-prototype momentum
    temperature: float = bounded(1.0, low=0.0, low_open=True)


class DIGAState(NamedTuple):
    params: Any
    batch_stats: Any
    prototypes: jax.Array   # [C, 2, F] running (background, foreground) prototypes per channel
    seen: jax.Array         # [C, 2] whether each running prototype exists yet


def mixed_statistics(bn_lambda: float):
    """DIGA's distribution adaptation: source and instance statistics mixed with weight ``bn_lambda``."""
    def statistics(layer, x):
        axes = channel_axes(x)
        return (bn_lambda * layer.source_mean + (1 - bn_lambda) * x.mean(axes),
                bn_lambda * layer.source_var + (1 - bn_lambda) * x.var(axes))
    return statistics


def instance_prototypes(features, prob, confidence: float):
    """Mean feature of the confident pixels of each (channel, class): ``[C, 2, F]`` and existence ``[C, 2]``.

    ``features`` ``[P, F]`` (pixels × features), ``prob`` ``[P, C]`` foreground probabilities.
    """
    fg = prob >= confidence
    bg = (1 - prob) >= confidence
    weights = jnp.stack([bg, fg], axis=-1).astype(features.dtype)       # [P, C, 2]
    counts = weights.sum(0)                                             # [C, 2]
    sums = jnp.einsum("pck,pf->ckf", weights, features)
    return sums / jnp.maximum(counts, 1.0)[..., None], counts > 0


def prototype_probability(features, prototypes, exists, temperature: float):
    """Foreground probability ``[P, C]`` of the distance classifier; NaN where no class exists."""
    dist = jnp.linalg.norm(features[:, None, None, :] - prototypes[None], axis=-1)   # [P, C, 2]
    logits = jnp.where(exists[None], -dist / temperature, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)[..., 1]


@register("diga", DIGAHParams)
def make(model, hp: DIGAHParams) -> Method:
    statistics = mixed_statistics(hp.bn_lambda)

    def init(variables, rng):
        del rng
        logits, feats = jax.eval_shape(
            lambda v: forward_with_statistics(model, v["params"], v["batch_stats"], jnp.zeros((1, 32, 32, 3)),
                                              statistics, return_features=True)[0], variables)
        c, f = logits.shape[-1], feats.shape[-1]
        return DIGAState(variables["params"], variables["batch_stats"], jnp.zeros((c, 2, f)),
                         jnp.zeros((c, 2), bool))

    def step(state, images, rng):
        del rng
        check_step_input(images)
        (logits, features), _ = forward_with_statistics(model, state.params, state.batch_stats, images,
                                                        statistics, return_features=True)
        n_classes = logits.shape[-1]
        flat_feats = features.reshape(-1, features.shape[-1])
        source_prob = jax.nn.sigmoid(logits).reshape(-1, n_classes)
        inst, inst_exists = instance_prototypes(flat_feats, source_prob, hp.confidence)
        blended = jnp.where(state.seen[..., None], (1 - hp.proto_rho) * state.prototypes + hp.proto_rho * inst,
                            inst)
        running = jnp.where(inst_exists[..., None], blended, state.prototypes)
        seen = state.seen | inst_exists
        p_inst = prototype_probability(flat_feats, inst, inst_exists, hp.temperature)
        p_run = prototype_probability(flat_feats, running, seen, hp.temperature)
        # a classifier without any prototype for a channel leaves that channel to the others
        p_inst = jnp.where(inst_exists.any(-1)[None], p_inst, p_run)
        p_proto = hp.proto_lambda * p_run + (1 - hp.proto_lambda) * p_inst
        p_proto = jnp.where(seen.any(-1)[None], p_proto, source_prob)
        prob = hp.fusion_lambda * p_proto + (1 - hp.fusion_lambda) * source_prob
        prob = jnp.clip(prob, PROB_CLIP, 1 - PROB_CLIP)
        new_state, ok = keep_if_finite(state._replace(prototypes=running, seen=seen), state, inst)
        mixed_logits = (jnp.log(prob) - jnp.log1p(-prob)).reshape(logits.shape)
        return new_state, mixed_logits, {"skipped": 1.0 - ok.astype(jnp.float32),
                                         "confident_fraction": jnp.mean(jnp.maximum(source_prob, 1 - source_prob)
                                                                        >= hp.confidence)}

    return Method("diga", init, step,
                  stream_axes=DIGAState(params=None, batch_stats=None, prototypes=0, seen=0))
