import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tta_jax.bn import forward_test_stats, merge_params, split_bn_params
from tta_jax.losses import binary_entropy
from tta_jax.methods import available_methods, make_method


@pytest.fixture(scope="module")
def image():
    return jax.random.uniform(jax.random.PRNGKey(1), (1, 32, 32, 3))


def _perturbed_running_stats(batch_stats, key):
    leaves, tree = jax.tree.flatten(batch_stats)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [l + jax.random.uniform(k, l.shape) for k, l in zip(keys, leaves)])


def test_registry():
    assert {"no_adapt", "bn", "tent"} <= set(available_methods())
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        make_method("nope", None)


def test_split_bn_params(micro_variables):
    bn, rest = split_bn_params(micro_variables["params"], micro_variables["batch_stats"])
    flat_bn = traverse_util.flatten_dict(bn, sep="/")
    assert flat_bn and all(k.rsplit("/", 1)[-1] in ("scale", "bias") for k in flat_bn)
    assert "up1/bn/scale" in flat_bn and "bnout/bias" in flat_bn
    assert not any("conv" in k.rsplit("/", 2)[-2] and "bn" not in k for k in flat_bn)
    merged = merge_params(bn, rest)
    jax.tree.map(np.testing.assert_array_equal, merged, micro_variables["params"])


def test_no_adapt_uses_source_statistics(micro_model, micro_variables, image):
    m = make_method("no_adapt", micro_model)
    state = m.init(micro_variables, jax.random.PRNGKey(0))
    new, logits, _ = m.step(state, image, jax.random.PRNGKey(0))
    # the jitted step and the eager apply round the same float32 forward differently; logits near 0
    # need an absolute bound as well as a relative one
    np.testing.assert_allclose(logits, micro_model.apply(micro_variables, image, train=False), rtol=1e-6, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, new, state)
    # changing the running statistics changes the prediction
    other = dict(micro_variables, batch_stats=_perturbed_running_stats(micro_variables["batch_stats"],
                                                                     jax.random.PRNGKey(2)))
    _, logits2, _ = m.step(m.init(other, None), image, None)
    assert np.abs(np.asarray(logits2 - logits)).max() > 1e-3


def test_bn_ignores_source_statistics(micro_model, micro_variables, image):
    m = make_method("bn", micro_model)
    _, logits, _ = m.step(m.init(micro_variables, None), image, None)
    other = dict(micro_variables, batch_stats=_perturbed_running_stats(micro_variables["batch_stats"],
                                                                     jax.random.PRNGKey(2)))
    _, logits2, _ = m.step(m.init(other, None), image, None)
    np.testing.assert_allclose(logits, logits2, rtol=1e-5, atol=1e-5)
    # ...and normalises with the image's own statistics: the first BN output has zero mean per channel
    x = micro_model.apply(micro_variables, image, train=True, mutable=["batch_stats"],
                         capture_intermediates=lambda mdl, _: mdl.name == "bn1" and mdl.scope.path == ("bn1",))
    bn1 = x[1]["intermediates"]["bn1"]["__call__"][0]
    bias = micro_variables["params"]["bn1"]["bias"]
    np.testing.assert_allclose(np.asarray(bn1.mean((0, 1, 2))), np.asarray(bias), atol=1e-4)


def test_tent_updates_only_bn_affine_with_adam(micro_model, micro_variables, image):
    lr = 1e-3
    m = make_method("tent", micro_model, {"lr": lr})
    state = m.init(micro_variables, None)
    new, logits, info = jax.jit(m.step)(state, image, None)
    # reference: the first Adam step moves every parameter by -lr * g / (|g| + eps) ≈ -lr * sign(g)
    grads = jax.jit(jax.grad(lambda p: binary_entropy(forward_test_stats(
        micro_model, merge_params(p, state.frozen_params), micro_variables["batch_stats"], image))))(state.bn_params)
    for old, upd, g in zip(jax.tree.leaves(state.bn_params), jax.tree.leaves(new.bn_params), jax.tree.leaves(grads)):
        big = np.abs(np.asarray(g)) > 1e-5
        np.testing.assert_allclose(np.asarray(upd - old)[big], -lr * np.sign(np.asarray(g))[big], rtol=2e-2)
    jax.tree.map(np.testing.assert_array_equal, new.frozen_params, state.frozen_params)
    jax.tree.map(np.testing.assert_array_equal, new.batch_stats, micro_variables["batch_stats"])
    # adapt-then-predict: the returned logits come from the updated parameters
    expected = jax.jit(forward_test_stats, static_argnums=0)(micro_model, merge_params(new.bn_params, new.frozen_params),
                                  new.batch_stats, image)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert float(info["skipped"]) == 0.0


def test_tent_lowers_entropy(micro_model, micro_variables, image):
    m = make_method("tent", micro_model, {"lr": 1e-2, "steps": 5})
    state = m.init(micro_variables, None)
    before = binary_entropy(forward_test_stats(micro_model, micro_variables["params"],
                                               micro_variables["batch_stats"], image))
    new, logits, _ = jax.jit(m.step)(state, image, None)
    assert float(binary_entropy(logits)) < float(before) - 1e-3


def test_nonfinite_step_does_not_poison_state(micro_model, micro_variables, image):
    m = make_method("tent", micro_model)
    state = m.init(micro_variables, None)
    new, _, info = jax.jit(m.step)(state, image.at[0, 0, 0, 0].set(jnp.nan), None)
    assert float(info["skipped"]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, new, state)


@pytest.mark.parametrize("name", ["no_adapt", "bn", "tent"])
def test_step_rejects_bad_rank(micro_model, micro_variables, name):
    m = make_method(name, micro_model)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        m.step(m.init(micro_variables, None), jnp.ones((32, 32, 3)), None)


def test_keep_if_finite_checks_every_changed_leaf():
    """Small and large leaves are checked; only leaves passed through unchanged are skipped."""
    from tta_jax.methods.base import keep_if_finite

    def guarded(new_small, new_large):
        old = {"small": jnp.zeros(3), "large": jnp.zeros(70_000), "frozen": jnp.ones(5)}
        new = {"small": new_small, "large": new_large, "frozen": old["frozen"]}
        return jax.jit(lambda: keep_if_finite(new, old))()

    ok_state, ok = guarded(jnp.ones(3), jnp.ones(70_000))
    assert bool(ok) and float(ok_state["small"][0]) == 1.0
    for small, large in [(jnp.array([1.0, jnp.nan, 1.0]), jnp.ones(70_000)),
                         (jnp.ones(3), jnp.ones(70_000).at[-1].set(jnp.inf))]:
        state, ok = guarded(small, large)
        assert not bool(ok)
        assert float(state["small"][1]) == 0.0 and float(state["large"][-1]) == 0.0
