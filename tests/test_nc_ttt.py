"""NC-TTT: the noise-contrastive head and objectives against NumPy, one adaptation step against finite
differences, and the source stage training the head (the compile-once and non-finite checks are in
tests/test_baselines.py)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tta_jax.auxiliary import (auxiliary_loss, auxiliary_objective, noise_contrastive_loss,
                               noise_contrastive_targets, noise_contrastive_test_loss)
from tta_jax.methods import make_method
from tta_jax.models.resunet import (NC_EMBED_RATIO, NC_NOISE_RNG, NC_SIGMA_IN, NC_SIGMA_OUT, NC_VIEWS,
                                    NoiseContrastiveHead, ResUNet)

BN_EPS = 1e-5


def _bn(x, scale, bias, axes):
    mean, var = x.mean(axes), x.var(axes)
    return (x - mean) / np.sqrt(var + BN_EPS) * scale + bias


def _np_head(p, features, noise):
    """The head in NumPy (float64): projection, noisy views, 1×1 → BN over all views → LeakyReLU → 1×1."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    z = features @ p["projector"]["kernel"] + p["projector"]["bias"]
    h = (z[None] + noise) @ p["discriminator_hidden"]["kernel"] + p["discriminator_hidden"]["bias"]
    h = _bn(h, p["discriminator_bn"]["scale"], p["discriminator_bn"]["bias"], tuple(range(h.ndim - 1)))
    h = np.where(h > 0, h, 0.2 * h)
    return (h @ p["discriminator_out"]["kernel"] + p["discriminator_out"]["bias"])[..., 0]


def _np_bce(logits, targets):
    prob = 1 / (1 + np.exp(-logits))
    return np.mean(-targets * np.log(prob) - (1 - targets) * np.log(1 - prob))


def _np_posterior_out(noise, sigma_in, sigma_out):
    """P(out | n) from the two Gaussian log-densities summed over the channels, equal priors."""
    log_density = lambda s: np.sum(-0.5 * (noise / s) ** 2 - np.log(s * np.sqrt(2 * np.pi)), axis=-1)
    l_in, l_out = log_density(sigma_in), log_density(sigma_out)
    top = np.maximum(l_in, l_out)
    return np.exp(l_out - top) / (np.exp(l_in - top) + np.exp(l_out - top))


def _perturbed_bn(params, rng, path):
    """Non-trivial BN scale/bias at ``path`` (inits are 1 and 0)."""
    flat = traverse_util.flatten_dict(params)
    for leaf in ("scale", "bias"):
        shape = flat[path + (leaf,)].shape
        value = rng.uniform(0.5, 1.5, shape) if leaf == "scale" else rng.normal(size=shape)
        flat[path + (leaf,)] = value.astype(np.float32)
    return traverse_util.unflatten_dict(flat)


