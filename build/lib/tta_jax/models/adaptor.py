"""Input adaptor Ω of adversarial test-time training (Valvano et al. §3.3; the adaptor of Karani et al.).

A shallow residual block in front of the frozen segmentor: three 3×3
convolutions with 16 filters, each followed by the Gaussian activation
``exp(−x²/σ²)`` with a learnable per-channel σ (initialised to 1: the paper's
"initialised as 0" cannot be a divisor), then a 1×1 convolution back to the
image channels, added to the input. The output convolution starts at zero so
that Ω starts as the identity: before tuning, the segmentor sees the image
unchanged (the "before" Dice equals the frozen model's).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


def gaussian_activation(x, sigma):
    """exp(−x²/σ²), σ per channel (last axis)."""
    return jnp.exp(-(x ** 2) / (sigma ** 2))


class InputAdaptor(nn.Module):
    features: int = 16
    layers: int = 3

    @nn.compact
    def __call__(self, x):
        h = x
        for i in range(self.layers):
            h = nn.Conv(self.features, (3, 3), padding="SAME", name=f"conv{i}")(h)
            h = gaussian_activation(h, self.param(f"sigma{i}", nn.initializers.ones, (self.features,)))
        return x + nn.Conv(x.shape[-1], (1, 1), kernel_init=nn.initializers.zeros, name="out")(h)
