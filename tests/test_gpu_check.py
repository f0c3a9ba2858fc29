"""The prepared GPU check (``benchmarks/gpu_check.sh``) runs end to end on a CPU under Numba's CUDA simulator.

So that the one run on a lent GPU cannot fail on a typo: the wrapper, every stage, the JSON and the table are
exercised here with tiny sizes. The numbers mean nothing on the simulator; the law results are still compared
with the NumPy reference, as on the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("numba", reason="the CUDA simulator ships with Numba")

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_under_the_simulator(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"NUMBA_ENABLE_CUDASIM": "1"}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--simulate", "--repeats", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["simulate"] is True
    for name in ("environment", "tests", "laws", "model"):
        assert results[name]["status"] == "ok", (name, results[name])
    assert "collected" in results["tests"]["summary"] or "tests/" in results["tests"]["summary"]
    laws = results["laws"]
    ran = {row["backend"] for row in laws["rows"]}
    assert ran | set(laws["unavailable"]) == {"numba-cuda", "cupy"}
    assert "numba-cuda" in ran  # the simulator always provides it
    for row in laws["rows"]:
        bound = 1e-5 if row["dtype"] == "float32" else 1e-12
        assert row["max_rel_error"] < bound, row
        assert row["ms"]["median"] > 0 and row["gb_s"] > 0
    assert {(r["op"], r["dtype"]) for r in laws["rows"]} == {
        (op, dtype) for op in ("forward", "backward") for dtype in ("float32", "float64")
    }
    model_rows = [r for r in results["model"]["rows"] if r["impl"] == "numba-cuda"]
    assert {(r["op"], r["dtype"]) for r in model_rows} == {
        (op, dtype) for op in ("train_step", "log_prob", "sample") for dtype in ("float32", "float64")
    }
    table = (tmp_path / "gpu_check.txt").read_text()
    assert "## laws: ok" in table and "numba-cuda" in table


def test_simulate_without_the_simulator_is_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "NUMBA_ENABLE_CUDASIM")}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--simulate", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert done.returncode == 2
    assert "NUMBA_ENABLE_CUDASIM=1" in done.stderr
