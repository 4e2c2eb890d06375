"""TFDS builders: synthetic miniatures of every original layout, and the real samples."""
import csv
import os
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import shared_data
from tta_jax.data import get_dataset
from tta_jax.data.tfds_builders import TFDSDataset

SIZE = 32


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _fundus_mask(rng):
    m = np.full((SIZE, SIZE), 255, np.uint8)
    r = rng.integers(6, 12)
    m[16 - r:16 + r, 16 - r:16 + r] = 128
    m[14:18, 14:18] = 0
    return m


def _image(rng):
    return rng.integers(0, 255, (SIZE, SIZE, 3), np.uint8)


def test_fundus_dofe_miniature(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    masks = {}
    for d in ("Domain1", "Domain2"):
        for part, n in (("train", 2), ("test", 3)):
            for i in range(n):
                m = _fundus_mask(rng)
                masks[f"{d}/{part}/s{i}"] = m
                _png(raw / d / part / "ROIs" / "image" / f"s{i}.png", _image(rng))
                _png(raw / d / part / "ROIs" / "mask" / f"s{i}.png", m)
    ds = get_dataset("fundus_dofe", str(raw), tfds_dir=str(tmp_path / "tfds"), image_size=SIZE)
    assert ds.domains == ("Domain1", "Domain2") and ds.channel_names == ("disc", "cup")
    data = ds.load("Domain2", "all", SIZE)
    assert data.ids == ("Domain2/train/s0", "Domain2/train/s1", "Domain2/test/s0", "Domain2/test/s1",
                        "Domain2/test/s2")
    for sample_id, mask in zip(data.ids, data.masks):
        raw_mask = masks[sample_id]
        assert mask[..., 0].sum() == (raw_mask < 255).sum()     # disc includes the cup
        assert mask[..., 1].sum() == (raw_mask == 0).sum()
    assert data.images.min() == 0 and data.images.max() == 1
    assert ds.load("Domain1", "test", SIZE).ids == ("Domain1/test/s0", "Domain1/test/s1", "Domain1/test/s2")


def test_fundus_odoc_miniature(tmp_path):
    rng = np.random.default_rng(1)
    raw = tmp_path / "raw"
    for csv_name, n in (("RIM_ONE_r3_train.csv", 2), ("RIM_ONE_r3_test.csv", 1), ("REFUGE_Valid.csv", 2)):
        rows = []
        for i in range(n):
            stem = f"{csv_name[:-4]}_{i}"
            _png(raw / "img" / f"{stem}.png", _image(rng))
            _png(raw / "msk" / f"{stem}.bmp", _fundus_mask(rng))
            rows.append({"image": f"img/{stem}.png", "mask": f"msk/{stem}.bmp"})
        with open(raw / csv_name, "w", newline="") as f:
            w = csv.DictWriter(f, ["image", "mask"])
            w.writeheader()
            w.writerows(rows)
    ds = get_dataset("fundus_odoc", str(raw), tfds_dir=str(tmp_path / "tfds"), image_size=SIZE)
    assert set(ds.domains) == {"RIM_ONE_r3", "REFUGE_Valid"}
    assert len(ds.load("RIM_ONE_r3", "all", SIZE).ids) == 3       # a target uses train + test
    assert len(ds.load("REFUGE_Valid", "all", SIZE).ids) == 2


def test_polyp_miniature_layouts(tmp_path):
    import tifffile
    rng = np.random.default_rng(2)
    raw = tmp_path / "raw"
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:20, 4:12] = 255
    for i in range(5):
        _png(raw / "Kvasir-SEG" / "images" / f"k{i}.jpg", _image(rng))
        _png(raw / "Kvasir-SEG" / "masks" / f"k{i}.jpg", mask)
    for i in range(1, 3):     # official CVC-ClinicDB: TIFF in Original/ and "Ground Truth/"
        (raw / "CVC-ClinicDB" / "Original").mkdir(parents=True, exist_ok=True)
        (raw / "CVC-ClinicDB" / "Ground Truth").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(raw / "CVC-ClinicDB" / "Original" / f"{i}.tif", _image(rng))
        tifffile.imwrite(raw / "CVC-ClinicDB" / "Ground Truth" / f"{i}.tif", mask)
    for i in range(1, 3):     # official ETIS: masks named p<N>
        _png(raw / "ETIS-LaribPolypDB" / "ETIS-LaribPolypDB" / f"{i}.png", _image(rng))
        _png(raw / "ETIS-LaribPolypDB" / "GroundTruth" / f"p{i}.png", mask)
    ds = get_dataset("polyp", str(raw), tfds_dir=str(tmp_path / "tfds"), image_size=SIZE)
    assert set(ds.domains) == {"Kvasir_SEG", "CVC_ClinicDB", "ETIS_LaribPolypDB"}
    cvc = ds.load("CVC_ClinicDB", "all", SIZE)
    assert cvc.ids == ("CVC-ClinicDB/1", "CVC-ClinicDB/2") and cvc.masks.shape == (2, SIZE, SIZE, 1)
    assert cvc.masks[0, ..., 0].sum() == 16 * 8
    assert len(ds.load("Kvasir_SEG", "test", SIZE).ids) == 1 and len(ds.load("Kvasir_SEG", "train", SIZE).ids) == 4


