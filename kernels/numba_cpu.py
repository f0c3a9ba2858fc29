"""Fused coupling-law kernels for the CPU with Numba: one pass over memory, rows over threads.

Same maths and signatures as the NumPy reference ``nflow_np.flows.coupling_law`` (this package
never imports it; ``tests/kernels`` compares the two). For the affine law, with ``h = [ŝ, t]``,
``g = tanh(ŝ)``, ``s = a ⊙ g``:

forward   ``z₂ = x₂ ⊙ exp(s) + t``,      ``logdet = Σ_j s_j``
inverse   ``x₂ = (z₂ − t) ⊙ exp(−s)``,   ``logdet = −Σ_j s_j``
backward  ``∂L/∂s`` as in the reference, then ``∂L/∂ŝ = ∂L/∂s ⊙ a ⊙ (1 − g²)``,
          ``∂L/∂t = ±(the output gradient)``, ``∂L/∂a = Σ_n ∂L/∂s ⊙ g``.

Design (``docs/kernels.md#numba-cpu``):

- each ``*_rows`` function does rows ``start … stop−1``; its column loop is vectorised by LLVM
  (AVX2/AVX-512), which works because ``exp``/``tanh`` are the branch-free
  :mod:`kernels.vecmath` versions, not libm calls, and because rows are taken as 1-d views
  (indexing ``h[i, d2 + j]`` directly makes Numba emit a negative-index check that turns every
  load into a gather);
- each element is read once and written once; ``s`` stays in a register, the row's log-det is a
  register accumulator;
- ``*_parallel`` runs the rows over Numba's threads (``prange``); ``*_serial`` runs them on the
  calling thread. :func:`_run` takes the serial one below :data:`PARALLEL_MIN_ELEMENTS`, where
  waking the thread pool costs more than the work (and, on a busy machine, a parallel region can
  wait a whole scheduler time slice for its second thread);
- ``∂L/∂a`` sums over rows, which threads would race on: rows are cut into
  ``min(N, SCALE_CHUNKS)`` fixed chunks, each summing into its own row of a small buffer, and the
  buffer's rows are added at the end. The chunks depend on ``N`` only, so serial, parallel and
  any thread count give bit-for-bit the same result;
- the ``*_into`` functions write into caller-provided outputs (no page faults from fresh 100 MB
  allocations); the law classes allocate them, as the reference does;
- inputs must be C-contiguous: the law classes copy other layouts (e.g. the coupling layer's
  column views ``x[:, ::2]``) with ``np.ascontiguousarray`` first, because a strided kernel
  gathers every element and runs ~10× slower than that copy.

``fastmath`` is ``{"reassoc", "contract", "nsz"}`` for the kernels (``reassoc`` lets LLVM
vectorise the log-det sum) and never ``nnan``/``ninf``: NaN and ``inf`` propagate as in NumPy.
The vecmath helpers are compiled with their own, stricter flags.

Threads: unless the environment already says otherwise, importing this module sets
``OMP_WAIT_POLICY=PASSIVE`` (read by Numba's OpenMP thread pool when it starts), so that idle
kernel threads sleep instead of spinning on cores that BLAS needs for the coupling net's GEMMs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before Numba starts its thread pool

import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

from kernels.validation import check_law_inputs  # noqa: E402
from kernels.vecmath import vexp, vtanh  # noqa: E402

_OPTIONS = {"fastmath": {"reassoc", "contract", "nsz"}, "error_model": "numpy", "cache": True}
rows_kernel = njit(**_OPTIONS)
parallel_kernel = njit(parallel=True, **_OPTIONS)
SCALE_CHUNKS = 64
"""Most row chunks ``∂L/∂a`` is summed in (one partial sum per chunk and column)."""
PARALLEL_MIN_ELEMENTS = 1 << 16
"""Calls on fewer than this many ``N·D₂`` elements run on the calling thread only."""


# -- additive law: z₂ = x₂ + h, x₂ = z₂ − h (its backward is a copy or a negation: NumPy's) -------------------
@rows_kernel
def add_scaled_rows(a, b, factor, out, start, stop):  # noqa: ANN001, ANN201 (arrays; see module doc)
    """``out = a + factor · b`` on rows ``start…stop−1`` (``factor = ±1`` is exact: ``a ± b``)."""
    for i in range(start, stop):
        a_row, b_row, out_row = a[i], b[i], out[i]
        for j in range(out_row.shape[0]):
            out_row[j] = a_row[j] + factor * b_row[j]


@parallel_kernel
def add_scaled_parallel(a, b, factor, out):  # noqa: ANN001, ANN201
    n = out.shape[0]
    blocks = min(n, 4 * SCALE_CHUNKS)
    for c in prange(blocks):
        add_scaled_rows(a, b, factor, out, c * n // blocks, (c + 1) * n // blocks)


@rows_kernel
def add_scaled_serial(a, b, factor, out):  # noqa: ANN001, ANN201
    add_scaled_rows(a, b, factor, out, 0, out.shape[0])


# -- affine law: z₂ = x₂ ⊙ exp(s) + t, s = a ⊙ tanh(ŝ) --------------------------------------------------------
@rows_kernel
def affine_forward_rows(x2, h, scale, z2, logdet, start, stop):  # noqa: ANN001, ANN201
    d2 = x2.shape[1]
    for i in range(start, stop):
        x, s_hat, t, z = x2[i], h[i, :d2], h[i, d2:], z2[i]
        row_sum = x.dtype.type(0.0)
        for j in range(d2):
            s = scale[j] * vtanh(s_hat[j])
            z[j] = x[j] * vexp(s) + t[j]
            row_sum += s
        logdet[i] = row_sum


@rows_kernel
def affine_inverse_rows(z2, h, scale, x2, logdet, start, stop):  # noqa: ANN001, ANN201
    d2 = z2.shape[1]
    for i in range(start, stop):
        z, s_hat, t, x = z2[i], h[i, :d2], h[i, d2:], x2[i]
        row_sum = z.dtype.type(0.0)
        for j in range(d2):
            s = scale[j] * vtanh(s_hat[j])
            x[j] = (z[j] - t[j]) * vexp(-s)
            row_sum += s
        logdet[i] = -row_sum


@rows_kernel
def affine_backward_forward_rows(x2, h, scale, d_z2, d_logdet, d_x2, d_h, d_a, start, stop):  # noqa: ANN001, ANN201
    """Rows ``start…stop−1`` of the backward of forward; adds their ``Σ ∂L/∂s ⊙ g`` to ``d_a: (D₂,)``."""
    d2 = x2.shape[1]
    one = x2.dtype.type(1.0)
    for i in range(start, stop):
        x, s_hat, d_z, d_ld = x2[i], h[i, :d2], d_z2[i], d_logdet[i]
        d_x, d_s_hat, d_t = d_x2[i], d_h[i, :d2], d_h[i, d2:]
        for j in range(d2):
            g = vtanh(s_hat[j])
            a = scale[j]
            d_x_j = d_z[j] * vexp(a * g)
            d_s = d_x_j * x[j] + d_ld
            d_x[j] = d_x_j
            d_s_hat[j] = d_s * a * (one - g * g)
            d_t[j] = d_z[j]
            d_a[j] += d_s * g


@rows_kernel
def affine_backward_inverse_rows(z2, h, scale, d_x2, d_logdet, d_z2, d_h, d_a, start, stop):  # noqa: ANN001, ANN201
    """As :func:`affine_backward_forward_rows`, for the inverse ``x₂ = (z₂ − t) ⊙ exp(−s)``."""
    d2 = z2.shape[1]
    one = z2.dtype.type(1.0)
    for i in range(start, stop):
        z, s_hat, t, d_x, d_ld = z2[i], h[i, :d2], h[i, d2:], d_x2[i], d_logdet[i]
        d_z, d_s_hat, d_t = d_z2[i], d_h[i, :d2], d_h[i, d2:]
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


@parallel_kernel
def affine_forward_parallel(x2, h, scale, out, logdet, inverse):  # noqa: ANN001, ANN201
    n = x2.shape[0]
    blocks = min(n, 4 * SCALE_CHUNKS)
    for c in prange(blocks):
        start, stop = c * n // blocks, (c + 1) * n // blocks
        if inverse:
            affine_inverse_rows(x2, h, scale, out, logdet, start, stop)
        else:
            affine_forward_rows(x2, h, scale, out, logdet, start, stop)


@rows_kernel
def affine_forward_serial(x2, h, scale, out, logdet, inverse):  # noqa: ANN001, ANN201
    if inverse:
        affine_inverse_rows(x2, h, scale, out, logdet, 0, x2.shape[0])
    else:
        affine_forward_rows(x2, h, scale, out, logdet, 0, x2.shape[0])


@parallel_kernel
def affine_backward_parallel(inp, h, scale, d_out, d_logdet, d_inp, d_h, d_scale_chunks, inverse):  # noqa: ANN001, ANN201
    n, chunks = inp.shape[0], d_scale_chunks.shape[0]
    for c in prange(chunks):
        start, stop = c * n // chunks, (c + 1) * n // chunks
        if inverse:
            affine_backward_inverse_rows(inp, h, scale, d_out, d_logdet, d_inp, d_h, d_scale_chunks[c], start, stop)
        else:
            affine_backward_forward_rows(inp, h, scale, d_out, d_logdet, d_inp, d_h, d_scale_chunks[c], start, stop)


@rows_kernel
def affine_backward_serial(inp, h, scale, d_out, d_logdet, d_inp, d_h, d_scale_chunks, inverse):  # noqa: ANN001, ANN201
    n, chunks = inp.shape[0], d_scale_chunks.shape[0]
    for c in range(chunks):  # the same chunks as in parallel: the same sums, bit for bit
        start, stop = c * n // chunks, (c + 1) * n // chunks
        if inverse:
            affine_backward_inverse_rows(inp, h, scale, d_out, d_logdet, d_inp, d_h, d_scale_chunks[c], start, stop)
        else:
            affine_backward_forward_rows(inp, h, scale, d_out, d_logdet, d_inp, d_h, d_scale_chunks[c], start, stop)


# -- entry points writing into given outputs --------------------------------------------------------------
def _run(serial, parallel, elements: int, *args) -> None:  # noqa: ANN001, ANN002
    (parallel if elements >= PARALLEL_MIN_ELEMENTS else serial)(*args)


def additive_into(inp: np.ndarray, h: np.ndarray, sign: float, out: np.ndarray) -> None:
    """``out = inp + sign · h`` (forward ``sign = 1``, inverse ``−1``); all C-contiguous, one dtype."""
    _run(add_scaled_serial, add_scaled_parallel, out.size, inp, h, out.dtype.type(sign), out)


def affine_forward_into(x2, h, scale, z2, logdet, inverse: bool = False) -> None:  # noqa: ANN001
    """Forward (or, with ``inverse=True`` and ``x2`` holding ``z₂``, inverse) into ``z2, logdet``."""
    _run(affine_forward_serial, affine_forward_parallel, x2.size, x2, h, scale, z2, logdet, inverse)


def affine_backward_into(inp, h, scale, d_out, d_logdet, d_inp, d_h, d_scale_chunks, inverse: bool = False) -> None:  # noqa: ANN001
    """Backward of forward (or of inverse) into ``d_inp, d_h``; ``d_scale_chunks`` from :func:`scale_chunks`
    must be zero and gets the chunks' ``∂L/∂a``, whose column sum is ``∂L/∂a``."""
    args = (inp, h, scale, d_out, d_logdet, d_inp, d_h, d_scale_chunks, inverse)
    _run(affine_backward_serial, affine_backward_parallel, inp.size, *args)


