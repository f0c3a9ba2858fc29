"""The GPU kernels compile to PTX for sm_80 (A100) and sm_90 (H100) without a GPU.

- ``kernels.coupling.numba_cuda``: every kernel, float32 and float64, through ``numba.cuda.compile_ptx``
  (which needs libNVVM from a CUDA toolkit, not a GPU or a driver);
- ``kernels/coupling/cuda/coupling.cu`` (CuPy's source): ``nvcc --ptx``, and every ``extern "C"`` entry
  that ``kernels.coupling.cupy_kernels`` launches is in the PTX.

Skips, with the reason printed in pytest's summary (``-rs``), happen only where no CUDA compiler
is installed (no libNVVM, or no ``nvcc`` on PATH). Set ``NFLOW_REQUIRE_CUDA_COMPILER=1`` to turn
those skips into failures (on this project's machine image the toolkit is installed, at
/usr/local/cuda, so they do not skip there).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ARCHITECTURES = [(8, 0), (9, 0)]
SOURCE = Path(__file__).resolve().parents[3] / "kernels" / "coupling" / "cuda" / "coupling.cu"
CUPY_ENTRIES = ["affine_forward", "affine_backward", "column_sum"]


def no_compiler(reason: str) -> None:
    if os.environ.get("NFLOW_REQUIRE_CUDA_COMPILER") == "1":
        pytest.fail(f"{reason} (and NFLOW_REQUIRE_CUDA_COMPILER=1)")
    pytest.skip(reason)


def numba_signatures(dtype: object) -> dict[str, tuple]:
    from numba import types

    matrix, vector = types.Array(dtype, 2, "C"), types.Array(dtype, 1, "C")
    return {
        "add_scaled_kernel": (matrix, matrix, dtype, matrix),
        "scaled_kernel": (matrix, dtype, matrix),
        "fill_kernel": (dtype, vector),
        "affine_forward_kernel": (matrix, matrix, vector, dtype, matrix, vector),
        "affine_backward_kernel": (matrix, matrix, vector, matrix, vector, dtype, matrix, matrix, matrix),
        "column_sum_kernel": (matrix, vector),
    }


@pytest.mark.parametrize("cc", ARCHITECTURES, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_numba_cuda_kernels_compile_to_ptx(cc: tuple[int, int], dtype_name: str) -> None:
    pytest.importorskip("numba", reason="the numba-cuda backend needs `pip install numba`")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("NUMBA_ENABLE_CUDASIM=1 in this process: the simulator has no compiler")
    from numba import cuda, types
    from numba.cuda.cudadrv import nvvm

    try:
        nvvm.NVVM()
    except Exception as error:
        no_compiler(f"no libNVVM found by numba ({error}); install a CUDA toolkit")
    from kernels.coupling import numba_cuda

    signatures = numba_signatures(getattr(types, dtype_name))
    assert set(signatures) == set(numba_cuda.KERNELS), "a kernel was added without a PTX signature here"
    for name, signature in signatures.items():
        ptx, _ = cuda.compile_ptx(numba_cuda.KERNELS[name].py_func, signature, cc=cc)
        assert f".target sm_{cc[0]}{cc[1]}" in ptx, name
        assert ".entry" in ptx, name


@pytest.mark.parametrize("cc", ARCHITECTURES, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
def test_cupy_source_compiles_to_ptx(cc: tuple[int, int], tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        no_compiler("nvcc is not on PATH; install the CUDA toolkit to check kernels/coupling/cuda/coupling.cu")
    ptx_path = tmp_path / "coupling.ptx"
    arch = f"sm_{cc[0]}{cc[1]}"
    run = subprocess.run(
        [nvcc, "--ptx", f"-arch={arch}", "-o", str(ptx_path), str(SOURCE)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    ptx = ptx_path.read_text()
    assert f".target {arch}" in ptx
    entries = set(re.findall(r"\.entry\s+(\w+)\(", ptx))
    assert entries == {f"{name}_{suffix}" for name in CUPY_ENTRIES for suffix in ("f32", "f64")}
