"""Argument checks shared by every kernel backend (NumPy only, no compiler needed).

A compiled kernel reads memory by index without bounds checks, so the shapes and dtypes the
NumPy reference would broadcast or promote are *rejected* here with a message, before any kernel
runs. The rules, for ``x2: (N, D₂)`` (or ``z2``):

- every array is 2-d/1-d as documented and has the same dtype, float32 or float64 (no implicit
  promotion: a float32 model with a float64 ``d_logdet`` is a bug worth hearing about);
- ``h: (N, out_features(D₂))``, ``scale: (D₂,)`` (affine) or ``None`` (additive),
  ``d_out: (N, D₂)``, ``d_logdet: (N,)``.

Non-contiguous arrays (the coupling layer passes column views such as ``x[:, ::2]``) are
accepted; each backend says what it does with them.
"""

from __future__ import annotations

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_law_inputs(
    law: str,
    x2: np.ndarray,
    h: np.ndarray,
    scale: np.ndarray | None,
    d_out: np.ndarray | None = None,
    d_logdet: np.ndarray | None = None,
) -> np.dtype:
    """Check the arguments of a coupling-law call and return their common dtype.

    Parameters
    ----------
    law : {"additive", "affine"}
    x2 : array, shape (N, D₂)
        The transformed half (``x₂`` for forward, ``z₂`` for inverse).
    h : array, shape (N, D₂) (additive) or (N, 2·D₂) (affine)
    scale : array, shape (D₂,), or None for the additive law
    d_out, d_logdet : arrays, shapes (N, D₂) and (N,), for the backward functions

    Raises
    ------
    TypeError
        A dtype other than float32/float64, or dtypes that differ.
    ValueError
        A shape that does not fit ``x2``.
    """
    if getattr(x2, "ndim", None) != 2:
        raise ValueError(f"x2 must be a 2-d array (N, D2), got shape {getattr(x2, 'shape', type(x2).__name__)}")
    n, d2 = x2.shape
    width = 2 * d2 if law == "affine" else d2
    arrays = {"x2": x2, "h": h}
    expected = {"x2": (n, d2), "h": (n, width)}
    if law == "affine":
        arrays["scale"], expected["scale"] = scale, (d2,)
    if d_out is not None or d_logdet is not None:
        arrays["d_out"], expected["d_out"] = d_out, (n, d2)
        arrays["d_logdet"], expected["d_logdet"] = d_logdet, (n,)
    dtype = np.dtype(x2.dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"kernels take float32 or float64 arrays, got x2 of dtype {dtype}")
    for name, array in arrays.items():
        shape = getattr(array, "shape", None)
        if shape != expected[name]:
            got = shape if shape is not None else type(array).__name__
            raise ValueError(f"{law} law: {name} must have shape {expected[name]} (x2 is {x2.shape}), got {got}")
        if np.dtype(array.dtype) != dtype:
            raise TypeError(f"{law} law: {name} has dtype {array.dtype} but x2 has {dtype}; cast them to one dtype")
    return dtype
