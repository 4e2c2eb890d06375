"""``dae_ttt``: test-time training with a denoising-autoencoder shape prior (Karani et al., MedIA 2021).

The comparison of Valvano et al. (Fig. 4, "a prior learned by a pre-trained
DAE, inspired by [13]"): the same input adaptor Ω as ``adv_ttt``, tuned per
image (:mod:`tta_jax.methods.adaptor_tuning`), but the prior is a mask
denoising autoencoder D trained separately on the source labels
(:mod:`tta_jax.source.dae`). With ``p = σ(Σ(Ω(x)))``, each iteration

    ŷ = 1[σ(D(p)) > 0.5]                   (the denoised prediction, no gradient)
    L = 1 − mean_labels Dice(p, ŷ)          (:func:`tta_jax.losses.label_dice_loss`)

so Ω moves Σ's prediction towards its nearest plausible shape. As in the
official ``update_i2i_mapper``: the DAE reads the soft prediction, its
output is binarised (argmax of the softmax there, > 0.5 per sigmoid channel
here) and enters the loss as a fixed label. The official code recomputes ŷ
once per pass over a 3-D volume's slices; with one 2-D image per "volume" a
pass is one iteration, so ŷ is recomputed every iteration. The official code
also downsamples the prediction ×4 along one axis before the DAE (its 3-D
DAE runs at a coarser resolution); here the DAE runs at the image size.
Karani et al. switch to an atlas prior while the DAE output is far from the
prediction; their released setting disables it (threshold 0), as here.
"""
from __future__ import annotations

import dataclasses

import jax

from tta_jax.losses import label_dice_loss
from tta_jax.methods.adaptor_tuning import AdaptorTuningHParams, adaptor_method
from tta_jax.methods.base import Method, SourceNeeds, register


@dataclasses.dataclass(frozen=True)
class DAETTTHParams(AdaptorTuningHParams):
    """The adaptor tuning (:class:`AdaptorTuningHParams`, as ``adv_ttt`` for a like-for-like comparison)."""


def denoised_prior(dae):
    """``prior_loss(dae_variables, p)``: Karani's Dice loss between ``p`` and the binarised D(p), held fixed."""
    def prior_loss(dae_variables, probabilities):
        denoised = jax.nn.sigmoid(dae.apply(dae_variables, probabilities, train=False))
        target = jax.lax.stop_gradient((denoised > 0.5).astype(probabilities.dtype))
        return label_dice_loss(probabilities, target)
    return prior_loss


@register("dae_ttt", DAETTTHParams, needs=lambda hp: SourceNeeds(companions=("dae",)))
def make(model, hp: DAETTTHParams, dae) -> Method:
    return adaptor_method("dae_ttt", model, denoised_prior(dae), hp, "dae",
                          "the mask denoising autoencoder trained on the source masks (the source stage "
                          "trains it when a method needs it)")
