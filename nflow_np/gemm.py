"""``C ← A·B + β·C`` in place on strided 2-D views: the GEMM that accumulates, for the shifted convolutions.

:mod:`nflow_np.nn.shifted` computes a convolution as ``k²`` products added into one output
(``docs/conv.md#the-shifted-gemm-convolution``). ``numpy.matmul`` always overwrites its output (``β = 0``),
so each added product costs a temporary and an extra pass to add it; BLAS's GEMM takes ``β = 1`` and adds
where it computes, and reads its operands in place from views into larger arrays (a pointer and a leading
dimension), so a column range of a frame is no copy. The engines, in the order ``"auto"`` tries them:

==============  ============================================================  ==========================
engine          how                                                           needs
==============  ============================================================  ==========================
``"mkl"``       ``cblas_sgemm``/``cblas_dgemm`` of Intel's MKL (``libmkl_rt``)  the ``mkl`` wheel (the
                through ``ctypes``; ``"auto"`` takes it on Intel CPUs only     ``fast`` extra); an Intel
                                                                              CPU for ``"auto"``
``"openblas"``  ``cblas_sgemm``/``cblas_dgemm`` of the OpenBLAS NumPy loaded,  NumPy's wheels (threadpoolctl
                called through ``ctypes``: no copy, ``β`` as given             finds the library)
``"scipy"``     the Fortran ``sgemm``/``dgemm`` of ``scipy.linalg.cython_blas``  SciPy (the test extra)
                through ``ctypes`` (its OpenBLAS): no copy, ``β`` as given
``"numpy"``     ``numpy.matmul`` into ``C`` (``β = 0``) or into a temporary,   nothing
                then added (``β = 1``)
==============  ============================================================  ==========================

The engine also computes the MLP layers' products (:func:`matmul`, :class:`nflow_np.nn.layers.Linear`): with
``"mkl"`` every GEMM of a training step is MKL's; with any other engine :func:`matmul` is ``numpy.matmul``
itself (NumPy's OpenBLAS), as before the engine existed.

An engine is used only after it has passed a self-check against ``numpy.matmul`` on odd shapes and leading
dimensions (done once, when it is first chosen); a view BLAS cannot address (no unit stride along either
axis, negative strides) and any dtype but float32/float64 go to the ``"numpy"`` path for that call. All
engines compute the same products, each entry a dot product rounded by the BLAS kernel: results agree to
round-off, not bit for bit (the summation order inside a GEMM is the library's).

:class:`Blocks` is the same product for loops of many small GEMMs on sub-blocks of the same three arrays: the
pointers are read once and each call is integer arithmetic and one BLAS call (about 2 µs instead of 8 for a
call of :func:`gemm` on views, measured; a 28×28 training step of the benchmark's net makes 6,588 of them).

Measured on one core of an Intel Xeon (Sapphire Rapids, AVX-512), the 28×28 net's shifted GEMMs
(``docs/conv.md#speed``): ``"openblas"`` (NumPy's OpenBLAS 0.3.31) 64 % of the 2048³ GEMM's rate for the
forward and input-gradient products, ``"scipy"`` (SciPy's 0.3.30) 51 %, ``"numpy"`` (a temporary and an add)
about 45 %; ``"auto"`` takes ``"openblas"`` where it loads and MKL does not.

Why MKL, and only on Intel: on the same Xeon, one thread, MKL 2026.2's GEMMs at the shapes the library
computes ran 1.00–1.35× faster than OpenBLAS 0.3.31's in float32 and 1.16–1.31× in float64, and 1.28× (float32)
on the 12,544×576×64 products of a 28×28 convolution (``python -m benchmarks.gemm_vs_torch`` compares the
engines; docs/numerics.md#the-gemm-engine). MKL was not measured on an AMD CPU here, so ``"auto"`` does not
take it there; ``set_engine("mkl")`` does, on any x86 CPU.

MKL is loaded in its strict reproducibility mode (:data:`MKL_REPRODUCIBLE`), so that its results do not depend on
the thread count, as OpenBLAS's do not: a run resumed on another thread count repeats the uninterrupted run bit
for bit. It costs 10–16 % in the convolutions' products and nothing measurable in the MLP step.

MKL's worker threads (Intel OpenMP) copy the calling thread's floating-point mode at the start of every parallel
region (``KMP_INHERIT_FP_CONTROL``, on by default), so the flush mode of :mod:`nflow_np.fpmode` reaches them
without a team; :func:`mkl_workers_inherit_flush` proves it on this machine by a product whose every entry is
zero only if each thread that computed it read subnormals as zero.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import itertools
import os
import sys
from collections.abc import Callable, Iterator

import numpy as np

ENGINES = ("mkl", "openblas", "scipy", "numpy")
"""Every engine :func:`set_engine` knows, in the order ``"auto"`` tries them."""

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # the CBLAS enum values
_chosen: str | None = None
"""The engine :func:`set_engine` chose; ``None``: ``"auto"``, resolved on first use."""
_loaded: dict[str, dict[np.dtype, Callable] | None] = {}
"""Per engine name, its raw GEMM per dtype once loaded and checked (``{}`` for ``"numpy"``), or ``None``.

