"""The measurements of the benchmark suite, one function per section; :mod:`benchmarks.suite` runs them.

Every timed figure is ``figure(values)``: the median, min and max of ``repeats`` repetitions taken
after a warm-up call (which also compiles the Numba kernels), with nothing but the measured call
inside the clock. Each section returns plain JSON-ready data; a ``None`` PyTorch reference means
PyTorch is not installed and its columns are left out.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from threadpoolctl import threadpool_limits

from nflow_np import gemm, threads
from nflow_np.architectures import build_model
from nflow_np.backend import get_backend, using
from nflow_np.model import FlowModel
from nflow_np.nn import MLP
from nflow_np.optim import Adam
from nflow_np.packaging import kernel_module
from nflow_np.train import train_step

from .bench_kernels import affine_bytes, copy_bandwidth, cpu_calls, gpu_backends, gpu_calls, inputs, measure
from .machine import peak_rss_mib

DTYPES = ("float32", "float64")


@dataclass
class Settings:
    """What the suite measures; :meth:`quick` is the under-a-minute version (smaller N, fewer repeats)."""

    repeats: int = 10
    threads: int = 1
    kernel_rows: int = 65536
    kernel_d2: tuple[int, ...] = (32, 392)
    copy_bytes: int = 2**29
    gemm_size: int = 2048
    mlp_batch: int = 512
    mlp_sizes: tuple[tuple[int, ...], ...] = ((64, 256, 256, 64), (392, 1000, 1000, 784))
    dim: int = 64
    layers: int = 8
    hidden: tuple[int, ...] = (256, 256)
    batch: int = 512
    lr: float = 1e-3
    sweep_batches: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
    sample_batch: int = 8192
    dtypes: tuple[str, ...] = DTYPES
    seed: int = 0
    nice_hidden: tuple[int, ...] = (500,) * 4
    nice_steps: int = 0

    @classmethod
    def quick(cls, **overrides: object) -> Settings:
        """Smaller arrays and 3 repeats: the whole suite in well under a minute on 2 cores."""
        small = {"repeats": 3, "kernel_rows": 8192, "copy_bytes": 2**25, "gemm_size": 1024,
                 "sweep_batches": (64, 256, 1024), "sample_batch": 2048}
        return cls(**(small | overrides))

    @classmethod
    def smoke(cls, **overrides: object) -> Settings:
        """Tiny arrays and nets, 2 repeats: the suite's own test (its figures mean little)."""
        tiny = {"repeats": 2, "kernel_rows": 2048, "kernel_d2": (32,), "copy_bytes": 2**23, "gemm_size": 256,
                "mlp_sizes": ((64, 256, 256, 64),), "hidden": (64, 64), "batch": 256, "sweep_batches": (64, 256),
                "sample_batch": 512, "nice_hidden": (32,)}
        return cls(**(tiny | overrides))


def figure(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """``{"median", "min", "max", "n"}`` of a set of measurements."""
    values = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(values)), "min": float(values.min()), "max": float(values.max()),
            "n": int(values.size)}


def timed(call: Callable[[], object], repeats: int) -> np.ndarray:
    """Seconds per call: a warm-up call, then ``repeats`` timed calls (:func:`benchmarks.bench_kernels.measure`)."""
    return measure(call, repeats, budget_s=60.0)


def numba_ready() -> str | None:
    """``None`` when the Numba kernels import here, else why not (the suite then skips their rows)."""
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed"
    try:
        importlib.import_module(kernel_module("coupling.numba_cpu"))
    except Exception as error:
        return f"kernels.coupling.numba_cpu does not import: {error}"
    return None


def cpu_backends() -> list[str]:
    """The library backends timed here: ``numpy``, and ``numba`` when its kernels load."""
    return ["numpy"] + (["numba"] if numba_ready() is None else [])


