"""Self-supervised auxiliary objectives of GraTa's Table 5 (shared by source training and GraTa).

Each objective transforms the input, forwards the network with its auxiliary
branches and scores the branch output (paper: "cross-entropy for rotation
prediction, mean-square error for the others"):

* ``reconstruction`` — MSE(sigmoid(branch(x)), x);
* ``denoising`` — MSE(sigmoid(branch(x + n)), x), n ~ N(0, σ²) (σ = 1 in the
  paper, 0.1 in the official code; ``denoise_std``);
* ``super_resolution`` — MSE(sigmoid(branch(down(x))), x), ``down`` = bilinear
  (align corners) by ``model.sr_factor`` (×4 in the paper, ×2 in the code);
* ``rotation`` — cross-entropy of the 6-way prediction of which of the views
  (h-flip, v-flip, 90°, 180°, 270°, identity; the official label order) was applied;
* ``blind_spot`` — DeTTA's (Wen et al., WACV 2024) Noise2Void-style task: about
  10 % of the pixels replaced by a random neighbour in their 5×5 window
  (:func:`blind_spot_input`), L1 between sigmoid(branch(x̃)) and x on those pixels;
* ``noise_contrastive`` — NC-TTT's (Osowiechi et al., CVPR 2024) discrimination of noisy views of
  projected features: the noise is drawn in feature space by the branch
  (:class:`tta_jax.models.resunet.NoiseContrastiveHead`, RNG stream ``"noise_contrastive"``), and
  :func:`noise_contrastive_loss` is the binary cross-entropy against each view's posterior
  probability of the larger noise. Its test-time objective is
  :func:`noise_contrastive_test_loss` (used by ``tta_jax.methods.nc_ttt``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tta_jax.augment import WEAK_VIEWS
from tta_jax.models.resunet import (AUX_HEADS, NC_NOISE_RNG, NC_SIGMA_IN, NC_SIGMA_OUT,
                                    resize_bilinear_align_corners)

# Official label order: 0 h-flip, 1 v-flip, 2 rot90, 3 rot180, 4 rot270, 5 identity.
ROTATION_VIEWS = tuple(view for _, view, _ in WEAK_VIEWS[1:]) + (WEAK_VIEWS[0][1],)


def rotate_batch(key, images):
    """Apply a random one of the 6 views to each image; returns (views, labels)."""
    labels = jax.random.randint(key, (images.shape[0],), 0, len(ROTATION_VIEWS))
    views = jax.vmap(lambda x, r: jax.lax.switch(r, [lambda a, f=f: f(a[None])[0] for f in ROTATION_VIEWS], x))(
        images, labels)
    return views, labels


BLIND_SPOT_FRACTION = 0.1   # official: ratio 0.9 of the pixels kept
BLIND_SPOT_WINDOW = 5


def blind_spot_input(key, images, fraction: float = BLIND_SPOT_FRACTION, window: int = BLIND_SPOT_WINDOW):
    """(masked images, mask): each pixel, with probability ``fraction``, takes the value (all
    channels) of a random other pixel of its ``window``×``window`` neighbourhood (clipped at the
    border); ``mask`` ``[B, H, W, 1]`` is 1 where a pixel was replaced."""
    b, h, w, _ = images.shape
    k_mask, k_cell = jax.random.split(key)
    half = window // 2
    mask = jax.random.bernoulli(k_mask, fraction, (b, h, w))
    # an offset in the window other than (0, 0): draw among window² − 1 cells and skip the centre
    cell = jax.random.randint(k_cell, (b, h, w), 0, window * window - 1)
    cell = cell + (cell >= (window * window) // 2)
    dy, dx = cell // window - half, cell % window - half
    ys = jnp.clip(jnp.arange(h)[None, :, None] + dy, 0, h - 1)
    xs = jnp.clip(jnp.arange(w)[None, None, :] + dx, 0, w - 1)
    neighbours = images[jnp.arange(b)[:, None, None], ys, xs]
    masked = jnp.where(mask[..., None], neighbours, images)
    return masked, mask[..., None].astype(images.dtype)


def blind_spot_loss(branch_output, images, mask):
    """DeTTA's loss: mean over all pixels of |(sigmoid(output) − x) · mask| (L1 of the masked products)."""
    return jnp.mean(jnp.abs((jax.nn.sigmoid(branch_output) - images) * mask))


