"""PyTorch ↔ JAX: weight conversion and step equivalence (skipped without torch)."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is optional: pip install -r requirements-torch.txt")

from tta_jax import torch_reference as ref  # noqa: E402
from tta_jax.augment import STRONG_OFF  # noqa: E402
from tta_jax.checkpoints import CheckpointError  # noqa: E402
from tta_jax.data import SyntheticFundus  # noqa: E402
from tta_jax.methods import make_method  # noqa: E402
from tta_jax.models import ResUNet, init_variables  # noqa: E402
from tta_jax.source.convert import load_torch_state_dict, torch_state_dict_to_flax  # noqa: E402

SIZE = 64


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    tm = ref.TorchResUNet("resnet18", 2, 0.125)
    g = torch.Generator().manual_seed(1)
    for mod in tm.modules():   # non-trivial BN statistics and affine parameters
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.running_mean.shape, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(mod.bias.shape, generator=g) * 0.4 - 0.2)
    fm = ResUNet(backbone="resnet18", num_classes=2, width=0.125)
    template = jax.device_get(init_variables(fm, jax.random.PRNGKey(0), SIZE))
    state_dict = {k: v.numpy() for k, v in tm.state_dict().items()}
    variables, ignored = torch_state_dict_to_flax(state_dict, template)
    assert ignored == []
    return tm, fm, variables, template


def rel_err(a, b):
    """max |a − b| / max |b|: the relative difference of two arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def stream():
    return SyntheticFundus(num_train=0, num_test=3).load("C", "test", SIZE).images


@pytest.mark.parametrize("train", [False, True])
def test_converted_weights_give_same_logits(pair, stream, train):
    tm, fm, variables, _ = pair
    x = stream[:2]
    tm.train(train)
    with torch.no_grad():
        yt = _nhwc(tm(_nchw(x)))
    if train:
        yf, _ = fm.apply(variables, x, train=True, mutable=["batch_stats"])
    else:
        yf = fm.apply(variables, x, train=False)
    assert rel_err(yf, yt) < 1e-4


