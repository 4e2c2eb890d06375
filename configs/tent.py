"""Test-time adaptation with ``tent`` next to the other baselines.

Run (synthetic default, CPU, a few minutes)::

  python -m experiments.main --config=configs/tent.py --workdir=/tmp/tta_tent

Variants (``--config=configs/tent.py:polyp``): ``polyp`` — real data,
Kvasir-SEG → CVC-ClinicDB; ``paper`` — 512², ResNet-34, full width (GPU/TPU);
``quick`` — a smoke run.  Override any key with ``--config.KEY=VALUE``.
"""
from configs import common


def get_config(arg=None):
    return common.method_config("no_adapt,bn,tent", arg)
