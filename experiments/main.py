"""Entry point: parse flags, call :func:`experiments.run.run`.

  python -m experiments.main --config=configs/tent.py --workdir=/tmp/tta
  python -m experiments.main --config=configs/tent.py:polyp --config.seeds=1
"""
from absl import app, flags
from ml_collections import config_flags

from experiments.run import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "./workdir", "Where results (and resumable partial runs) go.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
