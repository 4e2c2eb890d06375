"""PNG figures from ``results.json`` files (matplotlib, headless).

* ``domain_bars``: per-target Dice bars per method (mean ± std over seeds);
* ``stream_curves``: Dice along the stream (running mean) per method, seed 0;
* ``method_traces``: a method's own per-image traces, e.g. GraTa's η and cos.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def domain_bars(results: dict, path) -> None:
    methods, targets = list(results["methods"]), results["target_domains"]
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(targets) * max(1, len(methods)) / 3, 3.5))
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
    plt.close(fig)


def _seed_runs(workdir: Path, method: str):
    return sorted((workdir / "runs" / method).glob("seed_*.json"))


def stream_curves(results: dict, workdir, path, window: int = 10) -> None:
    workdir = Path(workdir)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for m in results["methods"]:
        files = _seed_runs(workdir, m)
        if not files:
            continue
        run = json.loads(files[0].read_text())
        dice = np.concatenate([np.mean(e["dice"], axis=1) for e in run["per_image"]])
        if "positions" in run["per_image"][0]:
            order = np.argsort(np.concatenate([e["positions"] for e in run["per_image"]]))
            dice = dice[order]
        kernel = np.ones(min(window, len(dice))) / min(window, len(dice))
        ax.plot(np.convolve(dice, kernel, mode="valid"), label=m)
    ax.set_xlabel("image in stream")
    ax.set_ylabel(f"Dice ×100 (running mean of {window})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def method_traces(workdir, method: str, path, keys=("eta", "cos")) -> bool:
    files = _seed_runs(Path(workdir), method)
    if not files:
        return False
    run = json.loads(files[0].read_text())
    info = {k: np.concatenate([e["info"][k] for e in run["per_image"] if k in e["info"]])
            for k in keys if all(k in e["info"] for e in run["per_image"])}
    if not info:
        return False
    fig, axes = plt.subplots(len(info), 1, figsize=(7, 2.2 * len(info)), sharex=True)
    for ax, (k, v) in zip(np.atleast_1d(axes), info.items()):
        ax.plot(v, lw=0.8)
        ax.set_ylabel(k)
    np.atleast_1d(axes)[-1].set_xlabel("image in stream")
    fig.suptitle(f"{method}: per-image traces (seed {run['seed']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_all(results: dict, workdir) -> list[str]:
    """Write every figure of one run into ``workdir``; returns the file names."""
    workdir = Path(workdir)
    written = []
    domain_bars(results, workdir / "dice_per_domain.png")
    written.append("dice_per_domain.png")
    stream_curves(results, workdir, workdir / "dice_along_stream.png")
    written.append("dice_along_stream.png")
    for m in results["methods"]:
        if method_traces(workdir, m, workdir / f"traces_{m}.png"):
            written.append(f"traces_{m}.png")
    return written
