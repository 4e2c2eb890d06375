"""``adv_ttt``: adversarial test-time training with a re-used mask discriminator (Valvano et al. §3.3).

Per test image: start from the initial input adaptor Ω₀
(:class:`tta_jax.models.InputAdaptor`, the identity at start), tune only Ω
for ``n_iter`` Adam steps to minimise ½(Δ(σ(Σ(Ω(x)))) − 1)² (DESIGN.md §4:
make the predicted mask look real to the frozen discriminator Δ), inside one
``lax.scan``; then predict Σ(Ω(x)). The segmentor Σ and Δ never change, and Ω
is restored before every image (episodic by construction: the state that
leaves a step is the state that entered it), so every protocol gives the same
per-image result.

Options as in the official code: ``patience`` > 0 stops updating Ω after
that many iterations without a lower loss; ``keep_best`` returns the
prediction of the iteration with the lowest loss instead of the last one.
Σ uses its source BN statistics (standard inference of the frozen segmentor;
``test_bn_stats=True`` uses the image's own).

Needs the discriminator trained with the segmentor (declared as the
companion ``discriminator``: the source stage trains it, ``variables`` hold
its variables under that name and the factory receives the module).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tta_jax.bn import forward_source_stats, forward_test_stats
from tta_jax.hparams import bounded
from tta_jax.losses import lsgan_generator_loss
from tta_jax.methods.base import Method, SourceNeeds, check_step_input, keep_if_finite, register
from tta_jax.models import InputAdaptor


@dataclasses.dataclass(frozen=True)
class AdvTTTHParams:
    """Tuning of the input adaptor Ω on each image.

    Attributes:
      lr: Adam's learning rate for Ω.
      n_iter: tuning iterations per image (the paper's 50).
      patience: > 0 stops after that many iterations without a lower loss (official code).
      keep_best: report the prediction with the lowest loss, not the last one (official code).
      target: the label the adaptor pushes Δ's score to (1 = real).
      adaptor_features: Ω's channels.
      test_bn_stats: Σ with the image's own BN statistics instead of the source ones.
    """

    lr: float = bounded(1e-3, low=0.0)
    n_iter: int = bounded(50, low=1)
    patience: int = bounded(0, low=0)
    keep_best: bool = False
    target: float = 1.0
    adaptor_features: int = bounded(16, low=1)
    test_bn_stats: bool = False


class AdvTTTState(NamedTuple):
    params: Any              # segmentor (frozen)
    batch_stats: Any
    discriminator: Any       # {"params", "batch_stats"} (frozen)
    adaptor: Any             # Ω₀, the start of every image's tuning


def make_adaptor_tuner(model, discriminator, hp: AdvTTTHParams):
    """``(tune_adaptor, adaptor)``: ``tune_adaptor(state, images) -> (Ω, logits, info)`` tunes Ω from Ω₀."""
    adaptor = InputAdaptor(hp.adaptor_features)
    optimizer = optax.adam(hp.lr)
    patience = hp.patience
    segment = forward_test_stats if hp.test_bn_stats else forward_source_stats

    def adversarial_loss(omega, state, images):
        """½(Δ(σ(Σ(Ω(x)))) − target)², and Σ's logits."""
        logits = segment(model, state.params, state.batch_stats, adaptor.apply({"params": omega}, images))
        scores = discriminator.apply(state.discriminator, jax.nn.sigmoid(logits), update_stats=False)
        return lsgan_generator_loss(scores, hp.target), logits

    def tune_adaptor(state, images):
        """Tune Ω from Ω₀ on ``images``; returns (Ω, logits to report, info)."""
        grad_fn = jax.value_and_grad(adversarial_loss, has_aux=True)
        omega0 = state.adaptor
        (loss0, logits0), _ = grad_fn(omega0, state, images)

        def body(carry, _):
            omega, opt_state, best_loss, best_logits, since_best, stopped = carry
            (loss, logits), grads = grad_fn(omega, state, images)
            better = loss < best_loss
            best_loss = jnp.where(better, loss, best_loss)
            best_logits = jnp.where(better, logits, best_logits)
            since_best = jnp.where(better, 0, since_best + 1)
            stopped = stopped | ((patience > 0) & (since_best >= patience))
            updates, new_opt = optimizer.update(grads, opt_state, omega)
            new_omega = optax.apply_updates(omega, updates)
            (new_omega, new_opt), ok = keep_if_finite((new_omega, new_opt), (omega, opt_state), loss)
            keep = stopped | ~ok
            omega = jax.tree.map(lambda a, b: jnp.where(keep, a, b), omega, new_omega)
            opt_state = jax.tree.map(lambda a, b: jnp.where(keep, a, b), opt_state, new_opt)
            return (omega, opt_state, best_loss, best_logits, since_best, stopped), (loss, ~stopped)

        init = (omega0, optimizer.init(omega0), loss0, logits0, jnp.array(0), jnp.array(False))
        (omega, _, best_loss, best_logits, _, _), (losses, active) = jax.lax.scan(
            body, init, None, length=hp.n_iter)
        final_loss, final_logits = adversarial_loss(omega, state, images)
        better = final_loss < best_loss
        best_loss = jnp.where(better, final_loss, best_loss)
        best_logits = jnp.where(better, final_logits, best_logits)
        logits = best_logits if hp.keep_best else final_logits
        info = {"loss_before": loss0, "loss_after": final_loss, "loss_best": best_loss,
                "iterations": jnp.sum(active).astype(jnp.float32)}
        return omega, logits, info

    return tune_adaptor, adaptor


@register("adv_ttt", AdvTTTHParams, needs=lambda hp: SourceNeeds(companions=("discriminator",)))
def make(model, hp: AdvTTTHParams, discriminator) -> Method:
    tune_adaptor, adaptor = make_adaptor_tuner(model, discriminator, hp)

    def init(variables, rng):
        if "discriminator" not in variables:
            raise ValueError("adv_ttt needs the mask discriminator trained with the segmentor: "
                             "variables['discriminator'] is missing (an adversarial source stage provides it)")
        omega0 = jax.jit(adaptor.init)(rng if rng is not None else jax.random.PRNGKey(0),
                              jnp.zeros((1, 32, 32, 3)))["params"]
        return AdvTTTState(variables["params"], variables["batch_stats"], variables["discriminator"], omega0)

    def step(state, images, rng):
        del rng
        check_step_input(images)
        _, logits, info = tune_adaptor(state, images)
        return state, logits, info

    # Σ and Δ are shared by all streams; each stream (seed) has its own Ω₀
    return Method("adv_ttt", init, step, stream_axes=AdvTTTState(None, None, None, 0))
