"""``run(config, workdir)``: a whole experiment from a config (the CLI and notebooks call this).

``mode=adapt`` (default): get the source model (:mod:`tta_jax.source`), run
every method in ``methods`` under ``protocol`` for ``seeds`` seeds on the
target domains (:mod:`tta_jax.evaluate`), and write ``results.json``,
``results.md``, ``results.csv`` and figures.

``mode=source``: only get the source model and report its Dice per domain.

``source_domain=all`` runs the leave-one-domain grid and merges the tables.

Seeds: seed ``s`` drives the adaptation RNG (augmentations, dropout) of every
stream; the source model and the stream order are fixed (``source.seed``,
dataset order) so that methods are compared on the same model and images.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
from absl import logging

from tta_jax import checkpoints, distributed, report
from tta_jax.data import DATASETS, get_dataset
from tta_jax.evaluate import run_method_seeds, subsample_stream, with_channels
from tta_jax.data.folders import FolderOptions
from tta_jax.hparams import HParamError, as_dict, from_mapping
from tta_jax.methods import available_methods, make_method, method_hparams, method_spec
from tta_jax.metrics import domain_summary
from tta_jax.models.resunet import COMPUTE_DTYPES
from tta_jax.runner import LOOPS, PROTOCOLS, STREAM_MAPS, default_loop
from tta_jax.data.digest import manifest, manifest_digest
from tta_jax.source import build_model, companions, get_source_model, merge_needs, segmentor_variables
from tta_jax.source.lifecycle import split_list
from tta_jax.source.adversarial import AdversarialHParams
from tta_jax.source.dae import DAEHParams
from tta_jax.source.universe import UniverseHParams
from tta_jax.source.training import SourceTraining, evaluate_source_stats

MODES = ("adapt", "source", "benchmark")
METRIC_SETS = ("dice", "full")
DISTANCE_UNITS = ("resized_pixels", "native_pixels")
# data families whose methods may declare their own defaults (e.g. SPEGC's lr for polyps)
DATASET_FAMILIES = {"synthetic_fundus": "fundus", "fundus_odoc": "fundus", "fundus_dofe": "fundus",
                    "polyp": "polyp", "prostate_saml": "prostate"}


def data_family(config) -> str:
    """``config.data_family``, or the family of a known dataset ("" for a ``folders`` set without one)."""
    return config.get("data_family", "") or DATASET_FAMILIES.get(config.dataset, "")


def resolve_method(config, name: str):
    """Map a ``methods`` entry to (registered method, checked hyperparameters).

    An entry is either a registered method (hyperparameters from the config
    sub-dict of the same name) or a key of ``config.variants``: a dict with
    ``method`` plus the hyperparameters it overrides, e.g. the rows of the
    GraTa ablation tables. Hyperparameters left unset (``None``) in the config
    take the method's default for the data family, else its declared default.
    """
    variants = config.get("variants", None) or {}
    if name in variants:
        spec = dict(variants[name])
        if "method" not in spec:
            raise HParamError(f"config.variants.{name} needs a 'method' key")
        base = spec.pop("method")
    else:
        base, spec = name, {}
    if base not in available_methods():
        raise HParamError(f"unknown method {name!r}; available methods: {', '.join(available_methods())}"
                          + (f"; variants: {', '.join(sorted(variants))}" if variants else ""))
    values = config[base].to_dict() if base in config else {}
    family = method_spec(base).family_defaults.get(data_family(config), {})
    values = {k: family.get(k) if v is None else v for k, v in values.items()}
    values = {k: v for k, v in values.items() if v is not None}
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return base, method_hparams(base, values)


def method_rows(config) -> list[str]:
    return split_list(config.methods)


def run_needs(config, names):
    return merge_needs([method_spec(b).needs(hp) for b, hp in (resolve_method(config, m) for m in names)])


def validate_config(config) -> None:
    """Check the names and ranges a run depends on before any work starts."""
    for key, value, choices in (("mode", config.mode, MODES), ("dataset", config.dataset, DATASETS),
                                ("protocol", config.protocol, PROTOCOLS), ("loop", config.loop, LOOPS),
                                ("stream_map", config.stream_map, STREAM_MAPS),
                                ("metrics", config.metrics, METRIC_SETS),
                                ("distance_unit", config.distance_unit, DISTANCE_UNITS),
                                ("model.compute_dtype", config.model.get("compute_dtype", "float32"),
                                 tuple(COMPUTE_DTYPES))):
        if value not in choices:
            raise HParamError(f"unknown {key} {value!r}; choose one of {', '.join(choices)}")
    methods = method_rows(config)
    if config.mode == "adapt" and not methods:
        raise HParamError("config.methods is empty")
    if config.mode == "benchmark":
        methods = split_list(config.benchmark.methods)
        for dtype in split_list(config.benchmark.get("dtypes", "")):
            if dtype not in COMPUTE_DTYPES:
                raise HParamError(f"unknown benchmark.dtypes entry {dtype!r}; choose from {', '.join(COMPUTE_DTYPES)}")
    run_needs(config, methods)   # every row's hyperparameters are checked here
    if config.mode == "adapt" and config.compare_to and config.compare_to not in methods:
        raise HParamError(f"compare_to={config.compare_to!r} is not among the compared methods "
                          f"({', '.join(methods)})")
    from_mapping(SourceTraining, config.source, "source")
    from_mapping(AdversarialHParams, config.adversarial, "adversarial")
    from_mapping(DAEHParams, config.dae, "dae")
    from_mapping(UniverseHParams, config.universe, "universe")
    if config.dataset == "folders":
        from_mapping(FolderOptions, config.folders, "folders").channel_names()
    if config.image_size < 32 or config.image_size % 32:
        raise HParamError(f"image_size must be a positive multiple of 32, got {config.image_size}")
    if config.max_target_images < 0:
        raise HParamError(f"max_target_images must be >= 0 (0: every image), got {config.max_target_images}")
    if config.seeds < 1:
        raise HParamError(f"seeds must be >= 1, got {config.seeds}")
    if config.protocol == "long_term" and config.rounds < 1:
        raise HParamError(f"rounds must be >= 1 for long_term, got {config.rounds}")


def setup_compilation_cache(config) -> None:
    if config.compilation_cache:
        path = os.path.join(os.path.expanduser(config.cache_dir), "xla_cache")
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def make_dataset(config):
    kwargs = {}
    if config.dataset == "synthetic_fundus":
        kwargs = dict(config.synthetic)
    elif config.dataset == "folders":
        kwargs = config.folders.to_dict()
    else:
        kwargs = dict(tfds_dir=config.tfds_dir, image_size=config.image_size, normalisation=config.normalisation)
    return get_dataset(config.dataset, config.data_dir, **kwargs)


def resolve_domains(config, dataset) -> tuple[str, list[str]]:
    source = config.source_domain
    if source not in dataset.domains:
        if source == "all":
            raise HParamError("source_domain=all (leave-one-domain grid) is handled by run()")
        raise HParamError(f"unknown source_domain {source!r}; domains of {config.dataset}: {list(dataset.domains)}")
    targets = split_list(config.target_domains) or [d for d in dataset.domains if d != source]
    for t in targets:
        if t not in dataset.domains:
            raise HParamError(f"unknown target domain {t!r}; domains of {config.dataset}: {list(dataset.domains)}")
    repeated = sorted({t for t in targets if targets.count(t) > 1})
    if repeated:
        raise HParamError(f"target_domains lists {', '.join(repeated)} more than once")
    if source in targets and config.dataset != "synthetic_fundus":
        # the source model trained on most of its own domain: scoring it there would mix seen images in
        raise HParamError(f"the source domain {source!r} is also a target; remove it from target_domains "
                          "(its held-out split is reported separately)")
    if not targets:
        raise HParamError("no target domains")
    return source, targets


def check_writable(workdir: Path) -> None:
    """Fail before any work if results could not be written to ``workdir``."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


