"""Entry point: parse flags, then run the experiment (or the benchmark) the config describes.

  python -m experiments.main --config=configs/grata.py --workdir=/tmp/tta
  python -m experiments.main --config=configs/tent.py:polyp --config.seeds=1

A user error (config, data, checkpoint) prints one line and exits with
status 1; ``--debug`` shows the traceback.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tta_jax.errors import USER_ERRORS, describe_flag_error

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "./workdir", "Where results (and resumable partial runs) go.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the full traceback of a user error.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    from tta_jax import benchmark, experiment
    try:
        experiment.validate_config(config)
        if config.mode == "benchmark":
            benchmark.run_benchmark(config, _WORKDIR.value)
        else:
            experiment.run(config, _WORKDIR.value)
    except USER_ERRORS as e:
        if _DEBUG.value:
            raise
        logging.flush()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def parse_flags(argv):
    """absl's flag parsing, with an unknown or ill-typed ``--config.*`` key reported in one line."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # config_flags raises AttributeError/KeyError/TypeError for bad keys
        print(f"error: {describe_flag_error(e, argv)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
