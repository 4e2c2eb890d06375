"""``tent``: entropy minimisation of the BN affine parameters (Wang et al., ICLR 2021).

Per test image: forward with the image's own BN statistics, minimise the
prediction entropy w.r.t. the BN scale/bias with Adam for ``steps`` steps,
then predict with the updated parameters (adapt-then-predict).  For sigmoid
(multi-label) outputs the entropy is the Bernoulli entropy per channel
(:func:`tta_jax.losses.binary_entropy`).
"""
from __future__ import annotations

import dataclasses

import jax
import optax

from tta_jax.bn import forward_test_stats, merge_params
from tta_jax.hparams import bounded
from tta_jax.losses import binary_entropy
from tta_jax.methods.base import Method, check_step_input, register
from tta_jax.methods.common import (BN_STREAM_AXES, gradient_cosine, init_bn_adapt_state, repeated_updates,
                                    supervised_bn_gradient)


@dataclasses.dataclass(frozen=True)
class TentHParams:
    """Adam on the BN affine parameters: learning rate, betas, updates per image."""

    lr: float = bounded(1e-3, low=0.0)
    b1: float = bounded(0.9, low=0.0, high=1.0, high_open=True)
    b2: float = bounded(0.999, low=0.0, high=1.0, high_open=True)
    steps: int = bounded(1, low=1)


@register("tent", TentHParams)
def make(model, hp: TentHParams) -> Method:
    optimizer = optax.adam(hp.lr, b1=hp.b1, b2=hp.b2)

    def entropy_loss(bn_params, state, images):
        logits = forward_test_stats(model, merge_params(bn_params, state.frozen_params),
                                    state.batch_stats, images)
        return binary_entropy(logits)

    def init(variables, rng):
        del rng
        return init_bn_adapt_state(variables, optimizer)

    def step(state, images, rng):
        del rng
        check_step_input(images)

        new_state, loss, skipped = repeated_updates(
            lambda bn, st: entropy_loss(bn, st, images), optimizer, state, "bn_params", hp.steps)
        logits = forward_test_stats(model, merge_params(new_state.bn_params, new_state.frozen_params),
                                    new_state.batch_stats, images)
        return new_state, logits, {"loss": loss, "skipped": skipped}

    def analysis(state, images, masks, rng):
        """Cosine between TENT's gradient and the supervised gradient (GraTa Fig. 4's 'TENT')."""
        del rng
        g_ent = jax.grad(entropy_loss)(state.bn_params, state, images)
        return {"cos_empirical": gradient_cosine(g_ent, supervised_bn_gradient(model, state, images, masks))}

    return Method("tent", init, step, analysis, stream_axes=BN_STREAM_AXES)
