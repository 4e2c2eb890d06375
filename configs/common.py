"""Keys every experiment config shares, with the CPU-sized defaults.

Every method config starts from :func:`get_base_config` and only changes what
it must, so ``--config.KEY=VALUE`` accepts the same keys everywhere and an
unknown key is an error. The per-method sub-dicts (``config.<method>``) are
generated from the methods' declarations (:func:`method_subconfig`).
"""
from pathlib import Path

import ml_collections
from ml_collections import config_dict

from tta_jax import hparams
from tta_jax.data.folders import FolderOptions
from tta_jax.methods import available_methods, method_spec
from tta_jax.source.adversarial import AdversarialHParams
from tta_jax.source.dae import DAEHParams
from tta_jax.source.universe import UniverseHParams
from tta_jax.source.training import SourceTraining

# The shared real data beside the repository (../shared/data/polyp), whatever the current directory.
POLYP_DATA_DIR = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "polyp")


def method_subconfig(name: str) -> ml_collections.ConfigDict:
    """``config.<name>``: the method's declared defaults; a key whose default depends on the data
    family (e.g. SPEGC's lr) is an unset placeholder, filled from the family at run time."""
    spec = method_spec(name)
    c = hparams.to_config(spec.hparams)
    family_keys = {k for values in spec.family_defaults.values() for k in values}
    for key in family_keys:
        c[key] = config_dict.placeholder(type(c[key]))
    return c


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "adapt"                  # adapt | source | benchmark
    c.methods = "no_adapt,bn,tent"    # comma-separated; compared in one table
    c.dataset = "synthetic_fundus"    # synthetic_fundus | folders
    c.data_dir = ""                   # root of a 'folders' dataset, or the raw files of a TFDS dataset
    c.tfds_dir = "~/.cache/tta_jax/tfds"   # where TFDS builders write their array_record files
    c.normalisation = "minmax"        # TFDS datasets: minmax (fundus papers) | imagenet (polyp papers)
    c.source_domain = "A"             # "all": leave-one-domain grid (every domain as source)
    c.target_domains = ""             # comma-separated; empty = every other domain
    c.image_size = 64
    c.protocol = "per_target"         # per_target | continual | long_term | mixed | episodic
    c.max_target_images = 0           # >0: that many evenly spaced images of each target (see evaluate.subsample_stream)
    c.rounds = 5                      # long_term: passes over the target sequence
    c.mixed_seed = 2026               # mixed: permutation seed of the shuffled stream
    c.compare_to = ""                 # a compared method: also test every other one against it (help/harm, Wilcoxon)
    c.worst_fraction = 0.1            # report Dice on the worst-segmented 10 % (by no_adapt); 0: off
    c.metrics = "dice"                # dice | full (+ IoU, ASSD, HD95, E-measure, S-measure)
    c.distance_unit = "resized_pixels"  # ASSD/HD95 in pixels of the image_size² arrays | native_pixels (stored images)
    c.loop = "auto"                   # auto (python on CPU, scan on GPU/TPU) | python | scan
    c.scan_chunk = 16
    c.scan_unroll = 1                 # scan: steps unrolled per scan iteration
    c.seeds = 3                       # number of adaptation seeds (seed, seed+1, ...)
    c.seed = 0
    # Seeds as one batched stream (one jitted step over all seeds): on by default for GPU/TPU
    # (`paper` variants); off on CPU, where the benchmark measures little gain (README,
    # Performance) and sequential seeds use K× less memory and save each seed's results as
    # soon as it finishes (resume per seed).
    c.vmap_seeds = False
    c.stream_map = "vmap"             # how one step maps over the seeds: vmap | map (lax.map; see runner)
    c.shard_seeds = True              # ... with the seed axis spread over all devices (if it divides evenly)
    # Several processes (hosts) sharing one sweep (tta_jax/distributed.py): enabled=True calls
    # jax.distributed.initialize; empty/0/-1 values are detected (TPU pods, SLURM).
    c.distributed = ml_collections.ConfigDict(dict(enabled=False, coordinator="", num_processes=0, process_id=-1))
    c.source_checkpoint = ""          # empty: train or reuse the cached source model
    c.cache_dir = "~/.cache/tta_jax"  # cached source models and XLA compilation cache
    c.compilation_cache = True
    c.log_every_s = 10.0
    c.plots = True                    # PNG figures next to results.md
    c.analysis = False                # label-based diagnostics (e.g. GraTa Fig. 4); never used to adapt

    # aux_heads: comma-separated GraTa Table 5 branches (reconstruction, rotation,
    # super_resolution, denoising); trained with the source model when set.
    # compute_dtype: float32 | bfloat16 — what the segmentor's convolutions multiply in at test time
    # (float32 accumulation, parameters, BN, losses, optimizer; source models train in float32).
    # Stays float32, so that a results table is the same on every machine: bfloat16 was faster only for
    # the full-width network on a CPU with AMX (README, "Roofline and bfloat16").
    c.model = ml_collections.ConfigDict(dict(backbone="resnet18", width=0.25, aux_heads="", sr_factor=4,
                                             compute_dtype="float32"))
    c.synthetic = ml_collections.ConfigDict(dict(num_train=200, num_test=40, seed=0))
    # how a 'folders' dataset decodes its masks (see tta_jax/data/folders.py)
    c.folders = hparams.to_config(FolderOptions)
    c.source = hparams.to_config(SourceTraining)
    # Adversarial source stage (Valvano et al.): trained when a method needs the mask
    # discriminator (adv_ttt) or when source.adversarial=True; see tta_jax/source/adversarial.py.
    c.adversarial = hparams.to_config(AdversarialHParams)
    # Mask denoising autoencoder (Karani et al.), trained on the source masks when a method needs
    # it (dae_ttt); see tta_jax/source/dae.py.
    c.dae = hparams.to_config(DAEHParams)
    # TTDG's universe, learned after the segmentor when a method needs it (ttdg); tta_jax/source/universe.py.
    c.universe = hparams.to_config(UniverseHParams)
    # data family for method defaults that depend on it ("" = from the dataset; folders: set it)
    c.data_family = ""

    # Per-method hyperparameters, one sub-dict per registered method, from its declaration.
    for name in available_methods():
        c[name] = method_subconfig(name)
    # Named rows of ablation tables: {row name: {"method": registered name, **overrides}}.
    c.variants = ml_collections.ConfigDict()
    # An ablation over source stages: {name: {"methods": ..., "overrides": {dotted key: value}}}, each run
    # on its own source model into workdir/<name>, merged into one table (experiment.run_source_stages).
    c.source_stages = ml_collections.ConfigDict()
    return c


