"""Which machine a benchmark ran on: CPU model and vendor, the vector extensions that matter to its GEMMs and
kernels, cores (logical, physical, usable by this process), the BLAS and the kernel it chose, Numba's
threading, the flush-to-zero mode and the thread plans. Every figure of ``python -m benchmarks`` is reported
beside this (table header and ``results.json["machine"]``): a ratio measured on one CPU is not a ratio on
another (issue 17: the same step was 1.3× faster than PyTorch on an AMD EPYC and 0.9× on a Xeon).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

from nflow_np import fpmode, gemm, threads

FLAGS = ("sse2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
         "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
"""The CPU flags reported (``/proc/cpuinfo``): the SIMD widths and matrix units a BLAS kernel can use."""


def cpuinfo() -> dict[str, object]:
    """Model, vendor, the :data:`FLAGS` present, and the physical core count, from ``/proc/cpuinfo``."""
    model, vendor, flags, cores = platform.processor() or platform.machine(), "", set(), set()
    try:
        blocks = Path("/proc/cpuinfo").read_text().split("\n\n")
    except OSError:
        blocks = []
    for block in blocks:
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        model = fields.get("model name", model)
        vendor = fields.get("vendor_id", vendor)
        flags |= set(fields.get("flags", "").split())
        if "core id" in fields:
            cores.add((fields.get("physical id"), fields["core id"]))
    return {"cpu": model, "vendor": vendor, "flags": [f for f in FLAGS if f in flags],
            "physical_cores": len(cores) or None}


def version(package: str) -> str | None:
    """The installed version of ``package``, or ``None``."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def blas() -> list[dict[str, object]]:
    """Each loaded BLAS (threadpoolctl): library, version, the kernel it chose (OpenBLAS's core name), threading."""
    rows = []
    for controller in fpmode.blas_controller().select(user_api="blas").lib_controllers:
        info = controller.info()
        rows.append({key: info.get(key) for key in ("internal_api", "version", "architecture", "threading_layer",
                                                    "prefix")} | {"threads_now": info.get("num_threads")})
    return rows


def numba_info() -> dict[str, object] | None:
    """Numba's version, pool size and configured threading layer, or ``None`` where it is not installed."""
    try:
        import numba
    except ImportError:
        return None
    return {"version": numba.__version__, "pool_threads": numba.config.NUMBA_NUM_THREADS,
            "threading_layer": numba.config.THREADING_LAYER}


def describe(threads_given: int, torch_version: str | None) -> dict[str, object]:
    """Everything above, with the thread count the suite gives and the plan each operation runs with."""
    info = cpuinfo()
    return info | {
        "cores": os.cpu_count(), "usable_cores": threads.usable_cores(), "idle_cores_at_start": threads.idle_cores(),
        "platform": platform.platform(), "python": platform.python_version(), "numpy": version("numpy"),
        "torch": torch_version, "gemm_engine": gemm.get_engine(),  # first: it loads the library blas() lists
        "blas": blas(), "numba": numba_info(), "flush_denormals": fpmode.status(),
        "threads": threads_given,
        "plans": {op: vars(threads.plan(op, threads_given)) for op in threads.OPERATIONS},
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def header_lines(info: dict) -> str:
    """Two lines for the table: the CPU, and the BLAS, flush mode and thread plans."""
    blas_text = "; ".join(f"{b['internal_api']} {b['version']} (kernel {b['architecture']}, {b['threading_layer']})"
                          for b in info["blas"]) or "none found"
    flush = info["flush_denormals"]
    flush_text = f"FTZ/DAZ {'on' if flush['enabled'] and flush['supported'] else 'off'} ({flush['how']}" + (
        ", BLAS and Numba workers too)" if flush["blas_workers"] else ", calling thread only)")
    plans = ", ".join(f"{op} {p['blas']}+{p['numba']}" for op, p in info["plans"].items())
    return (f"CPU: {info['cpu']} ({info['vendor']}), flags {' '.join(info['flags']) or '-'}; {info['cores']} logical / "
            f"{info['physical_cores']} physical cores, {info['usable_cores']} usable, "
            f"{info['idle_cores_at_start']} idle at start\n"
            f"GEMM engine: {info['gemm_engine']}; BLAS: {blas_text}; {flush_text}; threads (BLAS+Numba): {plans}\n")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def peak_rss_mib(call: object) -> float | None:
    """MiB by which one call raises the process's resident memory at its peak, any allocator (NumPy's, PyTorch's).

    After a warm-up call, freed heap memory is handed back (``malloc_trim``), the kernel's peak-RSS mark is
    reset (``/proc/self/clear_refs``), and the call's high-water mark is read against the RSS before it.
    ``None`` where Linux's ``/proc`` interface is missing. The same measure for every implementation, so
    nflow_np's figure (also in tracemalloc's ``peak_mib``) can be set beside PyTorch's.
    """
    import ctypes
    import ctypes.util
    import gc

    try:
        call()
        gc.collect()
        ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim(0)
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        call()
        return (_status_kib("VmHWM") - before) / 1024
    except (OSError, AttributeError):
        return None
