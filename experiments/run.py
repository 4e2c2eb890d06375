"""``run(config, workdir)``: the experiment behind ``experiments.main`` (importable from notebooks).

``mode=adapt`` (default): get the source model (``source_checkpoint``, else the
cached model for the same data/model/training settings, else train one), then
run every method in ``methods`` under ``protocol`` for ``seeds`` seeds on the
target domains, and write ``results.json`` and ``results.md``.

``mode=source``: only get the source model and report its Dice per domain.

``mode=benchmark`` (``configs/benchmark.py``): timing and memory, see :mod:`experiments.benchmark`.

Resumability: each finished (method, seed) run is written atomically to
``workdir/runs/<method>/seed_<s>.json`` with a fingerprint of the settings
that determine it; a re-run with the same settings reuses it.

Seeds: seed ``s`` drives the adaptation RNG (augmentations, dropout) of every
stream; the source model and the stream order are fixed (``source.seed``,
dataset order) so that methods are compared on the same model and images.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tta_jax import checkpoints, report
from tta_jax.data import DATASETS, DomainData, get_dataset
from tta_jax.methods import available_methods, make_method
from tta_jax.metrics import FULL_METRICS, domain_summary, full_metrics
from tta_jax.models import ResUNet, init_variables
from tta_jax.runner import LOOPS, PROTOCOLS, STREAM_MAPS, StreamRunner, default_loop, run_protocol, split_seeds
from tta_jax.adversarial import train_adversarial_source
from tta_jax.methods.adv_ttt import parse_strides
from tta_jax.models import MaskDiscriminator
from tta_jax.training import evaluate_source_stats, train_source

MODES = ("adapt", "source", "benchmark")
METRIC_SETS = ("dice", "full")
SOURCE_CACHE_VERSION = 1  # bump when source training changes meaning


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in str(value or "").split(",") if v.strip()]


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_method(config, name: str) -> tuple[str, dict]:
    """Map a ``methods`` entry to (registered method, hyperparameters).

    An entry is either a registered method (hyperparameters from the config
    sub-dict of the same name) or a key of ``config.variants``: a dict with
    ``method`` plus the hyperparameters it overrides, e.g. the rows of the
    GraTa ablation tables.
    """
    variants = config.get("variants", None) or {}
    if name in variants:
        spec = dict(variants[name])
        if "method" not in spec:
            raise ValueError(f"config.variants.{name} needs a 'method' key")
        base = spec.pop("method")
    else:
        base, spec = name, {}
    if base not in available_methods():
        raise ValueError(f"unknown method {name!r}; available methods: {available_methods()}"
                         + (f"; variants: {sorted(variants)}" if variants else ""))
    hparams = config[base].to_dict() if base in config else {}
    if base == "adv_ttt" and "adversarial" in config:
        # One place for Δ's architecture: the adversarial source stage that trained it.
        hparams.update(disc_width=config.adversarial.disc_width, disc_strides=config.adversarial.disc_strides)
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(hparams.get(key), dict):
            hparams[key] = {**hparams[key], **value}
        else:
            hparams[key] = value
    return base, hparams


def validate_config(config) -> None:
    """Check the names and ranges a run depends on before any work starts."""
    if config.mode not in MODES:
        raise ValueError(f"unknown mode {config.mode!r}; choose one of {list(MODES)}")
    if config.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {config.dataset!r}; choose one of {list(DATASETS)}")
    if config.protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {config.protocol!r}; choose one of {list(PROTOCOLS)}")
    if config.loop not in LOOPS:
        raise ValueError(f"unknown loop {config.loop!r}; choose one of {list(LOOPS)}")
    if config.stream_map not in STREAM_MAPS:
        raise ValueError(f"unknown stream_map {config.stream_map!r}; choose one of {list(STREAM_MAPS)}")
    methods = _split_list(config.methods)
    if config.mode == "adapt" and not methods:
        raise ValueError("config.methods is empty")
    if config.mode == "benchmark":
        methods = _split_list(config.benchmark.methods)
    for m in methods:
        base, _ = resolve_method(config, m)
        # (the benchmark times adv_ttt with a random discriminator)
        if base == "adv_ttt" and config.mode == "adapt" and not (config.source.adversarial
                                                                  or config.source_checkpoint):
            raise ValueError(f"method {m!r} needs the mask discriminator of an adversarial source stage: "
                             "set --config.source.adversarial=True (configs/adv_ttt.py does)")
    if config.image_size < 32 or config.image_size % 32:
        raise ValueError(f"image_size must be a positive multiple of 32, got {config.image_size}")
    if config.max_target_images < 0:
        raise ValueError(f"max_target_images must be >= 0 (0: every image), got {config.max_target_images}")
    if config.seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {config.seeds}")
    if config.metrics not in METRIC_SETS:
        raise ValueError(f"unknown metrics {config.metrics!r}; choose one of {list(METRIC_SETS)}")
    if config.protocol == "long_term" and config.rounds < 1:
        raise ValueError(f"rounds must be >= 1 for long_term, got {config.rounds}")


def setup_compilation_cache(config) -> None:
    if config.compilation_cache:
        path = os.path.join(os.path.expanduser(config.cache_dir), "xla_cache")
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def make_dataset(config):
    kwargs = {}
    if config.dataset == "synthetic_fundus":
        kwargs = dict(config.synthetic)
    elif config.dataset not in ("folders",):
        kwargs = dict(tfds_dir=config.tfds_dir, image_size=config.image_size, normalisation=config.normalisation)
    return get_dataset(config.dataset, config.data_dir, **kwargs)


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
    return DomainData(data.name, data.images[keep], data.masks[keep], tuple(data.ids[i] for i in keep))


def resolve_domains(config, dataset) -> tuple[str, list[str]]:
    source = config.source_domain
    if source not in dataset.domains:
        if source == "all":
            raise ValueError("source_domain=all (leave-one-domain grid) is handled by run()")
        raise ValueError(f"unknown source_domain {source!r}; domains of {config.dataset}: {list(dataset.domains)}")
    targets = _split_list(config.target_domains) or [d for d in dataset.domains if d != source]
    for t in targets:
        if t not in dataset.domains:
            raise ValueError(f"unknown target domain {t!r}; domains of {config.dataset}: {list(dataset.domains)}")
    if not targets:
        raise ValueError("no target domains")
    return source, targets


def build_model(config, num_classes: int) -> ResUNet:
    return ResUNet(backbone=config.model.backbone, num_classes=num_classes, width=config.model.width,
                   aux_heads=tuple(_split_list(config.model.aux_heads)), sr_factor=config.model.sr_factor)


def source_settings(config) -> dict:
    """Everything that determines the source model (the cache key)."""
    data_dir = str(Path(config.data_dir).expanduser().resolve()) if config.data_dir else ""
    settings = dict(version=SOURCE_CACHE_VERSION, dataset=config.dataset, data_dir=data_dir,
                    source_domain=config.source_domain, image_size=config.image_size,
                    model=config.model.to_dict(), source=config.source.to_dict())
    if config.dataset == "synthetic_fundus":
        settings["synthetic"] = config.synthetic.to_dict()
    if config.source.adversarial:
        settings["adversarial"] = config.adversarial.to_dict()
    return settings


def discriminator_of(config) -> MaskDiscriminator:
    return MaskDiscriminator(config.adversarial.disc_width, parse_strides(config.adversarial.disc_strides))


def get_source_model(config, model, dataset, source: str):
    """Restore ``source_checkpoint`` or the cached model, else train and cache one."""
    template = init_variables(model, jax.random.PRNGKey(config.source.seed), config.image_size)
    if config.source.adversarial:
        disc_template = discriminator_of(config).init(
            jax.random.PRNGKey(config.source.seed + 1),
            jnp.zeros((1, config.image_size, config.image_size, model.num_classes)))
        template = {**template, "discriminator": disc_template}
    template = jax.device_get(template)
    if config.source_checkpoint:
        path = Path(os.path.expanduser(config.source_checkpoint))
        if path.suffix in (".pth", ".pt"):
            # official PyTorch weights (e.g. GraTa/VPTTA last-Res_Unet.pth)
            from tta_jax.models.convert import load_torch_state_dict, torch_state_dict_to_flax
            variables, ignored = torch_state_dict_to_flax(load_torch_state_dict(path), template)
            return variables, {"checkpoint": str(path), "trained_now": False, "format": "pytorch",
                               "ignored_keys": ignored}
        variables = checkpoints.restore_variables(path, template)
        return variables, {"checkpoint": str(path), "trained_now": False}
    settings = source_settings(config)
    ckpt_dir = Path(os.path.expanduser(config.cache_dir)) / "source_models" / _hash(settings)
    if (ckpt_dir / "meta.json").exists():
        logging.info("reusing cached source model %s", ckpt_dir)
        try:
            variables = checkpoints.restore_variables(ckpt_dir, template)
            return variables, {"checkpoint": str(ckpt_dir), "trained_now": False,
                               **checkpoints.load_meta(ckpt_dir).get("training", {})}
        except checkpoints.CheckpointError as e:
            logging.warning("cached source model unusable (%s); training a new one", e)
    train = dataset.load(source, "train", config.image_size)
    logging.info("training the source model on %s (%d images, %d steps)", source, train.size, config.source.steps)
    start = time.perf_counter()
    if config.source.adversarial:
        if model.aux_heads:
            raise ValueError("source.adversarial does not train auxiliary heads; leave model.aux_heads empty")
        seg_template = {k: v for k, v in template.items() if k != "discriminator"}
        variables, history = train_adversarial_source(
            model, discriminator_of(config), seg_template, template["discriminator"], train.images, train.masks,
            jax.random.PRNGKey(config.source.seed), steps=config.source.steps,
            batch_size=config.source.batch_size, lr=config.source.lr, optimizer=config.source.optimizer,
            photometric=config.source.photometric, hp=config.adversarial.to_dict())
    else:
        variables, history = train_source(
            model, template, train.images, train.masks, jax.random.PRNGKey(config.source.seed),
            steps=config.source.steps, batch_size=config.source.batch_size, lr=config.source.lr,
            optimizer=config.source.optimizer, photometric=config.source.photometric,
            denoise_std=config.source.denoise_std)
    info = {"train_seconds": time.perf_counter() - start, "loss_history": history, "train_images": train.size}
    checkpoints.save_variables(ckpt_dir, variables, {"settings": settings, "training": info})
    logging.info("source model saved to %s", ckpt_dir)
    return jax.device_get(variables), {"checkpoint": str(ckpt_dir), "trained_now": True, **info}


def segmentor_variables(variables) -> dict:
    """The segmentor's collections only (drops the discriminator of an adversarial source model)."""
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def _seed_run_path(workdir: Path, method: str, seed: int) -> Path:
    return workdir / "runs" / method / f"seed_{seed}.json"


