import numpy as np
import pytest
from PIL import Image

from conftest import shared_data
from tta_jax.data import FolderDataset, SyntheticFundus, get_dataset, minmax_normalise


def test_synthetic_is_deterministic_and_consistent():
    ds = SyntheticFundus(num_train=3, num_test=2, seed=0)
    a, b = ds.load("A", "test", 32), ds.load("A", "test", 32)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.images.shape == (2, 32, 32, 3) and a.masks.shape == (2, 32, 32, 2)
    assert a.images.dtype == np.float32 and 0 <= a.images.min() and a.images.max() <= 1
    # cup ⊂ disc, both non-empty
    assert np.all(a.masks[..., 1] <= a.masks[..., 0])
    assert a.masks[..., 1].sum() > 0
    other = SyntheticFundus(num_train=3, num_test=2, seed=1).load("A", "test", 32)
    assert not np.array_equal(a.images, other.images)
    assert ds.ids("A", "all") == ["A/train/0000", "A/train/0001", "A/train/0002", "A/test/0000", "A/test/0001"]


def test_synthetic_domains_differ():
    ds = SyntheticFundus(num_train=0, num_test=8)
    colour = {d: ds.load(d, "test", 32).images.mean((0, 1, 2)) for d in ds.domains}
    for d in "BCDE":
        assert np.abs(colour[d] - colour["A"]).max() > 0.03, d


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("nope")
    with pytest.raises(ValueError, match="unknown domain 'Z'"):
        SyntheticFundus().load("Z", "test", 32)


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def folder_root(tmp_path):
    rng = np.random.default_rng(0)
    for dom, n in (("centre1", 5), ("centre2", 3)):
        for i in range(n):
            _write(tmp_path / dom / "images" / f"img{i}.jpg", rng.integers(0, 255, (40, 40, 3), np.uint8))
            mask = np.zeros((40, 40), np.uint8)
            mask[:20] = 200        # one foreground value: rows 0..19
            _write(tmp_path / dom / "masks" / f"img{i}.png", mask)
    (tmp_path / "centre1" / "notes").mkdir()          # ignored sub-folder
    (tmp_path / "not_a_domain").mkdir()                # ignored folder
    return tmp_path


def test_folders_reader(folder_root):
    ds = FolderDataset(str(folder_root))
    assert ds.domains == ("centre1", "centre2")
    d = ds.load("centre1", "all", 32)
    assert d.images.shape == (5, 32, 32, 3) and d.masks.shape == (5, 32, 32, 1)
    assert d.ids == ("img0", "img1", "img2", "img3", "img4")
    np.testing.assert_allclose(d.images.min((1, 2, 3)), 0)
    np.testing.assert_allclose(d.images.max((1, 2, 3)), 1)
    assert d.masks[0, :, :, 0].sum() == 16 * 32      # rows 0..15 after nearest resize of 20/40
    assert ds.ids("centre1", "test") == ["img4"]
    assert len(ds.ids("centre1", "train")) == 4


def test_folders_errors(folder_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        FolderDataset(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs data_dir"):
        FolderDataset("")
    (folder_root / "centre2" / "masks" / "img0.png").unlink()
    with pytest.raises(ValueError, match="image/mask mismatch.*img0"):
        FolderDataset(str(folder_root)).load("centre2", "all", 32)
    for f in (folder_root / "centre2" / "images").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match="empty domain"):
        FolderDataset(str(folder_root)).load("centre2", "all", 32)
    with pytest.raises(ValueError, match="unknown domain"):
        FolderDataset(str(folder_root)).load("centre9", "all", 32)


def test_corrupt_image_file(folder_root):
    (folder_root / "centre2" / "images" / "img1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*img1.jpg"):
        FolderDataset(str(folder_root)).load("centre2", "all", 32)


def test_minmax_constant_and_nonfinite():
    np.testing.assert_array_equal(minmax_normalise(np.full((4, 4, 3), 7.0)), np.zeros((4, 4, 3)))
    bad = np.zeros((4, 4, 3))
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        minmax_normalise(bad, where="x.png")


def test_real_polyp_sample():
    root = shared_data("polyp")
    ds = FolderDataset(str(root))
    assert set(ds.domains) >= {"Kvasir-SEG", "CVC-ClinicDB"}
    ids = ds.ids("CVC-ClinicDB", "all")
    assert len(ids) == 609
    d = FolderDataset(str(root))
    sub = d._split(d.pairs("Kvasir-SEG"), "all")[:4]
    from tta_jax.data.folders import read_image, read_mask
    masks = np.stack([read_mask(m, 64)[0] for _, _, m in sub])
    images = np.stack([read_image(i, 64)[0] for _, i, _ in sub])
    assert images.shape == (4, 64, 64, 3) and 0 < masks.mean() < 0.6
