"""Shared fixtures: a tiny ResUNet, and the real data folder (skipped when absent)."""
from pathlib import Path

import jax
import pytest

from tta_jax.models import ResUNet, init_variables

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """A session-local persistent compilation cache: tests that jit the same computation
    (the same GraTa or TENT step through different wrappers) compile it once per run."""
    import tempfile
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
