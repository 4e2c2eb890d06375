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

STREAM_AXIS = "streams"


def stream_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``streams`` over ``devices`` (default: all devices)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (STREAM_AXIS,))


def shard_map_streams(batched_step, mesh: Mesh | None = None):
    """``batched_step(state, image, mask, keys)`` run per device on its slice of streams.

    state and keys (and every output) carry the stream axis first; image and
    mask are shared by all streams and replicated.
    """
    mesh = mesh or stream_mesh()
    streams, replicated = PartitionSpec(STREAM_AXIS), PartitionSpec()
    return jax.shard_map(batched_step, mesh=mesh, in_specs=(streams, replicated, replicated, streams),
                         out_specs=streams, check_vma=False)


def shard_streams(tree, mesh: Mesh | None = None, axis: int = 0):
    """Place every array leaf of ``tree`` with its stream ``axis`` split over ``mesh``'s devices."""
    mesh = mesh or stream_mesh()
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec(*([None] * axis), STREAM_AXIS)))
