"""``nflow train`` honours every option typed or refuses it with the reason; honest resume; --force; preflight.

Errors are checked through the real ``python -m nflow_np`` in a subprocess: one line on stderr, exit
code 2, no traceback. Runs that must train are in process (``main``) and tiny.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nflow_np.cli import main
from nflow_np.io import load_model

TINY = "--epochs 2 --n-train 512 --n-val 256 --n-test 256 --layers 2 --hidden 8 --batch-size 128 --no-progress".split()
REPO = Path(__file__).resolve().parents[1]


def nflow(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m nflow_np ARGV`` in a subprocess with this checkout first on the path."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "nflow_np", *argv], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    for fragment in fragments:
        assert fragment in done.stderr


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["train", "--epoch", "2"], ["unrecognized arguments: --epoch 2"]),  # no abbreviations
        (["train", "--backend", "numpy"], ["go before the command"]),
        (["train", "--data", "digits", "--layers", "3"], ["--layers does not apply to image data (digits)"]),
        (["train", "--data", "digits", "--n-train", "100", "--clip-norm", "1"], ["--n-train, --clip-norm do not"]),
        (["train", "--data", "digits", "--lr-schedule", "constant"], ["image runs follow a cosine schedule"]),
        (["train", "--data", "digits", "--blocks", "2"], ["--blocks does not apply to --net mlp", "--net resnet"]),
        (["train", "--data", "digits", "--net", "mlp", "--channels", "8", "--blocks", "1"],
         ["--channels, --blocks do not apply to --net mlp"]),
        (["train", "--data", "digits", "--net", "resnet", "--hidden", "8"],
         ["--hidden does not apply to --net resnet", "--channels and --blocks"]),
        (["train", "--data", "mnist", "--model", "nice", "--net", "resnet"],
         ["--net does not apply to --model nice", "--model realnvp only"]),
        (["train", "--net", "resnet"], ["--net does not apply to toy data (two_moons)"]),
        (["train", "--data", "digits", "--net", "resnet", "--channels", "100000"],
         ["--channels/--blocks/--batch-size", "parameters needs about"]),
        (["train", "--weight-decay", "0.1"], ["--weight-decay does not apply to toy data (two_moons)"]),
        (["train", "--components", "2"], ["--components does not apply to toy data"]),
        (["train", "--model", "gmm", "--epochs", "5"], ["--epochs does not apply to --model gmm", "EM"]),
        (["train", "--model", "gmm", "--data", "digits"], ["--model gmm fits toy data"]),
        (["train", "--anchor-every", "2"], ["--anchor-every applies to --memory invert only"]),
        (["train", "--n-train", str(10**11)], ["the data", "of memory"]),
        (["train", "--hidden", "1000000,1000000"], ["--hidden/--layers", "parameters needs about"]),
        (["train", "--model", "gmm", "--components", "300", "--n-train", "256"], ["exceeds the 256 training points"]),
        (["train", "--out", "/proc/no-such-folder"], ["is not a writable folder"]),
        (["vi", "--target", "U1", "--dim", "3"], ["--dim applies to module:function", "U1 is a 2-D built-in target"]),
        (["vi", "--step", "3"], ["unrecognized arguments: --step 3"]),
        (["sample", "x", "--temp", "0.5"], ["unrecognized arguments: --temp 0.5"]),
    ],
)
def test_refusals_are_one_line_exit_2_and_give_the_reason(argv: list[str], fragments: list[str],
                                                          tmp_path: Path) -> None:
    out = [] if "--out" in argv else ["--out", str(tmp_path / "run")]
    assert_one_line_error(nflow(*argv, *out), *fragments)
    assert not (tmp_path / "run" / "model.json").exists()


def test_help_shows_the_defaults_that_apply_to_the_data_chosen() -> None:
    toy, digits, gmm = nflow("train", "--help"), nflow("train", "--data", "digits", "--help"), nflow(
        "train", "--model=gmm", "--help")
    squash = [" ".join(done.stdout.split()) for done in (toy, digits, gmm)]
    assert "maximum number of epochs (default for two_moons / realnvp: 100)" in squash[0]
    assert "rows per step (default for two_moons / realnvp: 256)" in squash[0]
    assert "maximum number of epochs (default for digits / realnvp: 150)" in squash[1]
    assert "rows per step (default for digits / realnvp: 64)" in squash[1]
    assert "floating-point type (default for digits / realnvp: float32)" in squash[1]
    assert "coupling layers (not for digits / realnvp)" in squash[1]
    assert "maximum number of epochs (not for two_moons / gmm)" in squash[2]
    resnet = " ".join(nflow("train", "--data", "digits", "--net", "resnet", "--help").stdout.split())
    assert "residual blocks per ResNet (not for digits / realnvp)" in squash[1]
    assert "RealNVP's coupling nets on images: MLPs, or the paper's convolutional ResNets (docs/conv.md) " \
        "(default for digits / realnvp: mlp)" in squash[1]
    assert "residual blocks per ResNet (default for digits / realnvp --net resnet: 2)" in resnet
    assert "feature maps of the ResNets (default for digits / realnvp --net resnet: 32)" in resnet
    assert "maximum number of epochs (default for digits / realnvp --net resnet: 40)" in resnet
    assert "widths of each coupling net (not for digits / realnvp --net resnet)" in resnet


def test_image_runs_take_every_typed_value_even_one_equal_to_a_toy_default(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    import nflow_np.image_training

    seen = {}

    def record(data: str, model: str, out: Path, **settings: object) -> dict:
        seen.update(settings, data=data, model=model)
        raise ValueError("stop here")

    monkeypatch.setattr(nflow_np.image_training, "train_image_model", record)
    argv = ["train", "--data", "digits", "--dtype", "float64", "--epochs", "100", "--batch-size", "256",
            "--lr", "0.002", "--no-progress", "--out", str(tmp_path / "digits")]
    assert main(argv) == 2
    assert (seen["dtype"], seen["epochs"], seen["batch_size"], seen["lr"]) == ("float64", 100, 256, 0.002)
    assert seen["hidden"] == (128, 128) and seen["patience"] == 30  # the rest is the recipe's


def test_resume_lengthens_the_run_and_refuses_other_changes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--no-plots", "--checkpoint-every", "2", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 1
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--layers", "3"]) == 2
    assert "--layers 3 differs from the resumed run's 2; leave it out" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--hidden", "8", "--epochs", "3", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 3 and summary["steps"] == 3 * (512 // 128)
    assert summary["arguments"]["epochs"] == 3
    assert main(["train", "--resume", str(out), "--force"]) == 2
    assert "--force starts a fresh run" in capsys.readouterr().err


def test_a_fresh_run_into_a_runs_folder_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--no-plots", "--out", str(out)]) == 0
    first = load_model(out).state_dict()
    capsys.readouterr()
    assert main(["train", *TINY, "--no-plots", "--seed", "1", "--out", str(out)]) == 2
    assert "already holds a model (model.json, model.safetensors); pass --force" in capsys.readouterr().err
    assert main(["train", "--model", "gmm", "--components", "1", "--n-train", "300", "--force", "--out",
                 str(out)]) == 2
    assert "a mixed folder" in capsys.readouterr().err
    assert main(["train", *TINY, "--no-plots", "--seed", "1", "--force", "--out", str(out)]) == 0
    second = load_model(out).state_dict()
    assert any((first[name] != second[name]).any() for name in first)


def test_force_replaces_an_earlier_runs_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--no-plots", "--checkpoint-every", "3", "--out", str(out)]) == 0
    assert main(["train", *TINY, "--no-plots", "--force", "--seed", "2", "--out", str(out)]) == 0
    assert not (out / "checkpoints").exists() and not (out / ".replaced-checkpoints").exists()


def test_provenance_is_printed_and_saved(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["--threads", "1", "train", *TINY, "--no-plots", "--out", str(out)]) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    summary = json.loads((out / "summary.json").read_text())
    record = summary["provenance"]
    assert summary["backend"] == record["backend"] is not None
    assert record["dtype"] == "float64" and record["threads"] == 1 and record["versions"]["numpy"]
    assert first_line.startswith(f"nflow: backend {record['backend']}, float64, 1 BLAS thread, ")
    assert f"numpy {record['versions']['numpy']}" in first_line
    version = nflow("--version")
    assert version.returncode == 0 and version.stdout.startswith("nflow_np ")


def test_sample_reads_a_mixture_folder(tmp_path: Path) -> None:
    out = tmp_path / "gmm"
    assert main(["train", "--model", "gmm", "--components", "1,2", "--n-train", "300", "--n-val", "100",
                 "--n-test", "100", "--out", str(out)]) == 0
    assert main(["sample", str(out), "-n", "7", "--out", str(tmp_path / "s.csv")]) == 0
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 8  # header + rows
    assert_one_line_error(nflow("sample", str(out), "--temperature", "0.5"), "--temperature applies to flow models")


def test_sizes_that_cannot_fit_are_refused_before_sampling(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--no-plots", "--out", str(out)]) == 0
    assert_one_line_error(nflow("sample", str(out), "-n", str(10**12)), "-n: drawing 1000000000000 samples")


def test_a_memory_error_anywhere_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                            tmp_path: Path) -> None:
    import nflow_np.density

    def exhausted(*args: object, **kwargs: object) -> None:
        raise MemoryError("Unable to allocate 8 TiB")

    monkeypatch.setattr(nflow_np.density, "load_toy", exhausted)
    assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("nflow train: error: out of memory (Unable to allocate 8 TiB)") and error.count("\n") == 1


def test_a_second_writer_into_a_runs_folder_is_refused_naming_the_first(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    import socket

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a live writer
    try:
        (out / ".nflow.lock").write_text(f"{holder.pid} {socket.gethostname()}\n")
        assert main(["train", *TINY, "--no-plots", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"is in use by process {holder.pid}" in err and err.count("\n") == 1
        assert sorted(p.name for p in out.iterdir()) == [".nflow.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock is reclaimed, the run goes ahead and releases the lock at the end
    assert main(["train", *TINY, "--no-plots", "--out", str(out)]) == 0
    assert load_model(out) is not None and not (out / ".nflow.lock").exists()


class Interrupted(Exception):
    """Stands in for the process dying."""


def interrupt_at_step(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    from nflow_np.optim import Optimizer

    real = Optimizer.step

    def step(self: Optimizer) -> None:
        if self.step_count + 1 == at:
            raise Interrupted
        real(self)

    monkeypatch.setattr(Optimizer, "step", step)


def test_a_half_finished_runs_folder_refuses_a_fresh_run_without_checkpoints(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             capsys: pytest.CaptureFixture) -> None:
    """Issue 14: a fresh run without --checkpoint-every wrote its model beside a half-finished run's checkpoints."""
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 6)
        with pytest.raises(Interrupted):
            main(["train", *TINY, "--no-plots", "--checkpoint-every", "2", "--out", str(out)])
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    capsys.readouterr()
    assert main(["train", *TINY, "--no-plots", "--out", str(out)]) == 2
    assert "already holds checkpoints of a run (checkpoints/); pass --force" in capsys.readouterr().err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert main(["train", "--resume", str(out), "--no-plots", "--no-progress"]) == 0  # still resumable
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("checkpoint-000000004.npz")
    # --force: until the new model is published the old one stays, loadable and unchanged
    old = load_model(out).state_dict()
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 3)
        with pytest.raises(Interrupted):
            main(["train", *TINY, "--no-plots", "--seed", "4", "--force", "--out", str(out)])
    for name, value in load_model(out).state_dict().items():
        np.testing.assert_array_equal(value, old[name])


