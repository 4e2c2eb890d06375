"""Adversarial source training with a re-usable mask discriminator (Valvano et al. §3.1–3.2; DESIGN.md §4).

Segmentor Σ (the project's ResUNet, sigmoid channels) and discriminator Δ
(:class:`tta_jax.models.MaskDiscriminator`) are trained alternately, one step
each per iteration:

* Σ: weighted cross-entropy on a labelled batch (Eq. 1,
  :func:`weighted_cross_entropy`) + ``adv_weight`` × the LSGAN generator term
  ½E[(Δ(Σ(x)) − c)²] on a batch of (unpaired) images, ``c = 0`` as in Eq. 2;
* Δ: LSGAN with labels +1 for real masks, −1 for predicted masks and −1 for
  **fake anchors** (:func:`fake_anchors`) until the end of training (Eq. 2 plus
  the anchors of §3.1); every Δ input is augmented
  (:func:`discriminator_augment`: rotation in [0, π/2], translation ≤ 10 %,
  instance noise N(0, 0.1)).

Masks fed to Δ are per-channel probabilities (sigmoid of Σ's logits, or the
binary labels). Semi-supervised option: ``labelled_fraction`` < 1 keeps labels
for the first part of the training set only; the rest serves as unpaired
images (generator term) and unpaired masks (real examples for Δ), as in the
paper. Losses of both networks and Δ's mean scores on real, predicted and
anchor masks are logged per epoch, so that memorisation (real ≫ predicted,
anchors) or collapse (all scores equal) can be seen.

Decisions: Σ's learning rate comes from ``source.lr`` (the paper's Adam 1e-4
is the ``paper`` setting; CPU runs use 1e-3 with cosine decay), Δ uses Adam
``disc_lr`` 1e-4; ``adv_weight`` 0.1 (not given in the paper).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from tta_jax.augment import source_augment
from tta_jax.hparams import as_dict, bounded
from tta_jax.losses import lsgan_discriminator_loss, lsgan_generator_loss
from tta_jax.models.discriminator import MaskDiscriminator, parse_strides
from tta_jax.source.training import make_optimizer


@dataclasses.dataclass(frozen=True)
class AdversarialHParams:
    """The adversarial source stage (config ``adversarial.*``): Δ's architecture and training.

    Attributes:
      disc_width, disc_strides: Δ's channel multiplier and per-layer strides
        (comma-separated; the paper's 2,2,1,1,1).
      disc_lr: Δ's Adam learning rate.
      smoothness: Δ with spectral normalisation and tanh (§3.1, #1 of the ablation).
      fake_anchors: Δ also learns corrupted real masks as fake (§3.1, #2 of the ablation).
      adv_weight, generator_target: the generator term's weight and label c.
      labelled_fraction: < 1 for the semi-supervised stage.
      anchor_patch, anchor_swaps, anchor_noise: the fake anchors.
      translate, max_angle, instance_noise: Δ's input augmentation.
    """

    disc_width: float = bounded(0.25, low=0.0, low_open=True)
    disc_strides: str = "2,2,1,1,1"
    disc_lr: float = bounded(1e-4, low=0.0)
    smoothness: bool = True
    fake_anchors: bool = True
    adv_weight: float = bounded(0.1, low=0.0)
    generator_target: float = 0.0
    labelled_fraction: float = bounded(1.0, low=0.0, high=1.0, low_open=True)
    anchor_patch: float = bounded(0.1, low=0.0, high=1.0)
    anchor_swaps: int = bounded(3, low=0)
    anchor_noise: float = bounded(0.02, low=0.0, high=1.0)
    translate: float = bounded(0.1, low=0.0, high=1.0)
    max_angle: float = bounded(math.pi / 2, low=0.0)
    instance_noise: float = bounded(0.1, low=0.0)

    def discriminator(self) -> MaskDiscriminator:
        return MaskDiscriminator(self.disc_width, parse_strides(self.disc_strides), smooth=self.smoothness)


def weighted_cross_entropy(logits, masks):
    """Eq. 1 for sigmoid channels: −Σ_i w_i y_i log ỹ_i with w_i = 1 − n_i/n_tot per channel and class.

    Each channel is a two-class problem (foreground, background); ``n_i``
    counts the batch's pixels of class ``i`` in that channel, so the rarer class
    weighs more. Mean over pixels, summed over channels.
    """
    axes = tuple(range(masks.ndim - 1))
    frac_fg = jnp.mean(masks, axis=axes)
    w_fg, w_bg = 1.0 - frac_fg, frac_fg
    ce = -(w_fg * masks * jax.nn.log_sigmoid(logits) + w_bg * (1 - masks) * jax.nn.log_sigmoid(-logits))
    return jnp.sum(jnp.mean(ce, axis=axes))


def fake_anchors(key, mask, patch_fraction: float = 0.1, swaps: int = 3, noise: float = 0.02):
    """A corrupted copy of one real mask ``[H, W, C]`` (§3.1 "fake anchors").

    ``swaps`` times, two square patches of side ``patch_fraction · H`` at random
    places exchange their contents (the later swap wins where patches overlap);
    then each pixel of each channel is flipped with probability ``noise``
    (binary noise).
    """
    h, w = mask.shape[:2]
    side = max(1, int(round(patch_fraction * h)))
    out = mask
    for k in jax.random.split(key, swaps + 1)[:-1]:
        ka, kb = jax.random.split(k)
        ya, xa = jax.random.randint(ka, (2,), 0, jnp.array([h - side + 1, w - side + 1]))
        yb, xb = jax.random.randint(kb, (2,), 0, jnp.array([h - side + 1, w - side + 1]))
        pa = jax.lax.dynamic_slice(out, (ya, xa, 0), (side, side, mask.shape[2]))
        pb = jax.lax.dynamic_slice(out, (yb, xb, 0), (side, side, mask.shape[2]))
        out = jax.lax.dynamic_update_slice(out, pb, (ya, xa, 0))
        out = jax.lax.dynamic_update_slice(out, pa, (yb, xb, 0))
    flip = jax.random.bernoulli(jax.random.split(key, swaps + 1)[-1], noise, mask.shape)
    return jnp.where(flip, 1.0 - out, out)


def discriminator_augment(key, mask, translate: float = 0.1, max_angle: float = math.pi / 2,
                          noise_std: float = 0.1):
    """Roto-translation (angle in [0, max_angle], shift ≤ ``translate`` of the side) + instance noise.

    Bilinear resampling about the centre, zero outside; ``mask`` is ``[H, W, C]``.
    """
    k_angle, k_shift, k_noise = jax.random.split(key, 3)
    h, w, c = mask.shape
    angle = jax.random.uniform(k_angle, (), minval=0.0, maxval=max_angle)
    shift = jax.random.uniform(k_shift, (2,), minval=-translate, maxval=translate) * jnp.array([h, w])
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    cy, cx = (h - 1) / 2, (w - 1) / 2
    # Output pixel p takes the input at R⁻¹(p − centre − shift) + centre.
    dy, dx = yy - cy - shift[0], xx - cx - shift[1]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    src_y, src_x = cos * dy + sin * dx + cy, -sin * dy + cos * dx + cx
    warp = lambda ch: jax.scipy.ndimage.map_coordinates(ch, [src_y, src_x], order=1, mode="constant", cval=0.0)
    out = jnp.stack([warp(mask[..., i]) for i in range(c)], axis=-1)
    return out + noise_std * jax.random.normal(k_noise, out.shape)


class AdversarialState(NamedTuple):
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    disc: dict            # {"params", "batch_stats"} of Δ (batch_stats: spectral-norm u and σ)
    disc_opt_state: optax.OptState


def train_adversarial_source(model, discriminator, variables, disc_variables, images, masks, rng, *, steps: int,
                             batch_size: int = 8, lr: float = 1e-3, optimizer: str = "adam",
                             photometric: float = 0.2, hp: AdversarialHParams = AdversarialHParams(),
                             steps_per_epoch: int = 50):
    """Alternate Σ and Δ steps for ``steps`` iterations; returns (variables with ``discriminator``, epoch log)."""
    hp = as_dict(hp)
    n = len(images)
    if n == 0:
        raise ValueError("source training set is empty")
    n_lab = max(1, int(round(hp["labelled_fraction"] * n)))
    lab_x, lab_y = jnp.asarray(images[:n_lab]), jnp.asarray(masks[:n_lab], jnp.float32)
    # Unpaired pools: everything when fully supervised, else the unlabelled remainder.
    unp_x = jnp.asarray(images[n_lab:] if n_lab < n else images)
    unp_y = jnp.asarray(masks[n_lab:] if n_lab < n else masks, jnp.float32)
    tx, dtx = make_optimizer(optimizer, lr, steps), optax.adam(hp["disc_lr"])
    state = AdversarialState(variables["params"], variables["batch_stats"], tx.init(variables["params"]),
                             disc_variables, dtx.init(disc_variables["params"]))

    def augment_batch(key, x, y):
        return jax.vmap(lambda k, a, b: source_augment(k, a, b, photometric))(jax.random.split(key, x.shape[0]), x, y)

    def disc_scores(disc_params, disc_stats, m, update):
        out, upd = discriminator.apply({"params": disc_params, "batch_stats": disc_stats}, m,
                                       update_stats=update, mutable=["batch_stats"])
        return out, upd["batch_stats"]

    @jax.jit
    def train_step(state, key):
        ks = jax.random.split(key, 8)
        i_lab = jax.random.randint(ks[0], (batch_size,), 0, lab_x.shape[0])
        i_unp = jax.random.randint(ks[1], (batch_size,), 0, unp_x.shape[0])
        i_real = jax.random.randint(ks[2], (batch_size,), 0, unp_y.shape[0])
        x_l, y_l = augment_batch(ks[3], lab_x[i_lab], lab_y[i_lab])
        x_u, _ = augment_batch(ks[4], unp_x[i_unp], unp_y[i_unp])
        _, y_r = augment_batch(ks[5], unp_x[i_real], unp_y[i_real])

        def seg_loss(params):
            v = {"params": params, "batch_stats": state.batch_stats}
            logits, upd = model.apply(v, jnp.concatenate([x_l, x_u]), train=True, mutable=["batch_stats"])
            sup = weighted_cross_entropy(logits[:batch_size], y_l)
            fake = jax.nn.sigmoid(logits[batch_size:])
            scores, _ = disc_scores(state.disc["params"], state.disc["batch_stats"], fake, False)
            gen = lsgan_generator_loss(scores, hp["generator_target"])
            return sup + hp["adv_weight"] * gen, (upd["batch_stats"], sup, gen, jax.lax.stop_gradient(fake))

        (_, (batch_stats, sup, gen, fake)), grads = jax.value_and_grad(seg_loss, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        anchors = jax.vmap(lambda k, m: fake_anchors(k, m, hp["anchor_patch"], int(hp["anchor_swaps"]),
                                                     hp["anchor_noise"]))(jax.random.split(ks[6], batch_size), y_r)
        aug = lambda k, m: jax.vmap(lambda kk, mm: discriminator_augment(
            kk, mm, hp["translate"], hp["max_angle"], hp["instance_noise"]))(jax.random.split(k, m.shape[0]), m)
        kr, kf, ka = jax.random.split(ks[7], 3)
        d_in = jnp.concatenate([aug(kr, y_r), aug(kf, fake), aug(ka, anchors)])

        def disc_loss(dparams):
            scores, stats = disc_scores(dparams, state.disc["batch_stats"], d_in, True)
            s_real, s_fake, s_anchor = jnp.split(scores, 3)
            loss = lsgan_discriminator_loss(s_real, s_fake, s_anchor if hp["fake_anchors"] else None)
            return loss, (stats, s_real, s_fake, s_anchor)

        (d_loss, (dstats, s_real, s_fake, s_anchor)), dgrads = jax.value_and_grad(disc_loss, has_aux=True)(
            state.disc["params"])
        dupdates, dopt = dtx.update(dgrads, state.disc_opt_state, state.disc["params"])
        disc = {"params": optax.apply_updates(state.disc["params"], dupdates), "batch_stats": dstats}
        logs = {"seg_wce": sup, "seg_adv": gen, "disc_loss": d_loss, "score_real": jnp.mean(s_real),
                "score_pred": jnp.mean(s_fake), "score_anchor": jnp.mean(s_anchor)}
        return AdversarialState(params, batch_stats, opt_state, disc, dopt), logs

    epochs, acc, start = [], [], time.perf_counter()
    for i in range(steps):
        state, logs = train_step(state, jax.random.fold_in(rng, i))
        acc.append(logs)
        if (i + 1) % steps_per_epoch == 0 or i + 1 == steps:
            mean = {k: float(np.mean([float(a[k]) for a in acc])) for k in acc[0]}
            if not all(np.isfinite(v) for v in mean.values()):
                raise FloatingPointError(f"adversarial source training diverged at step {i + 1}: {mean}")
            epochs.append({"step": i + 1, **mean})
            acc = []
            logging.info("adversarial source training: step %d/%d %s (%.1f steps/s)", i + 1, steps,
                         " ".join(f"{k} {v:.3f}" for k, v in mean.items()), (i + 1) / (time.perf_counter() - start))
    return {"params": state.params, "batch_stats": state.batch_stats, "discriminator": state.disc}, epochs
