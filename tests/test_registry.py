"""The library core: a method is one declaration plus a factory; typed hyperparameters; the Python API."""
import dataclasses
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from tta_jax import adapt_stream, hparams
from tta_jax.bn import forward_test_stats
from tta_jax.hparams import HParamError, bounded
from tta_jax.methods import Method, available_methods, make_method, method_spec, register

ALL_METHODS = tuple(m for m in available_methods() if m != "toy_shift")   # every registered method


@dataclasses.dataclass(frozen=True)
class ToyHParams:
    shift: float = bounded(0.5, low=0.0)


@register("toy_shift", ToyHParams)
def make_toy(model, hp: ToyHParams) -> Method:
    """Test-image BN statistics, logits shifted by a running count × ``shift`` (adapts nothing real)."""

    def init(variables, rng):
        del rng
        return {"variables": variables, "seen": jnp.zeros(())}

    def step(state, images, rng):
        del rng
        logits = forward_test_stats(model, state["variables"]["params"], state["variables"]["batch_stats"], images)
        seen = state["seen"] + 1
        return {**state, "seen": seen}, logits + hp.shift * 0.0 * seen, {"seen": seen}

    return Method("toy_shift", init, step, stream_axes={"variables": None, "seen": 0})


def test_registered_methods_declare_their_hyperparameters():
    assert set(ALL_METHODS) <= set(available_methods())
    for name in ALL_METHODS:
        assert dataclasses.is_dataclass(method_spec(name).hparams)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_hyperparameter_typo_is_one_clear_error_from_python(tiny_model, name):
    with pytest.raises(HParamError) as err:
        make_method(name, tiny_model, {"lookahed": False})
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{name}: unknown hyperparameter lookahed; valid keys: ")
    for key in hparams.valid_keys(method_spec(name).hparams):
        assert key in message


@pytest.mark.parametrize("name,key,bad,match", [
    ("tent", "steps", "5", "must be an integer"), ("tent", "lr", float("nan"), "must be finite"),
    ("tent", "lr", -1.0, "must be >= 0.0"), ("tent", "lr", True, "must be a number"),
    ("grata", "lookahead", 1, "must be True or False"), ("grata", "lr_map", "tanh", "is not one of"),
    ("spegc", "keep_fraction", 0.0, "must be > 0.0"), ("adv_ttt", "n_iter", 0, "must be >= 1"),
])
def test_wrong_types_and_ranges_are_refused(tiny_model, name, key, bad, match):
    with pytest.raises(HParamError, match=f"{name}.{key}.*{match}"):
        make_method(name, tiny_model, {key: bad})


def test_declared_values_are_coerced_losslessly():
    from tta_jax.methods import method_hparams
    hp = method_hparams("tent", {"lr": 1, "steps": 2.0})
    assert hp.lr == 1.0 and isinstance(hp.lr, float) and hp.steps == 2 and isinstance(hp.steps, int)
    assert hparams.to_config(type(hp)).lr == 1e-3   # the config sub-dict is the declaration's defaults


def test_config_subdicts_come_from_the_declarations():
    from configs import common
    c = common.get_base_config()
    for name in available_methods():
        assert set(c[name].keys()) == set(hparams.valid_keys(method_spec(name).hparams))
    assert c.tent.lr == 1e-3 and c.grata.strong.p_noise == 0.5
    assert c.spegc.lr is None   # a family-dependent default, filled at run time


def test_family_defaults_apply_whichever_config_runs_the_method():
    from configs import grata, spegc
    from tta_jax.experiment import resolve_method
    for config in (grata.get_config("polyp"), spegc.get_config("polyp")):
        assert resolve_method(config, "spegc")[1].lr == 0.01
    assert resolve_method(grata.get_config(), "spegc")[1].lr == 0.005
    c = grata.get_config("polyp")
    c.spegc.lr = 0.003   # an explicit value wins over the family default
    assert resolve_method(c, "spegc")[1].lr == 0.003
    assert grata.get_config("polyp").data_dir.endswith("shared/data/polyp")
    assert not grata.get_config("polyp").data_dir.startswith(".")


def test_typo_in_a_config_is_refused_before_any_work(tmp_path):
    from configs import grata
    from tta_jax.experiment import validate_config
    c = grata.get_config()
    c.grata.lookahed = False   # an unlocked config accepts the new key; the run does not
    with pytest.raises(HParamError, match="grata: unknown hyperparameter lookahed; valid keys: lr, b1"):
        validate_config(c)
    c = grata.get_config("table2")
    c.variants.grata_con_beta.lr_shedule = "fixed"
    with pytest.raises(HParamError, match="grata: unknown hyperparameter lr_shedule"):
        validate_config(c)


