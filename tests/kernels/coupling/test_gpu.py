"""The GPU backends on a real GPU against the NumPy reference; skipped, with the reason, without one.

Same draws and error metric as the CPU test (``law_check``), with NumPy inputs (copied through the
device) and with CuPy inputs (results stay on the device: CuPy arrays); and whole models trained with
every array on the device (``model.to_device()``) against the NumPy backend. Without a GPU the same
seam is proven on a fake device (``tests/test_device.py``).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from law_check import FUNCTIONS, assert_matches_reference, call, draw, kernel_laws

from nflow_np.flows.coupling_law import COUPLING_LAWS as REFERENCE
from nflow_np.packaging import kernel_module


def gpu_laws(module_name: str) -> dict:
    """The module's laws, or a skip saying what is missing (the package, or a GPU)."""
    try:
        module = importlib.import_module(module_name)
        module.require_device()
    except (ImportError, RuntimeError) as error:
        pytest.skip(f"{module_name} cannot run here: {error}")
    return kernel_laws(module.FUSED)


GPU_MODULES = [kernel_module("coupling.numba_cuda"), kernel_module("coupling.cupy_kernels")]
BACKENDS = pytest.mark.parametrize("module_name", GPU_MODULES)


@BACKENDS
@pytest.mark.parametrize("law", ["additive", "affine"])
@pytest.mark.parametrize("function", FUNCTIONS)
@settings(max_examples=20, deadline=None)
@given(
    n=st.sampled_from([1, 7, 8, 9, 63, 64, 65, 1000]),
    d2=st.sampled_from([1, 5, 31, 32, 33, 392]),
    dtype=st.sampled_from([np.float64, np.float32]),
    s_hat_scale=st.sampled_from([0.1, 1.0, 30.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_reference_on_the_gpu(module_name, law, function, n, d2, dtype, s_hat_scale, seed) -> None:
    laws = gpu_laws(module_name)
    inputs = draw(law, n, d2, dtype, np.random.default_rng(seed), s_hat_scale=s_hat_scale)
    assert_matches_reference(laws, REFERENCE, law, function, inputs)


@BACKENDS
def test_cupy_arrays_stay_on_the_device(module_name: str) -> None:
    laws = gpu_laws(module_name)
    cupy = pytest.importorskip("cupy", reason="device-array round trip needs CuPy")
    inputs = draw("affine", 100, 40, np.float32, np.random.default_rng(0))
    on_device = {k: None if v is None else cupy.asarray(v) for k, v in inputs.items()}
    for function in FUNCTIONS:
        got = call(laws["affine"], function, on_device)
        assert all(isinstance(g, cupy.ndarray) for g in got), function
        want = call(REFERENCE["affine"], function, inputs)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(cupy.asnumpy(g), w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


@pytest.mark.parametrize("backend_name", ["cupy", "numba-cuda"])
def test_whole_model_trains_on_the_device(backend_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """RealNVP and NICE with every array on the GPU (CuPy; cuBLAS GEMMs) train like the NumPy reference.

    The laws must take the CuPy arrays as they are: their host-copy paths are made to fail here.
    """
    cupy = pytest.importorskip("cupy", reason="the model on the device needs CuPy arrays")
    from nflow_np import backend
    from nflow_np.architectures import build_model
    from nflow_np.data.toy2d import make_two_moons
    from nflow_np.optim import Adam
    from nflow_np.train import fit

    if backend_name not in backend.available_backends():
        pytest.skip(f"backend {backend_name!r} cannot run here")
    module = importlib.import_module(backend._BUILT_IN[backend_name].kernel_modules[0])

    def no_host_copy(*args: object, **kwargs: object) -> None:
        raise AssertionError("a GPU law copied between host and device")

    if backend_name == "cupy":
        monkeypatch.setattr(module.cupy, "asnumpy", no_host_copy)
    else:
        monkeypatch.setattr(module.cuda, "to_device", no_host_copy)
    data = make_two_moons(1024, np.random.default_rng(0))
    for kind in ("realnvp", "nice"):
        histories, states = {}, {}
        for name in ("numpy", backend_name):
            with backend.using(name):
                model = build_model(kind, 2, layers=4, hidden=(32, 32), seed=0).to_device()
                assert model.array_module is (cupy if name != "numpy" else np)
                optimizer = Adam(model, lr=3e-3)
                result = fit(
                    model, data[:768], data[768:], optimizer=optimizer, epochs=2, batch_size=128, progress=False
                )
                if name != "numpy":
                    assert all(isinstance(p, cupy.ndarray) for _, p, _ in model.named_parameters())
                    assert all(isinstance(v, cupy.ndarray) for a in optimizer.state.values() for v in a.values())
            histories[name] = np.array([[h["train_nll"], h["val_nll"]] for h in result.history])
            states[name] = model.state_dict()
        np.testing.assert_allclose(histories[backend_name], histories["numpy"], rtol=1e-8)
        for key, value in states["numpy"].items():
            np.testing.assert_allclose(states[backend_name][key], value, rtol=1e-7, atol=1e-9, err_msg=key)
