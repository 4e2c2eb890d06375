"""Spread independent streams over devices: the leading (stream/seed) axis of a batched run.

A batched run (``StreamRunner(batched=True)``) carries S independent streams
in one vmapped step.  With ``shard=True`` that step is wrapped in
``jax.shard_map`` over a 1-D ``Mesh`` of all devices: each device runs the
vmapped step on its S/n_devices streams, images are replicated, and nothing
is communicated.  We map explicitly rather than letting GSPMD partition the
vmapped network because the vmapped convolutions become grouped convolutions
whose automatic partitioning XLA:CPU rejects (``feature_group_count`` error
measured with 4 fake CPU devices).  The per-stream computation is unchanged,
so results match the single-device run (``tests/test_sharding.py``).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tta_jax.methods.base import shared_leaves

STREAM_AXIS = "streams"


def stream_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``streams`` over ``devices`` (default: this process's devices; in a
    multi-process sweep each process runs its own cells, :mod:`tta_jax.distributed`)."""
    return Mesh(np.asarray(devices if devices is not None else jax.local_devices()), (STREAM_AXIS,))


def _state_specs(stream_axes):
    """PartitionSpecs for a state with ``stream_axes`` (0: split over devices; None: replicated)."""
    return jax.tree.map(lambda a: PartitionSpec() if a is None else PartitionSpec(STREAM_AXIS),
                        stream_axes, is_leaf=lambda x: x is None)


def shard_map_streams(batched_step, stream_axes=0, mesh: Mesh | None = None):
    """``batched_step(state, image, mask, keys)`` run per device on its slice of streams.

    keys and every output but the state (the scores pytree) carry the stream axis first; the state
    carries it where ``stream_axes`` says 0 (``Method.stream_axes``; None:
    shared by all streams, replicated); image and mask are shared and replicated.
    """
    mesh = mesh or stream_mesh()
    streams, replicated = PartitionSpec(STREAM_AXIS), PartitionSpec()
    state_specs = _state_specs(stream_axes)
    return jax.shard_map(batched_step, mesh=mesh, in_specs=(state_specs, replicated, replicated, streams),
                         out_specs=(state_specs, streams), check_vma=False)


def shard_streams(tree, mesh: Mesh | None = None, axis: int = 0, stream_axes=0):
    """Place ``tree`` with its stream ``axis`` split over ``mesh``'s devices (replicated where ``stream_axes`` is None)."""
    mesh = mesh or stream_mesh()
    split = NamedSharding(mesh, PartitionSpec(*([None] * axis), STREAM_AXIS))
    replicated = NamedSharding(mesh, PartitionSpec())
    treedef = jax.tree.structure(tree)
    shardings = [replicated if shared else split for shared in shared_leaves(stream_axes, tree)]
    return jax.device_put(tree, jax.tree.unflatten(treedef, shardings))
