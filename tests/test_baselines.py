"""The comparison methods of the papers' tables (GraTa Table 1, SPEGC's VPTTA): each method's defining
property against an independent NumPy computation, one compilation per stream, the finite-step guard."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tta_jax.augment import crop_flip_rotate_views
from tta_jax.methods import make_method

EPS = 1e-5
BASELINES = ("dua", "diga", "medbn", "domain_adaptor", "sar", "dltta", "detta", "vptta", "nc_ttt")


class InputBN(nn.Module):
    """One BatchNorm on the input, then a 1×1 head: its statistics are the image's, computable in NumPy."""

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        features = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS, name="bn")(x)
        logits = nn.Conv(2, (1, 1), name="head")(features)
        return (logits, features) if return_features else logits


@pytest.fixture(scope="module")
def input_bn():
    model = InputBN()
    variables = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))
    rng = np.random.default_rng(0)
    variables["batch_stats"]["bn"] = {"mean": rng.normal(size=3).astype(np.float32),
                                      "var": rng.uniform(0.5, 2, 3).astype(np.float32)}
    variables["params"]["bn"] = {"scale": rng.uniform(0.5, 1.5, 3).astype(np.float32),
                                 "bias": rng.normal(size=3).astype(np.float32)}
    images = rng.uniform(0, 1, (3, 1, 8, 8, 3)).astype(np.float32)
    return model, variables, images


def _head(variables, features):
    head = variables["params"]["head"]
    return features @ np.asarray(head["kernel"])[0, 0] + np.asarray(head["bias"])


def _normalise(variables, x, mean, var):
    bn = variables["params"]["bn"]
    return (x - mean) / np.sqrt(var + EPS) * bn["scale"] + bn["bias"]


def test_medbn_normalises_with_the_lower_median(input_bn):
    model, variables, images = input_bn
    method = make_method("medbn", model)
    _, logits, _ = jax.jit(method.step)(method.init(variables, None), images[0], jax.random.PRNGKey(0))
    x = images[0].reshape(-1, 3).astype(np.float64)                       # 64 values per channel: even
    centre = np.sort(x, axis=0)[31]                                       # torch.median: the lower middle
    assert not np.allclose(centre, np.median(x, axis=0))
    features = _normalise(variables, x, centre, ((x - centre) ** 2).mean(0))
    np.testing.assert_allclose(np.asarray(logits).reshape(-1, 2), _head(variables, features), rtol=1e-4, atol=1e-5)


