"""Stream loops: drive a method's jitted step over test streams.

The runner owns everything about *how* a stream is consumed — jitting, the
loop form, reset policies, per-image RNG keys, scoring — so methods stay pure
``init``/``step`` pairs.

Loop forms (``loop``):

* ``python`` — a Python loop over one jitted step (fastest on XLA:CPU);
* ``scan`` — ``lax.scan`` over fixed-size chunks of ``scan_chunk`` images
  (one dispatch per chunk), ``scan_unroll`` steps unrolled per iteration.
  The last chunk is padded and a validity mask keeps padded steps from
  touching the state, so every chunk has one shape and the stream compiles
  once whatever its length;
* ``auto`` (default) — ``python`` on CPU, where the forms run within noise
  of each other and the Python loop keeps per-image progress and compiles
  fastest (README, Performance); ``scan`` on GPU/TPU, where per-step dispatch
  and host synchronisation are a larger share of a fast step.

Protocols (reset policies; always adapt-then-predict):

* ``per_target`` — reset model and optimiser at the start of each target domain (GraTa);
* ``continual`` — one state carried through all targets in order, never reset (VPTTA/SPEGC);
* ``long_term`` — continual over ``rounds`` repetitions of the target sequence
  (SPEGC Table 3); results are kept per round;
* ``mixed`` — all target images shuffled into one stream with ``mixed_seed``
  (default 2026; SPEGC Tables A.1/A.2), never reset; results regrouped per domain;
* ``episodic`` — reset before every image.

The mask of an image is used only to score the prediction the step returned,
after the step; it never reaches the method.
"""
from __future__ import annotations

import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tta_jax.metrics import dice_per_channel
from tta_jax.methods.base import Method, shared_leaves

PROTOCOLS = ("per_target", "continual", "long_term", "mixed", "episodic")
LOOPS = ("auto", "python", "scan")
STREAM_MAPS = ("vmap", "map")


def default_loop(backend: str | None = None) -> str:
    """The loop form ``auto`` resolves to on ``backend`` (default: JAX's default backend)."""
    return "python" if (backend or jax.default_backend()) == "cpu" else "scan"


class StreamResult(NamedTuple):
    """Per-image outputs of one target domain (in one round), in stream order."""

    domain: str
    ids: tuple[str, ...]
    dice: np.ndarray             # [N, C]
    info: dict[str, np.ndarray]  # each [N]
    seconds: float
    round: int = 0
    predictions: dict | None = None   # {"pred": bool [N,H,W,C], "prob": [N,H,W,C] (uint8 × 255)} if kept
    positions: np.ndarray | None = None   # index of each image in the whole stream (mixed)


class Progress:
    """Logs images/s and ETA at most every ``every_s`` seconds."""

    def __init__(self, total: int, label: str, every_s: float = 10.0):
        self.total, self.label, self.every_s = total, label, every_s
        self.done, self.start, self.last = 0, time.perf_counter(), time.perf_counter()

    def update(self, n: int = 1, sync=None):
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done == self.total:
            if sync is not None:
                jax.block_until_ready(sync)
                now = time.perf_counter()
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            # The first image includes compilation: its rate says nothing about the ETA.
            eta_text = f"ETA {eta:.0f} s" if self.done > 1 else "compiling"
            logging.info("%s: %d/%d images, %.2f img/s, %s", self.label, self.done, self.total, rate, eta_text)
            self.last = now


