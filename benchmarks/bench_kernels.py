"""Benchmark the fused coupling-law kernels against the NumPy reference, beside this machine's copy bandwidth.

Run from the repository root::

    python -m benchmarks.bench_kernels                      # N = 512, 8192, 65536; D₂ = 32, 392; both dtypes
    python -m benchmarks.bench_kernels --rows 65536 --d2 392 --dtypes float32 --repeats 20
    python -m benchmarks.bench_kernels --mlp                # also: does a fused bias + ReLU pay?
    python -m benchmarks.bench_kernels --serial             # numba on one core (no thread pool)

What is timed (the affine law, the one with transcendentals; ``docs/kernels.md#measured``):

- ``forward``  ``z₂ = x₂ ⊙ exp(s) + t``, ``logdet = Σ s``: reads ``x₂, h``, writes ``z₂, logdet``;
- ``backward`` (of forward): reads ``x₂, h, ∂L/∂z₂, ∂L/∂logdet``, writes ``∂L/∂x₂, ∂L/∂h, ∂L/∂a``.

GB/s counts those bytes once each (what a perfect single pass moves) divided by the time. Backends:

- ``numpy``: the reference ``nflow_np.flows.coupling_law`` (allocates its outputs, as the library does);
- ``numba``: ``kernels.coupling.numba_cpu``'s ``*_into`` kernels writing into buffers allocated once;
- ``numba (law)``: ``kernels.coupling.numba_cpu``'s law classes, allocating their outputs like the reference;
- ``numba-cuda``, ``cupy``: when a GPU is present, on CuPy arrays already on the device, with the
  device synchronised before every clock read.

Honesty rules: every kernel is called (and JIT-compiled) before the clock starts; each figure is
the median of ``--repeats`` calls with the min and max beside it; the backends are timed in turn
for each shape, in the same run as the copy bandwidth (``numpy.copyto`` of a 512 MiB array,
counting its read and write). The load average is printed: on a shared machine other processes'
work shows up in these numbers.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import time
from collections.abc import Callable

import numpy as np

from nflow_np.backend import bind_law, coupling_law, using
from nflow_np.flows.coupling_law import AffineLaw
from nflow_np.packaging import kernel_module

Timer = Callable[[], None]


def measure(call: Timer, repeats: int, sync: Timer = lambda: None, budget_s: float = 30.0) -> np.ndarray:
    """Seconds per call: one warm-up call, then ``repeats`` timed calls (fewer, but ≥ 3, past ``budget_s``)."""
    call()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        sync()
        t0 = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t0)
    return np.array(times)


def copy_bandwidth(repeats: int, nbytes: int = 2**29) -> np.ndarray:
    """GB/s of ``numpy.copyto`` on ``nbytes`` (default 512 MiB; bytes read + bytes written), one figure per call."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    return 2 * src.nbytes / measure(lambda: np.copyto(dst, src), repeats) / 1e9


def affine_bytes(op: str, n: int, d2: int, itemsize: int) -> int:
    if op == "forward":  # x₂, h (2 D₂), z₂; logdet
        return (4 * n * d2 + n) * itemsize
    return (7 * n * d2 + n + d2) * itemsize  # x₂, h, ∂z₂ in; ∂x₂, ∂h out; ∂logdet, ∂a


def inputs(n: int, d2: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x2": rng.standard_normal((n, d2)).astype(dtype),
        "h": rng.standard_normal((n, 2 * d2)).astype(dtype),
        "scale": rng.uniform(0.5, 1.5, d2).astype(dtype),
        "d_z2": rng.standard_normal((n, d2)).astype(dtype),
        "d_logdet": rng.standard_normal(n).astype(dtype),
    }