def test_dua_momentum_schedule_and_running_statistics(input_bn):
    """Crop padding 0: every view is a flip/rotation of the image, so the views' statistics are the
    image's and the running statistics follow a NumPy EMA with m_k = 0.1 · 0.94^k + 0.005."""
    model, variables, images = input_bn
    method = make_method("dua", model, {"copies": 6, "crop_padding": 0.0})
    state, step = method.init(variables, None), jax.jit(method.step)
    mean = variables["batch_stats"]["bn"]["mean"].astype(np.float64)
    var = variables["batch_stats"]["bn"]["var"].astype(np.float64)
    for k, image in enumerate(images, start=1):
        state, logits, info = step(state, image, jax.random.PRNGKey(k))
        m = 0.1 * 0.94 ** k + 0.005
        x = image.reshape(-1, 3).astype(np.float64)
        n = 6 * x.shape[0]
        mean = (1 - m) * mean + m * x.mean(0)
        var = (1 - m) * var + m * x.var(0) * n / (n - 1)
        assert float(info["momentum"]) == pytest.approx(m, rel=1e-6)
        np.testing.assert_allclose(state.batch_stats["bn"]["mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.batch_stats["bn"]["var"], var, rtol=1e-5)
        # the prediction uses the updated running statistics
        expected = _head(variables, _normalise(variables, x, mean, var))
        np.testing.assert_allclose(np.asarray(logits).reshape(-1, 2), expected, rtol=1e-4, atol=1e-4)


def test_dua_views_are_crops_flips_and_rotations():
    image = jnp.arange(4 * 4 * 1, dtype=jnp.float32).reshape(4, 4, 1)
    views = np.asarray(crop_flip_rotate_views(jax.random.PRNGKey(0), image, 32, padding=0))
    dihedral = [np.rot90(f, r, axes=(0, 1)) for f in (np.asarray(image), np.asarray(image)[:, ::-1]) for r in range(4)]
    kinds = {next(i for i, d in enumerate(dihedral) if np.array_equal(v, d)) for v in views}
    assert len(kinds) > 4                                   # all are dihedral transforms, of several kinds
    padded = np.asarray(crop_flip_rotate_views(jax.random.PRNGKey(1), image, 32, padding=1))
    assert padded.shape == (32, 4, 4, 1) and (padded == 0).any()   # some crops reach into the zero padding


def test_diga_mixes_statistics_and_prototype_classifiers(input_bn):
    """Mixed BN statistics, prototypes of confident pixels and the distance classifier, in NumPy."""
    model, variables, images = input_bn
    hp = {"bn_lambda": 0.7, "proto_lambda": 0.6, "fusion_lambda": 0.5, "confidence": 0.6, "proto_rho": 0.3,
          "temperature": 2.0}
    method = make_method("diga", model, hp)
    state, step = method.init(variables, None), jax.jit(method.step)
    src_mean = variables["batch_stats"]["bn"]["mean"].astype(np.float64)
    src_var = variables["batch_stats"]["bn"]["var"].astype(np.float64)
    running = seen = None
    for k, image in enumerate(images):
        state, logits, _ = step(state, image, jax.random.PRNGKey(k))
        x = image.reshape(-1, 3).astype(np.float64)
        feats = _normalise(variables, x, 0.7 * src_mean + 0.3 * x.mean(0), 0.7 * src_var + 0.3 * x.var(0))
        p_src = 1 / (1 + np.exp(-_head(variables, feats)))                     # [P, 2 channels]
        inst = np.zeros((2, 2, 3))
        exists = np.zeros((2, 2), bool)
        for c in range(2):
            for cls, chosen in enumerate((1 - p_src[:, c] >= 0.6, p_src[:, c] >= 0.6)):
                if chosen.any():
                    inst[c, cls], exists[c, cls] = feats[chosen].mean(0), True
        if running is None:
            running, seen = inst.copy(), exists.copy()
        else:
            running = np.where(exists[..., None], np.where(seen[..., None], 0.7 * running + 0.3 * inst, inst), running)
            seen = seen | exists

        def classify(protos, have):
            d = np.linalg.norm(feats[:, None, None] - protos[None], axis=-1)
            w = np.where(have[None], np.exp(-d / 2.0), 0.0)
            return w[..., 1] / w.sum(-1)

        assert exists.any(-1).all()                  # every channel has a prototype in this set-up
        p = 0.5 * (0.6 * classify(running, seen) + 0.4 * classify(inst, exists)) + 0.5 * p_src
        np.testing.assert_allclose(jax.nn.sigmoid(np.asarray(logits)).reshape(-1, 2), p, rtol=1e-4, atol=1e-5)


def test_adamix_lambda_equals_numpy():
    from tta_jax.methods.domain_adaptor import adamix_lambda
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 4, 3)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -1.0]
    x[1] *= 1.7
    mu_s, var_s = rng.normal(size=3), rng.uniform(0.5, 2.0, 3)
    d = lambda m1, s1, m2, s2: np.mean((m1 - m2) ** 2 + (s1 - s2) ** 2, axis=-1)
    mu_t, sd_t = x.mean((0, 1, 2)), x.reshape(-1, 3).std(0, ddof=1)
    lams = []
    for img in x:
        mu_i, sd_i = img.mean((0, 1)), img.reshape(-1, 3).std(0, ddof=1)
        st, is_, it = d(mu_t, sd_t, mu_s, np.sqrt(var_s)), d(mu_i, sd_i, mu_s, np.sqrt(var_s)), d(mu_i, sd_i, mu_t, sd_t)
        lams.append(np.clip(1 - st / (st + is_ + it), 0, 1))
    assert float(adamix_lambda(jnp.asarray(x), mu_s, var_s)) == pytest.approx(np.mean(lams), rel=1e-5)
    assert float(adamix_lambda(jnp.asarray(x[:1]), mu_s, var_s)) == pytest.approx(0.5, abs=1e-6)   # batch of one


