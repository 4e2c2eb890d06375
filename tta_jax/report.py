"""Aggregation over seeds and result tables (markdown), pure functions of results dicts."""
from __future__ import annotations

import numpy as np


def mean_std(values) -> tuple[float, float]:
    """Mean and population std (ddof=0) over seeds; std is 0 for one seed."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std())


def fmt(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}"


def aggregate_method(seed_runs: list[dict], targets: list[str], channel_names) -> dict:
    """Mean ± std over seeds of each target's Dice (per channel and channel mean) and of the average.

    ``seed_runs[s]['domains'][d]`` holds a domain summary (see
    :func:`tta_jax.metrics.domain_summary`); the average of a seed is the mean
    over targets of the channel mean.
    """
    out = {"per_domain": {}, "seeds": [r["seed"] for r in seed_runs]}
    for d in targets:
        out["per_domain"][d] = {}
        for key in (*channel_names, "mean"):
            m, s = mean_std([r["domains"][d][key] for r in seed_runs])
            out["per_domain"][d][key] = {"mean": m, "std": s}
    out["average_per_channel"] = {}
    for key in (*channel_names, "mean"):
        avgs = [np.mean([r["domains"][d][key] for d in targets]) for r in seed_runs]
        m, s = mean_std(avgs)
        out["average_per_channel"][key] = {"mean": m, "std": s, "per_seed": [float(a) for a in avgs]}
    out["average"] = out["average_per_channel"]["mean"]
    return out


def markdown_table(methods: dict, targets: list[str], key: str = "mean") -> str:
    """Rows = methods, columns = target domains + average (Dice ×100, mean ± std over seeds)."""
    head = "| method | " + " | ".join(targets) + " | average |"
    sep = "|" + "---|" * (len(targets) + 2)
    rows = [head, sep]
    for name, agg in methods.items():
        cells = [fmt(agg["per_domain"][d][key]["mean"], agg["per_domain"][d][key]["std"]) for d in targets]
        avg = fmt(agg["average_per_channel"][key]["mean"], agg["average_per_channel"][key]["std"])
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(rows)
