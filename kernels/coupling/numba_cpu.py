"""Fused coupling-law kernels for the CPU with Numba: one pass over memory, rows over threads.

Same maths and signatures as the NumPy reference ``nflow_np.flows.coupling_law`` (this package
never imports it; ``tests/kernels/coupling`` compares the two). For the affine law, with ``h = [ŝ, t]``,
``g = tanh(ŝ)``, ``s = a ⊙ g``:

forward   ``z₂ = x₂ ⊙ exp(s) + t``,      ``logdet = Σ_j s_j``
inverse   ``x₂ = (z₂ − t) ⊙ exp(−s)``,   ``logdet = −Σ_j s_j``
backward  ``∂L/∂s`` as in the reference, then ``∂L/∂ŝ = ∂L/∂s ⊙ a ⊙ (1 − g²)``,
          ``∂L/∂t = ±(the output gradient)``, ``∂L/∂a = Σ_n ∂L/∂s ⊙ g``.

Design (``docs/kernels.md#numba-cpu``):

- each ``*_rows`` function does rows ``start … stop−1``. Long rows run row by row, the column loop
  vectorised by LLVM (AVX2/AVX-512), which works because ``exp``/``tanh`` are the branch-free
  :mod:`kernels.common.vecmath` versions, not libm calls, and because rows are taken as 1-d views
  (indexing ``h[i, d2 + j]`` directly makes Numba emit a negative-index check that turns every
  load into a gather). Short rows (:func:`short_rows`), which would run mostly in the loop's
  one-vector-at-a-time remainder, run as flat blocks of many rows instead;
- each element of the inputs and outputs is read once and written once (short rows go through
  a few KiB of scratch that stays in L1);
- every sum has an order fixed by the shape: the log-det by :func:`ordered_sum`, ``∂L/∂a``
  column by column in row order. The kernels are compiled without ``reassoc``, so LLVM cannot
  reorder anything differently in the serial and the parallel kernel;
- ``*_parallel`` runs the rows over Numba's threads (``prange``); ``*_serial`` runs them on the
  calling thread. :func:`_run` takes the serial one below :data:`PARALLEL_MIN_ELEMENTS`, where
  waking the thread pool costs more than the work (and, on a busy machine, a parallel region can
  wait a whole scheduler time slice for its second thread);
- ``∂L/∂a`` sums over rows, which threads would race on: rows are cut into :func:`block_count`
  fixed chunks (at most :data:`SCALE_CHUNKS`), each summing into its own row of a small buffer,
  and the buffer's rows are added at the end. The chunks depend on the shape only, so serial,
  parallel and any thread count give bit-for-bit the same result (tested);
- the ``*_into`` functions write into caller-provided outputs (no page faults from fresh 100 MB
  allocations); the law functions in :data:`FUSED` allocate them, as the reference does;
- inputs must be C-contiguous: the law functions copy other layouts (e.g. the coupling layer's
  column views ``x[:, ::2]``) with ``np.ascontiguousarray`` first, because a strided kernel
  gathers every element and runs ~10× slower than that copy;
- where NumPy is faster the reference runs: this module has no additive kernel (one pass
  already), and the affine functions decline one-column inputs of many rows (:func:`declines`).

``fastmath`` is ``{"contract", "nsz"}`` for the kernels, and never ``nnan``/``ninf``: NaN and
``inf`` propagate as in NumPy. :func:`add_in_any_order` (``reassoc``) and the vecmath helpers are
compiled with their own flags.

Importing this module changes no environment variable (``docs/kernels.md#threads``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..common.vecmath import vexp, vtanh
from .validation import check_law_inputs

_OPTIONS = {"fastmath": {"contract", "nsz"}, "error_model": "numpy", "cache": True}
rows_kernel = njit(**_OPTIONS)
parallel_kernel = njit(parallel=True, **_OPTIONS)


@njit(fastmath={"reassoc"}, error_model="numpy", cache=True)
def add_in_any_order(total, value):
    """``total + value`` with LLVM free to reorder the sum (its own flag: the kernels have none).

    Only for sums whose value is thrown away: a loop with a reorderable sum is one LLVM vectorises
    4 vectors deep (interleaved), which hides the latency of exp and tanh; the same loop without
    one runs a single vector at a time, a third slower (docs/kernels.md#numba-cpu)."""
    return total + value


@njit(fastmath={"contract"}, error_model="numpy", cache=True)
def ordered_sum(values):
    """``Σ values`` in an order fixed by the length alone: 8 running sums over ``values[l::8]``, added
    as a tree, then the leftover in order. Written out, so that no compiler choice (and no
    thread count) changes a log-det's bits; the 8 sums still run as one vector."""
    n = values.shape[0]
    total = values.dtype.type(0.0)
    j = 0
    if n >= 16:
        s0, s1, s2, s3 = values[0], values[1], values[2], values[3]
        s4, s5, s6, s7 = values[4], values[5], values[6], values[7]
        j = 8
        while j + 8 <= n:
            s0, s1, s2, s3 = s0 + values[j], s1 + values[j + 1], s2 + values[j + 2], s3 + values[j + 3]
            s4, s5, s6, s7 = s4 + values[j + 4], s5 + values[j + 5], s6 + values[j + 6], s7 + values[j + 7]
            j += 8
        total = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    for k in range(j, n):
        total += values[k]
    return total


SCALE_CHUNKS = 64
"""Most row chunks ``∂L/∂a`` is summed in (one partial sum per chunk and column)."""
NUMPY_ONE_COLUMN_ROWS = 2048
"""The affine law computes ``D₂ = 1`` calls of at least this many rows with NumPy (measured: there
NumPy's 1-d ufuncs beat the kernels' per-row bookkeeping; with ``D₂ ≥ 2``, or fewer rows, the kernels
win at every size, from 8 elements up: docs/kernels.md#when-numpy-is-faster)."""
CHUNK_MIN_ELEMENTS = 16384
"""Fewest ``N·D₂`` elements per chunk or parallel block (each has a fixed cost of ~0.5 µs)."""
PARALLEL_MIN_ELEMENTS = 1 << 16
"""Calls on fewer than this many ``N·D₂`` elements run on the calling thread only."""
VECTOR_BODY_BYTES = 256
"""Bytes of a row that LLVM's vectorised column loop does per iteration (64 float32, 32 float64:
16 or 8 lanes × 4 vectors on AVX-512); LLVM interleaves the inverse's loop 2 deep: half that."""
FLAT_BLOCK = 256
"""At most this many elements per flat block of short rows (1 KiB of scratch per array, in L1).
Small on purpose: with 1024, the block's separate gather and compute phases left the hardware
prefetcher behind at N = 65536 (1.7–2.0 against 1.3 ns per float32 element, one core)."""


@rows_kernel
def block_count(n, d2, most):
    """Blocks to cut ``N`` rows into: at most ``most``, at least 1, and of at least
    :data:`CHUNK_MIN_ELEMENTS` elements each where there are that many. A function of the shape only."""
    return max(1, min(n, most, n * d2 // CHUNK_MIN_ELEMENTS))


# -- affine law: z₂ = x₂ ⊙ exp(s) + t, s = a ⊙ tanh(ŝ) --------------------------------------------------------
# LLVM vectorises a row's column loop 64 float32 / 32 float64 elements at a time (16 or 8 lanes ×
# 4 vectors in flight, which hides exp's and tanh's latency) and runs the columns left over one
# vector, or one element, at a time: about twice as slow per element. So short rows (and rows
# with a long leftover: :func:`short_rows`) do not run row by row: a block of them is one flat
# run of x₂ and z₂ (C order), their ŝ and t are gathered from h into flat scratch arrays, one long
# loop does the block, and the log-dets are summed row by row from the scratch ``s``.
@rows_kernel
def gather_columns(src, col0, width, start, stop, flat):
    """``flat[r·width + j] = src[start + r, col0 + j]`` for rows ``start…stop−1``."""
    if width == 1:  # one strided loop instead of a loop per row (2-d data: D₂ = 1)
        for r in range(stop - start):
            flat[r] = src[start + r, col0]
        return
    for r in range(stop - start):
        row, out = src[start + r, col0 : col0 + width], flat[r * width : (r + 1) * width]
        for j in range(width):
            out[j] = row[j]


@rows_kernel
def scatter_row(values, out, sign):
    """``out = sign · values`` (``sign = ±1``: exact)."""
    for j in range(out.shape[0]):
        out[j] = sign * values[j]


@rows_kernel
def add_row(values, total):
    """``total += values``."""
    for j in range(total.shape[0]):
        total[j] += values[j]


@rows_kernel
def short_rows(d2, itemsize, body_bytes):
    """Rows per flat block if rows of ``d2`` elements run faster in flat blocks, else 0.

    Row by row, the ``d2 mod body`` columns past the vector body's multiples run about twice as
    slow as the rest; a flat block runs everything ~20% slower than the body. So rows go flat when
    the leftover is more than a quarter of the rest (every row shorter than the body)."""
    body = body_bytes // itemsize
    left = d2 % body
    return FLAT_BLOCK // d2 if 4 * left > d2 - left else 0


@rows_kernel
def affine_short_rows(inp, h, scale, out, logdet, start, stop, rows, inverse):
    """Forward or inverse on rows ``start…stop−1`` in flat blocks of ``rows`` rows (see above)."""
    d2 = inp.shape[1]
    rows = max(1, min(rows, stop - start))
    m = rows * d2
    s_hat, t, a, s_out = np.empty(m, inp.dtype), np.empty(m, inp.dtype), np.empty(m, inp.dtype), np.empty(m, inp.dtype)
    spare = np.zeros(1, inp.dtype)
    for r in range(rows):
        a[r * d2 : (r + 1) * d2] = scale
    one = inp.dtype.type(1.0)
    inp_flat, out_flat = inp.reshape(-1), out.reshape(-1)
    for b0 in range(start, stop, rows):
        b1 = min(b0 + rows, stop)
        gather_columns(h, 0, d2, b0, b1, s_hat)
        gather_columns(h, d2, d2, b0, b1, t)
        x, z = inp_flat[b0 * d2 : b1 * d2], out_flat[b0 * d2 : b1 * d2]
        block_sum = inp.dtype.type(0.0)
        if inverse:
            for k in range((b1 - b0) * d2):
                s = a[k] * vtanh(s_hat[k])
                z[k] = (x[k] - t[k]) * vexp(-s)
                s_out[k] = s
                block_sum = add_in_any_order(block_sum, s)
        else:
            for k in range((b1 - b0) * d2):
                s = a[k] * vtanh(s_hat[k])
                z[k] = x[k] * vexp(s) + t[k]
                s_out[k] = s
                block_sum = add_in_any_order(block_sum, s)
        spare[0] += block_sum  # see add_in_any_order
        sign = -one if inverse else one
        if d2 == 1:  # a loop per row costs more than the row itself
            for r in range(b1 - b0):
                logdet[b0 + r] = sign * s_out[r]
            continue
        if d2 < 16:  # ordered_sum's order (one running sum per row), with the rows as the vector lanes
            block_logdet = logdet[b0:b1]
            for r in range(b1 - b0):
                block_logdet[r] = s_out[r * d2]
            for j in range(1, d2):
                for r in range(b1 - b0):
                    block_logdet[r] += s_out[r * d2 + j]
            for r in range(b1 - b0):
                block_logdet[r] *= sign
            continue
        for r in range(b1 - b0):
            logdet[b0 + r] = sign * ordered_sum(s_out[r * d2 : (r + 1) * d2])


@rows_kernel
def affine_forward_rows(x2, h, scale, z2, logdet, start, stop):
    d2 = x2.shape[1]
    rows = short_rows(d2, x2.itemsize, VECTOR_BODY_BYTES)
    if rows > 0:
        affine_short_rows(x2, h, scale, z2, logdet, start, stop, rows, False)
        return
    s_row, spare = np.empty(d2, x2.dtype), np.zeros(1, x2.dtype)
    for i in range(start, stop):
        x, s_hat, t, z = x2[i], h[i, :d2], h[i, d2:], z2[i]
        row_sum = x2.dtype.type(0.0)
        for j in range(d2):
            s = scale[j] * vtanh(s_hat[j])
            z[j] = x[j] * vexp(s) + t[j]
            s_row[j] = s
            row_sum = add_in_any_order(row_sum, s)
        logdet[i] = ordered_sum(s_row)
        spare[0] += row_sum  # see add_in_any_order


@rows_kernel
def affine_inverse_rows(z2, h, scale, x2, logdet, start, stop):
    d2 = z2.shape[1]
    rows = short_rows(d2, z2.itemsize, VECTOR_BODY_BYTES // 2)
    if rows > 0:
        affine_short_rows(z2, h, scale, x2, logdet, start, stop, rows, True)
        return
    s_row, spare = np.empty(d2, z2.dtype), np.zeros(1, z2.dtype)
    for i in range(start, stop):
        z, s_hat, t, x = z2[i], h[i, :d2], h[i, d2:], x2[i]
        row_sum = z2.dtype.type(0.0)
        for j in range(d2):
            s = scale[j] * vtanh(s_hat[j])
            x[j] = (z[j] - t[j]) * vexp(-s)
            s_row[j] = s
            row_sum = add_in_any_order(row_sum, s)
        logdet[i] = -ordered_sum(s_row)
        spare[0] += row_sum  # see add_in_any_order


@rows_kernel
def affine_backward_short_rows(inp, h, scale, d_out, d_logdet, d_inp, d_h, d_a, start, stop, rows, inverse):
    """Backward of forward (or inverse) on rows ``start…stop−1`` in flat blocks of ``rows`` rows.

    As :func:`affine_short_rows`; ``∂L/∂ŝ`` and ``∂L/∂s ⊙ g`` go to scratch first, and each
    block's ``∂L/∂s ⊙ g`` is added to ``d_a`` row by row, in order (the sum the row loop makes)."""
    d2 = inp.shape[1]
    rows = max(1, min(rows, stop - start))
    m = rows * d2
    dtype = inp.dtype
    s_hat, t, a, d_ld = np.empty(m, dtype), np.empty(m, dtype), np.empty(m, dtype), np.empty(m, dtype)
    d_s_hat, d_s_g = np.empty(m, dtype), np.empty(m, dtype)
    spare = np.zeros(1, dtype)
    for r in range(rows):
        a[r * d2 : (r + 1) * d2] = scale
    one = dtype.type(1.0)
    inp_flat, d_out_flat, d_inp_flat = inp.reshape(-1), d_out.reshape(-1), d_inp.reshape(-1)
    for b0 in range(start, stop, rows):
        b1 = min(b0 + rows, stop)
        gather_columns(h, 0, d2, b0, b1, s_hat)
        if inverse:
            gather_columns(h, d2, d2, b0, b1, t)
        if d2 == 1:
            d_ld[: b1 - b0] = d_logdet[b0:b1]
        else:
            for r in range(b1 - b0):
                d_ld[r * d2 : (r + 1) * d2] = d_logdet[b0 + r]
        x, d_o, d_i = inp_flat[b0 * d2 : b1 * d2], d_out_flat[b0 * d2 : b1 * d2], d_inp_flat[b0 * d2 : b1 * d2]
        block_sum = dtype.type(0.0)
        if inverse:  # x holds z₂, d_o holds ∂L/∂x₂, d_i gets ∂L/∂z₂
            for k in range((b1 - b0) * d2):
                g = vtanh(s_hat[k])
                e_inv = vexp(-(a[k] * g))
                d_i_k = d_o[k] * e_inv
                d_s = -d_o[k] * ((x[k] - t[k]) * e_inv) - d_ld[k]
                d_i[k] = d_i_k
                d_s_hat[k] = d_s * a[k] * (one - g * g)
                d_s_g[k] = d_s * g
                block_sum = add_in_any_order(block_sum, d_s)
        else:
            for k in range((b1 - b0) * d2):
                g = vtanh(s_hat[k])
                d_i_k = d_o[k] * vexp(a[k] * g)
                d_s = d_i_k * x[k] + d_ld[k]
                d_i[k] = d_i_k
                d_s_hat[k] = d_s * a[k] * (one - g * g)
                d_s_g[k] = d_s * g
                block_sum = add_in_any_order(block_sum, d_s)
        spare[0] += block_sum  # see add_in_any_order
        sign = -one if inverse else one
        d_t = d_i if inverse else d_o
        if d2 == 1:  # as in affine_short_rows
            for r in range(b1 - b0):
                d_h[b0 + r, 0] = d_s_hat[r]
                d_h[b0 + r, 1] = sign * d_t[r]
                d_a[0] += d_s_g[r]
            continue
        for r in range(b1 - b0):
            row = slice(r * d2, (r + 1) * d2)
            scatter_row(d_s_hat[row], d_h[b0 + r, :d2], one)
            scatter_row(d_t[row], d_h[b0 + r, d2:], sign)
            add_row(d_s_g[row], d_a)


@rows_kernel
def affine_forward_vjp_rows(x2, h, scale, d_z2, d_logdet, d_x2, d_h, d_a, start, stop):
    """Rows ``start…stop−1`` of the backward of forward; adds their ``Σ ∂L/∂s ⊙ g`` to ``d_a: (D₂,)``."""
    d2 = x2.shape[1]
    rows = short_rows(d2, x2.itemsize, VECTOR_BODY_BYTES)
    if rows > 0:
        affine_backward_short_rows(x2, h, scale, d_z2, d_logdet, d_x2, d_h, d_a, start, stop, rows, False)
        return
    one = x2.dtype.type(1.0)
    spare = np.zeros(1, x2.dtype)
    for i in range(start, stop):
        x, s_hat, d_z, d_ld = x2[i], h[i, :d2], d_z2[i], d_logdet[i]
        d_x, d_s_hat, d_t = d_x2[i], d_h[i, :d2], d_h[i, d2:]
        row_sum = x2.dtype.type(0.0)
        for j in range(d2):
            g = vtanh(s_hat[j])
            a = scale[j]
            d_x_j = d_z[j] * vexp(a * g)
            d_s = d_x_j * x[j] + d_ld
            d_x[j] = d_x_j
            d_s_hat[j] = d_s * a * (one - g * g)
            d_t[j] = d_z[j]
            d_a[j] += d_s * g
            row_sum = add_in_any_order(row_sum, d_s)
        spare[0] += row_sum  # see add_in_any_order (measured 1.6 → 1.3 ns per float32 element)


@rows_kernel
def affine_inverse_vjp_rows(z2, h, scale, d_x2, d_logdet, d_z2, d_h, d_a, start, stop):
    """As :func:`affine_forward_vjp_rows`, for the inverse ``x₂ = (z₂ − t) ⊙ exp(−s)``."""
    d2 = z2.shape[1]
    rows = short_rows(d2, z2.itemsize, VECTOR_BODY_BYTES)
    if rows > 0:
        affine_backward_short_rows(z2, h, scale, d_x2, d_logdet, d_z2, d_h, d_a, start, stop, rows, True)
        return
    one = z2.dtype.type(1.0)
    spare = np.zeros(1, z2.dtype)
    for i in range(start, stop):
        z, s_hat, t, d_x, d_ld = z2[i], h[i, :d2], h[i, d2:], d_x2[i], d_logdet[i]
        d_z, d_s_hat, d_t = d_z2[i], d_h[i, :d2], d_h[i, d2:]
        row_sum = z2.dtype.type(0.0)
        for j in range(d2):
            g = vtanh(s_hat[j])
            a = scale[j]
            e_inv = vexp(-(a * g))
            d_z_j = d_x[j] * e_inv
            d_s = -d_x[j] * ((z[j] - t[j]) * e_inv) - d_ld
            d_z[j] = d_z_j
            d_s_hat[j] = d_s * a * (one - g * g)
            d_t[j] = -d_z_j
            d_a[j] += d_s * g
            row_sum = add_in_any_order(row_sum, d_s)
        spare[0] += row_sum  # see add_in_any_order


@parallel_kernel
def affine_forward_parallel(x2, h, scale, out, logdet, inverse):
    n, d2 = x2.shape
    blocks = block_count(n, d2, 4 * SCALE_CHUNKS)  # any split gives the same results here
    for c in prange(blocks):
        start, stop = c * n // blocks, (c + 1) * n // blocks
        if inverse:
            affine_inverse_rows(x2, h, scale, out, logdet, start, stop)
        else:
            affine_forward_rows(x2, h, scale, out, logdet, start, stop)


@rows_kernel
def affine_forward_serial(x2, h, scale, out, logdet, inverse):
    if inverse:
        affine_inverse_rows(x2, h, scale, out, logdet, 0, x2.shape[0])
    else:
        affine_forward_rows(x2, h, scale, out, logdet, 0, x2.shape[0])


@parallel_kernel
def affine_backward_parallel(inp, h, scale, d_out, d_logdet, d_inp, d_h, d_scale_chunks, inverse):
    n, chunks = inp.shape[0], d_scale_chunks.shape[0]
    for c in prange(chunks):
        start, stop = c * n // chunks, (c + 1) * n // chunks
        if inverse:
            affine_inverse_vjp_rows(inp, h, scale, d_out, d_logdet, d_inp, d_h, d_scale_chunks[c], start, stop)
        else:
            affine_forward_vjp_rows(inp, h, scale, d_out, d_logdet, d_inp, d_h, d_scale_chunks[c], start, stop)


@rows_kernel
def affine_backward_serial(inp, h, scale, d_out, d_logdet, d_inp, d_h, d_scale_chunks, inverse):
    n, chunks = inp.shape[0], d_scale_chunks.shape[0]
    for c in range(chunks):  # the same chunks as in parallel: the same sums, bit for bit
        start, stop = c * n // chunks, (c + 1) * n // chunks
        if inverse:
            affine_inverse_vjp_rows(inp, h, scale, d_out, d_logdet, d_inp, d_h, d_scale_chunks[c], start, stop)
        else:
            affine_forward_vjp_rows(inp, h, scale, d_out, d_logdet, d_inp, d_h, d_scale_chunks[c], start, stop)


# -- entry points writing into given outputs --------------------------------------------------------------
def _run(serial, parallel, elements: int, *args) -> None:
    (parallel if elements >= PARALLEL_MIN_ELEMENTS else serial)(*args)


def affine_forward_into(x2, h, scale, z2, logdet) -> None:
    """Forward ``z₂ = x₂ ⊙ exp(s) + t``, ``logdet = Σ s`` into ``z2, logdet``."""
    _run(affine_forward_serial, affine_forward_parallel, x2.size, x2, h, scale, z2, logdet, False)


def affine_inverse_into(z2, h, scale, x2, logdet) -> None:
    """Inverse ``x₂ = (z₂ − t) ⊙ exp(−s)``, ``logdet = −Σ s`` into ``x2, logdet``."""
    _run(affine_forward_serial, affine_forward_parallel, z2.size, z2, h, scale, x2, logdet, True)


def affine_forward_vjp_into(x2, h, scale, d_z2, d_logdet, d_x2, d_h, d_scale_chunks) -> None:
    """Backward of the forward into ``d_x2, d_h``; ``d_scale_chunks`` from :func:`scale_chunks` must be
    zero and gets the chunks' ``∂L/∂a``, whose column sum is ``∂L/∂a``."""
    args = (x2, h, scale, d_z2, d_logdet, d_x2, d_h, d_scale_chunks, False)
    _run(affine_backward_serial, affine_backward_parallel, x2.size, *args)


def affine_inverse_vjp_into(z2, h, scale, d_x2, d_logdet, d_z2, d_h, d_scale_chunks) -> None:
    """Backward of the inverse into ``d_z2, d_h``; ``d_scale_chunks`` as in :func:`affine_forward_vjp_into`."""
    args = (z2, h, scale, d_x2, d_logdet, d_z2, d_h, d_scale_chunks, True)
    _run(affine_backward_serial, affine_backward_parallel, z2.size, *args)


def scale_chunks(n: int, d2: int, dtype: np.dtype) -> np.ndarray:
    """A zeroed ``(C, D₂)`` buffer for the ``∂L/∂a`` partial sums, ``C`` = :func:`block_count` ≤ 64."""
    return np.zeros((block_count(n, d2, SCALE_CHUNKS), d2), dtype=dtype)


# -- the affine law's fused functions, with the reference's signatures --------------------------------------
def _c(array: np.ndarray | None) -> np.ndarray | None:
    """C-contiguous ``array`` (itself when it already is)."""
    return None if array is None else np.ascontiguousarray(array)


def declines(shape: tuple[int, int]) -> bool:
    """Whether a call on ``x2: shape`` is left to the reference, which is faster there
    (``D₂ = 1`` and ``N ≥ 2048``: 2-d data)."""
    return shape[1] == 1 and shape[0] >= NUMPY_ONE_COLUMN_ROWS


def _pass(inp, h, scale, entry):
    check_law_inputs("affine", inp, h, scale)
    if declines(inp.shape):
        return NotImplemented
    out, logdet = np.empty(inp.shape, inp.dtype), np.empty(inp.shape[0], inp.dtype)
    entry(_c(inp), _c(h), _c(scale), out, logdet)
    return out, logdet


def _vjp(inp, h, scale, d_out, d_logdet, entry):
    check_law_inputs("affine", inp, h, scale, d_out, d_logdet)
    if declines(inp.shape):
        return NotImplemented
    (n, d2), dtype = inp.shape, inp.dtype
    d_inp, d_h, chunks = np.empty((n, d2), dtype), np.empty((n, 2 * d2), dtype), scale_chunks(n, d2, dtype)
    entry(_c(inp), _c(h), _c(scale), _c(d_out), _c(d_logdet), d_inp, d_h, chunks)
    return d_inp, d_h, chunks.sum(axis=0)


def affine_forward(x2: np.ndarray, h: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``AffineLaw.forward``: ``(z₂, logdet)``, or ``NotImplemented`` where :func:`declines`."""
    return _pass(x2, h, scale, affine_forward_into)


def affine_inverse(z2: np.ndarray, h: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``AffineLaw.inverse``: ``(x₂, logdet)``, or ``NotImplemented`` where :func:`declines`."""
    return _pass(z2, h, scale, affine_inverse_into)


def affine_forward_vjp(x2, h, scale, d_z2, d_logdet):
    """``AffineLaw.forward_vjp``: ``(∂L/∂x₂, ∂L/∂h, ∂L/∂a)``, or ``NotImplemented`` where :func:`declines`."""
    return _vjp(x2, h, scale, d_z2, d_logdet, affine_forward_vjp_into)


def affine_inverse_vjp(z2, h, scale, d_x2, d_logdet):
    """``AffineLaw.inverse_vjp``: ``(∂L/∂z₂, ∂L/∂h, ∂L/∂a)``, or ``NotImplemented`` where :func:`declines`."""
    return _vjp(z2, h, scale, d_x2, d_logdet, affine_inverse_vjp_into)


for _function in (affine_forward, affine_inverse, affine_forward_vjp, affine_inverse_vjp):
    _function.may_decline = True  # NotImplemented where declines(): the registry runs the reference
FUSED = {
    "affine.forward": affine_forward,
    "affine.inverse": affine_inverse,
    "affine.forward_vjp": affine_forward_vjp,
    "affine.inverse_vjp": affine_inverse_vjp,
}
"""What this module accelerates. Not the additive law: ``x₂ ± h`` is one pass already, and a Numba
kernel for it was measured slower than NumPy's at every size from 16 to 2.6·10⁷ elements
(docs/kernels.md#numba-cpu), so the reference runs it."""
