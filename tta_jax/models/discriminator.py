"""Mask discriminator Δ of adversarial test-time training (Valvano et al., §3.1–3.2; DESIGN.md §4).

A convolutional encoder over (sigmoid) masks: 5 layers of 4×4 filters with
32, 64, 128, 256, 512 channels (× ``width``), tanh activations, then a linear
layer to one scalar (LSGAN output, no sigmoid). Every layer is spectrally
normalised (``flax.linen.SpectralNorm``): the power-iteration vector ``u`` and
the estimate ``sigma`` are variables of the ``batch_stats`` collection, carried
explicitly like BN statistics and advanced only when ``update_stats=True``
(discriminator training).

Strides: the paper downsamples "after the first two layers"; we read it as
stride 2 in layers 1 and 2 and stride 1 after (``strides``, configurable).

``smooth=False`` removes the smoothness constraints (§3.1, ablation Table 1's
"GAN" row): plain convolutions, no spectral normalisation, LeakyReLU(0.2)
(the usual GAN discriminator activation; the paper does not name the one it
replaces tanh with). A 0-d placeholder keeps the ``batch_stats`` collection,
so both forms are trained, saved and applied by the same code.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

DISCRIMINATOR_FILTERS = (32, 64, 128, 256, 512)


def parse_strides(strides) -> tuple[int, ...]:
    """``"2,2,1,1,1"`` (a config string) or a sequence → a tuple of ints."""
    return tuple(int(s) for s in str(strides).split(",")) if isinstance(strides, str) else tuple(strides)


class MaskDiscriminator(nn.Module):
    width: float = 1.0
    strides: Sequence[int] = (2, 2, 1, 1, 1)
    power_iterations: int = 1
    smooth: bool = True

    @nn.compact
    def __call__(self, masks, update_stats: bool = False):
        if masks.ndim != 4:
            raise ValueError(f"the mask discriminator expects [B, H, W, C] masks, got shape {masks.shape}")
        if len(self.strides) != len(DISCRIMINATOR_FILTERS):
            raise ValueError(f"discriminator strides need {len(DISCRIMINATOR_FILTERS)} entries, got {self.strides}")
        x = masks
        for i, (base, stride) in enumerate(zip(DISCRIMINATOR_FILTERS, self.strides)):
            conv = nn.Conv(max(1, int(round(base * self.width))), (4, 4), strides=int(stride), padding="SAME",
                           name=f"conv{i}")
            if self.smooth:
                x = jnp.tanh(nn.SpectralNorm(conv, n_steps=self.power_iterations, name=f"sn{i}")(
                    x, update_stats=update_stats))
            else:
                x = nn.leaky_relu(conv(x), 0.2)
        x = x.reshape(x.shape[0], -1)
        if not self.smooth:
            self.variable("batch_stats", "placeholder", jnp.zeros, ())
            return nn.Dense(1, name="out")(x)[:, 0]
        return nn.SpectralNorm(nn.Dense(1, name="out"), n_steps=self.power_iterations, name="sn_out")(
            x, update_stats=update_stats)[:, 0]


def normalised_kernels(disc_variables) -> dict:
    """The effective (spectrally normalised) weight matrices W/σ of every layer, reshaped to 2-D.

    For checks: their largest singular value should be close to 1 once the
    power iterations have converged.
    """
    out = {}
    for stats in disc_variables["batch_stats"].values():
        for key, sigma in stats.items():
            if key.endswith("/kernel/sigma"):
                layer = key.split("/")[0]
                kernel = np.asarray(disc_variables["params"][layer]["kernel"])
                out[layer] = kernel.reshape(-1, kernel.shape[-1]) / float(np.asarray(sigma))
    return out
