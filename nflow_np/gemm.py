"""``C ← A·B + β·C`` in place on strided 2-D views: the GEMM that accumulates, for the shifted convolutions.

:mod:`nflow_np.nn.shifted` computes a convolution as ``k²`` products added into one output
(``docs/conv.md#the-shifted-gemm-convolution``). ``numpy.matmul`` always overwrites its output (``β = 0``),
so each added product costs a temporary and an extra pass to add it; BLAS's GEMM takes ``β = 1`` and adds
where it computes, and reads its operands in place from views into larger arrays (a pointer and a leading
dimension), so a column range of a frame is no copy. The engines, in the order ``"auto"`` tries them:

==============  ============================================================  ==========================
engine          how                                                           needs
==============  ============================================================  ==========================
``"openblas"``  ``cblas_sgemm``/``cblas_dgemm`` of the OpenBLAS NumPy loaded,  NumPy's wheels (threadpoolctl
                called through ``ctypes``: no copy, ``β`` as given             finds the library)
``"scipy"``     the Fortran ``sgemm``/``dgemm`` of ``scipy.linalg.cython_blas``  SciPy (the test extra)
                through ``ctypes`` (its OpenBLAS): no copy, ``β`` as given
``"numpy"``     ``numpy.matmul`` into ``C`` (``β = 0``) or into a temporary,   nothing
                then added (``β = 1``)
==============  ============================================================  ==========================

An engine is used only after it has passed a self-check against ``numpy.matmul`` on odd shapes and leading
dimensions (done once, when it is first chosen); a view BLAS cannot address (no unit stride along either
axis, negative strides) and any dtype but float32/float64 go to the ``"numpy"`` path for that call. All
engines compute the same products, each entry a dot product rounded by the BLAS kernel: results agree to
round-off, not bit for bit (the summation order inside a GEMM is the library's).

Measured (``python -m benchmarks --sections conv``, ``docs/conv.md#speed``): which engine is fastest is a
measurement on each machine; the default ``"auto"`` takes the first that passes its check.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
from collections.abc import Callable, Iterator

import numpy as np

ENGINES = ("openblas", "scipy", "numpy")
"""Every engine :func:`set_engine` knows, in the order ``"auto"`` tries them."""

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # the CBLAS enum values
_chosen: str | None = None
"""The engine :func:`set_engine` chose; ``None``: ``"auto"``, resolved on first use."""
_loaded: dict[str, dict[np.dtype, Callable] | None] = {}
"""Per engine name, its GEMM per dtype once loaded and checked, or ``None`` when it failed to load or check."""


def _layout(x: np.ndarray) -> tuple[bool, int] | None:
    """``(transposed, leading dimension)`` of a 2-D view as BLAS addresses it (row-major), or ``None``."""
    rows, cols = x.shape
    item = x.itemsize
    s0, s1 = x.strides
    if cols == 1 or s1 == item:  # rows of unit stride: as it is
        ld = s0 // item if rows > 1 else cols
        if ld >= cols and s0 % item == 0 and s0 >= 0:
            return False, max(ld, 1)
    if rows == 1 or s0 == item:  # columns of unit stride: the transpose of a row-major matrix
        ld = s1 // item if cols > 1 else rows
        if ld >= rows and s1 % item == 0 and s1 >= 0:
            return True, max(ld, 1)
    return None


def _cblas_engine() -> dict[np.dtype, Callable] | None:
    """The GEMMs of the OpenBLAS NumPy loaded (threadpoolctl finds it; NumPy's own library first)."""
    from nflow_np.fpmode import blas_controller

    controllers = blas_controller().select(internal_api="openblas").lib_controllers
    controllers = sorted(controllers, key=lambda c: "numpy" not in str(getattr(c, "filepath", "")))
    for controller in controllers:
        library = controller.dynlib
        for prefix, suffix in itertools.product(("scipy_", ""), ("64_", "_64", "")):
            found = [getattr(library, f"{prefix}cblas_{t}gemm{suffix}", None) for t in "sd"]
            if None in found:
                continue
            integer = ctypes.c_int64 if suffix else ctypes.c_int  # the 64-bit-index builds carry a suffix
            table = {}
            for function, dtype, real in zip(found, (np.float32, np.float64), (ctypes.c_float, ctypes.c_double),
                                             strict=True):  # fmt: skip
                function.restype = None
                function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer, integer, real,
                                     ctypes.c_void_p, integer, ctypes.c_void_p, integer, real, ctypes.c_void_p,
                                     integer]  # fmt: skip
                table[np.dtype(dtype)] = _cblas_call(function)
            return table
    return None


