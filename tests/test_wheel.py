"""A normal install: the project built as a wheel and installed into a clean virtualenv (the dependencies
lent from this one, shoal itself only from the wheel) runs the default format quantized on shoal's C kernels,
built from the sources the wheel carries; without a C compiler it falls back to torch, saying so once."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from tiny_models import make_tiny_hf_model, write_gguf

REPO = Path(__file__).resolve().parent.parent
SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
import shoal
assert shoal.__file__.startswith(sys.argv[2]), shoal.__file__  # this copy, from the wheel
model = shoal.load_model(sys.argv[1])
print("BACKEND", model.backend.name)
print("WEIGHTS", model.describe_weights())
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the clean virtualenv's python, its site-packages) with shoal installed from a freshly built wheel."""
    root = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", REPO], check=True
    )
    (wheel,) = (root / "dist").glob("shoal-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {"shoal/kernels/gemm.c", "shoal/kernels/experts.c", "shoal/kernels/kernels.h"}
    assert shipped | {"shoal/models/templates/gemma.jinja"} <= set(names)  # kernels' sources, chat templates
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], check=True)
    python = root / "venv" / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    (site / "lent_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)
    return python, site


def run(installed, model: str, tmp_path: Path, **env: str) -> str:
    python, site = installed
    environment = {"PATH": "/usr/bin:/bin", "SHOAL_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    done = subprocess.run(
        [python, "-c", SCRIPT, model, str(site)], cwd=tmp_path, capture_output=True, text=True,
        env={**environment, **env}, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("q8")
    return write_gguf(make_tiny_hf_model("llama", root / "hf"), root / "tiny.Q8_0.gguf", "Q8_0")


def test_the_wheel_runs_quantized_weights_on_the_c_kernels(installed, q8_file, tmp_path):
    out = run(installed, q8_file, tmp_path)
    assert "BACKEND c-" in out, out
    assert "q8 x" in out and "float32" not in out.split("WEIGHTS", 1)[1], out
    assert list((tmp_path / "cache").glob("shoal-kernels-*.so"))  # built here, from the wheel's sources


def test_without_a_compiler_it_falls_back_and_says_so_once(installed, q8_file, tmp_path):
    out = run(installed, q8_file, tmp_path, CC="no-such-compiler")
    assert "BACKEND torch" in out, out
    assert out.count("no C compiler found") == 1, out
