"""The x86 MXCSR register: read and written on the calling thread, and on a team of worker threads.

:mod:`nflow_np.fpmode` builds the flush-to-zero mode on this (its docstring and ``docs/numerics.md`` say why
and how). Here: the LLVM IR that llvmlite compiles (``llvm.x86.sse.stmxcsr``/``ldmxcsr``, no C compiler
needed), the team member that sets a thread's bits, records them and meets the other members at a spin
barrier, the ``ctypes`` layouts it reads and writes, and the glibc ``fenv`` fallback for the calling thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from collections.abc import Callable

SPIN_LIMIT_CYCLES = 1 << 32
"""How long (time-stamp-counter cycles, ~1–2 s) a team member waits for the others at the barrier
before it gives up; a team that times out is reported (a warning) instead of hanging the process."""

_IR = r"""
%Entry = type { i64, i32, i32 }
%Team = type { i32, i32, i32, i32, i64, i32, i32, ptr, ptr }

declare void @llvm.x86.sse.stmxcsr(ptr)
declare void @llvm.x86.sse.ldmxcsr(ptr)
declare void @llvm.x86.sse2.pause()
declare i64 @llvm.readcyclecounter()
declare i64 @pthread_self()

define i32 @nflow_get_mxcsr() {
  %p = alloca i32, align 4
  call void @llvm.x86.sse.stmxcsr(ptr %p)
  %v = load i32, ptr %p, align 4
  ret i32 %v
}