def test_resume_detects_a_typed_value_equal_to_the_default(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 14: --lr 0.002 (the default) on a run started with --lr 0.01 was accepted and ignored; so was
    --epochs 100 (the default) on a shorter run."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--lr", "0.01", "--patience", "0", "--no-plots",
                 "--checkpoint-every", "4", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--lr", "0.002"]) == 2
    assert "--lr 0.002 differs from the resumed run's 0.01; leave it out" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--epochs", "100", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 100 and summary["steps"] == 100 * (512 // 128)


def test_eval_and_sample_of_a_hostile_mixture_folder_are_one_line_errors(tmp_path: Path) -> None:
    """Issue 14: a FIFO in place of summary.json hung ``nflow eval``; a link was followed; bad JSON a traceback."""
    out = tmp_path / "gmm"
    assert main(["train", "--model", "gmm", "--components", "1,2", "--n-train", "300", "--n-val", "100",
                 "--n-test", "100", "--out", str(out)]) == 0
    summary = (out / "summary.json").read_text()
    (out / "summary.json").unlink()
    os.mkfifo(out / "summary.json")  # reading it naively blocks forever
    assert_one_line_error(nflow("eval", str(out)), "summary.json", "not a regular file")
    assert_one_line_error(nflow("sample", str(out), "-n", "3"), "not a regular file")
    (out / "summary.json").unlink()
    (tmp_path / "elsewhere.json").write_text(summary)
    (out / "summary.json").symlink_to(tmp_path / "elsewhere.json")
    assert_one_line_error(nflow("eval", str(out)), "is a symbolic link")
    (out / "summary.json").unlink()
    (out / "summary.json").write_text("[" * 100 + "]" * 100)
    assert_one_line_error(nflow("eval", str(out)), "summary.json")
