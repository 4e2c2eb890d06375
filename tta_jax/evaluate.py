"""Evaluation of one method over its seeds: resumable per-seed runs, scored and summarised.

Each finished (method row, seed) is written atomically to
``workdir/runs/<row>/seed_<s>.json`` with a fingerprint of everything that
determines it; a re-run with the same fingerprint reuses it, any other
fingerprint runs it again.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tta_jax import checkpoints
from tta_jax.data import DomainData
from tta_jax.data.digest import content_hash, describe_change
from tta_jax.metrics import FULL_METRICS, domain_summary, full_metrics
from tta_jax.runner import StreamRunner, run_protocol, split_seeds


def subsample_stream(data: DomainData, max_images: int) -> DomainData:
    """At most ``max_images`` images of a target stream, evenly spaced and in stream order (0: all).

    For methods too costly to run on a whole target on a CPU (adv_ttt tunes Ω for 50
    steps per image). Evenly spaced rather than a prefix: consecutive frames of a
    centre often come from one video (CVC-ClinicDB), so a prefix would see a few
    patients only. Every method of a run sees the same images; their ids are
    recorded in ``results.json`` (``stream_ids``).
    """
    if not max_images or max_images >= data.size:
        return data
    keep = np.unique(np.linspace(0, data.size - 1, int(max_images)).round().astype(int))
    sizes = None if data.native_sizes is None else data.native_sizes[keep]
    return DomainData(data.name, data.images[keep], data.masks[keep], tuple(data.ids[i] for i in keep), sizes)


class _Named:
    """DomainData plus the dataset's channel names (for summaries)."""

    def __init__(self, data, channel_names):
        self._data, self.channel_names = data, channel_names

    def __getattr__(self, name):
        return getattr(self._data, name)


def with_channels(data: DomainData, channel_names):
    """``data`` that also knows the dataset's channel names."""
    return _Named(data, channel_names)


def _seed_run_path(workdir: Path, method: str, seed: int) -> Path:
    return workdir / "runs" / method / f"seed_{seed}.json"


def load_finished_run(workdir: Path, row_name: str, seed: int, fingerprint: str,
                      parts: dict | None = None, manifests: dict | None = None) -> dict | None:
    """A finished (row, seed) result with the same fingerprint, else None (the log says why).

    A file that cannot be read as a result (corrupt JSON, other bytes, a folder,
    not an object) is moved aside as ``*.unreadable`` and counts as absent.
    """
    path = _seed_run_path(workdir, row_name, seed)
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError(f"holds {type(saved).__name__}, not a result")
    except (OSError, ValueError) as e:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        aside = path.with_name(f"{path.name}.unreadable")
        logging.warning("%s seed %d: ignoring unreadable result %s (%s); moved to %s", row_name, seed, path,
                        type(e).__name__, aside.name)
        _move_aside(path, aside)
        return None
    if saved.get("fingerprint") == fingerprint:
        return saved
    logging.info("%s seed %d: rerunning (%s)", row_name, seed, explain_change(saved, parts or {}, manifests or {}))
    return None


def _move_aside(path: Path, aside: Path) -> None:
    import shutil
    if aside.is_dir():
        shutil.rmtree(aside)
    elif aside.exists():
        aside.unlink()
    path.rename(aside)


def explain_change(saved: dict, parts: dict, manifests: dict) -> str:
    """What differs between a saved run's fingerprint parts and the current ones, for the log."""
    old = saved.get("fingerprint_parts") or {}
    reasons = []
    for key, value in parts.items():
        if old.get(key) == value:
            continue
        if key == "targets" and isinstance(old.get(key), dict):
            for name, digest in value.items():
                if old[key].get(name) != digest:
                    before = (saved.get("target_manifests") or {}).get(name, {})
                    reasons.append(f"target data changed: {describe_change(before, manifests.get(name, {}), name)}")
        elif key == "source_model":
            reasons.append("the source model changed")
        else:
            reasons.append(f"{key} changed")
    return "; ".join(reasons) or "its settings changed"


