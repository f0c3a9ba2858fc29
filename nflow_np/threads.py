"""How many threads each library gets, per operation, set at call time and put back afterwards.

Two thread pools compute here: the BLAS's (the coupling nets' GEMMs) and Numba's (the fused
coupling-law kernels' ``prange`` loops). They never run at the same moment (a layer's GEMM finishes
before its law starts), so giving both ``n`` threads does not oversubscribe ``n`` cores with work;
what can steal a core is a pool that *waits* by spinning: an OpenMP pool (Numba's ``omp`` layer)
spins for a while after each kernel unless told to sleep. So the split is chosen per operation
(:data:`PLAN`):

=============  ===========  ============  ==========================================================
operation      BLAS         Numba         why
=============  ===========  ============  ==========================================================
``train``      ``n``        1             the step is GEMMs; its law calls are below the kernels'
                                          parallel threshold at training batch sizes, so a Numba
                                          pool would only spin on the cores the GEMMs need
``log_prob``   ``n``        1             measured: with both pools at ``n`` they fight over the
``sample``                                second core (each parks a spinning worker there after its
                                          own work), and ``log_prob`` at batch 8,192 took 114 ms
                                          against 64 ms with Numba on one thread (Intel Xeon
                                          Sapphire Rapids, 2 cores, float32; ``python -m benchmarks
                                          --sections threads --threads 2``); the laws are a small
                                          share of the time once a batch is passed in blocks
=============  ===========  ============  ==========================================================

``n`` is what the user gives (:func:`set_num_threads`, ``nflow --threads``) or, by default, the
cores this process may run on that no other process is keeping busy (:func:`idle_cores`), and no
more than the BLAS is allowed when the call starts (so a caller's own ``threadpool_limits`` or
``OPENBLAS_NUM_THREADS`` still caps it). With one
of two cores held by a busy process, the default is 1 thread, because a GEMM split over a core that
another process holds waits a scheduler time slice for its second half (measured 18× slower than one
thread, issue 17). Nothing here writes an environment variable: the counts go through threadpoolctl
and ``numba.set_num_threads`` inside :func:`compute` and are put back when it ends.

:func:`compute` also switches on the flush-to-zero mode for the threads it sets up
(:mod:`nflow_np.fpmode`). Nested calls (``evaluate`` calling ``log_prob``, a step inside ``fit``)
run under the outermost call's setting.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nflow_np import fpmode, gemm

OPERATIONS = ("train", "log_prob", "sample")
PLAN: dict[str, tuple[str, str]] = {"train": ("n", "1"), "log_prob": ("n", "1"), "sample": ("n", "1")}
"""Per operation, ``(BLAS threads, Numba threads)``: ``"n"`` for the thread count, ``"1"`` for one (table above)."""
PROBE_S = 0.05
"""The first default-thread decision samples the machine's load over this long (once per process)."""
REFRESH_S = 2.0
"""Later decisions reuse the load measured since the previous one when it is at least this old."""
BUSY_THRESHOLD = 0.5
"""A core counts as held by another process when others used at least this fraction of it."""

_requested: int | None = None
_state = threading.local()


@dataclass(frozen=True)
class Plan:
    """The thread counts of one call: ``blas`` for the GEMMs, ``numba`` for the fused kernels."""

    operation: str
    blas: int
    numba: int


def set_num_threads(n: int | None) -> None:
    """Use ``n`` threads for the library's compute; ``None``: the default (:func:`idle_cores`).

    Parameters
    ----------
    n : int or None
        A positive thread count (capped at the cores this process may use), or ``None``.
    """
    global _requested
    if n is not None and (isinstance(n, bool) or int(n) != n or int(n) < 1):
        raise ValueError(f"the thread count must be a positive integer or None, got {n!r}")
    _requested = None if n is None else int(n)