def _cblas_call(function: Callable) -> Callable:
    def gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray, beta: float, la: tuple, lb: tuple, lc: tuple) -> None:
        (ta, lda), (tb, ldb), (tc, ldc) = la, lb, lc
        m, k = a.shape
        n = b.shape[1]
        if tc:  # C is column-major: compute Cᵀ = Bᵀ Aᵀ into it instead
            function(_ROW_MAJOR, _NO_TRANS if tb else _TRANS, _NO_TRANS if ta else _TRANS, n, m, k, 1.0,
                     b.ctypes.data, ldb, a.ctypes.data, lda, beta, c.ctypes.data, ldc)  # fmt: skip
        else:
            function(_ROW_MAJOR, _TRANS if ta else _NO_TRANS, _TRANS if tb else _NO_TRANS, m, n, k, 1.0,
                     a.ctypes.data, lda, b.ctypes.data, ldb, beta, c.ctypes.data, ldc)  # fmt: skip

    return gemm


def _scipy_engine() -> dict[np.dtype, Callable] | None:
    """The Fortran GEMMs of ``scipy.linalg.cython_blas``, reached through their capsules."""
    try:
        from scipy.linalg import cython_blas
    except ImportError:
        return None
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    table = {}
    for letter, dtype, real in (("s", np.float32, ctypes.c_float), ("d", np.float64, ctypes.c_double)):
        capsule = cython_blas.__pyx_capi__[f"{letter}gemm"]
        pointer = get_pointer(capsule, get_name(capsule))
        p = ctypes.POINTER
        prototype = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, p(ctypes.c_int), p(ctypes.c_int),
                                     p(ctypes.c_int), p(real), ctypes.c_void_p, p(ctypes.c_int), ctypes.c_void_p,
                                     p(ctypes.c_int), p(real), ctypes.c_void_p, p(ctypes.c_int))  # fmt: skip
        table[np.dtype(dtype)] = _fortran_call(prototype(pointer), real)
    return table


def _fortran_call(function: Callable, real: type) -> Callable:
    one, n_char, t_char = real(1.0), b"N", b"T"
    integer, ref = ctypes.c_int, ctypes.byref

    def gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray, beta: float, la: tuple, lb: tuple, lc: tuple) -> None:
        # Column-major BLAS sees a row-major X as Xᵀ: row-major C = A B is column-major Cᵀ = Bᵀ Aᵀ.
        (ta, lda), (tb, ldb), (tc, ldc) = la, lb, lc
        m, k = a.shape
        n = b.shape[1]
        if tc:  # C column-major: C = A B directly
            function(n_char if ta else t_char, n_char if tb else t_char, ref(integer(m)), ref(integer(n)),
                     ref(integer(k)), ref(one), a.ctypes.data, ref(integer(lda)), b.ctypes.data, ref(integer(ldb)),
                     ref(real(beta)), c.ctypes.data, ref(integer(ldc)))  # fmt: skip
        else:
            function(t_char if tb else n_char, t_char if ta else n_char, ref(integer(n)), ref(integer(m)),
                     ref(integer(k)), ref(one), b.ctypes.data, ref(integer(ldb)), a.ctypes.data, ref(integer(lda)),
                     ref(real(beta)), c.ctypes.data, ref(integer(ldc)))  # fmt: skip

    return gemm


def numpy_gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray, beta: float = 1.0) -> None:
    """The reference: ``c ← a @ b + beta · c`` with ``numpy.matmul`` (a temporary unless ``beta = 0``)."""
    if beta == 0.0:
        np.matmul(a, b, out=c)
        return
    product = a @ b
    if beta != 1.0:
        c *= c.dtype.type(beta)
    c += product


_LOADERS = {"openblas": _cblas_engine, "scipy": _scipy_engine}


