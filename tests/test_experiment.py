"""End-to-end checks of ``tta_jax.experiment`` on tiny settings, and the config errors."""
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, shared_data
from tta_jax.experiment import run, validate_config


def tiny_config(tmp_path, methods="no_adapt,bn,tent"):
    from configs import tent
    c = tent.get_config()
    c.methods = methods
    c.image_size = 64
    c.model.width = 0.125
    c.synthetic.num_train = 64
    c.synthetic.num_test = 4
    c.source.steps = 300
    c.source.lr = 3e-3
    c.source.batch_size = 8
    c.seeds = 2
    c.target_domains = "C,E"
    c.cache_dir = str(tmp_path / "cache")
    return c


@pytest.mark.integration
def test_cli_config_errors(tmp_path):
    """Each bad command line: exit status 1 and one line on stderr (the processes run concurrently)."""
    from tta_jax.checkpoints import save_variables
    corrupt = tmp_path / "corrupt_ckpt"
    save_variables(corrupt, {"params": {"w": np.zeros(3, np.float32)}})
    for f in (corrupt / "variables").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    cases = {
        ("--config.no_such_key=1",): "error: unknown config key --config.no_such_key",
        # a known key is overridden (and then validated before any work starts)
        ("--config.target_domains=C,E", "--config.seeds=0"): "error: seeds must be >= 1, got 0",
        ("--config.methods=tent,magic",): "error: unknown method 'magic'",
        ("--config.tent.lr=-1",): "error: tent.lr=-1.0 must be >= 0.0",
        # orbax's own worker-thread tracebacks stay hidden behind the one line
        (f"--config.source_checkpoint={corrupt}", "--config.methods=no_adapt"):
            f"error: checkpoint {corrupt} is corrupt or unreadable",
    }
    procs = {args: subprocess.Popen([sys.executable, "-m", "experiments.main", "--config=configs/tent.py", *args,
                                     f"--workdir={tmp_path}"], cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for args in cases}
    for args, expected in cases.items():
        _, err = procs[args].communicate(timeout=180)
        assert procs[args].returncode == 1 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith(expected), err


@pytest.mark.parametrize("key,value,match", [
    ("methods", "no_adapt,magic", "unknown method 'magic'"),
    ("dataset", "imagenet", "unknown dataset"),
    ("protocol", "weekly", "unknown protocol"),
    ("loop", "while", "unknown loop"),
    ("stream_map", "pmap", "unknown stream_map"),
    ("image_size", 50, "multiple of 32"),
    ("max_target_images", -1, "max_target_images must be >= 0"),
    ("compare_to", "grata", "compare_to='grata' is not among the compared methods"),
    ("model.compute_dtype", "float16", "unknown model.compute_dtype 'float16'"),
])
def test_validate_config(tmp_path, key, value, match):
    c = tiny_config(tmp_path)
    *parents, leaf = key.split(".")
    node = c
    for parent in parents:
        node = node[parent]
    node[leaf] = value
    with pytest.raises(ValueError, match=match):
        validate_config(c)


def test_subsample_stream_evenly_spaced_in_order():
    from tta_jax.evaluate import subsample_stream
    from tta_jax.data import DomainData
    n = 10
    data = DomainData("X", np.arange(n, dtype=np.float32)[:, None, None, None], np.zeros((n, 1, 1, 1), np.uint8),
                      tuple(f"im{i}" for i in range(n)))
    sub = subsample_stream(data, 4)
    assert sub.ids == ("im0", "im3", "im6", "im9") and sub.images[:, 0, 0, 0].tolist() == [0, 3, 6, 9]
    assert subsample_stream(data, 0) is data and subsample_stream(data, 10) is data


def test_bad_domains_and_missing_folder(tmp_path):
    c = tiny_config(tmp_path)
    c.target_domains = "C,Q"
    with pytest.raises(ValueError, match="unknown target domain 'Q'"):
        run(c, str(tmp_path / "w"))
    c = tiny_config(tmp_path)
    c.dataset, c.data_dir = "folders", str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        run(c, str(tmp_path / "w"))


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shared")


@pytest.mark.slow
def test_end_to_end_adaptation_improves_and_resumes(shared_cache):
    tmp_path = shared_cache
    c = tiny_config(tmp_path)
    work = tmp_path / "work"
    res = run(c, str(work))
    saved = json.loads((work / "results.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["target_domains"] == ["C", "E"]
    assert "| tent |" in (work / "results.md").read_text()
    methods = saved["methods"]
    for name in ("no_adapt", "bn", "tent"):
        assert methods[name]["trace_count"] == 1             # one compilation per method, all seeds vmapped
        assert 0 <= methods[name]["average"]["mean"] <= 100
    # the source model learned its domain, and test-time BN repairs the shifted domain C
    assert saved["source"]["own_domain_heldout"]["mean"] > 80
    assert methods["bn"]["per_domain"]["C"]["mean"]["mean"] > methods["no_adapt"]["per_domain"]["C"]["mean"]["mean"] + 5
    # deterministic methods: identical seeds
    assert methods["no_adapt"]["average"]["std"] == 0
    # resume: a second run reuses the cached source model and every finished (method, seed)
    res2 = run(c, str(work))
    assert res2["source"]["trained_now"] is False
    assert res2["methods"]["tent"]["average"] == res["methods"]["tent"]["average"]
    assert res2["methods"]["tent"]["trace_count"] == 0          # nothing recompiled: all reused


@pytest.mark.integration
def test_long_term_mixed_and_full_metrics(tiny_experiment, tmp_path):
    from conftest import folders_config
    c = folders_config(*tiny_experiment, methods="bn,tent")
    c.seeds, c.protocol, c.rounds, c.metrics = 2, "long_term", 2, "full"
    res = run(c, str(tmp_path / "lt"))
    tent = res["methods"]["tent"]
    assert len(tent["round_means"]) == 2
    assert tent["degradation"]["mean"] == pytest.approx(
        np.mean([r["mean"] for r in tent["round_means"]]) - tent["round_means"][0]["mean"], abs=1e-9)
    assert res["methods"]["bn"]["degradation"]["mean"] == pytest.approx(0, abs=1e-9)   # nothing adapts
    assert set(tent["metrics"]) == {"dice", "iou", "assd", "hd95", "e_measure", "s_measure"}
    # the full metrics are computed from the same binary predictions as the run's Dice
    assert tent["metrics"]["dice"]["mean"] == pytest.approx(tent["average"]["mean"], abs=1e-6)
    md = (tmp_path / "lt" / "results.md").read_text()
    assert "Degradation" in md and "HD95" in md
    c.protocol, c.compare_to = "mixed", "bn"
    res = run(c, str(tmp_path / "mixed"))
    assert res["harm"] is None and res["harm_vs_reference"]["reference"] == "bn"
    assert set(res["harm_vs_reference"]["methods"]) == {"tent"}
    assert "Help and harm per image against bn (config compare_to" in (tmp_path / "mixed" / "results.md").read_text()
    seed_run = json.loads((tmp_path / "mixed" / "runs" / "tent" / "seed_0.json").read_text())
    positions = sorted(p for e in seed_run["per_image"] for p in e["positions"])
    assert positions == list(range(5)) and res["config"]["mixed_seed"] == 2026


def test_distances_in_native_pixels(tiny_experiment, tmp_path):
    """Target images stored at twice the model's size: ASSD/HD95 in native pixels are exactly
    twice those in resized pixels, image by image (empty cases included), and the table says so."""
    import shutil
    from PIL import Image
    from conftest import folders_config
    data, cache = tiny_experiment
    root = tmp_path / "data"
    shutil.copytree(data / "S", root / "S")    # same content: the cached source model is reused
    for sub, resample in (("images", Image.BICUBIC), ("masks", Image.NEAREST)):
        (root / "T" / sub).mkdir(parents=True)
        for f in sorted((data / "T" / sub).iterdir()):
            with Image.open(f) as im:
                im.resize((64, 64), resample).save(root / "T" / sub / f.name)
    c = folders_config(root, cache, methods="no_adapt")
    c.metrics = "full"
    distances = {}
    for unit in ("resized_pixels", "native_pixels"):
        c.distance_unit = unit
        run(c, str(tmp_path / unit))
        seed_run = json.loads((tmp_path / unit / "runs" / "no_adapt" / "seed_0.json").read_text())
        distances[unit] = np.array([[ch[k] for ch in m.values() for k in ("assd", "hd95")]
                                    for e in seed_run["per_image"] for m in e["metrics"]])
    assert distances["resized_pixels"].shape == (5, 2) and distances["resized_pixels"].min() > 0
    np.testing.assert_allclose(distances["native_pixels"], 2 * distances["resized_pixels"], rtol=1e-12)
    assert "pixels of the 32×32 arrays" in (tmp_path / "resized_pixels" / "results.md").read_text()
    assert "native resolution" in (tmp_path / "native_pixels" / "results.md").read_text()


@pytest.mark.slow
def test_default_tent_config_domain_gap(tmp_path):
    """The acceptance run: default synthetic benchmark, source ≥ 85 Dice and a ≥ 10-point gap."""
    from configs import tent
    c = tent.get_config()
    c.cache_dir = str(tmp_path / "cache")
    res = run(c, str(tmp_path / "w"))
    own = res["source"]["own_domain_heldout"]["mean"]
    no_adapt = res["methods"]["no_adapt"]["average"]["mean"]
    assert own >= 85 and own - no_adapt >= 10


@pytest.mark.slow
def test_polyp_real_data_pipeline(tmp_path):
    root = shared_data("polyp")
    from configs import tent
    c = tent.get_config("polyp")
    c.data_dir = str(root)
    c.seeds = 1
    c.source.steps = 300
    c.cache_dir = str(tmp_path / "cache")
    res = run(c, str(tmp_path / "w"))
    assert res["target_domains"] == ["CVC-ClinicDB"] and len(res["stream_ids"]["CVC-ClinicDB"]) == 609


@pytest.mark.integration
def test_leave_one_domain_grid_and_merge(tiny_experiment, tmp_path):
    """source_domain=all on a 2-domain folders dataset: one run per source and a merged table."""
    from conftest import folders_config
    c = folders_config(*tiny_experiment)
    c.source_domain, c.target_domains, c.seeds, c.metrics, c.plots = "all", "", 2, "full", True
    out = run(c, str(tmp_path / "grid"))
    assert set(out["grid"]) == {"S", "T"}
    merged = (tmp_path / "grid" / "merged.md").read_text()
    assert "| S | T | bn |" in merged and "| T | S | no_adapt |" in merged and "HD95" in merged
    csv_lines = (tmp_path / "grid" / "merged.csv").read_text().splitlines()
    assert csv_lines[0].startswith("source,target,method,dice_mean,dice_std,iou_mean")
    assert len(csv_lines) == 1 + 2 * 2 * 2     # 2 sources × 2 methods × (1 target + average)
    assert (tmp_path / "grid" / "S" / "dice_per_domain.png").stat().st_size > 1000
    assert (tmp_path / "grid" / "S" / "per_image_violins.png").stat().st_size > 1000
    from tta_jax.plots import per_image_values
    seed_runs = [json.loads((tmp_path / "grid" / "S" / "runs" / "bn" / f"seed_{s}.json").read_text()) for s in (0, 1)]
    dice = np.mean([np.concatenate([np.mean(e["dice"], axis=1) for e in r["per_image"]]) for r in seed_runs], axis=0)
    values = per_image_values(tmp_path / "grid" / "S", "bn")
    np.testing.assert_allclose(values["dice"], dice)
    assert set(values) == {"dice", "iou", "hd95"}


@pytest.mark.integration
def test_source_stage_ablation_merges_one_row_per_stage_and_method(tmp_path):
    """Each stage trains its own source model (here: different step counts) and the merged table
    labels rows stage/method with that stage's own numbers."""
    c = tiny_config(tmp_path, methods="no_adapt")
    c.seeds, c.target_domains, c.image_size, c.synthetic.num_train, c.synthetic.num_test = 1, "C", 32, 16, 2
    c.source_stages = {"1_short": {"methods": "no_adapt", "overrides": {"source": {"steps": 2}}},
                       "2_long": {"methods": "no_adapt,bn", "overrides": {"source": {"steps": 4}}}}
    out = run(c, str(tmp_path / "ablation"))
    merged = (tmp_path / "ablation" / "merged.md").read_text()
    for stage, methods in (("1_short", ["no_adapt"]), ("2_long", ["no_adapt", "bn"])):
        res = json.loads((tmp_path / "ablation" / stage / "results.json").read_text())
        assert res["config"]["source"]["steps"] == {"1_short": 2, "2_long": 4}[stage]
        for m in methods:
            assert f"| A | average | {stage}/{m} | {res['methods'][m]['average']['mean']:.2f} ± " in merged
    assert out["stages"]["1_short"]["source"]["identity"] != out["stages"]["2_long"]["source"]["identity"]
    c.source_stages = {"x": {"methods": "no_adapt", "overrides": {"source": {"stepz": 1}}}}
    with pytest.raises(ValueError, match="source_stages.x: unknown override source.stepz"):
        run(c, str(tmp_path / "bad"))