def scale_chunks(n: int, d2: int, dtype: np.dtype) -> np.ndarray:
    """A zeroed ``(C, D₂)`` buffer for the ``∂L/∂a`` partial sums, ``C = min(N, 64)`` (≥ 1)."""
    return np.zeros((max(1, min(n, SCALE_CHUNKS)), d2), dtype=dtype)


# -- the laws, with the reference's signatures ---------------------------------------------------------------
def _c(array: np.ndarray | None) -> np.ndarray | None:
    """C-contiguous ``array`` (itself when it already is)."""
    return None if array is None else np.ascontiguousarray(array)


def require_device() -> None:
    """Nothing to check: the CPU is always there (the backend registry calls this on every module)."""


class AdditiveLaw:
    """NICE's additive law on Numba; see :mod:`nflow_np.flows.coupling_law` for the maths."""

    name = "additive"
    has_scale = False

    @staticmethod
    def out_features(d2: int) -> int:
        return d2

    @staticmethod
    def forward(x2: np.ndarray, h: np.ndarray, scale: None) -> tuple[np.ndarray, np.ndarray]:
        check_law_inputs("additive", x2, h, scale)
        z2 = np.empty(x2.shape, x2.dtype)
        additive_into(_c(x2), _c(h), 1.0, z2)
        return z2, np.zeros(x2.shape[0], x2.dtype)

    @staticmethod
    def inverse(z2: np.ndarray, h: np.ndarray, scale: None) -> tuple[np.ndarray, np.ndarray]:
        check_law_inputs("additive", z2, h, scale)
        x2 = np.empty(z2.shape, z2.dtype)
        additive_into(_c(z2), _c(h), -1.0, x2)
        return x2, np.zeros(z2.shape[0], z2.dtype)

    @staticmethod
    def backward_forward(x2, h, scale, d_z2, d_logdet):  # noqa: ANN001, ANN205 (the reference's signature)
        check_law_inputs("additive", x2, h, scale, d_z2, d_logdet)
        return d_z2, d_z2.copy(), None  # a copy is already one pass (memcpy): nothing to fuse

    @staticmethod
    def backward_inverse(z2, h, scale, d_x2, d_logdet):  # noqa: ANN001, ANN205
        check_law_inputs("additive", z2, h, scale, d_x2, d_logdet)
        return d_x2, np.negative(d_x2), None


