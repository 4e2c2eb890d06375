"""Test-time adaptation methods, one module each, registered by name."""
from tta_jax.methods import adv_ttt, bn, grata, no_adapt, spegc, tent  # noqa: F401  (registration)
from tta_jax.methods.base import Method, available_methods, keep_if_finite, make_method

__all__ = ["Method", "available_methods", "keep_if_finite", "make_method"]