A raw GEMM is ``raw(ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc)``: row-major ``C (m×n) ← op(A)·op(B) + β C``
with ``op(A)`` ``m×k``, ``op(B)`` ``k×n``, pointers as integers, ``ta``/``tb`` whether ``A``/``B`` are stored
transposed."""


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
            return _cblas_table(found, integer)
    return None


def _cblas_table(functions: list, integer: type) -> dict[np.dtype, Callable]:
    """Raw GEMMs from ``[cblas_sgemm, cblas_dgemm]`` of a CBLAS library whose indices are ``integer``."""
    table = {}
    for function, dtype, real in zip(functions, (np.float32, np.float64), (ctypes.c_float, ctypes.c_double),
                                     strict=True):  # fmt: skip
        function.restype = None
        function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer, integer, real,
                             ctypes.c_void_p, integer, ctypes.c_void_p, integer, real, ctypes.c_void_p,
                             integer]  # fmt: skip
        table[np.dtype(dtype)] = _cblas_raw(function)
    return table


def _cblas_raw(function: Callable) -> Callable:
    def raw(ta: bool, tb: bool, m: int, n: int, k: int, a: int, lda: int, b: int, ldb: int, beta: float, c: int,
            ldc: int) -> None:  # fmt: skip
        function(_ROW_MAJOR, _TRANS if ta else _NO_TRANS, _TRANS if tb else _NO_TRANS, m, n, k, 1.0, a, lda, b, ldb,
                 beta, c, ldc)  # fmt: skip

    return raw


MKL_LIBRARIES = ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so")
"""The names of MKL's single dynamic library, newest interface first."""


def mkl_paths() -> list[str]:
    """Where ``libmkl_rt`` is for this interpreter: the files of its installed ``mkl`` distribution (where pip put
    the wheel: the prefix of this environment, or the user base for ``pip install --user``), then ``sys.prefix/lib``
    (an environment that ships MKL without the distribution's record, such as conda's).

    A virtual environment sees only its own MKL, as it sees only its own packages: the base interpreter's is
    not looked for.
    """
    found = []
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    named = {f.name: f for f in files if f.name in MKL_LIBRARIES}
    for name in MKL_LIBRARIES:
        if name in named:
            path = os.path.normpath(str(named[name].locate()))
            if os.path.exists(path):
                found.append(path)
    folder = os.path.join(sys.prefix, "lib")
    for name in MKL_LIBRARIES:
        path = os.path.join(folder, name)
        if os.path.exists(path) and path not in found:
            found.append(path)
    return found


_mkl_library: ctypes.CDLL | None = None
MKL_REPRODUCIBLE = True
"""Load MKL in its strict reproducibility mode: the code branch it picks for this CPU, with results independent
of the thread count (docs/numerics.md#the-gemm-engine). Read once, when MKL is loaded."""
_MKL_CBWR_STRICT = 0x10000
mkl_strict = False
"""Whether MKL runs in that mode (set when it loads; False where MKL had already computed in this process)."""


