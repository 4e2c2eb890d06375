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


def test_help_and_harm_against_no_adapt():
    ref = _run(0, [[v, v] for v in (10, 20, 30, 40, 50)], [[v, v] for v in (60, 70, 80, 90, 100)])
    # seed 0: b0 +10 (helped), b1 −4 (hurt), b2 +0.5 (neither), c0 −8 (hurt); seed 1: only c4 −2
    m0 = _run(0, [[20, 20], [16, 16], [30.5, 30.5], [40, 40], [50, 50]], [[52, 52], [70, 70], [80, 80], [90, 90], [100, 100]])
    m1 = _run(1, [[v, v] for v in (10, 20, 30, 40, 50)], [[60, 60], [70, 70], [80, 80], [90, 90], [98, 98]])
    h = report.harm({"no_adapt": [ref, ref], "m": [m0, m1]})
    m = h["methods"]["m"]
    assert m["helped"] == {"mean": pytest.approx(5.0), "std": pytest.approx(5.0)}        # 10 % and 0 %
    assert m["hurt"] == {"mean": pytest.approx(15.0), "std": pytest.approx(5.0)}         # 20 % and 10 %
    assert m["loss_when_hurt"]["mean"] == pytest.approx(np.mean([(-4 - 8) / 2, -2]))
    assert m["per_domain"]["B"]["hurt"]["mean"] == pytest.approx(10.0)                   # 20 % and 0 %
    assert m["per_domain"]["B"]["loss_when_hurt"] == {"mean": -4.0, "std": 0.0}          # seed 1 hurt none in B
    assert "no_adapt" not in h["methods"]
    # Wilcoxon on the seed-averaged per-image Dice, against scipy directly
    from scipy import stats
    own = [np.mean([a, b]) for a, b in zip([20, 16, 30.5, 40, 50, 52, 70, 80, 90, 100], [10, 20, 30, 40, 50, 60, 70, 80, 90, 98])]
    ref_dice = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert m["wilcoxon_p"] == pytest.approx(stats.wilcoxon(own, ref_dice).pvalue)
    assert report.paired_wilcoxon([1, 2], [1, 2]) is None
    rows = report.merged_rows([{"source_domain": "A", "target_domains": ["B", "C"], "harm": h, "methods": {
        "m": {"average": {"mean": 1, "std": 0}, "per_domain": {d: {"mean": {"mean": 1, "std": 0}} for d in "BC"}}}}])
    assert rows[0]["hurt"] == (10.0, 10.0) and rows[2]["hurt"] == (15.0, 5.0)
    assert "% hurt (< −1) ↓" in report.merged_markdown(rows) and "| 15.00 ± 5.00 % |" in report.harm_table(h)
