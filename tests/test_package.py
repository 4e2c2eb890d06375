"""The package builds and works installed, away from the clone (pyproject.toml)."""
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO


@pytest.mark.integration
def test_wheel_installs_and_imports_outside_the_clone(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in the venv")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("tta_jax-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "tta_jax/methods/grata.py" in names and not any(n.startswith(("tests/", "configs/")) for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    pins = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines() if line.strip()]
    assert all(f"Requires-Dist: {pin}" in metadata for pin in pins)
    assert 'extra == "torch"' in metadata and 'extra == "dev"' in metadata
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    code = ("import tta_jax, sys; from pathlib import Path; "
            "assert Path(tta_jax.__file__).parent.parent == Path(sys.argv[1]), tta_jax.__file__; "
            "print(','.join(tta_jax.available_methods()))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], cwd=tmp_path, check=True,
                         capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path / "site"),
                                                              "JAX_PLATFORMS": "cpu"})
    from tta_jax.methods import available_methods
    assert out.stdout.strip().split(",") == [m for m in available_methods() if m != "toy_shift"]
