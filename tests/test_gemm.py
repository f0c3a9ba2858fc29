"""``nflow_np.gemm``: every engine that loads here computes ``c ← a @ b + β c`` as ``numpy.matmul`` does.

Hypothesis draws shapes (1 row, 1 column, odd sizes), both dtypes, β ∈ {0, 1}, and operands that are views
into larger arrays (leading dimensions above their width), transposed views, and column-major outputs; with
``β = 0`` the output's old contents (NaN here) must not leak. Views no BLAS can address fall back to NumPy.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nflow_np import fpmode, gemm, threads

SETTINGS = settings(max_examples=40, deadline=None)
ENGINES = gemm.available_engines()


def operand(rng: np.random.Generator, shape: tuple[int, int], dtype: type, kind: str) -> np.ndarray:
    """A ``shape`` view: ``"plain"`` C-contiguous, ``"view"`` inside a wider array, ``"transposed"`` a ``.T``,
    ``"strided"`` every other column (no leading dimension addresses it: BLAS cannot take it as it is)."""
    rows, cols = shape
    if kind == "plain":
        return rng.standard_normal(shape).astype(dtype)
    if kind == "strided":
        return rng.standard_normal((rows, 2 * cols)).astype(dtype)[:, ::2]
    if kind == "view":
        return rng.standard_normal((rows + 2, cols + 5)).astype(dtype)[1 : rows + 1, 3 : cols + 3]
    return rng.standard_normal((cols + 3, rows + 4)).astype(dtype)[2 : cols + 2, 1 : rows + 1].T


def test_numpy_is_always_an_engine_and_auto_picks_one() -> None:
    assert "numpy" in ENGINES
    with gemm.using_engine("auto"):
        assert gemm.get_engine() in ENGINES


@SETTINGS
@given(m=st.integers(1, 9), k=st.integers(1, 9), n=st.integers(1, 9), dtype=st.sampled_from([np.float32, np.float64]),
       beta=st.sampled_from([0.0, 1.0]), kinds=st.tuples(*[st.sampled_from(["plain", "view", "transposed"])] * 3),
       seed=st.integers(0, 2**32 - 1))  # fmt: skip
def test_every_engine_computes_the_product(m: int, k: int, n: int, dtype: type, beta: float, kinds: tuple,
                                           seed: int) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    a, b = operand(rng, (m, k), dtype, kinds[0]), operand(rng, (k, n), dtype, kinds[1])
    start = operand(rng, (m, n), dtype, kinds[2])
    want = a.astype(np.float64) @ b.astype(np.float64) + beta * start.astype(np.float64)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for engine in ENGINES:
        c = start.copy() if kinds[2] == "plain" else operand(rng, (m, n), dtype, kinds[2])
        c[...] = start if beta else np.nan
        with gemm.using_engine(engine):
            gemm.gemm(a, b, c, beta)
        assert c.dtype == dtype
        np.testing.assert_allclose(c, want, err_msg=engine, **tolerance)


def test_views_blas_cannot_address_take_the_numpy_path() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 6))[:, ::2]  # no unit stride along either axis
    b = rng.standard_normal((3, 5))
    for engine in ENGINES:
        c = np.ones((4, 5))
        with gemm.using_engine(engine):
            gemm.gemm(a, b, c, 1.0)
        np.testing.assert_allclose(c, a @ b + 1, rtol=1e-12, err_msg=engine)


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown GEMM engine 'cublas'"):
        gemm.set_engine("cublas")
    with pytest.raises(ValueError, match=r"gemm shapes do not match: \(2, 3\) @ \(4, 2\) into \(2, 2\)"):
        gemm.gemm(np.ones((2, 3)), np.ones((4, 2)), np.ones((2, 2)))


@SETTINGS
@given(m=st.integers(1, 6), k=st.integers(1, 6), n=st.integers(1, 6), dtype=st.sampled_from([np.float32, np.float64]),
       trans=st.tuples(st.booleans(), st.booleans()), beta=st.sampled_from([0.0, 1.0]),
       seed=st.integers(0, 2**32 - 1))  # fmt: skip
def test_blocks_compute_the_products_of_sub_blocks(m: int, k: int, n: int, dtype: type, trans: tuple, beta: float,
                                                   seed: int) -> None:  # fmt: skip
    """``Blocks`` addresses sub-blocks by flat index and leading dimension, on every engine."""
    rng = np.random.default_rng(seed)
    a_full, b_full = rng.standard_normal((3, 8, 9)).astype(dtype), rng.standard_normal((7, 11)).astype(dtype)
    c_start = rng.standard_normal((8, 10)).astype(dtype)
    a_block = a_full[1, 1 : 1 + (k if trans[0] else m), 2 : 2 + (m if trans[0] else k)]
    b_block = b_full[1 : 1 + (n if trans[1] else k), 3 : 3 + (k if trans[1] else n)]
    op_a, op_b = (a_block.T if trans[0] else a_block), (b_block.T if trans[1] else b_block)
    want = c_start.astype(np.float64).copy()
    want[2 : 2 + m, 1 : 1 + n] = op_a.astype(np.float64) @ op_b.astype(np.float64) + beta * want[2 : 2 + m, 1 : 1 + n]
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for engine in ENGINES:
        c = c_start.copy()
        if not beta:
            c[2 : 2 + m, 1 : 1 + n] = np.nan
        with gemm.using_engine(engine):
            product = gemm.Blocks(a_full, b_full, c, *trans)
            product(m, n, k, 1 * 72 + 1 * 9 + 2, 1 * 11 + 3, 2 * 10 + 1, beta)
        np.testing.assert_allclose(c, want, err_msg=engine, **tolerance)  # the rest of c untouched


def test_blocks_refuse_arrays_they_cannot_address() -> None:
    with pytest.raises(ValueError, match="C-contiguous arrays of one dtype; a is float64, contiguous: False"):
        gemm.Blocks(np.ones((4, 4)).T, np.ones((4, 4)), np.ones((4, 4)))


X86_LINUX = sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")
needs_mkl = pytest.mark.skipif(not X86_LINUX, reason="the mkl wheel exists for x86-64 Linux only (the test extra "
                                                     "installs it there)")


@needs_mkl
def test_mkl_is_an_engine_where_the_test_extra_installs_it() -> None:
    assert gemm.mkl_paths(), "libmkl_rt not found: install the test extra (pip install -e '.[test]')"
    assert "mkl" in ENGINES


def test_mkl_is_looked_for_in_this_environment_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The installed ``mkl`` distribution's own file, else ``sys.prefix/lib``: a virtual environment without the
    wheel finds none, even where its base interpreter has one."""
    import importlib.metadata

    def no_distribution(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", no_distribution)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    assert gemm.mkl_paths() == []
    (tmp_path / "venv" / "lib").mkdir(parents=True)
    (tmp_path / "venv" / "lib" / "libmkl_rt.so.3").write_bytes(b"")
    assert gemm.mkl_paths() == [str(tmp_path / "venv" / "lib" / "libmkl_rt.so.3")]

    class Record:  # one entry of importlib.metadata.files: a name, and where it is
        def __init__(self, path: Path) -> None:
            self.name, self.path = path.name, path

        def locate(self) -> Path:
            return self.path

    user = tmp_path / "user" / "lib" / "libmkl_rt.so.3"
    user.parent.mkdir(parents=True)
    user.write_bytes(b"")
    monkeypatch.setattr(importlib.metadata, "files", lambda name: [Record(user)])
    assert gemm.mkl_paths() == [str(user), str(tmp_path / "venv" / "lib" / "libmkl_rt.so.3")]


@pytest.mark.parametrize("vendor", ["GenuineIntel", "AuthenticAMD", ""])
def test_auto_takes_mkl_on_intel_cpus_only(monkeypatch: pytest.MonkeyPatch, vendor: str) -> None:
    monkeypatch.setattr(gemm, "cpu_vendor", lambda: vendor)
    with gemm.using_engine("auto"):
        chosen = gemm.get_engine()
    if vendor == "GenuineIntel" and "mkl" in ENGINES:
        assert chosen == "mkl"
    else:
        assert chosen == next(name for name in ENGINES if name != "mkl")  # the first other engine that loads


@SETTINGS
@given(m=st.integers(1, 9), k=st.integers(1, 9), n=st.integers(1, 9), dtype=st.sampled_from([np.float32, np.float64]),
       kinds=st.tuples(*[st.sampled_from(["plain", "view", "transposed", "strided"])] * 2),
       seed=st.integers(0, 2**32 - 1))  # fmt: skip
def test_matmul_is_the_product_on_every_engine(m: int, k: int, n: int, dtype: type, kinds: tuple, seed: int) -> None:
    """What the layers call: a fresh C-contiguous product of the operands' dtype, equal to ``a @ b``."""
    rng = np.random.default_rng(seed)
    a, b = operand(rng, (m, k), dtype, kinds[0]), operand(rng, (k, n), dtype, kinds[1])
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for engine in ENGINES:
        with gemm.using_engine(engine), pytest.MonkeyPatch.context() as patch:
            patch.setattr(gemm, "MKL_MIN_PRODUCT", dict.fromkeys(gemm.MKL_MIN_PRODUCT, 1))  # small shapes: MKL too
            c = gemm.matmul(a, b)
        assert c.dtype == dtype and c.shape == (m, n) and c.flags.c_contiguous, engine
        np.testing.assert_allclose(c, a @ b, err_msg=engine, **tolerance)


@needs_mkl
def test_matmul_hands_products_from_the_threshold_on_to_mkl(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small products stay NumPy's (the ctypes call costs more than they take); from the threshold on, MKL's,
    a strided operand (a vector mask's half, ``x[:, ::2]``) too, through a contiguous copy."""
    calls = []
    raw = gemm._load("mkl")[np.dtype(np.float64)]
    monkeypatch.setitem(gemm._loaded["mkl"], np.dtype(np.float64), lambda *args: (calls.append(args), raw(*args)))
    side = round(gemm.MKL_MIN_PRODUCT[np.dtype(np.float64)] ** (1 / 3))
    rng = np.random.default_rng(2)
    with gemm.using_engine("mkl"):
        small = rng.standard_normal((side - 1, side)), rng.standard_normal((side, side))
        large = rng.standard_normal((side + 1, side)), rng.standard_normal((side, side))
        np.testing.assert_allclose(gemm.matmul(*small), small[0] @ small[1], rtol=1e-12)
        assert not calls
        np.testing.assert_allclose(gemm.matmul(*large), large[0] @ large[1], rtol=1e-12)
        assert len(calls) == 1
        strided = rng.standard_normal((side + 1, 2 * side))[:, ::2]
        np.testing.assert_allclose(gemm.matmul(strided, large[1]), strided @ large[1], rtol=1e-12)
        assert len(calls) == 2


def test_matmul_leaves_what_blas_cannot_take_to_numpy() -> None:
    """Mixed dtypes, 1-D operands, empty shapes and small products are ``a @ b`` itself on every engine."""
    rng = np.random.default_rng(1)
    cases = [(rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((4, 2))),
             (rng.standard_normal((3, 4)), rng.standard_normal(4)),
             (rng.standard_normal((4, 6))[:, ::2], rng.standard_normal((3, 5))),
             (np.ones((0, 3)), np.ones((3, 2))), (np.ones((2, 0)), np.ones((0, 3)))]
    for engine in ENGINES:
        with gemm.using_engine(engine):
            for a, b in cases:
                want = a @ b
                got = gemm.matmul(a, b)
                assert got.dtype == want.dtype and got.shape == want.shape, engine
                np.testing.assert_array_equal(got, want)


@needs_mkl
def test_mkl_workers_compute_in_the_flush_mode_of_the_library_call() -> None:
    """Inside library compute at 2 threads every MKL thread reads subnormals as zero; outside, the user's mode.

    ``A`` = 512×512 subnormals times ones is ≈ 5·10⁻³⁸ (a normal number) in every entry without DAZ and 0 with
    it, so an all-zero product means every thread that computed a row had the mode.
    """
    assert fpmode.get_flush_denormals() and fpmode.register().get is not None  # x86: MXCSR is reachable
    assert gemm.mkl_workers_inherit_flush()
    a = np.full((512, 512), 1e-40, dtype=np.float32)
    b = np.ones((512, 512), dtype=np.float32)
    with gemm.using_engine("mkl"), threads.num_threads(2):
        before = gemm.matmul(a, b)
        with threads.compute("train") as plan:
            inside = gemm.matmul(a, b)
        after = gemm.matmul(a, b)
    assert plan.blas == min(2, threads.usable_cores())
    assert not np.any(inside)
    np.testing.assert_allclose(before, 512 * np.float32(1e-40), rtol=1e-3)
    np.testing.assert_array_equal(after, before)


@needs_mkl
def test_with_mkl_computing_the_idle_openblas_pool_keeps_to_one_thread() -> None:
    """Only the engine's BLAS gets the plan's threads; NumPy's OpenBLAS would only wake and spin beside it."""
    libraries = fpmode.blas_libraries
    with gemm.using_engine("mkl"), threads.num_threads(2):
        counts = {lib.internal_api: lib.get_num_threads() for lib in libraries()}
        with threads.compute("train") as plan:
            inside = {lib.internal_api: lib.get_num_threads() for lib in libraries()}
        assert {lib.internal_api: lib.get_num_threads() for lib in libraries()} == counts
    assert inside["mkl"] == plan.blas
    assert inside.get("openblas", 1) == 1
