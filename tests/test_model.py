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