def _mkl_engine() -> dict[np.dtype, Callable] | None:
    """The CBLAS GEMMs of MKL's single dynamic library (its LP64 interface: 32-bit indices, the default)."""
    global _mkl_library, mkl_strict
    paths = mkl_paths()
    if not paths:
        return None
    library = ctypes.CDLL(paths[0])
    if MKL_REPRODUCIBLE:  # before MKL's first computation, or it is refused (then mkl_strict stays False)
        branch = int(library.MKL_CBWR_Get_Auto_Branch())
        mkl_strict = int(library.MKL_CBWR_Set(ctypes.c_int(branch | _MKL_CBWR_STRICT))) == 0
    _mkl_library = library
    return _cblas_table([library.cblas_sgemm, library.cblas_dgemm], ctypes.c_int)


def mkl_workers_inherit_flush() -> bool:
    """Whether MKL's worker threads compute in the caller's flush mode (FTZ/DAZ), proved by one product.

    Every entry of ``A·B`` with ``A`` = 512×512 subnormals (10⁻⁴⁰) and ``B`` = ones is ``512·10⁻⁴⁰ ≈ 5·10⁻³⁸``,
    a normal number, on a thread that reads subnormals as they are, and exactly 0 on a thread with DAZ. So with
    the caller's DAZ set and MKL on every core, an all-zero product means every thread that computed a row had
    DAZ. ``False`` where MKL is not loaded or the mode cannot be set.
    """
    from nflow_np import fpmode

    table = _load("mkl")
    reg = fpmode.register()
    if not table or reg.get is None:
        return False
    raw = table[np.dtype(np.float32)]
    a = np.full((512, 512), 1e-40, dtype=np.float32)
    b = np.ones((512, 512), dtype=np.float32)
    c = np.empty((512, 512), dtype=np.float32)
    previous = int(_mkl_library.MKL_Get_Max_Threads())
    _mkl_library.MKL_Set_Num_Threads(max(2, os.cpu_count() or 1))
    saved = int(reg.get())
    try:
        reg.set(saved | fpmode.FLUSH_BITS)
        raw(False, False, 512, 512, 512, a.ctypes.data, 512, b.ctypes.data, 512, 0.0, c.ctypes.data, 512)
    finally:
        reg.set(saved)
        _mkl_library.MKL_Set_Num_Threads(previous)
    return not np.any(c)


def cpuinfo_field(key: str) -> str | None:
    """The first ``key`` line's value in ``/proc/cpuinfo`` (``"vendor_id"``, ``"model name"``), or ``None``.

    Here because the engine choice reads the vendor; :func:`nflow_np.provenance.cpu_model` reads the model with it.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_vendor() -> str:
    """The CPU vendor string of ``/proc/cpuinfo`` (``"GenuineIntel"``, ``"AuthenticAMD"``), or ``""``."""
    return cpuinfo_field("vendor_id") or ""


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
        table[np.dtype(dtype)] = _fortran_raw(prototype(pointer), real)
    return table


def _fortran_raw(function: Callable, real: type) -> Callable:
    one, integer, ref = real(1.0), ctypes.c_int, ctypes.byref

    def raw(ta: bool, tb: bool, m: int, n: int, k: int, a: int, lda: int, b: int, ldb: int, beta: float, c: int,
            ldc: int) -> None:  # fmt: skip
        # column-major BLAS reads a row-major X as Xᵀ: row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ
        function(b"T" if tb else b"N", b"T" if ta else b"N", ref(integer(n)), ref(integer(m)), ref(integer(k)),
                 ref(one), b, ref(integer(ldb)), a, ref(integer(lda)), ref(real(beta)), c, ref(integer(ldc)))

    return raw


def numpy_gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray, beta: float = 1.0) -> None:
    """The reference: ``c ← a @ b + beta · c`` with ``numpy.matmul`` (a temporary unless ``beta = 0``)."""
    if beta == 0.0:
        np.matmul(a, b, out=c)
        return
    product = a @ b
    if beta != 1.0:
        c *= c.dtype.type(beta)
    c += product


_LOADERS = {"mkl": _mkl_engine, "openblas": _cblas_engine, "scipy": _scipy_engine}


def _view_call(raw: Callable, a: np.ndarray, b: np.ndarray, c: np.ndarray, beta: float, la: tuple, lb: tuple,
               lc: tuple) -> None:  # fmt: skip
    """One product on views, through ``raw``; a column-major ``c`` gets ``cᵀ = bᵀ aᵀ`` instead."""
    (ta, lda), (tb, ldb), (tc, ldc) = la, lb, lc
    m, k = a.shape
    n = b.shape[1]
    if tc:
        raw(not tb, not ta, n, m, k, b.ctypes.data, ldb, a.ctypes.data, lda, beta, c.ctypes.data, ldc)
    else:
        raw(ta, tb, m, n, k, a.ctypes.data, lda, b.ctypes.data, ldb, beta, c.ctypes.data, ldc)


def _self_check(table: dict[np.dtype, Callable]) -> bool:
    """Whether every GEMM of ``table`` computes ``numpy.matmul``'s product on odd shapes and layouts."""
    rng = np.random.default_rng(0)
    for dtype, raw in table.items():
        big = rng.standard_normal((17, 29)).astype(dtype)
        a, b = big[1:6, 2:9], big[3:10, 11:15]  # (5, 7) @ (7, 4), leading dimension 29
        for left, right in [(a, b), (big[2:9, 1:6].T, b), (a, big[11:15, 3:10].T)]:  # transposed operands too
            want = left @ right + 0.5
            for out in (np.ones((5, 10), dtype=dtype)[:, 2:6], np.ones((4, 5), dtype=dtype).T):  # row-, column-major
                out[...] = 0.5
                layouts = [_layout(x) for x in (left, right, out)]
                if None in layouts:
                    return False
                _view_call(raw, left, right, out, 1.0, *layouts)
                if not np.allclose(out, want, rtol=1e-5, atol=1e-5):
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
        if name == "mkl" and table is not None:
            from nflow_np import fpmode

            fpmode.forget_blas_libraries()  # threadpoolctl must see the library that now computes
    return _loaded[name]


