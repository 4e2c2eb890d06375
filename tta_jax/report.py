"""Aggregation over seeds and result tables (markdown, CSV), from results dicts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tta_jax import checkpoints


def mean_std(values) -> tuple[float, float]:
    """Mean and population std (ddof=0) over seeds; exactly 0 when the seeds agree (no 1e-15 noise)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), 0.0 if np.ptp(v) == 0 else float(v.std())


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
    if all("metrics" in r["domains"][d] for r in seed_runs for d in targets):
        out["metrics"] = {}
        for metric in seed_runs[0]["domains"][targets[0]]["metrics"]:
            per_seed = [np.mean([r["domains"][d]["metrics"][metric] for d in targets]) for r in seed_runs]
            m, s = mean_std(per_seed)
            out["metrics"][metric] = {"mean": m, "std": s, "per_domain": {
                d: dict(zip(("mean", "std"), mean_std([r["domains"][d]["metrics"][metric] for r in seed_runs])))
                for d in targets}}
    if all("round_means" in r for r in seed_runs):
        rounds = np.asarray([r["round_means"] for r in seed_runs])
        out["round_means"] = [dict(zip(("mean", "std"), mean_std(rounds[:, k]))) for k in range(rounds.shape[1])]
        m, s = mean_std([r["degradation"] for r in seed_runs])
        out["degradation"] = {"mean": m, "std": s}
    return out


def per_image_scores(seed_run: dict) -> dict:
    """``{(domain, round, image id): channel-mean Dice}`` of one seed run (its ``per_image`` entries)."""
    scores = {}
    for e in seed_run["per_image"]:
        dice = np.asarray(e["dice"], dtype=np.float64).reshape(len(e["ids"]), -1).mean(axis=1)
        scores.update({(e["domain"], e.get("round", 0), i): float(d) for i, d in zip(e["ids"], dice)})
    return scores


def worst_images(runs_by_method: dict, reference: str = "no_adapt", fraction: float = 0.1) -> dict:
    """Dice on the images the ``reference`` method segments worst (Valvano et al. report the worst 10 %).

    For every method and seed: rank all target images by the reference's
    channel-mean Dice (the seed-matched reference run; its last seed when it has
    fewer), take the lowest ``ceil(fraction × n)`` and average the method's
    Dice over them; also over all images.  Mean ± std over seeds.
    """
    if reference not in runs_by_method:
        raise ValueError(f"worst-image report needs the reference method {reference!r} in the run")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    refs = [per_image_scores(r) for r in runs_by_method[reference]]
    out = {"reference": reference, "fraction": fraction, "methods": {}}
    for name, runs in runs_by_method.items():
        worst, every = [], []
        for s, run in enumerate(runs):
            ref, own = refs[min(s, len(refs) - 1)], per_image_scores(run)
            keys = sorted(ref, key=lambda k: (ref[k], str(k)))
            chosen = keys[: int(np.ceil(fraction * len(keys)))]
            worst.append(np.mean([own[k] for k in chosen]))
            every.append(np.mean(list(own.values())))
        out["n_images"] = len(chosen)
        out["methods"][name] = {"worst": dict(zip(("mean", "std"), mean_std(worst))),
                                "all": dict(zip(("mean", "std"), mean_std(every)))}
    return out


HARM_MARGIN = 1.0   # Dice points: smaller per-image changes count as neither help nor harm


def harm(runs_by_method: dict, reference: str = "no_adapt", margin: float = HARM_MARGIN) -> dict:
    """Does a method help on these images? Per method, against ``reference`` image by image.

    For each seed (against the seed-matched reference run) and all target
    images pooled: the percentage of images whose channel-mean Dice rises by
    more than ``margin`` points (``helped``), falls by more than ``margin``
    (``hurt``), and the mean Dice change over the hurt images (``loss_when_hurt``,
    ≤ −margin; None when no image is hurt). Mean ± std over seeds (seeds without a
    hurt image are left out of ``loss_when_hurt``). The same per target domain
    under ``per_domain``. ``wilcoxon_p``: the two-sided paired Wilcoxon signed-rank
    test of the method's per-image Dice against the reference's, each image's
    Dice averaged over seeds (:func:`paired_wilcoxon`).
    """
    refs = [per_image_scores(r) for r in runs_by_method[reference]]
    domains = sorted({k[0] for k in refs[0]})
    out = {"reference": reference, "margin": margin, "methods": {}}
    for name, runs in runs_by_method.items():
        if name == reference:
            continue
        owns = [per_image_scores(run) for run in runs]
        deltas = [{k: own[k] - ref[k] for k in ref} for own, ref in
                  ((own, refs[min(s, len(refs) - 1)]) for s, own in enumerate(owns))]
        keys = sorted(refs[0], key=str)
        own_mean = [np.mean([own[k] for own in owns]) for k in keys]
        ref_mean = [np.mean([ref[k] for ref in refs]) for k in keys]
        out["methods"][name] = {**_help_and_harm([np.array(list(d.values())) for d in deltas], margin),
                                "wilcoxon_p": paired_wilcoxon(own_mean, ref_mean),
                                "per_domain": {dom: _help_and_harm(
                                    [np.array([v for k, v in d.items() if k[0] == dom]) for d in deltas], margin)
                                    for dom in domains}}
    return out


