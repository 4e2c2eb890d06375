"""GraTa: gradient alignment for test-time adaptation (Chen et al., AAAI 2025).

One step on a test image ``x`` with BN affine parameters θ (DESIGN.md §2,
paper Algorithm 1):

1. auxiliary gradient ``g_aux = ∇L_aux(θ)`` (default L_ent, Eq. 1);
2. look-ahead ``θ' = θ − g_aux`` (step size exactly 1, raw gradient; Eq. 4);
3. pseudo gradient ``g_pse = ∇L_pse(θ')`` (default L_con, Eq. 2);
4. ``cos = ⟨g_pse, g_aux⟩ / (‖g_pse‖‖g_aux‖ + 1e-12)`` over all BN parameters;
5. ``η = β · Cus(cos)``, ``Cus(x) = ¼(x + 1)²`` (Eq. 7);
6. ``θ ← Adam(θ, g_pse, lr = η)``; then predict ``x`` with the new θ.

Every forward normalises with the forwarded image's own BN statistics.  By
Eq. 5–6, minimising L_con(θ − ∇L_ent) is, to first order, minimising
L_con(θ) − ⟨∇L_con, ∇L_ent⟩: the update favours directions where the two
objectives agree (tested in ``tests/test_grata.py``).

Hyperparameters: :class:`GraTaHParams` (config ``grata.*``).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from tta_jax.augment import StrongViewProbabilities, invert_weak_views, strong_augment, weak_views
from tta_jax.auxiliary import auxiliary_objective
from tta_jax.bn import forward_test_stats, merge_params
from tta_jax.hparams import bounded, nested
from tta_jax.losses import bce_with_logits, sigmoid_entropy_plogp
from tta_jax.methods.base import Method, SourceNeeds, check_step_input, keep_if_finite, register
from tta_jax.methods.common import BN_STREAM_AXES, gradient_cosine, init_bn_adapt_state, supervised_bn_gradient
from tta_jax.models.resunet import AUX_HEADS

LR_MAPS = {
    "quadratic": lambda c: 0.25 * (c + 1.0) ** 2,   # the paper's Cus (Eq. 7)
    "linear": lambda c: 0.5 * (c + 1.0),
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "softplus": jax.nn.softplus,
}
OBJECTIVES = ("entropy", "consistency", *AUX_HEADS)
Objective = Literal["entropy", "consistency", "reconstruction", "rotation", "super_resolution", "denoising"]
VIEWS_MAPS = ("vmap", "map")


@dataclasses.dataclass(frozen=True)
class GraTaHParams:
    """GraTa's settings; the defaults are the paper's and the official code's.

    Attributes:
      lr: β, Adam's base learning rate (Eq. 7).
      b1, b2: Adam's betas.
      lr_schedule: ``dynamic`` (η = β·map(cos)) or ``fixed`` (β; Table 2).
      lr_map: the map of the cosine: ``quadratic`` ¼(x+1)² (Eq. 7), ``linear``
        ½(x+1), ``sigmoid``, ``relu``, ``softplus`` (Table 4).
      lookahead: L_pse at θ − ∇L_aux (Eq. 4) or at θ (Table 2).
      pseudo, auxiliary: the two objectives: ``consistency``/``entropy`` by
        default, swapped in Table 3, any pair of six in Table 5 (the four
        self-supervised ones need the model's auxiliary heads).
      denoise_std: noise of the denoising objective (the paper's N(0, 1)).
      views_map: how the six teacher views are forwarded (see :func:`teacher_prediction`).
      strong: probabilities of the strong view's ops (0 switches one off).
    """

    lr: float = bounded(1e-4, low=0.0)
    b1: float = bounded(0.9, low=0.0, high=1.0, high_open=True)
    b2: float = bounded(0.999, low=0.0, high=1.0, high_open=True)
    lr_schedule: Literal["dynamic", "fixed"] = "dynamic"
    lr_map: Literal["quadratic", "linear", "sigmoid", "relu", "softplus"] = "quadratic"
    lookahead: bool = True
    pseudo: Objective = "consistency"
    auxiliary: Objective = "entropy"
    denoise_std: float = bounded(1.0, low=0.0)
    views_map: Literal["vmap", "map"] = "vmap"
    strong: StrongViewProbabilities = nested(StrongViewProbabilities)


def source_needs(hp: GraTaHParams) -> SourceNeeds:
    """The self-supervised objectives (Table 5) need their branch trained with the source model."""
    return SourceNeeds(aux_heads=tuple(o for o in (hp.auxiliary, hp.pseudo) if o in AUX_HEADS))


def lookahead_params(params, aux_grads):
    """θ' = θ − ∇L_aux(θ): the look-ahead point of Eq. 4 (unit step, raw gradient)."""
    return jax.tree.map(lambda p, g: p - g, params, aux_grads)


def dynamic_learning_rate(cos, base_lr: float, lr_map: str = "quadratic"):
    """η = β · map(cos) (Eq. 7); ``quadratic`` keeps η in [0, β]."""
    if lr_map not in LR_MAPS:
        raise ValueError(f"unknown lr_map {lr_map!r}; choose one of {sorted(LR_MAPS)}")
    return base_lr * LR_MAPS[lr_map](cos)


def entropy_loss(model, bn_params, frozen, batch_stats, images, key):
    """L_ent (Eq. 1): mean over pixels of Σ_c −p log(p + 1e-6), test-image BN statistics."""
    del key
    return sigmoid_entropy_plogp(forward_test_stats(model, merge_params(bn_params, frozen), batch_stats, images))


def _check_views_map(views_map: str) -> None:
    if views_map not in VIEWS_MAPS:
        raise ValueError(f"unknown grata.views_map {views_map!r}; choose one of {list(VIEWS_MAPS)}")


def teacher_prediction(model, params, batch_stats, images, views_map: str = "vmap"):
    """P̂ (Eq. 2): mean sigmoid over the 6 weak views, each forwarded alone, mapped back; constant.

    ``views_map``: ``vmap`` forwards the 6 views as one batch (each with its own BN
    statistics); ``map`` forwards them one after another with ``lax.map`` — the same
    numbers in less memory (XLA temporaries about half), for large images on a
    small accelerator.
    """
    _check_views_map(views_map)
    # constant w.r.t. θ: cut the gradient at the parameters, not only at the output, so that
    # autodiff does not linearise (and trace) the six-view forward only to discard it
    params = jax.lax.stop_gradient(params)
    views = weak_views(images)
    mapper = jax.vmap if views_map == "vmap" else (lambda f: (lambda xs: jax.lax.map(f, xs)))
    logits = mapper(lambda v: forward_test_stats(model, params, batch_stats, v))(views)
    probs = jax.nn.sigmoid(invert_weak_views(logits))
    return jax.lax.stop_gradient(jnp.mean(probs, axis=0))


def strong_view(key, images, strong_overrides):
    """X̃ (Eq. 2): one strong view per image of the batch."""
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, x: strong_augment(k, x, **strong_overrides))(keys, images)


def consistency_loss(model, bn_params, frozen, batch_stats, images, key, strong_overrides=None,
                     views_map: str = "vmap"):
    """L_con (Eq. 2): BCE-with-logits between the strong view's logits and the weak-view teacher."""
    params = merge_params(bn_params, frozen)
    teacher = teacher_prediction(model, params, batch_stats, images, views_map)
    student = forward_test_stats(model, params, batch_stats, strong_view(key, images, strong_overrides or {}))
    return bce_with_logits(student, teacher)


@register("grata", GraTaHParams, needs=source_needs)
def make(model, hp: GraTaHParams) -> Method:
    base_lr, lookahead, schedule, lr_map = hp.lr, hp.lookahead, hp.lr_schedule, hp.lr_map
    strong_overrides = dataclasses.asdict(hp.strong)
    views_map = hp.views_map
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=base_lr, b1=hp.b1, b2=hp.b2)

    def objective(name):
        if name == "entropy":
            return lambda p, st, x, k: entropy_loss(model, p, st.frozen_params, st.batch_stats, x, k)
        if name == "consistency":
            return lambda p, st, x, k: consistency_loss(model, p, st.frozen_params, st.batch_stats, x, k,
                                                        strong_overrides, views_map)
        if name not in getattr(model, "aux_heads", ()):
            raise ValueError(f"grata objective {name!r} needs the model's {name!r} branch: add it to "
                             f"model.aux_heads and train the source model with it")

        def self_supervised(p, st, x, k):
            params = merge_params(p, st.frozen_params)
            forward = lambda inp: forward_test_stats(model, params, st.batch_stats, inp, return_aux=True)
            return auxiliary_objective(name, forward, k, x, model.sr_factor, hp.denoise_std)
        return self_supervised

    aux_objective, pse_objective = objective(hp.auxiliary), objective(hp.pseudo)

    def init(variables, rng):
        del rng
        return init_bn_adapt_state(variables, optimizer)

    def aligned_gradients(state, images, rng):
        """g_aux = ∇L_aux(θ) and g_pse = ∇L_pse(θ − g_aux) (or at θ without look-ahead)."""
        k_aux, k_pse = jax.random.split(rng)
        theta = state.bn_params
        aux_loss, g_aux = jax.value_and_grad(aux_objective)(theta, state, images, k_aux)
        theta_eval = lookahead_params(theta, g_aux) if lookahead else theta
        pse_loss, g_pse = jax.value_and_grad(pse_objective)(theta_eval, state, images, k_pse)
        return aux_loss, g_aux, pse_loss, g_pse

    def step(state, images, rng):
        check_step_input(images)
        theta = state.bn_params
        aux_loss, g_aux, pse_loss, g_pse = aligned_gradients(state, images, rng)
        cos = gradient_cosine(g_pse, g_aux)
        eta = dynamic_learning_rate(cos, base_lr, lr_map) if schedule == "dynamic" else jnp.asarray(base_lr)
        # Adam's learning rate for this step is η; its moments see g_pse only.
        opt_state = state.opt_state._replace(hyperparams={**state.opt_state.hyperparams, "learning_rate": eta})
        updates, opt_state = optimizer.update(g_pse, opt_state, theta)
        new = state._replace(bn_params=optax.apply_updates(theta, updates), opt_state=opt_state)
        new, ok = keep_if_finite(new, state, aux_loss, pse_loss, cos)
        logits = forward_test_stats(model, merge_params(new.bn_params, new.frozen_params), new.batch_stats, images)
        info = {"cos": cos, "eta": eta, "aux_loss": aux_loss, "pse_loss": pse_loss,
                "skipped": 1.0 - ok.astype(jnp.float32)}
        return new, logits, info

    def analysis(state, images, masks, rng):
        """Cosine between the update direction g_pse and the supervised gradient (paper Fig. 4)."""
        _, _, _, g_pse = aligned_gradients(state, images, rng)
        return {"cos_empirical": gradient_cosine(g_pse, supervised_bn_gradient(model, state, images, masks))}

    return Method("grata", init, step, analysis, stream_axes=BN_STREAM_AXES)
