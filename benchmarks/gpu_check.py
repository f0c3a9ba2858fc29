"""The GPU backends on a real GPU: one prepared check, run when a device machine is lent (issue 19).

Run from the repository root on the GPU machine (``benchmarks/gpu_check.sh`` installs carried wheels first)::

    python -m benchmarks.gpu_check --out runs/gpu-check          # the real check, about 3-5 minutes on an H200
    python -m benchmarks.gpu_check --simulate --out /tmp/check   # the same script on a CPU, under Numba's CUDA
                                                                 # simulator, tiny sizes (its own test runs this)

Stages, each recorded in ``gpu_check.json`` with its status, so that one failing stage never hides the others:

1. ``environment``: the GPU (``nvidia-smi``), Python and the versions of numpy / numba / numba-cuda / cupy / torch.
2. ``tests``: ``tests/kernels/coupling/test_gpu.py`` and ``tests/test_device.py`` under pytest on the device (every GPU
   law against the NumPy reference within the CPU tests' bounds; whole models trained on the device with the
   laws' host-copy paths made to fail). With ``--simulate`` the tests are only collected (no GPU to run them).
3. ``laws``: the affine law forward and backward on device arrays, N ∈ {65,536, 1,048,576}, D₂ ∈ {32, 392},
   float32 / float64, per GPU backend, in GB/s beside the device's measured copy bandwidth (a device-to-device
   copy of 1 GiB, counting read + write), each result compared with the NumPy reference (max relative error).
4. ``model``: the benchmark RealNVP (``benchmarks.sections.Settings``: D = 64, 8 couplings, nets 256-256) on
   the device: a training step at batch 512 and ``log_prob`` / ``sample`` at batch 8,192, beside PyTorch CUDA's
   same model when torch sees the GPU.

Honesty rules as in ``benchmarks/bench_kernels.py``: every call is made (and JIT-compiled) before the clock
starts, the device is synchronised before each clock read, figures are medians with min and max.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GPU_BACKENDS = {"numba-cuda": "coupling.numba_cuda", "cupy": "coupling.cupy_kernels"}  # modules of kernels/


def stage(results: dict, name: str, run: Callable[[], dict]) -> None:
    """Run one stage into ``results[name]``: its figures with ``status: ok``, or ``status: failed`` and the error."""
    start = time.perf_counter()
    try:
        results[name] = {"status": "ok", **run()}
    except Exception as error:  # a failed stage is a result: the other stages still run
        results[name] = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                         "traceback": traceback.format_exc(limit=8)}
    results[name]["seconds"] = round(time.perf_counter() - start, 1)
    print(f"[gpu-check] {name}: {results[name]['status']} ({results[name]['seconds']} s)", flush=True)


def version(name: str) -> str | None:
    try:
        module = importlib.import_module(name)
    except Exception as error:
        return f"not importable ({type(error).__name__})"
    return getattr(module, "__version__", "?")


def environment() -> dict:
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        smi = f"nvidia-smi unavailable ({error})"
    return {"gpu": smi, "python": platform.python_version(), "machine": platform.machine(),
            "cuda_simulator": os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
            "versions": {name: version(name) for name in ("numpy", "numba", "numba_cuda", "cupy", "torch")}}


def run_tests(simulate: bool) -> dict:
    """pytest on the GPU test files; the summary line and the exit code (non-zero: the stage fails)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/coupling/test_gpu.py",
               "tests/test_device.py", *(["--collect-only"] if simulate else [])]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=420,
                          env=os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                       os.environ.get("PYTHONPATH")]))})
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else done.stderr.strip()[-500:]
    if done.returncode != 0:
        raise RuntimeError(f"pytest exited {done.returncode}: {summary}\n" + "\n".join(lines[-30:]))
    return {"command": " ".join(command[1:]), "summary": summary}


# -- the device ------------------------------------------------------------------------------------------------
class Device:
    """The array module the GPU backends use (CuPy) and how to wait for it; with ``simulate``, NumPy and no wait."""

    def __init__(self, simulate: bool) -> None:
        if simulate:
            self.xp, self.synchronize = np, (lambda: None)
        else:
            import cupy

            self.xp, self.synchronize = cupy, cupy.cuda.Device().synchronize

    def to_host(self, array: object) -> np.ndarray:
        return array if isinstance(array, np.ndarray) else self.xp.asnumpy(array)


def timed(call: Callable[[], object], device: Device, repeats: int) -> dict:
    """Median / min / max seconds of ``repeats`` calls after one warm-up (``bench_kernels.measure``, synchronised)."""
    from benchmarks.bench_kernels import measure

    times = measure(call, repeats, device.synchronize)
    return {"median": float(np.median(times)), "min": float(times.min()), "max": float(times.max())}


