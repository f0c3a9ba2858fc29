"""Run by ``test_numba_cuda.py`` in a subprocess with ``NUMBA_ENABLE_CUDASIM=1`` (which must be set
before ``numba.cuda`` is first imported): the numba-cuda laws against the NumPy reference.

The simulator runs every CUDA thread as a Python thread, so the cases are few and small, chosen
to cover the kernels' edges: one row and one column; a partial warp (5 columns) and more columns
than a warp (33: lanes loop); more rows than a block holds (forward tiles of 8 rows, backward
tiles of 64).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import numpy as np

assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "run me with NUMBA_ENABLE_CUDASIM=1"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[3]))  # the checkout, when nothing is installed

from law_check import FUNCTIONS, assert_matches_reference, draw, kernel_laws  # noqa: E402

from nflow_np.flows.coupling_law import COUPLING_LAWS as REFERENCE  # noqa: E402
from nflow_np.packaging import kernel_module  # noqa: E402

numba_cuda = importlib.import_module(kernel_module("coupling.numba_cuda"))

CASES = [
    # (law, functions, n, d2, dtype, s_hat_scale)
    ("affine", FUNCTIONS, 1, 1, np.float64, 1.0),
    ("affine", FUNCTIONS, 9, 33, np.float32, 4.0),
    ("affine", ("forward", "inverse_vjp"), 11, 5, np.float64, 30.0),
    ("affine", ("forward_vjp",), 66, 3, np.float32, 1.0),
    ("additive", FUNCTIONS, 3, 4, np.float32, 1.0),
]


def main() -> None:
    numba_cuda.require_device()
    for case, (law, functions, n, d2, dtype, s_hat_scale) in enumerate(CASES):
        inputs = draw(law, n, d2, dtype, np.random.default_rng(case), s_hat_scale=s_hat_scale)
        for function in functions:
            assert_matches_reference(kernel_laws(numba_cuda.FUSED), REFERENCE, law, function, inputs)
            print(f"ok {law}.{function} {np.dtype(dtype).name} {n}x{d2}", flush=True)


if __name__ == "__main__":
    main()
