"""``nc_ttt``: Noise-Contrastive Test-Time Training (Osowiechi et al., CVPR 2024).

Source stage (the paper's method section; the ``noise_contrastive`` head, trained with the
segmentor: ``SourceNeeds(aux_heads=("noise_contrastive",))``). A linear projection ``z = P(f)`` of an
encoder feature map ``f`` gets, at every pixel, Gaussian noise of two levels, an
in-distribution one and a larger, out-of-distribution one::

    z + n,   n ~ N(0, σ_in² I_E)  or  n ~ N(0, σ_out² I_E),   σ_in = 0.015 < σ_out = 0.1

(``E``: the projection's channels). A discriminator ``D`` learns, per pixel, the probability that a
view carries the larger noise; its target is that posterior for equal priors (noise-contrastive
estimation between the two Gaussians)::

    y(n) = P(out | n) = sigmoid(½ (σ_in⁻² − σ_out⁻²) ‖n‖² − E · log(σ_out / σ_in))
    L_src = mean over views, images, pixels of  BCE(sigmoid(D(z + n)), y(n))

(:func:`tta_jax.auxiliary.noise_contrastive_loss`; the noise is drawn by
:class:`tta_jax.models.resunet.NoiseContrastiveHead`). Test time: the clean projection of the test
image is labelled in-distribution, and the encoder θ is trained to make it so, ``P`` and ``D``
frozen (:func:`tta_jax.auxiliary.noise_contrastive_test_loss`)::

    L_test(θ) = mean over pixels of −log(1 − sigmoid(D(P(f_θ(x))))) = mean softplus(D(P(f_θ(x))))

The equations are written as the official code (github.com/GustavoVargasHakim/NCTTT,
``models/simplenet.py``, ``adapt.py``, ``utils/create_model.py``, ``configuration.py``) computes
them; the paper's equation numbers are not cited because its body could not be checked.
Choices, for per-pixel segmentation with the ResUNet and one image per step:

* the head reads ``layer1``'s output, the official default layer (``--layers 1``: ResNet-50's first
  stage), not the bottleneck the other heads read; the official VisDA head (1×1 convolutions: one
  projection, then 1×1 → BN → LeakyReLU 0.2 → 1×1 with 4 hidden units) already scores every pixel,
  so it carries over unchanged (the CIFAR variant flattens the map into one vector, not used);
  projection width 6× the input channels (the official 1536 for 256);
* one view of each noise level per feature map, as the official code; posteriors under 1e-6 set to
  0, as the official code; the source stage adds L_src with weight 1 (official ``--weight 1.0``);
  the noise is drawn independently per image and pixel (the official code gives every image of a
  batch the sum of the batch's draws; see :class:`~tta_jax.models.resunet.NoiseContrastiveHead`);
* the adapted parameters are the official ones, every parameter of the stem (``conv1``, ``bn1``)
  and ``layer1`` (``get_part``), with Adam (``--optim``), lr 1e-5 (``--adapt-lr``);
  ``adapt="encoder_bn"`` restricts them to those layers' BN scale and bias (an option, not the
  official method). Everything else (the decoder, ``P``, ``D``) is frozen;
* BN statistics: the official code adapts in train mode (the test batch's statistics) and
  predicts in eval mode with running statistics that its train-mode forwards moved toward the
  batch with momentum 0.1; after its default 50 iterations they are 1 − 0.9⁵⁰ ≈ 99.5 % the
  batch's. Here the adaptation forward and the prediction both normalise with the image's own
  statistics, and the source statistics never move;
* one update per image (official ``--niter`` 50 per batch of 128), then the prediction (adapt,
  then predict, as the official code); by default the adapted weights and the optimiser's moments
  persist along the stream (the continual protocol of SPEGC's Table 1, which compares NC-TTT);
  the official code reloads the source weights before each batch: ``episodic=True``.

Each deviation is also stated where it happens.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import optax
from flax import traverse_util

from tta_jax.auxiliary import noise_contrastive_test_loss
from tta_jax.bn import forward_test_stats, merge_params, split_bn_params
from tta_jax.hparams import bounded
from tta_jax.methods.base import Method, SourceNeeds, check_step_input, register
from tta_jax.methods.common import repeated_updates

HEAD = "noise_contrastive"
# The official extractor (``get_part`` for layer 1): ResNet stem and first stage, by the ResUNet's
# torchvision names.
STEM_MODULES = ("conv1", "bn1")
LAYER1_PREFIX = "layer1_"


@dataclasses.dataclass(frozen=True)
class NCTTTHParams:
    """NC-TTT's test-time settings (the source-stage noise model is the head's: ``NC_*`` in
    :mod:`tta_jax.models.resunet`).

    Attributes:
      lr: learning rate (official ``--adapt-lr`` 1e-5).
      optimizer: ``adam`` (official ``--optim``) or plain ``sgd``. With its default iteration
        counts the official code rebuilds the optimiser from the source stage's ``--optimizer``
        (SGD by default) instead; the declared test-time optimiser is used here.
      steps: updates per image (official ``--niter`` 50 per batch; 1 here, the GraTa protocol).
      adapt: ``encoder`` (every parameter of the stem and layer1, official) or ``encoder_bn``
        (only their BN scale and bias).
      episodic: restart every image from the source weights and fresh optimiser moments, as the
        official code reloads them before each batch. Off by default: in the continual protocol
        of SPEGC's Table 1, which compares NC-TTT, the weights persist along the stream.
    """

    lr: float = bounded(1e-5, low=0.0)
    optimizer: Literal["adam", "sgd"] = "adam"
    steps: int = bounded(1, low=1)
    adapt: Literal["encoder", "encoder_bn"] = "encoder"
    episodic: bool = False


class NCTTTState(NamedTuple):
    adapted: Any        # the stem and layer1 (all parameters, or their BN scale/bias)
    frozen: Any         # every other parameter: decoder, segmentation head, projector, discriminator
    batch_stats: Any    # the source running statistics (never change: every forward uses the image's)
    opt_state: Any
    source: Any         # the source values of ``adapted`` when episodic, else None


def _in_encoder(path) -> bool:
    return path[0] in STEM_MODULES or path[0].startswith(LAYER1_PREFIX)


def split_encoder(params, batch_stats, bn_only: bool):
    """(the stem and layer1's parameters, or only their BN scale/bias; everything else)."""
    if bn_only:
        candidates, rest = split_bn_params(params, batch_stats)
    else:
        candidates, rest = params, {}
    flat = traverse_util.flatten_dict(candidates)
    adapted = {k: v for k, v in flat.items() if _in_encoder(k)}
    if not adapted:
        raise ValueError(f"nc_ttt adapts the stem ({', '.join(STEM_MODULES)}) and layer1 ({LAYER1_PREFIX}*); "
                         f"the model has none of them")
    frozen = merge_params(rest, traverse_util.unflatten_dict({k: v for k, v in flat.items() if not _in_encoder(k)}))
    return traverse_util.unflatten_dict(adapted), frozen


@register("nc_ttt", NCTTTHParams, needs=lambda hp: SourceNeeds(aux_heads=(HEAD,)))
def make(model, hp: NCTTTHParams) -> Method:
    if HEAD not in getattr(model, "aux_heads", ()):
        raise ValueError(f"nc_ttt needs the model's {HEAD!r} head: add it to model.aux_heads and train the "
                         f"source model with it")
    optimizer = optax.adam(hp.lr) if hp.optimizer == "adam" else optax.sgd(hp.lr)

    def nc_loss(adapted, state, images):
        # Train mode (the image's statistics), like the official adaptation forward.
        _, branches = forward_test_stats(model, merge_params(adapted, state.frozen), state.batch_stats, images,
                                         return_aux=True)
        return noise_contrastive_test_loss(branches[HEAD]["logits"])

    def init(variables, rng):
        del rng
        adapted, frozen = split_encoder(variables["params"], variables["batch_stats"], hp.adapt == "encoder_bn")
        return NCTTTState(adapted, frozen, variables["batch_stats"], optimizer.init(adapted),
                          adapted if hp.episodic else None)

    def step(state, images, rng):
        del rng
        check_step_input(images)
        if hp.episodic:
            state = state._replace(adapted=state.source, opt_state=optimizer.init(state.source))

        new_state, loss, skipped = repeated_updates(
            lambda adapted, st: nc_loss(adapted, st, images), optimizer, state, "adapted", hp.steps)
        # The official prediction (eval mode) uses running statistics its train-mode iterations moved
        # ≈ all the way to the batch's; the image's own statistics directly here (module docstring).
        logits = forward_test_stats(model, merge_params(new_state.adapted, new_state.frozen),
                                    new_state.batch_stats, images)
        return new_state, logits, {"loss": loss, "skipped": skipped}

    return Method("nc_ttt", init, step, stream_axes=NCTTTState(adapted=0, frozen=None, batch_stats=None,
                                                              opt_state=0, source=None))
