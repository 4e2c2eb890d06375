"""``tent``: entropy minimisation of the BN affine parameters (Wang et al., ICLR 2021).

Per test image: forward with the image's own BN statistics, minimise the
prediction entropy w.r.t. the BN scale/bias with Adam for ``steps`` steps,
then predict with the updated parameters (adapt-then-predict).  For sigmoid
(multi-label) outputs the entropy is the Bernoulli entropy per channel
(:func:`tta_jax.losses.binary_entropy`).

Hyperparameters: ``lr`` (1e-3), ``b1`` (0.9), ``b2`` (0.999), ``steps`` (1).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tta_jax.bn import forward_test_stats, merge_params, split_bn_params
from tta_jax.losses import binary_entropy
from tta_jax.methods.base import Method, check_step_input, keep_if_finite, register, supervised_bn_gradient
from tta_jax.models.resunet import with_input_grad_kernels


class BNAdaptState(NamedTuple):
    """State of methods that train the BN affine parameters only."""

    bn_params: Any
    frozen_params: Any
    batch_stats: Any
    opt_state: Any


# streams share the frozen weights and the source statistics; each has its own BN affine + Adam
BN_STREAM_AXES = BNAdaptState(bn_params=0, frozen_params=None, batch_stats=None, opt_state=0)


def init_bn_adapt_state(variables, optimizer) -> BNAdaptState:
    bn_params, frozen = split_bn_params(variables["params"], variables["batch_stats"])
    # The convolution kernels stay frozen: their input-gradient kernels are made once per stream,
    # not in every backward pass (GraTa step, ResNet-34 at 256²: ~7 % faster).
    frozen = with_input_grad_kernels(frozen)
    return BNAdaptState(bn_params, frozen, variables["batch_stats"], optimizer.init(bn_params))


@register("tent")
def make(model, hparams) -> Method:
    lr = float(hparams.get("lr", 1e-3))
    steps = int(hparams.get("steps", 1))
    optimizer = optax.adam(lr, b1=float(hparams.get("b1", 0.9)), b2=float(hparams.get("b2", 0.999)))

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

        def one_update(_, carry):
            st, _, n_skipped = carry
            loss, grads = jax.value_and_grad(entropy_loss)(st.bn_params, st, images)
            updates, opt_state = optimizer.update(grads, st.opt_state, st.bn_params)
            new = st._replace(bn_params=optax.apply_updates(st.bn_params, updates), opt_state=opt_state)
            new, ok = keep_if_finite(new, st, loss)
            return new, loss, n_skipped + (1 - ok.astype(jnp.float32))

        new_state, loss, skipped = jax.lax.fori_loop(
            0, steps, one_update, (state, jnp.zeros(()), jnp.zeros(())))
        logits = forward_test_stats(model, merge_params(new_state.bn_params, new_state.frozen_params),
                                    new_state.batch_stats, images)
        return new_state, logits, {"loss": loss, "skipped": skipped}

    def analysis(state, images, masks, rng):
        """Cosine between TENT's gradient and the supervised gradient (GraTa Fig. 4's 'TENT')."""
        from tta_jax.methods.grata import gradient_cosine
        g_ent = jax.grad(entropy_loss)(state.bn_params, state, images)
        return {"cos_empirical": gradient_cosine(g_ent, supervised_bn_gradient(model, state, images, masks))}

    return Method("tent", init, step, analysis, stream_axes=BN_STREAM_AXES)