define void @nflow_set_mxcsr(i32 %v) {
  %p = alloca i32, align 4
  store i32 %v, ptr %p, align 4
  call void @llvm.x86.sse.ldmxcsr(ptr %p)
  ret void
}
"""

_IR += r"""
; One member of a team (struct Team): new = (old & ~mask) | (bits & mask), where bits is this
; thread's entry in the restore table if it has one, else team.bits; appends {thread, old, new}
; to team.table; then waits until all team.total members have arrived (or the spin limit passed).
define void @nflow_team_member(ptr %team) {
entry:
  %bits_var = alloca i32, align 4
  %i_var = alloca i32, align 4
  %self = call i64 @pthread_self()
  %old = call i32 @nflow_get_mxcsr()
  %mask_p = getelementptr inbounds %Team, ptr %team, i32 0, i32 2
  %mask = load i32, ptr %mask_p, align 4
  %bits_p = getelementptr inbounds %Team, ptr %team, i32 0, i32 3
  %bits0 = load i32, ptr %bits_p, align 4
  store i32 %bits0, ptr %bits_var, align 4
  %count_p = getelementptr inbounds %Team, ptr %team, i32 0, i32 6
  %count = load i32, ptr %count_p, align 4
  %restore_p = getelementptr inbounds %Team, ptr %team, i32 0, i32 8
  %restore = load ptr, ptr %restore_p, align 8
  store i32 0, ptr %i_var, align 4
  br label %search

search:
  %i = load i32, ptr %i_var, align 4
  %more = icmp slt i32 %i, %count
  br i1 %more, label %check, label %apply

check:
  %e = getelementptr inbounds %Entry, ptr %restore, i32 %i
  %thread = load i64, ptr %e, align 8
  %i1 = add i32 %i, 1
  store i32 %i1, ptr %i_var, align 4
  %mine = icmp eq i64 %thread, %self
  br i1 %mine, label %found, label %search

found:
  %e_old_p = getelementptr inbounds %Entry, ptr %e, i32 0, i32 1
  %e_old = load i32, ptr %e_old_p, align 4
  store i32 %e_old, ptr %bits_var, align 4
  br label %apply

apply:
  %bits = load i32, ptr %bits_var, align 4
  %not_mask = xor i32 %mask, -1
  %kept = and i32 %old, %not_mask
  %chosen = and i32 %bits, %mask
  %new = or i32 %kept, %chosen
  call void @nflow_set_mxcsr(i32 %new)
  %arrived_p = getelementptr inbounds %Team, ptr %team, i32 0, i32 0
  %slot = atomicrmw add ptr %arrived_p, i32 1 seq_cst, align 4
  %table_p = getelementptr inbounds %Team, ptr %team, i32 0, i32 7
  %table = load ptr, ptr %table_p, align 8
  %out = getelementptr inbounds %Entry, ptr %table, i32 %slot
  store i64 %self, ptr %out, align 8
  %out_old = getelementptr inbounds %Entry, ptr %out, i32 0, i32 1
  store i32 %old, ptr %out_old, align 4
  %out_new = getelementptr inbounds %Entry, ptr %out, i32 0, i32 2
  store i32 %new, ptr %out_new, align 4
  %total_p = getelementptr inbounds %Team, ptr %team, i32 0, i32 1
  %total = load i32, ptr %total_p, align 4
  %limit_p = getelementptr inbounds %Team, ptr %team, i32 0, i32 4
  %limit = load i64, ptr %limit_p, align 8
  %t0 = call i64 @llvm.readcyclecounter()
  br label %spin

spin:
  %n = load atomic i32, ptr %arrived_p seq_cst, align 4
  %all = icmp sge i32 %n, %total
  br i1 %all, label %done, label %wait

wait:
  call void @llvm.x86.sse2.pause()
  %t = call i64 @llvm.readcyclecounter()
  %waited = sub i64 %t, %t0
  %late = icmp ugt i64 %waited, %limit
  br i1 %late, label %timeout, label %spin

timeout:
  %timed_out_p = getelementptr inbounds %Team, ptr %team, i32 0, i32 5
  store atomic i32 1, ptr %timed_out_p seq_cst, align 4
  br label %done

done:
  ret void
}
"""


class _Entry(ctypes.Structure):
    _fields_ = [("thread", ctypes.c_uint64), ("old", ctypes.c_uint32), ("new", ctypes.c_uint32)]


class _Team(ctypes.Structure):
    """What every member of one team reads (the mode to apply) and writes (its thread and old/new MXCSR)."""

    _fields_ = [("arrived", ctypes.c_int32), ("total", ctypes.c_int32), ("mask", ctypes.c_uint32),
                ("bits", ctypes.c_uint32), ("spin_limit", ctypes.c_uint64), ("timed_out", ctypes.c_int32),
                ("restore_count", ctypes.c_int32), ("table", ctypes.c_void_p), ("restore", ctypes.c_void_p)]


class _Register:
    """Access to MXCSR: ``get()``/``set(value)`` on the calling thread, ``member`` (address of the team
    function, or ``None``) for the worker threads, and ``how`` it was reached."""

    def __init__(self) -> None:
        self.get: Callable[[], int] | None = None
        self.set: Callable[[int], None] | None = None
        self.member: int | None = None
        self.how = "unsupported CPU" if not _is_x86() else "unavailable"
        self.why = ""
        if not _is_x86():
            return
        try:
            self._jit()
        except Exception as error:  # llvmlite missing or unable to compile: the C library's fenv
            self.why = f"llvmlite: {type(error).__name__}: {error}"
            self._fenv()

    def _jit(self) -> None:
        import llvmlite.binding as llvm

        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        llvm.add_symbol("pthread_self", ctypes.cast(libc.pthread_self, ctypes.c_void_p).value)
        module = llvm.parse_assembly(_IR)
        module.verify()
        machine = llvm.Target.from_default_triple().create_target_machine()
        self._engine = llvm.create_mcjit_compiler(module, machine)  # kept alive: it owns the code
        self._engine.finalize_object()
        self.get = ctypes.CFUNCTYPE(ctypes.c_uint32)(self._engine.get_function_address("nflow_get_mxcsr"))
        self.set = ctypes.CFUNCTYPE(None, ctypes.c_uint32)(self._engine.get_function_address("nflow_set_mxcsr"))
        self.member = self._engine.get_function_address("nflow_team_member")
        self.how = "llvmlite"

    def _fenv(self) -> None:
        class FEnv(ctypes.Structure):  # glibc x86-64 fenv_t: the x87 environment, then MXCSR
            _fields_ = [("x87", ctypes.c_uint16 * 14), ("mxcsr", ctypes.c_uint32)]

        libm = ctypes.CDLL(ctypes.util.find_library("m") or None)  # fegetenv/fesetenv live in libm
        if ctypes.sizeof(FEnv) != 32 or not hasattr(libm, "fegetenv"):
            return

        def get() -> int:
            env = FEnv()
            libm.fegetenv(ctypes.byref(env))
            return int(env.mxcsr)

        def set_(value: int) -> None:
            env = FEnv()
            libm.fegetenv(ctypes.byref(env))
            env.mxcsr = value
            libm.fesetenv(ctypes.byref(env))

        self.get, self.set, self.how = get, set_, "glibc fenv (calling thread only)"


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
