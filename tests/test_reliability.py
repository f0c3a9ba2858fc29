"""Real training processes killed with SIGKILL, then resumed; and the same numbers from every process.

The processes run ``nflow train`` through a small launcher that only slows them down (a sleep in
every optimizer step and every fsync) so that a kill lands mid-run, or pauses one right before a
checkpoint's rename; the numbers they compute are untouched. The uninterrupted reference runs in
this process, so the comparison also checks that separate processes compute identical numbers.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nflow_np.architectures import build_model
from nflow_np.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from nflow_np.cli import main
from nflow_np.data import load_toy
from nflow_np.io import load_model
from nflow_np.optim import Adam
from nflow_np.train import fit

# 512 / 32 = 16 steps per epoch, 64 steps in all
RUN = (
    "train --data two_moons --epochs 4 --n-train 512 --n-val 128 --n-test 64 --layers 2 --hidden 8 "
    "--batch-size 32 --lr 0.005 --lr-schedule cosine --seed 5 --no-progress --no-plots"
).split()

LAUNCHER = """
import os, sys, time
from pathlib import Path

import nflow_np.files.folders
import nflow_np.optim
from nflow_np.cli import main

step, fsync, replace = nflow_np.optim.Optimizer.step, os.fsync, os.replace
step_delay, fsync_delay = float(os.environ["STEP_DELAY"]), float(os.environ.get("FSYNC_DELAY", 0))
pause_before = os.environ.get("PAUSE_BEFORE_PUBLISHING")
pause_after_swap = os.environ.get("PAUSE_AFTER_SWAPPING")

def slow_step(self):
    time.sleep(step_delay)
    step(self)

def slow_fsync(fd):
    time.sleep(fsync_delay)
    fsync(fd)

def paused_replace(source, target):
    if Path(target).name == pause_before:
        Path(os.environ["MARKER"]).write_text(str(source))
        time.sleep(600)
    replace(source, target)

def paused_exchange(a, b):
    swapped = exchange(a, b)
    if swapped and str(b) == pause_after_swap:  # the new folder is in place; whatever comes next has not run
        Path(os.environ["MARKER"]).write_text(str(b))
        time.sleep(600)
    return swapped

