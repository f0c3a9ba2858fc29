"""Input and output checks with messages that name the problem.

Public entry points (a flow's ``forward``/``inverse``, a model's ``log_prob``...) validate their
input once, and their result once (:func:`check_result`: never a silent NaN or Inf); the internal
passes they call do not check again, so the hot path pays nothing. Training data gets the fuller
:func:`check_data`, which also converts integer data explicitly.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import numpy as np

from nflow_np import backend


class NonFiniteError(ValueError):
    """A computation produced NaN or Inf from finite input; the message names the first bad row."""


class DataConversionWarning(UserWarning):
    """Integer training data was converted to the model's float dtype (exactly)."""


def check_batch(
    x: object, name: str, dim: int | None, dtype: np.dtype | None, xp: ModuleType | None = np
) -> np.ndarray:
    """Check that ``x`` is a finite float batch of shape ``(N, dim)`` and dtype ``dtype``, an array of ``xp``.

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
    xp : module or None
        The array module ``x`` must belong to (the parameters' module: ``numpy``, or ``cupy``
        on the device); ``None`` accepts a NumPy array or a device array alike.

    Returns
    -------
    array
        ``x`` itself (never a silent copy, cast or move between host and device).

    Raises
    ------
    TypeError
        Not an array of ``xp`` (a host array for a model on the device, or the other way
        round, is named as such), or an integer/object/other-precision dtype.
    ValueError
        Wrong number of dimensions or columns, no rows, or a NaN/Inf (the first one is named).
    """
    if xp is None:
        xp = backend.array_module(x)
    if not isinstance(x, xp.ndarray):
        raise TypeError(_not_an_array_of(x, name, xp))
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


def is_array_of(x: object, xp: ModuleType | None) -> bool:
    """Whether ``x`` is an array of the module ``xp`` (``None``: of NumPy or of any device module)."""
    return backend.is_array(x) if xp is None else isinstance(x, xp.ndarray)


def _not_an_array_of(x: object, name: str, xp: ModuleType) -> str:
    """The message for an ``x`` that is not an array of ``xp``, saying where it and the parameters live."""
    message = f"{name} must be a {xp.__name__}.ndarray, got {type(x).__name__}"
    given = backend.array_module(x)
    if xp is np and given is not np:
        return (
            f"{message}: a {given.__name__} (device) array, but the parameters are on the host; pass "
            f"{given.__name__}.asnumpy({name}), or move the model with .to_device() first"
        )
    if xp is not np and isinstance(x, np.ndarray):
        return (
            f"{message}: a host array, but the parameters are on the device ({xp.__name__}); pass "
            f"{xp.__name__}.asarray({name}) (FlowModel's methods move host data themselves), or move the "
            "model with .to_host()"
        )
    return message


def check_finite(x: np.ndarray, name: str) -> None:
    """Raise ``ValueError`` naming the first non-finite entry of ``x`` (row, column), if any."""
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.argwhere(~finite)
        first = tuple(int(i) for i in bad[0])
        where = ", ".join(map(str, first))
        message = f"{name} has a non-finite value {x[first]} at index ({where})"
        if x.ndim == 2:
            rows = len(np.unique(bad[:, 0]))
            message += f": row {first[0]}, column {first[1]} ({len(bad)} non-finite entries in {rows} rows)"
        raise ValueError(message)


def check_data(x: object, name: str, dim: int, dtype: np.dtype) -> np.ndarray:
    """Check a whole data set before training on it; integer data is converted, with a warning.

    Every problem is reported before the first step, in terms of the data: the wrong kind of
    array, the wrong shape, no rows, or the first NaN/Inf by row and column. Integers are
    converted to ``dtype`` explicitly (a :class:`DataConversionWarning` says so) after checking that
    every value is exactly representable; booleans, complex numbers, strings, dates and objects are
    refused, since no conversion of them is obviously right.

    Parameters
    ----------
    x : numpy.ndarray, shape (N, dim)
    name : str
        What to call it in messages (``"train"``, ``"val"``).
    dim : int
        Columns the model expects.
    dtype : numpy.dtype
        The model's float dtype.

    Returns
    -------
    numpy.ndarray
        ``x`` itself, or its float conversion if it held integers.

    Raises
    ------
    TypeError
        Not an array, or a dtype that is refused.
    ValueError
        Wrong shape, no rows, a non-finite value, or an integer too large to convert exactly.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__} (use np.asarray(...) first)")
    if x.dtype.kind in "iu":
        x = _convert_integers(x, name, dtype)
    elif x.dtype.kind != "f":
        what = {"b": "booleans", "c": "complex numbers", "O": "Python objects", "U": "strings", "S": "bytes"}
        raise TypeError(
            f"{name} has dtype {x.dtype} ({what.get(x.dtype.kind, 'not numbers')}); training data must be "
            f"float32 or float64 (or integers, converted exactly): convert it yourself, e.g. x.astype(np.{dtype})"
        )
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D with shape (N, {dim}), one row per data point, got {x.ndim}-D shape {x.shape}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: shape {x.shape}, no rows to train on")
    return check_batch(x, name, dim, dtype)


def _convert_integers(x: np.ndarray, name: str, dtype: np.dtype) -> np.ndarray:
    """``x.astype(dtype)`` after checking that every integer survives the conversion exactly."""
    exact = 2 ** (np.finfo(dtype).nmant + 1)  # every integer of magnitude <= 2^(mantissa bits + 1) is a float
    too_large = (x > exact) | (x < -exact)
    if too_large.any():
        first = tuple(int(i) for i in np.argwhere(too_large)[0])
        raise ValueError(
            f"{name} holds the integer {x[first]} at index {first}, too large to convert to {dtype} exactly "
            f"(|value| > 2^{np.finfo(dtype).nmant + 1}); scale the data first"
        )
    warnings.warn(
        f"{name} has integer dtype {x.dtype}; converted to {dtype} explicitly (pass float data to skip this step)",
        DataConversionWarning,
        stacklevel=3,
    )
    return x.astype(dtype)


def check_result(values: np.ndarray, what: str, x: np.ndarray) -> np.ndarray:
    """Raise :class:`NonFiniteError` if ``values`` (an output per row of ``x``) holds a NaN or Inf.

    Parameters
    ----------
    values : numpy.ndarray, shape (N,) or (N, D)
        The result to check, one row per row of ``x``.
    what : str
        What produced it (``"AffineCoupling.forward"``), for the message.
    x : numpy.ndarray, shape (N, D)
        The input it was computed from.

    Returns
    -------
    numpy.ndarray
        ``values`` itself.
    """
    finite = np.isfinite(values)
    if not finite.all():
        row = int(np.argwhere(~finite)[0][0])
        largest = float(np.abs(x[row]).max())
        advice = "rescale the data" + (", or use float64" if x.dtype == np.float32 else "")
        raise NonFiniteError(
            f"{what} gave a non-finite result at row {row}, whose largest |value| is {largest:.3g}: that input is "
            f"outside the range the model can map in {x.dtype} ({advice})"
        )
    return values
