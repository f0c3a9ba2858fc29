"""What ``pip install .`` installs: nflow_np and its siblings under names that shadow nothing; metadata; extras."""

from __future__ import annotations

import email
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nflow_np.packaging import kernel_module, sibling_package

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """A wheel built from a copy of the checkout (the build leaves nothing in the working tree)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for folder in ("nflow_np", "kernels", "benchmarks"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("nflow_np-*.whl")
    return zipfile.ZipFile(path)


def test_kernels_and_benchmarks_install_under_names_that_shadow_nothing(wheel: zipfile.ZipFile) -> None:
    top = {name.split("/")[0] for name in wheel.namelist()}
    dist_info = {name for name in top if name.endswith(".dist-info")}
    assert top - dist_info == {"nflow_np", "nflow_np_kernels", "nflow_np_benchmarks"}
    names = set(wheel.namelist())
    expected = {"nflow_np_kernels/coupling/numba_cpu.py", "nflow_np_kernels/coupling/cuda/coupling.cu",
                "nflow_np_kernels/adam/numba_cpu.py", "nflow_np_benchmarks/suite.py"}
    assert expected <= names
    in_the_checkout = {f"nflow_np_kernels/{path.relative_to(REPO / 'kernels').as_posix()}"
                       for path in (REPO / "kernels").rglob("*") if path.suffix in (".py", ".cu")}
    assert in_the_checkout <= names  # every kernel folder is a package of the wheel


def test_metadata_license_and_the_plots_extra(wheel: zipfile.ZipFile) -> None:
    (metadata_name,) = [name for name in wheel.namelist() if name.endswith(".dist-info/METADATA")]
    metadata = email.message_from_bytes(wheel.read(metadata_name))
    assert "MIT" in (metadata.get("License-Expression") or metadata.get("License") or "")
    assert metadata["Author"] or metadata["Author-email"]
    assert any(name.endswith("LICENSE") for name in wheel.namelist())
    requires = metadata.get_all("Requires-Dist")
    matplotlib = [line for line in requires if line.startswith("matplotlib")]
    assert matplotlib and all("extra ==" in line for line in matplotlib)  # never a hard dependency
    assert any('extra == "plots"' in line for line in matplotlib)


def test_one_import_name_per_checkout() -> None:
    """Installed here (editable): the installed names, and ``import kernels`` yields that same package."""
    here = _installed_from_here()
    expected = ("nflow_np_kernels", "nflow_np_benchmarks") if here else ("kernels", "benchmarks")
    assert (sibling_package("kernels"), sibling_package("benchmarks")) == expected
    assert kernel_module("coupling.numba_cpu") == f"{expected[0]}.coupling.numba_cpu"
    if here:
        import kernels

        assert kernels.__name__ == "nflow_np_kernels"


def _installed_from_here() -> bool:
    """Whether ``nflow_np_kernels`` is this checkout's ``kernels/`` (``pip install -e .`` of this folder)."""
    spec = importlib.util.find_spec("nflow_np_kernels")
    return spec is not None and spec.origin is not None and Path(spec.origin).resolve().parent == REPO / "kernels"


@pytest.mark.skipif(not _installed_from_here(), reason="needs pip install -e . of this checkout")
def test_a_kernel_cached_under_one_name_loads_in_a_process_that_uses_the_other(tmp_path: Path) -> None:
    """Numba's cache records the import name: kernels cached by a run of the bare checkout (``kernels``,
    as before ``pip install -e .``) load in an installed run from elsewhere (``nflow_np_kernels``), and back."""
    script = (
        "import sys\n{setup}"
        "import numpy as np, nflow_np\n"
        "from nflow_np.architectures import build_model\n"
        "from nflow_np.packaging import kernel_module\n"
        "nflow_np.set_backend('numba')\n"
        "model = build_model('realnvp', 2, layers=2, hidden=(4,), seed=0)\n"
        "print(kernel_module('coupling.numba_cpu'), model.log_prob(np.zeros((3, 2))).shape)\n"
    )
    bare = (  # the checkout on sys.path and the editable install's finder gone: nothing installed
        "sys.meta_path[:] = [finder for finder in sys.meta_path if 'editable' not in finder.__module__]\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
    )
    env = os.environ | {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    cached = {}
    for setup, name in [(bare, "kernels"), ("", "nflow_np_kernels"), (bare, "kernels")]:
        done = subprocess.run([sys.executable, "-c", script.format(setup=setup)], capture_output=True, text=True,
                              timeout=600, cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [f"{name}.coupling.numba_cpu", "(3,)"]
        written = {path: path.stat().st_mtime_ns for path in (tmp_path / "cache").rglob("*.nbc")}
        assert written and written == (cached or written)  # the later runs compiled nothing: they read the cache
        cached = written


def test_a_plot_without_matplotlib_is_one_line_before_training(tmp_path: Path) -> None:
    script = "import sys; sys.modules['matplotlib'] = None; from nflow_np.cli import main; sys.exit(main(sys.argv[1:]))"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, "train", "--epochs", "1", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "needs matplotlib: pip install 'nflow_np[plots]', or pass --no-plots" in done.stderr
    assert "nflow: backend" not in done.stdout  # refused before the run started
