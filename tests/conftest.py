"""Shared fixtures: a tiny ResUNet, and the real data folder (skipped when absent)."""
import os
from pathlib import Path

# The tests jit many small programs once each, so XLA's compile time, not their run time,
# is what the fast tier waits for; LLVM's optimisation passes are most of that compile time
# and buy nothing at these sizes. Set before JAX creates its CPU backend (subprocesses
# started by the tests inherit it). A level set by the caller is kept.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                               " --xla_llvm_disable_expensive_passes=true").strip()

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from tta_jax.models import ResUNet, init_variables
from tta_jax.models.resunet import NoiseContrastiveHead

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """A persistent compilation cache for this test run: tests that jit the same computation
    (the same step through different wrappers, the same source model in another run) compile
    it once. pytest-xdist workers share it (one folder per run, keyed by the controller's id)."""
    import tempfile
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")
    if run_id:
        cache = Path(tempfile.gettempdir()) / f"tta_jax_test_xla_{run_id}"
        cache.mkdir(exist_ok=True)
    else:
        cache = Path(tempfile.mkdtemp(prefix="tta_jax_test_xla_"))
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (it lives beside the repo, never inside it)")
    return path


@pytest.fixture(scope="session")
def tiny_model():
    return ResUNet(backbone="resnet18", num_classes=2, width=0.125)


@pytest.fixture(scope="session")
def tiny_variables(tiny_model):
    return jax.device_get(init_variables(tiny_model, jax.random.PRNGKey(0), 32))


class MicroSegmentor(nn.Module):
    """A small segmentor that follows the ResUNet's protocol (``train``, ``return_aux``,
    ``return_features``, ``bottleneck_dropout``) and module names (``conv1``/``bn1`` stem,
    ``layer1_0`` bottleneck, ``up1`` decoder block with ``bn``, ``bnout``, ``seg_head``).

    For tests whose subject is a method or the runner, not the network: it compiles in a
    fraction of the ResUNet's time, and the methods only rely on the protocol.
    """

    num_classes: int = 2
    aux_heads: tuple = ()
    sr_factor: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False, return_aux: bool = False, return_features: bool = False,
                 bottleneck_dropout: float = 0.0):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)
        skip = nn.relu(bn("bn1")(nn.Conv(8, (3, 3), use_bias=False, name="conv1")(x)))
        h = nn.max_pool(skip, (2, 2), (2, 2))
        h = _MicroBlock(16, name="layer1_0")(h, train)
        if bottleneck_dropout > 0:
            h = nn.Dropout(bottleneck_dropout, deterministic=False)(h)
        encoded = h
        up = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = _MicroUp(8, name="up1")(up, skip, train)
        features = nn.relu(bn("bnout")(nn.Conv(8, (1, 1), name="up5")(h)))
        logits = nn.Conv(self.num_classes, (1, 1), name="seg_head")(features)
        outputs = (logits,)
        if return_aux:
            aux = {}
            if "blind_spot" in self.aux_heads:   # DeTTA's denoising decoder, from the encoder's output
                up2 = jnp.repeat(jnp.repeat(encoded, 2, axis=1), 2, axis=2)
                y = nn.relu(nn.Conv(8, (3, 3), name="conv")(up2))
                aux["blind_spot"] = nn.Conv(3, (1, 1), name="blindspot_head")(
                    nn.BatchNorm(use_running_average=not train, name="blindspot1")(y))
            if "noise_contrastive" in self.aux_heads:   # NC-TTT's head, on layer1's output as in the ResUNet
                aux["noise_contrastive"] = NoiseContrastiveHead(name="nc_head")(encoded, train)
            outputs += (aux,)
        if return_features:
            outputs += (features,)
        return outputs[0] if len(outputs) == 1 else outputs


class _MicroBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train):
        y = nn.Conv(self.features, (3, 3), use_bias=False, name="conv1")(x)
        return nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(y))


class _MicroUp(nn.Module):
    features: int

    @nn.compact
    def __call__(self, up, skip, train):
        x = nn.relu(nn.Conv(self.features, (3, 3), name="x_conv")(jnp.concatenate([up, skip], -1)))
        return nn.BatchNorm(use_running_average=not train, name="bn")(x)


@pytest.fixture(scope="session")
def micro_model():
    return MicroSegmentor()


@pytest.fixture(scope="session")
def micro_variables(micro_model):
    return jax.device_get(jax.jit(lambda k: micro_model.init(k, jnp.zeros((1, 32, 32, 3))))(jax.random.PRNGKey(0)))


def _write_folders_domain(root, name, images, masks):
    from PIL import Image
    for i, (image, mask) in enumerate(zip(images, masks)):
        for sub, array in (("images", image), ("masks", mask)):
            (root / name / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / name / sub / f"im{i}.png")


def folders_config(root, cache, methods="no_adapt,bn"):
    """A config for the tiny two-centre ``folders`` dataset of :func:`tiny_experiment` (S → T, 32²)."""
    from configs import common
    c = common.method_config(methods, None)
    c.dataset, c.data_dir, c.source_domain, c.target_domains = "folders", str(root), "S", "T"
    c.image_size, c.model.width, c.source.steps, c.seeds, c.plots = 32, 0.125, 10, 1, False
    c.worst_fraction, c.cache_dir = 0.0, str(cache)
    return c


@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory):
    """(data root, cache dir) of a tiny two-centre folders dataset and a cache holding its trained
    source model. pytest-xdist workers share both (one folder per test run): the first worker
    writes the data and trains the model under a file lock; the others find them."""
    import fcntl
    import tempfile
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id:
        base = Path(tempfile.gettempdir()) / f"tta_jax_test_tiny_{run_id}"
        base.mkdir(exist_ok=True)
    else:
        base = tmp_path_factory.mktemp("tiny")
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / "ready").exists():
            _make_tiny_experiment(base / "data", base / "cache")
            (base / "ready").write_text("")
    return base / "data", base / "cache"


def _make_tiny_experiment(root, cache):
    import numpy as np
    from tta_jax.experiment import run
    rng = np.random.default_rng(6)
    for dom, shift in (("S", 0), ("T", 60)):
        images, masks = [], []
        for _ in range(5):
            image = np.clip(rng.normal(100 + shift, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            mask = np.zeros((32, 32), bool)
            top = int(rng.integers(4, 12))
            mask[top:top + 12, top:top + 12] = True
            image[mask] = 220 - shift
            images.append(image)
            masks.append(mask.astype(np.uint8) * 255)
        _write_folders_domain(root, dom, images, masks)
    config = folders_config(root, cache)
    config.mode = "source"
    run(config, str(cache.parent / "source_run"))     # trains and caches the source model