def test_head_views_and_source_loss_equal_numpy():
    rng = np.random.default_rng(0)
    head = NoiseContrastiveHead()
    features = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    variables = jax.device_get(head.init(jax.random.PRNGKey(0), features, train=False))
    params = _perturbed_bn(variables["params"], rng, ("discriminator_bn",))
    out, _ = head.apply({"params": params, "batch_stats": variables["batch_stats"]}, features, train=True,
                        rngs={NC_NOISE_RNG: jax.random.PRNGKey(1)}, mutable=["batch_stats"])
    noise = np.asarray(out["noise"], np.float64)
    dims = NC_EMBED_RATIO * 3
    assert noise.shape == (2 * NC_VIEWS, 2, 4, 4, dims) and out["logits"].shape == (2 * NC_VIEWS, 2, 4, 4)
    # NC_VIEWS in-distribution views, then NC_VIEWS out-of-distribution ones
    np.testing.assert_allclose(noise[:NC_VIEWS].std(), NC_SIGMA_IN, rtol=0.1)
    np.testing.assert_allclose(noise[NC_VIEWS:].std(), NC_SIGMA_OUT, rtol=0.1)
    assert not np.allclose(noise[0, 0], noise[0, 1])           # a draw per image

    logits = _np_head(params, features.astype(np.float64), noise)
    np.testing.assert_allclose(np.asarray(out["logits"]), logits, rtol=1e-4, atol=1e-4)
    targets = _np_posterior_out(noise, NC_SIGMA_IN, NC_SIGMA_OUT)
    targets[targets < 1e-6] = 0.0
    # at E = 18 the two levels are told apart almost surely: the in-views' posteriors are under the floor
    assert (targets[:NC_VIEWS] == 0).all() and (targets[NC_VIEWS:] > 0.99).all()
    expected = _np_bce(logits, targets)
    assert float(noise_contrastive_loss(out["logits"], out["noise"])) == pytest.approx(expected, rel=1e-4)
    assert float(auxiliary_loss("noise_contrastive", out, None)) == pytest.approx(expected, rel=1e-4)

    # without the RNG stream: one clean view (test time) and the in-distribution cross-entropy
    clean, _ = head.apply({"params": params, "batch_stats": variables["batch_stats"]}, features, train=True,
                          mutable=["batch_stats"])
    assert clean["logits"].shape == (1, 2, 4, 4) and not np.asarray(clean["noise"]).any()
    clean_logits = _np_head(params, features.astype(np.float64), np.zeros((1, 2, 4, 4, dims)))
    np.testing.assert_allclose(np.asarray(clean["logits"]), clean_logits, rtol=1e-4, atol=1e-4)
    assert float(noise_contrastive_test_loss(clean["logits"])) == pytest.approx(
        _np_bce(clean_logits, np.zeros_like(clean_logits)), rel=1e-5)


def test_soft_targets_are_the_gaussian_posterior():
    """Close noise levels give soft targets: the closed form equals the ratio of the two densities."""
    rng = np.random.default_rng(1)
    noise = rng.normal(scale=0.6, size=(2, 1, 3, 3, 5))
    logits = rng.normal(size=(2, 1, 3, 3))
    targets = _np_posterior_out(noise, 0.5, 0.7)
    assert 0.05 < targets.mean() < 0.95 and targets.min() > 1e-6
    got = noise_contrastive_targets(jnp.asarray(noise, jnp.float32), 0.5, 0.7)
    np.testing.assert_allclose(np.asarray(got), targets, rtol=1e-4, atol=1e-6)
    loss = noise_contrastive_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(noise, jnp.float32), 0.5, 0.7)
    assert float(loss) == pytest.approx(_np_bce(logits, targets), rel=1e-4)


class _ToyBlock(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x, train):
        y = nn.Dense(self.width, use_bias=False, name="conv1")(x)
        return nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=BN_EPS, name="bn1")(y))


class ToyNC(nn.Module):
    """A per-pixel segmentor with the ResUNet's names: stem (conv1, bn1), layer1_0, the NC head on layer1."""

    aux_heads: tuple = ("noise_contrastive",)
    sr_factor: int = 4
    width: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False, return_aux: bool = False):
        h = nn.Dense(self.width, use_bias=False, name="conv1")(x)
        h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=BN_EPS, name="bn1")(h))
        h = _ToyBlock(self.width, name="layer1_0")(h, train)
        logits = nn.Dense(2, name="seg_head")(h)
        if return_aux:
            return logits, {"noise_contrastive": NoiseContrastiveHead(name="nc_head")(h, train)}
        return logits


ADAPTED = [("conv1", "kernel"), ("bn1", "scale"), ("bn1", "bias"), ("layer1_0", "conv1", "kernel"),
           ("layer1_0", "bn1", "scale"), ("layer1_0", "bn1", "bias")]