def run(config, workdir: str) -> dict:
    """Run the experiment described by ``config``; results go to ``workdir``.

    ``source_domain=all`` runs the leave-one-domain grid: every domain as the
    source with the others as targets (each in ``workdir/<source>/``), then
    merges them into ``workdir/merged.{md,csv,json}``.
    """
    validate_config(config)
    if config.mode == "benchmark":
        raise HParamError("mode=benchmark runs through tta_jax.benchmark.run_benchmark (experiments.main)")
    if config.distributed.enabled:
        distributed.initialize(config.distributed.coordinator, config.distributed.num_processes,
                               config.distributed.process_id)
    setup_compilation_cache(config)
    if config.source_stages:
        return run_source_stages(config, workdir)
    if jax.process_count() > 1 and config.mode == "adapt":
        return run_distributed(config, workdir)
    if config.source_domain == "all":
        return run_grid(config, workdir)
    return run_single(config, workdir)


def source_model(config, dataset, source: str):
    """(model, variables, source info) for ``source``: restored, reused from the cache or trained."""
    needs = run_needs(config, method_rows(config))
    model = build_model(config, len(dataset.channel_names), needs)
    variables, source_info = get_source_model(config, model, dataset, source, needs)
    return model, variables, source_info


def run_single(config, workdir) -> dict:
    """One source, its targets, every compared row and seed: the table in ``workdir``."""
    workdir = Path(workdir)
    check_writable(workdir)
    t0 = time.perf_counter()
    dataset = make_dataset(config)
    source, targets = resolve_domains(config, dataset)
    channel_names = dataset.channel_names
    rows = method_rows(config)
    needs = run_needs(config, rows)
    model, variables, source_info = source_model(config, dataset, source)
    segmentor = segmentor_variables(variables)

    # The source model without adaptation on its own domain (held-out split).
    own = dataset.load(source, "test", config.image_size)
    source_info["own_domain_heldout"] = domain_summary(
        evaluate_source_stats(model, segmentor, own.images, own.masks), channel_names)
    logging.info("source model on %s (held-out): %s", source, source_info["own_domain_heldout"])

    # Targets use every image (GraTa: train + test of a target); the synthetic
    # benchmark's held-out part keeps CPU runs short.
    target_split = "all" if config.dataset != "synthetic_fundus" else "test"
    target_data = [with_channels(subsample_stream(dataset.load(t, target_split, config.image_size),
                                                  config.max_target_images), channel_names) for t in targets]
    for t in target_data:
        if t.size == 0:
            raise HParamError(f"target domain {t.name!r} is empty")

    results = {
        "dataset": config.dataset, "data_dir": config.data_dir, "source_domain": source,
        "target_domains": targets, "target_split": target_split, "protocol": config.protocol,
        "channels": list(channel_names), "seeds": list(range(config.seed, config.seed + config.seeds)),
        "source": source_info, "methods": {}, "config": config.to_dict(),
        "stream_ids": {t.name: list(t.ids) for t in target_data}, "timings": {},
    }
    if config.mode == "source":
        results["source"]["targets_no_adapt"] = {
            t.name: domain_summary(evaluate_source_stats(model, segmentor, t.images, t.masks), channel_names)
            for t in target_data}
        write_results(workdir, results, report.source_table(results))
        return results

    # the resolved loop form (auto → python on CPU), so a resumed run matches on any spelling
    loop = default_loop() if config.loop == "auto" else config.loop
    manifests = {t.name: manifest(t) for t in target_data}
    base_fp = {"source_model": source_info["identity"],
               "targets": {name: manifest_digest(m) for name, m in manifests.items()},
               "protocol": config.protocol, "loop": loop,
               "scan_chunk": config.scan_chunk, "target_split": target_split, "analysis": config.analysis,
               "metrics": config.metrics, "rounds": config.rounds if config.protocol == "long_term" else None,
               "mixed_seed": config.mixed_seed if config.protocol == "mixed" else None}
    if config.max_target_images:
        base_fp["max_target_images"] = config.max_target_images
    if config.metrics == "full" and config.distance_unit != "resized_pixels":
        base_fp["distance_unit"] = config.distance_unit
    if loop == "scan" and config.scan_unroll != 1:
        base_fp["scan_unroll"] = config.scan_unroll
    nets = companions(config, needs)
    runs_by_method = {}
    for row in rows:
        base, hp = resolve_method(config, row)
        hparams = as_dict(hp)
        m_start = time.perf_counter()
        parts = {seed: {**base_fp, "method": base, "hparams": hparams, "seed": seed} for seed in results["seeds"]}
        wanted = method_spec(base).needs(hp).companions
        method = make_method(base, model, hp, **{c: nets[c] for c in wanted})
        method_variables = {**segmentor, **{c: variables[c] for c in wanted}}
        runs, trace_count = run_method_seeds(config, row, hparams, method, method_variables, target_data,
                                             results["seeds"], parts, workdir, manifests)
        runs_by_method[row] = runs
        agg = report.aggregate_method(runs, targets, channel_names)
        agg["trace_count"] = trace_count   # compilations of this call (0 when every seed was reused)
        agg["seconds_per_seed"] = [r["seconds"] for r in runs]
        agg["skipped_steps"] = [r.get("skipped_steps", 0) for r in runs]   # per seed, non-finite steps
        results["methods"][row] = agg
        results["timings"][row] = time.perf_counter() - m_start
    results["harm"] = report.harm(runs_by_method) if "no_adapt" in runs_by_method else None
    if config.compare_to:
        results["harm_vs_reference"] = report.harm(runs_by_method, reference=config.compare_to)
    if config.worst_fraction and "no_adapt" in runs_by_method:
        results["worst_images"] = report.worst_images(runs_by_method, "no_adapt", config.worst_fraction)
    results["timings"]["total"] = time.perf_counter() - t0
    write_results(workdir, results, report.adapt_table(results))
    return results


