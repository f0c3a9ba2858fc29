"""The ``nflow`` command (nflow_np/cli.py), run in-process on a tiny training run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nflow_np.cli import TRAIN_DEFAULTS, build_parser, main
from nflow_np.cli_options import resolve_train
from nflow_np.io import load_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = "--epochs 2 --n-train 512 --n-val 256 --n-test 256 --layers 2 --hidden 16 --batch-size 128 --no-progress".split()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "moons"
    assert main(["train", "--data", "two_moons", *TINY, "--out", str(out)]) == 0
    return out


def test_train_writes_model_summary_and_plots(run: Path, capsys: pytest.CaptureFixture) -> None:
    files = sorted(p.name for p in run.iterdir())
    assert files == ["density.png", "model.json", "model.safetensors", "samples.png", "summary.json"]
    for picture in ("density.png", "samples.png"):
        assert (run / picture).read_bytes().startswith(PNG_SIGNATURE)

    summary = json.loads((run / "summary.json").read_text())
    keys = (
        "data model arguments n_params train_nll val_nll test_nll best_epoch steps train_seconds stopped_early history"
    )
    assert set(keys.split()) <= summary.keys()
    assert (summary["data"], summary["model"]) == ("two_moons", "realnvp")
    assert summary["arguments"]["hidden"] == [16] and summary["arguments"]["epochs"] == 2
    assert summary["steps"] == 2 * (512 // 128) and len(summary["history"]) == 2
    assert summary["n_params"] == load_model(run).num_parameters()
    assert all(np.isfinite(summary[key]) for key in ("train_nll", "val_nll", "test_nll"))


def test_eval_reproduces_the_test_nll(run: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    printed = capsys.readouterr().out
    test_nll = json.loads((run / "summary.json").read_text())["test_nll"]
    assert f"test NLL {test_nll:.4f} nats on two_moons (256 points, seed 0)" in printed

    assert main(["eval", str(run), "--data", "circles", "--n-test", "100", "--seed", "3"]) == 0
    assert "on circles (100 points, seed 3)" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_sample_writes_reproducible_samples(run: Path, tmp_path: Path, suffix: str) -> None:
    paths = [tmp_path / f"a{suffix}", tmp_path / "sub" / f"b{suffix}"]
    for path in paths:
        assert main(["sample", str(run), "-n", "50", "--seed", "4", "--temperature", "0.8", "--out", str(path)]) == 0
    read = np.load if suffix == ".npy" else lambda p: np.loadtxt(p, delimiter=",", skiprows=1)
    first, second = (read(p) for p in paths)
    assert first.shape == (50, 2) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)
    expected = load_model(run).sample(50, np.random.default_rng(4), temperature=0.8)
    np.testing.assert_array_equal(first, expected)  # csv keeps 17 significant digits: exact


def test_sample_png_is_for_image_models(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sample", str(run), "--out", str(tmp_path / "grid.png")]) == 2
    assert "a PNG grid is for image models" in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()
    assert main(["sample", str(run), "--out", str(tmp_path / "x.txt")]) == 2
    assert "--out must end in .npy, .csv or .png" in capsys.readouterr().err


def test_the_parser_leaves_out_what_was_not_typed_and_resolve_fills_the_defaults() -> None:
    given = {k: v for k, v in vars(build_parser().parse_args(["train", "--epochs", "100"])).items()
             if k not in ("handler", "command", "backend", "threads")}
    assert given == {"epochs": 100}  # typed, even though it equals the default
    options = resolve_train(given)
    for key, value in TRAIN_DEFAULTS.items():
        assert options[key] == value, key


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data", "no_such_data"], "invalid choice: 'no_such_data'"),
        (["train", "--epochs", "0"], "--epochs: expected an integer >= 1, got '0'"),
        (["train", "--hidden", "64,x"], "--hidden: expected comma-separated positive widths"),
        (["train", "--lr", "-1"], "--lr: expected a number > 0"),
        (["train", "--model", "glow"], "invalid choice: 'glow'"),
        (["train", *TINY, "--batch-size", "1000"], "batch_size must be between 1 and the 512 training rows"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "required"),
        (["eval", "/no/such/model"], "/no/such/model does not exist: train one first with `nflow train --out"),
        (["sample", "/no/runs/digits-realnvp"], "train one first with `nflow train --data digits --model realnvp`"),
        (["sample", "/no/such/model", "--out", "x.txt"], "--out must end in .npy, .csv or .png"),
    ],
)
def test_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    assert main([*argv, *(["--out", str(tmp_path / "o")] if argv[:1] == ["train"] else [])]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_eval_of_a_damaged_model_exits_2(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "model.json").write_text((run / "model.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes()[:100])
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a readable .safetensors file" in capsys.readouterr().err


def test_help_returns_0(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--help"]) == 0
    assert "--lr-schedule" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "nflow_np", "eval", "/no/such/model"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.startswith("nflow eval: error:") and "Traceback" not in done.stderr


def test_backend_flag_selects_and_refuses_clearly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from nflow_np import backend

    with backend.using(backend.get_backend()):  # whatever the flags below select is undone after
        argv = ["--backend", "numba", "train", "--epochs", "1", "--n-train", "300", "--layers", "2", "--hidden", "8",
                "--no-progress", "--no-plots", "--out", str(tmp_path / "run")]
        assert main(argv) == 0
        assert backend.get_backend() == "numba"
        assert main(["--backend", "cupy", "eval", str(tmp_path / "run")]) == 2
        assert "cupy" in capsys.readouterr().err


def test_train_with_memory_invert_matches_the_standard_run(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "inverted"
    argv = ["train", "--data", "two_moons", *TINY, "--memory", "invert", "--anchor-every", "2", "--no-plots"]
    assert main([*argv, "--out", str(out)]) == 0
    inverted = json.loads((out / "summary.json").read_text())["test_nll"]
    assert inverted == pytest.approx(json.loads((run / "summary.json").read_text())["test_nll"], rel=1e-9)
    assert main(["train", *TINY, "--anchor-every", "2", "--out", str(tmp_path / "refused")]) == 2


def test_a_missing_optional_package_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    import nflow_np.cli_commands as cli

    def missing(*args: object, **kwargs: object) -> None:
        raise ImportError("this data set ships with the optional package scikit-learn: pip install scikit-learn")

    monkeypatch.setattr(cli, "_train_images", missing)
    assert main(["train", "--data", "digits", "--no-progress", "--out", str(tmp_path / "digits")]) == 2
    assert "pip install scikit-learn" in capsys.readouterr().err