nflow_np.optim.Optimizer.step = slow_step
os.fsync = slow_fsync
os.replace = paused_replace
exchange = nflow_np.files.folders.exchange
nflow_np.files.folders.exchange = paused_exchange
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Final parameters of the uninterrupted run, computed in this process without checkpoints."""
    out = tmp_path_factory.mktemp("reference")
    assert main([*RUN, "--out", str(out)]) == 0
    return load_model(out).state_dict()


def launch(tmp_path: Path, argv: list[str], **environment: str) -> subprocess.Popen:
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    env = os.environ | {"STEP_DELAY": "0.005"} | environment
    return subprocess.Popen(
        [sys.executable, str(launcher), *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def wait_for(condition, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the process ended (rc {process.returncode}): {process.stderr.read().decode()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.002)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def assert_final_parameters(out: Path, reference: dict[str, np.ndarray]) -> None:
    final = load_model(out).state_dict()
    assert final.keys() == reference.keys()
    for name, value in reference.items():
        np.testing.assert_array_equal(final[name], value, err_msg=name)


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_parameters(tmp_path, reference):
    out = tmp_path / "run"
    process = launch(tmp_path, [*RUN, "--out", str(out), "--checkpoint-every", "5"])
    wait_for(lambda: (out / "checkpoints" / "checkpoint-000000020.npz").exists(), process)
    kill(process)  # somewhere after step 20, well before step 64
    assert not (out / "model.json").exists(), "the run finished before it was killed"
    newest = load_checkpoint(list_checkpoints(out / "checkpoints")[0])
    assert 20 <= newest.state.steps < 64 and not newest.state.finished

    assert main(["train", "--resume", str(out), "--no-progress", "--no-plots"]) == 0
    assert_final_parameters(out, reference)


def test_sigkill_while_a_checkpoint_is_written_leaves_the_previous_one_intact(tmp_path, reference):
    out = tmp_path / "run"
    marker = tmp_path / "paused"
    process = launch(
        tmp_path,
        [*RUN, "--out", str(out), "--checkpoint-every", "5"],
        PAUSE_BEFORE_PUBLISHING="checkpoint-000000010.npz",
        MARKER=str(marker),
    )
    wait_for(marker.exists, process)
    temporary = Path(marker.read_text())  # written and fsync'ed, not yet renamed
    assert temporary.exists() and temporary.parent == out / "checkpoints"
    previous = out / "checkpoints" / "checkpoint-000000005.npz"
    before = previous.read_bytes()
    kill(process)

    assert list_checkpoints(out / "checkpoints") == [previous]
    assert previous.read_bytes() == before
    assert load_checkpoint(previous).state.steps == 5
    assert main(["train", "--resume", str(out), "--no-progress", "--no-plots"]) == 0
    assert not temporary.exists()
    assert_final_parameters(out, reference)


def test_repeated_sigkill_at_random_moments_never_loses_a_checkpoint(tmp_path, reference):
    out = tmp_path / "run"
    chance = random.Random(7)
    slow = {"FSYNC_DELAY": "0.01"}  # most of the run is spent inside checkpoint writes
    starts = 0
    for _ in range(4):
        resume = bool(list_checkpoints(out / "checkpoints"))
        argv = (
            ["train", "--resume", str(out), "--no-progress", "--no-plots"]
            if resume
            else [*RUN, "--out", str(out), "--checkpoint-every", "2"]
        )
        process = launch(tmp_path, argv, **slow)
        starts += 1
        time.sleep(chance.uniform(0.3, 1.2))
        if process.poll() is not None:
            break
        kill(process)
        for path in list_checkpoints(out / "checkpoints"):
            load_checkpoint(path)  # every published checkpoint is whole
    else:
        resume = bool(list_checkpoints(out / "checkpoints"))
        argv = (
            ["train", "--resume", str(out), "--no-progress", "--no-plots"]
            if resume
            else [*RUN, "--out", str(out), "--checkpoint-every", "2"]
        )
        process = launch(tmp_path, argv, **slow)
    assert process.wait(timeout=120) == 0, process.stderr.read().decode()
    assert starts > 1
    assert_final_parameters(out, reference)


def test_sigkill_right_after_the_publish_finds_the_model_beside_its_own_summary(tmp_path):
    """Issue 14: the model folder was published, then summary.json and the plots written after it; a SIGKILL
    between the two left the new model beside the previous run's summary."""
    out = tmp_path / "run"
    assert main([*RUN, "--out", str(out)]) == 0  # the previous run (seed 5)
    old_summary = json.loads((out / "summary.json").read_text())
    marker = tmp_path / "swapped"
    with_plots = [word for word in RUN if word != "--no-plots"]
    process = launch(tmp_path, [*with_plots, "--seed", "6", "--force", "--out", str(out)],
                     PAUSE_AFTER_SWAPPING=os.path.abspath(out), MARKER=str(marker))
    wait_for(marker.exists, process, timeout=120)
    kill(process)  # the new folder is in place; nothing after the swap has run

    config = json.loads((out / "model.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    load_model(out)  # loads
    assert config["metadata"]["seed"] == 6 and summary["arguments"]["seed"] == 6 != old_summary["arguments"]["seed"]
    assert summary["model_sha256"] == config["sha256"]
    assert summary["test_nll"] == config["metadata"]["test_nll"]
    assert (out / "density.png").exists() and (out / "samples.png").exists()


# 1347 // 128 = 10 steps per epoch, a checkpoint after each: checkpoint-000000010.npz ... -000000040.npz
IMAGE_RUN = ["train", "--data", "digits", "--model", "realnvp", "--hidden", "16", "--epochs", "4",
             "--batch-size", "128", "--no-progress"]


def test_sigkill_during_an_image_run_leaves_a_checkpoint_that_resumes_bit_for_bit(tmp_path):
    reference = tmp_path / "reference"
    assert main([*IMAGE_RUN, "--out", str(reference)]) == 0
    out = tmp_path / "run"
    process = launch(tmp_path, [*IMAGE_RUN, "--out", str(out), "--checkpoint-every", "1"], STEP_DELAY="0.05")
    wait_for(lambda: (out / "checkpoints" / "checkpoint-000000010.npz").exists(), process, timeout=120)
    kill(process)  # in epoch 2, 3 or 4: each of its 30 steps takes 50 ms or more
    assert not (out / "model.json").exists(), "the run finished before it was killed"
    newest = load_checkpoint(list_checkpoints(out / "checkpoints")[0])
    assert 10 <= newest.state.steps < 40 and not newest.state.finished and newest.state.noise

    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert_final_parameters(out, load_model(reference).state_dict())


def test_separate_processes_write_identical_files(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "nflow_np", *RUN, "--dtype", "float32", "--out", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for out in runs
    ]
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read().decode()
    first, second = ((out / "model.safetensors").read_bytes() for out in runs)
    assert first == second
    assert load_model(runs[0]).dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_seed_backend_and_dtype_give_the_same_numbers(dtype):
    def numbers(seed: int) -> list[np.ndarray]:
        data = load_toy("checkerboard", n_train=256, n_val=64, n_test=64, seed=seed, dtype=dtype)
        model = build_model("realnvp", 2, layers=2, hidden=(8,), dtype=dtype, seed=seed)
        result = fit(
            model,
            data.train,
            data.val,
            optimizer=Adam(model, lr=1e-2),
            epochs=3,
            batch_size=32,
            seed=seed,
            lr_schedule="cosine",
            progress=False,
        )
        samples = model.sample(32, np.random.default_rng(seed), temperature=0.7)
        return [*model.state_dict().values(), model.log_prob(data.test), samples, np.array(result.best_val_nll)]

    first, second, other = numbers(1), numbers(1), numbers(2)
    for a, b in zip(first, second, strict=True):
        assert a.dtype == b.dtype and (a.dtype == dtype or a.ndim == 0)
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[-2], other[-2])  # the seed matters, so equality above is not vacuous


# -- the command line around checkpoints and divergence (in process) ---------------------------------------------
def test_resume_refuses_changed_arguments_and_missing_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--resume", str(out)]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert main([*RUN, "--epochs", "1", "--out", str(out), "--checkpoint-every", "5"]) == 0
    assert main(["train", "--resume", str(out), "--lr", "0.1", "--no-progress"]) == 2
    assert "--lr 0.1 differs from the resumed run's 0.005; leave it out" in capsys.readouterr().err
    assert main([*RUN, "--epochs", "1", "--out", str(out), "--checkpoint-every", "5"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_with_hostile_arguments(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*RUN, "--epochs", "1", "--out", str(out), "--checkpoint-every", "5"]) == 0
    checkpoint = load_checkpoint(list_checkpoints(out / "checkpoints")[0])
    arguments = checkpoint.metadata["arguments"] | {"data": "--out=/etc", "layers": "2 --seed=9"}
    optimizer = Adam(checkpoint.model, lr=0.005)
    optimizer.load_state_dict(checkpoint.optimizer_state)
    save_checkpoint(
        out / "checkpoints",
        checkpoint.model,
        optimizer,
        checkpoint.state,
        checkpoint.run,
        lr=0.005,
        backend="numpy",
        metadata={"arguments": arguments},
    )
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "its recorded arguments do not parse" in error and "invalid choice: '--out=/etc'" in error


@pytest.fixture
def outlier_data(monkeypatch):
    """Make the toy data of `nflow train` hold one finite row so far out that its batch loss is inf."""
    import nflow_np.density

    load_toy = nflow_np.density.load_toy

    def with_outlier(*args, **kwargs):
        splits = load_toy(*args, **kwargs)
        splits.train[7] = 1e200
        return splits

    monkeypatch.setattr(nflow_np.density, "load_toy", with_outlier)


def test_cli_divergence_exits_1_and_keeps_the_last_checkpoint(tmp_path, capsys, outlier_data):
    out = tmp_path / "run"
    assert main([*RUN, "--out", str(out), "--checkpoint-every", "1"]) == 1
    error = capsys.readouterr().err
    newest = list_checkpoints(out / "checkpoints")[0]
    assert "training diverged: non-finite loss (inf)" in error and str(newest) in error
    assert "learning rate" in error and "--skip-nonfinite" in error
    assert load_checkpoint(newest).state.steps >= 0 and not (out / "model.json").exists()


def test_cli_skip_nonfinite_counts_the_skipped_batches(tmp_path, capsys, outlier_data):
    out = tmp_path / "run"
    assert main([*RUN, "--out", str(out), "--skip-nonfinite"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    skipped = summary["skipped_batches"]
    assert skipped == sum(entry["skipped"] for entry in summary["history"]) > 0
    assert f"skipped {skipped} non-finite batches" in capsys.readouterr().out
    assert summary["steps"] == 4 * 16 - skipped
    assert summary["train_nll"] is None and np.isfinite(summary["test_nll"])  # the outlier's density overflows
