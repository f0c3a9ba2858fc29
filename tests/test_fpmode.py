"""Flush-to-zero mode (nflow_np/fpmode.py): on inside the library's compute on every thread it uses, the
user's own mode after, the opt-out, and no change at all to results computed from normal numbers.

The mode is checked directly (MXCSR read on each thread) and by behaviour (a multi-threaded GEMM of a
subnormal operand gives exact zeros), never by timing: on this AMD machine subnormals cost nothing,
so a timing could not fail.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

import nflow_np
from nflow_np import fpmode, gemm, mxcsr, threads
from nflow_np.architectures import build_model
from nflow_np.optim import Adam

pytestmark = pytest.mark.skipif(not fpmode.status()["supported"], reason="MXCSR exists on x86 only")
TWO = min(2, threads.usable_cores())
"""Threads per pool in these tests (2 where the machine has them: then the worker threads are covered)."""


@pytest.fixture(autouse=True)
def openblas_computes() -> Iterator[None]:
    """These tests reach OpenBLAS's threads by their team: NumPy's OpenBLAS must be the engine that computes.

    (With MKL computing, OpenBLAS keeps to one thread and MKL's threads take the caller's mode: test_gemm.py.)
    """
    if "openblas" not in gemm.available_engines():
        yield
        return
    with gemm.using_engine("openblas"):
        yield


@pytest.fixture
def numba_pool() -> Iterator[None]:
    """Numba imported and its thread pool started, so its worker threads exist to be checked."""
    numba = pytest.importorskip("numba")

    @numba.njit(parallel=True)
    def touch(x):
        for i in numba.prange(x.shape[0]):
            x[i] += 1.0

    touch(np.zeros(64))
    yield


def flushed(mode: int) -> bool:
    return mode & fpmode.FLUSH_BITS == fpmode.FLUSH_BITS


def test_mode_is_on_on_every_thread_inside_and_as_before_after(numba_pool: None, monkeypatch: object) -> None:
    # both pools at n threads (threads.PLAN's default keeps Numba on one): every worker must be reached
    monkeypatch.setitem(threads.PLAN, "log_prob", ("n", "n"))
    with threads.num_threads(TWO), threads.compute("log_prob") as plan:
        inside = fpmode.thread_modes()
    after = fpmode.thread_modes()
    assert plan.blas == plan.numba == TWO
    pools = {"main", *(["numba", "blas0"] if TWO > 1 else [])}
    assert pools <= set(inside)
    for pool in pools:
        assert all(flushed(mode) for mode in inside[pool]), (pool, [hex(m) for m in inside[pool]])
    assert not any(flushed(mode) for modes in after.values() for mode in modes)


def test_threaded_gemm_of_subnormals_gives_zeros_only_while_flushing() -> None:
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((600, 600)) * 1e-39).astype(np.float32)  # every entry subnormal
    b = rng.standard_normal((600, 600)).astype(np.float32)
    with threads.num_threads(TWO), threads.compute("log_prob"):
        inside = a @ b  # split over the BLAS's threads: each must read a as zero
    assert np.count_nonzero(inside) == 0
    with fpmode.blas_controller().limit(limits=TWO, user_api="blas"):
        assert np.count_nonzero(a @ b) == a.size  # the same product outside: the test can fail


def test_the_users_own_bits_come_back_exactly() -> None:
    before = fpmode.get_mxcsr()
    fpmode.set_mxcsr(before | fpmode.FTZ)  # the user runs with FTZ only
    try:
        with threads.num_threads(TWO), threads.compute("train"):
            assert flushed(fpmode.get_mxcsr())
        assert fpmode.get_mxcsr() & fpmode.FLUSH_BITS == fpmode.FTZ
    finally:
        fpmode.set_mxcsr(before)


def test_an_exception_inside_restores_the_mode() -> None:
    before = fpmode.get_mxcsr() & fpmode.FLUSH_BITS
    with pytest.raises(ZeroDivisionError), threads.num_threads(TWO), threads.compute("sample"):
        assert flushed(fpmode.get_mxcsr())
        _ = 1 / 0
    assert fpmode.get_mxcsr() & fpmode.FLUSH_BITS == before
    assert not any(flushed(mode) for modes in fpmode.thread_modes().values() for mode in modes)


def test_opt_out_leaves_every_mode_alone() -> None:
    before = fpmode.get_mxcsr()
    with fpmode.flush_denormals(False) as flushing:
        assert not flushing and fpmode.get_mxcsr() == before
    fpmode.set_flush_denormals(False)
    try:
        with threads.num_threads(TWO), threads.compute("log_prob"):
            assert not any(flushed(mode) for modes in fpmode.thread_modes().values() for mode in modes)
    finally:
        fpmode.set_flush_denormals(True)
    assert nflow_np.get_flush_denormals()


def test_nested_blocks_leave_the_outer_mode_in_force() -> None:
    with fpmode.flush_denormals() as outer:
        with fpmode.flush_denormals() as inner:
            assert outer and inner
        assert flushed(fpmode.get_mxcsr())
    assert not flushed(fpmode.get_mxcsr())


def test_status_bits_of_the_register_other_than_ftz_and_daz_are_untouched() -> None:
    before = fpmode.get_mxcsr()
    _ = np.full(4, 1e-39, np.float32) * np.float32(0.5)  # raises the sticky underflow/denormal flags
    flags = fpmode.get_mxcsr()
    with fpmode.flush_denormals():
        assert fpmode.get_mxcsr() & ~fpmode.FLUSH_BITS == flags & ~fpmode.FLUSH_BITS
    assert fpmode.get_mxcsr() == flags
    fpmode.set_mxcsr(before)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_results_from_normal_numbers_are_unchanged_bit_for_bit(dtype: str) -> None:
    x = np.random.default_rng(1).standard_normal((256, 16)).astype(dtype)

    def run(flush: bool) -> list[np.ndarray]:
        fpmode.set_flush_denormals(flush)
        try:
            model = build_model("realnvp", 16, layers=4, hidden=(32, 32), dtype=dtype, seed=3)
            optimizer = Adam(model, lr=1e-2)
            for _ in range(3):
                model.zero_grad()
                model.nll_and_backward(x)
                optimizer.step()
            grads = [grad.copy() for _, _, grad in model.named_parameters()]
            return [model.log_prob(x), model.sample(64, np.random.default_rng(2)), *grads]
        finally:
            fpmode.set_flush_denormals(True)

    for flushed_result, plain in zip(run(True), run(False), strict=True):
        np.testing.assert_array_equal(flushed_result, plain)


def test_a_coupling_net_reads_subnormal_inputs_as_zeros_inside_a_library_call() -> None:
    model = build_model("realnvp", 8, layers=2, hidden=(16,), dtype="float32", seed=0)
    net = model.flow.flows[0].net
    for layer in net.layers:
        layer.params["W"][...] = np.float32(1e30)  # 1e-39 · 1e30 = 1e-9: far above zero unless read as zero
    tiny, zeros = np.full((32, 4), 1e-39, np.float32), np.zeros((32, 4), np.float32)
    with threads.num_threads(TWO), threads.compute("log_prob"):
        np.testing.assert_array_equal(net.forward(tiny), net.forward(zeros))
    assert not np.array_equal(net.forward(tiny), net.forward(zeros))


def test_without_llvmlite_the_calling_thread_is_reached_through_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_llvmlite(self: object) -> None:
        raise ImportError("no llvmlite")

    monkeypatch.setattr(mxcsr._Register, "_jit", no_llvmlite)
    fallback = mxcsr._Register()
    assert fallback.how.startswith("glibc") and fallback.member is None
    before = fallback.get()
    assert before == fpmode.get_mxcsr()
    fallback.set(before | fpmode.FLUSH_BITS)
    try:
        assert (np.full(1, 1e-39, np.float32) * np.float32(1))[0] == 0  # DAZ is on: by behaviour
    finally:
        fallback.set(before)
    monkeypatch.setattr(fpmode, "_register", fallback)
    monkeypatch.setattr(fpmode, "_reachable", None)
    assert not fpmode.blas_workers_reachable()
    assert threads.plan("train", 2).blas == 1  # no cliff on a worker thread it cannot reach


def test_on_other_cpus_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mxcsr.platform, "machine", lambda: "aarch64")
    other = mxcsr._Register()
    monkeypatch.setattr(fpmode, "_register", other)
    assert fpmode.status()["supported"] is False and fpmode.status()["how"] == "unsupported CPU"
    with fpmode.flush_denormals() as flushing:
        assert not flushing
    assert fpmode.get_mxcsr() is None and fpmode.thread_modes() == {"main": []}
    with pytest.raises(RuntimeError, match="not reachable"):
        fpmode.set_mxcsr(0)