def paired_wilcoxon(a, b) -> float | None:
    """Two-sided p-value of the Wilcoxon signed-rank test of paired samples (zero differences dropped,
    scipy's default); None when every pair is equal (no test possible)."""
    from scipy import stats
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if np.all(a == b):
        return None
    return float(stats.wilcoxon(a, b).pvalue)


def _help_and_harm(deltas: list[np.ndarray], margin: float) -> dict:
    """Percent helped / hurt and the mean change on hurt images, mean ± std over seeds (one delta array each)."""
    losses = [float(d[d < -margin].mean()) for d in deltas if np.any(d < -margin)]
    summary = lambda v: dict(zip(("mean", "std"), mean_std(v)))
    return {"helped": summary([100 * np.mean(d > margin) for d in deltas]),
            "hurt": summary([100 * np.mean(d < -margin) for d in deltas]),
            "loss_when_hurt": summary(losses) if losses else None}


def harm_table(h: dict) -> str:
    m = f"{h['margin']:g}"
    rows = [f"| method | images helped (Dice > +{m} vs {h['reference']}) | images hurt (Dice < −{m}) "
            f"| mean Dice change on hurt images | Wilcoxon p vs {h['reference']} |", "|---|---|---|---|---|"]
    for name, r in h["methods"].items():
        loss = fmt(**r["loss_when_hurt"]) if r["loss_when_hurt"] else "–"
        p = r.get("wilcoxon_p")
        rows.append(f"| {name} | {fmt(**r['helped'])} % | {fmt(**r['hurt'])} % | {loss} | "
                    f"{'–' if p is None else f'{p:.2g}'} |")
    return "\n".join(rows)


def worst_images_table(w: dict) -> str:
    pct = f"{100 * w['fraction']:g} %"
    rows = [f"| method | all images pooled | worst {pct} ({w['n_images']} images, ranked by {w['reference']}) |",
            "|---|---|---|"]
    rows += [f"| {n} | {fmt(**m['all'])} | {fmt(**m['worst'])} |" for n, m in w["methods"].items()]
    return "\n".join(rows)


METRIC_LABELS = {"dice": "Dice ↑", "iou": "IoU ↑", "assd": "ASSD (px) ↓", "hd95": "HD95 (px) ↓",
                 "e_measure": "E-measure ↑", "s_measure": "S-measure ↑",
                 "helped": f"% helped (> +{HARM_MARGIN:g}) ↑", "hurt": f"% hurt (< −{HARM_MARGIN:g}) ↓",
                 "loss_when_hurt": "Dice change when hurt"}


def metrics_table(methods: dict) -> str:
    """Rows = methods, columns = every metric averaged over targets (mean ± std over seeds)."""
    names = [n for n in METRIC_LABELS if all(n in agg.get("metrics", {}) for agg in methods.values())]
    rows = ["| method | " + " | ".join(METRIC_LABELS[n] for n in names) + " |", "|" + "---|" * (len(names) + 1)]
    for name, agg in methods.items():
        digits = lambda n: 3 if n in ("e_measure", "s_measure") else 2
        rows.append(f"| {name} | " + " | ".join(
            f"{agg['metrics'][n]['mean']:.{digits(n)}f} ± {agg['metrics'][n]['std']:.{digits(n)}f}"
            for n in names) + " |")
    return "\n".join(rows)


def rounds_table(methods: dict) -> str:
    """Long-term protocol: per-round average Dice and Degradation = overall mean − round-1 mean."""
    n = max(len(agg["round_means"]) for agg in methods.values())
    rows = ["| method | " + " | ".join(f"round {k + 1}" for k in range(n)) + " | Degradation |",
            "|" + "---|" * (n + 2)]
    for name, agg in methods.items():
        cells = [fmt(r["mean"], r["std"]) for r in agg["round_means"]]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(agg['degradation']['mean'], agg['degradation']['std'])} |")
    return "\n".join(rows)