def load_finished_run(workdir: Path, row_name: str, seed: int, fingerprint: str) -> dict | None:
    """A finished (method, seed) result with the same fingerprint, else None."""
    path = _seed_run_path(workdir, row_name, seed)
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        logging.warning("ignoring corrupt partial result %s", path)
        return None
    return saved if saved.get("fingerprint") == fingerprint else None


def summarise_seed_run(config, row_name, hparams, runner, results, targets, seed, fingerprint, seconds, workdir):
    """Per-domain summaries (and per-image records) of one seed's results; written atomically."""
    channel_names = targets[0].channel_names
    masks_by_id = {t.name: {i: m for i, m in zip(t.ids, t.masks)} for t in targets}
    out = {
        "method": row_name, "registered_method": runner.method.name, "seed": seed,
        "fingerprint": fingerprint, "hparams": hparams, "protocol": config.protocol,
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
                {ch: full_metrics(np.asarray(prob[..., c]) / 255.0, masks_by_id[r.domain][i][..., c])
                 for c, ch in enumerate(channel_names)}
                for i, prob in zip(r.ids, r.predictions["prob_u8"])]
        out["per_image"].append(entry)
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


def run_method_seeds(config, row_name, hparams, method, variables, targets, seeds, fingerprints, workdir):
    """All seeds of one method: reuse finished runs; run the rest vmapped in one stream (or one by one)."""
    done = {s: load_finished_run(workdir, row_name, s, fingerprints[s]) for s in seeds}
    todo = [s for s in seeds if done[s] is None]
    for s in seeds:
        if done[s] is not None:
            logging.info("%s seed %d: reusing finished run", row_name, s)
    trace_count = 0
    if todo:
        batched = config.vmap_seeds and len(todo) > 1
        shard = config.shard_seeds and batched and jax.device_count() > 1
        if shard and len(todo) % jax.device_count():
            logging.warning("%d seeds do not split over %d devices: not sharded", len(todo), jax.device_count())
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
                                             fingerprints[s], seconds, workdir)
        else:
            for s in todo:
                start = time.perf_counter()
                results, _ = run_protocol(method, variables, targets, config.protocol, jax.random.PRNGKey(s),
                                          label=f"{row_name} seed {s}", **common)
                done[s] = summarise_seed_run(config, row_name, hparams, runner, results, targets, s,
                                             fingerprints[s], time.perf_counter() - start, workdir)
        trace_count = runner.trace_count
    return [done[s] for s in seeds], trace_count


