"""Smoke tests of the benchmark suite (``python -m benchmarks``): it runs, and its JSON is well formed.

No timing is asserted anywhere: the figures depend on the machine and its load. What is checked is
the shape of the results: every section present, every figure finite and positive with its median
between its min and max, the PyTorch columns present exactly when PyTorch is, and the plots written.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from benchmarks import sections, suite
from nflow_np import cli
from nflow_np.backend import get_backend

HAS_TORCH = importlib.util.find_spec("torch") is not None
RATIOS = ("percent_of_copy", "percent_of_peak", "step_over_gemms", "speedup_vs_torch", "slowdown", "peak_mib")


def figures(node: object, path: str = "") -> list[tuple[str, dict]]:
    """Every ``{"median", "min", "max"}`` dict under ``node``, with where it was found."""
    if isinstance(node, dict):
        found = [(path, node)] if {"median", "min", "max"} <= node.keys() else []
        return found + [f for key, value in node.items() for f in figures(value, f"{path}/{key}")]
    if isinstance(node, list):
        return [f for i, value in enumerate(node) for f in figures(value, f"{path}[{i}]")]
    return []


def rows(results: dict) -> list[dict]:
    return [row for section in results["sections"].values() for row in section.get("rows", [])]


def check_well_formed(results: dict, sections: list[str]) -> None:
    assert list(results["sections"]) == sections
    assert results["machine"]["cores"] >= 1 and results["machine"]["numpy"]
    assert len(results["load_average"]["before"]) == len(results["load_average"]["after"]) == 3
    found = figures(results["sections"])
    assert found
    for where, f in found:
        values = (f["median"], f["min"], f["max"])
        assert all(math.isfinite(v) and v > 0 for v in values), (where, f)
        assert f["min"] <= f["median"] <= f["max"], (where, f)
    for row in rows(results):
        if row.get("backend") == "torch.compile" and "error" in row:
            continue  # PyTorch's compiler needs a working C++ toolchain: its failure is PyTorch's, reported in the row
        assert "error" not in row, row
        assert "ms" in row, row
        for key in RATIOS:
            if key in row:
                assert math.isfinite(row[key]) and row[key] > 0, (key, row)


def run_suite(tmp_path: Path, *argv: str) -> dict:
    backend = get_backend()
    assert suite.main(["--smoke", "--out", str(tmp_path), *argv]) == 0
    assert get_backend() == backend  # the suite puts the backend back
    return json.loads((tmp_path / "results.json").read_text())


def test_smoke_suite_writes_well_formed_results_and_plots(tmp_path: Path) -> None:
    results = run_suite(tmp_path)
    check_well_formed(results, list(suite.SECTIONS))
    impls = {row.get("impl", row.get("backend")) for row in rows(results)}
    assert {"numpy", "GEMMs alone"} <= impls
    assert ("torch" in impls) == HAS_TORCH
    assert ("numba" in impls) == (sections.numba_ready() is None)
    train = results["sections"]["train"]
    assert all(len(s["ms"]) == len(train["batch_sweep"]["batches"]) for s in train["batch_sweep"]["series"])
    assert set(results["sections"]["subnormal"]["flush_flags"]) == {"daz", "ftz"}
    assert (tmp_path / "table.txt").read_text().startswith("nflow_np benchmarks (quick)")
    for name in ("summary.png", "batch-sweep.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suite_runs_without_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    monkeypatch.delitem(sys.modules, f"{suite.__package__}.torch_reference", raising=False)
    results = run_suite(tmp_path, "--sections", "sample", "train", "--repeats", "1", "--no-plots")
    check_well_formed(results, ["train", "sample"])
    assert results["machine"]["torch"] is None
    assert all(row["impl"] != "torch" and "speedup_vs_torch" not in row for row in rows(results))
    assert not (tmp_path / "summary.png").exists()


def test_bad_arguments_return_2(capsys: pytest.CaptureFixture) -> None:
    assert suite.main(["--sections", "nothing"]) == 2
    assert suite.main(["--threads", "0"]) == 2
    assert suite.main(["--help"]) == 0
    assert "--quick" in capsys.readouterr().out


def test_nflow_bench_forwards_every_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    received = []
    monkeypatch.setattr(suite, "main", lambda argv: received.append(argv) or 0)
    argv = ["--quick", "--out", "x", "--threads", "2", "--help"]
    assert cli.main(["bench", *argv]) == 0
    assert received == [argv]
