"""How a result was made: backend, dtype, threads, CPU and library versions, in one dict and one line.

The default backend changes when Numba is installed, and BLAS builds and thread counts change the
last digits of a loss; every ``nflow`` run prints :func:`describe` of :func:`provenance` when it
starts and keeps the dict in its ``summary.json``.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

from nflow_np import gemm


def _version(package: str) -> str | None:
    """The installed version of ``package``, or ``None``; never imports it (Numba takes a second to import)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what :mod:`platform` knows)."""
    return gemm.cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown"


def blas() -> list[dict]:
    """The BLAS libraries NumPy loaded: ``internal_api`` (openblas, mkl, …), ``version``, ``num_threads``."""
    from threadpoolctl import threadpool_info

    return [
        {key: entry.get(key) for key in ("internal_api", "version", "num_threads", "threading_layer")}
        for entry in threadpool_info()
        if entry.get("user_api") == "blas"
    ]


def provenance(dtype: object = None, threads: int | None = None) -> dict:
    """What a run's numbers depend on besides its arguments.

    Parameters
    ----------
    dtype : str or numpy dtype, optional
        The run's floating-point type.
    threads : int, optional
        The BLAS thread limit the command set (``nflow --threads``); the BLAS entries report the
        threads they actually use.

    Returns
    -------
    dict
        ``backend``, ``dtype``, ``threads``, ``cpu``, ``cpu_count``, ``python``, ``platform``,
        ``versions`` (nflow_np, numpy, numba, threadpoolctl), ``gemm_engine`` (:mod:`nflow_np.gemm`, resolved here,
        so that the library it loads is listed) and ``blas``.
    """
    import numpy as np

    from nflow_np import __version__
    from nflow_np.backend import get_backend

    numba_threads = None
    if "numba" in sys.modules:  # only when the kernels are in use; importing Numba here would cost a second
        numba_threads = sys.modules["numba"].config.NUMBA_NUM_THREADS
    return {
        "backend": get_backend(),
        "dtype": None if dtype is None else str(np.dtype(dtype)),
        "threads": threads,
        "numba_threads": numba_threads,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "nflow_np": __version__,
            "numpy": np.__version__,
            "numba": _version("numba"),
            "threadpoolctl": _version("threadpoolctl"),
        },
        "gemm_engine": gemm.get_engine(),  # before blas(): "auto" may load MKL
        "blas": blas(),
    }


def describe(record: dict) -> str:
    """One line: ``backend numba, float64, 1 BLAS thread, AMD EPYC …; nflow_np 0.1.0, numpy 2.1, numba 0.60, …``."""
    versions = record["versions"]
    libraries = ", ".join(
        f"{name} {version or 'not installed'}" for name, version in versions.items() if name != "threadpoolctl"
    )
    blas_text = ", ".join(f"{entry['internal_api']} {entry['version']}" for entry in record["blas"]) or "no BLAS found"
    threads = record["threads"]
    thread_text = f"{threads} BLAS thread{'s' if threads != 1 else ''}" if threads is not None else "BLAS threads unset"
    parts = [f"backend {record['backend']}"]
    if record["dtype"] is not None:
        parts.append(record["dtype"])
    parts += [thread_text, f"{record['cpu']} ({record['cpu_count']} CPUs)"]
    engine = f"GEMMs by {record['gemm_engine']}; " if record.get("gemm_engine") else ""
    return f"{', '.join(parts)}; {libraries}; {engine}BLAS {blas_text}; Python {record['python']}"
