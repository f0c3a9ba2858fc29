"""Input checks with messages that name the problem.

Public entry points (a flow's ``forward``/``inverse``, a model's ``log_prob``...) validate their
input once; the internal passes they call do not check again, so the hot path pays nothing.
"""

from __future__ import annotations

import numpy as np


def check_batch(x: object, name: str, dim: int | None, dtype: np.dtype | None) -> np.ndarray:
    """Check that ``x`` is a finite float batch of shape ``(N, dim)`` and dtype ``dtype``.

    Parameters
    ----------
    x : array-like
        The batch to check.
    name : str
        What to call it in error messages (``"x"``, ``"z"``...).
    dim : int or None
        Required number of columns; ``None`` accepts any.
    dtype : numpy.dtype or None
        Required dtype (the dtype of the parameters it meets); ``None`` accepts float32 or float64.

    Returns
    -------
    numpy.ndarray
        ``x`` itself (never a silent copy or cast).

    Raises
    ------
    TypeError
        Not a NumPy array, or an integer/object/other-precision dtype.
    ValueError
        Wrong number of dimensions or columns, no rows, or a NaN/Inf (the first one is named).
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype.kind != "f" or x.dtype not in (np.float32, np.float64):
        raise TypeError(
            f"{name} has dtype {x.dtype}; expected float32 or float64 (convert explicitly, e.g. x.astype(np.float64))"
        )
    if dtype is not None and x.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the parameters are {dtype}; "
            f"pass {name}.astype(np.{dtype}) or convert the model with .astype(np.{x.dtype})"
        )
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D with shape (N, D), got {x.ndim}-D shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has {x.shape[1]} columns but this flow works in dimension {dim}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: shape {x.shape}")
    check_finite(x, name)
    return x


def check_finite(x: np.ndarray, name: str) -> None:
    """Raise ``ValueError`` naming the first non-finite entry of ``x`` (row, column), if any."""
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        where = ", ".join(str(int(i)) for i in bad)
        raise ValueError(f"{name} has a non-finite value {x[tuple(bad)]} at index ({where})")