def run_grid(config, workdir) -> dict:
    """Leave-one-domain grid: one run per source domain, then one merged table."""
    runs = {}
    for sub, sub_workdir in sweep_plans(config, workdir):
        logging.info("grid: source %s → %s", sub.source_domain, sub.target_domains)
        runs[sub.source_domain] = run_single(sub, sub_workdir)
    table = report.merge_workdirs([Path(workdir) / s for s in runs], workdir)
    print(table, flush=True)
    return {"grid": runs, "merged_table": table}


def sweep_plans(config, workdir) -> list[tuple]:
    """(config, workdir) of each source of the sweep: every domain for ``source_domain=all``, else one."""
    if config.source_domain != "all":
        return [(config, Path(workdir))]
    dataset = make_dataset(config)
    plans = []
    for source in dataset.domains:
        sub = config.copy_and_resolve_references()
        with sub.unlocked():
            sub.source_domain = source
            sub.target_domains = ",".join(d for d in dataset.domains if d != source)
        plans.append((sub, Path(workdir) / source))
    return plans


def run_distributed(config, workdir) -> dict:
    """The sweep's (source, row, seed) cells over all processes (:mod:`tta_jax.distributed`).

    Three phases, each closed by a barrier: the source models (each source on
    one process, so no two processes train the same into the shared cache);
    this process's cells, each a one-row, one-seed run into its source's
    workdir; then process 0 runs every source's full table, which reuses all
    finished cells (and merges the grid).
    """
    plans = sweep_plans(config, workdir)
    mesh = distributed.process_mesh()
    for plan_config, _ in distributed.cells_of_this_process(plans, mesh):
        dataset = make_dataset(plan_config)
        source_model(plan_config, dataset, resolve_domains(plan_config, dataset)[0])
    distributed.barrier("tta_jax: source models")
    cells = [(i, row, seed) for i, (c, _) in enumerate(plans) for row in method_rows(c)
             for seed in range(c.seed, c.seed + c.seeds)]
    mine = distributed.cells_of_this_process(cells, mesh)
    logging.info("process %d of %d: %d of %d cells", jax.process_index(), jax.process_count(), len(mine), len(cells))
    for i, row, seed in mine:
        cell = plans[i][0].copy_and_resolve_references()
        with cell.unlocked():
            cell.methods, cell.seed, cell.seeds = row, seed, 1
            cell.plots, cell.compare_to, cell.worst_fraction = False, "", 0.0
        run_single(cell, plans[i][1])
    distributed.barrier("tta_jax: cells")
    out = {"process": jax.process_index(), "cells": [(plans[i][0].source_domain, row, seed) for i, row, seed in mine]}
    if jax.process_index() == 0:
        out["runs"] = {c.source_domain: run_single(c, w) for c, w in plans}
        if config.source_domain == "all":
            out["merged_table"] = report.merge_workdirs([w for _, w in plans], workdir)
    distributed.barrier("tta_jax: report")
    return out