@contextlib.contextmanager
def limit_threads(n: int, torch_ref: ModuleType | None) -> Iterator[None]:
    """Give BLAS (threadpoolctl), Numba and PyTorch ``n`` threads each for the duration."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(threadpool_limits(limits=n, user_api="blas"))
        stack.enter_context(numba_threads(n))
        stack.enter_context(threads.num_threads(n))  # nflow_np's own calls choose their split of n
        if torch_ref is not None:
            previous_torch = torch_ref.set_threads(n)
            stack.callback(torch_ref.set_threads, previous_torch)
        yield


def attempt(row: dict, measure: Callable[..., dict], *args: object) -> dict:
    """``row`` with ``measure(*args)``'s figures, or with an ``"error"`` saying why that implementation failed.

    A backend that fails (a kernel module being rewritten, say) is reported in the table, and the others
    are still measured.
    """
    try:
        return row | measure(*args)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return row | {"error": f"{type(error).__name__}: {first_line}"[:200]}


# -- kernels -------------------------------------------------------------------------------------------------------
def kernels(s: Settings, torch_ref: ModuleType | None) -> dict:
    """The affine coupling law's forward and backward per backend, in ms and GB/s, beside the copy bandwidth.

    The numba kernels run as the backend runs them by default, on all of Numba's threads (their row
    loops are ``prange``), and PyTorch's versions (eager ops into preallocated buffers, and
    ``torch.compile``) get as many threads; ``--threads`` applies to the sections that compare whole
    models.
    """
    with numba_threads(None) as threads, contextlib.ExitStack() as stack:
        if torch_ref is not None:
            stack.callback(torch_ref.set_threads, torch_ref.set_threads(threads or os.cpu_count() or 1))
        return _kernels(s, torch_ref) | {"numba_threads": threads}


@contextlib.contextmanager
def numba_threads(n: int | None) -> Iterator[int | None]:
    """Numba's thread count set to ``n`` (``None``: all it started with) for the duration; yields the count."""
    if numba_ready() is not None:
        yield None
        return
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS if n is None else min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield numba.get_num_threads()
    finally:
        numba.set_num_threads(previous)


def _kernels(s: Settings, torch_ref: ModuleType | None) -> dict:
    copies = copy_bandwidth(s.repeats, s.copy_bytes)
    copy_median = float(np.median(copies))
    backends = ["numpy"] + (["numba", "numba (law)"] if numba_ready() is None else [])
    backends += [*TORCH_LAWS] if torch_ref is not None else []
    gpus = gpu_backends()
    rows = []
    for dtype_name in s.dtypes:
        dtype = np.dtype(dtype_name)
        for d2 in s.kernel_d2:
            a = inputs(s.kernel_rows, d2, dtype)
            for op in ("forward", "backward"):
                nbytes = affine_bytes(op, s.kernel_rows, d2, dtype.itemsize)
                for backend in [*backends, *gpus]:
                    row = {"op": op, "dtype": dtype_name, "N": s.kernel_rows, "D2": d2, "backend": backend,
                           "bytes": nbytes}
                    row = attempt(row, _kernel_figures, backend, op, a, gpus.get(backend), nbytes, s.repeats, torch_ref)
                    if "gbs" in row:
                        row["percent_of_copy"] = 100 * row["gbs"]["median"] / copy_median
                    rows.append(row)
            del a
    return {"copy_bytes": s.copy_bytes, "copy_gbs": figure(copies), "rows": rows}


TORCH_LAWS = {"torch (eager, out=)": False, "torch.compile": True}
"""PyTorch's rows in the kernels section: name → ``compiled`` argument of ``coupling_law_calls``."""


def _kernel_figures(
    backend: str, op: str, a: dict, gpu: tuple | None, nbytes: int, repeats: int, torch_ref: ModuleType | None
) -> dict:
    if gpu is not None:  # the device is synchronised before every clock read
        call, sync = gpu_calls(*gpu, op, a)
        times = measure(call, repeats, sync)
    elif backend in TORCH_LAWS:
        forward, backward = torch_ref.coupling_law_calls(a, compiled=TORCH_LAWS[backend])
        times = measure(forward if op == "forward" else backward, repeats)
    else:
        times = measure(cpu_calls(backend, op, a), repeats)
    return {"ms": figure(1e3 * times), "gbs": figure(nbytes / times / 1e9)}


