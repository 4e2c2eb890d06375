import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tta_jax.models import ResUNet, init_variables


def test_output_shape_and_names(tiny_model, tiny_variables):
    x = jnp.ones((2, 32, 32, 3))
    y = tiny_model.apply(tiny_variables, x, train=False)
    assert y.shape == (2, 32, 32, 2)
    names = set(tiny_variables["params"])
    assert {"conv1", "bn1", "layer1_0", "layer4_1", "up1", "up4", "up5", "bnout", "seg_head"} <= names
    assert set(tiny_variables["params"]["up1"]) == {"tr_conv", "x_conv", "bn"}
    assert "downsample_conv" in tiny_variables["params"]["layer2_0"]


@pytest.mark.parametrize("backbone,blocks", [("resnet34", (3, 4, 6, 3)), ("resnet50", (3, 4, 6, 3))])
def test_backbones(backbone, blocks):
    model = ResUNet(backbone=backbone, num_classes=1, width=0.0625)
    v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    params = v["params"]
    for i, n in enumerate(blocks):
        assert f"layer{i + 1}_{n - 1}" in params and f"layer{i + 1}_{n}" not in params
    assert params["seg_head"]["kernel"].shape[-1] == 1
    if backbone == "resnet50":
        assert "conv3" in params["layer1_0"]


def test_full_width_decoder_channels():
    model = ResUNet(backbone="resnet34", num_classes=2, width=1.0)
    v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    flat = traverse_util.flatten_dict(v["params"], sep="/")
    assert flat["up1/tr_conv/kernel"].shape == (2, 2, 512, 128)
    assert flat["up1/x_conv/kernel"].shape == (1, 1, 256, 128)
    assert flat["up4/bn/scale"].shape == (256,)
    assert flat["up5/kernel"].shape == (2, 2, 256, 32)
    assert flat["conv1/kernel"].shape == (7, 7, 3, 64)


def test_bad_inputs(tiny_model, tiny_variables):
    with pytest.raises(ValueError, match="rank 4"):
        tiny_model.apply(tiny_variables, jnp.ones((32, 32, 3)))
    with pytest.raises(ValueError, match="divisible by 32"):
        tiny_model.apply(tiny_variables, jnp.ones((1, 40, 40, 3)))
    with pytest.raises(ValueError, match="unknown backbone"):
        ResUNet(backbone="vgg").init(jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 3)))


def test_init_is_deterministic(tiny_model):
    a = init_variables(tiny_model, jax.random.PRNGKey(3), 32)
    b = init_variables(tiny_model, jax.random.PRNGKey(3), 32)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _same_init_and_output(ours, flax_module, x):
    """Same parameter tree and initial values, and the same outputs with non-trivial parameters."""
    v_ours = jax.jit(ours.init)(jax.random.PRNGKey(3), x)
    v_flax = jax.jit(flax_module.init)(jax.random.PRNGKey(3), x)
    assert jax.tree.structure(v_ours) == jax.tree.structure(v_flax)
    for a, b in zip(jax.tree.leaves(v_ours), jax.tree.leaves(v_flax)):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    v = jax.tree.map(lambda p: p + jax.random.normal(jax.random.PRNGKey(7), p.shape), v_flax)
    np.testing.assert_allclose(jax.jit(ours.apply)(v, x), jax.jit(flax_module.apply)(v, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("features", [5, 2])
def test_upconv_equals_flax_conv_transpose(features):
    """The matmul form of the 2×2/2 transposed convolution is the Flax module, kernel orientation included."""
    import flax.linen as nn
    from tta_jax.models.fast_ops import UpConv2x
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 5, 4))
    _same_init_and_output(UpConv2x(features), nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding="VALID"), x)


@pytest.mark.parametrize("strides,use_bias", [(1, True), (2, False), (2, True)])
def test_pointwise_conv_equals_flax_conv(strides, use_bias):
    """Kernel size 1 (the matmul path), strided and with or without bias."""
    import flax.linen as nn
    from tta_jax.models.fast_ops import Conv
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 7, 4))
    _same_init_and_output(Conv(3, 1, strides, use_bias), nn.Conv(3, (1, 1), strides, use_bias=use_bias), x)