@pytest.mark.parametrize("lr", [0.0, 0.5])
def test_domain_adaptor_mixture_and_one_gem_t_step(input_bn, lr):
    """λ = 1/2 for one image; with lr 0 the prediction is the 50/50 mixture of statistics; one SGD step
    on the rectified (γ', β') with GEM-T's gradient −z·p(1 − p)/P (T = √2|z| detached, p = σ(z/T))."""
    model, variables, images = input_bn
    method = make_method("domain_adaptor", model, {"lr": lr})
    _, logits, info = jax.jit(method.step)(method.init(variables, None), images[0], jax.random.PRNGKey(0))
    assert float(info["lambda"]) == pytest.approx(0.5, abs=1e-6)
    bn, head = variables["params"]["bn"], variables["params"]["head"]
    w = np.asarray(head["kernel"], np.float64)[0, 0]
    mu_s, var_s = (variables["batch_stats"]["bn"][k].astype(np.float64) for k in ("mean", "var"))
    x = images[0].reshape(-1, 3).astype(np.float64)
    mu_t, var_t = x.mean(0), x.var(0)
    var_m = 0.5 * var_s + 0.5 * var_t
    scale = bn["scale"] * np.sqrt(var_t + EPS) / np.sqrt(var_m + EPS)
    bias = bn["bias"] + bn["scale"] * 0.5 * (mu_t - mu_s) / np.sqrt(var_m + EPS)
    x_hat = (x - mu_t) / np.sqrt(var_t + EPS)
    z = (x_hat * scale + bias) @ w + head["bias"]
    np.testing.assert_allclose(z, _normalise(variables, x, 0.5 * mu_s + 0.5 * mu_t, var_m) @ w + head["bias"],
                               rtol=1e-9, atol=1e-9)   # the transformation changes nothing by itself
    p = 1 / (1 + np.exp(-np.sign(z) / np.sqrt(2)))
    d_y = (-z * p * (1 - p) / len(x)) @ w.T
    scale, bias = scale - lr * (d_y * x_hat).sum(0), bias - lr * d_y.sum(0)
    expected = (x_hat * scale + bias) @ w + head["bias"]
    np.testing.assert_allclose(np.asarray(logits).reshape(-1, 2), expected, rtol=1e-4, atol=1e-5)
    if lr:
        assert np.abs(expected - z).max() > 1e-3


@pytest.fixture(scope="module")
def micro_with_decoder():
    """The micro segmentor with DeTTA's decoder and NC-TTT's head: BN layers the segmentation forward
    never reaches."""
    from conftest import MicroSegmentor
    model = MicroSegmentor(aux_heads=("blind_spot", "noise_contrastive"))
    return model, jax.device_get(jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), return_aux=True))(
        jax.random.PRNGKey(0)))


@pytest.mark.parametrize("name", BASELINES)
def test_compiles_once_and_guards_non_finite_steps(micro_with_decoder, name):
    micro_model, micro_variables = micro_with_decoder
    method = make_method(name, micro_model)
    traces = []

    def step(state, images, rng):
        traces.append(1)
        return method.step(state, images, rng)

    state, step_fn = method.init(micro_variables, jax.random.PRNGKey(0)), jax.jit(step)
    images = jax.random.uniform(jax.random.PRNGKey(1), (3, 1, 32, 32, 3))
    for k in range(3):
        state, logits, info = step_fn(state, images[k], jax.random.PRNGKey(k))
        assert np.isfinite(np.asarray(logits)).all()
    assert len(traces) == 1
    before = jax.tree.map(np.asarray, state)
    state, _, info = step_fn(state, images[0].at[0, 0, 0, 0].set(jnp.nan), jax.random.PRNGKey(9))
    assert len(traces) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), before)
    if "skipped" in info:
        assert float(info["skipped"]) == 1.0


def test_sam_perturbation_on_a_quadratic():
    """L(θ) = ½ θᵀAθ over a two-leaf pytree: ε = ρ Aθ / ‖Aθ‖ with one norm over both leaves."""
    from tta_jax.methods.sar import sam_perturbation
    a = np.diag([1.0, 2.0, 3.0, 4.0])
    theta = {"u": jnp.array([1.0, -1.0]), "v": jnp.array([0.5, 2.0])}
    loss = lambda t: 0.5 * jnp.concatenate([t["u"], t["v"]]) @ a @ jnp.concatenate([t["u"], t["v"]])
    eps = sam_perturbation(jax.grad(loss)(theta), rho=0.05)
    g = a @ np.array([1.0, -1.0, 0.5, 2.0])
    np.testing.assert_allclose(np.concatenate([eps["u"], eps["v"]]), 0.05 * g / np.linalg.norm(g), rtol=1e-6)