# -- MLP -----------------------------------------------------------------------------------------------------------
def gemm_peak(s: Settings) -> dict[str, dict]:
    """GFLOP/s of one large square matmul per dtype (``2 n³`` FLOPs), this run's attainable peak.

    The best of the BLAS engines that load here (:mod:`nflow_np.gemm`: MKL, NumPy's OpenBLAS), so that a
    percentage of it is a percentage of the fastest GEMM this machine has, not only of the engine in use;
    ``"engines"`` keeps each one's rate.
    """
    rng = np.random.default_rng(s.seed)
    engines = [name for name in ("mkl", "openblas") if name in gemm.available_engines()] or [gemm.get_engine()]
    peaks = {}
    for dtype in s.dtypes:
        n = s.gemm_size
        a, b = (rng.standard_normal((n, n)).astype(dtype) for _ in range(2))
        out = np.empty((n, n), dtype)
        rates = {}
        for engine in engines:
            with gemm.using_engine(engine):
                times = timed(lambda a=a, b=b, out=out: gemm.gemm(a, b, out, 0.0), max(5, s.repeats))
            rates[engine] = figure(2 * n**3 / times / 1e9)
        best = max(rates, key=lambda name: rates[name]["median"])
        peaks[dtype] = {"n": n, "gflops": rates[best], "engine": best, "engines": rates}
    return peaks


def mlp_flops(batch: int, sizes: Sequence[int]) -> int:
    """FLOPs of forward + backward: three products (``x W``, ``xᵀ d_y``, ``d_y Wᵀ``) of ``2·m·k·n`` per layer."""
    return sum(3 * 2 * batch * n_in * n_out for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True))


def _mlp_figures(impl: str, sizes: Sequence[int], x: np.ndarray, d_y: np.ndarray, torch_ref: ModuleType | None,
                 s: Settings) -> dict:
    if impl == "torch":
        times = timed(torch_ref.mlp_step(x, d_y, sizes), s.repeats)
    else:
        with using(impl):  # the backend chooses the hidden layers' bias + activation (fused on numba)
            net = MLP(sizes, np.random.default_rng(s.seed), activation="relu", dtype=x.dtype, zero_last=False)
            times = timed(lambda: (net.forward(x), net.backward(d_y)), s.repeats)
    return {"ms": figure(1e3 * times), "gflops": figure(mlp_flops(x.shape[0], sizes) / times / 1e9)}


def mlp(s: Settings, torch_ref: ModuleType | None) -> dict:
    """Forward + backward of a coupling net per backend (and PyTorch), as GFLOP/s and % of the GEMM peak."""
    peaks = gemm_peak(s)
    rows = []
    rng = np.random.default_rng(s.seed)
    impls = [*cpu_backends(), *(["torch"] if torch_ref is not None else [])]
    for dtype in s.dtypes:
        for sizes in s.mlp_sizes:
            x = rng.standard_normal((s.mlp_batch, sizes[0])).astype(dtype)
            d_y = rng.standard_normal((s.mlp_batch, sizes[-1])).astype(dtype)
            for impl in impls:
                row = {"impl": impl, "dtype": dtype, "batch": s.mlp_batch, "sizes": list(sizes),
                       "flops": mlp_flops(s.mlp_batch, sizes)}
                row = attempt(row, _mlp_figures, impl, sizes, x, d_y, torch_ref, s)
                if "gflops" in row:
                    row["percent_of_peak"] = 100 * row["gflops"]["median"] / peaks[dtype]["gflops"]["median"]
                rows.append(row)
    return {"gemm_peak": peaks, "rows": rows}


# -- training step -------------------------------------------------------------------------------------------------
def realnvp(s: Settings, dtype: str) -> FlowModel:
    """The benchmark's model: ``build_model("realnvp", dim, layers, hidden, dtype)``."""
    return build_model("realnvp", s.dim, layers=s.layers, hidden=s.hidden, dtype=dtype, seed=s.seed)


def training_step(model: FlowModel, x: np.ndarray, lr: float) -> Callable[[], None]:
    """:func:`nflow_np.train.train_step` (``zero_grad; nll_and_backward(x)``; gradient norm; Adam step) on ``model``."""
    optimizer = Adam(model, lr=lr)

    def step() -> None:
        train_step(model, optimizer, x)

    return step


def peak_mib(call: Callable[[], object]) -> float:
    """MiB that one call allocates at its peak (tracemalloc, which NumPy reports to), after a warm-up call."""
    call()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return (peak - base) / 2**20