def apply_tables(c: ml_collections.ConfigDict, arg: str | None, tables: dict) -> tuple[list[str], str]:
    """Select the ablation tables named in ``arg`` (comma-separated) as the compared rows.

    ``tables``: {table: {row: spec or None}}; a spec is a ``config.variants``
    entry (``{"method": ..., **overrides}``), ``None`` a plain method. The rows
    (``no_adapt`` first) replace ``c.methods``. Returns the selected tables and
    the remaining, non-table variants of ``arg``.
    """
    parts = [a for a in (arg or "").split(",") if a]
    selected = [a for a in parts if a in tables]
    if selected:
        rows = ["no_adapt"]
        for table in selected:
            for name, spec in tables[table].items():
                if spec is not None:
                    c.variants[name] = spec
                if name not in rows:
                    rows.append(name)
        c.methods = ",".join(rows)
    return selected, ",".join(a for a in parts if a not in tables)


def method_config(methods: str, arg: str | None) -> ml_collections.ConfigDict:
    """The base config comparing ``methods`` (comma-separated), with variants applied."""
    c = get_base_config()
    c.methods = methods
    return apply_variant(c, arg)


def apply_variant(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Apply comma-separated variants: ``polyp`` (real two-centre data), ``paper`` (full size), ``quick``."""
    for variant in filter(None, (arg or "").split(",")):
        if variant == "polyp":
            c.dataset = "folders"
            c.data_family = "polyp"
            c.data_dir = POLYP_DATA_DIR
            c.source_domain = "Kvasir-SEG"
            c.target_domains = "CVC-ClinicDB"
            c.image_size = 128
            c.source.steps = 1500
        elif variant == "paper":
            c.vmap_seeds = True
            c.image_size = 512
            c.model.backbone = "resnet34"
            c.model.width = 1.0
            c.source.optimizer = "sgd"
            c.source.steps = 20000
            c.synthetic.num_train = 400
            c.synthetic.num_test = 100
        elif variant == "quick":
            c.seeds = 1
            c.source.steps = 200
            c.synthetic.num_train = 64
            c.synthetic.num_test = 8
        else:
            raise ValueError(f"unknown config variant {variant!r}; use polyp, paper or quick")
    return c
