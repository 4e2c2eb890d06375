"""A sweep over 2 processes × 2 CPU devices (JAX's multi-controller runtime) equals the single-process run."""
import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO

TINY = ["--config=configs/tent.py", "--config.methods=no_adapt,bn,tent", "--config.image_size=64",
        "--config.model.width=0.125", "--config.synthetic.num_train=32", "--config.synthetic.num_test=3",
        "--config.source.steps=30", "--config.seeds=2", "--config.target_domains=C,E", "--config.plots=False"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_two_processes_split_the_cells_and_report_the_single_process_table(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
    common = [sys.executable, "-m", "experiments.main", *TINY, f"--config.cache_dir={tmp_path / 'cache'}"]
    single = subprocess.run([*common, f"--workdir={tmp_path / 'single'}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen(
        [*common, f"--workdir={tmp_path / 'multi'}", "--config.distributed.enabled=True",
         f"--config.distributed.coordinator=localhost:{port}", "--config.distributed.num_processes=2",
         f"--config.distributed.process_id={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, logs):
        assert p.returncode == 0, err[-3000:]
    # 6 cells (3 rows × 2 seeds): 3 on each process, every seed file written once
    cells = [line for _, err in logs for line in err.splitlines() if "cells" in line and "process" in line]
    assert any("process 0 of 2: 3 of 6 cells" in c for c in cells) and any("process 1 of 2: 3 of 6 cells" in c
                                                                          for c in cells)
    one = json.loads((tmp_path / "single" / "results.json").read_text())
    two = json.loads((tmp_path / "multi" / "results.json").read_text())
    for method in ("no_adapt", "bn", "tent"):
        assert two["methods"][method]["trace_count"] == 0                 # every cell reused, none rerun
        for key in ("average", "per_domain"):
            assert two["methods"][method][key] == one["methods"][method][key], (method, key)
        for seed in (0, 1):
            a = json.loads((tmp_path / "single" / "runs" / method / f"seed_{seed}.json").read_text())
            b = json.loads((tmp_path / "multi" / "runs" / method / f"seed_{seed}.json").read_text())
            timeless = lambda run: [{k: v for k, v in e.items() if k != "seconds"} for e in run["per_image"]]
            assert timeless(a) == timeless(b) and a["fingerprint"] == b["fingerprint"]
    assert two["harm"] == one["harm"]
