"""``adv_ttt``: adversarial test-time training with a re-used mask discriminator (Valvano et al. §3.3).

Per test image: tune only the input adaptor Ω for ``n_iter`` Adam steps to
minimise ½(Δ(σ(Σ(Ω(x)))) − 1)² (DESIGN.md §4: make the predicted mask look
real to the frozen discriminator Δ), then predict Σ(Ω(x)). The tuning loop,
its options (``patience``, ``keep_best``, ``test_bn_stats``) and the reset of
Ω before every image are shared with ``dae_ttt``
(:mod:`tta_jax.methods.adaptor_tuning`); only the prior differs.

Needs the discriminator trained with the segmentor (declared as the
companion ``discriminator``: the source stage trains it, ``variables`` hold
its variables under that name and the factory receives the module).
"""
from __future__ import annotations

import dataclasses

from tta_jax.losses import lsgan_generator_loss
from tta_jax.methods.adaptor_tuning import AdaptorTuningHParams, adaptor_method
from tta_jax.methods.base import Method, SourceNeeds, register


@dataclasses.dataclass(frozen=True)
class AdvTTTHParams(AdaptorTuningHParams):
    """The adaptor tuning (:class:`AdaptorTuningHParams`) and ``target``, the label Ω pushes Δ's score to (1 = real)."""

    target: float = 1.0


def adversarial_prior(discriminator, target: float):
    """½(Δ(p) − target)² for Σ's probabilities ``p`` (Δ's spectral-norm statistics frozen)."""
    def prior_loss(disc_variables, probabilities):
        return lsgan_generator_loss(discriminator.apply(disc_variables, probabilities, update_stats=False), target)
    return prior_loss


@register("adv_ttt", AdvTTTHParams, needs=lambda hp: SourceNeeds(companions=("discriminator",)))
def make(model, hp: AdvTTTHParams, discriminator) -> Method:
    return adaptor_method("adv_ttt", model, adversarial_prior(discriminator, hp.target), hp, "discriminator",
                          "the mask discriminator trained with the segmentor (an adversarial source stage)")
