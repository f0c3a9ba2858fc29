"""Data-parallel training throughput at P = 1 and P = 2 ranks, communication beside compute (docs/distributed.md).

    python -m benchmarks.distributed [--ranks 1 2] [--steps 60] [--path both] [--quick] [--out runs/bench/distributed]

For each model, ``mpiexec -n P`` runs the data-parallel step of :mod:`nflow_np.distributed` with one
BLAS (and Numba) thread per rank, inside :func:`~nflow_np.distributed.training` as ``fit`` runs it, and
times its parts on every rank: the shard's forward and backward pass (``compute``), a barrier (``wait``:
for the slowest rank's compute, i.e. load imbalance), :func:`~nflow_np.distributed.reduce_gradients`
(``reduce``) and the norm check with the optimizer step (``update``). At P > 1 each model runs both
ways (``--path``): ``shared``, through the node's shared memory with the Adam step divided between the
ranks (``reduce``: two barriers and this rank's columns of the sum; ``update``: its columns of Adam and
a barrier), and ``messages`` (``NFLOW_MPI_SHARED=0``: ``reduce`` is the packing, the all-to-all, the sum
in rank order and the all-gather of one flat buffer; ``update`` the whole Adam step on every rank). The
table shows the slowest rank's compute, the longest wait, and that rank's reduce and update.
Throughput is the global batch over the median step time. Models:

- ``realnvp``: the benchmark suite's RealNVP (``benchmarks/sections.py``: 64 dimensions, 8 affine
  couplings of 256-256 nets, batch 512, float32) on Gaussian rows;
- ``nice``: NICE on MNIST-5000 with the ``nflow train`` recipe (784 pixels, nets of 5 × 400, batch 100,
  float32, dequantisation noise drawn in the forward pass).

``--quick`` shrinks both (narrow nets, 8×8 digits for NICE, few steps): the test of this script. The
figures are only worth reading on a quiet machine. Each worker prints one JSON line; the driver
writes ``distributed.json`` and a table under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODELS = ("realnvp", "nice")


def build(model: str, quick: bool, seed: int = 0) -> tuple[object, np.ndarray, int]:
    """``(flow model, training rows, global batch size)`` for ``model``."""
    if model == "realnvp":
        from nflow_np.architectures import build_model

        from .sections import Settings

        settings = Settings.smoke() if quick else Settings()
        rows = np.random.default_rng(seed).standard_normal((8 * settings.batch, settings.dim)).astype(np.float32)
        flow = build_model("realnvp", settings.dim, layers=settings.layers, hidden=settings.hidden,
                           dtype=np.float32, seed=seed)
        return flow, rows, settings.batch
    from nflow_np.data.images import load_images
    from nflow_np.image_models import initialize_rescale
    from nflow_np.image_training import IMAGE_RECIPES, build_image_model

    recipe = IMAGE_RECIPES[("mnist", "nice")]
    splits = load_images("digits" if quick else "mnist", seed=seed, dtype=np.float32)
    hidden = (32, 32) if quick else tuple(recipe["hidden"])
    flow = build_image_model("nice", splits.shape, splits.levels, hidden, recipe["alpha"], np.float32, seed)
    initialize_rescale(flow, splits.train[:1000])
    return flow, splits.train.reshape(splits.train.shape[0], -1), recipe["batch_size"]


def worker(model: str, steps: int, quick: bool) -> dict:
    """One rank's timings (run under ``mpiexec``); rank 0 returns every rank's medians."""
    from mpi4py import MPI
    from threadpoolctl import threadpool_limits

    from nflow_np import distributed
    from nflow_np.optim import Adam
    from nflow_np.train import train_step

    comm = MPI.COMM_WORLD
    flow, rows, batch = build(model, quick)
    optimizer = Adam(flow, lr=1e-4)
    order = np.random.default_rng(1).permutation(rows.shape[0])
    parts = {"compute": [], "wait": [], "reduce": [], "adam": [], "step": []}
    warm_up, marks = 3, {}

    def compute(x: np.ndarray) -> float:
        """This rank's shard forward and backward, then the wait for the slowest rank (measured apart)."""
        with distributed.global_draws(flow, batch, mine):
            marks["loss"] = flow.nll_and_backward(x[mine])
        marks["computed"] = time.perf_counter()
        comm.Barrier()
        marks["waited"] = time.perf_counter()
        return marks["loss"]

    def reduce(module: object) -> None:
        distributed.reduce_gradients(comm, module, marks["loss"], mine.stop - mine.start, batch)
        marks["reduced"] = time.perf_counter()

    with threadpool_limits(limits=1, user_api="blas"), distributed.training(comm, flow, optimizer) as shared:
        for i in range(warm_up + steps):
            x = rows[order[(i * batch) % (rows.shape[0] - batch) :][:batch]]
            mine = distributed.shard(comm, batch)
            comm.Barrier()  # every step starts together, so "reduce" measures this step's wait only
            t0 = time.perf_counter()
            train_step(flow, optimizer, x, loss_and_backward=compute, reduce_gradients=reduce)
            t4 = time.perf_counter()  # "adam": the norm check and (this rank's part of) the update
            t1, t2, t3 = marks["computed"], marks["waited"], marks["reduced"]
            if i >= warm_up:
                for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
                    parts[name].append(seconds)
    medians = {name: float(np.median(values)) for name, values in parts.items()}
    everyone = comm.gather(medians, root=0)
    if comm.Get_rank():
        return {}
    step = np.asarray(parts["step"])
    buffer_bytes = (sum(grad.size for _, _, grad in flow.named_parameters()) + 2) * 4
    return {"model": model, "ranks": comm.Get_size(), "path": path(comm.Get_size(), shared is not None),
            "batch": batch, "parameters": flow.num_parameters(),
            "buffer_bytes": buffer_bytes, "steps": steps,
            "step_ms": {"median": 1e3 * float(np.median(step)), "min": 1e3 * float(step.min()),
                        "max": 1e3 * float(step.max())},
            "samples_per_s": batch / float(np.median(step)),
            "per_rank_ms": [{name: 1e3 * value for name, value in m.items()} for m in everyone]}


