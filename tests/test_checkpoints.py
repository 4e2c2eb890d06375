import json

import jax
import numpy as np
import pytest

from tta_jax.checkpoints import CheckpointError, atomic_write_text, load_meta, restore_variables, save_variables
from tta_jax.models import ResUNet, init_variables


def test_roundtrip(tmp_path, tiny_variables):
    save_variables(tmp_path / "ck", tiny_variables, {"note": "x"})
    restored = restore_variables(tmp_path / "ck", tiny_variables)
    jax.tree.map(np.testing.assert_array_equal, restored, tiny_variables)
    assert load_meta(tmp_path / "ck") == {"note": "x"}


def test_missing_and_corrupt(tmp_path, tiny_variables):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        restore_variables(tmp_path / "nothing", tiny_variables)
    save_variables(tmp_path / "ck", tiny_variables)
    for f in (tmp_path / "ck" / "variables").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        restore_variables(tmp_path / "ck", tiny_variables)
    (tmp_path / "ck" / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json is corrupt"):
        load_meta(tmp_path / "ck")


def test_mismatched_model(tmp_path, tiny_variables):
    save_variables(tmp_path / "ck", tiny_variables)
    other = jax.device_get(init_variables(ResUNet(backbone="resnet18", num_classes=1, width=0.125),
                                          jax.random.PRNGKey(0), 32))
    with pytest.raises(CheckpointError, match="seg_head.*shape"):
        restore_variables(tmp_path / "ck", other)


def test_atomic_write(tmp_path):
    atomic_write_text(tmp_path / "a" / "r.json", json.dumps({"k": 1}))
    assert json.loads((tmp_path / "a" / "r.json").read_text()) == {"k": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["r.json"]