def available_engines() -> list[str]:
    """The engines that load and pass their self-check here (``"numpy"`` always does)."""
    return [name for name in ENGINES if _load(name) is not None]


def set_engine(name: str) -> None:
    """Choose the engine by name (:data:`ENGINES`) or ``"auto"``; raises ``ValueError`` if it cannot run here."""
    global _chosen
    if name == "auto":
        candidates = [n for n in ENGINES if n != "mkl" or cpu_vendor() == "GenuineIntel"]
        _chosen = next(n for n in candidates if _load(n) is not None)
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


def _raw_for(dtype: np.dtype) -> Callable | None:
    table = _loaded[get_engine()]
    return table.get(dtype) if table else None


MKL_MIN_PRODUCT = {np.dtype(np.float64): 1 << 21, np.dtype(np.float32): 1 << 22}
"""With ``"mkl"``, :func:`matmul` hands products of at least this many multiply-adds (``m·k·n``) to MKL and smaller
ones to ``a @ b``: a call through ``ctypes`` costs several µs more than NumPy's own, which only a product of this
size pays back. Measured crossovers (Intel Xeon, 1 thread, NumPy against MKL through ``matmul``): float64
(256×64)·(64×64) 46.3 against 51.6 µs, (256×64)·(64×128) 92.7 against 83.6 µs; float32 (256×64)·(64×128) 43.2
against 48.7 µs, (512×32)·(32×256) 91.0 against 82.1 µs."""


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` as a fresh C-contiguous array, computed by the engine in use.

    With ``"mkl"`` the product of two host float arrays of one dtype and at least :data:`MKL_MIN_PRODUCT`
    multiply-adds (per dtype) is MKL's, an operand whose layout BLAS cannot address (a strided view such as
    ``x[:, ::2]``) copied to a contiguous one first, as NumPy's ``@`` does; otherwise (another engine, a smaller
    product, other array types such as CuPy's, other dtypes) it is ``a @ b`` itself.

    Parameters
    ----------
    a : array, shape (M, K)
    b : array, shape (K, N)

    Returns
    -------
    array, shape (M, N), of the operands' dtype
    """
    if _chosen is None:
        get_engine()  # resolve "auto" once
    if _chosen != "mkl" or type(a) is not np.ndarray or type(b) is not np.ndarray or a.ndim != 2 or b.ndim != 2:
        return a @ b
    (m, k), n = a.shape, b.shape[1]
    raw = _loaded["mkl"].get(a.dtype)
    if raw is None or b.dtype != a.dtype or b.shape[0] != k or m * k * n == 0 or m * k * n < MKL_MIN_PRODUCT[a.dtype]:
        return a @ b
    la, lb = _layout(a), _layout(b)
    if la is None:  # e.g. every other column of a batch (a vector mask's half): NumPy's `@` would copy it too
        a = np.ascontiguousarray(a)
        la = _layout(a)
    if lb is None:
        b = np.ascontiguousarray(b)
        lb = _layout(b)
    c = np.empty((m, n), dtype=a.dtype)
    _view_call(raw, a, b, c, 0.0, la, lb, (False, n))
    return c


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
    ``a`` and ``b`` must not overlap ``c`` (BLAS reads its operands while it writes ``c``).
    """
    if a.shape[1] != b.shape[0] or c.shape != (a.shape[0], b.shape[1]):
        raise ValueError(f"gemm shapes do not match: {a.shape} @ {b.shape} into {c.shape}")
    raw = _raw_for(c.dtype)
    if raw is None or a.dtype != c.dtype or b.dtype != c.dtype or 0 in a.shape or 0 in b.shape:
        numpy_gemm(a, b, c, beta)
        return
    la, lb, lc = _layout(a), _layout(b), _layout(c)
    if la is None or lb is None or lc is None:
        numpy_gemm(a, b, c, beta)
        return
    _view_call(raw, a, b, c, float(beta), la, lb, lc)


class Blocks:
    """``C_blk ← op(A_blk) · op(B_blk) + β C_blk`` on row-major sub-blocks of three fixed C-contiguous arrays.

    For loops of many small products on the same arrays (the shifted convolutions): the pointers are read once,
    and each call names its blocks by the flat index of their first element, so that a call is integer
    arithmetic and one BLAS call (no view, no layout check). Every block of an array has the leading dimension
    of the array's last axis; ``trans_a``/``trans_b``: the block of ``a``/``b`` is used transposed. Without a
    BLAS engine (``"numpy"``, another dtype) each call makes the views and runs :func:`numpy_gemm`.

    Parameters
    ----------
    a, b, c : C-contiguous arrays of one float dtype (any number of axes)
    trans_a, trans_b : bool
    """

    def __init__(self, a: np.ndarray, b: np.ndarray, c: np.ndarray, trans_a: bool = False,
                 trans_b: bool = False) -> None:  # fmt: skip
        for name, x in (("a", a), ("b", b), ("c", c)):
            if not x.flags.c_contiguous or x.dtype != c.dtype:
                raise ValueError(f"Blocks needs C-contiguous arrays of one dtype; {name} is {x.dtype}, "
                                 f"contiguous: {x.flags.c_contiguous}")  # fmt: skip
        self.arrays, self.trans = (a.reshape(-1), b.reshape(-1), c.reshape(-1)), (bool(trans_a), bool(trans_b))
        self.lds = tuple(x.shape[-1] for x in (a, b, c))
        self.raw = _raw_for(c.dtype)
        self.item = c.itemsize
        self.pointers = tuple(x.ctypes.data for x in (a, b, c))

    def __call__(self, m: int, n: int, k: int, a_at: int, b_at: int, c_at: int, beta: float) -> None:
        """``op(A)``: ``m×k`` from flat index ``a_at`` of ``a``; ``op(B)``: ``k×n`` from ``b_at``; ``C``: ``m×n``
        from ``c_at``."""
        (lda, ldb, ldc), (ta, tb), item = self.lds, self.trans, self.item
        if self.raw is not None:
            pa, pb, pc = self.pointers
            self.raw(ta, tb, m, n, k, pa + a_at * item, lda, pb + b_at * item, ldb, beta, pc + c_at * item, ldc)
            return
        a, b, c = self.arrays
        block_a = self._block(a, a_at, (k, m) if ta else (m, k), lda)
        block_b = self._block(b, b_at, (n, k) if tb else (k, n), ldb)
        numpy_gemm(block_a.T if ta else block_a, block_b.T if tb else block_b, self._block(c, c_at, (m, n), ldc), beta)

    def _block(self, flat: np.ndarray, at: int, shape: tuple[int, int], ld: int) -> np.ndarray:
        return np.lib.stride_tricks.as_strided(flat[at:], shape=shape, strides=(ld * self.item, self.item))
