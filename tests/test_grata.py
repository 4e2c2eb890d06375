"""GraTa: the step against a hand-written reference, Eq. 5–6, variants, augmentations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tta_jax.augment import STRONG_OFF, invert_weak_views, strong_augment, weak_views
from tta_jax.bn import merge_params
from tta_jax.methods import make_method
from tta_jax.methods.grata import LR_MAPS, dynamic_learning_rate, gradient_cosine, lookahead_params
from tta_jax.runner import StreamRunner


@pytest.fixture(scope="module")
def image():
    return jax.random.uniform(jax.random.PRNGKey(7), (1, 32, 32, 3))


def _forward(model, variables, params, x):
    out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                         mutable=["batch_stats"])
    return out


def _reference_views(x):
    """The six views written independently with numpy on NHWC (H axis 1, W axis 2)."""
    x = np.asarray(x)
    fw = lambda a: a[:, :, ::-1]
    fh = lambda a: a[:, ::-1]
    tr = lambda a: a.transpose(0, 2, 1, 3)
    views = [x, fw(x), fh(x), tr(fw(x)), fh(fw(x)), fw(tr(x))]
    inverses = [lambda a: a, fw, fh, lambda a: fw(tr(a)), lambda a: fh(fw(a)), lambda a: tr(fw(a))]
    return views, inverses


def reference_grata_step(model, variables, x, beta=1e-4, eps=1e-8):
    """One GraTa step written out by hand (strong augmentation off, first Adam step)."""
    params = variables["params"]
    bn_names = {path[:-1] for path in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]
                for path in [tuple(k.key for k in path[0])]}
    flat = {tuple(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    bn_keys = sorted(k for k in flat if k[:-1] in bn_names)

    def with_bn(vec_tree):
        new = dict(flat)
        new.update(vec_tree)
        from flax import traverse_util
        return traverse_util.unflatten_dict(new)

    def ent(bn):
        p = jax.nn.sigmoid(_forward(model, variables, with_bn(bn), x))
        return jnp.mean(jnp.sum(-p * jnp.log(p + 1e-6), axis=-1))

    fwd = jax.jit(lambda bn, v: _forward(model, variables, with_bn(bn), v))

    def teacher_at(bn):
        views, inverses = _reference_views(x)
        preds = [inv(np.asarray(jax.nn.sigmoid(fwd(bn, jnp.asarray(v))))) for v, inv in zip(views, inverses)]
        return jnp.asarray(np.mean(preds, axis=0))      # numpy: a constant for the gradient

    def con(bn, teacher):
        xs = (x - x.min()) / (x.max() - x.min())
        z = _forward(model, variables, with_bn(bn), xs)
        return jnp.mean(jnp.maximum(z, 0) - z * teacher + jnp.log1p(jnp.exp(-jnp.abs(z))))

    theta = {k: flat[k] for k in bn_keys}
    g_aux = jax.jit(jax.grad(ent))(theta)
    theta_prime = {k: theta[k] - g_aux[k] for k in bn_keys}
    g_pse = jax.jit(jax.grad(con))(theta_prime, teacher_at(theta_prime))
    a = np.concatenate([np.ravel(g_pse[k]) for k in bn_keys])
    b = np.concatenate([np.ravel(g_aux[k]) for k in bn_keys])
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
    eta = beta * 0.25 * (cos + 1) ** 2
    # Adam, first step: m̂ = g, v̂ = g², update = −η g / (|g| + eps)
    new_theta = {k: np.asarray(theta[k]) - eta * np.asarray(g_pse[k]) / (np.abs(np.asarray(g_pse[k])) + eps)
                 for k in bn_keys}
    logits = fwd({k: jnp.asarray(v) for k, v in new_theta.items()}, x)
    return cos, eta, new_theta, np.asarray(logits)


def test_step_matches_hand_written_reference(micro_model, micro_variables, image):
    """In float64 the step and the reference agree to rounding (float32 noise at a random init is ~1e-5)."""
    with jax.enable_x64():
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), micro_variables)
        x = jnp.asarray(image, jnp.float64)
        m = make_method("grata", micro_model, {"strong": STRONG_OFF})
        state = m.init(variables, None)
        new, logits, info = jax.jit(m.step)(state, x, jax.random.PRNGKey(0))
        cos, eta, new_theta, ref_logits = reference_grata_step(micro_model, variables, x)
        assert float(info["cos"]) == pytest.approx(cos, abs=1e-9)
        assert float(info["eta"]) == pytest.approx(eta, rel=1e-8)
        flat_new = {tuple(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(new.bn_params)[0]}
        assert set(flat_new) == set(new_theta)
        for k, v in new_theta.items():
            np.testing.assert_allclose(flat_new[k], v, rtol=1e-7, atol=1e-12, err_msg=str(k))
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-7, atol=1e-9)
    # only BN affine parameters moved
    jax.tree.map(np.testing.assert_array_equal, new.frozen_params, state.frozen_params)
    jax.tree.map(np.testing.assert_array_equal, new.batch_stats, micro_variables["batch_stats"])


def test_lookahead_first_order_property(micro_model, micro_variables, image):
    """Eq. 5–6: L_con(θ − s∇L_ent) ≈ L_con(θ) − s⟨∇L_con, ∇L_ent⟩ for small s (teacher held constant).

    float64, so that the loss differences at small s are far above rounding; the
    remainder is O(s²), so the relative error must shrink with s.
    """
    from tta_jax.methods.grata import entropy_loss, teacher_prediction
    from tta_jax.bn import forward_test_stats, split_bn_params
    from tta_jax.losses import bce_with_logits
    with jax.enable_x64():
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), micro_variables)
        x = jnp.asarray(image, jnp.float64)
        bn, frozen = split_bn_params(variables["params"], variables["batch_stats"])
        stats = variables["batch_stats"]
        teacher = teacher_prediction(micro_model, variables["params"], stats, x)

        @jax.jit
        def con(p):
            return bce_with_logits(forward_test_stats(micro_model, merge_params(p, frozen), stats, x * 0.9), teacher)

        g_ent = jax.jit(jax.grad(lambda p: entropy_loss(micro_model, p, frozen, stats, x, None)))(bn)
        g_con = jax.jit(jax.grad(con))(bn)
        inner = float(sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g_con), jax.tree.leaves(g_ent))))
        base = float(con(bn))
        errors = []
        for s in (1e-3, 1e-4):
            shifted = float(con(lookahead_params(bn, jax.tree.map(lambda g: s * g, g_ent))))
            errors.append(abs((shifted - base) / (-s * inner) - 1))
    assert errors[0] < 0.05 and errors[1] < 0.01 and errors[1] < errors[0] / 5


def test_eta_in_range_and_compiles_once(micro_model, micro_variables):
    from tta_jax.data import SyntheticFundus
    m = make_method("grata", micro_model, {"lr": 1e-3})
    runner = StreamRunner(m)
    data = SyntheticFundus(num_train=0, num_test=4).load("C", "test", 32)
    _, scores = runner.run_stream(m.init(micro_variables, None), data.images, data.masks, jax.random.PRNGKey(0))
    info = scores["info"]
    assert runner.trace_count == 1
    assert np.all(info["eta"] >= 0) and np.all(info["eta"] <= 1e-3 + 1e-12)
    np.testing.assert_allclose(info["eta"], 1e-3 * 0.25 * (info["cos"] + 1) ** 2, rtol=1e-5)
    assert np.all(np.abs(info["cos"]) <= 1 + 1e-6) and np.all(info["skipped"] == 0)
    assert len(set(np.round(info["cos"], 6))) > 1


def test_variants(micro_model, micro_variables, image):
    key = jax.random.PRNGKey(0)
    base = {"strong": STRONG_OFF}
    run = lambda **h: jax.jit(make_method("grata", micro_model, {**base, **h}).step)(
        make_method("grata", micro_model, {**base, **h}).init(micro_variables, None), image, key)
    _, _, dyn = run()
    _, _, fixed = run(lr_schedule="fixed")
    assert float(fixed["eta"]) == pytest.approx(1e-4)
    assert float(fixed["cos"]) == pytest.approx(float(dyn["cos"]), abs=1e-6)
    _, _, plain = run(lookahead=False)
    assert float(plain["cos"]) != pytest.approx(float(dyn["cos"]), abs=1e-6)   # g_pse taken at θ, not θ'
    _, _, swapped = run(pseudo="entropy", auxiliary="consistency")
    assert float(swapped["aux_loss"]) == pytest.approx(float(plain["pse_loss"]), rel=1e-5)  # L_con(θ)
    with pytest.raises(ValueError, match="grata.lr_map=.tanh. is not one of"):
        make_method("grata", micro_model, {"lr_map": "tanh"})
    with pytest.raises(ValueError, match="grata.pseudo=.magic. is not one of"):
        make_method("grata", micro_model, {"pseudo": "magic"})
    with pytest.raises(ValueError, match="needs the model's 'rotation' branch"):
        make_method("grata", micro_model, {"pseudo": "rotation"})
    with pytest.raises(ValueError, match="grata.strong: unknown hyperparameter p_solarize; valid keys: p_brightness"):
        make_method("grata", micro_model, {"strong": {"p_solarize": 1.0}})


def test_lr_maps():
    cos = jnp.array([-1.0, 0.0, 1.0])
    np.testing.assert_allclose(dynamic_learning_rate(cos, 2.0), [0.0, 0.5, 2.0])
    np.testing.assert_allclose(dynamic_learning_rate(cos, 1.0, "relu"), [0.0, 0.0, 1.0])
    np.testing.assert_allclose(dynamic_learning_rate(cos, 1.0, "softplus"), np.log1p(np.exp([-1, 0, 1.0])), rtol=1e-6)
    assert set(LR_MAPS) == {"quadratic", "linear", "sigmoid", "relu", "softplus"}


def test_gradient_cosine():
    a = {"x": jnp.array([1.0, 0.0]), "y": jnp.array([[0.0]])}
    b = {"x": jnp.array([1.0, 1.0]), "y": jnp.array([[0.0]])}
    assert float(gradient_cosine(a, b)) == pytest.approx(1 / np.sqrt(2))
    assert float(gradient_cosine(a, jax.tree.map(jnp.zeros_like, a))) == 0.0


def test_weak_views_invert_exactly():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    views = weak_views(x)
    assert views.shape == (6, 2, 8, 8, 3)
    ref, _ = _reference_views(x)
    for v, r in zip(views, ref):
        np.testing.assert_array_equal(v, r)
    back = invert_weak_views(views)
    for b in back:
        np.testing.assert_array_equal(b, x)
    assert len({np.asarray(v).tobytes() for v in views}) == 6
    with pytest.raises(ValueError, match="square"):
        weak_views(jnp.zeros((1, 8, 16, 3)))


def test_strong_augment():
    x = jax.random.uniform(jax.random.PRNGKey(1), (16, 16, 3))
    off = strong_augment(jax.random.PRNGKey(0), x, **STRONG_OFF)
    np.testing.assert_allclose(off, (x - x.min()) / (x.max() - x.min()), atol=1e-6)
    for op in ("p_brightness", "p_contrast", "p_gamma", "p_noise"):
        y = strong_augment(jax.random.PRNGKey(0), x, **{**STRONG_OFF, op: 1.0})
        assert float(jnp.abs(y - off).max()) > 1e-3, op
        assert float(y.min()) == pytest.approx(0.0, abs=1e-6) and float(y.max()) == pytest.approx(1.0, abs=1e-6)
    blurred = strong_augment(jax.random.PRNGKey(0), x, **{**STRONG_OFF, "p_blur": 1.0, "p_blur_channel": 1.0})
    # blurring lowers the pixel-to-pixel variation
    tv = lambda a: float(jnp.abs(jnp.diff(a, axis=0)).mean())
    assert tv(blurred) < tv(off)
    a = strong_augment(jax.random.PRNGKey(3), x)
    b = strong_augment(jax.random.PRNGKey(3), x)
    np.testing.assert_array_equal(a, b)


def test_nonfinite_step_keeps_state(micro_model, micro_variables, image):
    m = make_method("grata", micro_model)
    state = m.init(micro_variables, None)
    new, _, info = jax.jit(m.step)(state, image.at[0, 3, 3, 1].set(jnp.inf), jax.random.PRNGKey(0))
    assert float(info["skipped"]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, new, state)


@pytest.mark.slow   # analysis-only (Fig. 4); 33 s of the fast tier
def test_empirical_gradient_analysis(micro_model, micro_variables):
    """Fig. 4 diagnostic: recorded when asked, computed from the label, and without effect on adaptation."""
    from tta_jax.data import SyntheticFundus
    from tta_jax.methods.common import supervised_bn_gradient
    data = SyntheticFundus(num_train=0, num_test=2).load("C", "test", 32)
    m = make_method("grata", micro_model, {"strong": STRONG_OFF})
    probe = StreamRunner(m, analysis=True)
    s0 = m.init(micro_variables, None)
    info2 = probe.run_stream(s0, data.images, data.masks, jax.random.PRNGKey(0))[1]["info"]
    assert info2["cos_empirical"].shape == (2,) and np.all(np.abs(info2["cos_empirical"]) <= 1)
    # the first value equals the cosine computed by hand at the initial state
    x, y = data.images[:1], data.masks[:1]
    from tta_jax.methods.grata import entropy_loss, consistency_loss
    ent_grad = jax.jit(jax.grad(lambda p: entropy_loss(micro_model, p, s0.frozen_params, s0.batch_stats, x, None)))
    theta_prime = lookahead_params(s0.bn_params, ent_grad(s0.bn_params))
    g_pse = jax.jit(jax.grad(lambda p: consistency_loss(micro_model, p, s0.frozen_params, s0.batch_stats, x,
                                                        jax.random.PRNGKey(0), STRONG_OFF)))(theta_prime)
    g_emp = jax.jit(lambda s: supervised_bn_gradient(micro_model, s, x, y))(s0)
    assert info2["cos_empirical"][0] == pytest.approx(float(gradient_cosine(g_pse, g_emp)), abs=1e-4)


@pytest.mark.slow
def test_table5_objectives_with_aux_branches():
    """Self-supervised objectives as GraTa's auxiliary/pseudo losses (Table 5)."""
    from tta_jax.models import ResUNet, init_variables
    from tta_jax.auxiliary import ROTATION_VIEWS, rotate_batch
    model = ResUNet(backbone="resnet18", num_classes=2, width=0.0625,
                    aux_heads=("reconstruction", "rotation", "super_resolution", "denoising"), sr_factor=2)
    variables = jax.device_get(init_variables(model, jax.random.PRNGKey(0), 64))
    x = jax.random.uniform(jax.random.PRNGKey(1), (1, 64, 64, 3))
    m = make_method("grata", model, {"auxiliary": "rotation", "pseudo": "reconstruction", "strong": STRONG_OFF})
    state = m.init(variables, None)
    new, logits, info = jax.jit(m.step)(state, x, jax.random.PRNGKey(0))
    assert np.isfinite(float(info["cos"])) and float(info["skipped"]) == 0
    # the reconstruction loss is the MSE between sigmoid(branch) and the input
    _, branches = model.apply(variables, x, train=True, return_aux=True, mutable=["batch_stats"])[0]
    expected = float(jnp.mean((jax.nn.sigmoid(branches["reconstruction"]) - x) ** 2))
    # auxiliary = rotation (random view), pseudo = reconstruction at θ' — check the pseudo loss at θ' = θ
    m0 = make_method("grata", model, {"auxiliary": "entropy", "pseudo": "reconstruction", "lookahead": False})
    _, _, info0 = jax.jit(m0.step)(m0.init(variables, None), x, jax.random.PRNGKey(0))
    assert float(info0["pse_loss"]) == pytest.approx(expected, rel=1e-5)
    # rotation labels follow the official order and views
    views, labels = rotate_batch(jax.random.PRNGKey(3), jnp.stack([x[0]] * 4))
    for v, lab in zip(views, labels):
        np.testing.assert_array_equal(v, ROTATION_VIEWS[int(lab)](x)[0])
    with pytest.raises(ValueError, match="needs the model's 'denoising' branch"):
        make_method("grata", ResUNet(width=0.0625), {"pseudo": "denoising"})


