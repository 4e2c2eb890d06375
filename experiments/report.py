"""Merge the results of several runs (methods × sources) into one table.

  python -m experiments.report --workdirs=/tmp/a,/tmp/b --out=/tmp/merged

Writes ``merged.md``, ``merged.csv`` and ``merged.json`` (rows: source,
target, method; columns: Dice, and IoU/ASSD/HD95/E-/S-measure where the runs
used ``metrics=full``; mean ± std over seeds).
"""
import json
from pathlib import Path

from absl import app, flags

from tta_jax import checkpoints, report

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Run directories holding results.json.")
_OUT = flags.DEFINE_string("out", None, "Where the merged tables go.")


def merge(workdirs, out) -> str:
    results = []
    for w in workdirs:
        path = Path(w) / "results.json"
        if not path.exists():
            raise FileNotFoundError(f"no results.json in {w}")
        results.append(json.loads(path.read_text()))
    rows = report.merged_rows(results)
    table = report.merged_markdown(rows)
    out = Path(out)
    checkpoints.atomic_write_text(out / "merged.md", table + "\n")
    checkpoints.atomic_write_text(out / "merged.csv", report.merged_csv(rows))
    checkpoints.atomic_write_text(out / "merged.json", json.dumps(rows, indent=1))
    return table


def main(argv):
    del argv
    print(merge(_WORKDIRS.value, _OUT.value))


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdirs", "out"])
    app.run(main)
