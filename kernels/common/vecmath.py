"""Vectorisable ``exp`` and ``tanh`` for Numba CPU kernels, float64 and float32.

Why: the Numba wheel from PyPI has no SVML, so ``math.exp``/``math.tanh`` inside a loop become
scalar libm calls and the loop cannot be vectorised (a fused loop is then *slower* than NumPy's
SIMD ufuncs). These functions use only ``+ − × ÷``, comparisons and integer bit operations, which
LLVM turns into AVX/AVX-512 code. Derivation and measured accuracy: ``docs/kernels.md#exp-and-tanh``.

exp(x)  (Cody–Waite range reduction, Taylor polynomial, exponent built from integer bits)
    ``k = round(x / ln 2)``, ``r = x − k·ln 2`` with ``|r| ≤ ln2/2`` (``ln 2 = hi + lo``, ``k·hi``
    exact), ``exp(x) = 2^k · (1 + q(r))`` with ``q(r) = r + r²/2! + … + r^m/m!`` the truncated
    series of ``expm1`` (m = 13 for float64, 7 for float32: truncation < 0.15 ulp). ``k`` comes
    from the bits of ``x/ln2 + 1.5·2^p`` (p = 52 or 23: adding the shift rounds to an integer, which
    then sits in the low mantissa bits) and ``2^k`` is ``(k + bias) << p`` reinterpreted as a
    float. ``2^k`` is applied as ``2^⌊k/2⌋ · 2^(k−⌊k/2⌋)`` so that subnormal results and overflow to
    ``inf`` come out right without a branch. NaN propagates; ±inf give inf and 0.

tanh(x)  (fdlibm's form, one expm1 for every |x|)
    ``t = expm1(−2|x|) ∈ (−1, 0]``, ``tanh|x| = −t / (t + 2)``, sign restored with copysign.
    ``expm1(y) = 2^k·q(r) + (2^k − 1)`` is accurate relative to its value for small ``y`` too (no
    ``exp(y) − 1`` cancellation). ``|x| ≥ 20`` (float64) / ``10`` (float32) is clamped: tanh is
    exactly ±1 there.

The public names :func:`vexp` and :func:`vtanh` are plain NumPy functions in Python and dispatch,
inside ``@njit`` code, to the float64 or float32 implementation by the argument's type. They are
compiled with ``fastmath={"contract"}`` only (FMA allowed, no reassociation: reassociation would
fold the ``+ shift − shift`` rounding and the two-constant range reduction and ruin the result)
and ``error_model="numpy"`` (no zero-division branch, which would block vectorisation).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

HELPER_OPTIONS = {"fastmath": {"contract"}, "error_model": "numpy", "cache": True}
helper = njit(**HELPER_OPTIONS)

# -- float64 constants ----------------------------------------------------------------------------
_LOG2E_64 = 1.4426950408889634
_LN2_HI_64 = 6.93147180369123816490e-01  # 32 significant bits: k·hi is exact for |k| < 2^20
_LN2_LO_64 = 1.90821492927058770002e-10  # ln 2 − hi
_SHIFT_64 = 6755399441055744.0  # 1.5·2^52
_SHIFT_BITS_64 = np.int64(np.float64(_SHIFT_64).view(np.int64))
_EXP_HI_64 = 710.0  # exp(710) = inf; exp(x) overflows above 709.78
_EXP_LO_64 = -746.0  # exp(−746) = 0; exp(x) underflows to 0 below −745.13
_TANH_LO_64 = -40.0  # expm1(−40) = −1 in float64, so tanh|x| = 1 for |x| ≥ 20
_TANH_SWITCH_64 = -1.1  # −2|x| above this (|x| < 0.55, tanh < 0.5): the expm1 form
_EXPM1_TAIL_64 = tuple(1.0 / float(np.prod(np.arange(1, m + 1, dtype=np.float64))) for m in range(2, 14))
(_C2, _C3, _C4, _C5, _C6, _C7, _C8, _C9, _C10, _C11, _C12, _C13) = _EXPM1_TAIL_64

# -- float32 constants ----------------------------------------------------------------------------
_LOG2E_32 = np.float32(1.4426950408889634)
_LN2_HI_32 = np.float32(0.693359375)  # 9 significant bits: k·hi is exact for |k| < 2^15
_LN2_LO_32 = np.float32(-2.12194440e-4)
_SHIFT_32 = np.float32(12582912.0)  # 1.5·2^23
_SHIFT_BITS_32 = np.int32(np.float32(_SHIFT_32).view(np.int32))
_EXP_HI_32 = np.float32(89.0)  # exp overflows above 88.72
_EXP_LO_32 = np.float32(-104.0)  # exp underflows to 0 below −103.97
_TANH_LO_32 = np.float32(-20.0)  # expm1(−20) = −1 in float32, so tanh|x| = 1 for |x| ≥ 10
_TANH_SWITCH_32 = np.float32(-1.1)
_ONE_32 = np.float32(1.0)
_TWO_32 = np.float32(2.0)
_MINUS_TWO_32 = np.float32(-2.0)
_F2, _F3, _F4, _F5, _F6, _F7 = (np.float32(c) for c in _EXPM1_TAIL_64[:6])
_BIAS_32 = np.int32(127)
_MANT_32 = np.int32(23)
_ONE_I32 = np.int32(1)


# -- float64 ----------------------------------------------------------------------------------------
@helper
def _reduce_64(x: float) -> tuple[int, float, float]:
    """``x = k·ln2 + r``: returns ``(k, k as float, r)``."""
    shifted = x * _LOG2E_64 + _SHIFT_64
    k = np.float64(shifted).view(np.int64) - _SHIFT_BITS_64
    kf = shifted - _SHIFT_64
    r = (x - kf * _LN2_HI_64) - kf * _LN2_LO_64
    return k, kf, r


@helper
def _expm1_poly_64(r: float) -> float:
    """``expm1(r)`` for ``|r| ≤ ln2/2``: Taylor to degree 13 (truncation < 2e-17 relative)."""
    tail = _C12 + r * _C13
    tail = _C11 + r * tail
    tail = _C10 + r * tail
    tail = _C9 + r * tail
    tail = _C8 + r * tail
    tail = _C7 + r * tail
    tail = _C6 + r * tail
    tail = _C5 + r * tail
    tail = _C4 + r * tail
    tail = _C3 + r * tail
    tail = _C2 + r * tail
    return r + (r * r) * tail


@helper
def _pow2_64(k: int) -> float:
    """``2^k`` for ``−1022 ≤ k ≤ 1023`` from its bits."""
    return np.int64((k + 1023) << 52).view(np.float64)


@helper
def _exp_64(x: float) -> float:
    if x > _EXP_HI_64:  # written so that NaN falls through both tests
        x = _EXP_HI_64
    if x < _EXP_LO_64:
        x = _EXP_LO_64
    k, _, r = _reduce_64(x)
    p = 1.0 + _expm1_poly_64(r)
    k_half = k >> 1
    return (p * _pow2_64(k_half)) * _pow2_64(k - k_half)


@helper
def _tanh_64(x: float) -> float:
    y = -2.0 * abs(x)
    if y < _TANH_LO_64:
        y = _TANH_LO_64
    k, _, r = _reduce_64(y)
    two_k = _pow2_64(k)
    q = _expm1_poly_64(r)
    small = y > _TANH_SWITCH_64
    # small |x|: tanh = −t/(t + 2), t = expm1(y) (2^k − 1 is exact for −58 ≤ k ≤ 0);
    # large |x|: tanh = 1 − 2u/(1 + u), u = exp(y): one rounding away from 1, so < 1 ulp there.
    t = two_k * q + (two_k - 1.0)
    u = two_k * (1.0 + q)
    ratio = (-t if small else 2.0 * u) / (t + 2.0 if small else 1.0 + u)
    return math.copysign(ratio if small else 1.0 - ratio, x)


# -- float32 ----------------------------------------------------------------------------------------
@helper
def _reduce_32(x: np.float32) -> tuple[np.int32, np.float32, np.float32]:
    shifted = x * _LOG2E_32 + _SHIFT_32
    k = np.int32(np.float32(shifted).view(np.int32) - _SHIFT_BITS_32)
    kf = shifted - _SHIFT_32
    r = (x - kf * _LN2_HI_32) - kf * _LN2_LO_32
    return k, kf, r


@helper
def _expm1_poly_32(r: np.float32) -> np.float32:
    """``expm1(r)`` for ``|r| ≤ ln2/2``: Taylor to degree 7 (truncation < 2e-8 relative)."""
    tail = _F6 + r * _F7
    tail = _F5 + r * tail
    tail = _F4 + r * tail
    tail = _F3 + r * tail
    tail = _F2 + r * tail
    return r + (r * r) * tail


@helper
def _pow2_32(k: np.int32) -> np.float32:
    return np.int32((k + _BIAS_32) << _MANT_32).view(np.float32)


@helper
def _exp_32(x: np.float32) -> np.float32:
    if x > _EXP_HI_32:
        x = _EXP_HI_32
    if x < _EXP_LO_32:
        x = _EXP_LO_32
    k, _, r = _reduce_32(x)
    p = _ONE_32 + _expm1_poly_32(r)
    k_half = np.int32(k >> _ONE_I32)
    return (p * _pow2_32(k_half)) * _pow2_32(np.int32(k - k_half))


@helper
def _tanh_32(x: np.float32) -> np.float32:
    y = _MINUS_TWO_32 * abs(x)
    if y < _TANH_LO_32:
        y = _TANH_LO_32
    k, _, r = _reduce_32(y)
    two_k = _pow2_32(k)
    q = _expm1_poly_32(r)
    small = y > _TANH_SWITCH_32
    t = two_k * q + (two_k - _ONE_32)
    u = two_k * (_ONE_32 + q)
    ratio = (-t if small else _TWO_32 * u) / (t + _TWO_32 if small else _ONE_32 + u)
    return math.copysign(ratio if small else _ONE_32 - ratio, x)


# -- dispatch by type, usable from @njit code --------------------------------------------------------
def vexp(x: np.ndarray) -> np.ndarray:
    """``exp(x)``; in ``@njit`` code, the vectorisable float64/float32 implementation above."""
    return np.exp(x)


def vtanh(x: np.ndarray) -> np.ndarray:
    """``tanh(x)``; in ``@njit`` code, the vectorisable float64/float32 implementation above."""
    return np.tanh(x)


def _by_type(impl_64: object, impl_32: object):
    def choose(x):
        if x == types.float64:
            return lambda x: impl_64(x)
        if x == types.float32:
            return lambda x: impl_32(x)
        return None

    return choose


overload(vexp, jit_options=HELPER_OPTIONS)(_by_type(_exp_64, _exp_32))
overload(vtanh, jit_options=HELPER_OPTIONS)(_by_type(_tanh_64, _tanh_32))


@njit(fastmath={"reassoc", "contract", "nsz"}, error_model="numpy", cache=True)
def exp_array(x: np.ndarray) -> np.ndarray:
    """:func:`vexp` over a 1-d array (for measuring it; compiled with the kernels' flags)."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = vexp(x[i])
    return out


@njit(fastmath={"reassoc", "contract", "nsz"}, error_model="numpy", cache=True)
def tanh_array(x: np.ndarray) -> np.ndarray:
    """:func:`vtanh` over a 1-d array (for measuring it; compiled with the kernels' flags)."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = vtanh(x[i])
    return out
