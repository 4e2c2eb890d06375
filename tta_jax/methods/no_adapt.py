"""``no_adapt``: the source model as trained, with its source BN running statistics."""
from __future__ import annotations

from typing import Any, NamedTuple

from tta_jax.bn import forward_source_stats
from tta_jax.methods.base import Method, check_step_input, register


class FrozenState(NamedTuple):
    params: Any
    batch_stats: Any


def make_frozen_method(name: str, model, forward) -> Method:
    """A method that trains nothing and predicts with ``forward(model, params, batch_stats, images)``."""

    def init(variables, rng):
        del rng
        return FrozenState(variables["params"], variables["batch_stats"])

    def step(state, images, rng):
        del rng
        check_step_input(images)
        return state, forward(model, state.params, state.batch_stats, images), {}

    return Method(name, init, step, stream_axes=FrozenState(None, None))


@register("no_adapt")
def make(model, hparams) -> Method:
    del hparams
    return make_frozen_method("no_adapt", model, forward_source_stats)
