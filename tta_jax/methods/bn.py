"""``bn``: test-time BatchNorm — normalise with the test image's own statistics, train nothing.

With batch size 1 the statistics are those of the single image (as in the
GraTa/VPTTA protocols); the source running statistics are never updated.
"""
from __future__ import annotations

from tta_jax.bn import forward_test_stats
from tta_jax.methods.base import Method, check_step_input, register
from tta_jax.methods.no_adapt import FrozenState


@register("bn")
def make(model, hparams) -> Method:
    del hparams

    def init(variables, rng):
        del rng
        return FrozenState(variables["params"], variables["batch_stats"])

    def step(state, images, rng):
        del rng
        check_step_input(images)
        return state, forward_test_stats(model, state.params, state.batch_stats, images), {}

    return Method("bn", init, step)