class StreamRunner:
    """Jits ``method.step`` (with scoring) once and runs it over streams.

    ``trace_count`` counts how often the step was traced (= compiled); it
    stays 1 across streams and targets of one shape.

    ``stream_map`` says how a batched step maps over the streams: ``vmap``
    (one batched program) or ``map`` (``lax.map``: the streams one after
    another inside the same jitted step). State leaves that the method
    declares shared (``Method.stream_axes`` None: frozen weights, source
    statistics) stay one unbatched copy, so vmapped convolutions stay ordinary
    batched convolutions; per-stream weights (SPEGC adapts every weight) turn
    them into grouped convolutions, which XLA:CPU runs slowly (benchmark mode
    measures both maps).

    ``batched=True`` runs S independent streams (seeds) at once: states and
    RNG keys carry a leading seed axis, images are shared, and the step is
    ``jax.vmap``-ed over the seeds inside one jitted function.  Outputs then
    have a seed axis after the image axis (dice ``[N, S, C]``).  ``shard=True``
    also places the seed axis over all devices (:mod:`tta_jax.sharding`).
    """

    def __init__(self, method: Method, loop: str = "auto", scan_chunk: int = 16, analysis: bool = False,
                 keep_predictions: bool = False, batched: bool = False, shard: bool = False,
                 scan_unroll: int = 1, stream_map: str = "vmap", probabilities_u8: bool = True):
        if loop not in LOOPS:
            raise ValueError(f"unknown loop {loop!r}; choose one of {list(LOOPS)}")
        if int(scan_chunk) < 1 or int(scan_unroll) < 1:
            raise ValueError(f"scan_chunk and scan_unroll must be >= 1, got {scan_chunk}, {scan_unroll}")
        if stream_map not in STREAM_MAPS:
            raise ValueError(f"unknown stream_map {stream_map!r}; choose one of {list(STREAM_MAPS)}")
        loop = default_loop() if loop == "auto" else loop
        self.stream_map = stream_map
        self.method, self.loop, self.scan_chunk, self.scan_unroll = method, loop, int(scan_chunk), int(scan_unroll)
        self.keep_predictions, self.batched = keep_predictions, batched
        # shard: spread the batched streams over all devices (tta_jax.sharding)
        self.shard = shard and batched and jax.local_device_count() > 1
        self.trace_count = 0
        run_analysis = analysis and method.analysis is not None

        def scored_step(state, image, mask, key):
            self.trace_count += 1
            extra = method.analysis(state, image[None], mask[None], key) if run_analysis else {}
            state, logits, info = method.step(state, image[None], key)
            scores = {"dice": dice_per_channel(logits, mask[None])[0], "info": {**info, **extra}}
            if keep_predictions:
                # the binary prediction the Dice is computed from, and the probabilities: 8-bit by
                # default (enough for the 256-threshold E-measure, at 1 byte per pixel)
                prob = jax.nn.sigmoid(logits[0])
                if probabilities_u8:
                    prob = jnp.round(prob * 255).astype(jnp.uint8)
                scores["predictions"] = {"pred": logits[0] > 0, "prob": prob}
            return state, scores

        axes = self.state_axes = method.stream_axes
        if batched and stream_map == "vmap":
            scored_step = jax.vmap(scored_step, in_axes=(axes, None, None, 0), out_axes=(axes, 0))
        elif batched:
            scored_step = _map_streams(scored_step, axes)
        if self.shard:
            from tta_jax.sharding import shard_map_streams
            scored_step = shard_map_streams(scored_step, axes)
        self._scored_step = scored_step
        self._jit_step = jax.jit(scored_step)
        # The python loop donates the carried state (XLA writes the new state into its buffers:
        # one state in memory instead of two, which matters for large models on accelerators;
        # no measurable change in speed on the 2-core CPU). Episodic streams restart every step
        # from the initial state, which must survive, so they use the plain step.
        self._jit_step_donating = jax.jit(scored_step, donate_argnums=0)
        self._jit_chunk = jax.jit(self._chunk, static_argnames=("episodic",))

    def _chunk(self, state, init_state, images, masks, keys, valid, episodic: bool):
        def body(st, xs):
            image, mask, key, ok = xs
            start = init_state if episodic else st
            new, scores = self._scored_step(start, image, mask, key)
            new = jax.lax.cond(ok, lambda: new, lambda: st)  # padded steps keep the state
            return new, scores

        return jax.lax.scan(body, state, (images, masks, keys, valid), unroll=self.scan_unroll)

    def run_stream(self, state, images: np.ndarray, masks: np.ndarray, rng: jax.Array,
                   episodic: bool = False, first_index: int = 0, progress: Progress | None = None):
        """Adapt-then-predict over one stream; returns ``(final_state, scores)``.

        ``scores``: ``dice`` ``[N, C]``, the method's ``info`` (each ``[N]``)
        and, with ``keep_predictions``, ``predictions`` (``pred``, ``prob``).

        The key of image ``i`` is ``fold_in(rng, first_index + i)``, the same
        in both loop forms.
        """
        n = len(images)
        fold = jax.vmap(jax.random.fold_in, in_axes=(0, None)) if self.batched else jax.random.fold_in
        keys = jax.vmap(lambda i: fold(rng, i))(jnp.arange(first_index, first_index + n))
        if self.shard:
            # inputs placed as the sharded step's outputs are, so step 2 does not recompile
            from tta_jax.sharding import shard_streams
            state = shard_streams(state, stream_axes=self.state_axes)
            keys = shard_streams(keys, axis=1)
        init_state = state
        if self.loop == "python":
            per_image = []
            # one transfer of the stream instead of one blocking host→device copy per step
            # (uncommitted arrays: the sharded step may still place them)
            images_dev, masks_dev, keys_dev = jax.device_put((list(images), list(masks), list(keys)))
            if not episodic:
                state = jax.tree.map(jnp.copy, state)   # donated below: the caller's state stays valid
            step = self._jit_step if episodic else self._jit_step_donating
            for i in range(n):
                start = init_state if episodic else state
                state, scores = step(start, images_dev[i], masks_dev[i], keys_dev[i])
                per_image.append(scores)
                if progress:
                    progress.update(1, sync=scores["dice"])
            if not n:
                return state, {"dice": np.zeros((0, masks.shape[-1])), "info": {}}
            return state, jax.tree.map(lambda *xs: np.asarray(jnp.stack(xs)), *per_image)

        c = self.scan_chunk
        chunks = []
        for lo in range(0, n, c):
            hi = min(lo + c, n)
            pad = c - (hi - lo)
            sl = lambda a: np.concatenate([a[lo:hi], np.repeat(a[hi - 1:hi], pad, 0)]) if pad else a[lo:hi]
            valid = np.arange(c) < (hi - lo)
            state, scores = self._jit_chunk(state, init_state, sl(images), sl(masks),
                                            sl(np.asarray(keys)), valid, episodic=episodic)
            chunks.append(jax.tree.map(lambda v: np.asarray(v)[: hi - lo], scores))
            if progress:
                progress.update(hi - lo)
        if not chunks:
            return state, {"dice": np.zeros((0, masks.shape[-1])), "info": {}}
        return state, jax.tree.map(lambda *xs: np.concatenate(xs), *chunks)


