"""The GPU backends on a real GPU against the NumPy reference; skipped, with the reason, without one.

Same draws and error metric as the CPU test (``law_check``), with NumPy inputs (copied through the
device) and with CuPy inputs (results stay on the device: CuPy arrays).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from law_check import FUNCTIONS, assert_matches_reference, call, draw

from nflow_np.flows.coupling_law import COUPLING_LAWS as REFERENCE


def gpu_laws(module_name: str) -> dict:
    """The module's laws, or a skip saying what is missing (the package, or a GPU)."""
    try:
        module = importlib.import_module(module_name)
        module.require_device()
    except (ImportError, RuntimeError) as error:
        pytest.skip(f"{module_name} cannot run here: {error}")
    return module.COUPLING_LAWS


BACKENDS = pytest.mark.parametrize("module_name", ["kernels.numba_cuda", "kernels.cupy_kernels"])


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
def test_matches_reference_on_the_gpu(module_name, law, function, n, d2, dtype, s_hat_scale, seed) -> None:  # noqa: ANN001
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
