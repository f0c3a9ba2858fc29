"""``kernels.coupling.numba_cpu`` equals the NumPy reference ``nflow_np.flows.coupling_law``.

Hypothesis draws shapes (1 row, 1 column, odd sizes across the SIMD widths), dtypes, memory
layouts (column views like the coupling layer's ``x[:, ::2]``, Fortran order) and value ranges
(``tanh`` saturated, large and tiny ``x``); the error metric and bounds are in ``law_check``.
Inputs this small run on the calling thread (below ``PARALLEL_MIN_ELEMENTS``), so the ``prange``
kernels are tested separately, forced with :func:`always_parallel`. Also: rejected arguments,
``inf``/NaN behaviour, and bit-for-bit equality of serial, parallel and one-thread runs.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from law_check import FUNCTIONS, assert_matches_reference, bound, call, draw, kernel_laws, magnitudes

numba = pytest.importorskip("numba", reason="the numba backend needs `pip install numba`")

from kernels.coupling import numba_cpu  # noqa: E402 (after the skip)
from nflow_np.flows.coupling_law import COUPLING_LAWS as REFERENCE  # noqa: E402

KERNEL = kernel_laws(numba_cpu.FUSED)
SETTINGS = settings(max_examples=30, deadline=None)
dtypes = st.sampled_from([np.float64, np.float32])
layouts = st.sampled_from(["C", "columns", "F"])


def relayout(array: np.ndarray | None, layout: str) -> np.ndarray | None:
    """The same values in another memory layout (a view with strides, or Fortran order)."""
    if array is None or array.ndim != 2 or layout == "C":
        return array
    if layout == "F":
        return np.asfortranarray(array)
    wide = np.zeros((array.shape[0], 2 * array.shape[1]), dtype=array.dtype)
    wide[:, 1::2] = array
    return wide[:, 1::2]


@pytest.mark.parametrize("law", ["additive", "affine"])
@pytest.mark.parametrize("function", FUNCTIONS)
@SETTINGS
@given(
    n=st.integers(1, 70),
    d2=st.integers(1, 40),
    dtype=dtypes,
    layout=layouts,
    s_hat_scale=st.sampled_from([0.1, 1.0, 4.0, 30.0]),
    x_scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_reference(law, function, n, d2, dtype, layout, s_hat_scale, x_scale, seed) -> None:
    inputs = draw(law, n, d2, dtype, np.random.default_rng(seed), s_hat_scale=s_hat_scale, x_scale=x_scale)
    inputs = {name: relayout(value, layout) for name, value in inputs.items()}
    assert_matches_reference(KERNEL, REFERENCE, law, function, inputs)


@contextlib.contextmanager
def always_parallel() -> Iterator[None]:
    """Run every call through the ``prange`` kernels (small test inputs would run serially)."""
    threshold = numba_cpu.PARALLEL_MIN_ELEMENTS
    numba_cpu.PARALLEL_MIN_ELEMENTS = 0
    try:
        yield
    finally:
        numba_cpu.PARALLEL_MIN_ELEMENTS = threshold


@pytest.mark.parametrize("law", ["additive", "affine"])
@pytest.mark.parametrize("function", FUNCTIONS)
@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 300), d2=st.integers(1, 20), dtype=dtypes, seed=st.integers(0, 2**32 - 1))
def test_parallel_kernels_match_reference(law, function, n, d2, dtype, seed) -> None:
    inputs = draw(law, n, d2, dtype, np.random.default_rng(seed), s_hat_scale=2.0)
    with always_parallel():
        assert_matches_reference(KERNEL, REFERENCE, law, function, inputs)


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_scale_at_the_bound(function: str, dtype: type) -> None:
    """Saturated ``tanh`` (``s = ±a`` exactly) with large ``|a|``: exp near its float range."""
    big = 80.0 if dtype == np.float32 else 600.0
    inputs = draw("affine", 9, 17, dtype, np.random.default_rng(1), s_hat_scale=40.0, x_scale=1e-3)
    inputs["scale"] = np.linspace(-big, big, 17).astype(dtype)
    assert_matches_reference(KERNEL, REFERENCE, "affine", function, inputs)


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_overflow_and_nan_propagate_like_the_reference(function: str, dtype: type) -> None:
    """``|s|`` beyond exp's range gives the same inf/0/NaN pattern as NumPy; a NaN input row stays NaN."""
    huge = 200.0 if dtype == np.float32 else 1000.0
    rng = np.random.default_rng(2)
    inputs = draw("affine", 6, 5, dtype, rng)
    inputs["scale"] = np.array([huge, -huge, 1.0, huge, 0.5], dtype=dtype)
    # huge |a| only where tanh is exactly ±1 in every implementation (|ŝ| ≥ 20), so that no
    # 1-ulp difference of tanh decides between inf·0 = NaN and inf
    inputs["h"][:, [0, 1, 3]] = rng.choice([-40.0, 25.0], size=(6, 3))
    inputs["h"][3, 2] = np.nan
    with np.errstate(all="ignore"):
        got, want = call(KERNEL["affine"], function, inputs), call(REFERENCE["affine"], function, inputs)
        scales = magnitudes(function, inputs)
    for g, w, scale in zip(got, want, scales, strict=True):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
        np.testing.assert_array_equal(np.isinf(g), np.isinf(w))
        finite = np.isfinite(w) & np.isfinite(scale)
        error = np.abs(g[finite].astype(np.float64) - w[finite]) / np.maximum(scale[finite], np.finfo(float).tiny)
        assert np.max(error, initial=0.0) <= bound(dtype)


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("d2", [1, 7, 31, 32, 33, 63, 64, 65, 96, 100, 129, 392])
def test_row_loop_and_flat_blocks_match_reference(function: str, dtype: type, d2: int) -> None:
    """Widths on both sides of the row-loop / flat-block split (``short_rows``), in both kernels."""
    for n, parallel in [(37, False), (301, True)]:
        inputs = draw("affine", n, d2, dtype, np.random.default_rng(d2), s_hat_scale=2.0)
        with always_parallel() if parallel else contextlib.nullcontext():
            assert_matches_reference(KERNEL, REFERENCE, "affine", function, inputs)


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("n", [1, 2047, 2048, 3000])
def test_one_column_on_both_sides_of_the_numpy_threshold(function: str, n: int) -> None:
    """``D₂ = 1`` runs in NumPy from ``NUMPY_ONE_COLUMN_ROWS`` rows up, in the kernels below."""
    assert numba_cpu.declines((n, 1)) == (n >= numba_cpu.NUMPY_ONE_COLUMN_ROWS)
    for dtype in (np.float64, np.float32):
        inputs = draw("affine", n, 1, dtype, np.random.default_rng(n), s_hat_scale=2.0)
        assert_matches_reference(KERNEL, REFERENCE, "affine", function, inputs)


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("n", [2047, 2048])
def test_a_declined_call_runs_the_reference(function: str, n: int) -> None:
    """Where the kernel declines (``NotImplemented``), the law the layer calls is the reference, bit for bit."""
    inputs = draw("affine", n, 1, np.float32, np.random.default_rng(n))
    kernel_only = types.SimpleNamespace(**{function: numba_cpu.FUSED[f"affine.{function}"]})
    declined = call(kernel_only, function, inputs) is NotImplemented
    assert declined == numba_cpu.declines((n, 1))
    if declined:
        expected = call(REFERENCE["affine"], function, inputs)
        for got, want in zip(call(KERNEL["affine"], function, inputs), expected, strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize(("n", "d2"), [(1000, 33), (300, 1), (700, 100), (40, 392)])
def test_results_do_not_depend_on_threads(function: str, n: int, d2: int) -> None:
    """``∂L/∂a`` is summed in chunks fixed by the shape (not by threads), flat blocks start where the
    chunks do: serial, parallel on all threads and parallel on one thread agree bit for bit."""
    inputs = draw("affine", n, d2, np.float32, np.random.default_rng(3))
    serial = call(KERNEL["affine"], function, inputs)
    with always_parallel():
        everyone = call(KERNEL["affine"], function, inputs)
        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            alone = call(KERNEL["affine"], function, inputs)
        finally:
            numba.set_num_threads(threads)
    for a, b, c in zip(serial, everyone, alone, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_empty_batch() -> None:
    inputs = draw("affine", 0, 3, np.float64, np.random.default_rng(4))
    for function in FUNCTIONS:
        for got, want in zip(
            call(KERNEL["affine"], function, inputs), call(REFERENCE["affine"], function, inputs), strict=True
        ):
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda i: i.update(h=i["h"][:, :-1]), ValueError, r"h must have shape \(4, 6\)"),
        (lambda i: i.update(scale=i["scale"][:2]), ValueError, r"scale must have shape \(3,\)"),
        (lambda i: i.update(d_logdet=i["d_logdet"][:3]), ValueError, r"d_logdet must have shape \(4,\)"),
        (lambda i: i.update(inp=i["inp"][0]), ValueError, "x2 must be a 2-d array"),
        (lambda i: i.update(h=i["h"].astype(np.float32)), TypeError, "h has dtype float32 but x2 has float64"),
        (lambda i: i.update(inp=i["inp"].astype(np.int64)), TypeError, "float32 or float64"),
    ],
)
def test_bad_arguments_are_rejected(change, error, match) -> None:
    inputs = draw("affine", 4, 3, np.float64, np.random.default_rng(5))
    change(inputs)
    with pytest.raises(error, match=match):
        call(KERNEL["affine"], "forward_vjp", inputs)


def test_law_attributes_match_the_reference() -> None:
    for name, law in KERNEL.items():
        reference = REFERENCE[name]
        assert (law.name, law.has_scale) == (reference.name, reference.has_scale)
        assert law.out_features(5) == reference.out_features(5)
