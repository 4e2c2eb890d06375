"""The DAE shape prior (Karani et al.) and dae_ttt: jigsaw noise, Dice loss, training, per-image tuning."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tta_jax.data import SyntheticFundus
from tta_jax.losses import label_dice_loss
from tta_jax.methods import make_method
from tta_jax.methods.dae_ttt import denoised_prior
from tta_jax.runner import StreamRunner
from tta_jax.source.dae import DAEHParams, jigsaw_corrupt, train_dae

SIZE = 16


def test_jigsaw_moves_one_square_of_labels_by_one_offset():
    """With one box, the changed pixels lie in a square of side ≤ 2R and all copy the clean mask
    from one common offset (pixel ids make each label value unique)."""
    h = w = 40
    ids = jnp.arange(h * w, dtype=jnp.float32).reshape(h, w, 1)
    radius = 5
    for seed in range(8):
        out = np.asarray(jigsaw_corrupt(jax.random.PRNGKey(seed), ids, radius / h, max_boxes=1))[..., 0]
        ys, xs = np.nonzero(out != np.asarray(ids)[..., 0])
        if ys.size == 0:                                     # source box = destination box
            continue
        src = out[ys, xs].astype(int)
        offsets = set(zip(src // w - ys, src % w - xs))
        assert len(offsets) == 1
        # the box [c − r, c + r)² (changed pixels fill it unless parts copied onto equal values: ids are unique)
        side_y, side_x = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert side_y == side_x and side_y % 2 == 0 and side_y <= 2 * radius and ys.size == side_y * side_x
        assert ys.min() >= 1 and ys.max() <= h - 2                  # centres in [r + 1, H − r − 2]


def test_jigsaw_box_count_is_uniform_up_to_max_boxes():
    mask = jnp.zeros((64, 64, 1)).at[16:48, 16:48].set(1.0)
    corrupt = jax.jit(jax.vmap(lambda k: jigsaw_corrupt(k, mask, 6 / 64, max_boxes=24)))
    changed = np.asarray(jnp.mean(corrupt(jax.random.split(jax.random.PRNGKey(0), 30)) != mask, axis=(1, 2, 3)))
    assert 0 < np.mean(changed) < 0.3 and np.std(changed) > 0       # a varying amount of noise


def test_label_dice_loss_equals_numpy():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(2, 5, 6, 2)).astype(np.float32)
    y = (rng.uniform(size=(2, 5, 6, 2)) > 0.6).astype(np.float32)
    dices = []
    for b in range(2):
        for c in range(2):
            for pp, yy in ((p[b, ..., c], y[b, ..., c]), (1 - p[b, ..., c], 1 - y[b, ..., c])):
                dices.append(2 * (pp * yy).sum() / (pp.sum() + yy.sum() + 1e-10))
    np.testing.assert_allclose(float(label_dice_loss(jnp.asarray(p), jnp.asarray(y))), 1 - np.mean(dices), rtol=1e-5)
    assert float(label_dice_loss(jnp.asarray(y), jnp.asarray(y))) == pytest.approx(0.0, abs=1e-6)


def _train(steps: int, log_every: int):
    ds = SyntheticFundus(num_train=32, num_test=4)
    masks = ds.load("A", "train", SIZE).masks
    hp = DAEHParams(width=0.5, steps=steps, batch_size=8, lr=3e-3, box_radius=3 / SIZE, max_boxes=6)
    variables, history = train_dae(masks, hp, log_every=log_every)
    return hp, variables, history, ds


@pytest.fixture(scope="module")
def trained_dae():
    """A briefly trained DAE: enough for the prior's and the method's mechanics."""
    return _train(steps=20, log_every=10)


def test_dae_training_lowers_its_loss(trained_dae):
    _, _, history, _ = trained_dae
    assert [h["step"] for h in history] == [10, 20] and history[1]["dice_loss"] < history[0]["dice_loss"]


@pytest.mark.slow
def test_the_dae_learns_to_restore_corrupted_masks():
    hp, variables, history, ds = _train(steps=300, log_every=100)
    assert history[-1]["dice_loss"] < history[0]["dice_loss"]
    clean = jnp.asarray(ds.load("A", "test", SIZE).masks, jnp.float32)
    noisy = jax.vmap(lambda k, m: jigsaw_corrupt(k, m, hp.box_radius, hp.max_boxes))(
        jax.random.split(jax.random.PRNGKey(5), clean.shape[0]), clean)
    restored = (jax.nn.sigmoid(hp.network().apply(variables, noisy, train=False)) > 0.5).astype(jnp.float32)
    assert float(label_dice_loss(restored, clean)) < float(label_dice_loss(noisy, clean))


def test_dae_prior_loss_is_dice_to_the_fixed_binarised_denoising(trained_dae):
    hp, variables, _, _ = trained_dae
    dae = hp.network()
    p = jax.random.uniform(jax.random.PRNGKey(0), (1, SIZE, SIZE, 2))
    target = (jax.nn.sigmoid(dae.apply(variables, p, train=False)) > 0.5).astype(jnp.float32)
    prior = denoised_prior(dae)
    assert float(prior(variables, p)) == pytest.approx(float(label_dice_loss(p, target)), rel=1e-6)
    # the denoised target is a constant: the gradient is the Dice loss's with that target
    np.testing.assert_allclose(np.asarray(jax.grad(lambda q: prior(variables, q))(p)),
                               np.asarray(jax.grad(lambda q: label_dice_loss(q, target))(p)), atol=1e-7)


def test_dae_ttt_lowers_the_prior_loss_resets_the_adaptor_and_compiles_once(micro_model, micro_variables,
                                                                            trained_dae):
    hp, dae_variables, _, ds = trained_dae
    method = make_method("dae_ttt", micro_model, {"n_iter": 4, "lr": 1e-2}, dae=hp.network())
    variables = {**micro_variables, "dae": dae_variables}
    state = method.init(variables, jax.random.PRNGKey(0))
    data = ds.load("C", "test", SIZE)
    runner = StreamRunner(method)
    final, scores = runner.run_stream(state, data.images[:3], data.masks[:3], jax.random.PRNGKey(1))
    assert runner.trace_count == 1
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), final, state)))
    assert np.all(scores["info"]["loss_after"] <= scores["info"]["loss_before"] + 1e-6)
    assert np.any(scores["info"]["loss_after"] < scores["info"]["loss_before"])


def test_dae_ttt_needs_the_dae(micro_model, micro_variables):
    with pytest.raises(ValueError, match="needs dae from the source stage"):
        make_method("dae_ttt", micro_model)
    method = make_method("dae_ttt", micro_model, dae=DAEHParams().network())
    with pytest.raises(ValueError, match="variables\\['dae'\\] is missing"):
        method.init(micro_variables, jax.random.PRNGKey(0))
