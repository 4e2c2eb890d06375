"""Segmentation metrics, per image and channel, as the papers compute them."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

DICE_EPS = 1e-6


def dice_per_channel(logits, masks, threshold: float = 0.5):
    """Official GraTa/VPTTA Dice ×100 per image and channel.

    ``P = sigmoid(logits) > threshold``;
    ``Dice = (2|P∩G| + 1e-6) / (|P| + |G| + 1e-6) × 100``, so an empty
    prediction of an empty mask scores 100 and any miss of an empty mask 0.

    Args:
      logits: ``[N, H, W, C]``. masks: ``[N, H, W, C]`` in {0, 1}.
    Returns:
      ``[N, C]`` Dice in [0, 100].
    """
    if logits.shape != masks.shape:
        raise ValueError(f"dice: logits {logits.shape} and masks {masks.shape} differ in shape")
    # sigmoid(x) > t  ⇔  x > logit(t); avoids saturating the sigmoid.
    cut = float(np.log(threshold / (1 - threshold)))
    pred = (logits > cut).astype(jnp.float32)
    gt = masks.astype(jnp.float32)
    inter = jnp.sum(pred * gt, axis=(1, 2))
    total = jnp.sum(pred, axis=(1, 2)) + jnp.sum(gt, axis=(1, 2))
    return (2 * inter + DICE_EPS) / (total + DICE_EPS) * 100.0


def domain_summary(dice: np.ndarray, channel_names) -> dict:
    """Mean Dice per channel over the images of one domain, and their channel mean.

    For fundus this gives ``disc``, ``cup`` and ``mean`` = (disc + cup)/2, the
    number the GraTa tables report per target.
    """
    dice = np.asarray(dice, dtype=np.float64)
    out = {name: float(dice[:, i].mean()) for i, name in enumerate(channel_names)}
    out["mean"] = float(dice.mean())
    return out