def init_streams(method: Method, variables, keys: jax.Array):
    """Initial state of ``len(keys)`` independent streams, laid out as ``method.stream_axes`` says."""
    return jax.vmap(method.init, in_axes=(None, 0), out_axes=method.stream_axes)(variables, keys)


def _map_streams(one_stream, stream_axes):
    """``one_stream`` over the streams one after another with ``lax.map``; shared state leaves pass by."""

    def mapped(state, image, mask, keys):
        leaves, treedef = jax.tree.flatten(state)
        shared = shared_leaves(stream_axes, state)
        own = [leaf for leaf, sh in zip(leaves, shared) if not sh]

        def merge(own_leaves, template):
            it = iter(own_leaves)
            return [t if sh else next(it) for t, sh in zip(template, shared)]

        def one(args):
            own_leaves, key = args
            new, scores = one_stream(jax.tree.unflatten(treedef, merge(own_leaves, leaves)), image, mask, key)
            return [leaf for leaf, sh in zip(jax.tree.leaves(new), shared) if not sh], scores

        new_own, scores = jax.lax.map(one, (own, keys))
        return jax.tree.unflatten(treedef, merge(new_own, leaves)), scores

    return mapped


def split_seeds(results: list[StreamResult], n_seeds: int) -> list[list[StreamResult]]:
    """Per-seed result lists from the results of a batched run (seed axis 1 of every array)."""
    return [[r._replace(dice=r.dice[:, s], info={k: v[:, s] for k, v in r.info.items()},
                        predictions=({k: v[:, s] for k, v in r.predictions.items()} if r.predictions else None))
             for r in results] for s in range(n_seeds)]