class _Named:
    """DomainData plus the dataset's channel names (for summaries)."""

    def __init__(self, data, channel_names):
        self._data, self.channel_names = data, channel_names

    def __getattr__(self, name):
        return getattr(self._data, name)



def run(config, workdir: str) -> dict:
    """Run the experiment described by ``config``; results go to ``workdir``.

    ``source_domain=all`` runs the leave-one-domain grid: every domain as the
    source with the others as targets (each in ``workdir/<source>/``), then
    merges them into ``workdir/merged.{md,csv,json}``.
    """
    validate_config(config)
    if config.mode == "benchmark":
        from experiments.benchmark import run_benchmark
        return run_benchmark(config, workdir)
    setup_compilation_cache(config)
    if config.source_domain == "all":
        return run_grid(config, workdir)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dataset = make_dataset(config)
    source, targets = resolve_domains(config, dataset)
    channel_names = dataset.channel_names
    model = build_model(config, len(channel_names))
    variables, source_info = get_source_model(config, model, dataset, source)

    # The source model without adaptation on every domain (held-out split of its own domain).
    own = dataset.load(source, "test", config.image_size)
    source_info["own_domain_heldout"] = domain_summary(
        evaluate_source_stats(model, segmentor_variables(variables), own.images, own.masks), channel_names)
    logging.info("source model on %s (held-out): %s", source, source_info["own_domain_heldout"])

    # Targets use every image (GraTa: train + test of a target); the synthetic
    # benchmark's held-out part keeps CPU runs short.
    target_split = "all" if config.dataset != "synthetic_fundus" else "test"
    target_data = [_Named(subsample_stream(dataset.load(t, target_split, config.image_size),
                                           config.max_target_images), channel_names) for t in targets]
    for t in target_data:
        if t.size == 0:
            raise ValueError(f"target domain {t.name!r} is empty")

    results = {
        "dataset": config.dataset, "data_dir": config.data_dir, "source_domain": source,
        "target_domains": targets, "target_split": target_split, "protocol": config.protocol,
        "channels": list(channel_names), "seeds": list(range(config.seed, config.seed + config.seeds)),
        "source": source_info, "methods": {}, "config": config.to_dict(),
        "stream_ids": {t.name: list(t.ids) for t in target_data}, "timings": {},
    }
    if config.mode == "source":
        results["source"]["targets_no_adapt"] = {
            t.name: domain_summary(evaluate_source_stats(model, segmentor_variables(variables), t.images, t.masks), channel_names)
            for t in target_data}
        _write_results(workdir, results, _source_table(results))
        return results

    # the resolved loop form (auto → python on CPU), so runs made before ``auto`` existed resume
    loop = default_loop() if config.loop == "auto" else config.loop
    base_fp = {"source": source_settings(config), "checkpoint": str(config.source_checkpoint),
               "targets": targets, "protocol": config.protocol, "loop": loop,
               "scan_chunk": config.scan_chunk, "target_split": target_split, "analysis": config.analysis,
               "metrics": config.metrics, "rounds": config.rounds if config.protocol == "long_term" else None,
               "mixed_seed": config.mixed_seed if config.protocol == "mixed" else None}
    if config.max_target_images:
        base_fp["max_target_images"] = config.max_target_images
    if loop == "scan" and config.scan_unroll != 1:
        base_fp["scan_unroll"] = config.scan_unroll
    runs_by_method = {}
    for method_name in _split_list(config.methods):
        base, hparams = resolve_method(config, method_name)
        m_start = time.perf_counter()
        fingerprints = {seed: _hash({**base_fp, "method": base, "hparams": hparams, "seed": seed})
                        for seed in results["seeds"]}
        runs, trace_count = run_method_seeds(config, method_name, hparams, make_method(base, model, hparams),
                                             variables, target_data, results["seeds"], fingerprints, workdir)
        runs_by_method[method_name] = runs
        agg = report.aggregate_method(runs, targets, channel_names)
        agg["trace_count"] = trace_count   # compilations of this call (0 when every seed was reused)
        agg["seconds_per_seed"] = [r["seconds"] for r in runs]
        results["methods"][method_name] = agg
        results["timings"][method_name] = time.perf_counter() - m_start
    if config.worst_fraction and "no_adapt" in runs_by_method:
        results["worst_images"] = report.worst_images(runs_by_method, "no_adapt", config.worst_fraction)
    results["timings"]["total"] = time.perf_counter() - t0
    table = _adapt_table(results)
    _write_results(workdir, results, table)
    return results


