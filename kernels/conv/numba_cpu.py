"""im2col and col2im for the convolutional coupling nets, on the CPU with Numba.

The NumPy reference is ``nflow_np.nn.conv.im2col`` / ``col2im`` (this package never imports it;
``tests/kernels/conv/test_numba_cpu.py`` compares the two bit for bit). Same signatures, same layout:
``cols[(c, i, j), (n, h, w)] = x_pad[n, c, h + i, w + j]`` with "same" zero padding ``p = k // 2``.

What the kernels save: the reference pads into a temporary (one extra write and read of the input),
then makes ``k²`` strided slice copies; col2im accumulates ``k²`` slices into a padded temporary and
copies its interior out. Here each output element is written once, straight from its source, with no
padded temporary. Whether that beats NumPy's vectorised slice copies is a measurement
(``python -m benchmarks.bench_conv``, rows ``im2col``/``col2im``); the kernels are reached through
``FUSED`` only once this module is listed in the ``"numba"`` record of ``nflow_np/backend.py``.

col2im adds the contributions of the offsets in the reference's order (``i`` outer, ``j`` inner, from
zero), each rounding once, no ``fastmath``: the same bits as the reference. Channels run in parallel
(``prange``); each output element belongs to one channel and so to one thread, whose order is fixed:
the sums are identical for every thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_OPTIONS = {"error_model": "numpy", "cache": True, "parallel": True}


@njit(**_OPTIONS)
def _im2col(x, k, cols):
    n, c, h, w = x.shape
    p = k // 2
    zero = x.dtype.type(0.0)
    for ch in prange(c):
        for i in range(k):
            for j in range(k):
                for m in range(n):
                    for y in range(h):
                        sy = y + i - p
                        row = cols[ch, i, j, m, y]
                        if sy < 0 or sy >= h:
                            row[:] = zero
                            continue
                        source = x[m, ch, sy]
                        for col in range(w):
                            sx = col + j - p
                            row[col] = source[sx] if 0 <= sx < w else zero


@njit(**_OPTIONS)
def _col2im(cols, k, d_x):
    n, c, h, w = d_x.shape
    p = k // 2
    zero = d_x.dtype.type(0.0)
    for ch in prange(c):
        for m in range(n):
            for y in range(h):
                for col in range(w):
                    total = zero
                    for i in range(k):
                        sy = y - i + p
                        if sy < 0 or sy >= h:
                            continue
                        for j in range(k):
                            sx = col - j + p
                            if 0 <= sx < w:
                                total += cols[ch, i, j, m, sy, sx]
                    d_x[m, ch, y, col] = total


def im2col(x: np.ndarray, k: int) -> np.ndarray:
    """``nflow_np.nn.conv.im2col``: ``x: (N, C, H, W)`` → ``cols: (C·k², N·H·W)``, C-contiguous."""
    x = np.ascontiguousarray(x)
    n, c, h, w = x.shape
    cols = np.empty((c, k, k, n, h, w), dtype=x.dtype)
    _im2col(x, k, cols)
    return cols.reshape(c * k * k, n * h * w)


def col2im(cols: np.ndarray, shape: tuple[int, int, int, int], k: int) -> np.ndarray:
    """``nflow_np.nn.conv.col2im``: ``cols: (C·k², N·H·W)`` → ``d_x: (N, C, H, W)``, the adjoint of :func:`im2col`."""
    n, c, h, w = shape
    cols = np.ascontiguousarray(cols).reshape(c, k, k, n, h, w)
    d_x = np.empty((n, c, h, w), dtype=cols.dtype)
    _col2im(cols, k, d_x)
    return d_x


FUSED = {"im2col": im2col, "col2im": col2im}
"""The reference functions these kernels replace, by the name ``nflow_np.backend.fused`` looks up."""
