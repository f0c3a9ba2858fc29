"""A strict stand-in for CuPy, so the array-module seam is tested on a machine without a GPU.

``fake_device`` is an array module (an ``xp``) whose :class:`ndarray` wraps a NumPy array and behaves
like ``cupy.ndarray`` wherever the difference matters to the library:

- no implicit conversion to NumPy: ``numpy.asarray(a)`` (``__array__``) raises ``TypeError``, as CuPy's
  does; the only way to the host is :meth:`ndarray.get` / :func:`asnumpy` (counted in :data:`transfers`);
- a NumPy array never meets a device array: a ufunc, a NumPy function (``__array_function__``) or an
  assignment ``a[...] = host`` that mixes them raises ``TypeError`` (CuPy: "Unsupported type
  numpy.ndarray"); Python and NumPy *scalars* are fine, as in CuPy;
- every result is again a device array, reductions included (0-d arrays, like CuPy's), and ``float()``,
  ``int()``, ``bool()`` of a one-element array are allowed (CuPy synchronises and copies the scalar);
- NumPy functions dispatch only when CuPy has a function of that name (:data:`DISPATCHED`), otherwise
  NumPy raises ``TypeError`` as it does for CuPy arrays;
- integer or boolean NumPy arrays are accepted as *indices* (CuPy copies them to the device).

With the NumPy reference laws registered as a backend on this module (``tests/test_device.py``) the
whole library runs on these arrays, so any code path that would silently go through the host, or mix
host and device arrays, fails here as it would on a GPU.
"""

from __future__ import annotations

import numpy as np

float32, float64, bool_, int64, intp = np.float32, np.float64, np.bool_, np.int64, np.intp
newaxis = None

transfers = {"to_host": 0, "to_device": 0}
"""Copies between host and device of whole arrays (``get``/``asnumpy`` and ``asarray``/``array`` of host data)."""

DISPATCHED = frozenset(
    {
        "all", "allclose", "any", "argmax", "argmin", "argsort", "argwhere", "array_equal",
        "broadcast_to", "clip", "concatenate", "copy", "count_nonzero", "cumsum", "diff", "dot", "einsum",
        "empty_like", "flatnonzero", "full_like", "isclose", "matmul", "max", "mean", "min", "nonzero", "norm",
        "ones_like", "prod", "ravel", "repeat", "reshape", "sort", "squeeze", "stack", "std", "sum", "take",
        "tensordot", "transpose", "unique", "var", "vdot", "where", "zeros_like",
    }
)  # fmt: skip
"""NumPy functions that CuPy implements under the same name (the ones the library could call). NumPy's
converters (``asarray``, ``ascontiguousarray``, ``array``) do not dispatch at all: they call ``__array__``."""


def _refuse_host(value: object, where: str) -> None:
    if isinstance(value, np.ndarray):
        raise TypeError(
            f"Unsupported type {type(value)} in {where}: a host numpy.ndarray met a fake_device array "
            "(CuPy refuses this too; move one of them explicitly)"
        )


def _unwrap(value: object, where: str) -> object:
    """The NumPy data of device arrays in ``value`` (nested in tuples, lists, dicts); host arrays refused."""
    if isinstance(value, ndarray):
        return value._data
    _refuse_host(value, where)
    if isinstance(value, tuple | list):
        return type(value)(_unwrap(item, where) for item in value)
    if isinstance(value, dict):
        return {key: _unwrap(item, where) for key, item in value.items()}
    return value


def _wrap(value: object) -> object:
    """Device arrays for the NumPy arrays and scalars in a result (CuPy returns 0-d arrays, not scalars)."""
    if isinstance(value, np.ndarray | np.generic):
        return ndarray(np.asarray(value))
    if isinstance(value, tuple | list):
        return type(value)(_wrap(item) for item in value)
    return value


