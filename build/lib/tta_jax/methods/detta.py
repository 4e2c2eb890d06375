"""``detta``: from denoising training to test-time adaptation (Wen et al., WACV 2024).

The source model is trained with a second, denoising decoder next to the
segmentation one (DeY-Net): a Noise2Void-style blind-spot task, about 10 % of
the pixels replaced by a random neighbour and the clean image restored, L1 on
those pixels (:func:`tta_jax.auxiliary.blind_spot_input`). The method declares
it: ``SourceNeeds(aux_heads=("blind_spot",))``; here that decoder is the
ResUNet's auxiliary decoder on the bottleneck (the chain of GraTa Table 5's
branches, without skip connections; the official DeY-Net decoder has them).

At test time (official ``predict_DeYNet``): the BN affine parameters are
trained (Adam, official lr 1e-6) on the same blind-spot loss of the test image,
forwarded in train mode, so each BN layer normalises with the image's
statistics and its running statistics move with PyTorch's momentum 0.1 (Flax's
update: biased variance); then the image is predicted in eval mode (the running
statistics) from a blind-spot-masked copy, as the official code, or the mean of
two masked copies' probabilities (``average``, its ``--average``). The
segmentation decoder's BN layers get no gradient from this loss, as in the
official code. The official code adapts on batches of 8 with several passes;
here one step per image (the GraTa protocol). Parameters persist along a
target's stream (the official code reloads the source weights per target).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tta_jax.auxiliary import blind_spot_input, blind_spot_loss
from tta_jax.bn import forward_source_stats, merge_params, split_bn_params
from tta_jax.hparams import bounded
from tta_jax.methods.base import Method, SourceNeeds, check_step_input, keep_if_finite, register

PROB_CLIP = 1e-6


@dataclasses.dataclass(frozen=True)
class DeTTAHParams:
    lr: float = bounded(1e-6, low=0.0)
    b1: float = bounded(0.9, low=0.0, high=1.0, high_open=True)
    b2: float = bounded(0.99, low=0.0, high=1.0, high_open=True)
    average: bool = False           # predict the mean of two blind-spot copies


class DeTTAState(NamedTuple):
    bn_params: Any
    frozen_params: Any
    batch_stats: Any       # running statistics, moved by the train-mode forward
    opt_state: Any


@register("detta", DeTTAHParams, needs=lambda hp: SourceNeeds(aux_heads=("blind_spot",)))
def make(model, hp: DeTTAHParams) -> Method:
    optimizer = optax.adam(hp.lr, b1=hp.b1, b2=hp.b2)

    def init(variables, rng):
        del rng
        bn, frozen = split_bn_params(variables["params"], variables["batch_stats"])
        return DeTTAState(bn, frozen, variables["batch_stats"], optimizer.init(bn))

    def step(state, images, rng):
        check_step_input(images)
        k_adapt, k_predict = jax.random.split(rng)
        masked, mask = blind_spot_input(k_adapt, images)

        def loss_fn(bn):
            (_, branches), updates = model.apply(
                {"params": merge_params(bn, state.frozen_params), "batch_stats": state.batch_stats}, masked,
                train=True, return_aux=True, mutable=["batch_stats"])
            if "blind_spot" not in branches:
                raise ValueError("detta needs the model's 'blind_spot' branch (trained with the source model)")
            return blind_spot_loss(branches["blind_spot"], images, mask), updates["batch_stats"]

        (loss, running), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.bn_params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.bn_params)
        new = state._replace(bn_params=optax.apply_updates(state.bn_params, updates), opt_state=opt_state,
                             batch_stats=running)
        new, ok = keep_if_finite(new, state, loss)
        params = merge_params(new.bn_params, new.frozen_params)
        copies = 2 if hp.average else 1
        probs = [jax.nn.sigmoid(forward_source_stats(model, params, new.batch_stats, blind_spot_input(k, images)[0]))
                 for k in jax.random.split(k_predict, copies)]
        prob = jnp.clip(sum(probs) / copies, PROB_CLIP, 1 - PROB_CLIP)
        return new, jnp.log(prob) - jnp.log1p(-prob), {"loss": loss, "skipped": 1.0 - ok.astype(jnp.float32)}

    return Method("detta", init, step, stream_axes=DeTTAState(bn_params=0, frozen_params=None, batch_stats=0,
                                                             opt_state=0))