def copy_bandwidth(device: Device, nbytes: int, repeats: int) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (bytes read + bytes written)."""
    src = device.xp.ones(nbytes // 8)
    dst = device.xp.empty_like(src)
    seconds = timed(lambda: device.xp.copyto(dst, src), device, repeats)["median"]
    return 2 * src.nbytes / seconds / 1e9


def laws(simulate: bool, repeats: int) -> dict:
    from benchmarks.bench_kernels import affine_bytes, inputs
    from nflow_np.backend import bind_law
    from nflow_np.flows.coupling_law import AffineLaw as Reference

    device = Device(simulate)
    rows_list = (4,) if simulate else (65_536, 1_048_576)
    copy_gbs = copy_bandwidth(device, 2**24 if simulate else 2**30, repeats)
    rows, unavailable = [], {}
    for name, module_name in GPU_BACKENDS.items():
        try:
            from nflow_np.packaging import kernel_module

            module = importlib.import_module(kernel_module(module_name))
            module.require_device()
            law = bind_law(Reference, module.FUSED)
        except (ImportError, RuntimeError) as error:
            unavailable[name] = f"{type(error).__name__}: {error}"
            continue
        for dtype in (np.float32, np.float64):
            for n in rows_list:
                for d2 in (5,) if simulate else (32, 392):
                    host = inputs(n, d2, np.dtype(dtype))
                    on = {key: device.xp.asarray(value) for key, value in host.items()}
                    calls = {"forward": (law_call(law, "forward", on), law_call(Reference, "forward", host)),
                             "backward": (law_call(law, "backward", on), law_call(Reference, "backward", host))}
                    for op, (call, reference) in calls.items():
                        error = max_relative_error([device.to_host(a) for a in call()], reference())
                        seconds = timed(call, device, repeats)
                        gbs = affine_bytes(op, n, d2, np.dtype(dtype).itemsize) / seconds["median"] / 1e9
                        rows.append({"backend": name, "op": op, "dtype": np.dtype(dtype).name, "N": n, "D2": d2,
                                     "ms": {k: 1e3 * v for k, v in seconds.items()}, "gb_s": gbs,
                                     "percent_of_copy": 100 * gbs / copy_gbs, "max_rel_error": error})
    if not rows:
        raise RuntimeError(f"no GPU backend ran: {unavailable}")
    return {"copy_gb_s": copy_gbs, "rows": rows, "unavailable": unavailable}


def law_call(law: type, op: str, a: dict) -> Callable[[], tuple]:
    """The affine law's ``forward`` or its backward (of the forward direction) on the arrays ``a``."""
    if op == "forward":
        return lambda: law.forward(a["x2"], a["h"], a["scale"])
    return lambda: law.forward_vjp(a["x2"], a["h"], a["scale"], a["d_z2"], a["d_logdet"])


def max_relative_error(got: list[np.ndarray], want: tuple) -> float:
    """Largest ``|got − want| / max|want|`` over the outputs (the CPU tests' ulp bounds are per output)."""
    return max(float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-30))
               for g, w in zip(got, want, strict=True))


def model(simulate: bool, repeats: int) -> dict:
    from benchmarks.sections import Settings
    from nflow_np.backend import BackendUnavailableError

    settings = Settings.smoke(batch=8, sample_batch=8, layers=2, hidden=(8,)) if simulate else Settings()
    rows = []
    for name in GPU_BACKENDS:
        try:
            rows += model_rows(name, settings, Device(simulate), simulate, repeats)
        except (BackendUnavailableError, ImportError) as error:
            rows.append({"impl": name, "unavailable": str(error)})
    return {"rows": rows + torch_rows(settings, repeats)}


def model_rows(name: str, settings: object, device: Device, simulate: bool, repeats: int) -> list[dict]:
    """Training step, ``log_prob`` and ``sample`` of the benchmark RealNVP with backend ``name``, on the device."""
    from benchmarks.sections import realnvp, training_step
    from nflow_np import using

    rows = []
    rng = np.random.default_rng(0)
    with using(name):
        for dtype in ("float32", "float64"):
            flow_model = realnvp(settings, dtype)
            if not simulate:
                flow_model.to_device()
            x = rng.standard_normal((settings.sample_batch, settings.dim)).astype(dtype)
            step = training_step(flow_model, x[: settings.batch], settings.lr)
            calls = (("train_step", step, settings.batch), *inference_calls(flow_model, x))
            for op, call, size in calls:
                rows.append({"impl": name, "dtype": dtype, "op": op, "batch": size,
                             "ms": _ms(timed(call, device, repeats))})
    return rows


def inference_calls(flow_model: object, x: np.ndarray) -> tuple[tuple[str, Callable[[], object], int], ...]:
    """``log_prob`` of ``x`` and ``sample`` of as many rows, as ``(op, call, batch)``."""
    generator = np.random.default_rng(0)
    return (("log_prob", lambda: flow_model.log_prob(x), len(x)),
            ("sample", lambda: flow_model.sample(len(x), generator), len(x)))