def test_max_pool_equals_flax_max_pool():
    import flax.linen as nn
    from tta_jax.models.fast_ops import max_pool_3x3_s2
    pool = lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for shape in [(2, 16, 16, 3), (1, 15, 9, 2)]:
        x = jax.random.normal(jax.random.PRNGKey(1), shape)
        np.testing.assert_array_equal(max_pool_3x3_s2(x), pool(x))
        grad = lambda f: jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))(x)
        np.testing.assert_allclose(grad(max_pool_3x3_s2), grad(pool), atol=1e-6)


@pytest.mark.parametrize("shape,k,strides", [((1, 16, 16, 4), 3, 1), ((2, 16, 16, 4), 3, 2),
                                             ((1, 15, 17, 3), 7, 2), ((1, 15, 15, 2), 5, 1)])
def test_conv_equals_flax_conv_with_gradients(shape, k, strides):
    """:class:`Conv` (hand-written input gradient) is ``nn.Conv``: init, values, input and kernel gradients."""
    import flax.linen as nn
    from tta_jax.models.fast_ops import Conv
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    ours, ref = Conv(5, k, strides), nn.Conv(5, (k, k), strides, padding=[(k // 2, k // 2)] * 2)
    _same_init_and_output(ours, ref, x)
    v = jax.jit(ref.init)(jax.random.PRNGKey(3), x)
    grads = [jax.jit(jax.grad(lambda v, x: jnp.sum(jnp.sin(m.apply(v, x))), (0, 1)))(v, x) for m in (ours, ref)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def _bf16_rounded(tree):
    return jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), tree)


@pytest.mark.parametrize("k,strides,pad", [(3, 1, 1), (3, 2, 1), (7, 2, 3), (5, 1, 2), (3, 1, 0)])
def test_conv_taps_equals_lax_convolution(k, strides, pad):
    """The k² tap matmuls sum what ``lax.conv_general_dilated`` sums, odd sides and strides included."""
    from tta_jax.models.fast_ops import conv_taps
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 15, 12, 6))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (k, k, 6, 5))
    ref = jax.lax.conv_general_dilated(x, kernel, (strides, strides), [(pad, pad)] * 2,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(conv_taps(x, kernel, strides, pad), ref, rtol=1e-5, atol=1e-5)


def test_tap_matmuls_only_for_bf16_with_enough_channels_on_amx(monkeypatch):
    from tta_jax.models import fast_ops
    for amx in (True, False):
        monkeypatch.setattr(fast_ops, "cpu_has_amx_bf16", lambda: amx)
        on_cpu = jax.default_backend() == "cpu"
        assert fast_ops.use_tap_matmuls(64, jnp.bfloat16) == (amx and on_cpu)
        assert fast_ops.use_tap_matmuls(fast_ops.TAP_MATMUL_MIN_CHANNELS - 1, jnp.bfloat16) is False
        assert fast_ops.use_tap_matmuls(64, None) is False and fast_ops.use_tap_matmuls(64, jnp.float32) is False


@pytest.mark.parametrize("layer", ["conv3", "conv3_stride2", "conv7_stride2", "conv1", "upconv",
                                   "conv3_taps", "conv3_stride2_taps"])
def test_bf16_layers_are_float32_layers_on_rounded_inputs(layer, monkeypatch):
    """``compute_dtype=bfloat16`` multiplies bf16 copies exactly and accumulates in float32: values and
    gradients are the float32 layer's at bf16-rounded activations, kernels and output gradients, up to
    the order of the float32 sums and one bf16 rounding (2⁻⁸ relative) of a gradient leaving its
    multiplication (as under PyTorch's autocast; the square convolutions' hand-written input gradient
    stays float32). Outputs and gradients are float32."""
    from tta_jax.models import fast_ops
    from tta_jax.models.fast_ops import Conv, UpConv2x
    # `_taps`: the tap-matmul form of the convolutions (forward and stride-1 input gradient) on any
    # machine; otherwise the test's 6 input channels keep convolutions everywhere
    taps = layer.endswith("_taps")
    monkeypatch.setattr(fast_ops, "use_tap_matmuls", lambda channels, dtype: taps and dtype is not None)
    layer = layer.removesuffix("_taps")
    build = {"conv3": lambda d: Conv(5, 3, 1, compute_dtype=d), "conv3_stride2": lambda d: Conv(5, 3, 2, compute_dtype=d),
             "conv7_stride2": lambda d: Conv(4, 7, 2, use_bias=False, compute_dtype=d),
             "conv1": lambda d: Conv(5, 1, 2, compute_dtype=d), "upconv": lambda d: UpConv2x(5, compute_dtype=d)}[layer]
    full, low = build(None), build(jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 10, 6))
    v = jax.jit(full.init)(jax.random.PRNGKey(1), x)
    v = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape), v)
    y_low, vjp_low = jax.vjp(lambda v, x: low.apply(v, x), v, x)
    if taps:
        assert "convolution" not in jax.jit(low.apply).lower(v, x).as_text()
    dy = _bf16_rounded(jax.random.normal(jax.random.PRNGKey(3), y_low.shape))
    rounded = {"params": {**v["params"], "kernel": _bf16_rounded(v["params"]["kernel"])}}
    y_ref, vjp_ref = jax.vjp(lambda v, x: full.apply(v, x), rounded, _bf16_rounded(x))
    assert y_low.dtype == jnp.float32
    np.testing.assert_allclose(y_low, y_ref, rtol=1e-5, atol=1e-5)
    (dv_low, dx_low), (dv_ref, dx_ref) = vjp_low(dy), vjp_ref(dy)
    assert {a.dtype for a in jax.tree.leaves((dv_low, dx_low))} == {jnp.dtype(jnp.float32)}
    # UpConv2x's input gradient sums two rounded row gradients: two roundings, against the largest entry
    np.testing.assert_allclose(dx_low, dx_ref, rtol=0, atol=2**-7 * float(jnp.max(jnp.abs(dx_ref))))
    np.testing.assert_allclose(dv_low["params"]["kernel"], dv_ref["params"]["kernel"], rtol=2**-8, atol=1e-5)
    if "bias" in dv_low["params"]:
        np.testing.assert_allclose(dv_low["params"]["bias"], dv_ref["params"]["bias"], rtol=1e-5, atol=1e-5)
    # and bf16 is really used: the float32 layer on unrounded inputs differs by bf16's rounding
    assert not np.allclose(y_low, full.apply(v, x), rtol=1e-5, atol=1e-5)


