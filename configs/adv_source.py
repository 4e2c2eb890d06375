"""Adversarial source stage alone: segmentor + re-usable mask discriminator (Valvano et al. §3.1–3.2).

Run (synthetic default; the model is cached and reused by ``configs/adv_ttt.py`` with the same settings)::

  python -m experiments.main --config=configs/adv_source.py --workdir=/tmp/tta_adv_source

Per-epoch losses of both networks and Δ's mean scores on real, predicted and fake-anchor masks are
logged and stored with the checkpoint (``meta.json``). Variants as in ``configs/adv_ttt.py``.
"""
from configs import adv_ttt


def get_config(arg=None):
    c = adv_ttt.get_config(arg)
    c.mode = "source"
    return c
