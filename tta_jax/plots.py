"""PNG figures from ``results.json`` files (matplotlib, headless).

* ``domain_bars``: per-target Dice bars per method (mean ± std over seeds);
* ``stream_curves``: Dice along the stream (running mean) per method, seed 0;
* ``method_traces``: a method's own per-image traces, e.g. GraTa's η and cos;
* ``per_image_violins``: the distribution over images of Dice (and IoU and HD95
  with ``metrics=full``) per method, each image's value averaged over seeds.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
# Figures built without pyplot: drawing files never touches the process's backend, so a
# notebook's inline plots keep working after the library writes its PNGs.
from matplotlib.figure import Figure


def domain_bars(results: dict, path) -> None:
    methods, targets = list(results["methods"]), results["target_domains"]
    fig = Figure(figsize=(1.5 + 1.2 * len(targets) * max(1, len(methods)) / 3, 3.5))
    ax = fig.subplots()
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        per = results["methods"][m]["per_domain"]
        means = [per[t]["mean"]["mean"] for t in targets]
        stds = [per[t]["mean"]["std"] for t in targets]
        ax.bar(np.arange(len(targets)) + k * width, means, width, yerr=stds, label=m)
    ax.set_xticks(np.arange(len(targets)) + 0.4 - width / 2, targets)
    ax.set_ylabel("Dice ×100")
    ax.set_title(f"{results['dataset']}: source {results['source_domain']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _seed_runs(workdir: Path, method: str):
    return sorted((workdir / "runs" / method).glob("seed_*.json"))


# line styles cycle with the colours, so that methods whose curves coincide stay visible
_STYLES = [dict(ls="-"), dict(ls="--"), dict(ls=":", lw=2.0), dict(ls="-.")]


def stream_curves(results: dict, workdir, path, window: int = 10) -> None:
    """Dice along the stream (running mean) of the first seed of every method, centres marked.

    Methods whose per-image Dice is identical are drawn once and named together
    in the legend (``bn ≡ grata``).
    """
    workdir = Path(workdir)
    curves, seed, bounds = {}, None, []
    for m in results["methods"]:
        files = _seed_runs(workdir, m)
        if not files:
            continue
        run = json.loads(files[0].read_text())
        seed = run["seed"] if seed is None else seed
        dice = np.concatenate([np.mean(e["dice"], axis=1) for e in run["per_image"]])
        domains = np.concatenate([[e["domain"]] * len(e["ids"]) for e in run["per_image"]])
        if "positions" in run["per_image"][0]:
            order = np.argsort(np.concatenate([e["positions"] for e in run["per_image"]]))
            dice, domains = dice[order], domains[order]
        if results["protocol"] != "mixed":   # a mixed stream interleaves the centres
            starts = [0] + [i for i in range(1, len(domains)) if domains[i] != domains[i - 1]]
            bounds = [(i, domains[i]) for i in starts]
        same = next((k for k, v in curves.items() if len(v) == len(dice) and np.array_equal(v, dice)), None)
        if same is not None:
            curves[f"{same} ≡ {m}"] = curves.pop(same)
        else:
            curves[m] = dice
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    for k, (label, dice) in enumerate(curves.items()):
        w = min(window, len(dice))
        x = np.arange(w - 1, len(dice))
        ax.plot(x, np.convolve(dice, np.ones(w) / w, mode="valid"), label=label, **_STYLES[k % len(_STYLES)])
    for start, domain in bounds:
        ax.axvline(start, color="grey", lw=0.6)
        ax.text(start, 1.0, f" {domain}", transform=ax.get_xaxis_transform(), va="top", fontsize=7, color="grey")
    ax.set_xlabel("image in stream")
    ax.set_ylabel(f"Dice ×100 (running mean of {window})")
    ax.set_title(f"{results['dataset']}: source {results['source_domain']}, {results['protocol']}, seed {seed}",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def method_traces(workdir, method: str, path, keys=("eta", "cos")) -> bool:
    files = _seed_runs(Path(workdir), method)
    if not files:
        return False
    run = json.loads(files[0].read_text())
    info = {k: np.concatenate([e["info"][k] for e in run["per_image"] if k in e["info"]])
            for k in keys if all(k in e["info"] for e in run["per_image"])}
    if not info:
        return False
    fig = Figure(figsize=(7, 2.2 * len(info)))
    axes = fig.subplots(len(info), 1, sharex=True)
    for ax, (k, v) in zip(np.atleast_1d(axes), info.items()):
        ax.plot(v, lw=0.8)
        ax.set_ylabel(k)
    np.atleast_1d(axes)[-1].set_xlabel("image in stream")
    fig.suptitle(f"{method}: per-image traces (seed {run['seed']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def per_image_values(workdir, method: str) -> dict[str, np.ndarray]:
    """{metric: per-image values averaged over seeds and channels} of one method (Dice always;
    IoU and HD95 when the run computed the full metrics)."""
    by_seed = []
    for f in _seed_runs(Path(workdir), method):
        run, values = json.loads(f.read_text()), {}
        for e in run["per_image"]:
            values.setdefault("dice", []).extend(np.mean(e["dice"], axis=1))
            for per_image in e.get("metrics", []):
                for metric in ("iou", "hd95"):
                    values.setdefault(metric, []).append(np.mean([ch[metric] for ch in per_image.values()]))
        by_seed.append({k: np.asarray(v) for k, v in values.items()})
    return {k: np.mean([s[k] for s in by_seed], axis=0) for k in (by_seed[0] if by_seed else {})}


def per_image_violins(results: dict, workdir, path) -> bool:
    methods = [m for m in results["methods"] if _seed_runs(Path(workdir), m)]
    values = {m: per_image_values(workdir, m) for m in methods}
    metrics = [k for k in ("dice", "iou", "hd95") if methods and all(k in values[m] for m in methods)]
    if not metrics:
        return False
    labels = {"dice": "Dice ×100 ↑", "iou": "IoU ×100 ↑", "hd95": "HD95 (px) ↓"}
    fig = Figure(figsize=(max(4.5, 1.5 + 0.9 * len(methods)), 2.6 * len(metrics)))
    axes = fig.subplots(len(metrics), 1, squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        ax.violinplot([values[m][metric] for m in methods], showmedians=True)
        ax.set_xticks(np.arange(1, len(methods) + 1), methods, rotation=30, fontsize=7)
        ax.set_ylabel(labels[metric])
    axes[0, 0].set_title(f"{results['dataset']}: source {results['source_domain']}, per image "
                         f"(mean over seeds {results['seeds']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write_all(results: dict, workdir) -> list[str]:
    """Write every figure of one run into ``workdir``; returns the file names."""
    workdir = Path(workdir)
    written = []
    domain_bars(results, workdir / "dice_per_domain.png")
    written.append("dice_per_domain.png")
    stream_curves(results, workdir, workdir / "dice_along_stream.png")
    written.append("dice_along_stream.png")
    if per_image_violins(results, workdir, workdir / "per_image_violins.png"):
        written.append("per_image_violins.png")
    for m in results["methods"]:
        if method_traces(workdir, m, workdir / f"traces_{m}.png"):
            written.append(f"traces_{m}.png")
    return written