def step_gemms(model: FlowModel, batch: int, dtype: str, seed: int = 0) -> tuple[Callable[[], None], int]:
    """The GEMMs of one training step alone, into preallocated outputs: ``(call, flops)``.

    For every linear layer of every coupling net: ``y = x W``, ``d_W = xᵀ d_y``, ``d_x = d_y Wᵀ``
    (the library computes ``d_x`` of the first layer too: it is the net's contribution to ``∂L/∂x₁``), by the
    GEMM engine the step uses (:mod:`nflow_np.gemm`).
    """
    rng = np.random.default_rng(seed)
    products = []
    flops = 0
    for layer in model.flow.flows:
        sizes = layer.net.sizes
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            x, w, d_y = (rng.standard_normal(shape).astype(dtype)
                         for shape in ((batch, n_in), (n_in, n_out), (batch, n_out)))
            y, d_w, d_x = np.empty((batch, n_out), dtype), np.empty((n_in, n_out), dtype), np.empty_like(x)
            products += [(x, w, y), (x.T, d_y, d_w), (d_y, w.T, d_x)]
            flops += 3 * 2 * batch * n_in * n_out

    def call() -> None:
        for a, b, out in products:
            gemm.gemm(a, b, out, 0.0)

    return call, flops


def _step_figures(backend: str, dtype: str, x: np.ndarray, s: Settings) -> dict:
    with using(backend):
        step = training_step(realnvp(s, dtype), x, s.lr)
        times = timed(step, s.repeats)
        memory = peak_mib(step)  # separate, untimed: tracemalloc slows every allocation
    return {"ms": figure(1e3 * times), "steps_per_s": figure(1 / times), "peak_mib": memory}


def _torch_step_figures(torch_ref: ModuleType, x: np.ndarray, s: Settings) -> dict:
    _, step = torch_ref.training_step(x, s.dim, s.layers, s.hidden, s.lr, s.seed)
    times = timed(step, s.repeats)
    return {"ms": figure(1e3 * times), "steps_per_s": figure(1 / times)}


def train(s: Settings, torch_ref: ModuleType | None) -> dict:
    """A RealNVP training step per backend and dtype (ms, steps/s, peak MiB) beside its GEMMs alone and PyTorch."""
    rng = np.random.default_rng(s.seed)
    rows = []
    for dtype in s.dtypes:
        x = rng.standard_normal((s.batch, s.dim)).astype(dtype)
        gemm_call, gemm_flops = step_gemms(realnvp(s, dtype), s.batch, dtype, s.seed)
        gemm_times = timed(gemm_call, s.repeats)
        gemm_ms = 1e3 * float(np.median(gemm_times))
        base = {"dtype": dtype, "batch": s.batch}
        block = [attempt(base | {"impl": b}, _step_figures, b, dtype, x, s) for b in cpu_backends()]
        if torch_ref is not None:
            block.append(attempt(base | {"impl": "torch"}, _torch_step_figures, torch_ref, x, s))
        torch_ms = block[-1]["ms"]["median"] if torch_ref is not None and "ms" in block[-1] else None
        for row in block:
            if "ms" in row:
                row["step_over_gemms"] = row["ms"]["median"] / gemm_ms
                if torch_ms is not None and row["impl"] != "torch":
                    row["speedup_vs_torch"] = torch_ms / row["ms"]["median"]
        rows += block
        rows.append(base | {"impl": "GEMMs alone", "ms": figure(1e3 * gemm_times),
                            "gflops": figure(gemm_flops / gemm_times / 1e9), "flops": gemm_flops})
    return {"model": {"kind": "realnvp", "dim": s.dim, "layers": s.layers, "hidden": list(s.hidden),
                      "optimizer": f"Adam(lr={s.lr})"}, "rows": rows, "batch_sweep": batch_sweep(s, torch_ref)}


def _curve(backend: str, dtype: str, batches: list[np.ndarray], s: Settings, repeats: int) -> dict:
    model = realnvp(s, dtype)
    with using(backend):
        return {"ms": [figure(1e3 * timed(training_step(model, x, s.lr), repeats)) for x in batches]}


