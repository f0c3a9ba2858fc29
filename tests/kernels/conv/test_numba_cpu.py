"""``kernels.conv.numba_cpu`` equals the NumPy reference ``nflow_np.nn.conv.im2col`` / ``col2im`` bit for bit.

Hypothesis draws batch sizes from 1, heights and widths from 1 (smaller than the kernel, too), one or
several channels, kernel sizes 1, 3 and 5, both dtypes, and non-contiguous inputs; col2im must add the
same contributions in the same order, so the results are identical, for one thread and for several.
A Conv2d layer with the kernels swapped in computes what it computes with the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba", reason="the numba kernels need `pip install numba`")

import numba

from kernels.conv import numba_cpu
from nflow_np.nn import conv

SETTINGS = settings(max_examples=40, deadline=None)
shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 7), st.integers(1, 7))
kernels = st.sampled_from([1, 3, 5])
dtypes = st.sampled_from([np.float32, np.float64])


@SETTINGS
@given(shape=shapes, k=kernels, dtype=dtypes, seed=st.integers(0, 2**32 - 1), transposed=st.booleans())
def test_im2col_matches_the_reference(shape: tuple, k: int, dtype: type, seed: int, transposed: bool) -> None:
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    if transposed:  # a non-contiguous view of the same shape
        x = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    got, want = numba_cpu.im2col(x, k), conv.im2col(x, k)
    assert got.dtype == want.dtype == dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


@SETTINGS
@given(shape=shapes, k=kernels, dtype=dtypes, seed=st.integers(0, 2**32 - 1), threads=st.sampled_from([1, 2]))
def test_col2im_matches_the_reference_bit_for_bit(shape: tuple, k: int, dtype: type, seed: int, threads: int) -> None:
    n, c, h, w = shape
    cols = np.random.default_rng(seed).standard_normal((c * k * k, n * h * w)).astype(dtype)
    want = conv.col2im(cols, shape, k)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        got = numba_cpu.col2im(cols, shape, k)
    finally:
        numba.set_num_threads(before)
    assert got.dtype == dtype and got.shape == shape
    np.testing.assert_array_equal(got, want)


def test_a_conv_layer_with_the_kernels_computes_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    layer = conv.Conv2d(3, 4, 3, rng, dtype=np.float32)
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    d_y = rng.standard_normal((2, 4, 5, 7)).astype(np.float32)
    want = layer.forward(x), layer.backward(d_y)
    monkeypatch.setattr(conv.backend, "fused", lambda name, reference: numba_cpu.FUSED[name])
    got = layer.forward(x), layer.backward(d_y)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
