"""Flush subnormal floats to zero inside the library's compute, on every thread that computes.

x86 cores keep the SSE/AVX floating-point mode in the per-thread register MXCSR. Two of its bits
decide what happens below the smallest normal number (``docs/numerics.md``):

- bit 15, FTZ (flush to zero): a result that would be subnormal is written as ±0;
- bit 6, DAZ (denormals are zero): a subnormal operand is read as ±0.

With both set, no instruction ever sees or makes a subnormal, so none takes the slow microcode
assist that costs some Intel cores 30–130× per operation. :func:`flush_denormals` sets both for the
duration of a library call (``log_prob``, ``sample``, a training step) and then puts back, thread by
thread, exactly the two bits each thread had: the user's own mode is what remains when the call
returns. Only those two bits are touched; rounding mode, exception masks and the sticky exception
flags that NumPy's ``errstate`` reads are left alone.

MXCSR belongs to one thread, and three kinds of threads compute here:

- the calling thread: read and written directly;
- OpenBLAS's worker threads, created when NumPy loaded it and never told about the caller's mode
  (NumPy's OpenBLAS is built without ``CONSISTENT_FPCSR``): reached through ``gotoblas_pthread``,
  OpenBLAS's own exported "run this function on my threads" entry, with a team of as many members
  as the BLAS will use;
- Numba's worker threads (the ``prange`` kernels): reached by a ``prange`` loop of one iteration per
  thread;
- MKL's worker threads, where :mod:`nflow_np.gemm` computes with MKL: Intel's OpenMP copies the calling
  thread's mode into each worker at the start of every parallel region, so they compute in the mode of the
  thread that called the GEMM, with no team (:func:`nflow_np.gemm.mkl_workers_inherit_flush` proves it
  once per process; if it fails, BLAS keeps to the calling thread while flushing). After a library call a
  worker holds the flush bits until the next MKL call from any thread, which gives it that caller's mode
  again: no computation outside the library sees them.

A team's members meet at a spin barrier before they return, so no thread can run two members'
work while another runs none: every thread of the team is set, each exactly once. Threads
created later inherit the mode of the thread that creates them (Linux copies the register), so
the calling thread's own mode is the user's whenever a team runs and a pool it starts inherits the
user's mode, not ours.

How the register is reached: llvmlite (which Numba ships) compiles a few lines of LLVM IR using the
``llvm.x86.sse.stmxcsr``/``ldmxcsr`` intrinsics, so nothing needs a C compiler. Without llvmlite the
calling thread's MXCSR is reached through glibc's ``fegetenv``/``fesetenv`` (its ``fenv_t`` ends with
the MXCSR word), and the worker threads cannot be reached: :func:`status` says so, and
:mod:`nflow_np.threads` then keeps BLAS on the calling thread while flushing. On a CPU that is not
x86 (ARM has its own FZ bit, not handled here) everything is a no-op and ``status()["supported"]``
is ``False``.

Opt out with :func:`set_flush_denormals` ``(False)`` (process-wide) or ``flush_denormals(False)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
import warnings
from collections.abc import Callable, Iterator

from nflow_np import mxcsr

FTZ = 1 << 15
"""MXCSR bit 15: results that would be subnormal are flushed to ±0."""
DAZ = 1 << 6
"""MXCSR bit 6: subnormal operands are read as ±0."""
FLUSH_BITS = FTZ | DAZ

_register: mxcsr._Register | None = None
_enabled = True
_state = threading.local()
_warned: set[str] = set()


def register() -> mxcsr._Register:
    """The MXCSR accessor, built on first use (compiling the IR takes ~20 ms)."""
    global _register
    if _register is None:
        _register = mxcsr._Register()
    return _register


def set_flush_denormals(enabled: bool) -> None:
    """Switch flushing on (the default) or off for every later library call, process-wide."""
    global _enabled
    _enabled = bool(enabled)


def get_flush_denormals() -> bool:
    """Whether library calls flush subnormals (:func:`set_flush_denormals`)."""
    return _enabled


def get_mxcsr() -> int | None:
    """The calling thread's MXCSR, or ``None`` where it cannot be read (not x86)."""
    reg = register()
    return None if reg.get is None else int(reg.get())