def _torch_curve(torch_ref: ModuleType, batches: list[np.ndarray], s: Settings, repeats: int) -> dict:
    steps = [torch_ref.training_step(x, s.dim, s.layers, s.hidden, s.lr, s.seed)[1] for x in batches]
    return {"ms": [figure(1e3 * timed(step, repeats)) for step in steps]}


def batch_sweep(s: Settings, torch_ref: ModuleType | None) -> dict:
    """Training-step ms against batch size, per implementation and dtype (fewer repeats: a curve, not a table)."""
    repeats = max(2, s.repeats // 2)
    rng = np.random.default_rng(s.seed)
    series = []
    for dtype in s.dtypes:
        batches = [rng.standard_normal((b, s.dim)).astype(dtype) for b in s.sweep_batches]
        for backend in cpu_backends():
            series.append(attempt({"impl": backend, "dtype": dtype}, _curve, backend, dtype, batches, s, repeats))
        if torch_ref is not None:
            series.append(attempt({"impl": "torch", "dtype": dtype}, _torch_curve, torch_ref, batches, s, repeats))
    return {"batches": list(s.sweep_batches), "series": series}


# -- log_prob and sample -------------------------------------------------------------------------------------------
def _warmed_calls(backend: str, s: Settings, dtype: str, x: np.ndarray) -> dict[str, Callable[[], object]]:
    """``log_prob`` and ``sample`` calls of a model that took three Adam steps (so no coupling is the identity)."""
    model = realnvp(s, dtype)
    with using(backend):
        step = training_step(model, x[: s.batch], s.lr)
        for _ in range(3):
            step()
    generator = np.random.default_rng(s.seed)
    return {"log_prob": lambda: model.log_prob(x), "sample": lambda: model.sample(x.shape[0], generator)}


def _torch_warmed_calls(torch_ref: ModuleType, s: Settings, x: np.ndarray) -> dict[str, Callable[[], object]]:
    model, step = torch_ref.training_step(np.ascontiguousarray(x[: s.batch]), s.dim, s.layers, s.hidden, s.lr)
    for _ in range(3):
        step()
    log_prob, draw = torch_ref.inference_calls(model, x, s.seed)
    return {"log_prob": log_prob, "sample": draw}


def _throughput(impl: str, calls: dict | Exception, op: str, s: Settings) -> dict:
    if isinstance(calls, Exception):
        raise calls
    with using(impl if impl != "torch" else get_backend()):
        times = timed(calls[op], s.repeats)
        rss = peak_rss_mib(calls[op])  # untimed; the same measure for nflow_np and PyTorch
    return {"ms": figure(1e3 * times), "samples_per_s": figure(s.sample_batch / times)} | (
        {"peak_rss_mib": rss} if rss is not None else {})


def sample(s: Settings, torch_ref: ModuleType | None) -> dict:
    """``log_prob`` and ``sample`` throughput (samples/s) at ``sample_batch`` rows, per backend and dtype.

    Each model first takes three Adam steps, so that no coupling is still the identity.
    """
    rng = np.random.default_rng(s.seed)
    rows = []
    for dtype in s.dtypes:
        x = rng.standard_normal((s.sample_batch, s.dim)).astype(dtype)
        calls: dict[str, dict | Exception] = {}
        for impl in [*cpu_backends(), *(["torch"] if torch_ref is not None else [])]:
            try:
                if impl == "torch":
                    calls[impl] = _torch_warmed_calls(torch_ref, s, x)
                else:
                    calls[impl] = _warmed_calls(impl, s, dtype, x)
            except Exception as error:
                calls[impl] = error
        for op in ("log_prob", "sample"):
            block = []
            for impl, pair in calls.items():
                row = {"op": op, "impl": impl, "dtype": dtype, "batch": s.sample_batch}
                block.append(attempt(row, _throughput, impl, pair, op, s))
            torch_row = next((r for r in block if r["impl"] == "torch" and "ms" in r), None)
            for row in block:
                if torch_row is not None and row["impl"] != "torch" and "ms" in row:
                    row["speedup_vs_torch"] = torch_row["ms"]["median"] / row["ms"]["median"]
            rows += block
    return {"rows": rows}
