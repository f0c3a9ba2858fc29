"""The training step's GEMMs timed alone, NumPy's BLAS against PyTorch's, one thread each, in one run.

``python -m benchmarks.gemm_vs_torch`` prints GFLOP/s for the products of the benchmark RealNVP's step
(batch 512, nets 256-256: ``x W`` and the transposed weight-gradient products), the 8,192-row product of
``log_prob`` and NICE's 100- and 50-row products, and the ratio PyTorch / NumPy time. It is what bounds
``× torch`` in the ``train`` and ``sample`` sections on a CPU where PyTorch's GEMMs (MKL / oneDNN) are faster
than the OpenBLAS NumPy ships (README, "Performance", Intel Xeon). Needs PyTorch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

SHAPES = [  # (M, K, N, A transposed): the step's products, log_prob's 8,192 rows, NICE's 100 and 50 rows
    (512, 32, 256, False), (512, 256, 256, False), (512, 256, 64, False), (256, 512, 256, True),
    (32, 512, 256, True), (256, 512, 64, True), (8192, 256, 256, False), (100, 500, 500, False),
    (50, 500, 500, False),
]


def seconds(call: Callable[[], object], repeats: int = 20) -> float:
    """Mean seconds per call after one warm-up call."""
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def main() -> int:
    """Print one line per dtype and shape: NumPy and PyTorch GFLOP/s and their time ratio."""
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    with threadpool_limits(1):
        for dtype in ("float32", "float64"):
            for m, k, n, transposed in SHAPES:
                a = rng.standard_normal((k, m) if transposed else (m, k)).astype(dtype)
                b = rng.standard_normal((k, n)).astype(dtype)
                out = np.empty((m, n), dtype)
                left = a.T if transposed else a
                t_left = torch.from_numpy(a).T if transposed else torch.from_numpy(a)
                t_b, t_out = torch.from_numpy(b), torch.from_numpy(out)
                ours = seconds(lambda: np.matmul(left, b, out=out))  # noqa: B023
                theirs = seconds(lambda: torch.matmul(t_left, t_b, out=t_out))  # noqa: B023
                flops = 2 * m * k * n
                print(f"{dtype} ({m}×{k})·({k}×{n}){' Aᵀ' if transposed else '   '}  numpy {flops / ours / 1e9:6.1f}"
                      f"  torch {flops / theirs / 1e9:6.1f} GFLOP/s  torch faster by {ours / theirs:.2f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