def set_mxcsr(value: int) -> None:
    """Write the calling thread's MXCSR (raises where it cannot be written)."""
    reg = register()
    if reg.set is None:
        raise RuntimeError(f"MXCSR is not reachable here ({reg.how})")
    reg.set(int(value))


# -- teams: one member per worker thread -----------------------------------------------------------------------------
def _openblas_pools() -> list[tuple[Callable, Callable[[], int], int]]:
    """Per loaded OpenBLAS: ``(gotoblas_pthread, its current thread count, the size of its pool)``."""
    pools = []
    for controller in blas_controller().select(internal_api="openblas").lib_controllers:
        library = controller.dynlib
        if not hasattr(library, "gotoblas_pthread") or not hasattr(library, "blas_num_threads"):
            continue
        run = library.gotoblas_pthread
        run.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        run.restype = ctypes.c_int
        pool = ctypes.c_int.in_dll(library, "blas_num_threads")  # read at each use: the pool can grow
        pools.append((run, controller.get_num_threads, pool))
    return pools


_pools_cache: list | None = None
_controller_cache = None


def blas_controller():  # -> threadpoolctl.ThreadpoolController
    """The threadpoolctl controller of the loaded BLAS libraries, built once (scanning them takes ~1 ms)."""
    global _controller_cache
    if _controller_cache is None:
        from threadpoolctl import ThreadpoolController

        _controller_cache = ThreadpoolController()
    return _controller_cache


_libraries_cache: list | None = None


def blas_libraries() -> list:
    """threadpoolctl's controllers of the loaded BLAS libraries (``user_api="blas"``), listed once."""
    global _libraries_cache
    if _libraries_cache is None:
        _libraries_cache = list(blas_controller().select(user_api="blas").lib_controllers)
    return _libraries_cache


def forget_blas_libraries() -> None:
    """Scan the loaded BLAS libraries again at next use (:mod:`nflow_np.gemm` calls it when it loads MKL)."""
    global _controller_cache, _libraries_cache, _pools_cache, _reachable
    _controller_cache = _libraries_cache = _pools_cache = _reachable = None


def _blas_pools() -> list:
    global _pools_cache
    if _pools_cache is None:
        _pools_cache = _openblas_pools()
    return _pools_cache


_reachable: bool | None = None


def blas_workers_reachable() -> bool:
    """Whether the worker threads of every loaded BLAS can be given the mode (OpenBLAS and llvmlite)."""
    global _reachable
    if _reachable is None:
        _reachable = _blas_reachable()
    return _reachable


def _blas_reachable() -> bool:
    reg = register()
    if reg.member is None:
        return False
    openblas = len(blas_controller().select(internal_api="openblas").lib_controllers)
    mkl = len(blas_controller().select(internal_api="mkl").lib_controllers)
    others = len(blas_controller().select(user_api="blas").lib_controllers) - openblas - mkl
    if mkl:
        from nflow_np import gemm

        if mkl > 1 or not gemm.mkl_workers_inherit_flush():  # its threads take the caller's mode, or are unreached
            return False
    return others == 0 and len(_blas_pools()) == openblas


_numba_kernel = None


def _numba_team_kernel():
    """``team(n, address)``: a ``prange`` of ``n`` iterations, each one team member (compiled once per process:
    the member's address is a constant of the compiled code, so it is not cached on disk)."""
    global _numba_kernel
    if _numba_kernel is None:
        from numba import njit, prange

        member = ctypes.CFUNCTYPE(None, ctypes.c_uint64)(register().member)

        @njit(parallel=True, cache=False)
        def team(n, address):
            for _ in prange(n):
                member(address)

        _numba_kernel = (team, member)
    return _numba_kernel[0]


def _numba_threads() -> int:
    """Numba's thread count for the next ``prange``, or 0 when Numba is not imported (so its pool cannot run)."""
    numba = sys.modules.get("numba")
    return int(numba.get_num_threads()) if numba is not None and hasattr(numba, "get_num_threads") else 0


