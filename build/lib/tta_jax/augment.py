"""Image augmentations (pure functions of an explicit RNG key).

Source training uses :func:`source_augment`: random flips / 90° rotations
applied jointly to image and mask, and mild photometric jitter on the image.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tta_jax.hparams import bounded


def random_dihedral(key, image, mask):
    """One of the 8 flips/rotations of the square, the same for image and mask (``[H, W, C]``)."""
    k_rot, k_flip = jax.random.split(key)
    n_rot = jax.random.randint(k_rot, (), 0, 4)
    flip = jax.random.bernoulli(k_flip)

    def transform(x):
        x = jax.lax.switch(n_rot, [lambda a, r=r: jnp.rot90(a, r, axes=(0, 1)) for r in range(4)], x)
        return jnp.where(flip, x[:, ::-1], x)

    return transform(image), transform(mask)


def crop_flip_rotate_views(key, image, copies: int, padding: int):
    """``copies`` random views of one ``[H, W, C]`` image: zero-padded random crop, horizontal
    flip (p 0.5), rotation by a random multiple of 90° (of 180° when the image is not square).

    DUA's augmentation (Mirza et al., CVPR 2022: RandomCrop with padding, RandomHorizontalFlip,
    then a random 0/90/180/270° rotation per copy). Returns ``[copies, H, W, C]``.
    """
    h, w = image.shape[:2]
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    turns = 4 if h == w else 2

    def view(k):
        k_y, k_x, k_flip, k_rot = jax.random.split(k, 4)
        y = jax.random.randint(k_y, (), 0, 2 * padding + 1)
        x = jax.random.randint(k_x, (), 0, 2 * padding + 1)
        v = jax.lax.dynamic_slice(padded, (y, x, 0), (h, w, image.shape[2]))
        v = jnp.where(jax.random.bernoulli(k_flip), v[:, ::-1], v)
        n_rot = jax.random.randint(k_rot, (), 0, turns) * (4 // turns)
        return jax.lax.switch(n_rot, [lambda a, r=r: jnp.rot90(a, r, axes=(0, 1)) for r in range(4)], v)

    return jax.vmap(view)(jax.random.split(key, copies))


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


# --- GraTa's weak views (teacher) -------------------------------------------------
# Images are NHWC: H is axis 1, W is axis 2.  The six views of the official
# code and their exact inverses (identity, horizontal flip, vertical flip,
# flip+transpose (90°), 180° rotation, transpose+flip (270°)).

def _flip_w(x):
    return jnp.flip(x, axis=2)


def _flip_h(x):
    return jnp.flip(x, axis=1)


def _transpose_hw(x):
    return jnp.swapaxes(x, 1, 2)


WEAK_VIEWS = (
    ("identity", lambda x: x, lambda y: y),
    ("flip_horizontal", _flip_w, _flip_w),
    ("flip_vertical", _flip_h, _flip_h),
    ("rotate_90", lambda x: _transpose_hw(_flip_w(x)), lambda y: _flip_w(_transpose_hw(y))),
    ("rotate_180", lambda x: _flip_h(_flip_w(x)), lambda y: _flip_h(_flip_w(y))),
    ("rotate_270", lambda x: _flip_w(_transpose_hw(x)), lambda y: _transpose_hw(_flip_w(y))),
)


def weak_views(images):
    """The 6 weak views of a ``[B, H, W, C]`` batch, stacked: ``[6, B, H, W, C]`` (square images)."""
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"weak views rotate by 90°, which needs square images, got {images.shape[1:3]}")
    return jnp.stack([view(images) for _, view, _ in WEAK_VIEWS])


def invert_weak_views(predictions):
    """Map ``[6, B, H, W, C]`` predictions of :func:`weak_views` back to the original frame."""
    return jnp.stack([inverse(predictions[i]) for i, (_, _, inverse) in enumerate(WEAK_VIEWS)])


# --- GraTa's strong view (student): batchgenerators semantics ---------------------

@dataclasses.dataclass(frozen=True)
class StrongViewProbabilities:
    """The probability of each op of :func:`strong_augment` (0 switches it off)."""

    p_brightness: float = bounded(0.75, low=0.0, high=1.0)
    p_contrast: float = bounded(0.75, low=0.0, high=1.0)
    p_gamma: float = bounded(0.75, low=0.0, high=1.0)
    p_noise: float = bounded(0.5, low=0.0, high=1.0)
    p_blur: float = bounded(0.5, low=0.0, high=1.0)
    p_blur_channel: float = bounded(0.5, low=0.0, high=1.0)


# every option of strong_augment: the probabilities above and the ranges they sample from
STRONG_DEFAULTS = dict(
    **dataclasses.asdict(StrongViewProbabilities()),
    brightness_range=(0.5, 1.5), contrast_range=(0.5, 1.5), gamma_range=(0.5, 2.0),
    noise_std_max=0.05, blur_sigma_range=(0.5, 1.5),
)


def _two_sided(key, lo, hi, shape=()):
    """batchgenerators' range sampling around 1: U(lo, 1) or U(1, hi), with ½ each."""
    k_side, k_low, k_high = jax.random.split(key, 3)
    low = jax.random.uniform(k_low, shape, minval=lo, maxval=1.0)
    high = jax.random.uniform(k_high, shape, minval=1.0, maxval=hi)
    return jnp.where(jax.random.bernoulli(k_side, 0.5, shape), low, high)


