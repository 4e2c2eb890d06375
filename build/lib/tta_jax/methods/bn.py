"""``bn``: test-time BatchNorm — normalise with the test image's own statistics, train nothing.

With batch size 1 the statistics are those of the single image (as in the
GraTa/VPTTA protocols); the source running statistics are never updated.
"""
from __future__ import annotations

from tta_jax.bn import forward_test_stats
from tta_jax.methods.base import Method, NoHParams, register
from tta_jax.methods.common import make_frozen_method


@register("bn")
def make(model, hp: NoHParams) -> Method:
    del hp
    return make_frozen_method("bn", model, forward_test_stats)
