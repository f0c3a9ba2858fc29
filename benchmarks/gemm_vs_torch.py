"""The training step's GEMMs timed alone, by each GEMM engine and by PyTorch, one thread each, in one run.

``python -m benchmarks.gemm_vs_torch`` prints GFLOP/s for the products of the benchmark RealNVP's step
(batch 512, nets 256-256: ``x W`` and the transposed weight-gradient products), the 8,192-row product of
``log_prob``, NICE's 100- and 50-row products and a 28×28 convolution's 12,544-column product, by NumPy's
OpenBLAS, by MKL where the ``mkl`` wheel is installed (:mod:`nflow_np.gemm`), and by PyTorch, with the ratio
of PyTorch's time to the best engine's. It is what bounds ``× torch`` in the ``train`` and ``sample``
sections: with OpenBLAS alone, PyTorch's GEMMs (MKL / oneDNN) were faster on the Intel Xeon (README,
"Performance"). Needs PyTorch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

SHAPES = [  # (M, K, N, A transposed): the step's products, log_prob's 8,192 rows, NICE's 100 and 50 rows
    (512, 32, 256, False), (512, 256, 256, False), (512, 256, 64, False), (256, 512, 256, True),
    (32, 512, 256, True), (256, 512, 64, True), (8192, 256, 256, False), (100, 500, 500, False),
    (50, 500, 500, False), (64, 576, 12544, False),
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

    from nflow_np import gemm

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    engines = [name for name in ("openblas", "mkl") if name in gemm.available_engines()]  # loads them first
    with threadpool_limits(1):
        for dtype in ("float32", "float64"):
            for m, k, n, transposed in SHAPES:
                a = rng.standard_normal((k, m) if transposed else (m, k)).astype(dtype)
                b = rng.standard_normal((k, n)).astype(dtype)
                out = np.empty((m, n), dtype)
                left = a.T if transposed else a
                t_left = torch.from_numpy(a).T if transposed else torch.from_numpy(a)
                t_b, t_out = torch.from_numpy(b), torch.from_numpy(out)
                ours = {}
                for name in engines:
                    with gemm.using_engine(name):
                        ours[name] = seconds(lambda: gemm.gemm(left, b, out, 0.0))  # noqa: B023
                theirs = seconds(lambda: torch.matmul(t_left, t_b, out=t_out))  # noqa: B023
                flops = 2 * m * k * n
                rates = "  ".join(f"{name} {flops / t / 1e9:6.1f}" for name, t in ours.items())
                faster = min(ours.values()) / theirs
                print(f"{dtype} ({m}×{k})·({k}×{n}){' Aᵀ' if transposed else '   '}  {rates}"
                      f"  torch {flops / theirs / 1e9:6.1f} GFLOP/s  torch faster than the best by {faster:.2f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