def run_grid(config, workdir) -> dict:
    """Leave-one-domain grid: one run per source domain, then one merged table."""
    from experiments.report import merge
    dataset = make_dataset(config)
    runs = {}
    for source in dataset.domains:
        sub = config.copy_and_resolve_references()
        with sub.unlocked():
            sub.source_domain = source
            sub.target_domains = ",".join(d for d in dataset.domains if d != source)
        logging.info("grid: source %s → %s", source, sub.target_domains)
        runs[source] = run(sub, str(Path(workdir) / source))
    table = merge([Path(workdir) / s for s in runs], workdir)
    print(table, flush=True)
    return {"grid": runs, "merged_table": table}


def _adapt_table(results) -> str:
    targets, methods = results["target_domains"], results["methods"]
    own = results["source"]["own_domain_heldout"]
    lines = [f"# {results['dataset']}: source {results['source_domain']} → {', '.join(targets)}",
             f"protocol {results['protocol']}, seeds {results['seeds']}, Dice ×100 (mean ± std over seeds)", "",
             report.markdown_table(methods, targets), ""]
    if len(results["channels"]) > 1:
        for ch in results["channels"]:
            lines += [f"Dice of channel `{ch}`:", "", report.markdown_table(methods, targets, key=ch), ""]
    if all("metrics" in agg for agg in methods.values()):
        lines += ["All metrics (per-channel mean, averaged over targets):", "", report.metrics_table(methods), ""]
    if all("round_means" in agg for agg in methods.values()):
        lines += [f"Long-term protocol ({results['config']['rounds']} rounds):", "",
                  report.rounds_table(methods), ""]
    if "worst_images" in results:
        lines += ["Per-image Dice (channel mean) over all target images and over the images no_adapt "
                  "segments worst:", "", report.worst_images_table(results["worst_images"]), ""]
    if results["protocol"] == "mixed":
        lines += [f"Mixed stream: all target images shuffled with seed {results['config']['mixed_seed']}.", ""]
    lines.append(f"Source model on its own domain {results['source_domain']} (held-out, no adaptation): "
                 f"{own['mean']:.2f}")
    return "\n".join(lines)


def _source_table(results) -> str:
    rows = ["| domain | " + " | ".join(results["channels"]) + " | mean |",
            "|" + "---|" * (len(results["channels"]) + 2)]
    entries = {f"{results['source_domain']} (source, held-out)": results["source"]["own_domain_heldout"],
               **results["source"]["targets_no_adapt"]}
    for name, s in entries.items():
        rows.append(f"| {name} | " + " | ".join(f"{s[c]:.2f}" for c in results["channels"]) + f" | {s['mean']:.2f} |")
    return "\n".join(rows)


def _write_results(workdir: Path, results: dict, table: str) -> None:
    checkpoints.atomic_write_text(workdir / "results.json", json.dumps(results, indent=1, default=float))
    checkpoints.atomic_write_text(workdir / "results.md", table + "\n")
    if results["methods"]:
        checkpoints.atomic_write_text(workdir / "results.csv", report.merged_csv(report.merged_rows([results])))
        if results["config"].get("plots", False):
            from experiments import plots
            results["figures"] = plots.write_all(results, workdir)
    print(table, flush=True)
    logging.info("results written to %s", workdir)
