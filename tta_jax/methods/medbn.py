"""``medbn``: median-centred test BatchNorm (Park et al., "MedBN: Robust Test-Time Adaptation
against Malicious Test Samples", CVPR 2024).

Every BN layer normalises with the current test batch's statistics, robustly
centred: per channel the centre is the median of the activations over the
batch and space (N·H·W values), the spread the mean squared deviation from
that median:

    m_c = median_{n,h,w} x_{nhwc},    s²_c = mean_{n,h,w} (x_{nhwc} − m_c)²,
    y = γ_c (x − m_c) / √(s²_c + ε) + β_c.

Source running statistics are not used and nothing is trained: the GraTa paper
lists MedBN among the methods that "refine the BN statistics" without updating
parameters (its Table 1), which is the official code's normalisation-only
setting (``UPDATE: False``). With batch size 1 the statistics are the image's
own, so this is ``bn`` with the mean replaced by the median.

For an even count the official code takes ``Tensor.median``, the lower of the
two middle values; :func:`median_statistics` does the same.
"""
from __future__ import annotations

import jax.numpy as jnp

from tta_jax.bn import channel_axes, forward_with_statistics
from tta_jax.methods.base import Method, NoHParams, register
from tta_jax.methods.common import make_frozen_method


def lower_median(x, axes):
    """Per-channel median over ``axes``; of an even count, the lower middle value (torch's median)."""
    moved = jnp.moveaxis(x, [a % x.ndim for a in axes], range(len(axes)))
    flat = moved.reshape(-1, *moved.shape[len(axes):])
    return jnp.sort(flat, axis=0)[(flat.shape[0] - 1) // 2]


def median_statistics(layer, x):
    """MedBN's (centre, spread) of ``x`` (channels last): the median and the mean squared deviation from it."""
    del layer
    axes = channel_axes(x)
    centre = lower_median(x, axes)
    return centre, jnp.mean(jnp.square(x - centre), axis=axes)


def _forward_median(model, params, batch_stats, images):
    return forward_with_statistics(model, params, batch_stats, images, median_statistics)[0]


@register("medbn")
def make(model, hp: NoHParams) -> Method:
    del hp
    return make_frozen_method("medbn", model, _forward_median)
