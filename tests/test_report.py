"""Report aggregation: numbers on hand-made seed runs."""
import numpy as np
import pytest

from tta_jax import report


def _run(seed, dice_b, dice_c):
    """A seed run with per-image Dice [N, 2] on domains B and C."""
    return {"seed": seed, "per_image": [
        {"domain": "B", "round": 0, "ids": [f"b{i}" for i in range(len(dice_b))], "dice": dice_b},
        {"domain": "C", "round": 0, "ids": [f"c{i}" for i in range(len(dice_c))], "dice": dice_c}]}


def test_worst_images_ranked_by_reference():
    # 10 images; no_adapt's channel means: b0..b4 = 10, 20, 30, 40, 50; c0..c4 = 60, ..., 100
    ref = _run(0, [[v, v] for v in (10, 20, 30, 40, 50)], [[v, v] for v in (60, 70, 80, 90, 100)])
    # the method lifts the two worst images to 80 and leaves the rest; two seeds differ on b0
    m0 = _run(0, [[80, 80], [70, 90], [30, 30], [40, 40], [50, 50]], [[v, v] for v in (60, 70, 80, 90, 100)])
    m1 = _run(1, [[60, 60], [80, 80], [30, 30], [40, 40], [50, 50]], [[v, v] for v in (60, 70, 80, 90, 100)])
    w = report.worst_images({"no_adapt": [ref, ref], "m": [m0, m1]}, "no_adapt", fraction=0.2)
    assert w["n_images"] == 2
    assert w["methods"]["no_adapt"]["worst"] == {"mean": 15.0, "std": 0.0}
    assert w["methods"]["m"]["worst"]["mean"] == pytest.approx((80 + 80 + 60 + 80) / 4)
    assert w["methods"]["m"]["worst"]["std"] == pytest.approx(np.std([80, 70]))
    assert w["methods"]["no_adapt"]["all"]["mean"] == pytest.approx(55.0)
    # 10 % of 10 images is one image: b0 only
    assert report.worst_images({"no_adapt": [ref], "m": [m0]}, fraction=0.1)["methods"]["m"]["worst"]["mean"] == 80
    table = report.worst_images_table(w)
    assert "worst 20 % (2 images, ranked by no_adapt)" in table and "| m | " in table
    with pytest.raises(ValueError, match="reference method 'no_adapt'"):
        report.worst_images({"m": [m0]})
    with pytest.raises(ValueError, match="fraction"):
        report.worst_images({"no_adapt": [ref]}, fraction=0)
