"""Adapt one stream of your own arrays with any registered method, on your own segmentor.

The model protocol (what :mod:`tta_jax.bn` and the methods rely on): a Flax
module whose ``apply(variables, images, train=...)`` maps ``[B, H, W, 3]``
float images to ``[B, H, W, C]`` logits of sigmoid channels, with BatchNorm
layers that keep running statistics in the ``batch_stats`` collection and use
them when ``train=False`` (``nn.BatchNorm(use_running_average=not train)``).
That suffices for ``no_adapt``, ``bn``, ``tent`` and ``grata`` with its
default objectives. SPEGC also calls ``return_features=True`` (returns
``(logits, features)``) and ``bottleneck_dropout=rate`` with a ``dropout``
RNG; GraTa's self-supervised objectives need ``return_aux=True`` and the
``aux_heads``/``sr_factor`` attributes of :class:`tta_jax.models.ResUNet`.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import numpy as np

from tta_jax.data.base import check_image_batch
from tta_jax.methods import make_method
from tta_jax.runner import StreamRunner


class AdaptedStream(NamedTuple):
    """Per-image outputs, in stream order."""

    probabilities: np.ndarray        # [N, H, W, C] float32, the adapted model's sigmoid outputs
    predictions: np.ndarray          # [N, H, W, C] bool, probability > 0.5
    info: dict[str, np.ndarray]      # the method's per-image scalars (losses, η, skipped steps, ...)
    dice: np.ndarray | None          # [N, C] ×100 if masks were given
    state: Any                       # the method's state after the last image


def adapt_stream(method: str, model, variables, images, *, masks=None, hparams: Mapping[str, Any] | None = None,
                 seed: int = 0, state=None, **companions) -> AdaptedStream:
    """Adapt-then-predict ``method`` over ``images`` one at a time (batch size 1), state carried on.

    Args:
      method: a registered method name (:func:`tta_jax.methods.available_methods`).
      model: the segmentor (see the module docstring for the protocol).
      variables: its ``{"params", "batch_stats"}`` (plus companions' variables, e.g. ``discriminator``).
      images: ``[N, H, W, 3]`` floats.
      masks: optional ``[N, H, W, C]`` binary ground truth, used only to score the predictions.
      hparams: the method's hyperparameters (missing keys take the defaults; typos raise).
      seed: the adaptation RNG seed (augmentations, dropout).
      state: continue from a previous call's ``state`` instead of a fresh one.
      companions: networks the method needs from the source stage (adv_ttt: ``discriminator``).
    """
    images = np.asarray(images, np.float32)
    check_image_batch(images)
    m = make_method(method, model, hparams, **companions)
    key = jax.random.PRNGKey(seed)
    init_key, stream_key = jax.random.split(key)
    if state is None:
        state = m.init(variables, init_key)
    scored = masks is not None
    # without masks the runner scores against empty ones (as many channels as the logits); that Dice is dropped
    if scored:
        labels = np.asarray(masks)
    else:
        logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images[:1])
        labels = np.zeros((*images.shape[:3], logits.shape[-1]), np.uint8)
    if scored and labels.shape[:3] != images.shape[:3]:
        raise ValueError(f"masks {labels.shape} do not match images {images.shape}")
    runner = StreamRunner(m, "python", keep_predictions=True, probabilities_u8=False)
    state, scores = runner.run_stream(state, images, labels, stream_key)
    preds = scores["predictions"]
    return AdaptedStream(preds["prob"], preds["pred"], scores["info"], scores["dice"] if scored else None, state)
