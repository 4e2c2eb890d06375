"""``no_adapt``: the source model as trained, with its source BN running statistics."""
from __future__ import annotations

from tta_jax.bn import forward_source_stats
from tta_jax.methods.base import Method, NoHParams, register
from tta_jax.methods.common import make_frozen_method


@register("no_adapt")
def make(model, hp: NoHParams) -> Method:
    del hp
    return make_frozen_method("no_adapt", model, forward_source_stats)