def get_num_threads() -> int | None:
    """The thread count given to :func:`set_num_threads`, or ``None`` for the default."""
    return _requested


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """:func:`set_num_threads` for the block, then the previous setting again."""
    previous = _requested
    set_num_threads(n)
    try:
        yield
    finally:
        set_num_threads(previous)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; all cores where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_busy_seconds() -> float | None:
    """Seconds of CPU time all processes have used on this process's cores since boot (``/proc/stat``)."""
    try:
        allowed = os.sched_getaffinity(0)
        lines = Path("/proc/stat").read_text().splitlines()
    except (AttributeError, OSError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in allowed:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
            busy += user + nice + system + irq + softirq + steal  # steal: the hypervisor gave it away
    return busy / ticks


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _sample() -> tuple[float, float, float] | None:
    busy = _cpu_busy_seconds()
    return None if busy is None else (time.monotonic(), busy, _own_seconds())


_last: tuple[float, float, float] | None = None
_last_idle: int | None = None


def idle_cores() -> int:
    """Cores of this process's affinity that no other process is keeping busy (at least 1).

    Measured as the CPU time every process used on those cores minus this process's own, over the
    time since the previous measurement (the first one waits :data:`PROBE_S`; later ones are reused
    for :data:`REFRESH_S`). Where ``/proc/stat`` is missing: the cores minus the 1-minute load average.
    """
    global _last, _last_idle
    cores = usable_cores()
    if _last is not None and _last_idle is not None and time.monotonic() - _last[0] < REFRESH_S:
        return _last_idle
    now = _sample()
    if now is None:
        try:
            return max(1, min(cores, round(cores + 1 - os.getloadavg()[0])))  # +1: this process's own share
        except OSError:
            return cores
    if _last is None:
        time.sleep(PROBE_S)
        _last, now = now, _sample()
    wall = max(now[0] - _last[0], 1e-3)
    others = max(0.0, (now[1] - _last[1]) - (now[2] - _last[2])) / wall
    _last = now
    _last_idle = max(1, min(cores, cores - int(others + 1 - BUSY_THRESHOLD)))
    return _last_idle


def plan(operation: str, n: int | None = None) -> Plan:
    """The thread counts for ``operation`` (one of :data:`OPERATIONS`) at ``n`` threads.

    ``n`` defaults to :func:`set_num_threads`'s count, else :func:`idle_cores`; it is capped at the
    usable cores. Where flushing is on but cannot reach the BLAS's worker threads
    (:func:`nflow_np.fpmode.blas_workers_reachable`), BLAS keeps to the calling thread: a subnormal
    cliff on a worker thread would cost more than the second core gains.
    """
    if operation not in PLAN:
        raise ValueError(f"unknown operation {operation!r}; choose from {list(OPERATIONS)}")
    if n is None:
        n = _requested if _requested is not None else min(idle_cores(), _blas_threads_allowed())
    n = max(1, min(int(n), usable_cores()))
    blas, numba = (n if rule == "n" else 1 for rule in PLAN[operation])
    if blas > 1 and fpmode.get_flush_denormals() and not fpmode.blas_workers_reachable():
        blas = 1
    return Plan(operation, blas, numba)


def _blas_threads_allowed() -> int:
    """The largest thread count a loaded BLAS is set to now (the caller's cap), or the cores if none is loaded."""
    counts = [library.get_num_threads() for library in fpmode.blas_libraries()]
    return max((int(c) for c in counts if c), default=usable_cores())


def _set_counts(blas: int, numba: int) -> list[tuple[object, int]]:
    """Set the BLAS that computes to ``blas`` threads and Numba (if imported) to ``numba``; return what to put back.

    With MKL as the GEMM engine (:mod:`nflow_np.gemm`) only MKL gets ``blas``; NumPy's OpenBLAS gets one thread,
    since a stray NumPy product would otherwise wake its pool to spin beside MKL's (docs/numerics.md#the-gemm-engine).
    With any other engine every loaded BLAS gets ``blas``. Only counts that differ are written (a call whose plan
    matches the current setting writes nothing).
    """
    changed: list[tuple[object, int]] = []
    computing = "mkl" if gemm.get_engine() == "mkl" else None  # None: every BLAS may compute the GEMMs
    for library in fpmode.blas_libraries():
        previous = library.get_num_threads()
        wanted = blas if computing in (None, library.internal_api) else 1  # an idle pool would only spin
        if previous and previous != wanted:
            library.set_num_threads(wanted)
            changed.append((library.set_num_threads, previous))
    module = sys.modules.get("numba")
    if module is not None and hasattr(module, "set_num_threads"):
        previous, wanted = module.get_num_threads(), min(numba, module.config.NUMBA_NUM_THREADS)
        if previous != wanted:
            module.set_num_threads(wanted)
            changed.append((module.set_num_threads, previous))
    return changed


@contextlib.contextmanager
def compute(operation: str, flush: bool | None = None) -> Iterator[Plan]:
    """Run the block as library compute of kind ``operation``: its thread plan, then the flush mode.

    Parameters
    ----------
    operation : {"train", "log_prob", "sample"}
    flush : bool, optional
        Passed to :func:`nflow_np.fpmode.flush_denormals` (default: the process-wide setting).

    Yields
    ------
    Plan
        The counts in force (the outer call's inside a nested one).
    """
    outer = getattr(_state, "plan", None)
    if outer is not None:
        yield outer
        return
    gemm.get_engine()  # load the GEMM engine first, so that its library's threads are counted and set below
    chosen = plan(operation)
    changed = _set_counts(chosen.blas, chosen.numba)
    _state.plan = chosen
    try:
        with fpmode.flush_denormals(flush):
            yield chosen
    finally:
        _state.plan = None
        for set_count, previous in reversed(changed):
            set_count(previous)
