"""``kernels.bias_activation.numba_cpu`` equals the NumPy reference ``nflow_np.nn.bias_activation``.

Hypothesis draws shapes (1 row, 1 column, odd widths across the SIMD widths), dtypes, value
ranges and the leaky slope; ``relu`` and ``leaky_relu`` must give the reference's bits for the
output and ``∂L/∂u``, ``tanh`` its output within the vecmath bound (3 ulp of ``np.tanh``) and the
reference's bits for ``∂L/∂u`` from the same output; the bias gradients agree to rounding (the
column sums' order can differ). Also NaN propagation,
non-contiguous gradients, refused arguments, and the ``Dense`` layer on the numba backend.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba", reason="the numba backend needs `pip install numba`")

from kernels.bias_activation import numba_cpu
from nflow_np import backend
from nflow_np.nn import MLP, bias_activation

SETTINGS = settings(max_examples=40, deadline=None)
shapes = st.tuples(st.integers(1, 9), st.sampled_from([1, 3, 7, 8, 16, 17, 33, 64, 65]))


def _draw(seed: int, shape: tuple[int, int], dtype: type, magnitude: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "y": (magnitude * rng.standard_normal(shape)).astype(dtype),
        "b": (magnitude * rng.standard_normal(shape[1])).astype(dtype),
        "d_out": rng.standard_normal(shape).astype(dtype),
        "d_b": rng.standard_normal(shape[1]).astype(dtype),
    }


def assert_column_sums_close(got: np.ndarray, want: np.ndarray, d_u: np.ndarray) -> None:
    """The bias gradients agree to rounding: NumPy sums a column pairwise when it is the contiguous axis
    (one column) and row by row otherwise, the kernel always row by row; each order is within
    ``N·eps·Σ_n |d_u[n]|`` of the exact sum, so the two within twice that (plus the ``d_b`` they start from)."""
    n, eps = d_u.shape[0], np.finfo(d_u.dtype).eps
    bound = 2 * (n + 1) * eps * (np.abs(d_u).sum(axis=0) + np.abs(want))
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)


@SETTINGS
@given(
    shape=shapes,
    dtype=st.sampled_from([np.float32, np.float64]),
    activation=st.sampled_from(["relu", "leaky_relu"]),
    slope=st.sampled_from([0.0, 0.01, 0.3]),
    magnitude=st.sampled_from([1e-30, 1.0, 1e30]),
    seed=st.integers(0, 2**32 - 1),
)
def test_piecewise_linear_activations_give_the_reference_bits(
    shape: tuple[int, int], dtype: type, activation: str, slope: float, magnitude: float, seed: int
) -> None:
    a, b = _draw(seed, shape, dtype, magnitude), _draw(seed, shape, dtype, magnitude)
    bias_activation.forward(a["y"], a["b"], activation, slope)
    numba_cpu.forward(b["y"], b["b"], activation, slope)
    np.testing.assert_array_equal(b["y"], a["y"], strict=True)
    want = bias_activation.backward(a["d_out"], a["y"], activation, slope, a["d_b"])
    got = numba_cpu.backward(b["d_out"], b["y"], activation, slope, b["d_b"])
    np.testing.assert_array_equal(got, want, strict=True)
    assert_column_sums_close(b["d_b"], a["d_b"], want)


@SETTINGS
@given(
    shape=shapes,
    dtype=st.sampled_from([np.float32, np.float64]),
    magnitude=st.sampled_from([1e-3, 1.0, 30.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_tanh_within_the_vecmath_bound(shape: tuple[int, int], dtype: type, magnitude: float, seed: int) -> None:
    a, b = _draw(seed, shape, dtype, magnitude), _draw(seed, shape, dtype, magnitude)
    bias_activation.forward(a["y"], a["b"], "tanh", 0.0)
    numba_cpu.forward(b["y"], b["b"], "tanh", 0.0)
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(b["y"], a["y"], rtol=3 * eps, atol=np.finfo(dtype).tiny)
    # backward on the same cached output: then the arithmetic is the reference's, so the bits too
    want = bias_activation.backward(a["d_out"], a["y"], "tanh", 0.0, a["d_b"])
    got = numba_cpu.backward(b["d_out"], a["y"], "tanh", 0.0, b["d_b"])
    np.testing.assert_array_equal(got, want, strict=True)
    assert_column_sums_close(b["d_b"], a["d_b"], want)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh"])
def test_nan_propagates_like_numpy(activation: str) -> None:
    y = np.array([[np.nan, -1.0, 2.0, np.inf, -np.inf]])
    reference, kernel = y.copy(), y.copy()
    b = np.zeros(5)
    bias_activation.forward(reference, b, activation, 0.01)
    numba_cpu.forward(kernel, b, activation, 0.01)
    np.testing.assert_array_equal(kernel, reference)
    assert np.isnan(kernel[0, 0])


def test_non_contiguous_gradient_is_accepted() -> None:
    rng = np.random.default_rng(0)
    out = np.maximum(rng.standard_normal((5, 4)), 0)
    d_out = rng.standard_normal((4, 5)).T  # Fortran order
    d_b_reference, d_b_kernel = np.zeros(4), np.zeros(4)
    want = bias_activation.backward(d_out, out, "relu", 0.0, d_b_reference)
    got = numba_cpu.backward(d_out, out, "relu", 0.0, d_b_kernel)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(d_b_kernel, d_b_reference)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: numba_cpu.forward(np.zeros((2, 3)), np.zeros(4), "relu", 0.0), r"b must be an array of shape \(3,\)"),
        (lambda: numba_cpu.forward(np.zeros((2, 3)), np.zeros(3, np.float32), "relu", 0.0), "dtype float64"),
        (lambda: numba_cpu.forward(np.zeros((2, 3)), np.zeros(3), "gelu", 0.0), "unknown activation 'gelu'"),
        (lambda: numba_cpu.forward(np.zeros(3), np.zeros(3), "relu", 0.0), "2-d float32/float64"),
        (lambda: numba_cpu.forward(np.zeros((3, 2)).T, np.zeros(3), "relu", 0.0), "y must be C-contiguous"),
        (
            lambda: numba_cpu.backward(np.zeros((2, 3)), np.zeros((2, 3)), "relu", 0.0, np.zeros(2)),
            r"d_b must be an array of shape \(3,\)",
        ),
    ],
)
def test_bad_arguments_are_refused(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mlp_on_the_numba_backend_matches_numpy(activation: str, dtype: type) -> None:
    """The MLP picks the fused kernels on the numba backend; output and every gradient agree."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 5)).astype(dtype)
    d_y = rng.standard_normal((16, 4)).astype(dtype)
    results = {}
    for name in ("numpy", "numba"):
        with backend.using(name):
            assert (backend.fused("bias_activation", bias_activation.forward) is numba_cpu.forward) == (name == "numba")
            net = MLP([5, 8, 8, 4], np.random.default_rng(0), activation=activation, dtype=dtype, zero_last=False)
            y = net.forward(x)
            d_x = net.backward(d_y)
            grads = [grad.copy() for _, _, grad in net.named_parameters()]
            results[name] = (y, d_x, *grads)
    tolerance = 1e-5 if dtype == np.float32 else 1e-13  # tanh differs by ulps; relu/leaky are exact
    assert len(results["numpy"]) == 2 + 6
    for want, got in zip(results["numpy"], results["numba"], strict=True):
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