def _run_team(start: Callable[[int, int], object], n: int, mask: int, bits: int,
              restore: list[tuple[int, int, int]] | None = None, label: str = "") -> list[tuple[int, int, int]]:
    """Run a team of ``n`` members through ``start(n, address_of_team)``; return ``[(thread, old, new)]``."""
    table = (mxcsr._Entry * n)()
    restore = restore or []
    restore_table = (mxcsr._Entry * max(1, len(restore)))(*[mxcsr._Entry(*entry) for entry in restore])
    team = mxcsr._Team(0, n, mask, bits, mxcsr.SPIN_LIMIT_CYCLES, 0, len(restore),
                 ctypes.cast(table, ctypes.c_void_p), ctypes.cast(restore_table, ctypes.c_void_p))
    start(n, ctypes.addressof(team))
    entries = [(e.thread, e.old, e.new) for e in table[: min(team.arrived, n)]]
    if team.timed_out or len({thread for thread, _, _ in entries}) != n:
        if label not in _warned:
            _warned.add(label)
            warnings.warn(f"nflow_np.fpmode: the {label} team of {n} threads did not meet (a busy machine?); "
                          "some of its threads may compute without the flush mode", RuntimeWarning, stacklevel=3)
    return entries


def _teams() -> list[tuple[str, Callable[[int, int], object], int]]:
    """``(label, start, n)`` for every worker pool the next compute will use with more than one thread."""
    reg = register()
    if reg.member is None:
        return []
    teams = []
    threads = _numba_threads()
    if threads > 1:
        teams.append(("numba", lambda n, address: _numba_team_kernel()(n, address), threads))
    for k, (run, current, pool) in enumerate(_blas_pools()):
        n = min(int(current()), pool.value)
        if n > 1:
            teams.append((f"blas{k}", lambda n, address, run=run, member=reg.member: run(n, member, address, 0), n))
    return teams


@contextlib.contextmanager
def flush_denormals(enabled: bool | None = None) -> Iterator[bool]:
    """FTZ and DAZ on for the block, on the calling thread and on the BLAS and Numba threads it will use.

    Parameters
    ----------
    enabled : bool, optional
        ``False``: leave every mode as it is (an opt-out for this block). Default: the process-wide
        setting (:func:`set_flush_denormals`, on unless switched off).

    Yields
    ------
    bool
        Whether flushing is in force inside the block.

    Each thread's two bits are put back as they were when the block ends, however it ends. Nested
    blocks on one thread do nothing: the outermost one decides. Thread counts must not grow inside
    the block (:mod:`nflow_np.threads` sets them before entering it).
    """
    reg = register()
    if getattr(_state, "depth", 0) or not (_enabled if enabled is None else enabled) or reg.get is None:
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            yield bool(getattr(_state, "flushing", False))
        finally:
            _state.depth -= 1
        return
    saved = int(reg.get())
    done: list[tuple[str, Callable, int, list]] = []
    _state.depth, _state.flushing = 1, True
    try:
        for label, start, n in _teams():
            reg.set(saved)  # a pool the team starts inherits the user's mode, not ours
            done.append((label, start, n, _run_team(start, n, FLUSH_BITS, FLUSH_BITS, label=label)))
        reg.set(saved | FLUSH_BITS)
        yield True
    finally:
        for label, start, n, entries in reversed(done):
            _run_team(start, n, FLUSH_BITS, saved, restore=entries, label=label)
        reg.set((int(reg.get()) & ~FLUSH_BITS) | (saved & FLUSH_BITS))
        _state.depth, _state.flushing = 0, False


def thread_modes() -> dict[str, list[int]]:
    """Every computing thread's MXCSR now: ``{"main": [...], "numba": [...], "blas0": [...]}``.

    The worker pools are read by a team that changes nothing (mask 0), at their current thread counts;
    a pool of one thread is the calling thread and is left out.
    """
    reg = register()
    modes = {"main": [] if reg.get is None else [int(reg.get())]}
    for label, start, n in _teams():
        modes[label] = [old for _, old, _ in _run_team(start, n, 0, 0, label=label)]
    return modes


def status() -> dict[str, object]:
    """What :func:`flush_denormals` can do here, for the benchmark JSON and the docs."""
    reg = register()
    return {"supported": reg.get is not None, "how": reg.how, "enabled": _enabled,
            "blas_workers": blas_workers_reachable(), "numba_workers": reg.member is not None,
            "mxcsr": get_mxcsr(), **({"fallback_reason": reg.why} if reg.why else {})}