def _np_toy(flat, image):
    """(NC test loss, segmentation logits) of ToyNC in NumPy, train-mode BN (the image's statistics)."""
    p = {k: np.asarray(v, np.float64) for k, v in flat.items()}
    x = image.reshape(-1, 3).astype(np.float64)
    h = np.maximum(_bn(x @ p[("conv1", "kernel")], p[("bn1", "scale")], p[("bn1", "bias")], 0), 0)
    h = np.maximum(_bn(h @ p[("layer1_0", "conv1", "kernel")], p[("layer1_0", "bn1", "scale")],
                       p[("layer1_0", "bn1", "bias")], 0), 0)
    head = traverse_util.unflatten_dict({k[1:]: v for k, v in p.items() if k[0] == "nc_head"})
    nc_logits = _np_head(head, h, np.zeros((1,) + h.shape[:-1] + (NC_EMBED_RATIO * 4,)))
    return np.mean(np.log1p(np.exp(nc_logits))), h @ p[("seg_head", "kernel")] + p[("seg_head", "bias")]


@pytest.fixture(scope="module")
def toy():
    model = ToyNC()
    rng = np.random.default_rng(2)
    variables = jax.device_get(model.init(jax.random.PRNGKey(3), jnp.zeros((1, 4, 4, 3)), return_aux=True))
    params = variables["params"]
    for path in (("bn1",), ("layer1_0", "bn1"), ("nc_head", "discriminator_bn")):
        params = _perturbed_bn(params, rng, path)
    image = rng.uniform(0, 1, (1, 4, 4, 3)).astype(np.float32)
    return model, {"params": params, "batch_stats": variables["batch_stats"]}, image


def _finite_difference_gradient(flat, image, eps=1e-5):
    grads = {}
    for key in ADAPTED:
        g = np.zeros(flat[key].shape)
        for idx in np.ndindex(flat[key].shape):
            values = []
            for sign in (1, -1):
                moved = dict(flat)
                moved[key] = np.array(flat[key], np.float64)
                moved[key][idx] += sign * eps
                values.append(_np_toy(moved, image)[0])
            g[idx] = (values[0] - values[1]) / (2 * eps)
        grads[key] = g
    return grads


def test_one_step_equals_finite_differences(toy):
    """SGD: θ' = θ − lr·∇L_test (NumPy finite differences) on the stem and layer1 only; the prediction is
    the segmentation at θ' with the image's statistics. Adam's first step: −lr·sign(∇L_test)."""
    model, variables, image = toy
    flat = traverse_util.flatten_dict(variables["params"])
    loss, _ = _np_toy(flat, image)
    grads = _finite_difference_gradient(flat, image)
    assert max(np.abs(g).max() for g in grads.values()) > 1e-3

    lr = 0.05
    method = make_method("nc_ttt", model, {"lr": lr, "optimizer": "sgd"})
    state = method.init(variables, None)
    assert set(traverse_util.flatten_dict(state.adapted)) == set(ADAPTED)
    new, logits, info = jax.jit(method.step)(state, jnp.asarray(image), jax.random.PRNGKey(0))
    assert float(info["loss"]) == pytest.approx(loss, rel=1e-4) and float(info["skipped"]) == 0.0
    after = traverse_util.flatten_dict(new.adapted)
    for key in ADAPTED:
        np.testing.assert_allclose(np.asarray(after[key]) - flat[key], -lr * grads[key], rtol=2e-2, atol=2e-6,
                                   err_msg="/".join(key))
    jax.tree.map(np.testing.assert_array_equal, new.frozen, state.frozen)          # head, projector, D
    jax.tree.map(np.testing.assert_array_equal, new.batch_stats, state.batch_stats)
    _, expected = _np_toy({**flat, **after}, image)
    np.testing.assert_allclose(np.asarray(logits).reshape(-1, 2), expected, rtol=1e-4, atol=1e-4)

    lr = 1e-3
    adam = make_method("nc_ttt", model, {"lr": lr})
    new, _, _ = jax.jit(adam.step)(adam.init(variables, None), jnp.asarray(image), jax.random.PRNGKey(0))
    after = traverse_util.flatten_dict(new.adapted)
    for key in ADAPTED:
        clear = np.abs(grads[key]) > 1e-5
        np.testing.assert_allclose((np.asarray(after[key]) - flat[key])[clear], -lr * np.sign(grads[key][clear]),
                                   rtol=1e-3, err_msg="/".join(key))