def cpu_calls(backend: str, op: str, a: dict[str, np.ndarray]) -> Timer:
    x2, h, scale, d_z2, d_logdet = a["x2"], a["h"], a["scale"], a["d_z2"], a["d_logdet"]
    if backend == "numpy":
        if op == "forward":
            return lambda: AffineLaw.forward(x2, h, scale)
        return lambda: AffineLaw.forward_vjp(x2, h, scale, d_z2, d_logdet)
    numba_cpu = importlib.import_module(kernel_module("coupling.numba_cpu"))

    if backend == "numba (law)":  # the layer's own call: what AffineCoupling gets from the seam
        with using("numba"):
            law = coupling_law("affine")
        if op == "forward":
            return lambda: law.forward(x2, h, scale)
        return lambda: law.forward_vjp(x2, h, scale, d_z2, d_logdet)
    n, d2 = x2.shape
    out, logdet, d_h = np.empty_like(x2), np.empty(n, x2.dtype), np.empty_like(h)
    if op == "forward":
        return lambda: numba_cpu.affine_forward_into(x2, h, scale, out, logdet)
    chunks = numba_cpu.scale_chunks(n, d2, x2.dtype)

    def backward() -> None:
        chunks[:] = 0
        numba_cpu.affine_forward_vjp_into(x2, h, scale, d_z2, d_logdet, out, d_h, chunks)

    return backward


def gpu_backends() -> dict[str, tuple[dict, object]]:
    """``{name: (laws, cupy)}`` for the GPU backends that run here (both need CuPy for device arrays)."""
    found = {}
    for name, module_name in (("numba-cuda", kernel_module("coupling.numba_cuda")),
                              ("cupy", kernel_module("coupling.cupy_kernels"))):
        try:
            cupy = importlib.import_module("cupy")
            module = importlib.import_module(module_name)
            module.require_device()
        except (ImportError, RuntimeError):
            continue
        found[name] = ({"affine": bind_law(AffineLaw, module.FUSED)}, cupy)
    return found


def gpu_calls(laws: dict, cupy: object, op: str, a: dict[str, np.ndarray]) -> tuple[Timer, Timer]:
    d = {name: cupy.asarray(value) for name, value in a.items()}
    law = laws["affine"]
    if op == "forward":
        call = lambda: law.forward(d["x2"], d["h"], d["scale"])  # noqa: E731
    else:
        call = lambda: law.forward_vjp(d["x2"], d["h"], d["scale"], d["d_z2"], d["d_logdet"])  # noqa: E731
    return call, cupy.cuda.Device().synchronize


def row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(cell.rjust(width) for cell, width in zip(cells, widths, strict=True))


def run_coupling(args: argparse.Namespace, copy_gbs: float) -> None:
    backends = ["numpy"]
    if importlib.util.find_spec("numba") is not None:
        backends += ["numba", "numba (law)"]
    gpus = gpu_backends()
    backends += list(gpus)
    widths = [8, 7, 6, 4, 12, 9, 17, 7, 8, 7]
    header = ["op", "dtype", "N", "D2", "backend", "ms med", "[min, max]", "GB/s", "x numpy", "% copy"]
    print(row(header, widths))
    for dtype_name in args.dtypes:
        dtype = np.dtype(dtype_name)
        for n in args.rows:
            for d2 in args.d2:
                a = inputs(n, d2, dtype)
                for op in ("forward", "backward"):
                    nbytes = affine_bytes(op, n, d2, dtype.itemsize)
                    reference_ms = None
                    for backend in backends:
                        if backend in gpus:
                            call, sync = gpu_calls(*gpus[backend], op, a)
                            times = measure(call, args.repeats, sync)
                        else:
                            times = measure(cpu_calls(backend, op, a), args.repeats)
                        ms = 1e3 * np.median(times)
                        reference_ms = ms if backend == "numpy" else reference_ms
                        gbs = nbytes / np.median(times) / 1e9
                        print(
                            row(
                                [
                                    op,
                                    dtype_name,
                                    str(n),
                                    str(d2),
                                    backend,
                                    f"{ms:.3f}",
                                    f"[{1e3 * times.min():.3f}, {1e3 * times.max():.3f}]",
                                    f"{gbs:.1f}",
                                    f"{reference_ms / ms:.1f}",
                                    f"{100 * gbs / copy_gbs:.0f}",
                                ],
                                widths,
                            ),
                            flush=True,
                        )
                del a