def test_sar_step_equals_numpy(input_bn):
    """Reliable-pixel entropy, SAM ascent, the gradient at θ + ε over pixels reliable at both, one SGD step."""
    model, variables, images = input_bn
    rho, lr = 0.5, 0.3
    method = make_method("sar", model, {"rho": rho, "lr": lr, "reset_threshold": 0.0, "margin_factor": 0.9})
    state = method.init(variables, None)
    state, _, info = jax.jit(method.step)(state, images[0], jax.random.PRNGKey(0))
    head = variables["params"]["head"]
    w = np.asarray(head["kernel"], np.float64)[0, 0]
    x = images[0].reshape(-1, 3).astype(np.float64)
    x_hat = (x - x.mean(0)) / np.sqrt(x.var(0) + EPS)
    margin = 0.9 * np.log(2)

    def entropy_and_grad(scale, bias, keep=None):
        z = (x_hat * scale + bias) @ w + head["bias"]
        p = 1 / (1 + np.exp(-z))
        ent = -(p * np.log(p) + (1 - p) * np.log(1 - p))
        keep = (ent < margin) if keep is None else keep & (ent < margin)
        d_z = np.where(keep, -z * p * (1 - p), 0.0) / keep.sum()
        d_y = d_z @ w.T
        return ent[keep].mean(), keep, (d_y * x_hat).sum(0), d_y.sum(0)

    scale, bias = (variables["params"]["bn"][k].astype(np.float64) for k in ("scale", "bias"))
    loss1, keep, g_scale, g_bias = entropy_and_grad(scale, bias)
    assert 0 < keep.mean() < 1                                     # the filter matters here
    norm = np.sqrt((g_scale ** 2).sum() + (g_bias ** 2).sum())
    loss2, _, g2_scale, g2_bias = entropy_and_grad(scale + rho * g_scale / norm, bias + rho * g_bias / norm, keep)
    assert float(info["loss"]) == pytest.approx(loss1, rel=1e-4)
    assert float(info["loss_perturbed"]) == pytest.approx(loss2, rel=1e-4)
    np.testing.assert_allclose(state.bn_params["bn"]["scale"], scale - lr * g2_scale, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state.bn_params["bn"]["bias"], bias - lr * g2_bias, rtol=1e-4, atol=1e-6)


def test_sar_recovers_the_source_model_when_the_ema_falls_low(input_bn):
    model, variables, images = input_bn
    method = make_method("sar", model, {"lr": 0.3, "reset_threshold": 10.0})
    state, _, info = jax.jit(method.step)(method.init(variables, None), images[0], jax.random.PRNGKey(0))
    assert float(info["reset"]) == 1.0 and np.isnan(float(state.ema))
    jax.tree.map(np.testing.assert_array_equal, state.bn_params, state.source_bn)


def test_dltta_learning_rate_from_a_hand_built_memory():
    from tta_jax.methods.dltta import DLTTAHParams, dynamic_learning_rate
    rng = np.random.default_rng(5)
    hp = DLTTAHParams(memory_size=5, neighbours=3, value_size=4)
    keys, key = rng.normal(size=(5, 6)), rng.normal(size=6)
    values = rng.uniform(0.05, 0.95, (5, 4, 4, 2))
    logits = rng.normal(size=(4, 4, 2)) * 3
    cos = keys @ key / np.linalg.norm(keys, axis=1) / np.linalg.norm(key)
    top = np.argsort(-cos)[:3]
    a = np.exp(cos[top] / 0.2) / np.exp(cos[top] / 0.2).sum()
    q = np.einsum("k,khwc->hwc", a, values[top])
    p = 1 / (1 + np.exp(-logits / 4))
    kl = lambda u, v: u * np.log(u / v) + (1 - u) * np.log((1 - u) / (1 - v))
    d = np.mean(kl(p, q) + kl(q, p))
    lr, got_d = dynamic_learning_rate(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(5), jnp.asarray(key),
                                      jnp.asarray(logits), hp)
    assert float(got_d) == pytest.approx(d, rel=1e-4) and float(lr) == pytest.approx(1e-3 * np.exp(d), rel=1e-4)
    # an entry not yet written (count 4 of 5 slots) is never a neighbour; no more than k entries: the base rate
    keys[4] = key
    _, d4 = dynamic_learning_rate(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(4), jnp.asarray(key),
                                  jnp.asarray(logits), hp)
    top4 = np.argsort(-(keys[:4] @ key / np.linalg.norm(keys[:4], axis=1)))[:3]
    assert 4 not in top4 and float(d4) > 0
    lr3, _ = dynamic_learning_rate(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(3), jnp.asarray(key),
                                   jnp.asarray(logits), hp)
    assert float(lr3) == pytest.approx(1e-3)