def _gaussian_kernel_1d(sigma, radius: int):
    x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    k = jnp.exp(-0.5 * (x / sigma) ** 2)
    return k / jnp.sum(k)


def _blur_channel(img, sigma, radius: int):
    """Separable Gaussian blur of one ``[H, W]`` channel, 'reflect' borders as in scipy."""
    k = _gaussian_kernel_1d(sigma, radius)
    padded = jnp.pad(img, radius, mode="symmetric")
    rows = jax.vmap(lambda r: jnp.convolve(r, k, mode="valid"))(padded)
    return jax.vmap(lambda c: jnp.convolve(c, k, mode="valid"), in_axes=1, out_axes=1)(rows)


def strong_augment(key, image, **overrides):
    """GraTa's strong view of one ``[H, W, C]`` image in [0, 1] (DESIGN.md §2).

    In order, each with its own probability (set any ``p_*`` to 0 to switch
    the op off; all off gives back the min-max normalised input):

    1. brightness: ×U(0.5, 1.5) per channel (p 0.75);
    2. contrast: per channel, factor U(0.5, 1) or U(1, 1.5) (½ each),
       ``(x − mean)·f + mean`` clipped to the channel's original range (p 0.75);
    3. gamma: per channel, γ from U(0.5, 1) or U(1, 2) (½ each), applied to
       the inverted image and inverted back, range preserved (p 0.75);
    4. Gaussian noise with std ~ U(0, 0.05) (p 0.5);
    5. Gaussian blur, σ ~ U(0.5, 1.5) per channel (channel p 0.5, sample p 0.5);
    6. per-sample min-max to [0, 1].
    """
    cfg = {**STRONG_DEFAULTS, **overrides}
    unknown = set(overrides) - set(STRONG_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown strong-augmentation options {sorted(unknown)}; known: {sorted(STRONG_DEFAULTS)}")
    c = image.shape[-1]
    keys = jax.random.split(key, 12)
    x = image

    # 1. multiplicative brightness, per channel
    mult = jax.random.uniform(keys[0], (c,), minval=cfg["brightness_range"][0], maxval=cfg["brightness_range"][1])
    x = jnp.where(jax.random.bernoulli(keys[1], cfg["p_brightness"]), x * mult, x)

    # 2. contrast, per channel, original range preserved
    f = _two_sided(keys[2], *cfg["contrast_range"], shape=(c,))
    mean = jnp.mean(x, axis=(0, 1))
    lo, hi = jnp.min(x, axis=(0, 1)), jnp.max(x, axis=(0, 1))
    contrasted = jnp.clip((x - mean) * f + mean, lo, hi)
    x = jnp.where(jax.random.bernoulli(keys[3], cfg["p_contrast"]), contrasted, x)

    # 3. gamma on the inverted image, per channel
    g = _two_sided(keys[4], *cfg["gamma_range"], shape=(c,))
    inv = -x
    lo, hi = jnp.min(inv, axis=(0, 1)), jnp.max(inv, axis=(0, 1))
    rng = hi - lo
    gamma_x = -((((inv - lo) / (rng + 1e-7)) ** g) * rng + lo)
    x = jnp.where(jax.random.bernoulli(keys[5], cfg["p_gamma"]), gamma_x, x)

    # 4. additive Gaussian noise
    std = jax.random.uniform(keys[6], (), minval=0.0, maxval=cfg["noise_std_max"])
    noisy = x + std * jax.random.normal(keys[7], x.shape)
    x = jnp.where(jax.random.bernoulli(keys[8], cfg["p_noise"]), noisy, x)

    # 5. Gaussian blur, per channel
    s_lo, s_hi = cfg["blur_sigma_range"]
    radius = int(4 * s_hi + 0.5)
    sigmas = jax.random.uniform(keys[9], (c,), minval=s_lo, maxval=s_hi)
    blurred = jax.vmap(lambda ch, s: _blur_channel(ch, s, radius), in_axes=(2, 0), out_axes=2)(x, sigmas)
    blur_channel = jax.random.bernoulli(keys[10], cfg["p_blur_channel"], (c,))
    blur_sample = jax.random.bernoulli(keys[11], cfg["p_blur"])
    x = jnp.where(jnp.logical_and(blur_sample, blur_channel), blurred, x)

    # 6. per-sample min-max
    lo, hi = jnp.min(x), jnp.max(x)
    return (x - lo) / jnp.maximum(hi - lo, 1e-8)


STRONG_OFF = {k: 0.0 for k in STRONG_DEFAULTS if k.startswith("p_")}
