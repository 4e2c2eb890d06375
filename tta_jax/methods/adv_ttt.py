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

Needs the discriminator trained with the segmentor: ``variables`` must hold
``discriminator`` (``source.adversarial=True``, ``configs/adv_ttt.py``).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tta_jax.adversarial import lsgan_generator_loss
from tta_jax.bn import forward_source_stats, forward_test_stats
from tta_jax.methods.base import Method, check_step_input, keep_if_finite, register
from tta_jax.models import InputAdaptor, MaskDiscriminator
from tta_jax.models.resunet import with_input_grad_kernels

DEFAULTS = dict(lr=1e-3, n_iter=50, patience=0, keep_best=False, target=1.0, adaptor_features=16,
                test_bn_stats=False, disc_width=0.25, disc_strides="2,2,1,1,1")


class AdvTTTState(NamedTuple):
    params: Any              # segmentor (frozen)
    batch_stats: Any
    discriminator: Any       # {"params", "batch_stats"} (frozen)
    adaptor: Any             # Ω₀, the start of every image's tuning


def parse_strides(strides) -> tuple[int, ...]:
    return tuple(int(s) for s in str(strides).split(",")) if isinstance(strides, str) else tuple(strides)


def _hparams(hparams) -> dict:
    hp = {**DEFAULTS, **hparams}
    unknown = set(hp) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown adv_ttt options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    if int(hp["n_iter"]) < 1:
        raise ValueError(f"adv_ttt.n_iter must be >= 1, got {hp['n_iter']}")
    return hp


def make_adaptor_tuner(model, hparams):
    """``(tune_adaptor, adaptor)``: ``tune_adaptor(state, images) -> (Ω, logits, info)`` tunes Ω from Ω₀."""
    hp = _hparams(hparams)
    adaptor = InputAdaptor(int(hp["adaptor_features"]))
    discriminator = MaskDiscriminator(float(hp["disc_width"]), parse_strides(hp["disc_strides"]))
    optimizer = optax.adam(float(hp["lr"]))
    patience = int(hp["patience"])
    segment = forward_test_stats if hp["test_bn_stats"] else forward_source_stats

    def adversarial_loss(omega, state, images):
        """½(Δ(σ(Σ(Ω(x)))) − target)², and Σ's logits."""
        logits = segment(model, state.params, state.batch_stats, adaptor.apply({"params": omega}, images))
        scores = discriminator.apply(state.discriminator, jax.nn.sigmoid(logits), update_stats=False)
        return lsgan_generator_loss(scores, float(hp["target"])), logits

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
            body, init, None, length=int(hp["n_iter"]))
        final_loss, final_logits = adversarial_loss(omega, state, images)
        better = final_loss < best_loss
        best_loss = jnp.where(better, final_loss, best_loss)
        best_logits = jnp.where(better, final_logits, best_logits)
        logits = best_logits if hp["keep_best"] else final_logits
        info = {"loss_before": loss0, "loss_after": final_loss, "loss_best": best_loss,
                "iterations": jnp.sum(active).astype(jnp.float32)}
        return omega, logits, info

    return tune_adaptor, adaptor


@register("adv_ttt")
def make(model, hparams) -> Method:
    tune_adaptor, adaptor = make_adaptor_tuner(model, hparams)

    def init(variables, rng):
        if "discriminator" not in variables:
            raise ValueError("adv_ttt needs the mask discriminator trained with the segmentor: "
                             "set source.adversarial=True (configs/adv_ttt.py) or give a checkpoint that has it")
        omega0 = adaptor.init(rng if rng is not None else jax.random.PRNGKey(0),
                              jnp.zeros((1, 32, 32, 3)))["params"]
        # Σ is frozen: its input-gradient kernels are made once, not in each of the n_iter backward passes
        return AdvTTTState(with_input_grad_kernels(variables["params"]), variables["batch_stats"],
                           variables["discriminator"], omega0)

    def step(state, images, rng):
        del rng
        check_step_input(images)
        _, logits, info = tune_adaptor(state, images)
        return state, logits, info

    # Σ and Δ are shared by all streams; each stream (seed) has its own Ω₀
    return Method("adv_ttt", init, step, stream_axes=AdvTTTState(None, None, None, 0))