def test_blind_spot_masking_and_loss():
    from tta_jax.auxiliary import blind_spot_input, blind_spot_loss
    h = w = 24
    image = jnp.arange(h * w, dtype=jnp.float32).reshape(1, h, w, 1).repeat(3, -1)   # unique values: positions
    masked, mask = blind_spot_input(jax.random.PRNGKey(0), image)
    masked, mask = np.asarray(masked), np.asarray(mask)[0, ..., 0].astype(bool)
    assert 0.05 < mask.mean() < 0.15
    np.testing.assert_array_equal(masked[0][~mask], np.asarray(image)[0][~mask])     # the rest untouched
    src = masked[0, ..., 0][mask].astype(int)
    ys, xs = np.nonzero(mask)
    assert np.all(np.abs(src // w - ys) <= 2) and np.all(np.abs(src % w - xs) <= 2)   # a 5×5 neighbour
    moved = (src // w != ys) | (src % w != xs)
    assert moved.mean() > 0.9                            # only border clipping can land on the pixel itself
    out = np.random.default_rng(0).normal(size=(1, h, w, 3))
    target = np.random.default_rng(1).uniform(size=(1, h, w, 3))
    expected = np.mean(np.abs((1 / (1 + np.exp(-out)) - target) * mask[None, ..., None]))
    assert float(blind_spot_loss(jnp.asarray(out), jnp.asarray(target), jnp.asarray(mask[None, ..., None], jnp.float32))) \
        == pytest.approx(expected, rel=1e-5)


def test_detta_adapts_encoder_bn_only_and_moves_running_statistics():
    """The blind-spot loss reaches the encoder's and the denoising decoder's BN layers, not the
    segmentation decoder's; the train-mode forward moves the running statistics."""
    from flax import traverse_util
    from conftest import MicroSegmentor
    model = MicroSegmentor(aux_heads=("blind_spot",))
    variables = jax.device_get(jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), return_aux=True))(
        jax.random.PRNGKey(0)))
    method = make_method("detta", model, {"lr": 1e-2})
    state, step = method.init(variables, None), jax.jit(method.step)
    image = jax.random.uniform(jax.random.PRNGKey(1), (1, 32, 32, 3))
    new, logits, info = step(state, image, jax.random.PRNGKey(2))
    before, after = (traverse_util.flatten_dict(s.bn_params, sep="/") for s in (state, new))
    moved = {k for k in before if not np.allclose(before[k], after[k])}
    assert any(k.startswith("layer1_0/") for k in moved) and any(k.startswith("blindspot1/") for k in moved)
    assert not any(k.startswith(("up1/", "bnout/")) for k in moved)        # the segmentation decoder
    assert not np.allclose(new.batch_stats["bn1"]["mean"], state.batch_stats["bn1"]["mean"])
    assert np.isfinite(float(info["loss"])) and np.isfinite(np.asarray(logits)).all()
    kept, _, info = step(new, image.at[0, 5, 5, 0].set(jnp.nan), jax.random.PRNGKey(3))   # the finite guard
    assert float(info["skipped"]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, kept, new)


def _numpy_prompt(image, prompt):
    h, w, _ = image.shape
    p = prompt.shape[0]
    spectrum = np.fft.fft2(image, axes=(0, 1))
    amplitude = np.fft.fftshift(np.abs(spectrum), axes=(0, 1))
    r, c = (h - p) // 2, (w - p) // 2
    amplitude[r:r + p, c:c + p] *= prompt
    return np.real(np.fft.ifft2(np.fft.ifftshift(amplitude, axes=(0, 1)) * np.exp(1j * np.angle(spectrum)), axes=(0, 1)))


