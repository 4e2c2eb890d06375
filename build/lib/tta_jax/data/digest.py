"""Content digests of the data a run reads, so caches and resumed results follow the content.

A manifest maps each image id of a domain to a short digest of what the
reader produced for it (the preprocessed image and its mask: shape, dtype and
bytes), so a changed pixel, a changed mask, an added or a removed file all
change it, whatever the reader or the file format. :func:`describe_change`
says what changed between two manifests, for the log.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from tta_jax.data.base import DomainData

DIGEST_CHARS = 16


def _array_bytes(h, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())


def manifest(data: DomainData) -> dict[str, str]:
    """``{image id: digest}`` of a domain's images and masks as read (in stream order)."""
    out = {}
    for image_id, image, mask in zip(data.ids, data.images, data.masks):
        h = hashlib.sha256()
        _array_bytes(h, image)
        _array_bytes(h, mask)
        out[str(image_id)] = h.hexdigest()[:DIGEST_CHARS]
    return out


def manifest_digest(m: dict[str, str]) -> str:
    """One digest of a manifest, order included (the stream order is part of a run)."""
    return hashlib.sha256(json.dumps(list(m.items())).encode()).hexdigest()[:DIGEST_CHARS]


def describe_change(old: dict[str, str], new: dict[str, str], domain: str) -> str:
    """``"2 images added, 1 changed in T"`` (or the order changed) for the log."""
    added = len(set(new) - set(old))
    removed = len(set(old) - set(new))
    changed = sum(1 for k in set(new) & set(old) if new[k] != old[k])
    parts = [f"{n} image{'s' if n != 1 else ''} {what}" for n, what in
             ((added, "added"), (removed, "removed"), (changed, "changed")) if n]
    if not parts:
        return f"the order of the images of {domain} changed" if list(old) != list(new) else f"{domain} unchanged"
    return ", ".join(parts) + f" in {domain}"


def content_hash(obj) -> str:
    """Digest of a JSON-able object (keys sorted): the key of caches and resumable results."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:DIGEST_CHARS]


def file_digest(path) -> str:
    """Digest of a file's bytes (not its name), or of every file under a directory (relative names, bytes)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path)).encode() if f != path else b"")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:DIGEST_CHARS]