def summarise_seed_run(config, row_name, hparams, runner, results, targets, seed, fingerprint, seconds, workdir,
                       parts=None, manifests=None):
    """Per-domain summaries (and per-image records) of one seed's results; written atomically."""
    channel_names = targets[0].channel_names
    masks_by_id = {t.name: {i: m for i, m in zip(t.ids, t.masks)} for t in targets}
    native = config.distance_unit == "native_pixels"
    spacing_by_id = {t.name: {i: t.pixel_spacing(k) if native else (1.0, 1.0) for k, i in enumerate(t.ids)}
                     for t in targets}
    out = {
        "method": row_name, "registered_method": runner.method.name, "seed": seed,
        "fingerprint": fingerprint, "fingerprint_parts": parts or {}, "target_manifests": manifests or {},
        "hparams": hparams, "protocol": config.protocol,
        "seconds": seconds, "trace_count": runner.trace_count,
        "domains": {}, "per_image": [],
    }
    by_domain: dict[str, list] = {}
    for r in results:
        by_domain.setdefault(r.domain, []).append(r)
        entry = {"domain": r.domain, "round": r.round, "ids": list(r.ids), "dice": np.asarray(r.dice).tolist(),
                 "info": {k: np.asarray(v).tolist() for k, v in r.info.items()}, "seconds": r.seconds}
        if r.positions is not None:
            entry["positions"] = np.asarray(r.positions).tolist()
        if r.predictions is not None:
            entry["metrics"] = [
                {ch: full_metrics(pred[..., c], prob[..., c], masks_by_id[r.domain][i][..., c],
                                  spacing_by_id[r.domain][i])
                 for c, ch in enumerate(channel_names)}
                for i, pred, prob in zip(r.ids, r.predictions["pred"], r.predictions["prob"])]
        out["per_image"].append(entry)
    out["skipped_steps"] = int(sum(np.sum(r.info.get("skipped", 0)) for r in results))
    if out["skipped_steps"]:
        logging.warning("%s seed %d: %d adaptation steps were non-finite and skipped (state kept)",
                        row_name, seed, out["skipped_steps"])
    for domain, rs in by_domain.items():
        summary = domain_summary(np.concatenate([r.dice for r in rs]), channel_names)
        entries = [e for e in out["per_image"] if e["domain"] == domain and "metrics" in e]
        if entries:
            per_image = [m for e in entries for m in e["metrics"]]
            summary["metrics"] = {metric: float(np.mean([[m[ch][metric] for ch in channel_names]
                                                          for m in per_image]))
                                  for metric in FULL_METRICS}
        out["domains"][domain] = summary
    if config.protocol == "long_term":
        rounds = sorted({r.round for r in results})
        out["round_means"] = [float(np.mean([domain_summary(r.dice, channel_names)["mean"]
                                             for r in results if r.round == k])) for k in rounds]
        out["degradation"] = float(np.mean(out["round_means"]) - out["round_means"][0])
    checkpoints.atomic_write_text(_seed_run_path(workdir, row_name, seed), json.dumps(out))
    return out


def run_method_seeds(config, row_name, hparams, method, variables, targets, seeds, fingerprint_parts, workdir,
                     manifests=None):
    """All seeds of one method: reuse finished runs; run the rest vmapped in one stream (or one by one).

    ``fingerprint_parts[s]``: everything seed ``s``'s result depends on (its digest keys the saved run);
    ``manifests``: the targets' content manifests, kept with the run to explain a later change.
    """
    fingerprints = {s: content_hash(fingerprint_parts[s]) for s in seeds}
    done = {s: load_finished_run(workdir, row_name, s, fingerprints[s], fingerprint_parts[s], manifests)
            for s in seeds}
    todo = [s for s in seeds if done[s] is None]
    for s in seeds:
        if done[s] is not None:
            logging.info("%s seed %d: reusing finished run", row_name, s)
    trace_count = 0
    if todo:
        batched = config.vmap_seeds and len(todo) > 1
        shard = config.shard_seeds and batched and jax.local_device_count() > 1
        if shard and len(todo) % jax.local_device_count():
            logging.warning("%d seeds do not split over %d devices: not sharded", len(todo), jax.local_device_count())
            shard = False
        runner = StreamRunner(method, config.loop, config.scan_chunk, scan_unroll=config.scan_unroll,
                              analysis=config.analysis,
                              keep_predictions=config.metrics == "full", batched=batched,
                              shard=shard, stream_map=config.stream_map)
        common = dict(runner=runner, rounds=config.rounds, mixed_seed=config.mixed_seed)
        if batched:
            start = time.perf_counter()
            keys = jnp.stack([jax.random.PRNGKey(s) for s in todo])
            results, _ = run_protocol(method, variables, targets, config.protocol, keys,
                                      label=f"{row_name} seeds {todo}", **common)
            seconds = (time.perf_counter() - start) / len(todo)
            for s, res in zip(todo, split_seeds(results, len(todo))):
                done[s] = summarise_seed_run(config, row_name, hparams, runner, res, targets, s,
                                             fingerprints[s], seconds, workdir, fingerprint_parts[s], manifests)
        else:
            for s in todo:
                start = time.perf_counter()
                results, _ = run_protocol(method, variables, targets, config.protocol, jax.random.PRNGKey(s),
                                          label=f"{row_name} seed {s}", **common)
                done[s] = summarise_seed_run(config, row_name, hparams, runner, results, targets, s,
                                             fingerprints[s], time.perf_counter() - start, workdir,
                                             fingerprint_parts[s], manifests)
        trace_count = runner.trace_count
    return [done[s] for s in seeds], trace_count