def _ms(seconds: dict) -> dict:
    return {key: 1e3 * value for key, value in seconds.items()}


def torch_rows(settings: object, repeats: int) -> list[dict]:
    """PyTorch CUDA's same RealNVP (``benchmarks.torch_reference``), when torch imports and sees a GPU."""
    try:
        import torch

        from benchmarks import torch_reference
    except ImportError as error:
        return [{"impl": "torch-cuda", "unavailable": str(error)}]
    if not torch.cuda.is_available():
        return [{"impl": "torch-cuda", "unavailable": "torch.cuda.is_available() is False"}]
    rows = []
    sync = torch.cuda.synchronize
    device = type("TorchDevice", (), {"synchronize": staticmethod(sync)})()
    previous = torch.get_default_device()
    torch.set_default_device("cuda")  # the reference model makes its log-det zeros on the default device
    try:
        for dtype in ("float32", "float64"):
            x = np.random.default_rng(0).standard_normal((settings.sample_batch, settings.dim)).astype(dtype)
            for op, call, size in torch_calls(torch, torch_reference, settings, x):
                rows.append({"impl": "torch-cuda", "dtype": dtype, "op": op, "batch": size,
                             "ms": _ms(timed(call, device, repeats))})
    finally:
        torch.set_default_device(previous)
    return rows


def torch_calls(torch: object, torch_reference: object, settings: object, x: np.ndarray) -> tuple:
    """PyTorch's step at ``settings.batch`` rows and its ``log_prob`` / ``sample`` at ``len(x)``, on the GPU."""
    torch.manual_seed(0)
    net = torch_reference.RealNVP(settings.dim, settings.layers, settings.hidden, getattr(torch, str(x.dtype)))
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.lr)
    batch, everything = torch.from_numpy(x[: settings.batch]).cuda(), torch.from_numpy(x).cuda()

    def step() -> None:
        optimizer.zero_grad()
        (-net.log_prob(batch).mean()).backward()
        optimizer.step()

    def log_prob() -> None:
        with torch.inference_mode():
            net.log_prob(everything)

    def sample() -> None:
        with torch.inference_mode():
            net.sample(len(x))

    return (("train_step", step, settings.batch), ("log_prob", log_prob, len(x)), ("sample", sample, len(x)))


def table(results: dict) -> str:
    """The figures as text: one line a law row and a model row."""
    lines = [f"GPU: {results['environment'].get('gpu', '?')}   simulate: {results['simulate']}"]
    for name in ("tests", "laws", "model"):
        part = results.get(name, {})
        lines.append(f"\n## {name}: {part.get('status')}" + (f" ({part['error']})" if "error" in part else ""))
        if name == "tests" and "summary" in part:
            lines.append(part["summary"])
        if name == "laws" and "rows" in part:
            lines.append(f"device copy bandwidth: {part['copy_gb_s']:.0f} GB/s")
            lines.append(f"{'backend':>10} {'op':>8} {'dtype':>7} {'N':>8} {'D2':>4} {'ms':>9} {'GB/s':>7} "
                         f"{'% copy':>6} {'rel err':>8}")
            for r in part["rows"]:
                lines.append(f"{r['backend']:>10} {r['op']:>8} {r['dtype']:>7} {r['N']:>8} {r['D2']:>4} "
                             f"{r['ms']['median']:>9.3f} {r['gb_s']:>7.0f} {r['percent_of_copy']:>6.0f} "
                             f"{r['max_rel_error']:>8.1e}")
        if name == "model" and "rows" in part:
            for r in part["rows"]:
                if "unavailable" in r:
                    lines.append(f"{r['impl']:>10}: unavailable ({r['unavailable']})")
                else:
                    lines.append(f"{r['impl']:>10} {r['op']:>10} {r['dtype']:>7} batch {r['batch']:>5} "
                                 f"{r['ms']['median']:>9.3f} ms [{r['ms']['min']:.3f}, {r['ms']['max']:.3f}]")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every stage, write ``gpu_check.json`` and ``gpu_check.txt`` under ``--out``; exit 1 if a stage failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/gpu-check"))
    parser.add_argument("--simulate", action="store_true",
                        help="run on a CPU under NUMBA_ENABLE_CUDASIM=1 with tiny sizes (the script's own test)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if args.simulate and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        parser.error("--simulate needs NUMBA_ENABLE_CUDASIM=1 in the environment (set before Numba is imported)")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"simulate": args.simulate, "repeats": args.repeats}
    stage(results, "environment", environment)
    stage(results, "tests", lambda: run_tests(args.simulate))
    stage(results, "laws", lambda: laws(args.simulate, args.repeats))
    stage(results, "model", lambda: model(args.simulate, args.repeats))
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (args.out / "gpu_check.txt").write_text(text)
    print(text)
    return 0 if all(results[name]["status"] == "ok" for name in ("environment", "tests", "laws", "model")) else 1


if __name__ == "__main__":
    sys.exit(main())