def _self_check(table: dict[np.dtype, Callable]) -> bool:
    """Whether every GEMM of ``table`` computes ``numpy.matmul``'s product on odd shapes and layouts."""
    rng = np.random.default_rng(0)
    for dtype, function in table.items():
        big = rng.standard_normal((17, 29)).astype(dtype)
        a, b = big[1:6, 2:9], big[3:10, 11:15]  # (5, 7) @ (7, 4), leading dimension 29
        cases = [(a, b), (big[2:9, 1:6].T, b), (a, big[11:15, 3:10].T)]  # transposed operands too
        for left, right in cases:
            out = np.ones((5, 10), dtype=dtype)[:, 2:6]
            want = left @ right + 0.5
            layouts = [_layout(x) for x in (left, right, out)]
            if None in layouts:
                return False
            out[...] = 0.5
            function(left, right, out, 1.0, *layouts)
            if not np.allclose(out, want, rtol=1e-5, atol=1e-5):
                return False
            column_major = np.full((4, 5), 0.5, dtype=dtype).T  # C with unit stride down its columns
            function(left, right, column_major, 1.0, *(layouts[:2] + [_layout(column_major)]))
            if not np.allclose(column_major, want, rtol=1e-5, atol=1e-5):
                return False
    return True


def _load(name: str) -> dict[np.dtype, Callable] | None:
    if name not in _loaded:
        table = None
        if name != "numpy":
            try:
                table = _LOADERS[name]()
            except (OSError, AttributeError, ImportError, KeyError, ValueError, TypeError):
                table = None
            try:
                checked = table is not None and _self_check(table)
            except (OSError, ValueError, TypeError, ctypes.ArgumentError):
                checked = False
            table = table if checked else None
        _loaded[name] = {} if name == "numpy" else table
    return _loaded[name]


def available_engines() -> list[str]:
    """The engines that load and pass their self-check here (``"numpy"`` always does)."""
    return [name for name in ENGINES if _load(name) is not None]


def set_engine(name: str) -> None:
    """Choose the engine by name (:data:`ENGINES`) or ``"auto"``; raises ``ValueError`` if it cannot run here."""
    global _chosen
    if name == "auto":
        _chosen = next(n for n in ENGINES if _load(n) is not None)
        return
    if name not in ENGINES:
        raise ValueError(f"unknown GEMM engine {name!r}; choose from {[*ENGINES, 'auto']}")
    if _load(name) is None:
        raise ValueError(f"GEMM engine {name!r} is not available here (it did not load or failed its self-check)")
    _chosen = name


def get_engine() -> str:
    """The engine in use (resolving ``"auto"`` on the first call)."""
    if _chosen is None:
        set_engine("auto")
    return _chosen


@contextlib.contextmanager
def using_engine(name: str) -> Iterator[None]:
    """``with using_engine("numpy"): ...``: :func:`set_engine` for the block, the engine before it afterwards."""
    before = get_engine()
    set_engine(name)
    try:
        yield
    finally:
        set_engine(before)


def gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray, beta: float = 1.0) -> None:
    """``c ← a @ b + beta · c`` in place, by the engine in use (module docstring).

    Parameters
    ----------
    a : array, shape (M, K)
    b : array, shape (K, N)
    c : array, shape (M, N)
        Written in place; may be a view into a larger array (a column range of a frame). With
        ``beta = 0`` its old contents are never read (NaN there does no harm).
    beta : float
        ``1`` accumulates, ``0`` overwrites.

    Notes
    -----
    ``a``, ``b`` and ``c`` must not overlap ``c`` (BLAS reads its operands while it writes ``c``).
    """
    if a.shape[1] != b.shape[0] or c.shape != (a.shape[0], b.shape[1]):
        raise ValueError(f"gemm shapes do not match: {a.shape} @ {b.shape} into {c.shape}")
    table = _loaded.get(_chosen) if _chosen is not None else _load(get_engine())
    function = table.get(c.dtype) if table else None
    if function is None or a.dtype != c.dtype or b.dtype != c.dtype or 0 in a.shape or 0 in b.shape:
        numpy_gemm(a, b, c, beta)
        return
    la, lb, lc = _layout(a), _layout(b), _layout(c)
    if la is None or lb is None or lc is None:
        numpy_gemm(a, b, c, beta)
        return
    function(a, b, c, float(beta), la, lb, lc)
