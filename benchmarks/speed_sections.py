"""Two sections of the suite about speed that holds on any machine (issue 17).

``threads``: each operation (a RealNVP training step at the benchmark's batch, ``log_prob`` and ``sample``
at ``sample_batch``) at every BLAS/Numba split of ``n`` threads on the quiet machine, which is what
:data:`nflow_np.threads.PLAN` should be chosen from; then the same operations at 1 thread, at ``n`` and
at the default (``set_num_threads(None)``) while a busy process spins on the last core, where the
default must never be slower than 1 thread (``default_over_one`` ≤ 1).

``nice-mnist``: NICE on MNIST-5000 (4 additive couplings, nets 392 → 500×4 → 392, batch 100, Adam,
float32) steps/s against the same model in PyTorch in the same run; with ``--nice-steps K`` also the
median step time over steps 100–119 against over the last 20 of ``K`` (≥ 5,000 for the issue's
check: a step must not get slower as the weights and Adam's moments shrink towards subnormals).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from types import ModuleType

import numpy as np

from nflow_np import fpmode, threads
from nflow_np.image_models import build_nice
from nflow_np.optim import Adam
from nflow_np.train import train_step

from .sections import Settings, attempt, figure, realnvp, timed, training_step
from .subnormal import subnormal_fraction

SPLITS = (("1", "1"), ("n", "1"), ("1", "n"), ("n", "n"))


@contextlib.contextmanager
def plan_override(operation: str, split: tuple[str, str]) -> Iterator[None]:
    """:data:`nflow_np.threads.PLAN` with ``operation``'s split replaced for the block."""
    previous = threads.PLAN[operation]
    threads.PLAN[operation] = split
    try:
        yield
    finally:
        threads.PLAN[operation] = previous