class AffineLaw:
    """RealNVP's affine law with ``s = a ⊙ tanh(ŝ)`` on Numba; maths in the module docstring."""

    name = "affine"
    has_scale = True

    @staticmethod
    def out_features(d2: int) -> int:
        return 2 * d2

    @staticmethod
    def forward(x2: np.ndarray, h: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        check_law_inputs("affine", x2, h, scale)
        z2, logdet = np.empty(x2.shape, x2.dtype), np.empty(x2.shape[0], x2.dtype)
        affine_forward_into(_c(x2), _c(h), _c(scale), z2, logdet)
        return z2, logdet

    @staticmethod
    def inverse(z2: np.ndarray, h: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        check_law_inputs("affine", z2, h, scale)
        x2, logdet = np.empty(z2.shape, z2.dtype), np.empty(z2.shape[0], z2.dtype)
        affine_forward_into(_c(z2), _c(h), _c(scale), x2, logdet, inverse=True)
        return x2, logdet

    @staticmethod
    def backward_forward(x2, h, scale, d_z2, d_logdet):  # noqa: ANN001, ANN205
        return AffineLaw._backward(x2, h, scale, d_z2, d_logdet, inverse=False)

    @staticmethod
    def backward_inverse(z2, h, scale, d_x2, d_logdet):  # noqa: ANN001, ANN205
        return AffineLaw._backward(z2, h, scale, d_x2, d_logdet, inverse=True)

    @staticmethod
    def _backward(inp, h, scale, d_out, d_logdet, inverse: bool):  # noqa: ANN001, ANN205
        check_law_inputs("affine", inp, h, scale, d_out, d_logdet)
        (n, d2), dtype = inp.shape, inp.dtype
        d_inp, d_h, chunks = np.empty((n, d2), dtype), np.empty((n, 2 * d2), dtype), scale_chunks(n, d2, dtype)
        affine_backward_into(_c(inp), _c(h), _c(scale), _c(d_out), _c(d_logdet), d_inp, d_h, chunks, inverse)
        return d_inp, d_h, chunks.sum(axis=0)


COUPLING_LAWS: dict[str, type] = {"additive": AdditiveLaw, "affine": AffineLaw}
