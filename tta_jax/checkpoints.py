"""Saving and restoring model variables with orbax, with clear errors.

A checkpoint directory holds ``variables/`` (orbax ``StandardCheckpointer``)
and ``meta.json`` (model settings and anything the caller adds).  Restoring
checks the tree structure and every shape against a template, so a checkpoint
of another backbone, width or class count is refused with a message naming
the first mismatching parameter rather than failing deep inside the model.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import contextlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match the model."""


def atomic_write_text(path, text: str) -> None:
    """Write a file atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs every file it touches at INFO; keep run logs readable."""
    level = logging.get_verbosity()
    logging.set_verbosity(min(level, logging.WARNING))  # absl: larger = more verbose
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _checkpointer() -> ocp.StandardCheckpointer:
    """An orbax checkpointer that reads and writes from this process alone.

    orbax synchronises every process of a multi-process job around a save; in
    a sweep over processes (:mod:`tta_jax.distributed`) each process saves
    and restores its own source models, so no other process takes part.
    """
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))


def save_variables(directory, variables, meta: dict | None = None) -> None:
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "variables"
    with _quiet_orbax():
        ckpt = _checkpointer()
        ckpt.save(target, jax.device_get(variables), force=True)
        ckpt.wait_until_finished()
    atomic_write_text(directory / "meta.json", json.dumps(meta or {}, indent=2, sort_keys=True))


def load_meta(directory) -> dict:
    path = Path(directory) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {directory}: meta.json not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {directory}: meta.json is corrupt ({e})") from e


def check_matches(restored, template, where: str) -> None:
    got = traverse_util.flatten_dict(restored, sep="/")
    want = traverse_util.flatten_dict(template, sep="/")
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise CheckpointError(f"checkpoint {where} does not match the model: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    for k in want:
        if np.shape(got[k]) != np.shape(want[k]):
            raise CheckpointError(f"checkpoint {where} does not match the model: {k} has shape "
                                  f"{np.shape(got[k])}, the model expects {np.shape(want[k])}")


def restore_variables(directory, template):
    """Restore variables saved by :func:`save_variables`, checked against ``template``."""
    directory = Path(directory).absolute()
    target = directory / "variables"
    if not target.exists():
        raise CheckpointError(f"no checkpoint found at {directory} (expected {target})")
    try:
        # Restore without a target first so that a structure mismatch is
        # reported by our check rather than as an orbax internal error.
        with _quiet_orbax():
            restored = _checkpointer().restore(target)
    except Exception as e:  # orbax raises many types for damaged files
        raise CheckpointError(f"checkpoint {directory} is corrupt or unreadable: {type(e).__name__}: {e}") from e
    check_matches(restored, template, str(directory))
    return jax.tree.map(lambda t, r: np.asarray(r, dtype=np.asarray(t).dtype), template, restored)
