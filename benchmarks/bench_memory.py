"""Activation memory and step time against depth: ``memory="store"`` vs ``memory="invert"`` (docs/memory.md).

Run from the repository root::

    python -m benchmarks.bench_memory                       # K = 8, 16, 32, 64; N = 1024, D = 16; float64
    python -m benchmarks.bench_memory --depths 8 16 --repeats 5 --out /tmp/memory

The model: ``K`` affine couplings of alternating parity (nets ``D/2 → 64 → 64 → D``, ReLU), every
parameter perturbed from its initial value so that no coupling is the identity. One training step
is ``zero_grad`` + :meth:`~nflow_np.model.FlowModel.nll_and_backward` on a fixed batch.

Modes: ``store``; ``invert`` with no anchor but the input; ``invert+anchors`` with ``anchor_every``
chosen from a reconstruction tolerance of 1e-12 on the batch (:data:`TOLERANCE`).

What is measured, per depth and mode:

- ``held_bytes``: the bytes the flow's caches keep alive between the forward and the backward pass
  (:meth:`~nflow_np.module.Module.cached_nbytes`, right after the forward call): the activations;
- ``peak_bytes``: ``tracemalloc``'s peak during one step above what was allocated before it (NumPy
  reports its buffers to tracemalloc): activations plus the transient arrays of the backward pass;
- ``step_ms``: median, min and max of ``--repeats`` steps, after one warm-up step, timed without
  tracemalloc (which slows allocation).

Then the reconstruction error (``Sequential.reconstruction_errors``) of the deepest stack, in float32
and float64, and the relative gradient error of the invert mode against the standard one. Writes
``OUT.json`` and ``OUT.png`` (default ``runs/bench/memory-vs-depth``; only ``runs/`` is written, the
figure in ``docs/figures/`` is a copy made by hand). Single BLAS thread, as the CLI uses; the load
average is printed, since other processes' work shows up in the times.

The allocator matters to the invert mode's time: it frees each layer's arrays as soon as it is done
with them, and glibc's default malloc would hand that memory back to the system, so the next layer
page-faults fresh memory. Choosing ``memory="invert"`` makes glibc keep freed memory
(:func:`nflow_np.allocator.keep_freed_memory`), so both modes here run under that setting
(``docs/memory.md#step-time``). The environment variables ``MALLOC_TRIM_THRESHOLD_`` /
``MALLOC_MMAP_THRESHOLD_``, if set, are recorded in the JSON and the plot's title.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from threadpoolctl import threadpool_limits

from nflow_np import AffineCoupling, FlowModel, Sequential
from nflow_np.flows.base import anchor_every_for

MODES = ("store", "invert", "invert+anchors")
TOLERANCE = {"float32": 1e-6, "float64": 1e-12}
"""Reconstruction tolerance of the ``invert+anchors`` mode (``anchor_every`` chosen from it)."""


def build(depth: int, dim: int, dtype: object, seed: int = 0) -> FlowModel:
    rng = np.random.default_rng(seed)
    flows = [AffineCoupling(dim, parity=k % 2, hidden=(64, 64), rng=rng, dtype=dtype) for k in range(depth)]
    model = FlowModel(Sequential(flows))
    for _, param, _ in model.named_parameters():
        param += rng.normal(0.0, 0.1, size=param.shape).astype(param.dtype)
    return model


def step(model: FlowModel, x: np.ndarray) -> None:
    model.zero_grad()
    model.nll_and_backward(x)


def held_bytes(model: FlowModel, x: np.ndarray) -> int:
    model.flow._forward(x)
    held = model.flow.cached_nbytes()
    model.flow.free_caches()
    return held


def peak_bytes(model: FlowModel, x: np.ndarray) -> int:
    step(model, x)  # warm: lazily built buffers are not counted
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    step(model, x)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak - base


def step_times(model: FlowModel, x: np.ndarray, repeats: int) -> np.ndarray:
    step(model, x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(model, x)
        times.append(time.perf_counter() - t0)
    return np.array(times)


def gradient_error(model: FlowModel, x: np.ndarray, anchor_every: int | None = None) -> float:
    """``max |g_invert − g_store| / max |g_store|`` over all parameters."""
    grads = []
    for memory, every in (("store", None), ("invert", anchor_every)):
        model.set_memory(memory, every)
        step(model, x)
        grads.append(np.concatenate([grad.ravel().astype(np.float64) for _, _, grad in model.named_parameters()]))
    model.set_memory("store")
    return float(np.max(np.abs(grads[1] - grads[0])) / np.max(np.abs(grads[0])))


def run(depths: list[int], rows: int, dim: int, repeats: int) -> dict:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, dim))
    results: dict = {"rows": rows, "dim": dim, "dtype": "float64", "repeats": repeats, "depths": depths, "modes": {}}
    results["tolerance"] = TOLERANCE["float64"]
    for memory in MODES:
        results["modes"][memory] = {"held_bytes": [], "peak_bytes": [], "step_ms": [], "anchor_every": []}
    for depth in depths:
        model = build(depth, dim, np.float64)
        for memory in MODES:  # in turn, on the same model and batch
            if memory == "invert+anchors":
                model.set_memory("invert", tolerance=TOLERANCE["float64"])
            else:
                model.set_memory(memory)
            entry = results["modes"][memory]
            entry["held_bytes"].append(held_bytes(model, x))  # (chooses anchor_every from the tolerance)
            entry["anchor_every"].append(getattr(model.flow, "anchor_every", None))
            entry["peak_bytes"].append(peak_bytes(model, x))
            times = 1e3 * step_times(model, x, repeats)
            entry["step_ms"].append(
                {"median": float(np.median(times)), "min": float(times.min()), "max": float(times.max())}
            )
            print(
                f"K={depth:3d} {memory:14s} k={entry['anchor_every'][-1]}  "
                f"held {entry['held_bytes'][-1] / 2**20:7.2f} MiB  "
                f"peak {entry['peak_bytes'][-1] / 2**20:7.2f} MiB  step {np.median(times):7.2f} ms "
                f"(min {times.min():.2f}, max {times.max():.2f})"
            )
    deepest = max(depths)
    results["reconstruction"] = {}
    for dtype in ("float32", "float64"):
        model = build(deepest, dim, dtype)
        xd = x.astype(dtype)
        errors = model.flow.reconstruction_errors(xd)
        every = anchor_every_for(errors, TOLERANCE[dtype])
        entry = results["reconstruction"][dtype] = {
            "errors_by_inversions": errors.tolist(),
            "growth_per_inversion": float((errors[7] / errors[0]) ** (1 / 7)) if deepest >= 8 else None,
            "gradient_error_no_anchor": gradient_error(model, xd),
            "tolerance": TOLERANCE[dtype],
            "anchor_every": every,
            "gradient_error_anchored": gradient_error(model, xd, every),
        }
        print(
            f"{dtype}: relative reconstruction error after 1/8/{deepest} inversions "
            f"{errors[0]:.2e}/{errors[min(7, deepest - 1)]:.2e}/{errors[-1]:.2e}; gradient error "
            f"{entry['gradient_error_no_anchor']:.2e} without anchors, {entry['gradient_error_anchored']:.2e} with "
            f"anchor_every = {every} (tolerance {TOLERANCE[dtype]:g})"
        )
    return results


def plot(results: dict, path: Path) -> None:
    depths = results["depths"]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    memory_axes, time_axes = fig.subplots(1, 2)
    for memory, colour in zip(MODES, ("tab:blue", "tab:orange", "tab:green"), strict=True):
        entry = results["modes"][memory]
        memory_axes.plot(depths, np.array(entry["held_bytes"]) / 2**20, "o-", color=colour, label=f"{memory}: held")
        memory_axes.plot(depths, np.array(entry["peak_bytes"]) / 2**20, "s--", color=colour, label=f"{memory}: peak")
        medians = [t["median"] for t in entry["step_ms"]]
        low = [t["median"] - t["min"] for t in entry["step_ms"]]
        high = [t["max"] - t["median"] for t in entry["step_ms"]]
        time_axes.errorbar(depths, medians, yerr=[low, high], fmt="o-", color=colour, capsize=3, label=memory)
    memory_axes.set(xlabel="couplings K", ylabel="MiB", title="activation memory of one step")
    time_axes.set(xlabel="couplings K", ylabel="ms (median, min–max)", title="step time")
    for axes in (memory_axes, time_axes):
        axes.set_xscale("log", base=2)
        axes.set_xticks(depths, [str(k) for k in depths])
        axes.legend()
        axes.grid(alpha=0.3)
    allocator = " ".join(f"{k}={v}" for k, v in results.get("malloc_env", {}).items())
    allocator = allocator or "malloc keeps freed memory (nflow_np.allocator)"
    fig.suptitle(f"N = {results['rows']}, D = {results['dim']}, float64; {allocator}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/memory-vs-depth"))
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, load average {os.getloadavg()}")
    with threadpool_limits(limits=1, user_api="blas"):
        results = run(args.depths, args.rows, args.dim, args.repeats)
    results["load_average"] = os.getloadavg()
    results["malloc_env"] = {key: value for key, value in os.environ.items() if key.startswith("MALLOC_")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
