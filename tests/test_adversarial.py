"""Adversarial test-time training: discriminator, fake anchors, source stage, input adaptor (Valvano et al.)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tta_jax.losses import lsgan_discriminator_loss
from tta_jax.source.adversarial import (AdversarialHParams, discriminator_augment, fake_anchors,
                                        train_adversarial_source, weighted_cross_entropy)
from tta_jax.data import SyntheticFundus
from tta_jax.methods import make_method, method_hparams
from tta_jax.methods.adaptor_tuning import make_adaptor_tuner
from tta_jax.methods.adv_ttt import adversarial_prior
from tta_jax.models import InputAdaptor, MaskDiscriminator
from tta_jax.models.discriminator import normalised_kernels
from tta_jax.runner import StreamRunner

SIZE = 16


def test_spectral_norm_bounds_largest_singular_value():
    disc = MaskDiscriminator(width=0.125)
    masks = jax.random.uniform(jax.random.PRNGKey(0), (2, SIZE, SIZE, 2))
    variables = jax.jit(disc.init)(jax.random.PRNGKey(1), masks)
    @jax.jit
    def power_iterations(v):                                 # one per training call, 60 calls
        def one(_, stats):
            return disc.apply({"params": v["params"], "batch_stats": stats}, masks, update_stats=True,
                              mutable=["batch_stats"])[1]["batch_stats"]
        return {"params": v["params"], "batch_stats": jax.lax.fori_loop(0, 60, one, v["batch_stats"])}

    variables = power_iterations(variables)
    for name, w in normalised_kernels(variables).items():
        top = np.linalg.svd(w, compute_uv=False)[0]
        assert top == pytest.approx(1.0, abs=0.03), name
    raw = np.asarray(variables["params"]["conv2"]["kernel"])
    assert np.linalg.svd(raw.reshape(-1, raw.shape[-1]), compute_uv=False)[0] > 1.1   # the raw kernel is not


def test_fake_anchors_change_the_intended_amounts():
    mask = (jax.random.uniform(jax.random.PRNGKey(0), (50, 50, 2)) > 0.5).astype(jnp.float32)
    side = 5                                                 # 10 % of 50
    for seed in range(5):
        swapped = fake_anchors(jax.random.PRNGKey(seed), mask, 0.1, swaps=1, noise=0.0)
        changed = np.asarray(swapped != mask).sum(axis=(0, 1))
        assert np.all(changed <= 2 * side * side) and changed.sum() > 0
        assert set(np.unique(np.asarray(swapped))) <= {0.0, 1.0}
    noisy = fake_anchors(jax.random.PRNGKey(9), mask, 0.1, swaps=0, noise=0.1)
    assert np.asarray(noisy != mask).mean() == pytest.approx(0.1, abs=0.02)


def test_discriminator_augment_identity_and_rotation():
    mask = jax.random.uniform(jax.random.PRNGKey(0), (16, 16, 2))
    same = discriminator_augment(jax.random.PRNGKey(1), mask, translate=0.0, max_angle=0.0, noise_std=0.0)
    np.testing.assert_allclose(np.asarray(same), np.asarray(mask), atol=1e-5)
    noisy = discriminator_augment(jax.random.PRNGKey(1), mask, translate=0.0, max_angle=0.0, noise_std=0.1)
    assert float(jnp.std(noisy - mask)) == pytest.approx(0.1, rel=0.2)


def test_weighted_cross_entropy_by_hand():
    logits = jnp.array([[[[2.0], [-1.0], [0.5], [0.0]]]])          # [1, 1, 4, 1]
    masks = jnp.array([[[[1.0], [0.0], [0.0], [0.0]]]])
    p = 1 / (1 + np.exp(-np.array([2.0, -1.0, 0.5, 0.0])))
    w_fg, w_bg = 1 - 0.25, 0.25                                   # 1 − n_i/n_tot
    expected = -(w_fg * np.log(p[0]) + w_bg * np.log(1 - p[1:]).sum()) / 4
    np.testing.assert_allclose(float(weighted_cross_entropy(logits, masks)), expected, rtol=1e-5)
    assert float(lsgan_discriminator_loss(jnp.ones(3), -jnp.ones(3), -jnp.ones(3))) == 0.0


@pytest.fixture(scope="module")
def adversarial_model(micro_model, micro_variables):
    ds = SyntheticFundus(num_train=48, num_test=4)
    train = ds.load("A", "train", SIZE)
    disc = MaskDiscriminator(width=0.125)
    disc_vars = jax.jit(disc.init)(jax.random.PRNGKey(1), jnp.zeros((1, SIZE, SIZE, 2)))
    variables, epochs = train_adversarial_source(
        micro_model, disc, micro_variables, disc_vars, train.images, train.masks, jax.random.PRNGKey(2),
        steps=60, batch_size=8, lr=3e-3, steps_per_epoch=20,
        hp=AdversarialHParams(disc_lr=1e-3))
    return variables, epochs, ds, disc


def test_discriminator_scores_real_masks_above_fake_anchors(adversarial_model):
    variables, epochs, ds, disc = adversarial_model
    assert len(epochs) == 3 and {"seg_wce", "seg_adv", "disc_loss", "score_real", "score_anchor"} <= set(epochs[0])
    held_out = jnp.asarray(ds.load("A", "test", SIZE).masks, jnp.float32)
    anchors = jax.jit(jax.vmap(fake_anchors))(jax.random.split(jax.random.PRNGKey(3), held_out.shape[0]), held_out)
    apply = jax.jit(lambda m: disc.apply(variables["discriminator"], m, update_stats=False))
    score = lambda m: float(jnp.mean(apply(m)))
    assert score(held_out) > score(anchors) + 0.1
    assert epochs[-1]["seg_wce"] < epochs[0]["seg_wce"]


def test_tuning_the_adaptor_lowers_the_loss_and_starts_from_the_identity(micro_model, adversarial_model):
    variables, _, ds, disc = adversarial_model
    method = make_method("adv_ttt", micro_model, {"n_iter": 15, "lr": 1e-2}, discriminator=disc)
    hp = method_hparams("adv_ttt", {"n_iter": 15, "lr": 1e-2})
    tune = make_adaptor_tuner(micro_model, adversarial_prior(disc, hp.target), hp)
    state = method.init(variables, jax.random.PRNGKey(0))
    image = jnp.asarray(ds.load("C", "test", SIZE).images[:1])
    omega, logits, info = jax.jit(tune)(state, image)
    assert float(info["loss_after"]) < float(info["loss_before"])
    assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(omega), jax.tree.leaves(state.adaptor)))
    # Ω starts as the identity: zero iterations' worth of tuning = the frozen prediction.
    omega0_out = jax.jit(InputAdaptor().apply)({"params": state.adaptor}, image)
    np.testing.assert_allclose(np.asarray(omega0_out), np.asarray(image), atol=1e-6)


def test_adaptor_is_reset_between_images_and_compiles_once(micro_model, adversarial_model):
    variables, _, ds, disc = adversarial_model
    method = make_method("adv_ttt", micro_model, {"n_iter": 5, "lr": 1e-2, "patience": 2, "keep_best": True},
                         discriminator=disc)
    data = ds.load("D", "test", SIZE)
    runner = StreamRunner(method)
    state = method.init(variables, jax.random.PRNGKey(0))
    final, scores = runner.run_stream(state, data.images[:3], data.masks[:3], jax.random.PRNGKey(1))
    assert runner.trace_count == 1
    same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), final, state)
    assert all(jax.tree.leaves(same))                            # Σ, Δ and Ω₀ untouched: Ω is reset
    _, alone = runner.run_stream(state, data.images[2:3], data.masks[2:3], jax.random.PRNGKey(1))
    np.testing.assert_allclose(scores["dice"][2], alone["dice"][0], atol=1e-4)   # image 3 unaffected by 1–2
    assert np.all(scores["info"]["iterations"] <= 5)


def test_keep_best_reports_the_prediction_with_the_lowest_loss(micro_model, adversarial_model):
    """With keep_best, the returned logits score ½(Δ(σ(logits)) − 1)² = loss_best, recomputed here."""
    variables, _, ds, disc = adversarial_model
    method = make_method("adv_ttt", micro_model, {"n_iter": 6, "lr": 5e-2, "keep_best": True}, discriminator=disc)
    state = method.init(variables, jax.random.PRNGKey(0))
    image = jnp.asarray(ds.load("B", "test", SIZE).images[:1])
    _, logits, info = jax.jit(method.step)(state, image, jax.random.PRNGKey(1))
    score = disc.apply(variables["discriminator"], jax.nn.sigmoid(logits), update_stats=False)
    np.testing.assert_allclose(float(0.5 * jnp.mean((score - 1.0) ** 2)), float(info["loss_best"]), rtol=1e-5)


def test_adv_ttt_needs_a_discriminator(micro_model, micro_variables):
    with pytest.raises(ValueError, match="needs discriminator from the source stage"):
        make_method("adv_ttt", micro_model)
    method = make_method("adv_ttt", micro_model, discriminator=MaskDiscriminator(width=0.125))
    with pytest.raises(ValueError, match="needs the mask discriminator"):
        method.init(micro_variables, jax.random.PRNGKey(0))


def test_ablation_discriminator_and_loss_without_anchors():
    """Table 1's 'GAN' row: a plain discriminator (no spectral norm, LeakyReLU) and no anchor term."""
    plain = MaskDiscriminator(width=0.125, smooth=False)
    masks = jax.random.uniform(jax.random.PRNGKey(0), (2, SIZE, SIZE, 2))
    variables = jax.jit(plain.init)(jax.random.PRNGKey(1), masks)
    assert not any("sn" in k for k in variables["params"]) and set(variables["batch_stats"]) == {"placeholder"}
    scores, updates = plain.apply(variables, masks, update_stats=True, mutable=["batch_stats"])
    assert scores.shape == (2,) and set(updates["batch_stats"]) == {"placeholder"}
    real, fake = jnp.array([0.5, 1.5]), jnp.array([-0.5, 0.0])
    expected = 0.5 * (np.mean((np.array([0.5, 1.5]) - 1) ** 2) + np.mean((np.array([-0.5, 0.0]) + 1) ** 2))
    assert float(lsgan_discriminator_loss(real, fake)) == pytest.approx(expected)
    assert float(lsgan_discriminator_loss(real, fake, jnp.array([1.0]))) == pytest.approx(expected + 2.0)
    assert AdversarialHParams(smoothness=False).discriminator().smooth is False
