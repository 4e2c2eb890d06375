import numpy as np
import pytest

from tta_jax.metrics import dice_per_channel, domain_summary


def _logits(pred):
    return np.where(pred, 5.0, -5.0).astype(np.float32)


def test_dice_known_masks():
    gt = np.zeros((1, 4, 4, 2), np.uint8)
    gt[0, :2, :, 0] = 1                  # 8 pixels
    pred = np.zeros_like(gt)
    pred[0, :1, :, 0] = 1                # 4 pixels, all inside
    # channel 1: gt empty, prediction empty -> 100 by the official epsilon rule
    d = np.asarray(dice_per_channel(_logits(pred), gt))
    np.testing.assert_allclose(d[0, 0], (2 * 4 + 1e-6) / (4 + 8 + 1e-6) * 100, rtol=1e-6)
    np.testing.assert_allclose(d[0, 1], 100.0, rtol=1e-6)


def test_dice_empty_mask_with_false_positive_is_zero():
    gt = np.zeros((1, 4, 4, 1), np.uint8)
    pred = np.zeros_like(gt)
    pred[0, 0, 0, 0] = 1
    assert float(dice_per_channel(_logits(pred), gt)[0, 0]) < 1e-3


def test_dice_threshold_is_on_probability():
    gt = np.ones((1, 2, 2, 1), np.uint8)
    logits = np.full((1, 2, 2, 1), 0.1, np.float32)   # p = 0.525 > 0.5
    assert float(dice_per_channel(logits, gt)[0, 0]) == pytest.approx(100.0)
    assert float(dice_per_channel(-logits, gt)[0, 0]) < 1e-3


def test_dice_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        dice_per_channel(np.zeros((1, 4, 4, 2)), np.zeros((1, 4, 4, 1)))


def test_domain_summary():
    s = domain_summary(np.array([[100.0, 50.0], [80.0, 30.0]]), ("disc", "cup"))
    assert s == {"disc": 90.0, "cup": 40.0, "mean": 65.0}
