"""Mask denoising autoencoder: the shape prior of Karani et al. (2021), compared in Valvano et al. Fig. 4.

A U-Net over masks (sigmoid probabilities ``[B, H, W, C]`` in, logits of the
denoised masks out), built as the official ``l2l`` mapper in 2-D: four
levels of two 3×3 convolutions with BN and ReLU (16, 32, 64, 128 filters ×
``width``), 2×2 max-pooling down, bilinear ×2 upsampling up, skip
connections at every level **except the first** (full resolution): a skip
there would let the network copy its input and learn nothing of shapes.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

DAE_FILTERS = (16, 32, 64, 128)


class ConvBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train: bool):
        for i in range(2):
            x = nn.Conv(self.features, (3, 3), padding="SAME", name=f"conv{i}")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x))
        return x


def upsample2x(x):
    b, h, w, c = x.shape
    return jax.image.resize(x, (b, 2 * h, 2 * w, c), "bilinear")


class MaskDAE(nn.Module):
    """``MaskDAE(width)(masks, train) -> logits``; image sides divisible by 8."""

    width: float = 1.0

    @nn.compact
    def __call__(self, masks, train: bool = False):
        if masks.ndim != 4 or masks.shape[1] % 8 or masks.shape[2] % 8:
            raise ValueError(f"the mask DAE expects [B, H, W, C] masks with sides divisible by 8, got {masks.shape}")
        n = [max(1, int(round(f * self.width))) for f in DAE_FILTERS]
        x, skips = masks, []
        for level, features in enumerate(n[:-1]):
            x = ConvBlock(features, name=f"down{level}")(x, train)
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = ConvBlock(n[-1], name="bottom")(x, train)
        for level in reversed(range(len(n) - 1)):
            x = upsample2x(x)
            if level > 0:
                x = jnp.concatenate([x, skips[level]], axis=-1)
            x = ConvBlock(n[level], name=f"up{level}")(x, train)
        return nn.Conv(masks.shape[-1], (1, 1), name="out")(x)