def test_converter_errors_and_pth_loading(pair, tmp_path):
    tm, fm, _, template = pair
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    wrapped = {"module." + k: v for k, v in sd.items()}
    wrapped["recon1.conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    _, ignored = torch_state_dict_to_flax(wrapped, template)
    assert ignored == ["recon1.conv.weight"]
    with pytest.raises(CheckpointError, match="no counterpart"):
        torch_state_dict_to_flax({**sd, "up1.tr_conv.alpha": np.zeros(1)}, template)
    with pytest.raises(CheckpointError, match="lacks .* model parameters"):
        torch_state_dict_to_flax({k: v for k, v in sd.items() if not k.startswith("seg_head")}, template)
    wide = {k: v.numpy() for k, v in ref.TorchResUNet("resnet18", 2, 0.25).state_dict().items()}
    with pytest.raises(CheckpointError, match="shape"):
        torch_state_dict_to_flax(wide, template)
    torch.save({"model": tm.state_dict()}, tmp_path / "w.pth")
    loaded = load_torch_state_dict(tmp_path / "w.pth")
    np.testing.assert_array_equal(loaded["seg_head.weight"], sd["seg_head.weight"])
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_torch_state_dict(tmp_path / "bad.pth")


def test_official_key_set_loads_and_gives_the_same_logits(pair, stream, tmp_path):
    """The official network's state_dict (unused res.fc and auxiliary branches included) loads as a .pth
    through the experiment's source stage, ignores exactly the unused keys, and reproduces PyTorch's logits."""
    from configs import source
    from tta_jax.experiment import run
    tm, _, _, _ = pair
    official = ref.TorchResUNet("resnet18", 2, 0.125, official_fc=True)
    state = {**official.state_dict(), **{k: v for k, v in tm.state_dict().items()}}
    state["recon1.conv.weight"] = torch.zeros(1, 1, 1, 1)   # an auxiliary branch of GraTa Table 5
    torch.save(state, tmp_path / "last-Res_Unet.PTH")
    c = source.get_config("quick")
    c.source_checkpoint, c.model.backbone, c.model.width = str(tmp_path / "last-Res_Unet.PTH"), "resnet18", 0.125
    c.image_size, c.synthetic.num_test, c.target_domains, c.cache_dir = SIZE, 2, "C", str(tmp_path / "c")
    res = run(c, str(tmp_path / "w"))
    assert res["source"]["format"] == "pytorch"
    assert sorted(res["source"]["ignored_keys"]) == ["recon1.conv.weight", "res.fc.bias", "res.fc.weight"]
    from tta_jax.source import build_model, get_source_model
    from tta_jax.experiment import make_dataset
    variables, _ = get_source_model(c, build_model(c, 2), make_dataset(c), "A")
    tm.eval()
    with torch.no_grad():
        yt = _nhwc(tm(_nchw(stream[:2])))
    assert rel_err(build_model(c, 2).apply(variables, stream[:2], train=False), yt) < 1e-4


# float64 carries the acceptance bounds; the float32 measurement is in the slow tier
@pytest.mark.parametrize("dtype", [pytest.param("float64", marks=pytest.mark.integration),
                                   pytest.param("float32", marks=pytest.mark.slow)])
def test_grata_step_equivalence(pair, stream, dtype):
    """First 3 images of a stream, strong view off: same cos/η, BN parameters and logits.

    float64 checks the acceptance tolerances (|Δcos|, |Δη|/β < 1e-5; relative
    differences < 1e-4).  In float32 the unit look-ahead step at a random
    initialisation is ill-conditioned: reduction-order noise moves cos by up to
    ~2e-3 between frameworks (measured), so float32 gets looser bounds on cos
    while parameters and logits must still agree to 1e-4.
    """
    tm0, fm, variables, _ = pair
    tm = ref.TorchResUNet("resnet18", 2, 0.125)
    tm.load_state_dict(tm0.state_dict())
    cos_tol = 1e-5 if dtype == "float64" else 5e-3
    with jax.enable_x64(dtype == "float64"):
        if dtype == "float64":
            tm = tm.double()
            variables = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
        opt = ref.make_adam(tm, 1e-4)
        method = make_method("grata", fm, {"strong": STRONG_OFF})
        state = method.init(variables, None)
        step = jax.jit(method.step)
        for i in range(3):
            x = stream[i:i + 1].astype(dtype)
            logits_t, info_t = ref.grata_step(tm, opt, _nchw(x), beta=1e-4, strong_off=True)
            state, logits_j, info_j = step(state, x, jax.random.PRNGKey(i))
            assert abs(float(info_j["cos"]) - info_t["cos"]) < cos_tol, i
            assert abs(float(info_j["eta"]) - info_t["eta"]) < cos_tol * 1e-4, i
            assert rel_err(logits_j, _nhwc(logits_t)) < 1e-4, i
            # BN affine parameters, compared through the module names
            for name, module in tm.named_modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    node = state.bn_params
                    for p in _flax_module_path(name):
                        node = node[p]
                    assert rel_err(node["scale"], module.weight.detach().numpy()) < 1e-4, name
                    assert rel_err(node["bias"], module.bias.detach().numpy()) < 1e-4, name


def _flax_module_path(torch_name):
    from tta_jax.source.convert import _flax_path
    _, module, _ = _flax_path(torch_name + ".weight")
    return module


def test_tent_step_equivalence(pair, stream):
    tm0, fm, variables, _ = pair
    tm = ref.TorchResUNet("resnet18", 2, 0.125)
    tm.load_state_dict(tm0.state_dict())
    opt = ref.make_adam(tm, 1e-3)
    method = make_method("tent", fm, {"lr": 1e-3})
    state = method.init(variables, None)
    step = jax.jit(method.step)
    for i in range(3):
        x = stream[i:i + 1]
        logits_t, loss_t = ref.tent_step(tm, opt, _nchw(x))
        state, logits_j, info = step(state, x, None)
        assert float(info["loss"]) == pytest.approx(loss_t, rel=1e-5)
        assert rel_err(logits_j, _nhwc(logits_t)) < 1e-4, i


def test_bn_grads_only_reference_takes_the_same_grata_step():
    """Freezing every non-BN parameter (the benchmark's second PyTorch form) changes what backward
    computes, not the step: same logits, cos and η as the official flow from the same weights."""
    torch.manual_seed(0)
    official = ref.TorchResUNet("resnet18", 2, 0.125).train()
    frozen = ref.freeze_all_but_bn(ref.TorchResUNet("resnet18", 2, 0.125).train())
    frozen.load_state_dict(official.state_dict())
    assert sum(p.requires_grad for p in frozen.parameters()) == len(ref.bn_parameters(frozen)) < \
        sum(p.requires_grad for p in official.parameters())
    x = torch.rand(1, 3, 64, 64)
    outs = [ref.grata_step(m, ref.make_adam(m, 1e-4), x, strong_off=True) for m in (official, frozen)]
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert outs[0][1]["cos"] == pytest.approx(outs[1][1]["cos"], abs=1e-6)
    assert outs[0][1]["eta"] == pytest.approx(outs[1][1]["eta"], rel=1e-5)
