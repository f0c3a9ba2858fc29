"""Accuracy of ``kernels.common.vecmath``'s vectorisable exp and tanh, in ulps, over the whole input range.

The ulp distance of two floats is the number of representable floats between them (their bit
patterns as sign-magnitude integers subtracted). Bounds, measured (docs/kernels.md#exp-and-tanh)
and asserted here:

=========  ===================  ===============================================
function   vs NumPy (max ulp)   vs the correctly rounded value (max ulp)
=========  ===================  ===============================================
exp f64    1                    1  (mpmath, 60k points)
tanh f64   3                    2  (mpmath, 60k points)
exp f32    3                    1  (float64 result rounded to float32)
tanh f32   3                    2  (float64 result rounded to float32)
=========  ===================  ===============================================

NumPy itself is not correctly rounded (its float32 SIMD exp and tanh are off by up to 2 and 1 ulp),
which is why the two columns differ.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba", reason="kernels.common.vecmath needs `pip install numba`")

from kernels.common.vecmath import exp_array, tanh_array

BOUNDS_VS_NUMPY = {("exp", np.float64): 1, ("tanh", np.float64): 3, ("exp", np.float32): 3, ("tanh", np.float32): 3}
BOUNDS_VS_TRUTH = {("exp", np.float64): 1, ("tanh", np.float64): 2, ("exp", np.float32): 1, ("tanh", np.float32): 2}
OURS = {"exp": exp_array, "tanh": tanh_array}
NUMPY = {"exp": np.exp, "tanh": np.tanh}
# exp: past both ends of the float range (overflow to inf, subnormal results, underflow to 0);
# tanh: past saturation (|x| ≈ 19 in float64, 9 in float32)
RANGES = {
    ("exp", np.float64): (-750.0, 712.0),
    ("exp", np.float32): (-106.0, 90.0),
    ("tanh", np.float64): (-25.0, 25.0),
    ("tanh", np.float32): (-12.0, 12.0),
}
CASES = list(BOUNDS_VS_NUMPY)
IDS = [f"{name}-{np.dtype(dtype).name}" for name, dtype in CASES]


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Number of floats between ``a`` and ``b`` elementwise (0 for equal values, also for ±0)."""
    signed = np.int64 if a.dtype == np.float64 else np.int32
    bits = a.dtype.itemsize * 8 - 1

    def ordered(x: np.ndarray) -> np.ndarray:
        i = x.view(signed).astype(np.int64)
        return np.where(i < 0, -(i & ((1 << bits) - 1)), i)

    return np.abs(ordered(a) - ordered(b))


def inputs(name: str, dtype: type) -> np.ndarray:
    low, high = RANGES[name, dtype]
    rng = np.random.default_rng(0)
    tiny = rng.uniform(-1, 1, 200_000) * 10.0 ** rng.uniform(-30, 0, 200_000)  # near 0, where tanh(x) ≈ x
    return np.concatenate([np.linspace(low, high, 1_000_001), tiny]).astype(dtype)


@pytest.mark.parametrize(("name", "dtype"), CASES, ids=IDS)
def test_ulp_error_against_numpy(name: str, dtype: type) -> None:
    x = inputs(name, dtype)
    with np.errstate(over="ignore"):
        errors = ulp_distance(OURS[name](x), NUMPY[name](x))
    worst = int(errors.max())
    print(f"{name} {np.dtype(dtype).name}: max {worst} ulp vs NumPy at x = {x[errors.argmax()]!r}")
    assert worst <= BOUNDS_VS_NUMPY[name, dtype]


@pytest.mark.parametrize(("name", "dtype"), [("exp", np.float32), ("tanh", np.float32)], ids=["exp-f32", "tanh-f32"])
def test_float32_ulp_error_against_correct_rounding(name: str, dtype: type) -> None:
    """float64 NumPy rounded to float32 is the correctly rounded result (double rounding aside)."""
    x = inputs(name, dtype)
    with np.errstate(over="ignore"):
        truth = NUMPY[name](x.astype(np.float64)).astype(np.float32)
    assert int(ulp_distance(OURS[name](x), truth).max()) <= BOUNDS_VS_TRUTH[name, dtype]


@pytest.mark.parametrize("name", ["exp", "tanh"])
def test_float64_ulp_error_against_mpmath(name: str) -> None:
    mpmath = pytest.importorskip("mpmath", reason="the correctly rounded float64 reference needs mpmath")
    mpmath.mp.prec = 120
    low, high = RANGES[name, np.float64]
    x = np.concatenate([np.linspace(max(low, -745.0), min(high, 709.7), 4001), np.linspace(-1.2, 1.2, 2001)])
    function = mpmath.exp if name == "exp" else mpmath.tanh
    truth = np.array([float(function(mpmath.mpf(float(v)))) for v in x])
    assert int(ulp_distance(OURS[name](x), truth).max()) <= BOUNDS_VS_TRUTH[name, np.float64]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_special_values(dtype: type) -> None:
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], dtype=dtype)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(exp_array(x), np.exp(x))
        np.testing.assert_array_equal(tanh_array(x), np.tanh(x))
    assert np.signbit(tanh_array(x)[4]), "tanh(-0.0) is -0.0"
    info = np.finfo(dtype)
    edges = np.array(
        [np.log(info.max), np.nextafter(np.log(info.max), dtype(0)), np.log(info.smallest_subnormal)], dtype=dtype
    )
    with np.errstate(over="ignore"):
        assert int(ulp_distance(exp_array(edges), np.exp(edges)).max()) <= BOUNDS_VS_NUMPY["exp", dtype]
