"""Test-time adaptation methods, one module (or package) each, registered by name.

Every module of this package is imported here, so a new method is one new
module: its ``@register`` makes it available to :func:`make_method`, the
configs and the experiment runner.
"""
import importlib
import pkgutil

from tta_jax.methods.base import (Method, MethodSpec, NoHParams, SourceNeeds, available_methods, keep_if_finite,
                                  make_method, method_hparams, method_spec, register)

_SHARED_MODULES = {"base", "common", "adaptor_tuning"}

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _SHARED_MODULES:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Method", "MethodSpec", "NoHParams", "SourceNeeds", "available_methods", "keep_if_finite",
           "make_method", "method_hparams", "method_spec", "register"]
