"""Per-image tuning of an input adaptor Ω against a shape prior (shared by adv_ttt and dae_ttt).

Both Valvano et al. (§3.3, the adversarial mask discriminator as prior) and
Karani et al. (2021, a denoising autoencoder on masks as prior) adapt a small
network Ω in front of the frozen segmentor Σ, image by image:

    Ω* = argmin_Ω  L_prior(σ(Σ(Ω(x)))),     prediction = Σ(Ω*(x)),

by ``n_iter`` Adam steps from the initial Ω₀ (:class:`tta_jax.models.InputAdaptor`,
the identity at start), inside one ``lax.scan``. Only the prior loss
differs between the two methods; it is a function of Σ's sigmoid
probabilities. Σ and the prior network never change, and Ω is restored
before every image: the state that leaves a step is the state that entered
it, so every protocol gives the same per-image result.

Options as in Valvano et al.'s official code: ``patience`` > 0 stops
updating Ω after that many iterations without a lower loss; ``keep_best``
returns the prediction of the iteration with the lowest loss instead of the
last one. Σ uses its source BN statistics (standard inference of the frozen
segmentor; ``test_bn_stats=True`` uses the image's own).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tta_jax.bn import forward_source_stats, forward_test_stats
from tta_jax.hparams import bounded
from tta_jax.methods.base import Method, check_step_input, keep_if_finite
from tta_jax.models import InputAdaptor


@dataclasses.dataclass(frozen=True)
class AdaptorTuningHParams:
    """Tuning of the input adaptor Ω on each image.

    Attributes:
      lr: Adam's learning rate for Ω (1e-3 in both papers' code).
      n_iter: tuning iterations per image (Valvano et al.'s 50).
      patience: > 0 stops after that many iterations without a lower loss (official code).
      keep_best: report the prediction with the lowest loss, not the last one (official code).
      adaptor_features: Ω's channels.
      test_bn_stats: Σ with the image's own BN statistics instead of the source ones.
    """

    lr: float = bounded(1e-3, low=0.0)
    n_iter: int = bounded(50, low=1)
    patience: int = bounded(0, low=0)
    keep_best: bool = False
    adaptor_features: int = bounded(16, low=1)
    test_bn_stats: bool = False


class AdaptorState(NamedTuple):
    params: Any              # segmentor Σ (frozen)
    batch_stats: Any
    prior: Any               # the prior network's variables (frozen)
    adaptor: Any             # Ω₀, the start of every image's tuning


# Σ and the prior are shared by all streams; each stream (seed) has its own Ω₀
ADAPTOR_STREAM_AXES = AdaptorState(None, None, None, 0)


def init_adaptor_state(hp: AdaptorTuningHParams, variables, prior_variables, rng) -> AdaptorState:
    """Σ's variables, the prior's, and a fresh Ω₀ drawn from ``rng``."""
    adaptor = InputAdaptor(hp.adaptor_features)
    omega0 = jax.jit(adaptor.init)(rng if rng is not None else jax.random.PRNGKey(0),
                                   jnp.zeros((1, 32, 32, 3)))["params"]
    return AdaptorState(variables["params"], variables["batch_stats"], prior_variables, omega0)


def make_adaptor_tuner(model, prior_loss: Callable[[Any, jax.Array], jax.Array], hp: AdaptorTuningHParams):
    """``tune(state, images) -> (Ω, logits to report, info)``: tune Ω from ``state.adaptor``.

    Args:
      model: the segmentor Σ.
      prior_loss: ``prior_loss(prior_variables, probabilities) -> scalar``, the
        loss of Σ's sigmoid probabilities under the shape prior.
      hp: the tuning hyperparameters.
    """
    adaptor = InputAdaptor(hp.adaptor_features)
    optimizer = optax.adam(hp.lr)
    patience = hp.patience
    segment = forward_test_stats if hp.test_bn_stats else forward_source_stats

    def loss_and_logits(omega, state, images):
        logits = segment(model, state.params, state.batch_stats, adaptor.apply({"params": omega}, images))
        return prior_loss(state.prior, jax.nn.sigmoid(logits)), logits

    def tune(state, images):
        grad_fn = jax.value_and_grad(loss_and_logits, has_aux=True)
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
        (omega, _, best_loss, best_logits, _, _), (_, active) = jax.lax.scan(body, init, None, length=hp.n_iter)
        final_loss, final_logits = loss_and_logits(omega, state, images)
        better = final_loss < best_loss
        best_loss = jnp.where(better, final_loss, best_loss)
        best_logits = jnp.where(better, final_logits, best_logits)
        logits = best_logits if hp.keep_best else final_logits
        info = {"loss_before": loss0, "loss_after": final_loss, "loss_best": best_loss,
                "iterations": jnp.sum(active).astype(jnp.float32)}
        return omega, logits, info

    return tune


def adaptor_method(name: str, model, prior_loss, hp: AdaptorTuningHParams, prior: str, provider: str) -> Method:
    """The :class:`Method` that tunes Ω per image against ``prior_loss`` of the companion ``prior``.

    ``provider`` says, in the error for variables without ``prior``, what trains it.
    The state never changes (Ω restarts from Ω₀ on every image).
    """
    tune = make_adaptor_tuner(model, prior_loss, hp)

    def init(variables, rng):
        if prior not in variables:
            raise ValueError(f"{name} needs {provider}: variables[{prior!r}] is missing")
        return init_adaptor_state(hp, variables, variables[prior], rng)

    def step(state, images, rng):
        del rng
        check_step_input(images)
        _, logits, info = tune(state, images)
        return state, logits, info

    return Method(name, init, step, stream_axes=ADAPTOR_STREAM_AXES)