def test_prostate_mismatch_refused(tmp_path):
    rng = np.random.default_rng(3)
    raw = tmp_path / "raw"
    for site in ("BIDMC", "I2CVB"):
        for i in range(2):
            j = i + 1 if site == "I2CVB" else i      # I2CVB masks offset by one
            _png(raw / site / "train" / "image" / f"00_{i:02d}.png", _image(rng)[..., 0])
            _png(raw / site / "train" / "mask" / f"00_{j:02d}.png", (rng.random((SIZE, SIZE)) > 0.5).astype(np.uint8) * 255)
    with pytest.raises(ValueError, match="I2CVB.*do not pair by name"):
        get_dataset("prostate_saml", str(raw), tfds_dir=str(tmp_path / "tfds"), image_size=SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = get_dataset("prostate_saml", str(raw), tfds_dir=str(tmp_path / "tfds2"), image_size=SIZE,
                         on_mismatch="skip")
    assert ds.domains == ("BIDMC",)


def test_tfds_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        get_dataset("polyp", str(tmp_path / "nothing"), tfds_dir=str(tmp_path / "t"))
    with pytest.raises(ValueError, match="needs data_dir"):
        get_dataset("polyp", "")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="does not exist or is empty"):
        get_dataset("polyp", str(tmp_path / "empty"), tfds_dir=str(tmp_path / "t"))
    (tmp_path / "empty" / "README").write_text("no centres here")
    with pytest.raises(FileNotFoundError, match="none of the polyp centres"):
        get_dataset("polyp", str(tmp_path / "empty"), tfds_dir=str(tmp_path / "t2"))


def test_real_dofe_sample_channels(tmp_path):
    root = shared_data("fundus_dofe_sample")
    ds = TFDSDataset("fundus_dofe", root, tmp_path / "tfds", image_size=128)
    assert ds.domains == ("Domain1", "Domain2", "Domain3", "Domain4")
    data = ds.load("Domain3", "all", 128)
    assert len(data.ids) == 6
    for sample_id, mask in zip(data.ids, data.masks):
        d, part, stem = sample_id.split("/")
        raw = np.asarray(Image.open(root / d / part / "ROIs" / "mask" / f"{stem}.png").convert("L"))
        small = np.asarray(Image.fromarray(raw).resize((128, 128), Image.NEAREST))
        assert mask[..., 0].sum() == (small < 255).sum() and mask[..., 1].sum() == (small == 0).sum()
        assert 0 < mask[..., 1].sum() < mask[..., 0].sum()


