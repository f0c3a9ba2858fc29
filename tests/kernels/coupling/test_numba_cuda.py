"""``kernels.coupling.numba_cuda`` without a GPU: under the CUDA simulator against the NumPy reference.

``NUMBA_ENABLE_CUDASIM`` is read when ``numba.cuda`` is first imported, so the check runs in a
subprocess (``cudasim_check.py``) whose environment sets it; this process's ``numba.cuda`` stays
the real one (``test_ptx.py`` compiles the same kernels to PTX). On a machine with a GPU,
``test_gpu.py`` runs them for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba", reason="the numba-cuda backend needs `pip install numba`")

HERE = Path(__file__).resolve().parent


def test_kernels_match_reference_under_the_cuda_simulator() -> None:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    run = subprocess.run(
        [sys.executable, str(HERE / "cudasim_check.py")],
        cwd=HERE.parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, f"simulator check failed:\n{run.stdout}\n{run.stderr}"
    assert run.stdout.count("ok ") == 15, run.stdout
