"""The mask denoising autoencoder's source stage (Karani et al., 2021): learn the shape prior from the labels.

The DAE (:class:`tta_jax.models.MaskDAE`) sees only the source training
masks. Each step corrupts a batch of masks with Karani et al.'s "jigsaw"
noise (:func:`jigsaw_corrupt`) and trains the DAE to restore the clean
masks with their Dice loss over all labels
(:func:`tta_jax.losses.label_dice_loss`), Adam 1e-3 (the official
``learning_rate_l2l``). The official code trains 30 000 steps on 3-D volumes;
``steps`` here is sized for the CPU default (the loss is logged).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from tta_jax.hparams import bounded
from tta_jax.losses import label_dice_loss
from tta_jax.models.dae import MaskDAE


@dataclasses.dataclass(frozen=True)
class DAEHParams:
    """The DAE and its training (config ``dae.*``).

    Attributes:
      width: channel multiplier of the 16-32-64-128 filters.
      steps, batch_size, lr: Adam training on the source masks.
      box_radius: half-side of the largest corrupted box, as a fraction of the
        image side (official: 10 pixels of 256).
      max_boxes: the number of boxes is uniform in 1..max_boxes. The official
        code draws up to 200 boxes in a 64×256×256 volume; a box of half-side
        r spans 2r slices, so a slice crosses about 17 boxes on average: 32
        (mean 16.5) keeps that density in 2-D.
      seed: the initialisation and corruption RNG.
    """

    width: float = bounded(1.0, low=0.0, low_open=True)
    steps: int = bounded(1000, low=1)
    batch_size: int = bounded(8, low=1)
    lr: float = bounded(1e-3, low=0.0, low_open=True)
    box_radius: float = bounded(10 / 256, low=0.0, high=0.5, low_open=True)
    max_boxes: int = bounded(32, low=1)
    seed: int = 0

    def network(self) -> MaskDAE:
        return MaskDAE(self.width)


def jigsaw_corrupt(key, mask, box_radius: float = 10 / 256, max_boxes: int = 32):
    """Karani et al.'s "jigsaw" noise on one mask ``[H, W, C]``.

    ``n ~ U{1..max_boxes}`` boxes; box ``i`` has a half-side ``r ~ U{1..R}``
    (``R = max(1, round(box_radius · H))``), a centre ``c`` with
    ``r < c < H − r − 1`` on both axes, and takes the labels of the clean mask
    in a box of the same size at another random centre (the official
    ``make_noise_masks`` with ``mask_type='jigsaw'``; a later box wins where
    boxes overlap).
    """
    h, w = mask.shape[:2]
    radius = max(1, int(round(box_radius * h)))
    if h < 2 * radius + 3 or w < 2 * radius + 3:
        raise ValueError(f"jigsaw boxes of half-side {radius} do not fit a {h}×{w} mask")
    k_n, k_boxes = jax.random.split(key)
    n = jax.random.randint(k_n, (), 1, max_boxes + 1)
    ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]

    def one_box(i, out):
        k_r, k_dst, k_src = jax.random.split(jax.random.fold_in(k_boxes, i), 3)
        r = jax.random.randint(k_r, (), 1, radius + 1)
        low, high = r + 1, jnp.array([h, w]) - r - 1
        dst = jax.random.randint(k_dst, (2,), low, high)
        src = jax.random.randint(k_src, (2,), low, high)
        inside = ((ys >= dst[0] - r) & (ys < dst[0] + r) & (xs >= dst[1] - r) & (xs < dst[1] + r)) & (i < n)
        shift = inside.astype(jnp.int32)       # the source box lies inside the image: no clipping needed
        moved = mask[ys + (src[0] - dst[0]) * shift, xs + (src[1] - dst[1]) * shift]
        return jnp.where(inside[..., None], moved, out)

    return jax.lax.fori_loop(0, max_boxes, one_box, mask)


def train_dae(masks: np.ndarray, hp: DAEHParams, log_every: int = 200):
    """Train the DAE on ``masks`` ``[N, H, W, C]`` (binary); returns (variables, loss history)."""
    dae = hp.network()
    masks = jnp.asarray(masks, jnp.float32)
    key = jax.random.PRNGKey(hp.seed)
    init_key, key = jax.random.split(key)
    variables = jax.jit(lambda k: dae.init(k, masks[:1], train=False))(init_key)
    optimizer = optax.adam(hp.lr)
    opt_state = optimizer.init(variables["params"])

    @jax.jit
    def train_step(params, batch_stats, opt_state, key):
        k_batch, k_noise = jax.random.split(key)
        clean = masks[jax.random.randint(k_batch, (hp.batch_size,), 0, masks.shape[0])]
        noisy = jax.vmap(lambda k, m: jigsaw_corrupt(k, m, hp.box_radius, hp.max_boxes))(
            jax.random.split(k_noise, hp.batch_size), clean)

        def loss_fn(p):
            logits, updates = dae.apply({"params": p, "batch_stats": batch_stats}, noisy, train=True,
                                        mutable=["batch_stats"])
            return label_dice_loss(jax.nn.sigmoid(logits), clean), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    params, batch_stats, history = variables["params"], variables["batch_stats"], []
    for step in range(hp.steps):
        params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state,
                                                          jax.random.fold_in(key, step))
        if (step + 1) % log_every == 0 or step + 1 == hp.steps:
            history.append({"step": step + 1, "dice_loss": float(loss)})
            logging.info("DAE training: step %d/%d Dice loss %.4f", step + 1, hp.steps, float(loss))
    return {"params": params, "batch_stats": batch_stats}, history
