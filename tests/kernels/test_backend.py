"""Backend choice (``nflow_np.backend``) and whole layers/models on the numba backend vs NumPy.

Every test that switches the backend restores it (the :func:`use` context manager), so the rest
of the suite runs on the default.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import randomise

from nflow_np import AdditiveCoupling, AffineCoupling, backend
from nflow_np.architectures import build_model
from nflow_np.data.toy2d import make_two_moons
from nflow_np.flows.coupling_law import COUPLING_LAWS
from nflow_np.packaging import kernel_module
from nflow_np.train import fit

REPO = Path(__file__).resolve().parents[2]
has_numba = pytest.mark.skipif(
    __import__("importlib").util.find_spec("numba") is None, reason="the numba backend needs `pip install numba`"
)


use = backend.using


def test_reference_backend_uses_the_reference_laws(reference_backend: None) -> None:
    assert backend.get_backend() == "numpy"
    assert backend.coupling_law("affine") is COUPLING_LAWS["affine"]


def test_default_is_the_fastest_available_resolved_on_first_use() -> None:
    """No NFLOW_BACKEND: importing nflow_np imports no kernel module; the first use picks "auto"."""
    code = (
        "import sys, nflow_np\n"
        "from nflow_np.packaging import kernel_module\n"
        "print(kernel_module('coupling.numba_cpu') in sys.modules)\n"
        "print(nflow_np.get_backend())\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "NFLOW_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    imported_at_import, chosen = out.stdout.split()
    assert imported_at_import == "False"
    assert chosen == ("numba" if importlib.util.find_spec("numba") is not None else "numpy")


def test_unknown_backend_and_law_are_errors() -> None:
    before = backend.get_backend()
    with pytest.raises(ValueError, match="unknown backend 'torch'"):
        backend.set_backend("torch")
    with pytest.raises(ValueError, match="unknown coupling law 'spline'"):
        backend.coupling_law("spline")
    assert backend.get_backend() == before


def test_unavailable_backend_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    before = backend.get_backend()
    missing = dataclasses.replace(backend._BUILT_IN["cupy"], kernel_modules=(kernel_module("not_installed_here"),))
    monkeypatch.setitem(backend._BUILT_IN, "cupy", missing)
    with pytest.raises(backend.BackendUnavailableError, match="pip install cupy-cuda12x"):
        backend.set_backend("cupy")
    assert backend.get_backend() == before
    assert "cupy" not in backend.available_backends()


def test_auto_picks_numba_when_it_imports() -> None:
    expected = "numba" if "numba" in backend.available_backends() else "numpy"
    with use("auto"):
        assert backend.get_backend() == expected


@has_numba
def test_environment_variable_selects_the_backend() -> None:
    code = "import nflow_np; print(nflow_np.get_backend())"
    env = {**os.environ, "NFLOW_BACKEND": "numba"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "numba"


def _layer_pass(layer: object, x: np.ndarray, direction: str, rng_seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rng_seed)
    layer.zero_grad()
    out, logdet = layer.forward(x) if direction == "forward" else layer.inverse(x)
    d_out, d_logdet = rng.standard_normal(out.shape).astype(x.dtype), rng.standard_normal(x.shape[0]).astype(x.dtype)
    d_in = layer.backward(d_out, d_logdet)
    results = {"out": out, "logdet": logdet, "d_in": d_in}
    results.update({f"grad {name}": grad.copy() for name, _, grad in layer.named_parameters()})
    return results


@has_numba
@pytest.mark.parametrize("coupling", [AffineCoupling, AdditiveCoupling])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_layer_matches_numpy_backend(coupling: type, direction: str, dtype: type) -> None:
    """Outputs, log-dets, input gradients and every parameter gradient of a whole coupling layer."""
    rng = np.random.default_rng(0)
    layer = randomise(coupling(7, parity=1, hidden=(16,), rng=rng, dtype=dtype), rng)
    x = rng.standard_normal((33, 7)).astype(dtype)
    reference = _layer_pass(layer, x, direction, 1)
    with use("numba"):
        kernel = _layer_pass(layer, x, direction, 1)
    tolerance = 1e-12 if dtype == np.float64 else 1e-5
    for name, want in reference.items():
        got = kernel[name]
        assert got.dtype == want.dtype, name
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * np.abs(want).max(), err_msg=name)


@has_numba
def test_training_gives_the_same_nll_trajectory() -> None:
    """A few epochs of RealNVP on two moons: the per-epoch NLLs agree to float64 rounding."""
    data = make_two_moons(1024, np.random.default_rng(0))
    trajectories = {}
    for name in ("numpy", "numba"):
        model = build_model("realnvp", 2, layers=4, hidden=(32, 32), seed=0)
        with use(name):
            result = fit(model, data[:768], data[768:], epochs=3, batch_size=128, seed=0, progress=False)
        trajectories[name] = np.array([[h["train_nll"], h["val_nll"]] for h in result.history])
    np.testing.assert_allclose(trajectories["numba"], trajectories["numpy"], rtol=1e-10)


def test_array_module_is_numpy_on_the_cpu_backends() -> None:
    assert backend.array_module() is np
    if "numba" in backend.available_backends():
        with use("numba"):
            assert backend.array_module() is np


def test_array_module_of_an_array_never_imports_cupy() -> None:
    """NumPy arrays, scalars and lists are NumPy's; asking costs no import of CuPy (``sys.modules`` unchanged)."""
    code = (
        "import sys, numpy as np; from nflow_np import backend; "
        "assert all(backend.array_module(a) is np for a in (np.zeros(2), np.float32(1), [1.0], 2.0)); "
        "assert backend.to_host([1.0, 2.0]).tolist() == [1.0, 2.0]; print('cupy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_gpu_backends_name_cupy_as_their_array_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CuPy installed (e.g. numba-cuda under the simulator) the model stays NumPy and the laws copy."""
    monkeypatch.setattr(backend, "_active", "numba-cuda")
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: None)
    assert backend.array_module() is np


