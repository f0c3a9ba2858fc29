"""Fused coupling-law kernels for NVIDIA GPUs with ``numba.cuda``; same maths as ``kernels.coupling.numba_cpu``.

Layout (``docs/kernels.md#numba-cuda``): a thread block is ``(32, ROWS)`` threads, one warp per
row of a *row tile*; lane ``ℓ`` handles columns ``ℓ, ℓ + 32, …``, so each warp reads a row in
coalesced 128-byte pieces.

- forward / inverse: the block's tile is ``ROWS`` rows; each lane sums its ``s`` values and the
  warp's 32 partial sums are reduced in shared memory (a tree of halvings) into the row's log-det.
  Shared memory rather than warp shuffles because the CUDA simulator, which runs these kernels
  in CI, has no shuffles;
- backward: the tile is ``BACKWARD_ROWS`` rows and the loop runs over column chunks of 32; each
  lane keeps ``Σ ∂L/∂s ⊙ g`` for its column over the warp's rows in a register, the ``ROWS`` warps'
  sums are added in shared memory and written to ``partial[block, column]``; a second kernel adds
  the blocks' rows in a fixed order. No atomics, so ``∂L/∂a`` is bit-for-bit reproducible.

``exp``/``tanh`` are CUDA's libdevice functions (accurate to 1–2 ulp; not ``fastmath``). Shared
memory and the log-det are float64 for both dtypes (32 additions per row: negligible cost).

Arrays: each law accepts arrays with ``__cuda_array_interface__`` (CuPy, Numba device arrays; no
copy: what a model on the device, ``to_device()``, passes) or NumPy arrays (copied to the device and
the results back: correct, not fast; for a model left on the host, tests and the simulator), and
returns the kind it was given: CuPy arrays for CuPy inputs, NumPy for NumPy, else Numba device arrays.
Inputs should be C-contiguous on the device (strided ones work, uncoalesced).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float64

from .gpu_laws import fused_table
from .validation import check_law_inputs

WARP = 32
ROWS = 8
"""Warps (rows) per block: blocks are ``(WARP, ROWS)`` = 256 threads."""
BACKWARD_ROWS = 64
"""Rows per block in the backward kernels (each warp does ``BACKWARD_ROWS / ROWS`` of them)."""


def require_device() -> None:
    """Raise ``RuntimeError`` unless a CUDA GPU (or the CUDA simulator) is usable."""
    if not cuda.is_available():
        raise RuntimeError("numba.cuda.is_available() is False: no CUDA GPU or driver found")


# -- additive law -------------------------------------------------------------------------------------
@cuda.jit
def add_scaled_kernel(a, b, factor, out):
    """``out = a + factor · b`` elementwise (additive forward ``factor = 1``, inverse ``−1``)."""
    i, j = cuda.grid(2)
    if i < out.shape[0] and j < out.shape[1]:
        out[i, j] = a[i, j] + factor * b[i, j]


@cuda.jit
def scaled_kernel(src, factor, out):
    """``out = factor · src`` (the additive law's ``∂L/∂h = ±d_out``) and logdets' zeros."""
    i, j = cuda.grid(2)
    if i < out.shape[0] and j < out.shape[1]:
        out[i, j] = factor * src[i, j]


@cuda.jit
def fill_kernel(value, out):
    i = cuda.grid(1)
    if i < out.shape[0]:
        out[i] = value


# -- affine law ----------------------------------------------------------------------------------------
@cuda.jit
def affine_forward_kernel(x2, h, scale, sign, out, logdet):
    """``sign = 1``: forward ``out = x₂ ⊙ exp(s) + t``, ``logdet = Σ s``.
    ``sign = −1``: inverse with ``x2`` holding ``z₂``: ``out = (z₂ − t) ⊙ exp(−s)``, ``logdet = −Σ s``.
    """
    shared = cuda.shared.array((ROWS, WARP), float64)
    lane, row_in_block = cuda.threadIdx.x, cuda.threadIdx.y
    row = cuda.blockIdx.x * ROWS + row_in_block
    n, d2 = x2.shape
    row_sum = 0.0
    if row < n:
        for j in range(lane, d2, WARP):
            s = scale[j] * math.tanh(h[row, j])
            if sign > 0:
                out[row, j] = x2[row, j] * math.exp(s) + h[row, d2 + j]
            else:
                out[row, j] = (x2[row, j] - h[row, d2 + j]) * math.exp(-s)
            row_sum += s
    # the warp's 32 partial sums → shared[row_in_block, 0], halving the active lanes each step
    # (written inline: a cuda.jit device function would need a GPU to compile_ptx)
    shared[row_in_block, lane] = row_sum
    cuda.syncthreads()
    stride = WARP // 2
    while stride > 0:
        if lane < stride:
            shared[row_in_block, lane] += shared[row_in_block, lane + stride]
        cuda.syncthreads()
        stride //= 2
    if row < n and lane == 0:
        logdet[row] = sign * shared[row_in_block, 0]


@cuda.jit
def affine_backward_kernel(inp, h, scale, d_out, d_logdet, sign, d_inp, d_h, partial):
    """Backward of forward (``sign = 1``, ``inp = x₂``, ``d_out = ∂L/∂z₂``) or of inverse
    (``sign = −1``, ``inp = z₂``, ``d_out = ∂L/∂x₂``); ``partial[block, j]`` gets the block's
    ``Σ ∂L/∂s ⊙ g``."""
    shared = cuda.shared.array((ROWS, WARP), float64)
    lane, row_in_block = cuda.threadIdx.x, cuda.threadIdx.y
    first = cuda.blockIdx.x * BACKWARD_ROWS
    n, d2 = inp.shape
    one = inp.dtype.type(1.0)
    for start in range(0, d2, WARP):
        j = start + lane
        d_a = 0.0
        if j < d2:
            a = scale[j]
            for r in range(row_in_block, BACKWARD_ROWS, ROWS):
                row = first + r
                if row < n:
                    g = math.tanh(h[row, j])
                    if sign > 0:  # z₂ = x₂ e + t
                        d_x = d_out[row, j] * math.exp(a * g)
                        d_s = d_x * inp[row, j] + d_logdet[row]
                        d_inp[row, j] = d_x
                        d_h[row, d2 + j] = d_out[row, j]
                    else:  # x₂ = (z₂ − t) e⁻¹
                        e_inv = math.exp(-(a * g))
                        d_z = d_out[row, j] * e_inv
                        d_s = -d_out[row, j] * ((inp[row, j] - h[row, d2 + j]) * e_inv) - d_logdet[row]
                        d_inp[row, j] = d_z
                        d_h[row, d2 + j] = -d_z
                    d_h[row, j] = d_s * a * (one - g * g)
                    d_a += d_s * g
        shared[row_in_block, lane] = d_a
        cuda.syncthreads()
        stride = ROWS // 2
        while stride > 0:
            if row_in_block < stride:
                shared[row_in_block, lane] += shared[row_in_block + stride, lane]
            cuda.syncthreads()
            stride //= 2
        if row_in_block == 0 and j < d2:
            partial[cuda.blockIdx.x, j] = shared[0, lane]
        cuda.syncthreads()


@cuda.jit
def column_sum_kernel(partial, out):
    """``out[j] = Σ_b partial[b, j]``, in block order (deterministic)."""
    j = cuda.grid(1)
    if j < out.shape[0]:
        total = 0.0
        for b in range(partial.shape[0]):
            total += partial[b, j]
        out[j] = total


KERNELS = {
    "add_scaled_kernel": add_scaled_kernel,
    "scaled_kernel": scaled_kernel,
    "fill_kernel": fill_kernel,
    "affine_forward_kernel": affine_forward_kernel,
    "affine_backward_kernel": affine_backward_kernel,
    "column_sum_kernel": column_sum_kernel,
}
"""Every kernel of this module by name (the PTX test compiles each)."""


# -- arrays in, arrays out ------------------------------------------------------------------------------
class _Device:
    """Moves one call's arguments to the GPU and hands results back as the caller's kind of array."""

    def __init__(self, like: object) -> None:
        self.host = not hasattr(like, "__cuda_array_interface__")
        self.cupy = None
        if not self.host and type(like).__module__.startswith("cupy"):
            import cupy

            self.cupy = cupy

    def put(self, array: object) -> object:
        if array is None:
            return None
        if self.host:
            return cuda.to_device(np.ascontiguousarray(array))
        return array

    def empty(self, shape: tuple, dtype: np.dtype) -> object:
        if self.cupy is not None:
            return self.cupy.empty(shape, dtype=dtype)
        return cuda.device_array(shape, dtype=dtype)

    def get(self, array: object) -> object:
        return array.copy_to_host() if self.host else array


def _blocks(count: int, per_block: int) -> int:
    return max(1, -(-count // per_block))


def _launch_2d(kernel: object, shape: tuple, *args: object) -> None:
    threads = (16, 16)
    if shape[0] and shape[1]:
        kernel[(_blocks(shape[0], 16), _blocks(shape[1], 16)), threads](*args)


def _zeros_1d(device: _Device, n: int, dtype: np.dtype) -> object:
    out = device.empty((n,), dtype)
    if n:
        fill_kernel[_blocks(n, 256), 256](dtype.type(0.0), out)
    return out


def _additive(inp, h, scale, sign):
    dtype = check_law_inputs("additive", inp, h, scale)
    device = _Device(inp)
    a, b = device.put(inp), device.put(h)
    out = device.empty(inp.shape, dtype)
    _launch_2d(add_scaled_kernel, inp.shape, a, b, dtype.type(sign), out)
    return device.get(out), device.get(_zeros_1d(device, inp.shape[0], dtype))


def _additive_backward(d_out, sign, check_args):
    dtype = check_law_inputs("additive", *check_args)
    device = _Device(d_out)
    src = device.put(d_out)
    d_h = device.empty(d_out.shape, dtype)
    _launch_2d(scaled_kernel, d_out.shape, src, dtype.type(sign), d_h)
    return d_out, device.get(d_h), None


def _affine(inp, h, scale, sign):
    dtype = check_law_inputs("affine", inp, h, scale)
    device = _Device(inp)
    n, d2 = inp.shape
    out, logdet = device.empty((n, d2), dtype), device.empty((n,), dtype)
    if n:
        affine_forward_kernel[_blocks(n, ROWS), (WARP, ROWS)](
            device.put(inp), device.put(h), device.put(scale), dtype.type(sign), out, logdet
        )
    return device.get(out), device.get(logdet)


def _affine_backward(inp, h, scale, d_out, d_logdet, sign):
    dtype = check_law_inputs("affine", inp, h, scale, d_out, d_logdet)
    device = _Device(inp)
    n, d2 = inp.shape
    blocks = _blocks(n, BACKWARD_ROWS)
    d_inp, d_h = device.empty((n, d2), dtype), device.empty((n, 2 * d2), dtype)
    partial, d_scale = device.empty((blocks, d2), dtype), device.empty((d2,), dtype)
    if n:
        args = (device.put(inp), device.put(h), device.put(scale), device.put(d_out), device.put(d_logdet))
        affine_backward_kernel[blocks, (WARP, ROWS)](*args, dtype.type(sign), d_inp, d_h, partial)
        column_sum_kernel[_blocks(d2, 128), 128](partial, d_scale)
    else:
        d_scale = _zeros_1d(device, d2, dtype)
    return device.get(d_inp), device.get(d_h), device.get(d_scale)


FUSED = fused_table(_additive, _additive_backward, _affine, _affine_backward)
"""Both laws, every direction and its VJP (``nflow_np.backend.fused`` names)."""