def _gemm(x: np.ndarray, w: np.ndarray, b: np.ndarray, y: np.ndarray) -> None:
    np.matmul(x, w, out=y)


def _numpy_layer(x: np.ndarray, w: np.ndarray, b: np.ndarray, y: np.ndarray) -> None:
    np.matmul(x, w, out=y)
    y += b
    np.maximum(y, 0, out=y)


def _fused_layer(x: np.ndarray, w: np.ndarray, b: np.ndarray, y: np.ndarray, bias_relu_: Callable) -> None:
    np.matmul(x, w, out=y)
    bias_relu_(y, b)


def run_mlp(args: argparse.Namespace) -> None:
    """A hidden layer ``y = relu(x W + b)``: NumPy's two extra passes vs one fused Numba pass."""
    from numba import njit, prange

    @njit(parallel=True, fastmath={"contract", "nsz"}, error_model="numpy", cache=True)
    def bias_relu_(y: np.ndarray, b: np.ndarray) -> None:
        for i in prange(y.shape[0]):
            row_ = y[i]
            for j in range(y.shape[1]):
                v = row_[j] + b[j]
                row_[j] = v if v > 0 else 0

    print("\nfused bias + ReLU after the GEMM (forward of one hidden layer, float32)")
    widths = [6, 5, 5, 10, 22, 22, 8]
    print(row(["N", "in", "out", "GEMM ms", "numpy GEMM+b+relu ms", "GEMM+fused ms", "saving"], widths))
    rng = np.random.default_rng(0)
    for n, fan_in, fan_out in [(512, 392, 256), (8192, 392, 256), (65536, 392, 256), (8192, 64, 64)]:
        x = rng.standard_normal((n, fan_in)).astype(np.float32)
        w = rng.standard_normal((fan_in, fan_out)).astype(np.float32)
        b = rng.standard_normal(fan_out).astype(np.float32)
        y = np.empty((n, fan_out), np.float32)
        arrays = (x, w, b, y)
        steps = (_gemm, _numpy_layer, functools.partial(_fused_layer, bias_relu_=bias_relu_))
        gemm, plain, fused = (1e3 * np.median(measure(functools.partial(f, *arrays), args.repeats)) for f in steps)
        print(
            row(
                [
                    str(n),
                    str(fan_in),
                    str(fan_out),
                    f"{gemm:.3f}",
                    f"{plain:.3f}",
                    f"{fused:.3f}",
                    f"{100 * (plain - fused) / plain:.0f}%",
                ],
                widths,
            ),
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[512, 8192, 65536])
    parser.add_argument("--d2", type=int, nargs="+", default=[32, 392])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--mlp", action="store_true", help="also time a fused bias + ReLU against NumPy")
    parser.add_argument(
        "--serial",
        action="store_true",
        help="run the numba kernels on the calling thread only (one core, like NumPy's ufuncs)",
    )
    args = parser.parse_args(argv)
    if importlib.util.find_spec("numba") is not None:
        numba_cpu = importlib.import_module(kernel_module("coupling.numba_cpu"))

        if args.serial:
            numba_cpu.PARALLEL_MIN_ELEMENTS = 2**62

    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
    if importlib.util.find_spec("numba") is not None:
        import numba

        threads = "1 thread (--serial)" if args.serial else f"{numba.get_num_threads()} threads"
        print(f"numba {numba.__version__}: {threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    copies = copy_bandwidth(args.repeats)
    copy_gbs = float(np.median(copies))
    print(
        f"copy bandwidth (numpy.copyto 512 MiB, read + write): {copy_gbs:.1f} GB/s "
        f"[{copies.min():.1f}, {copies.max():.1f}]\n"
    )
    run_coupling(args, copy_gbs)
    if args.mlp:
        run_mlp(args)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
