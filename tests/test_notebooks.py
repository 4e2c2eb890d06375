"""The notebooks under notebooks/ execute top to bottom at their small sizes (TTA_NOTEBOOK_SMALL=1).

Each notebook runs in a fresh Jupyter kernel started with this interpreter
(``sys.executable``, i.e. the venv that runs the tests), through a kernel spec
written for the test: a user's own ``python3`` kernel spec could point at
another Python. A cell that raises fails the test with the cell's traceback.
The kernel inherits this process's environment (conftest's XLA flags) plus
the small switch, a cache folder of this test session and a temporary folder
of this test (the notebooks write their data and results under ``tempfile``).
"""
import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (installed with nbclient)
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
# Each notebook is a whole program in its own kernel: they run in the integration tier, the second
# test command of the README and of CI, which keeps the fast tier within its time.
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="session")
def venv_kernel(tmp_path_factory):
    """(kernel spec manager, name) of a kernel that runs ``sys.executable``."""
    kernels = tmp_path_factory.mktemp("kernels")
    spec = kernels / "tta_jax_test"
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tta-jax tests", "language": "python"}))
    return KernelSpecManager(kernel_dirs=[str(kernels)]), "tta_jax_test"


@pytest.fixture(scope="session")
def notebook_cache(tmp_path_factory):
    """Source models and XLA cache shared by the notebooks of this worker, never ~/.cache."""
    return tmp_path_factory.mktemp("notebook_cache")


def test_every_notebook_is_committed_without_outputs():
    assert len(NAMES) == 4, NAMES
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not dirty, f"{name}: cells {dirty} carry outputs; strip them before committing"
        first_md = next(c for c in nb.cells if c.cell_type == "markdown").source
        assert f"colab.research.google.com/github/<owner>/tta-jax/blob/main/notebooks/{name}" in first_md


@pytest.mark.integration
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, venv_kernel, notebook_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("TTA_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("TTA_NOTEBOOK_CACHE_DIR", str(notebook_cache))
    monkeypatch.setenv("TMPDIR", str(tmp_path))     # the notebooks' example data and workdirs
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    ksm, kernel_name = venv_kernel
    km = KernelManager(kernel_name=kernel_name, kernel_spec_manager=ksm)
    client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.perf_counter()
    client.execute()   # raises CellExecutionError (with the traceback) when a cell fails
    seconds = time.perf_counter() - start
    print(f"{name}: executed in {seconds:.1f} s")
    setup = "".join(o.get("text", "") for o in nb.cells[1].outputs if o.get("output_type") == "stream")
    assert "devices:" in setup and "sizes: small" in setup