@contextlib.contextmanager
def busy_core() -> Iterator[int | None]:
    """A subprocess spinning on the last usable core (pinned where the OS allows) for the block."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    core = None
    try:
        with contextlib.suppress(AttributeError, OSError):
            core = max(os.sched_getaffinity(0))
            os.sched_setaffinity(spinner.pid, {core})
        time.sleep(0.3)  # let it start spinning
        threads._last = None  # the default's next decision probes the load afresh
        yield core
    finally:
        spinner.kill()
        spinner.wait()
        threads._last = None


def operations(s: Settings, dtype: str = "float32") -> dict[str, Callable[[], object]]:
    """The three timed operations on the benchmark RealNVP (three Adam steps taken first)."""
    rng = np.random.default_rng(s.seed)
    x = rng.standard_normal((s.sample_batch, s.dim)).astype(dtype)
    model = realnvp(s, dtype)
    step = training_step(model, x[: s.batch], s.lr)
    for _ in range(3):
        step()
    draws = np.random.default_rng(s.seed)
    return {"train": step, "log_prob": lambda: model.log_prob(x), "sample": lambda: model.sample(s.sample_batch, draws)}


def threads_section(s: Settings) -> dict:
    """Every split on the quiet machine, then 1 / n / default threads with a busy core (module doc)."""
    n = max(2, min(s.threads, threads.usable_cores())) if threads.usable_cores() > 1 else 1
    calls = operations(s)
    rows = []
    for op, call in calls.items():
        for split in SPLITS:
            def measure(op: str = op, call: Callable = call, split: tuple = split) -> dict:
                with plan_override(op, split), threads.num_threads(n):
                    times = timed(call, s.repeats)
                return {"ms": figure(1e3 * times)}

            rows.append(attempt({"case": "quiet", "op": op, "threads": n, "blas": n if split[0] == "n" else 1,
                                 "numba": n if split[1] == "n" else 1}, measure))
    with busy_core() as core:
        for op, call in calls.items():
            block = []
            for given in (1, n, None):
                def measure(op: str = op, call: Callable = call, given: int | None = given) -> dict:
                    with threads.num_threads(given):
                        times = timed(call, s.repeats)
                        chosen = threads.plan(op)
                    return {"ms": figure(1e3 * times), "blas": chosen.blas, "numba": chosen.numba}

                label = "default" if given is None else given
                block.append(attempt({"case": f"busy core {core}", "op": op, "threads": label}, measure))
            if all("ms" in row for row in block):
                block[2]["default_over_one"] = block[2]["ms"]["median"] / block[0]["ms"]["median"]
            rows += block
    return {"n": n, "rows": rows}


# -- NICE on MNIST --------------------------------------------------------------------------------------------------
NICE_COUPLINGS = 4
NICE_BATCH = 100
EARLY = (100, 120)
"""Steps whose median time is the "after 100 steps" figure of the long run."""


def mnist_rows() -> np.ndarray:
    """The MNIST-5000 training split as float32 rows of integer levels (``nflow_np.data.images``)."""
    from nflow_np.data.images import load_images

    return load_images("mnist").train.reshape(-1, 784).astype(np.float32)


def _nice_nflow(x: np.ndarray, s: Settings) -> tuple[Callable[[np.ndarray], None], object]:
    model = build_nice((1, 28, 28), 256, couplings=NICE_COUPLINGS, hidden=s.nice_hidden, dtype=np.float32, seed=s.seed)
    optimizer = Adam(model, lr=s.lr)

    def step(batch: np.ndarray) -> None:
        train_step(model, optimizer, batch)

    return step, (model, optimizer)


def _batches(x: np.ndarray, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(x.shape[0])
        for start in range(0, x.shape[0] - NICE_BATCH + 1, NICE_BATCH):
            yield np.ascontiguousarray(x[order[start : start + NICE_BATCH]])


def _steps_per_s(step: Callable[[np.ndarray], None], x: np.ndarray, s: Settings) -> dict:
    batches = _batches(x, s.seed)
    times = timed(lambda: step(next(batches)), s.repeats)
    return {"ms": figure(1e3 * times), "steps_per_s": figure(1 / times)}


def _long_run(x: np.ndarray, s: Settings) -> dict:
    step, (model, optimizer) = _nice_nflow(x, s)
    batches = _batches(x, s.seed)
    times = np.empty(s.nice_steps)
    for k in range(s.nice_steps):
        batch = next(batches)
        t0 = time.perf_counter()
        step(batch)
        times[k] = time.perf_counter() - t0
    early, late = times[EARLY[0] : EARLY[1]], times[-(EARLY[1] - EARLY[0]) :]
    weights = [p for name, p, _ in model.named_parameters() if ".net." in f".{name}"]
    moments = [v for buffer in optimizer.state.values() for v in buffer.values()]
    return {"steps": s.nice_steps, "early_ms": figure(1e3 * early), "late_ms": figure(1e3 * late),
            "late_over_early": float(np.median(late) / np.median(early)),
            "subnormal_share_of_weights": subnormal_fraction(weights),
            "subnormal_share_of_adam_state": subnormal_fraction(moments)}


def nice_mnist(s: Settings, torch_ref: ModuleType | None) -> dict:
    """NICE on MNIST-5000: nflow_np and PyTorch steps/s in this run; the long-run decay check with ``nice_steps``."""
    x = mnist_rows()
    rows = [attempt({"impl": "nflow_np"}, lambda: _steps_per_s(_nice_nflow(x, s)[0], x, s))]
    if torch_ref is not None:
        rows.append(attempt({"impl": "torch"}, lambda: _steps_per_s(
            torch_ref.nice_training_step(x[:NICE_BATCH], NICE_COUPLINGS, s.nice_hidden, s.lr, s.seed)[1], x, s)))
        if all("ms" in row for row in rows):
            rows[0]["speedup_vs_torch"] = rows[1]["ms"]["median"] / rows[0]["ms"]["median"]
    result = {"model": {"couplings": NICE_COUPLINGS, "hidden": list(s.nice_hidden), "batch": NICE_BATCH,
                        "rows": int(x.shape[0]), "dtype": "float32", "optimizer": f"Adam(lr={s.lr})"},
              "flush_denormals": fpmode.get_flush_denormals(), "rows": rows}
    if s.nice_steps:
        result["long_run"] = _long_run(x, s)
    return result