def test_vptta_prompt_alignment_loss_and_prediction(input_bn):
    """The low-frequency amplitude prompt (NumPy FFT), AdaBN's mixture m = 1/(√t/5 + 1), the L1 alignment
    of mixed and instance statistics, and the prediction through the adapted prompt (lr 0: the start)."""
    from tta_jax.methods.vptta import alignment_loss, apply_prompt
    model, variables, images = input_bn
    image = images[0][0].astype(np.float64)
    prompt = np.random.default_rng(2).uniform(0.5, 1.5, (3, 3, 3))
    prompted, low = apply_prompt(jnp.asarray(image, jnp.float32), jnp.asarray(prompt, jnp.float32))
    np.testing.assert_allclose(prompted, _numpy_prompt(image, prompt), atol=1e-5)
    np.testing.assert_allclose(apply_prompt(jnp.asarray(image, jnp.float32), jnp.ones((3, 3, 3)))[0], image, atol=1e-5)
    m = 1 / (np.sqrt(2) / 5 + 1)
    x = image.reshape(-1, 3)
    mu_s, var_s = (variables["batch_stats"]["bn"][k].astype(np.float64) for k in ("mean", "var"))
    mean, var = x.mean(0), x.var(0, ddof=1)
    mixed_mean, mixed_var = m * mean + (1 - m) * mu_s, m * var + (1 - m) * var_s
    expected = np.mean(np.abs(mixed_mean - mean)) + np.mean(np.abs(np.sqrt(mixed_var) - np.sqrt(var)))
    got = alignment_loss(model, variables["params"], variables["batch_stats"], jnp.asarray(image[None], jnp.float32), m)
    assert float(got) == pytest.approx(expected, rel=1e-4)
    # one step with lr 0 (8×8 images: a 1×1 prompt of ones) predicts the image through the mixture at t = 1
    method = make_method("vptta", model, {"lr": 0.0})
    _, logits, info = jax.jit(method.step)(method.init(variables, None), images[0], jax.random.PRNGKey(0))
    m1 = 1 / (1 / 5 + 1)
    assert float(info["momentum"]) == pytest.approx(m1)
    expected = _head(variables, _normalise(variables, x, m1 * mean + (1 - m1) * mu_s, m1 * var + (1 - m1) * var_s))
    np.testing.assert_allclose(np.asarray(logits).reshape(-1, 2), expected, rtol=1e-4, atol=1e-4)


def test_vptta_warm_start_from_the_memory():
    from tta_jax.methods.vptta import VPTTAHParams, warm_start
    rng = np.random.default_rng(4)
    hp = VPTTAHParams(memory_size=6, neighbours=3)
    keys, key = rng.normal(size=(6, 12)), rng.normal(size=12)
    prompts = rng.uniform(0.5, 1.5, (6, 2, 2, 3))
    cos = keys[:5] @ key / np.linalg.norm(keys[:5], axis=1) / np.linalg.norm(key)     # 5 entries stored
    top = np.argsort(-cos)[:3]
    w = np.exp(cos[top] / 0.2) / np.exp(cos[top] / 0.2).sum()
    got = warm_start(jnp.asarray(keys), jnp.asarray(prompts), jnp.asarray(5), jnp.asarray(key), hp)
    np.testing.assert_allclose(got, np.einsum("k,kabc->abc", w, prompts[top]), rtol=1e-5)
    ones = warm_start(jnp.asarray(keys), jnp.asarray(prompts), jnp.asarray(2), jnp.asarray(key), hp)
    np.testing.assert_array_equal(ones, 1.0)                                           # fewer than 3 stored


@pytest.mark.slow
@pytest.mark.parametrize("name", BASELINES)
def test_vmapped_seeds_equal_sequential_runs(micro_with_decoder, name):
    """Two seeds as one vmapped stream (the paper variants' setting) = two sequential runs: the declared
    stream axes split each method's state correctly."""
    from tta_jax.runner import StreamRunner, init_streams
    model, variables = micro_with_decoder
    method = make_method(name, model)
    images = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (3, 32, 32, 3)))
    masks = (images[..., :2] > 0.5).astype(np.uint8)
    keys = jnp.stack([jax.random.PRNGKey(s) for s in (0, 1)])
    batched = StreamRunner(method, "python", batched=True, stream_map="vmap")
    _, scores = batched.run_stream(init_streams(method, variables, keys), images, masks, keys)
    for s in (0, 1):
        single = StreamRunner(method, "python")
        _, ref = single.run_stream(method.init(variables, keys[s]), images, masks, keys[s])
        np.testing.assert_allclose(np.asarray(scores["dice"])[:, s], np.asarray(ref["dice"]), atol=1e-3)


def test_sar_without_reliable_pixels_leaves_the_ema_and_parameters(input_bn):
    model, variables, images = input_bn
    method = make_method("sar", model, {"margin_factor": 1e-9, "reset_threshold": 10.0})
    state = method.init(variables, None)
    new, _, info = jax.jit(method.step)(state, images[0], jax.random.PRNGKey(0))
    assert float(info["reliable_fraction"]) == 0.0 and float(info["reset"]) == 0.0 and np.isnan(float(new.ema))
    jax.tree.map(np.testing.assert_array_equal, new.bn_params, state.bn_params)
