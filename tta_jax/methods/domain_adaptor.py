"""``domain_adaptor``: DomainAdaptor (Zhang et al., ICCV 2023): AdaMixBN + generalised entropy.

Per test image, starting again from the source model (the official default is
episodic, ``--online`` off):

1. **AdaMixBN.** Each BN layer mixes the source statistics (μ_s, σ²_s) with the
   test batch's (μ_t, σ²_t): ``μ = λ μ_s + (1 − λ) μ_t``, ``σ² = λ σ²_s + (1 − λ) σ²_t``,
   with one λ per layer from the distances between the per-image, batch and
   source statistics (:func:`adamix_lambda`). With one image per batch the
   image's statistics are the batch's, so λ = 1/2 exactly (the official code
   notes AdaMixBN "cannot be applied in an online manner").
2. **Statistics transformation.** The layer instead normalises with the test
   statistics and rewrites its affine parameters so that the output is the
   same (:func:`rectified_affine`): ``γ' = γ √(σ²_t + ε) / √(σ² + ε)``,
   ``β' = β + γ λ (μ_t − μ_s) / √(σ² + ε)``. γ', β' are what is optimised.
3. **GEM-T.** One SGD step (lr 1e-3, no momentum, as the official default) on
   γ', β' of the generalised entropy with temperature (:func:`gem_t`), then the
   image is predicted with the updated γ', β' and test statistics.

Sigmoid heads (this project): each channel is the two-class softmax over the
logits ``[z, 0]`` (so ``softmax = (sigmoid(z), 1 − sigmoid(z))``); GEM-T's temperature
is computed over these two logits per pixel, as the official code does over the
classes of one sample.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import traverse_util

from tta_jax.bn import channel_axes, forward_test_stats, forward_with_statistics, merge_params, split_bn_params
from tta_jax.hparams import bounded
from tta_jax.methods.base import Method, check_step_input, keep_if_finite, register
from tta_jax.methods.common import FrozenState, init_frozen_state

TEMPERATURE_FLOOR = 1e-6   # a logit of exactly 0 has no spread: its temperature would be 0/0


@dataclasses.dataclass(frozen=True)
class DomainAdaptorHParams:
    lr: float = bounded(1e-3, low=0.0)                      # SGD, no momentum (official, episodic)
    temperature_factor: float = bounded(2.0, low=0.0, low_open=True)   # T = factor × std of the logits


def adamix_lambda(x, source_mean, source_var):
    """AdaMixBN's λ for one layer, from its input ``x`` ``[B, H, W, C]``.

    With per-image statistics (μ_i, σ_i), batch statistics (μ_t, σ_t) and source
    (μ_s, σ_s), distances averaged over channels, d(a, b) = mean_c (μ_a − μ_b)² + (σ_a − σ_b)²:
    ``λ_i = clip(1 − d(t, s) / (d(t, s) + d(i, s) + d(i, t)), 0, 1)``, averaged over the batch
    (standard deviations unbiased, as the official code). 1/2 when all distances vanish.
    """
    n_pix = x.shape[1] * x.shape[2]
    mu_i = x.mean((1, 2))
    sd_i = jnp.sqrt(x.var((1, 2)) * n_pix / max(n_pix - 1, 1))
    n_all = n_pix * x.shape[0]
    mu_t = x.mean((0, 1, 2))
    sd_t = jnp.sqrt(x.var((0, 1, 2)) * n_all / max(n_all - 1, 1))
    sd_s = jnp.sqrt(source_var)
    dist = lambda m1, s1, m2, s2: jnp.mean(jnp.square(m1 - m2) + jnp.square(s1 - s2), axis=-1)
    st, is_, it = dist(mu_t, sd_t, source_mean, sd_s), dist(mu_i, sd_i, source_mean, sd_s), dist(mu_i, sd_i, mu_t, sd_t)
    denom = st + is_ + it
    lam = jnp.where(denom > 0, jnp.clip(1 - st / jnp.where(denom > 0, denom, 1.0), 0.0, 1.0), 0.5)
    return jnp.mean(lam)


def rectified_affine(scale, bias, lam, test_mean, test_var, source_mean, source_var, epsilon):
    """(γ', β') with which test-statistics normalisation equals normalisation by the λ-mixture."""
    mixed_var = lam * source_var + (1 - lam) * test_var
    inv_mixed = jax.lax.rsqrt(mixed_var + epsilon)
    return scale * jnp.sqrt(test_var + epsilon) * inv_mixed, bias + scale * lam * (test_mean - source_mean) * inv_mixed


def gem_t(logits, temperature_factor: float = 2.0):
    """GEM-T for sigmoid channels: ``T² · H(softmax([z, 0] / T))`` with ``T = factor · std([z, 0])`` (unbiased,
    detached), summed over channels, mean over pixels. For two logits std = |z|/√2."""
    temperature = jax.lax.stop_gradient(jnp.maximum(temperature_factor * jnp.abs(logits) / jnp.sqrt(2.0),
                                                    TEMPERATURE_FLOOR))
    u = logits / temperature
    p = jax.nn.sigmoid(u)
    entropy = -(p * jax.nn.log_sigmoid(u) + (1 - p) * jax.nn.log_sigmoid(-u))
    return jnp.mean(jnp.sum(jnp.square(temperature) * entropy, axis=-1))


@register("domain_adaptor", DomainAdaptorHParams)
def make(model, hp: DomainAdaptorHParams) -> Method:

    def step(state, images, rng):
        del rng
        check_step_input(images)
        bn_params, frozen = split_bn_params(state.params, state.batch_stats)
        layers = {}

        def adamix(layer, x):
            axes = channel_axes(x)
            test_mean, test_var = x.mean(axes), x.var(axes)
            lam = adamix_lambda(x, layer.source_mean, layer.source_var)
            layers[layer.path] = (lam, test_mean, test_var, layer)
            return (lam * layer.source_mean + (1 - lam) * test_mean,
                    lam * layer.source_var + (1 - lam) * test_var)

        forward_with_statistics(model, state.params, state.batch_stats, images, adamix)
        flat = traverse_util.flatten_dict(bn_params)
        rectified = dict(flat)   # layers the forward does not reach (auxiliary branches) keep γ, β
        for path, (lam, test_mean, test_var, layer) in layers.items():
            rectified[path + ("scale",)], rectified[path + ("bias",)] = rectified_affine(
                flat[path + ("scale",)], flat[path + ("bias",)], lam, test_mean, test_var,
                layer.source_mean, layer.source_var, layer.epsilon)
        start = jax.lax.stop_gradient(traverse_util.unflatten_dict(rectified))

        def loss_fn(bn):
            logits = forward_test_stats(model, merge_params(bn, frozen), state.batch_stats, images)
            return gem_t(logits, hp.temperature_factor)

        loss, grads = jax.value_and_grad(loss_fn)(start)
        updated = jax.tree.map(lambda p, g: p - hp.lr * g, start, grads)
        adapted, ok = keep_if_finite(updated, start, loss)
        logits = forward_test_stats(model, merge_params(adapted, frozen), state.batch_stats, images)
        mean_lambda = jnp.mean(jnp.stack([v[0] for v in layers.values()]))
        return state, logits, {"loss": loss, "lambda": mean_lambda, "skipped": 1.0 - ok.astype(jnp.float32)}

    return Method("domain_adaptor", init_frozen_state, step, stream_axes=FrozenState(None, None))