def test_auxiliary_inputs_and_losses():
    from tta_jax.auxiliary import auxiliary_input, auxiliary_loss
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 64, 64, 3))
    small, _ = auxiliary_input("super_resolution", None, x, sr_factor=2)
    assert small.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(small[:, 0, 0], x[:, 0, 0], rtol=1e-6)          # align-corners keeps corners
    np.testing.assert_allclose(small[:, -1, -1], x[:, -1, -1], rtol=1e-6)
    noisy, _ = auxiliary_input("denoising", jax.random.PRNGKey(1), x, denoise_std=1.0)
    assert 0.9 < float(jnp.std(noisy - x)) < 1.1
    with pytest.raises(ValueError, match="divisible by 32"):
        auxiliary_input("super_resolution", None, x, sr_factor=4)
    logits = jnp.log(jnp.array([[1.0, 1, 1, 1, 1, 1]]))
    assert float(auxiliary_loss("rotation", logits, None, jnp.array([2]))) == pytest.approx(np.log(6))
    out = jnp.zeros((1, 4, 4, 3))
    assert float(auxiliary_loss("reconstruction", out, jnp.ones((1, 4, 4, 3)))) == pytest.approx(0.25)


def test_teacher_views_map_equals_vmap(micro_model, micro_variables, image):
    """``views_map=map`` (one view at a time, less memory) gives the vmapped teacher's numbers."""
    from tta_jax.methods.grata import teacher_prediction
    args = (micro_model, micro_variables["params"], micro_variables["batch_stats"], image)
    np.testing.assert_allclose(jax.jit(lambda: teacher_prediction(*args, views_map="map"))(),
                               jax.jit(lambda: teacher_prediction(*args, views_map="vmap"))(), atol=2e-5)
    with pytest.raises(ValueError, match="views_map"):
        teacher_prediction(*args, views_map="pmap")


