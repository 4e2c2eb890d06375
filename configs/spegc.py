"""SPEGC (semantic-prompt-enhanced graph clustering) in the continual protocol, next to the baselines.

Run (synthetic default: source A, targets B→C→D→E→F in one never-reset stream; CPU, minutes)::

  python -m experiments.main --config=configs/spegc.py --workdir=/tmp/tta_spegc

Variants, combine with commas (``--config=configs/spegc.py:long_term,polyp``):

* ``table1`` — SPEGC Tables 1–2's rows, in the paper's order: No Adapt, SAR,
  DomainAdaptor, NC-TTT, VPTTA, GraTa, TTDG, SPEGC; each method keeps its own
  declared learning rate; the table's one source model carries NC-TTT's
  noise-contrastive head, trained with it, and TTDG's universe, learned after
  it on the frozen segmentor (``--config.universe.steps``, see
  ``tta_jax/source/universe.py``); with the full metrics (DSC, Eφmax, Sα, ...);
* ``table3`` — the ``table1`` rows in the ``long_term`` protocol (SPEGC Table 3);
  ``table1`` and ``table3`` also test every row against SPEGC (``compare_to``);
* ``long_term`` — 5 rounds over the targets without reset, per-round means and
  Degradation (SPEGC Table 3);
* ``mixed`` — all target images shuffled into one stream (seed ``mixed_seed``,
  2026; SPEGC Tables A.1/A.2);
* ``table4`` — the component ablation (SPEGC Table 4): clustering only
  (uniform foreground nodes, no prompts), + MC-dropout sampling, + HE prompts,
  + CO prompts with L_C, full;
* ``polyp`` — real data, Kvasir-SEG → CVC-ClinicDB (SGD lr 0.01, SPEGC's
  declared polyp default, whichever config runs it); ``paper`` — 512², ResUNet-50, full width (GPU/TPU);
  ``quick`` — a smoke run.

Hyperparameters of §4.5 are overrides: ``--config.spegc.clusters=64``
(Z), ``--config.spegc.num_prompts=10`` (M), ``--config.spegc.queue_size=7``,
``--config.spegc.lam=0.2`` (λ), ``--config.spegc.implicit_diff=True``.
"""
from configs import common

TABLE_VARIANTS = {
    "table1": {name: None for name in ("sar", "domain_adaptor", "nc_ttt", "vptta", "grata", "ttdg", "spegc")},
    "table4": {
        "spegc_clustering": {"method": "spegc", "sampling": "uniform", "prompt_pools": "none"},
        "spegc_mc_dropout": {"method": "spegc", "prompt_pools": "none"},
        "spegc_he_prompt": {"method": "spegc", "prompt_pools": "heterogeneity"},
        "spegc_co_prompt": {"method": "spegc", "prompt_pools": "commonality"},
        "spegc": None,
    },
}


def get_config(arg=None):
    c = common.get_base_config()
    c.methods = "no_adapt,tent,grata,spegc"
    c.protocol = "continual"
    parts = [a for a in (arg or "").split(",") if a]
    if "table3" in parts:            # Table 3 = Table 1's rows, long-term protocol
        parts = ["table1" if a == "table3" else a for a in parts] + ["long_term"]
    tables, rest = common.apply_tables(c, ",".join(parts), TABLE_VARIANTS)
    if "table1" in tables:
        c.compare_to = "spegc"
        c.metrics = "full"           # SPEGC's columns: DSC, Eφmax, Sα (and IoU, ASSD, HD95)
    parts = [a for a in rest.split(",") if a]
    for protocol in ("long_term", "mixed"):
        if protocol in parts:
            c.protocol = protocol
            parts.remove(protocol)
    c = common.apply_variant(c, ",".join(parts))
    if "paper" in parts:
        c.model.backbone = "resnet50"
    return c