# Posteriors under this are set to 0, as the official code does.
NC_TARGET_FLOOR = 1e-6


def noise_contrastive_targets(noise, sigma_in: float = NC_SIGMA_IN, sigma_out: float = NC_SIGMA_OUT):
    """P(out | n) per pixel of ``noise`` [..., E], equal priors on the two isotropic Gaussians:
    sigmoid(½(σ_in⁻² − σ_out⁻²)‖n‖² − E·log(σ_out/σ_in)); values under :data:`NC_TARGET_FLOOR` are 0."""
    dims = noise.shape[-1]
    log_ratio = (0.5 * (sigma_in ** -2 - sigma_out ** -2) * jnp.sum(noise * noise, axis=-1)
                 - dims * jnp.log(sigma_out / sigma_in))
    target = jax.nn.sigmoid(log_ratio)
    return jnp.where(target < NC_TARGET_FLOOR, 0.0, target)


def noise_contrastive_loss(logits, noise, sigma_in: float = NC_SIGMA_IN, sigma_out: float = NC_SIGMA_OUT):
    """NC-TTT's source objective: mean over views, images and pixels of BCE(sigmoid(logits), P(out | n)).

    ``logits`` [V, B, h, w] and ``noise`` [V, B, h, w, E] are the ``noise_contrastive`` branch's output.
    """
    targets = noise_contrastive_targets(noise, sigma_in, sigma_out)
    return jnp.mean(jax.nn.softplus(logits) - targets * logits)


def noise_contrastive_test_loss(logits):
    """NC-TTT's test-time objective: mean of −log(1 − sigmoid(logits)) = softplus(logits) over the
    clean projection's pixels: the cross-entropy that labels them in-distribution."""
    return jnp.mean(jax.nn.softplus(logits))


def auxiliary_input(name: str, key, images, sr_factor: int = 4, denoise_std: float = 1.0):
    """The transformed input of an auxiliary objective (and the rotation labels, else None)."""
    if name == "reconstruction":
        return images, None
    if name == "denoising":
        return images + denoise_std * jax.random.normal(key, images.shape, images.dtype), None
    if name == "super_resolution":
        h, w = images.shape[1] // sr_factor, images.shape[2] // sr_factor
        if h % 32 or w % 32:
            raise ValueError(f"super_resolution needs image sides divisible by 32·{sr_factor} "
                             f"(the downsampled input goes through the ResUNet), got {images.shape[1:3]}")
        return resize_bilinear_align_corners(images, h, w), None
    if name == "rotation":
        return rotate_batch(key, images)
    if name == "blind_spot":
        return blind_spot_input(key, images)
    if name == "noise_contrastive":   # the noise is added to the projected features, in the branch
        return images, None
    raise ValueError(f"unknown auxiliary objective {name!r}; choose from {list(AUX_HEADS)}")


def auxiliary_loss(name: str, branch_output, images, labels=None):
    """Score an auxiliary branch output against its self-supervised target."""
    if name == "rotation":
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(branch_output, labels))
    if name == "blind_spot":
        return blind_spot_loss(branch_output, images, labels)
    if name == "noise_contrastive":
        return noise_contrastive_loss(branch_output["logits"], branch_output["noise"])
    return jnp.mean((jax.nn.sigmoid(branch_output) - images) ** 2)


def auxiliary_objective(name: str, forward, key, images, sr_factor: int = 4, denoise_std: float = 1.0):
    """Loss of objective ``name``; ``forward(x, **apply_options) -> (logits, {branch: output})``.

    ``noise_contrastive`` calls ``forward(x, rngs={"noise_contrastive": key})``: its branch draws
    the noise (the other objectives call ``forward(x)``).
    """
    inputs, labels = auxiliary_input(name, key, images, sr_factor, denoise_std)
    options = {"rngs": {NC_NOISE_RNG: key}} if name == "noise_contrastive" else {}
    _, branches = forward(inputs, **options)
    if name not in branches:
        raise ValueError(f"objective {name!r} needs the model's {name!r} branch: set model.aux_heads "
                         f"(and train the source model with it)")
    return auxiliary_loss(name, branches[name], images, labels)
