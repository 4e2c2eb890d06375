"""Typed hyperparameters: declared once as a frozen dataclass, checked the same way everywhere.

A method (or a source stage) declares its hyperparameters as a frozen
dataclass whose fields carry the type and the default::

    @dataclasses.dataclass(frozen=True)
    class TentHParams:
        lr: float = bounded(1e-3, low=0.0, low_open=True)
        steps: int = bounded(1, low=1)

:func:`from_mapping` builds an instance from a plain mapping (a config
sub-dict, keyword arguments from Python): unknown keys, wrong types,
non-finite floats, values outside the declared range or choices (``Literal``)
each raise :class:`HParamError` with one line naming the owner and, for an
unknown key, the valid keys. :func:`to_config` turns the declaration back
into a ``ml_collections.ConfigDict`` of the defaults, so configs never write
a default a second time.

Coercions are the lossless ones a config file or command line needs: an int
is accepted for a float field, an integral float for an int field; a bool is
never a number and a number never a bool. A nested dataclass field (GraTa's
strong-augmentation options) takes a mapping of its own keys.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal, Mapping

import ml_collections


class HParamError(ValueError):
    """A hyperparameter that is unknown, of the wrong type, or out of range (message: one line)."""


def bounded(default, *, low=None, high=None, low_open: bool = False, high_open: bool = False):
    """A dataclass field with a default and an allowed range ``[low, high]`` (``*_open``: strict)."""
    return dataclasses.field(default=default, metadata=dict(low=low, high=high, low_open=low_open,
                                                            high_open=high_open))


def nested(cls):
    """A dataclass field holding another hyperparameter dataclass, default-constructed."""
    return dataclasses.field(default_factory=cls)


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def valid_keys(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(owner: str, name: str, kind, value):
    where = f"{owner}.{name}"
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise HParamError(f"{where}={value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if not isinstance(value, Mapping) and not hasattr(value, "to_dict"):
            raise HParamError(f"{where} takes a mapping of {valid_keys(kind)}, got {value!r}")
        return from_mapping(kind, value, where)
    if kind is bool:
        if not isinstance(value, bool):
            raise HParamError(f"{where} must be True or False, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise HParamError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HParamError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise HParamError(f"{where} must be finite, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise HParamError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported hyperparameter type {kind!r}")


def _check_range(owner: str, field: dataclasses.Field, value) -> None:
    meta = field.metadata
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta.get("low_open") and value == low)):
        raise HParamError(f"{owner}.{field.name}={value!r} must be {'>' if meta.get('low_open') else '>='} {low}")
    if high is not None and (value > high or (meta.get("high_open") and value == high)):
        raise HParamError(f"{owner}.{field.name}={value!r} must be {'<' if meta.get('high_open') else '<='} {high}")


def from_mapping(cls, values: Mapping[str, Any] | None = None, owner: str | None = None):
    """``cls`` with the defaults replaced by ``values``; every value checked (see the module docstring)."""
    owner = owner or cls.__name__
    if values is None:
        values = {}
    elif hasattr(values, "to_dict"):
        values = values.to_dict()
    unknown = sorted(set(values) - set(valid_keys(cls)))
    if unknown:
        raise HParamError(f"{owner}: unknown hyperparameter{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(unknown)}; valid keys: {', '.join(valid_keys(cls)) or '(none)'}")
    hints = _hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name in values:
            kwargs[field.name] = _coerce(owner, field.name, hints[field.name], values[field.name])
    instance = cls(**kwargs)
    for field in dataclasses.fields(cls):
        if field.metadata:
            _check_range(owner, field, getattr(instance, field.name))
    return instance


def replace(instance, owner: str | None = None, **changes):
    """``instance`` with ``changes`` applied, checked like :func:`from_mapping`."""
    return from_mapping(type(instance), {**as_dict(instance), **changes}, owner)


def as_dict(instance) -> dict:
    """Plain nested dict of a hyperparameter instance (JSON-ready)."""
    return dataclasses.asdict(instance)


def to_config(cls_or_instance) -> ml_collections.ConfigDict:
    """The declaration's values (defaults, for a class) as a ConfigDict, nested dataclasses nested."""
    instance = cls_or_instance() if isinstance(cls_or_instance, type) else cls_or_instance
    return ml_collections.ConfigDict(as_dict(instance))