def markdown_table(methods: dict, targets: list[str], key: str = "mean", counts: dict | None = None) -> str:
    """Rows = methods, columns = target domains (with their image counts) + the unweighted average
    over targets (Dice ×100, mean ± std over seeds)."""
    names = [f"{t} (n={counts[t]})" if counts and t in counts else t for t in targets]
    head = "| method | " + " | ".join(names) + " | average over targets |"
    sep = "|" + "---|" * (len(targets) + 2)
    rows = [head, sep]
    for name, agg in methods.items():
        cells = [fmt(agg["per_domain"][d][key]["mean"], agg["per_domain"][d][key]["std"]) for d in targets]
        avg = fmt(agg["average_per_channel"][key]["mean"], agg["average_per_channel"][key]["std"])
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(rows)


# --- Merged reports over several runs (methods × sources) --------------------------

HARM_COLUMNS = ("helped", "hurt", "loss_when_hurt")
MERGED_COLUMNS = ("source", "target", "method", "dice", "iou", "assd", "hd95", "e_measure", "s_measure",
                  *HARM_COLUMNS)


def merged_rows(results_list: list[dict]) -> list[dict]:
    """One row per (source, target, method) with each metric's mean and std over seeds.

    Dice always comes from the on-device per-channel Dice; the other metrics
    exist when the run used ``metrics=full``.  A final row per (source,
    method) averages its targets (target ``average``).
    """
    rows = []
    for res in results_list:
        for method, agg in res["methods"].items():
            for target in res["target_domains"] + ["average"]:
                row = {"source": res["source_domain"], "target": target, "method": method}
                if target == "average":
                    row["dice"] = (agg["average"]["mean"], agg["average"]["std"])
                else:
                    d = agg["per_domain"][target]["mean"]
                    row["dice"] = (d["mean"], d["std"])
                for metric, m in agg.get("metrics", {}).items():
                    if metric == "dice":
                        continue
                    if target == "average":
                        row[metric] = (m["mean"], m["std"])
                    else:
                        row[metric] = (m["per_domain"][target]["mean"], m["per_domain"][target]["std"])
                h = ((res.get("harm") or {}).get("methods") or {}).get(method)
                if h:   # the "average" row pools every target image
                    h = h if target == "average" else h["per_domain"][target]
                    for key in HARM_COLUMNS:
                        if h[key]:
                            row[key] = (h[key]["mean"], h[key]["std"])
                rows.append(row)
    return rows