def test_bf16_resunet_keeps_float32_outside_the_multiplications(tiny_model, tiny_variables):
    """A bf16 ResUNet multiplies in bf16 (its HLO has bf16 operands, the float32 one none) and returns
    float32 logits and BatchNorm statistics close to the float32 network's; an unknown dtype is refused.
    (Gradients: the layer tests above.)"""
    x = jax.random.uniform(jax.random.PRNGKey(0), (1, 32, 32, 3))
    outputs, hlo = {}, {}
    for dtype in ("float32", "bfloat16"):
        model = tiny_model.clone(compute_dtype=dtype)
        forward = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
        lowered = forward.lower(tiny_variables, x)
        hlo[dtype] = lowered.as_text()
        outputs[dtype] = lowered.compile()(tiny_variables, x)
    assert "bf16" in hlo["bfloat16"] and "bf16" not in hlo["float32"]
    assert {a.dtype for a in jax.tree.leaves(outputs["bfloat16"])} == {jnp.dtype(jnp.float32)}
    y32, y16 = (np.ravel(outputs[d][0]) for d in ("float32", "bfloat16"))
    assert not np.array_equal(y32, y16) and np.corrcoef(y32, y16)[0, 1] > 0.99
    with pytest.raises(ValueError, match="compute_dtype"):
        tiny_model.clone(compute_dtype="float16").init(jax.random.PRNGKey(0), x)
