"""Test-time adaptation with ``bn`` next to the other baselines.

Run (synthetic default, CPU, a few minutes)::

  python -m experiments.main --config=configs/bn.py --workdir=/tmp/tta_bn

Variants (``--config=configs/bn.py:polyp``): ``polyp`` — real data,
Kvasir-SEG → CVC-ClinicDB; ``paper`` — 512², ResNet-34, full width (GPU/TPU);
``quick`` — a smoke run.  Override any key with ``--config.KEY=VALUE``.
"""
from configs import common


def get_config(arg=None):
    return common.method_config("bn", arg)
