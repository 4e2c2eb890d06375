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


from tta_jax.metrics import e_measure_max, full_metrics, iou, s_measure, surface_distances  # noqa: E402


def _square(size, lo, hi):
    m = np.zeros((size, size), bool)
    m[lo:hi, lo:hi] = True
    return m


def test_iou_known_and_empty():
    a, b = _square(10, 0, 4), _square(10, 2, 6)     # 16 and 16 px, overlap 4
    assert iou(a, b) == pytest.approx(4 / 28 * 100, rel=1e-6)
    assert iou(np.zeros((4, 4)), np.zeros((4, 4))) == pytest.approx(100)
    assert iou(a, np.zeros_like(a)) < 1e-3


def test_surface_distances_shifted_square():
    gt = _square(20, 5, 10)
    pred = np.roll(gt, 3, axis=1)                     # the same square, 3 px to the right
    assd, hd95 = surface_distances(pred, gt)
    assert hd95 == pytest.approx(3.0)
    assert 0 < assd <= 3.0
    assert surface_distances(gt, gt) == (0.0, 0.0)
    assert surface_distances(np.zeros_like(gt), np.zeros_like(gt)) == (0.0, 0.0)
    diag = np.hypot(20, 20)
    assert surface_distances(np.zeros_like(gt), gt) == (pytest.approx(diag), pytest.approx(diag))


def test_surface_distances_nested_squares_exact():
    gt = _square(30, 5, 25)       # 20×20
    pred = _square(30, 7, 23)     # 16×16, inset by 2 on every side
    assd, hd95 = surface_distances(pred, gt)
    # P→G: all 60 surface pixels at 2.  G→P: of 76 surface pixels, per corner one at √8 and two
    # at √5, the other 64 at 2.  Pooled (medpy): 124 distances of 2, 8 of √5, 4 of √8.
    pooled = np.array([2.0] * 124 + [np.sqrt(5)] * 8 + [np.sqrt(8)] * 4)
    assert assd == pytest.approx(pooled.mean(), rel=1e-9)
    assert hd95 == pytest.approx(np.percentile(pooled, 95), rel=1e-9) and np.percentile(pooled, 95) == np.sqrt(5)


def test_e_and_s_measure_extremes():
    gt = _square(16, 4, 12)
    perfect = gt.astype(float)
    # the reference formula divides by N − 1: a perfect map scores N / (N − 1)
    assert e_measure_max(perfect, gt) == pytest.approx(256 / 255, rel=1e-9)
    assert s_measure(perfect, gt) == pytest.approx(1.0, abs=1e-6)
    inverted = 1 - perfect
    assert e_measure_max(inverted, gt) < 0.3
    assert s_measure(inverted, gt) < 0.1
    empty = np.zeros_like(gt)
    assert s_measure(np.zeros((16, 16)), empty) == pytest.approx(1.0)
    assert s_measure(np.full((16, 16), 0.25), empty) == pytest.approx(0.75)
    assert e_measure_max(np.zeros((16, 16)), empty) == pytest.approx(256 / 255, rel=1e-6)
    # a blurred, partly right prediction lies in between
    partial = np.clip(perfect * 0.7 + 0.1, 0, 1)
    assert 0.5 < s_measure(partial, gt) < 1.0


def test_full_metrics_consistent_with_dice():
    gt = _square(16, 4, 12)
    prob = np.roll(gt, 2, axis=0).astype(float) * 0.9
    logits = np.where(prob > 0.5, 5.0, -5.0)[None, ..., None]
    m = full_metrics(logits[0, ..., 0] > 0, prob, gt)
    assert m["dice"] == pytest.approx(float(dice_per_channel(logits, gt[None, ..., None])[0, 0]), rel=1e-6)
    assert set(m) == {"dice", "iou", "assd", "hd95", "e_measure", "s_measure"}
    assert m["hd95"] == pytest.approx(2.0)