def _index(key: object) -> object:
    """An index with device arrays unwrapped; NumPy index arrays are allowed (CuPy uploads them)."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, ndarray):
        return key._data
    if isinstance(key, np.ndarray) and key.dtype.kind not in "biu":
        raise IndexError(f"arrays used as indices must be of integer or boolean type, got {key.dtype}")
    return key


class ndarray(np.lib.mixins.NDArrayOperatorsMixin):
    """A device array: NumPy data that refuses to meet the host implicitly."""

    __array_priority__ = 1000

    def __init__(self, data: np.ndarray) -> None:
        if not isinstance(data, np.ndarray):
            raise TypeError(f"fake_device.ndarray wraps a numpy.ndarray, got {type(data).__name__}")
        self._data = data

    # -- the host boundary --------------------------------------------------------------------
    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy "
            "array explicitly. (fake_device, like CuPy)"
        )

    def get(self) -> np.ndarray:
        """A host copy (CuPy: device → host transfer)."""
        transfers["to_host"] += 1
        return self._data.copy()

    def item(self) -> object:
        return self._data.item()

    def __float__(self) -> float:
        return float(self._data)

    def __int__(self) -> int:
        return int(self._data)

    def __bool__(self) -> bool:
        return bool(self._data)

    def __format__(self, spec: str) -> str:
        return format(self._data, spec)

    def __repr__(self) -> str:
        return f"fake_device.{self._data!r}"

    def __str__(self) -> str:
        return str(self._data)

    # -- dispatch -------------------------------------------------------------------------------
    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: object, **kwargs: object) -> object:
        where = f"numpy.{ufunc.__name__}"
        out = kwargs.pop("out", None)
        kwargs = _unwrap(kwargs, where)
        if out is not None:
            for target in out:
                if not isinstance(target, ndarray):
                    raise TypeError(f"{where}: output of type {type(target).__name__} for fake_device inputs")
            kwargs["out"] = tuple(target._data for target in out)
        result = getattr(ufunc, method)(*_unwrap(list(inputs), where), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func: object, types: object, args: tuple, kwargs: dict) -> object:
        if func.__name__ not in DISPATCHED:
            return NotImplemented  # NumPy then raises TypeError, as for a CuPy array
        where = f"numpy.{func.__name__}"
        return _wrap(func(*_unwrap(args, where), **_unwrap(kwargs, where)))

    # -- array attributes and methods ---------------------------------------------------------------
    shape = property(lambda self: self._data.shape)
    dtype = property(lambda self: self._data.dtype)
    ndim = property(lambda self: self._data.ndim)
    size = property(lambda self: self._data.size)
    nbytes = property(lambda self: self._data.nbytes)
    itemsize = property(lambda self: self._data.itemsize)
    strides = property(lambda self: self._data.strides)
    T = property(lambda self: ndarray(self._data.T))
    base = None  # views are not tracked (Module.cached_arrays then counts each view once)

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> object:
        return (_wrap(row) for row in self._data)

    def __getitem__(self, key: object) -> ndarray:
        return _wrap(self._data[_index(key)])

    def __setitem__(self, key: object, value: object) -> None:
        self._data[_index(key)] = _unwrap(value, "assignment to a fake_device array")

    def fill(self, value: object) -> None:
        self._data.fill(_unwrap(value, "fill"))

    def astype(self, dtype: object, copy: bool = True, **kwargs: object) -> ndarray:
        return ndarray(self._data.astype(dtype, copy=copy, **kwargs))


def _method(name: str) -> object:
    def method(self: ndarray, *args: object, **kwargs: object) -> object:
        where = f"ndarray.{name}"
        return _wrap(getattr(self._data, name)(*_unwrap(args, where), **_unwrap(kwargs, where)))

    method.__name__ = name
    return method


for _name in (
    "all", "any", "argmax", "argmin", "copy", "cumsum", "flatten", "max", "mean", "min", "prod", "ravel",
    "reshape", "squeeze", "std", "sum", "swapaxes", "transpose", "var", "view",
):  # fmt: skip
    setattr(ndarray, _name, _method(_name))


# -- the module's functions (what library code calls as xp.<name>) ---------------------------------------
def asarray(a: object, dtype: object = None) -> ndarray:
    """A device array: ``a`` itself if it is one (cast if ``dtype`` differs), else a device copy of host data."""
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    transfers["to_device"] += 1
    return ndarray(np.array(a, dtype=dtype))


def array(a: object, dtype: object = None, copy: bool = True) -> ndarray:
    if isinstance(a, ndarray):
        return a.astype(a.dtype if dtype is None else dtype, copy=copy)
    return asarray(a, dtype)


def asnumpy(a: object) -> np.ndarray:
    """Host copy of a device array (``cupy.asnumpy``); host data as a NumPy array."""
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def _creation(name: str) -> object:
    numpy_function = getattr(np, name)

    def create(*args: object, **kwargs: object) -> ndarray:
        return ndarray(numpy_function(*_unwrap(args, name), **_unwrap(kwargs, name)))

    create.__name__ = name
    return create


zeros, ones, empty, full, arange = (_creation(n) for n in ("zeros", "ones", "empty", "full", "arange"))


def _dispatched(name: str) -> object:
    numpy_function = getattr(np, name)

    def function(*args: object, **kwargs: object) -> object:
        return numpy_function(*args, **kwargs)  # device arguments dispatch through __array_function__

    function.__name__ = name
    return function


zeros_like, empty_like, ones_like, full_like, clip, where, einsum, sqrt, exp, log, tanh = (
    _dispatched(n)
    for n in ("zeros_like", "empty_like", "ones_like", "full_like", "clip", "where", "einsum", "sqrt", "exp", "log",
              "tanh")
)  # fmt: skip


def ascontiguousarray(a: object, dtype: object = None) -> ndarray:
    """``cupy.ascontiguousarray``: a C-contiguous device array (host data is copied to the device)."""
    return ndarray(np.ascontiguousarray(a._data, dtype=dtype)) if isinstance(a, ndarray) else asarray(a, dtype)


class Generator:
    """``cupy.random.Generator``: draws made on the device (here: a NumPy generator's draws, wrapped)."""

    def __init__(self, seed: object = None) -> None:
        self._rng = np.random.default_rng(seed)

    def standard_normal(self, size: object = None, dtype: object = np.float64) -> ndarray:
        return ndarray(np.asarray(self._rng.standard_normal(size, dtype=dtype)))

    def random(self, size: object = None, dtype: object = np.float64) -> ndarray:
        return ndarray(np.asarray(self._rng.random(size, dtype=dtype)))

    def uniform(self, low: float = 0.0, high: float = 1.0, size: object = None) -> ndarray:
        return ndarray(np.asarray(self._rng.uniform(low, high, size)))

    def permutation(self, n: int) -> ndarray:
        return ndarray(self._rng.permutation(n))


class random:
    """``xp.random``: only what the library uses."""

    Generator = Generator

    @staticmethod
    def default_rng(seed: object = None) -> Generator:
        return Generator(seed)