def merged_markdown(rows: list[dict]) -> str:
    metrics = [c for c in MERGED_COLUMNS[3:] if any(c in r for r in rows)]
    out = ["| source | target | method | " + " | ".join(METRIC_LABELS[m] for m in metrics) + " |",
           "|" + "---|" * (3 + len(metrics))]
    for r in rows:
        cells = []
        for m in metrics:
            if m in r:
                digits = 3 if m in ("e_measure", "s_measure") else 2
                cells.append(f"{r[m][0]:.{digits}f} ± {r[m][1]:.{digits}f}")
            else:
                cells.append("–")
        out.append(f"| {r['source']} | {r['target']} | {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def merged_csv(rows: list[dict]) -> str:
    metrics = [c for c in MERGED_COLUMNS[3:] if any(c in r for r in rows)]
    header = ["source", "target", "method"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
    lines = [",".join(header)]
    for r in rows:
        vals = [r["source"], r["target"], r["method"]]
        for m in metrics:
            vals += [f"{r[m][0]:.6g}", f"{r[m][1]:.6g}"] if m in r else ["", ""]
        lines.append(",".join(vals))
    return "\n".join(lines) + "\n"


def adapt_table(results) -> str:
    targets, methods = results["target_domains"], results["methods"]
    own = results["source"]["own_domain_heldout"]
    counts = {t: len(ids) for t, ids in results.get("stream_ids", {}).items()}
    lines = [f"# {results['dataset']}: source {results['source_domain']} → {', '.join(targets)}",
             f"protocol {results['protocol']}, seeds {results['seeds']}, Dice ×100 (mean ± std over seeds); "
             "n = images per target; the average weighs every target alike", "",
             markdown_table(methods, targets, counts=counts), ""]
    if len(results["channels"]) > 1:
        for ch in results["channels"]:
            lines += [f"Dice of channel `{ch}`:", "", markdown_table(methods, targets, key=ch, counts=counts), ""]
    if all("metrics" in agg for agg in methods.values()):
        lines += ["All metrics (per-channel mean, averaged over targets):", "", metrics_table(methods), "",
                  distance_unit_line(results["config"]), ""]
    if all("round_means" in agg for agg in methods.values()):
        lines += [f"Long-term protocol ({results['config']['rounds']} rounds):", "",
                  rounds_table(methods), ""]
    if (results.get("harm") or {}).get("methods"):
        lines += [f"Help and harm per image against {results['harm']['reference']} (all target images "
                  "pooled, seed-matched; mean ± std over seeds):", "", harm_table(results["harm"]), ""]
    elif results.get("harm") is None and len(methods) > 1:
        lines += ["(Help/harm per image needs no_adapt among the methods.)", ""]
    if (results.get("harm_vs_reference") or {}).get("methods"):
        lines += [f"Help and harm per image against {results['harm_vs_reference']['reference']} "
                  "(config compare_to; the same pooling):", "",
                  harm_table(results["harm_vs_reference"]), ""]
    if "worst_images" in results:
        lines += ["Per-image Dice (channel mean) over all target images pooled (every image weighs "
                  "alike) and over the images no_adapt segments worst:", "",
                  worst_images_table(results["worst_images"]), ""]
    if results["protocol"] == "mixed":
        lines += [f"Mixed stream: all target images shuffled with seed {results['config']['mixed_seed']}.", ""]
    lines += [skipped_steps_line(methods, results["seeds"]), ""]
    lines.append(f"Source model on its own domain {results['source_domain']} (held-out, no adaptation): "
                 f"{own['mean']:.2f}")
    return "\n".join(lines)


def distance_unit_line(config: dict) -> str:
    """What one unit of the ASSD/HD95 columns is."""
    if config.get("distance_unit", "resized_pixels") == "native_pixels":
        return "ASSD and HD95 in pixels of each image as stored (native resolution)."
    size = config["image_size"]
    return f"ASSD and HD95 in pixels of the {size}×{size} arrays the model sees (distance_unit=native_pixels: as stored)."


def skipped_steps_line(methods: dict, seeds) -> str:
    """Which methods had adaptation steps rejected as non-finite (the state was kept), per seed."""
    hit = {m: agg.get("skipped_steps", []) for m, agg in methods.items() if any(agg.get("skipped_steps", []))}
    if not hit:
        return "Non-finite adaptation steps skipped: none."
    parts = [f"{m} ({', '.join(f'seed {s}: {n}' for s, n in zip(seeds, counts) if n)})" for m, counts in hit.items()]
    return ("**Non-finite adaptation steps skipped** (the state before the step was kept; these rows did "
            "not adapt on those images): " + "; ".join(parts) + ".")


def source_table(results) -> str:
    rows = ["| domain | " + " | ".join(results["channels"]) + " | mean |",
            "|" + "---|" * (len(results["channels"]) + 2)]
    entries = {f"{results['source_domain']} (source, held-out)": results["source"]["own_domain_heldout"],
               **results["source"]["targets_no_adapt"]}
    for name, s in entries.items():
        rows.append(f"| {name} | " + " | ".join(f"{s[c]:.2f}" for c in results["channels"]) + f" | {s['mean']:.2f} |")
    return "\n".join(rows)

def labelled_methods(results: dict, label: str) -> dict:
    """``results`` with every method (and its help/harm entry) renamed ``label/method``."""
    out = {**results, "methods": {f"{label}/{m}": agg for m, agg in results["methods"].items()}}
    if (results.get("harm") or {}).get("methods"):
        out["harm"] = {**results["harm"], "methods": {f"{label}/{m}": h for m, h in results["harm"]["methods"].items()}}
    return out


def merge_workdirs(workdirs, out, label_by_workdir: bool = False) -> str:
    """Merge the ``results.json`` of several runs into ``out/merged.{md,csv,json}``; returns the table.

    ``label_by_workdir``: name each method ``<workdir name>/<method>`` (runs of
    the same methods on different source stages, e.g. an ablation).
    """
    results = []
    for w in workdirs:
        path = Path(w) / "results.json"
        if not path.exists():
            raise FileNotFoundError(f"no results.json in {w}")
        res = json.loads(path.read_text())
        results.append(labelled_methods(res, Path(w).name) if label_by_workdir else res)
    rows = merged_rows(results)
    table = merged_markdown(rows)
    if any("assd" in r for r in rows):
        units = {distance_unit_line(r["config"]) for r in results}
        if len(units) > 1:
            raise ValueError(f"cannot merge runs whose ASSD/HD95 units differ: {' / '.join(sorted(units))}")
        table += "\n\n" + units.pop()
    out = Path(out)
    checkpoints.atomic_write_text(out / "merged.md", table + "\n")
    checkpoints.atomic_write_text(out / "merged.csv", merged_csv(rows))
    checkpoints.atomic_write_text(out / "merged.json", json.dumps(rows, indent=1))
    return table
