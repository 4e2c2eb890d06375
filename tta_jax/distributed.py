"""Sweeps past one machine: JAX's multi-controller runtime, one process per host.

Launched as several processes (a TPU pod slice, several GPU nodes, or local
CPU processes), each calls :func:`initialize` (``jax.distributed.initialize``;
on TPU pods and under SLURM it finds the coordinator, the process count and
its own index by itself) and then sees every device of the job in
``jax.devices()`` and its own in ``jax.local_devices()``.

A sweep is a list of cells, one per (source, method row, seed) — the
leave-one-domain grid times the compared rows times the seeds. The cells are
laid out over one global mesh of all devices (:func:`process_mesh`: one row
of the mesh per process, its columns the process's local devices): cell ``i``
belongs to mesh row ``i mod P``, and that process runs it on its local
devices (a cell's seeds could be vmapped and sharded over that row only;
nothing crosses hosts during a run). Every process writes only its own cells'
results (``runs/<row>/seed_<s>.json``, content-fingerprinted) into the shared
workdir; after a barrier, process 0 assembles the tables, which reuses every
finished cell, so the report equals a single-process run's
(``tests/test_distributed.py``: 2 processes × 2 CPU devices). The workdir and
the source-model cache must be on a filesystem all processes share.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

MESH_AXES = ("process", "local")


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """``jax.distributed.initialize`` with what is given (empty/0/−1: detected by JAX), once.

    CPU processes exchange collectives through gloo (JAX's CPU default has none
    across processes); GPU and TPU use their own.
    """
    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator:
        kwargs["coordinator_address"] = coordinator
    if num_processes:
        kwargs["num_processes"] = num_processes
    if process_id >= 0:
        kwargs["process_id"] = process_id
    jax.distributed.initialize(**kwargs)


def process_mesh() -> Mesh:
    """All devices of the job as a ``[process, local]`` mesh (every process has the same device count)."""
    rows = [[d for d in jax.devices() if d.process_index == p] for p in range(jax.process_count())]
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"processes hold different numbers of devices: {[len(r) for r in rows]}")
    return Mesh(np.array(rows), MESH_AXES)


def cells_of_this_process(cells: list, mesh: Mesh | None = None) -> list:
    """The cells laid out on this process's mesh row (cell ``i`` on row ``i mod P``)."""
    mesh = mesh or process_mesh()
    row = next(i for i, devices in enumerate(mesh.devices) if devices[0].process_index == jax.process_index())
    return [c for i, c in enumerate(cells) if i % mesh.devices.shape[0] == row]


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (no-op in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
