"""Merge the results of several runs (methods × sources) into one table.

  python -m experiments.report --workdirs=/tmp/a,/tmp/b --out=/tmp/merged

Writes ``merged.md``, ``merged.csv`` and ``merged.json`` (rows: source,
target, method; columns: Dice, and IoU/ASSD/HD95/E-/S-measure where the runs
used ``metrics=full``; mean ± std over seeds).
"""
from absl import app, flags

from tta_jax.report import merge_workdirs

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Run directories holding results.json.")
_OUT = flags.DEFINE_string("out", None, "Where the merged tables go.")


def main(argv):
    del argv
    print(merge_workdirs(_WORKDIRS.value, _OUT.value))


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdirs", "out"])
    app.run(main)
