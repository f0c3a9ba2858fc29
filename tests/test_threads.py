"""Thread plans (nflow_np/threads.py): the counts per operation, put back after each call, results
unchanged by the split, the default against a busy machine, and no environment variable written.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import nflow_np
from nflow_np import backend, gemm, threads
from nflow_np.architectures import build_model
from nflow_np.optim import Adam

CORES = threads.usable_cores()
TWO = min(2, CORES)


@pytest.fixture
def numba_backend() -> Iterator[object]:
    """The numba backend (its kernels run rows over Numba's threads above their parallel threshold)."""
    numba = pytest.importorskip("numba")
    with backend.using("numba"):
        yield numba


def blas_threads() -> int:
    return max(c.get_num_threads() for c in nflow_np.fpmode.blas_controller().select(user_api="blas").lib_controllers)


def test_plan_per_operation_and_its_bounds() -> None:
    assert threads.plan("train", TWO) == threads.Plan("train", TWO, 1)
    assert threads.plan("log_prob", TWO) == threads.Plan("log_prob", TWO, 1)  # PLAN: the pools would fight
    assert threads.plan("sample", 10 * CORES).blas == CORES  # never more threads than cores
    with pytest.raises(ValueError, match="unknown operation"):
        threads.plan("fit")
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="positive integer"):
            threads.set_num_threads(bad)


def test_the_requested_count_is_used_and_every_count_put_back(numba_backend: object, monkeypatch: object) -> None:
    numba = numba_backend
    monkeypatch.setitem(threads.PLAN, "log_prob", ("n", "n"))  # a split that sets both pools to n
    numba_before, blas_before = numba.get_num_threads(), blas_threads()
    assert nflow_np.get_num_threads() is None
    with nflow_np.num_threads(TWO):
        assert nflow_np.get_num_threads() == TWO
        with threads.compute("log_prob") as plan:
            assert (blas_threads(), numba.get_num_threads()) == (TWO, TWO) == (plan.blas, plan.numba)
            with threads.compute("train") as inner:  # nested: the outer plan stays
                assert inner == plan and numba.get_num_threads() == TWO
        with threads.compute("train"):
            assert (blas_threads(), numba.get_num_threads()) == (TWO, 1)
    assert (numba.get_num_threads(), blas_threads()) == (numba_before, blas_before)
    assert nflow_np.get_num_threads() is None


def test_the_default_is_capped_by_the_callers_blas_limit() -> None:
    with nflow_np.fpmode.blas_controller().limit(limits=1, user_api="blas"):
        assert threads.plan("log_prob").blas == 1


def run_model(dtype: str, n: int) -> list[np.ndarray]:
    """Three Adam steps on a batch large enough for the parallel kernels, then log_prob and sample."""
    x = np.random.default_rng(0).standard_normal((4096, 64)).astype(dtype)
    model = build_model("realnvp", 64, layers=3, hidden=(48,), dtype=dtype, seed=1)
    optimizer = Adam(model, lr=1e-2)
    with nflow_np.num_threads(n):
        for _ in range(3):
            model.zero_grad()
            model.nll_and_backward(x)
            optimizer.step()
        grads = [grad.copy() for _, _, grad in model.named_parameters()]
        return [*grads, model.log_prob(x), model.encode(x), model.sample(4096, np.random.default_rng(5))]


BLAS_ENGINES = [name for name in ("openblas", "mkl") if name in gemm.available_engines()]


@pytest.mark.parametrize("engine", BLAS_ENGINES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_results_are_bit_identical_for_every_split(
    numba_backend: object, dtype: str, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On either BLAS engine: OpenBLAS's summation order does not depend on its thread count, and MKL runs in its
    strict reproducibility mode, whose order does not either (docs/numerics.md#the-gemm-engine)."""
    if engine == "mkl":
        assert gemm.mkl_strict
    with gemm.using_engine(engine):
        reference = run_model(dtype, 1)
        for split in [("n", "1"), ("1", "n"), ("n", "n")]:
            monkeypatch.setattr(threads, "PLAN", dict.fromkeys(threads.OPERATIONS, split))
            for result, expected in zip(run_model(dtype, TWO), reference, strict=True):
                np.testing.assert_array_equal(result, expected, err_msg=f"split {split}")


def test_idle_cores_counts_cores_other_processes_keep_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"wall": 100.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(threads.time, "sleep", lambda s: clock.update(wall=clock["wall"] + s))
    monkeypatch.setattr(threads, "_cpu_busy_seconds", lambda: clock["busy"])
    monkeypatch.setattr(threads, "_own_seconds", lambda: clock["own"])
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "_last", None)
    monkeypatch.setattr(threads, "_last_idle", None)
    assert threads.idle_cores() == 2  # the first probe: nobody busy
    clock.update(wall=110.0, busy=20.0 - 0.5, own=9.5)  # 10 s: we used 9.5 s, others 10 s = one core
    assert threads.idle_cores() == 1
    clock.update(wall=111.0)  # within REFRESH_S: the last answer
    assert threads.idle_cores() == 1
    clock.update(wall=121.0, busy=clock["busy"] + 15.0, own=clock["own"] + 13.0)  # others 0.2 core
    assert threads.idle_cores() == 2
    clock.update(wall=131.0, busy=clock["busy"] + 20.0, own=clock["own"])  # others hold both cores
    assert threads.idle_cores() == 1  # at least one: the call must run somewhere


def test_idle_cores_on_a_real_machine_is_within_bounds() -> None:
    assert 1 <= threads.idle_cores() <= CORES


def test_nothing_in_the_package_writes_an_environment_variable() -> None:
    script = textwrap.dedent(
        """
        import importlib, os, pkgutil
        before = dict(os.environ)
        import numpy as np
        import nflow_np
        for module in pkgutil.walk_packages(nflow_np.__path__, "nflow_np."):
            if module.name != "nflow_np.__main__":
                importlib.import_module(module.name)
        import numba  # its pool exists: the thread plans and the flush mode set it up
        from nflow_np.architectures import build_model
        from nflow_np.optim import Adam
        nflow_np.set_backend("numpy")
        model = build_model("realnvp", 8, layers=2, hidden=(8,), dtype="float32")
        step = Adam(model, lr=1e-3)
        x = np.ones((64, 8), np.float32)
        model.nll_and_backward(x); step.step(); model.log_prob(x); model.sample(8)
        changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}
        assert not changed, changed
        """
    )
    environment = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(nflow_np.__file__).parents[1]),
                                                                 os.environ.get("PYTHONPATH", "")])}
    environment.pop("NFLOW_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
