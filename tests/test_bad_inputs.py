"""Hostile but realistic inputs: each gives the correct result or one clear error naming the problem."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tta_jax.data.digest import describe_change, file_digest, manifest
from tta_jax.data.folders import FolderDataset
from tta_jax.hparams import HParamError
from conftest import folders_config

SIZE = 32


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _square_mask(shape=(40, 40), top=8, side=16):
    mask = np.zeros(shape, bool)
    mask[top:top + side, top:top + side] = True
    return mask


def _image(rng, shape=(40, 40, 3)):
    return rng.integers(0, 255, shape, np.uint8)


def _domain(root, name, masks, rng, images=None):
    for i, mask in enumerate(masks):
        _save(root / name / "images" / f"im{i}.png", _image(rng) if images is None else images[i])
        if isinstance(mask, tuple):
            _save(root / name / "masks" / f"im{i}.png", *mask)
        else:
            _save(root / name / "masks" / f"im{i}.png", mask)


def _expected(mask, size=SIZE):
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127


@pytest.mark.parametrize("encoding", ["0/1", "0/255", "single value 7", "red RGB", "palette", "RGBA white"])
def test_binary_masks_in_common_encodings(tmp_path, encoding):
    rng = np.random.default_rng(0)
    m = _square_mask()
    encoded = {
        "0/1": m.astype(np.uint8),
        "0/255": m.astype(np.uint8) * 255,
        "single value 7": m.astype(np.uint8) * 7,
        "red RGB": np.stack([m * 255, np.zeros_like(m), np.zeros_like(m)], -1).astype(np.uint8),
        "palette": None,
        "RGBA white": np.stack([m * 255] * 3 + [np.full(m.shape, 255)], -1).astype(np.uint8),
    }[encoding]
    if encoding == "palette":
        im = Image.fromarray(m.astype(np.uint8), mode="L").convert("P")
        im.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
        (tmp_path / "A" / "masks").mkdir(parents=True)
        im.save(tmp_path / "A" / "masks" / "im0.png")
        _save(tmp_path / "A" / "images" / "im0.png", _image(rng))
    else:
        _domain(tmp_path, "A", [encoded], rng)
    data = FolderDataset(str(tmp_path)).load("A", "all", SIZE)
    np.testing.assert_array_equal(data.masks[0, ..., 0].astype(bool), _expected(m))


def test_ambiguous_levels_and_empty_domains_are_errors(tmp_path):
    rng = np.random.default_rng(1)
    three = np.full((40, 40), 255, np.uint8)
    three[8:24, 8:24], three[12:20, 12:20] = 128, 0
    _domain(tmp_path, "fundus", [three], rng)
    with pytest.raises(ValueError, match=r"3 discrete levels \(0, 128, 255\).*mask_encoding to fundus"):
        FolderDataset(str(tmp_path)).load("fundus", "all", SIZE)
    data = FolderDataset(str(tmp_path), {"mask_encoding": "fundus"}).load("fundus", "all", SIZE)
    disc, cup = data.masks[0, ..., 0].astype(bool), data.masks[0, ..., 1].astype(bool)
    np.testing.assert_array_equal(disc, _expected(three < 255))
    np.testing.assert_array_equal(cup, _expected(three == 0))
    labels = np.where(three == 255, 0, np.where(three == 128, 1, 2)).astype(np.uint8)
    _domain(tmp_path, "labels", [labels], rng)
    nested = FolderDataset(str(tmp_path), {"mask_encoding": "labels_nested", "channels": "disc,cup"})
    np.testing.assert_array_equal(nested.load("labels", "all", SIZE).masks, data.masks)   # same structure
    _domain(tmp_path, "empty", [np.zeros((40, 40), np.uint8)] * 2, rng)
    with pytest.raises(ValueError, match=r"empty/masks: every mask of this split is empty \(values found: 0\)"):
        FolderDataset(str(tmp_path)).load("empty", "all", SIZE)
    assert FolderDataset(str(tmp_path), {"allow_empty_masks": True}).load("empty", "all", SIZE).masks.sum() == 0
    with pytest.raises(HParamError, match="folders.mask_encoding='rgb' is not one of"):
        FolderDataset(str(tmp_path), {"mask_encoding": "rgb"})


def test_high_bit_depth_and_float_images_keep_their_range(tmp_path):
    import tifffile
    rng = np.random.default_rng(2)
    grey16 = (rng.random((40, 40)) * 4000 + 100).astype(np.uint16)    # a 12-bit range in 16-bit words
    rgb_float = rng.random((40, 40, 3)).astype(np.float32) * 3.0 - 1.0
    for name, image in (("g16", grey16), ("f32", rgb_float)):
        (tmp_path / name / "images").mkdir(parents=True)
        tifffile.imwrite(tmp_path / name / "images" / "im0.tif", image)
        _save(tmp_path / name / "masks" / "im0.png", _square_mask().astype(np.uint8) * 255)
    ds = FolderDataset(str(tmp_path))
    g = ds.load("g16", "all", 40).images[0]
    expected = (grey16 - grey16.min()) / float(grey16.max() - grey16.min())
    np.testing.assert_allclose(g[..., 0], expected, atol=1e-5)       # same size: no resampling
    assert len(np.unique(g)) > 1000                                  # not clipped to 8 bits
    f = ds.load("f32", "all", 40).images[0]
    np.testing.assert_allclose(f, (rgb_float - rgb_float.min()) / np.ptp(rgb_float), atol=1e-5)
    rgb_float[3, 4, 1] = np.nan
    tifffile.imwrite(tmp_path / "f32" / "images" / "im0.tif", rgb_float)
    with pytest.raises(ValueError, match=r"image .*f32/images/im0.tif: contains non-finite pixel values"):
        ds.load("f32", "all", 40)


def test_mask_size_must_match_its_image(tmp_path):
    rng = np.random.default_rng(3)
    _save(tmp_path / "A" / "images" / "im0.png", _image(rng, (40, 40, 3)))
    _save(tmp_path / "A" / "masks" / "im0.png", _square_mask((30, 40)).astype(np.uint8) * 255)
    with pytest.raises(ValueError, match=r"mask .*im0.png is 40x30 but its image is 40x40.*resize_masks"):
        FolderDataset(str(tmp_path)).load("A", "all", SIZE)
    assert FolderDataset(str(tmp_path), {"resize_masks": True}).load("A", "all", SIZE).masks.any()


def test_decompression_bomb_names_the_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    _domain(tmp_path, "A", [_square_mask().astype(np.uint8)], rng)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)     # 40x40 is then more than twice the limit
    with pytest.raises(ValueError, match=r"cannot read image .*A/images/im0.png: DecompressionBombError"):
        FolderDataset(str(tmp_path)).load("A", "all", SIZE)


def test_content_manifest_sees_every_change(tmp_path):
    rng = np.random.default_rng(5)
    _domain(tmp_path, "T", [_square_mask().astype(np.uint8)] * 3, rng)
    before = manifest(FolderDataset(str(tmp_path)).load("T", "all", SIZE))
    mask = _square_mask(top=4).astype(np.uint8)
    _save(tmp_path / "T" / "masks" / "im1.png", mask)                  # a mask changed in place
    _save(tmp_path / "T" / "images" / "im3.png", _image(rng))          # and an image added
    _save(tmp_path / "T" / "masks" / "im3.png", mask)
    after = manifest(FolderDataset(str(tmp_path)).load("T", "all", SIZE))
    assert describe_change(before, after, "T") == "1 image added, 1 image changed in T"
    (tmp_path / "w.pth").write_bytes(b"a")
    first = file_digest(tmp_path / "w.pth")
    (tmp_path / "w.pth").write_bytes(b"b")                            # replaced at the same path
    assert file_digest(tmp_path / "w.pth") != first
    shutil.copy(tmp_path / "w.pth", tmp_path / "elsewhere.pth")         # the same content elsewhere
    assert file_digest(tmp_path / "elsewhere.pth") == file_digest(tmp_path / "w.pth")


# --- through the experiment: one tiny folders dataset, one cached source model (conftest) ---------

def _table(res):
    return {m: agg["average"]["mean"] for m, agg in res["methods"].items()}


@pytest.mark.integration
def test_changed_data_reruns_exactly_what_depends_on_it(tiny_experiment, tmp_path):
    from tta_jax.experiment import run
    root, cache = tiny_experiment
    data = tmp_path / "data"
    shutil.copytree(root, data)
    work = tmp_path / "w"
    first = run(folders_config(data, cache), str(work))
    # change a target mask in place and add a target image; rerun into the same workdir
    _save(data / "T" / "masks" / "im0.png", _square_mask((32, 32), top=2, side=20).astype(np.uint8) * 255)
    shutil.copy(data / "T" / "images" / "im1.png", data / "T" / "images" / "im9.png")
    shutil.copy(data / "T" / "masks" / "im1.png", data / "T" / "masks" / "im9.png")
    again = run(folders_config(data, cache), str(work))
    fresh = run(folders_config(data, cache), str(tmp_path / "fresh"))
    assert _table(again) == _table(fresh) != _table(first)
    saved = json.loads((work / "results.json").read_text())
    seed_run = json.loads((work / "runs" / "bn" / "seed_0.json").read_text())
    assert len(saved["stream_ids"]["T"]) == 6 == len(seed_run["per_image"][0]["ids"])
    # a changed source domain changes the source model's cache key (so it is retrained)
    from tta_jax.data.digest import manifest_digest
    from tta_jax.source import source_settings
    c = folders_config(data, cache)
    key = lambda: source_settings(c, data_digest=manifest_digest(manifest(
        FolderDataset(str(data)).load("S", "train", SIZE))))
    before_change = key()
    _save(data / "S" / "masks" / "im0.png", _square_mask((32, 32), top=1, side=8).astype(np.uint8) * 255)
    assert key() != before_change and {**key(), "data": ""} == {**before_change, "data": ""}


def test_replaced_checkpoint_reruns_what_depends_on_it(tiny_experiment, tmp_path):
    """A source checkpoint replaced at the same path: the rerun into the same workdir equals a
    fresh run with the new weights, not the saved results of the old ones."""
    import orbax.checkpoint as ocp
    from tta_jax.checkpoints import save_variables
    from tta_jax.experiment import run
    root, cache = tiny_experiment
    trained = run(folders_config(root, cache, "no_adapt"), str(tmp_path / "train"))["source"]["checkpoint"]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained, ckpt)
    c = folders_config(root, cache, "no_adapt,bn")
    c.source_checkpoint = str(ckpt)
    first = run(c, str(tmp_path / "w"))
    variables = ocp.StandardCheckpointer().restore((ckpt / "variables").absolute())
    variables["params"]["seg_head"]["bias"] = variables["params"]["seg_head"]["bias"] + 2.0
    save_variables(ckpt, variables)
    again = run(c, str(tmp_path / "w"))
    fresh = run(c, str(tmp_path / "fresh"))
    assert _table(again) == _table(fresh) != _table(first)


def test_resume_reuses_finished_runs_and_unreadable_ones_count_as_absent(tiny_experiment, tmp_path):
    from tta_jax.experiment import run
    root, cache = tiny_experiment
    work = tmp_path / "w"
    c = folders_config(root, cache)
    c.seeds = 3
    first = run(c, str(work))
    again = run(c, str(work))                       # everything reused: nothing compiled
    assert again["source"]["trained_now"] is False
    assert [again["methods"][m]["trace_count"] for m in ("no_adapt", "bn")] == [0, 0]
    assert _table(again) == _table(first)
    runs = work / "runs" / "bn"
    (runs / "seed_0.json").write_text("null")
    (runs / "seed_1.json").write_bytes(b"\xff\xfe\x00garbage")
    (runs / "seed_2.json").unlink()
    (runs / "seed_2.json").mkdir()
    third = run(c, str(work))
    assert _table(third) == _table(first) and third["methods"]["bn"]["trace_count"] == 1
    for s in range(3):
        assert json.loads((runs / f"seed_{s}.json").read_text())["seed"] == s
    assert (runs / "seed_2.json.unreadable").is_dir()


def test_domain_lists_and_workdir_are_checked_before_any_work(tiny_experiment, tmp_path):
    from tta_jax.experiment import run
    root, cache = tiny_experiment
    c = folders_config(root, tmp_path / "empty_cache")
    c.target_domains = "T,T"
    with pytest.raises(HParamError, match="target_domains lists T more than once"):
        run(c, str(tmp_path / "w"))
    c.target_domains = "S,T"
    with pytest.raises(HParamError, match="the source domain 'S' is also a target"):
        run(c, str(tmp_path / "w"))
    c.target_domains = "T"
    blocker = tmp_path / "a_file"          # a workdir under a file cannot be created, even by root
    blocker.write_text("")
    with pytest.raises(PermissionError, match="is not writable"):
        run(c, str(blocker / "w"))
    assert not (tmp_path / "empty_cache").exists()     # failed before the source model was trained


def test_non_finite_steps_are_counted_and_shown(tiny_experiment, tmp_path):
    import dataclasses
    import jax.numpy as jnp
    from tta_jax.experiment import run
    from tta_jax.methods import Method, keep_if_finite, register
    from tta_jax.bn import forward_test_stats

    @dataclasses.dataclass(frozen=True)
    class Diverging:
        pass

    @register("diverging", Diverging)
    def make(model, hp):
        def init(variables, rng):
            return {"v": variables, "bias": jnp.zeros(())}

        def step(state, images, rng):
            new = {**state, "bias": state["bias"] + jnp.nan}
            new, ok = keep_if_finite(new, state)
            logits = forward_test_stats(model, new["v"]["params"], new["v"]["batch_stats"], images) + new["bias"]
            return new, logits, {"skipped": 1.0 - ok.astype(jnp.float32)}
        return Method("diverging", init, step, stream_axes={"v": None, "bias": 0})

    root, cache = tiny_experiment
    c = folders_config(root, cache)
    c.methods = "bn,diverging"
    res = run(c, str(tmp_path / "w"))
    assert res["methods"]["diverging"]["skipped_steps"] == [5] and res["methods"]["bn"]["skipped_steps"] == [0]
    assert res["methods"]["diverging"]["average"] == res["methods"]["bn"]["average"]   # state kept: = bn
    md = (tmp_path / "w" / "results.md").read_text()
    assert "**Non-finite adaptation steps skipped**" in md and "diverging (seed 0: 5)" in md
    with pytest.raises(HParamError, match="source.batch_size=0 must be >= 1"):
        c.source.batch_size = 0
        run(c, str(tmp_path / "w2"))


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_uninterrupted_table(tiny_experiment, tmp_path):
    """Kill the CLI (SIGKILL) once a first (method, seed) result is on disk, rerun into the same
    workdir: results.md equals the one of an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import REPO
    root, cache = tiny_experiment
    args = ["--config=configs/tent.py", "--config.dataset=folders", f"--config.data_dir={root}",
            "--config.source_domain=S", "--config.target_domains=T", "--config.image_size=32",
            "--config.model.width=0.125", "--config.source.steps=10", "--config.seeds=3",
            "--config.worst_fraction=0", "--config.plots=False", f"--config.cache_dir={cache}"]
    cli = lambda work: [sys.executable, "-m", "experiments.main", *args, f"--workdir={work}"]
    subprocess.run(cli(tmp_path / "whole"), cwd=REPO, check=True, capture_output=True, timeout=600)
    work = tmp_path / "killed"
    proc = subprocess.Popen(cli(work), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(work.glob("runs/*/seed_*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "results.md").exists()
    subprocess.run(cli(work), cwd=REPO, check=True, capture_output=True, timeout=600)
    assert (work / "results.md").read_text() == (tmp_path / "whole" / "results.md").read_text()
