"""Fused coupling-law kernels for NVIDIA GPUs with CuPy ``RawModule`` (CUDA C in ``cuda/``).

The CUDA source ``kernels/coupling/cuda/coupling.cu`` holds the maths and the launch layout (one warp per
row, log-det by warp shuffles, ``∂L/∂a`` by per-block partial sums added in a fixed order); this
module compiles it once with NVRTC (CuPy caches the binary on disk), checks arguments and
launches. In CI without a GPU, ``tests/kernels/coupling/test_ptx.py`` compiles the same file with
``nvcc --ptx`` for sm_80 and sm_90.

Arrays: CuPy arrays in, CuPy arrays out, no host copy (made C-contiguous on the device first: the
kernels index rows as ``row · D₂``): what a model on the device (``to_device()``) passes. NumPy arrays
are copied to the device and the results back (correct, not fast; see :mod:`kernels.coupling.gpu_laws`).
"""

from __future__ import annotations

from pathlib import Path

import cupy
import numpy as np

from .gpu_laws import fused_table
from .validation import check_law_inputs

SOURCE_PATH = Path(__file__).with_name("cuda") / "coupling.cu"
WARP, ROWS, BACKWARD_ROWS = 32, 8, 64  # must match the #defines of coupling.cu
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_module: cupy.RawModule | None = None


def require_device() -> None:
    """Raise ``RuntimeError`` unless CuPy sees a CUDA GPU."""
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as error:
        raise RuntimeError(f"CuPy finds no usable CUDA device: {error}") from error
    if count < 1:
        raise RuntimeError("CuPy finds no CUDA device")


def _kernel(name: str, dtype: np.dtype) -> cupy.RawKernel:
    global _module
    if _module is None:
        _module = cupy.RawModule(code=SOURCE_PATH.read_text(encoding="utf-8"), options=("--std=c++14",))
    return _module.get_function(f"{name}_{_SUFFIX[np.dtype(dtype)]}")


def _blocks(count: int, per_block: int) -> int:
    return max(1, -(-count // per_block))


class _Device:
    """Puts one call's arguments on the GPU (C-contiguous) and returns results as the caller's kind."""

    def __init__(self, like: object) -> None:
        self.host = isinstance(like, np.ndarray)

    @staticmethod
    def put(array: object) -> object:
        return None if array is None else cupy.ascontiguousarray(cupy.asarray(array))

    def get(self, array: object) -> object:
        return cupy.asnumpy(array) if self.host else array


def _additive(inp, h, scale, sign):
    """CuPy's own elementwise kernels are already single-pass here: ``out = inp ± h``."""
    dtype = check_law_inputs("additive", inp, h, scale)
    device = _Device(inp)
    a, b = device.put(inp), device.put(h)
    out = a + b if sign > 0 else a - b
    return device.get(out), device.get(cupy.zeros(inp.shape[0], dtype=dtype))


def _additive_backward(d_out, sign, check_args):
    check_law_inputs("additive", *check_args)
    device = _Device(d_out)
    d_h = device.put(d_out)
    return d_out, device.get(d_h.copy() if sign > 0 else -d_h), None


def _affine(inp, h, scale, sign):
    dtype = check_law_inputs("affine", inp, h, scale)
    device = _Device(inp)
    n, d2 = inp.shape
    out, logdet = cupy.empty((n, d2), dtype=dtype), cupy.empty(n, dtype=dtype)
    if n:
        args = (device.put(inp), device.put(h), device.put(scale), dtype.type(sign), out, logdet)
        _kernel("affine_forward", dtype)((_blocks(n, ROWS),), (WARP, ROWS), (*args, np.int64(n), np.int64(d2)))
    return device.get(out), device.get(logdet)


def _affine_backward(inp, h, scale, d_out, d_logdet, sign):
    dtype = check_law_inputs("affine", inp, h, scale, d_out, d_logdet)
    device = _Device(inp)
    n, d2 = inp.shape
    blocks = _blocks(n, BACKWARD_ROWS)
    d_inp, d_h = cupy.empty((n, d2), dtype=dtype), cupy.empty((n, 2 * d2), dtype=dtype)
    partial, d_scale = cupy.zeros((blocks, d2), dtype=dtype), cupy.empty(d2, dtype=dtype)
    if n:
        args = tuple(device.put(a) for a in (inp, h, scale, d_out, d_logdet))
        _kernel("affine_backward", dtype)(
            (blocks,), (WARP, ROWS), (*args, dtype.type(sign), d_inp, d_h, partial, np.int64(n), np.int64(d2))
        )
    if d2:
        _kernel("column_sum", dtype)((_blocks(d2, 128),), (128,), (partial, d_scale, np.int64(blocks), np.int64(d2)))
    return device.get(d_inp), device.get(d_h), device.get(d_scale)


FUSED = fused_table(_additive, _additive_backward, _affine, _affine_backward)
"""Both laws, every direction and its VJP (``nflow_np.backend.fused`` names)."""
