"""Image augmentations (pure functions of an explicit RNG key).

Source training uses :func:`source_augment`: random flips / 90° rotations
applied jointly to image and mask, and mild photometric jitter on the image.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def random_dihedral(key, image, mask):
    """One of the 8 flips/rotations of the square, the same for image and mask (``[H, W, C]``)."""
    k_rot, k_flip = jax.random.split(key)
    n_rot = jax.random.randint(k_rot, (), 0, 4)
    flip = jax.random.bernoulli(k_flip)

    def transform(x):
        x = jax.lax.switch(n_rot, [lambda a, r=r: jnp.rot90(a, r, axes=(0, 1)) for r in range(4)], x)
        return jnp.where(flip, x[:, ::-1], x)

    return transform(image), transform(mask)


def photometric_jitter(key, image, strength: float = 0.2):
    """Brightness, contrast and gamma jitter of a [0, 1] image, then re-clipped."""
    kb, kc, kg = jax.random.split(key, 3)
    b = jax.random.uniform(kb, (1, 1, image.shape[-1]), minval=1 - strength, maxval=1 + strength)
    c = jax.random.uniform(kc, (), minval=1 - strength, maxval=1 + strength)
    g = jnp.exp(jax.random.uniform(kg, (), minval=-strength, maxval=strength))
    mean = jnp.mean(image)
    x = jnp.clip((image * b - mean) * c + mean, 0.0, 1.0)
    return x ** g


def source_augment(key, image, mask, photometric: float = 0.2):
    """Augment one training pair (``[H, W, 3]``, ``[H, W, C]``)."""
    k1, k2 = jax.random.split(key)
    image, mask = random_dihedral(k1, image, mask)
    if photometric > 0:
        image = photometric_jitter(k2, image, photometric)
    return image, mask