@pytest.mark.integration
def test_bf16_cosine_and_eta_follow_float32(tiny_model):
    """GraTa under ``model.compute_dtype=bfloat16`` on a (briefly) trained source model: the gradient
    cosine and η of every step stay within a documented tolerance of the float32 run's.

    Tolerance: bf16 keeps 8 mantissa bits, so each multiplication's output is a few 10⁻³ off and the two
    gradients move slightly. On the synthetic default (ResNet-18 ×0.25, trained source model, 200
    images) the cosine moved by at most 0.02 (median 0.002; README, "Roofline and bfloat16"); on this tiny network
    trained for 150 steps by 0.002–0.055 over the 8 images; 0.1 is allowed here.
    η = β(cos + 1)²/4 follows from the cosine in both runs. On an untrained network the entropy gradient
    is mostly cancellation and bf16 moves the cosine by up to 0.6, which is why the model is trained.
    """
    from tta_jax.data import SyntheticFundus
    from tta_jax.models import init_variables
    from tta_jax.source.training import train_source
    data = SyntheticFundus(num_train=40, num_test=8)
    train, test = data.load("A", "train", 32), data.load("C", "test", 32)
    variables, _ = train_source(tiny_model, init_variables(tiny_model, jax.random.PRNGKey(0), 32),
                                train.images, train.masks, jax.random.PRNGKey(1), steps=150)
    info = {}
    for dtype in ("float32", "bfloat16"):
        m = make_method("grata", tiny_model.clone(compute_dtype=dtype), {})
        _, scores = StreamRunner(m).run_stream(m.init(variables, None), test.images, test.masks,
                                               jax.random.PRNGKey(0))
        info[dtype] = scores["info"]
        np.testing.assert_allclose(info[dtype]["eta"], 1e-4 * 0.25 * (info[dtype]["cos"] + 1) ** 2, rtol=1e-5)
    delta = np.abs(info["bfloat16"]["cos"] - info["float32"]["cos"])
    assert np.all(delta <= 0.1) and np.any(delta > 0), delta