def _concat_domains(targets, order):
    """One stream of all target images in ``order`` (indices into their concatenation)."""
    images = np.concatenate([t.images for t in targets])[order]
    masks = np.concatenate([t.masks for t in targets])[order]
    domain_of = np.concatenate([np.full(t.size, i) for i, t in enumerate(targets)])[order]
    ids = np.concatenate([np.asarray(t.ids, dtype=object) for t in targets])[order]
    return images, masks, domain_of, ids


def run_protocol(method: Method, variables, targets: Sequence, protocol: str, rng: jax.Array,
                 loop: str = "auto", scan_chunk: int = 16, label: str = "",
                 runner: StreamRunner | None = None, rounds: int = 5,
                 mixed_seed: int = 2026) -> tuple[list[StreamResult], StreamRunner]:
    """Run ``method`` over the target domains under ``protocol``.

    Args:
      targets: :class:`tta_jax.data.DomainData` per target domain, in order.
      rng: the seed's key.  Image ``i`` of a stream uses ``fold_in(key, i)``;
        ``per_target``/``episodic`` streams use ``key = fold_in(stream_key, t)``,
        the never-reset protocols one key and the global image index.
      rounds: repetitions of the targets for ``long_term``.
      mixed_seed: permutation seed of ``mixed`` (recorded by the caller).
    Returns:
      :class:`StreamResult` per target (per round for ``long_term``), and the runner.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    if protocol == "long_term" and rounds < 1:
        raise ValueError(f"long_term needs rounds >= 1, got {rounds}")
    runner = runner or StreamRunner(method, loop, scan_chunk)
    if runner.batched:
        # rng: [S, 2] keys; every key operation maps over the seed axis
        init_key, stream_key = jnp.moveaxis(jax.vmap(jax.random.split)(rng), 1, 0)
        init = lambda: init_streams(method, variables, init_key)
        fold = lambda key, t: jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, t)
        if runner.shard and len(rng) % jax.local_device_count():
            raise ValueError(f"sharded run: {len(rng)} streams do not split evenly over "
                             f"{jax.local_device_count()} devices; use a multiple or shard_seeds=False")
    else:
        init_key, stream_key = jax.random.split(rng)
        init = lambda: method.init(variables, init_key)
        fold = jax.random.fold_in
    n_rounds = rounds if protocol == "long_term" else 1
    progress = Progress(n_rounds * sum(t.size for t in targets), label or method.name)
    results = []

    if protocol == "mixed":
        order = np.random.default_rng(mixed_seed).permutation(sum(t.size for t in targets))
        images, masks, domain_of, ids = _concat_domains(targets, order)
        start = time.perf_counter()
        _, scores = runner.run_stream(init(), images, masks, stream_key, progress=progress)
        dice, info, preds = scores["dice"], scores["info"], scores.get("predictions")
        seconds = time.perf_counter() - start
        for d, target in enumerate(targets):
            pos = np.nonzero(domain_of == d)[0]
            results.append(StreamResult(
                target.name, tuple(ids[pos]), dice[pos], {k: v[pos] for k, v in info.items()},
                seconds * len(pos) / len(order), 0,
                {k: v[pos] for k, v in preds.items()} if preds else None, pos))
        return results, runner

    state = init()
    offset = 0
    for r in range(n_rounds):
        for t, target in enumerate(targets):
            start = time.perf_counter()
            if protocol in ("continual", "long_term"):
                key, first = stream_key, offset
            else:
                state = init()
                key, first = fold(stream_key, t), 0
            state, scores = runner.run_stream(state, target.images, target.masks, key,
                                                  episodic=protocol == "episodic", first_index=first,
                                                  progress=progress)
            dice, info, preds = scores["dice"], scores["info"], scores.get("predictions")
            results.append(StreamResult(target.name, tuple(target.ids), dice, info,
                                        time.perf_counter() - start, r, preds,
                                        np.arange(offset, offset + target.size)))
            offset += target.size
    return results, runner