def test_built_in_backends_cannot_be_registered_again() -> None:
    with pytest.raises(ValueError, match="built-in backend"):
        backend.register_backend("cupy", COUPLING_LAWS, np)


def test_a_model_on_the_cpu_backends_stays_numpy() -> None:
    model = build_model("realnvp", 2, layers=2, hidden=(4,), seed=0)
    assert model.to_device() is model and model.array_module is np
    assert all(type(p) is np.ndarray for _, p, _ in model.named_parameters())


def test_importing_the_package_and_every_kernel_module_leaves_the_environment_unchanged() -> None:
    """Issue 17: nothing sets an environment variable at import (e.g. ``OMP_WAIT_POLICY``)."""
    code = (
        "import importlib, os, pkgutil\n"
        "before = dict(os.environ)\n"
        "import nflow_np\n"
        "from nflow_np.packaging import kernel_module\n"
        "package = importlib.import_module(kernel_module('coupling')).__name__.rpartition('.')[0]\n"
        "folders = importlib.import_module(package).__path__\n"
        "names = sorted(m.name for m in pkgutil.walk_packages(folders, package + '.') if not m.ispkg)\n"
        "names = [name[len(package) + 1:] for name in names]\n"
        "imported = []\n"
        "for name in names:\n"
        "    try:\n"
        "        importlib.import_module(kernel_module(name))\n"
        "    except (ImportError, RuntimeError):\n"
        "        continue\n"
        "    imported.append(name)\n"
        "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))\n"
        "print(' '.join(imported)); print(changed)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    imported, changed = out.stdout.splitlines()
    assert "coupling.validation" in imported.split()
    if importlib.util.find_spec("numba") is not None:
        numba_modules = {"coupling.numba_cpu", "bias_activation.numba_cpu", "adam.numba_cpu", "conv.numba_cpu",
                         "common.vecmath"}
        assert numba_modules <= set(imported.split())
    assert changed == "[]"