def path(ranks: int, shared: bool) -> str:
    """How the ranks combined their gradients: ``one process``, ``shared`` memory or MPI ``messages``."""
    return "one process" if ranks == 1 else "shared" if shared else "messages"


def run(ranks: int, model: str, steps: int, quick: bool, shared: bool = True) -> dict:
    """``mpiexec -n ranks`` of this module's worker (``shared=False``: the message path); its JSON line."""
    package = __spec__.parent  # benchmarks, or nflow_np_benchmarks where installed
    threads = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                      "NUMBA_NUM_THREADS")} | {"NFLOW_MPI_SHARED": "1" if shared else "0"}
    from nflow_np.distributed import launcher

    command = [launcher(), "-n", str(ranks), sys.executable, "-m", f"{package}.distributed", "--worker", model,
               "--steps", str(steps)] + (["--quick"] if quick else [])
    done = subprocess.run(command, env=os.environ | threads, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    """One row per model and rank count: samples/s, speed-up over P = 1, ms per step split into its parts."""
    lines = ["model     P  path         batch  samples/s  speed-up  step ms (min-max)      compute ms  wait ms  "
             "reduce ms  update ms  buffer MiB"]
    single = {r["model"]: r["samples_per_s"] for r in results if r["ranks"] == 1}
    for r in results:
        slowest = max(r["per_rank_ms"], key=lambda m: m["compute"])
        speedup = r["samples_per_s"] / single[r["model"]] if r["model"] in single else float("nan")
        step = r["step_ms"]
        lines.append(
            f"{r['model']:<8} {r['ranks']:>2}  {r.get('path', ''):<11} {r['batch']:>6} {r['samples_per_s']:>10.0f} "
            f"{speedup:>9.2f}  "
            f"{step['median']:>7.2f} ({step['min']:.2f}-{step['max']:.2f})  {slowest['compute']:>10.2f} "
            f"{max(m['wait'] for m in r['per_rank_ms']):>8.2f} {slowest['reduce']:>10.2f} {slowest['adam']:>10.2f} "
            f"{r['buffer_bytes'] / 2**20:>11.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 60; --quick 5)")
    parser.add_argument("--quick", action="store_true", help="small models and few steps (the script's test)")
    parser.add_argument("--path", choices=("shared", "messages", "both"), default="both",
                        help="at P > 1: through the node's shared memory, by MPI messages, or both (default)")
    parser.add_argument("--out", default="runs/bench/distributed")
    parser.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = args.steps or (5 if args.quick else 60)
    if args.worker:
        result = worker(args.worker, steps, args.quick)
        if result:
            print(json.dumps(result))
        return 0
    paths = [True] if args.path == "shared" else [False] if args.path == "messages" else [True, False]
    results = [run(p, model, steps, args.quick, shared) for model in args.models for p in args.ranks
               for shared in (paths if p > 1 else [True])]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(results)
    load = os.getloadavg()
    header = f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; one BLAS thread per rank; quick={args.quick}"
    (out / "distributed.json").write_text(json.dumps({"load": load, "results": results}, indent=2) + "\n")
    (out / "distributed.txt").write_text(header + "\n" + text + "\n")
    print(header)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
