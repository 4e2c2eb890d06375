"""GraTa (gradient alignment) next to no_adapt, bn and tent.

Run (synthetic default, CPU, a few minutes)::

  python -m experiments.main --config=configs/grata.py --workdir=/tmp/tta_grata

Variants, combine with commas (``--config=configs/grata.py:table2,polyp``):

* ``table1`` — the paper's Table 1 rows in its order: No Adapt; the methods that
  refine BN statistics (DUA, DIGA, MedBN); the fine-tuning methods (TENT, DLTTA,
  DomainAdaptor, SAR, DeTTA); GraTa. DeTTA needs its denoising decoder trained
  with the source model, so the one source model of the table carries it (the
  encoder also learns the blind-spot task, as DeTTA's DeY-Net); ``table1_plain``
  leaves DeTTA out and keeps the plain source model. With
  ``--config.source_domain=all`` it runs the leave-one-domain grid.
* ``table2`` — objectives and learning rates (paper Table 2): L_con(θ) with β,
  L_con(θ − ∇L_ent) with β, L_con(θ − ∇L_ent) with η (GraTa);
* ``table3`` — TENT (L_ent(θ), β) vs the swapped L_ent(θ − ∇L_con) with η vs GraTa;
* ``table4`` — the maps of the cosine to η: linear, sigmoid, ReLU, softplus, ours;
* ``table5`` — every (auxiliary, pseudo) pair of the six objectives (30 rows,
  named ``grata_<aux>__<pse>``); trains a source model with the four
  self-supervised branches (super-resolution ×2 below 128², ×4 from 128²);
* ``polyp`` — real data, Kvasir-SEG → CVC-ClinicDB (``target_domains`` and
  ``source_domain`` overridable); ``paper`` — 512², ResNet-34, full width;
  ``quick`` — smoke run.

Every GraTa option is a ``--config.grata.KEY=VALUE`` override, e.g.
``--config.grata.lr_schedule=fixed``, ``--config.grata.lookahead=False``,
``--config.grata.strong.p_noise=0``.
"""
from configs import common

TABLE_VARIANTS = {
    "table1": {name: None for name in ("dua", "diga", "medbn", "tent", "dltta", "domain_adaptor", "sar", "detta",
                                       "grata")},
    "table1_plain": {name: None for name in ("dua", "diga", "medbn", "tent", "dltta", "domain_adaptor", "sar",
                                             "grata")},
    "table2": {
        "grata_con_beta": {"method": "grata", "lookahead": False, "lr_schedule": "fixed"},
        "grata_lookahead_beta": {"method": "grata", "lr_schedule": "fixed"},
        "grata": None,
    },
    "table3": {
        "tent_beta": {"method": "tent", "lr": 1e-4},
        "grata_swapped": {"method": "grata", "pseudo": "entropy", "auxiliary": "consistency"},
        "grata": None,
    },
    "table4": {
        "grata_linear": {"method": "grata", "lr_map": "linear"},
        "grata_sigmoid": {"method": "grata", "lr_map": "sigmoid"},
        "grata_relu": {"method": "grata", "lr_map": "relu"},
        "grata_softplus": {"method": "grata", "lr_map": "softplus"},
        "grata": None,
    },
}


TABLE5_OBJECTIVES = ("consistency", "entropy", "reconstruction", "rotation", "super_resolution", "denoising")


def _table5():
    rows = {}
    for aux in TABLE5_OBJECTIVES:
        for pse in TABLE5_OBJECTIVES:
            if aux != pse:
                rows[f"grata_{aux}__{pse}"] = {"method": "grata", "auxiliary": aux, "pseudo": pse}
    return rows


TABLE_VARIANTS["table5"] = _table5()


def get_config(arg=None):
    c = common.get_base_config()
    c.methods = "no_adapt,bn,tent,grata"
    tables, rest = common.apply_tables(c, arg, TABLE_VARIANTS)
    if "table1" in tables or "table1_plain" in tables:
        c.compare_to = "grata"
    if "table5" in tables:
        c.model.aux_heads = "reconstruction,rotation,super_resolution,denoising"
    c = common.apply_variant(c, rest)
    if "table5" in tables and c.image_size < 128:
        c.model.sr_factor = 2
    return c
