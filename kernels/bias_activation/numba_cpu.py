"""Fused bias + activation for the coupling nets' hidden layers, on the CPU with Numba.

The NumPy reference is ``nflow_np.nn.bias_activation`` (this package never imports it;
``tests/kernels/bias_activation/test_numba_cpu.py`` compares the two). A hidden layer ``out = φ(x W + b)`` runs
its GEMM in BLAS and then:

forward   ``y ← φ(y + b)`` in place on the GEMM output: one read and one write per element
          (NumPy: ``y += b`` then the activation, two passes, plus a temporary for leaky ReLU);
backward  ``d_u = d_out ⊙ φ′(out)`` and the column sums ``Σ_n d_u[n]`` added to ``d_b``, in one pass
          (NumPy: a mask or factor temporary, the product, then ``sum(axis=0)``: three passes).

Measured (``docs/kernels.md#fused-bias--activation``): at the benchmark net's hidden shape
(512, 256) float32 the ReLU forward takes ~12 µs instead of ~60 and the backward ~15 instead of
~53, which is 1.2 ms of a 30 ms training step of 8 couplings.

Same bits as the reference for the ``relu`` and ``leaky_relu`` outputs and every ``∂L/∂u``: the
same operations, each rounded once, no ``fastmath`` (no FMA). The column sums are added row
after row into a zeroed accumulator, then to ``d_b`` — NumPy's order for
``d_b += d_u.sum(axis=0)`` on C-contiguous rows of several columns (for one column NumPy sums
pairwise, so the bias gradient agrees to rounding, not always bit for bit). ``tanh`` uses
:func:`kernels.common.vecmath.vtanh` (within 3 ulp of NumPy's).
NaN propagates as in NumPy: ``max(NaN, 0)`` is NaN, written ``u if not u < 0 else 0``.

Rows run on the calling thread: at the nets' sizes a parallel region costs more than it saves.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..common.vecmath import vtanh

_OPTIONS = {"error_model": "numpy", "cache": True}
_RELU, _LEAKY_RELU, _TANH = 0, 1, 2
_CODES = {"relu": _RELU, "leaky_relu": _LEAKY_RELU, "tanh": _TANH}


@njit(**_OPTIONS)
def _forward(y, b, code, slope):
    zero = y.dtype.type(0.0)
    for i in range(y.shape[0]):
        row = y[i]
        for j in range(row.shape[0]):
            u = row[j] + b[j]
            if code == _RELU:
                row[j] = u if not u < zero else zero
            elif code == _LEAKY_RELU:
                row[j] = u * (y.dtype.type(1.0) if u > zero else slope)
            else:
                row[j] = vtanh(u)


@njit(**_OPTIONS)
def _backward(d_out, out, code, slope, d_b):
    zero, one = out.dtype.type(0.0), out.dtype.type(1.0)
    d_u = np.empty_like(d_out)
    column_sums = np.zeros_like(d_b)
    for i in range(d_out.shape[0]):
        d_row, out_row, d_u_row = d_out[i], out[i], d_u[i]
        for j in range(d_row.shape[0]):
            o = out_row[j]
            if code == _RELU:
                derivative = one if o > zero else zero
            elif code == _LEAKY_RELU:
                derivative = one if o > zero else slope
            else:
                derivative = one - o * o
            value = d_row[j] * derivative
            d_u_row[j] = value
            column_sums[j] += value
    for j in range(d_b.shape[0]):
        d_b[j] += column_sums[j]
    return d_u


def _check(name: str, array: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype != dtype:
        got = (getattr(array, "shape", None), getattr(array, "dtype", type(array).__name__))
        raise ValueError(f"bias_activation: {name} must be an array of shape {shape} and dtype {dtype}, got {got}")
    if not array.flags.c_contiguous:
        raise ValueError(f"bias_activation: {name} must be C-contiguous")


def _code(activation: str) -> int:
    if activation not in _CODES:
        raise ValueError(f"unknown activation {activation!r}; choose from {list(_CODES)}")
    return _CODES[activation]


def forward(y: np.ndarray, b: np.ndarray, activation: str, slope: float) -> None:
    """``y ← φ(y + b)`` in place; the reference's signature (``y: (N, K)``, ``b: (K,)``)."""
    if getattr(y, "ndim", None) != 2 or y.dtype not in (np.float32, np.float64):
        raise ValueError(f"bias_activation: y must be a 2-d float32/float64 array, got {getattr(y, 'shape', y)}")
    _check("y", y, y.shape, y.dtype)
    if not y.flags.writeable:
        raise ValueError("bias_activation: y must be writeable (it is overwritten in place)")
    _check("b", b, (y.shape[1],), y.dtype)
    _forward(y, b, _code(activation), y.dtype.type(slope))


def backward(d_out: np.ndarray, out: np.ndarray, activation: str, slope: float, d_b: np.ndarray) -> np.ndarray:
    """``∂L/∂u = d_out ⊙ φ′(out)`` (returned) and ``d_b += Σ_n ∂L/∂u[n]``; the reference's signature."""
    if getattr(out, "ndim", None) != 2 or out.dtype not in (np.float32, np.float64):
        raise ValueError(f"bias_activation: out must be a 2-d float32/float64 array, got {getattr(out, 'shape', out)}")
    _check("out", out, out.shape, out.dtype)
    d_out = np.ascontiguousarray(d_out)  # the reference takes any layout; the loop wants rows
    _check("d_out", d_out, out.shape, out.dtype)
    _check("d_b", d_b, (out.shape[1],), out.dtype)
    return _backward(d_out, out, _code(activation), out.dtype.type(slope), d_b)


FUSED = {"bias_activation": forward, "bias_activation_backward": backward}
