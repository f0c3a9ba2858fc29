"""Time one training step of the default two-moons model with 1 and with 2 BLAS threads.

    python -m benchmarks.bench_train_step [--steps 100]

Prints the median, min and max milliseconds per step (Adam, batch 256, RealNVP with 8 affine
couplings of 64-64 ReLU nets, float64) for each thread count, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

from threadpoolctl import threadpool_limits

from nflow_np.architectures import build_model
from nflow_np.data import load_toy
from nflow_np.optim import Adam
from nflow_np.train import train_step


def time_steps(threads: int, steps: int, repeats: int = 5) -> list[float]:
    """Milliseconds per step, one figure per repeat of ``steps`` steps, after a warm-up."""
    data = load_toy("two_moons", n_train=256, n_val=1, n_test=1).train
    model = build_model("realnvp", 2, layers=8, hidden=(64, 64))
    optimizer = Adam(model, lr=1e-3)
    figures = []
    with threadpool_limits(limits=threads, user_api="blas"):
        for repeat in range(repeats + 1):
            start = time.perf_counter()
            for _ in range(steps):
                train_step(model, optimizer, data)
            if repeat:  # the first round is the warm-up
                figures.append((time.perf_counter() - start) * 1e3 / steps)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    print("BLAS threads   median ms/step   min     max")
    for threads in (1, 2):
        figures = time_steps(threads, args.steps)
        print(f"{threads:>12}   {statistics.median(figures):>14.2f}   {min(figures):.2f}   {max(figures):.2f}")


if __name__ == "__main__":
    main()