def run_source_stages(config, workdir) -> dict:
    """An ablation over source stages: one run per entry of ``config.source_stages``, one merged table.

    Each entry (``{name: {"methods": ..., "overrides": {section: {key: value}}}}``)
    runs ``methods`` on the source model that its overrides produce (e.g.
    ``{"adversarial": {"smoothness": False}}``) in ``workdir/<name>/``; the
    merged table names each row ``<name>/<method>``. Entries run in the order of their names
    (ConfigDict sorts its keys): number them to fix the order.
    """
    runs = {}
    for name, stage in config.source_stages.items():
        sub = config.copy_and_resolve_references()
        with sub.unlocked():
            sub.source_stages = {}
            sub.methods = stage.methods
            for section, values in dict(stage.get("overrides", {})).items():
                for key, value in dict(values).items():
                    if section not in sub or key not in sub[section]:
                        raise HParamError(f"source_stages.{name}: unknown override {section}.{key}")
                    sub[section][key] = value
        logging.info("source stage %s: methods %s", name, sub.methods)
        runs[name] = run(sub, str(Path(workdir) / name))
    table = report.merge_workdirs([Path(workdir) / name for name in runs], workdir, label_by_workdir=True)
    print(table, flush=True)
    return {"stages": runs, "merged_table": table}


def write_results(workdir: Path, results: dict, table: str) -> None:
    checkpoints.atomic_write_text(workdir / "results.json", json.dumps(results, indent=1, default=float))
    checkpoints.atomic_write_text(workdir / "results.md", table + "\n")
    if results["methods"]:
        checkpoints.atomic_write_text(workdir / "results.csv", report.merged_csv(report.merged_rows([results])))
        if results["config"].get("plots", False):
            from tta_jax import plots
            results["figures"] = plots.write_all(results, workdir)
    print(table, flush=True)
    logging.info("results written to %s", workdir)
