"""Train (or reuse from the cache) the source model and report its Dice per domain.

  python -m experiments.main --config=configs/source.py --workdir=/tmp/source
  python -m experiments.main --config=configs/source.py:polyp --workdir=/tmp/source_polyp
"""
from configs import common


def get_config(arg=None):
    c = common.get_base_config()
    c.mode = "source"
    return common.apply_variant(c, arg)