def _flag_error_line(argv):
    """What ``experiments.main`` prints for ``argv``'s flag error, parsed in this process with fresh flags."""
    from absl import flags
    from ml_collections import config_flags
    from tta_jax.errors import describe_flag_error
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=["main", *argv])   # overrides are found in argv at definition
    try:
        values(["main", *argv])
    except Exception as e:   # the same exceptions parse_flags turns into its one line
        return f"error: {describe_flag_error(e, argv)}"
    return None


@pytest.mark.parametrize("name", ALL_METHODS)
def test_hyperparameter_typo_from_the_command_line(name):
    """Every method's typo on the command line: one line naming the method's valid keys."""
    argv = [f"--config={REPO / 'configs' / 'grata.py'}", f"--config.{name}.lookahed=1"]
    line = _flag_error_line(argv)
    assert line.startswith(f"error: {name}: unknown hyperparameter lookahed (--config.{name}.lookahed); "
                           "valid keys: "), line
    for key in hparams.valid_keys(method_spec(name).hparams):
        assert key in line


@pytest.mark.integration
def test_hyperparameter_typo_exits_with_one_line(tmp_path):
    """The process itself: exit status 1, the same line on stderr, no traceback (two kinds of section)."""
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "experiments.main", "--config=configs/grata.py", f"--config.{name}.lookahed=1",
         f"--workdir={tmp_path}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ("grata", "medbn")}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 1 and "Traceback" not in err, err
        argv = [f"--config={REPO / 'configs' / 'grata.py'}", f"--config.{name}.lookahed=1"]
        assert err.strip().splitlines()[-1] == _flag_error_line(argv), err


class UserSegmentor(nn.Module):
    """A user's own small segmentor with BatchNorm (not the ResUNet)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
        return nn.Conv(2, (1, 1))(x)


@pytest.fixture(scope="module")
def user_model():
    model = UserSegmentor()
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    images = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (3, 16, 16, 3)))
    masks = (images[..., :2] > 0.5).astype(np.uint8)
    return model, variables, images, masks


@pytest.mark.parametrize("name", ["no_adapt", "bn", "tent", "grata", "toy_shift"])
def test_adapt_stream_on_a_users_own_segmentor(user_model, name):
    model, variables, images, masks = user_model
    out = adapt_stream(name, model, variables, images, masks=masks)
    assert out.probabilities.shape == (3, 16, 16, 2) and out.probabilities.dtype == np.float32
    np.testing.assert_array_equal(out.predictions, out.probabilities > 0.5)
    # Dice recomputed by hand from the returned predictions
    inter = (out.predictions & masks.astype(bool)).sum(axis=(1, 2))
    dice = (2 * inter + 1e-6) / (out.predictions.sum(axis=(1, 2)) + masks.sum(axis=(1, 2)) + 1e-6) * 100
    np.testing.assert_allclose(out.dice, dice, rtol=1e-5)
    if name == "bn":   # test-image statistics by hand: the model in train mode, statistics discarded
        logits, _ = model.apply(variables, images[:1], train=True, mutable=["batch_stats"])
        np.testing.assert_allclose(out.probabilities[0], jax.nn.sigmoid(logits[0]), atol=1e-5)
        unscored = adapt_stream(name, model, variables, images)     # no masks: the same predictions, no Dice
        assert unscored.dice is None
        np.testing.assert_array_equal(unscored.probabilities, out.probabilities)


@pytest.mark.integration
def test_toy_method_end_to_end_through_the_experiment(tiny_experiment, tmp_path):
    """A method defined in this file runs through tta_jax.experiment.run with no other file touched."""
    from conftest import folders_config
    from tta_jax.experiment import run
    c = folders_config(*tiny_experiment, methods="bn,toy_shift")
    res = run(c, str(tmp_path / "w"))
    toy, bn = res["methods"]["toy_shift"], res["methods"]["bn"]
    assert toy["trace_count"] == 1
    assert toy["average"]["mean"] == pytest.approx(bn["average"]["mean"], abs=1e-9)   # same predictions
    with pytest.raises(HParamError, match="toy_shift.shift=-1.0 must be >= 0.0"):
        c.toy_shift.shift = -1.0
        run(c, str(tmp_path / "w2"))


def test_methods_read_alone():
    """No method module imports another method, the source stage or the experiment layer."""
    import ast
    methods_dir = REPO / "tta_jax" / "methods"
    shared = {"tta_jax.methods", "tta_jax.methods.base", "tta_jax.methods.common", "tta_jax.methods.adaptor_tuning"}
    forbidden = ("tta_jax.source", "tta_jax.experiment", "tta_jax.evaluate", "tta_jax.benchmark", "experiments")
    for path in sorted(methods_dir.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        own = ".".join(rel.parts[:3])          # tta_jax.methods.<method> (a module or a package)
        if own in shared or rel.name == "__init__" and rel.parent == methods_dir.relative_to(REPO):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                assert not name.startswith(forbidden), f"{rel} imports {name}"
                if name.startswith("tta_jax.methods.") and name not in shared:
                    assert name == own or name.startswith(own + "."), f"{rel} imports another method: {name}"
