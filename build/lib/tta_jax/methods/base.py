"""The method protocol, the registry, and the state guard shared by all methods.

A test-time method is a pair of pure functions (DESIGN.md §1)::

    state = method.init(variables, rng)
    state, logits, info = method.step(state, images, rng)   # adapt, then predict

``images`` is a ``[1, H, W, 3]`` batch (one test image); ``info`` is a dict
of scalars (losses, learning rates, ...) recorded per image by the runner.
The factory that builds a :class:`Method` closes over the (static) network
and hyperparameters, so both functions jit cleanly and hold no hidden state.

A method is one module under ``tta_jax/methods/`` (the package imports every
module in it), registered with its typed hyperparameters and what it needs
from the source stage::

    @dataclasses.dataclass(frozen=True)
    class MyHParams:
        lr: float = bounded(1e-3, low=0.0)

    @register("my_method", MyHParams)
    def make(model, hp: MyHParams) -> Method:
        ...

Config sub-dicts (``--config.my_method.lr``) are generated from the
declaration; :func:`make_method` checks a mapping of hyperparameters against
it, from Python and from the command line alike.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from tta_jax import hparams as hp


class Method(NamedTuple):
    """``init``/``step`` as above; ``analysis`` (optional) computes label-based diagnostics.

    ``analysis(state, images, masks, rng) -> dict`` sees the state the step
    adapts from and the ground truth; the runner calls it only when asked
    (``analysis=True``), records its scalars next to ``info`` and never feeds
    them back: labels cannot reach the adaptation.
    """

    name: str
    init: Callable[[Any, jax.Array], Any]
    step: Callable[[Any, jax.Array, jax.Array], tuple[Any, jax.Array, dict]]
    analysis: Callable[..., dict] | None = None
    # How a batch of independent streams (seeds) holds the state: a prefix of the state's
    # pytree with 0 (one copy per stream, leading axis) or None (one copy shared by all
    # streams: parts that ``init`` makes the same for every seed and ``step`` never changes,
    # e.g. frozen weights). Shared weights keep K vmapped streams' convolutions ordinary
    # batched convolutions instead of grouped ones, and K× less memory.
    stream_axes: Any = 0


def shared_leaves(stream_axes, state) -> list[bool]:
    """Per leaf of ``state`` (flattened order): is it shared by all streams (axis None)?"""
    marks = jax.tree.map(lambda axis, sub: jax.tree.map(lambda _: axis is None, sub),
                         stream_axes, state, is_leaf=lambda x: x is None)
    return jax.tree.leaves(marks)


@dataclasses.dataclass(frozen=True)
class NoHParams:
    """The declaration of a method without hyperparameters."""


class SourceNeeds(NamedTuple):
    """What a method needs from the source stage, besides the segmentor's own variables.

    ``aux_heads``: self-supervised ResUNet branches trained with the segmentor
    (GraTa Table 5); ``companions``: other networks trained with it, passed to
    the method's factory by name and stored in the variables under that name
    (``"discriminator"``: the adversarial stage's mask discriminator).
    """

    aux_heads: tuple[str, ...] = ()
    companions: tuple[str, ...] = ()


class MethodSpec(NamedTuple):
    """A registered method: its factory and its declarations."""

    name: str
    factory: Callable[..., Method]
    hparams: type
    needs: Callable[[Any], SourceNeeds]
    # data family -> {hyperparameter: default} (e.g. SPEGC's lr for polyps)
    family_defaults: Mapping[str, Mapping[str, Any]]


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, hparams: type = NoHParams, *, needs: Callable[[Any], SourceNeeds] | None = None,
             family_defaults: Mapping[str, Mapping[str, Any]] | None = None):
    """Register ``factory(model, hp, **companions) -> Method`` under ``name``.

    Args:
      hparams: the frozen dataclass declaring the method's hyperparameters
        (:mod:`tta_jax.hparams`); the factory receives a checked instance.
      needs: ``needs(hp) -> SourceNeeds``, what the source stage must provide;
        each companion is passed to the factory as a keyword argument.
      family_defaults: defaults that differ by data family (``fundus``,
        ``polyp``, ...), applied to the method's config sub-dict by the config
        variant that selects the family.
    """
    family_defaults = dict(family_defaults or {})
    for family, values in family_defaults.items():
        hp.from_mapping(hparams, values, f"{name} ({family} defaults)")

    def deco(factory):
        _REGISTRY[name] = MethodSpec(name, factory, hparams, needs or (lambda _: SourceNeeds()),
                                     family_defaults)
        return factory
    return deco


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_spec(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise hp.HParamError(f"unknown method {name!r}; available methods: {', '.join(available_methods())}")
    return _REGISTRY[name]


def method_hparams(name: str, values: Mapping[str, Any] | None = None):
    """The checked hyperparameters of method ``name`` from a mapping (defaults for missing keys)."""
    spec = method_spec(name)
    if isinstance(values, spec.hparams):
        return values
    return hp.from_mapping(spec.hparams, values, name)


def make_method(name: str, model, hparams: Mapping[str, Any] | Any = None, **companions) -> Method:
    """Build the registered method ``name`` for ``model``.

    Args:
      name: a registered method (:func:`available_methods`).
      model: the segmentor, a Flax module (see README "Python API" for the protocol).
      hparams: a mapping of hyperparameters (missing keys take the defaults;
        unknown keys or wrong types raise :class:`tta_jax.hparams.HParamError`)
        or an instance of the method's declaration.
      companions: the networks the method declares it needs (``SourceNeeds.companions``).
    """
    spec = method_spec(name)
    checked = method_hparams(name, hparams)
    wanted = spec.needs(checked).companions
    missing = [c for c in wanted if c not in companions]
    if missing:
        raise hp.HParamError(f"method {name!r} needs {', '.join(missing)} from the source stage")
    return spec.factory(model, checked, **{c: companions[c] for c in wanted})


def check_step_input(images: jax.Array) -> None:
    """Shape/dtype check at trace time (shapes are static under jit)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"a method step takes images of shape [B, H, W, 3], got {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"a method step takes floating-point images, got {images.dtype}")


# Leaves smaller than this are checked together, as one concatenated vector: a hundred tiny
# per-leaf reductions cost XLA:CPU more in dispatch than in arithmetic.
_SMALL_LEAF = 1 << 16


def all_finite(tree) -> jax.Array:
    """True iff every floating leaf of ``tree`` is finite (a traced boolean scalar)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    small = [jnp.ravel(x) for x in leaves if jnp.size(x) < _SMALL_LEAF]
    checks = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.size(x) >= _SMALL_LEAF]
    if small:
        checks.append(jnp.all(jnp.isfinite(jnp.concatenate(small))))
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def keep_if_finite(new_state, old_state, *extra):
    """Return ``(new_state, True)`` if it and ``extra`` are finite, else ``(old_state, False)``.

    An adaptation step that diverges (NaN/inf loss, gradient or parameter)
    must not poison the stream: the state falls back to the previous one and
    the runner records the skip.
    """
    new_leaves, treedef = jax.tree.flatten(new_state)
    old_leaves = jax.tree.leaves(old_state)
    if len(old_leaves) != len(new_leaves):
        raise ValueError("keep_if_finite: the new and old states differ in structure")
    # Only leaves the step changed are checked and guarded: a leaf passed through (frozen
    # weights) is the very value that entered, checked when it was made, and under vmap
    # over streams it stays unbatched.
    changed = [i for i, (a, b) in enumerate(zip(new_leaves, old_leaves)) if a is not b]
    ok = jnp.logical_and(all_finite([new_leaves[i] for i in changed]), all_finite(extra))
    # lax.cond, not a per-leaf jnp.where: XLA:CPU fuses a select (and the all-finite
    # reduction) into every consumer of the parameters, which makes the step compile
    # several times slower.
    guarded = jax.lax.cond(ok, lambda: [new_leaves[i] for i in changed], lambda: [old_leaves[i] for i in changed])
    for i, leaf in zip(changed, guarded):
        new_leaves[i] = leaf
    return jax.tree.unflatten(treedef, new_leaves), ok