def test_e_measure_counting_form_equals_dense():
    from tta_jax.metrics import e_measure_max_dense
    rng = np.random.default_rng(0)
    for _ in range(5):
        gt = rng.random((24, 24)) > 0.7
        prob = np.clip(gt * 0.6 + rng.random((24, 24)) * 0.5, 0, 1)
        assert e_measure_max(prob, gt) == pytest.approx(e_measure_max_dense(prob, gt), rel=1e-12)
    for gt in (np.zeros((8, 8), bool), np.ones((8, 8), bool)):
        prob = rng.random((8, 8))
        assert e_measure_max(prob, gt) == pytest.approx(e_measure_max_dense(prob, gt), rel=1e-12)


def _reference_cases():
    rng = np.random.default_rng(0)
    gt = _square(64, 20, 40)
    small = np.zeros((64, 64), bool)
    small[30:40, 30:40] = True                                        # 2.4 % foreground
    return [("shifted", np.roll(gt, 3, axis=0) * 0.9, gt),
            ("random", rng.random((64, 64)), gt),
            ("smooth", np.clip(gt + rng.normal(0, 0.2, gt.shape), 0, 1), gt),
            ("small, wrong place", np.roll(small, 20, axis=1).astype(float), small),
            ("small, uniform noise", rng.random((64, 64)), small),
            ("small, exact", small.astype(float), small),
            ("empty prediction", np.zeros((64, 64)), small)]


@pytest.mark.parametrize("case", range(7))
def test_e_and_s_measure_equal_pysodmetrics(case):
    """The polyp papers' evaluation code (PySODMetrics): max E-measure over 256 thresholds, S-measure."""
    sod = pytest.importorskip("py_sod_metrics", reason="pip install -r requirements-dev.txt")
    _, prob, gt = _reference_cases()[case]
    prob = np.round(prob * 255) / 255.0          # the runner keeps 8-bit probabilities
    em, sm = sod.Emeasure(), sod.Smeasure()
    em.step(prob, gt.astype(bool), normalize=False)
    sm.step(prob, gt.astype(bool), normalize=False)
    assert e_measure_max(prob, gt) == pytest.approx(float(em.get_results()["em"]["curve"].max()), abs=1e-9)
    assert s_measure(prob, gt) == pytest.approx(float(sm.get_results()["sm"]), abs=1e-9)


def test_e_measure_of_a_small_object_is_dominated_by_the_background():
    """On a 2.4 %-foreground mask a prediction in the wrong place and uniform noise both score ~0.96
    (as in PySODMetrics): the README says what E-measure does and does not tell."""
    cases = {name: (prob, gt) for name, prob, gt in _reference_cases()}
    wrong = e_measure_max(*cases["small, wrong place"])
    noise = e_measure_max(*cases["small, uniform noise"])
    assert 0.95 < wrong < 0.97 and 0.95 < noise < 0.97
    assert full_metrics(cases["small, wrong place"][0] > 0.5, *cases["small, wrong place"])["dice"] < 1e-3


@pytest.mark.parametrize("shift", [(3, 0), (2, 5), (0, 0)])
def test_assd_and_hd95_equal_medpy(shift):
    """The official fundus evaluation (MedPy): ASSD and HD95 between binary masks, in pixels."""
    medpy = pytest.importorskip("medpy.metric.binary", reason="pip install -r requirements-dev.txt")
    gt = _square(48, 10, 30)
    gt[12:16, 28:34] = True                                           # not a plain square
    pred = np.roll(np.roll(gt, shift[0], axis=0), shift[1], axis=1)
    pred[40:43, 5:8] = True                                           # a small false positive far away
    assd, hd95 = surface_distances(pred, gt)
    assert assd == pytest.approx(medpy.assd(pred, gt), rel=1e-9)
    assert hd95 == pytest.approx(medpy.hd95(pred, gt), rel=1e-9)
    # native pixels of an image stored at 96×60 and resized to 48²: medpy's voxel spacing
    spacing = (2.0, 1.25)
    assd, hd95 = surface_distances(pred, gt, spacing)
    assert assd == pytest.approx(medpy.assd(pred, gt, voxelspacing=spacing), rel=1e-9)
    assert hd95 == pytest.approx(medpy.hd95(pred, gt, voxelspacing=spacing), rel=1e-9)