def test_bn_only_and_episodic_options(toy):
    model, variables, image = toy
    bn_only = make_method("nc_ttt", model, {"adapt": "encoder_bn"}).init(variables, None)
    assert set(traverse_util.flatten_dict(bn_only.adapted)) == {k for k in ADAPTED if k[-1] != "kernel"}

    images = jnp.asarray(np.stack([image, image[:, ::-1]]))
    outputs = {}
    for episodic in (False, True):
        method = make_method("nc_ttt", model, {"lr": 1e-2, "episodic": episodic})
        state, step = method.init(variables, None), jax.jit(method.step)
        first, _, _ = step(state, images[0], jax.random.PRNGKey(0))
        _, logits, _ = step(first, images[1], jax.random.PRNGKey(1))
        _, alone, _ = step(state, images[1], jax.random.PRNGKey(1))
        outputs[episodic] = (np.asarray(logits), np.asarray(alone))
    np.testing.assert_array_equal(*outputs[True])            # each image starts from the source weights
    assert not np.allclose(*outputs[False])                  # the first image's update carries over


def test_method_refuses_a_model_without_the_head(tiny_model):
    with pytest.raises(ValueError, match="noise_contrastive"):
        make_method("nc_ttt", tiny_model)


def test_resunet_head_reads_layer1():
    """Shapes only (no compilation): the projection of layer1's c(64) channels, views at 1/4 resolution."""
    model = ResUNet(backbone="resnet18", num_classes=2, width=0.25, aux_heads=("noise_contrastive",))
    x = jnp.zeros((2, 64, 64, 3))
    variables = jax.eval_shape(lambda k: model.init(k, x, return_aux=True), jax.random.PRNGKey(0))
    assert variables["params"]["nc_head"]["projector"]["kernel"].shape == (16, NC_EMBED_RATIO * 16)
    (_, aux), _ = jax.eval_shape(lambda v, k: model.apply(v, x, train=True, return_aux=True, mutable=["batch_stats"],
                                                          rngs={NC_NOISE_RNG: k}), variables, jax.random.PRNGKey(1))
    assert aux["noise_contrastive"]["logits"].shape == (2 * NC_VIEWS, 2, 16, 16)


def test_source_training_trains_the_head():
    """train_source adds the head's objective: the projector and discriminator move, and the
    objective falls from its initial value to well under chance (log 2: no discrimination)."""
    from tta_jax.source.training import train_source
    model = ToyNC()
    variables = jax.device_get(jax.jit(lambda k: model.init(k, jnp.zeros((1, 8, 8, 3)), return_aux=True))(
        jax.random.PRNGKey(0)))
    rng = np.random.default_rng(4)
    images = rng.uniform(0, 1, (4, 8, 8, 3)).astype(np.float32)
    masks = (images[..., :2] > 0.5).astype(np.uint8)

    @jax.jit
    def nc_objective(variables):
        forward = lambda inp, **options: model.apply(variables, inp, train=True, return_aux=True,
                                                     mutable=["batch_stats"], **options)[0]
        return auxiliary_objective("noise_contrastive", forward, jax.random.PRNGKey(9), images)

    trained, _ = train_source(model, variables, images, masks, jax.random.PRNGKey(5), steps=400, batch_size=2,
                              lr=1e-2, log_every=400)
    before, after = (traverse_util.flatten_dict(v["params"]["nc_head"], sep="/") for v in (variables, trained))
    assert all(not np.allclose(before[k], after[k]) for k in before)
    start, end = float(nc_objective(variables)), float(nc_objective(trained))
    assert start > np.log(2) and end < 0.6