def test_real_prostate_sample_offset_is_refused(tmp_path):
    root = shared_data("prostate_saml_sample")
    with pytest.raises(ValueError, match="I2CVB/train.*do not pair by name"):
        TFDSDataset("prostate_saml", root, tmp_path / "tfds", image_size=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = TFDSDataset("prostate_saml", root, tmp_path / "tfds2", image_size=128, on_mismatch="skip")
    assert "I2CVB" in ds.domains           # its test part pairs fine
    ids = ds.load("I2CVB", "all", 128).ids
    assert len(ids) == 3 and all(i.startswith("I2CVB/test/") for i in ids)


@pytest.mark.slow
def test_real_polyp_builder(tmp_path):
    ds = TFDSDataset("polyp", shared_data("polyp"), tmp_path / "tfds", image_size=128)
    assert set(ds.domains) == {"Kvasir_SEG", "CVC_ClinicDB"}
    assert len(ds.ids("CVC_ClinicDB", "all")) == 609


@pytest.mark.integration
def test_dofe_sample_as_folders_equals_the_builder(tmp_path):
    """The shared DoFE sample laid out as plain folders (disc + cup masks in the DoFE encoding) reads
    to the same images and masks as the fundus_dofe builder, and a fixed model scores the same
    per-channel table on both."""
    from configs import source
    from tta_jax import checkpoints
    from tta_jax.experiment import run
    from tta_jax.models import ResUNet, init_variables
    root = shared_data("fundus_dofe_sample")
    folders = tmp_path / "folders"
    for domain in ("Domain1", "Domain2"):
        for part in ("train", "test"):
            for kind, sub in (("image", "images"), ("mask", "masks")):
                for f in sorted((root / domain / part / "ROIs" / kind).glob("*.png")):
                    (folders / domain / sub).mkdir(parents=True, exist_ok=True)
                    os.symlink(f, folders / domain / sub / f"{part}-{f.name}")
    size = 64
    builder = TFDSDataset("fundus_dofe", root, tmp_path / "tfds", image_size=size)
    from tta_jax.data import FolderDataset
    plain = FolderDataset(str(folders), {"mask_encoding": "fundus"})
    assert plain.channel_names == builder.channel_names == ("disc", "cup")
    for domain in ("Domain1", "Domain2"):
        a, b = builder.load(domain, "all", size), plain.load(domain, "all", size)
        by_id = {i.split("/")[1] + "-" + i.split("/")[2]: k for k, i in enumerate(a.ids)}
        order = [by_id[i] for i in b.ids]
        np.testing.assert_array_equal(a.masks[order], b.masks)
        np.testing.assert_allclose(a.images[order], b.images, atol=1e-6)
        # the stored sizes (for distances in native pixels), e.g. 800×800 DoFE crops
        np.testing.assert_array_equal(a.native_sizes[order], b.native_sizes)
        assert b.native_sizes.min() > size
    model = ResUNet(backbone="resnet18", num_classes=2, width=0.125)
    checkpoints.save_variables(tmp_path / "ckpt", jax.device_get(init_variables(model, jax.random.PRNGKey(0), size)))
    tables = []
    for dataset, data_dir, extra in (("fundus_dofe", root, {}), ("folders", folders, {"mask_encoding": "fundus"})):
        c = source.get_config()
        c.dataset, c.data_dir, c.image_size, c.tfds_dir = dataset, str(data_dir), size, str(tmp_path / "tfds")
        c.source_domain, c.target_domains, c.source_checkpoint = "Domain1", "Domain2", str(tmp_path / "ckpt")
        c.model.width, c.folders.mask_encoding = 0.125, extra.get("mask_encoding", "auto")
        res = run(c, str(tmp_path / dataset))
        tables.append(res["source"]["targets_no_adapt"]["Domain2"])
    assert tables[0] == pytest.approx(tables[1], abs=1e-9) and set(tables[0]) >= {"disc", "cup", "mean"}
