"""Resumable image runs (``nflow train --data digits --checkpoint-every N`` / ``--resume``), in process.

An interruption is an exception raised from inside the run (an optimizer step, or the validation of an
epoch), after which the resumed run starts from fresh objects, as a new process would. The digits have
1,347 training images: at ``--batch-size 128`` an epoch is 10 steps, so the checkpoint of epoch ``e``
is ``checkpoint-<10·e>.npz``. Real processes killed with SIGKILL: tests/test_reliability.py; under
mpiexec: tests/test_distributed.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import nflow_np.train
from nflow_np.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from nflow_np.cli import main
from nflow_np.image_models import ImageFlowModel
from nflow_np.image_training import train_image_model
from nflow_np.io import load_model
from nflow_np.optim import Optimizer

STEPS_PER_EPOCH = 1347 // 128
SMALL = {
    "nice": ["--model", "nice", "--hidden", "16"],
    "realnvp": ["--model", "realnvp", "--hidden", "16"],
    "realnvp_resnet": ["--model", "realnvp", "--net", "resnet", "--channels", "4", "--blocks", "1"],
}


def command(kind: str, *more: str) -> list[str]:
    return ["train", "--data", "digits", *SMALL[kind], "--batch-size", "128", "--no-progress", *more]


class Interrupted(Exception):
    """Stands in for the process dying."""


def interrupt(monkeypatch: pytest.MonkeyPatch, where: str, at: int) -> None:
    """Raise :class:`Interrupted` at the ``at``-th step of an optimizer, or the ``at``-th validation (``where``).

    Steps are counted per optimizer, so the one step the command line takes to compile the kernels
    (on a copy of the model, with an optimizer of its own) is not one of them.
    """
    count = [0]
    if where == "step":
        real = Optimizer.step

        def step(self: Optimizer) -> None:
            if self.step_count + 1 == at:
                raise Interrupted
            real(self)

        monkeypatch.setattr(Optimizer, "step", step)
    else:
        real_nll = nflow_np.train.evaluate_nll

        def validation(*args: object, **kwargs: object) -> float:
            count[0] += 1
            if count[0] == at:
                raise Interrupted
            return real_nll(*args, **kwargs)

        monkeypatch.setattr(nflow_np.train, "evaluate_nll", validation)


def numbers(summary: dict) -> dict:
    """What a run computed: its summary without the wall-clock times and paths."""
    clock = ("seconds", "epoch_seconds")
    drop = ("train_seconds", "provenance", "resumed_from", "checkpoint", "history")
    kept = {key: value for key, value in summary.items() if key not in drop}
    return kept | {"history": [{k: v for k, v in entry.items() if k not in clock} for entry in summary["history"]]}


def assert_same_model(a: Path, b: Path) -> None:
    first, second = load_model(a).state_dict(), load_model(b).state_dict()
    assert first.keys() == second.keys()
    for name, value in first.items():
        np.testing.assert_array_equal(second[name], value, err_msg=name)


@pytest.mark.parametrize(("kind", "where", "at"), [
    ("nice", "step", 2 * STEPS_PER_EPOCH + 4),  # in the middle of epoch 3
    ("nice", "validation", 2),  # after epoch 2's last step and checkpoint, in its validation
    ("realnvp", "step", 2 * STEPS_PER_EPOCH + 4),  # batch norms: running averages, recalibration
    ("realnvp_resnet", "step", 2 * STEPS_PER_EPOCH + 1),
])
def test_a_resumed_image_run_is_the_uninterrupted_run_bit_for_bit(tmp_path, monkeypatch, kind, where, at):
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(command(kind, "--epochs", "4", "--out", str(reference))) == 0
    with monkeypatch.context() as patch:
        interrupt(patch, where, at)
        with pytest.raises(Interrupted):
            main(command(kind, "--epochs", "4", "--checkpoint-every", "1", "--out", str(run)))
    assert not (run / "model.json").exists()
    newest = list_checkpoints(run / "checkpoints")[0]
    assert newest.name == f"checkpoint-{2 * STEPS_PER_EPOCH:09d}.npz"

    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_model(reference, run)
    resumed, uninterrupted = (json.loads((path / "summary.json").read_text()) for path in (run, reference))
    assert resumed["resumed_from"] == str(newest) and uninterrupted["resumed_from"] is None
    assert numbers(resumed) == numbers(uninterrupted)  # test NLL, history, best epoch, steps, settings
    assert [entry["lr"] for entry in resumed["history"]] == [entry["lr"] for entry in uninterrupted["history"]]


def test_an_image_checkpoint_holds_everything_the_run_depends_on(tmp_path):
    train_image_model("digits", "realnvp", tmp_path, hidden=(8,), epochs=2, batch_size=128, checkpoint_every=1,
                      metadata={"arguments": {"note": "x"}})
    checkpoint = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])  # the one of epoch 1
    state = checkpoint.state
    assert (state.epoch, state.batch, state.steps) == (1, STEPS_PER_EPOCH, STEPS_PER_EPOCH)
    assert checkpoint.optimizer["kind"] == "adam" and int(checkpoint.optimizer_state["step"]) == STEPS_PER_EPOCH
    running = [name for name in checkpoint.model.state_dict() if "running_" in name]
    assert running and set(running) <= set(state.best_params)  # batch-norm averages, current and best
    assert len(state.noise) == 1 and state.noise[0]["bit_generator"] == "PCG64"  # the dequantisation stream
    assert state.seconds > 0 and checkpoint.metadata == {"arguments": {"note": "x"}}
    final = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[0]).state
    assert final.finished and [entry["epoch"] for entry in final.history] == [1, 2]
    assert all({"lr", "epoch_seconds"} <= set(entry) for entry in final.history)


def test_a_checkpoint_without_the_noise_state_of_an_image_model_is_refused(tmp_path, monkeypatch):
    import nflow_np.checkpoint

    train_image_model("digits", "nice", tmp_path, hidden=(8,), epochs=1, batch_size=128, checkpoint_every=1)
    monkeypatch.setattr(nflow_np.checkpoint, "noise_states", lambda model: None)  # as files written before it
    train_image_model("digits", "nice", tmp_path / "old", hidden=(8,), epochs=1, batch_size=128, checkpoint_every=1)
    assert load_checkpoint(list_checkpoints(tmp_path / "old" / "checkpoints")[0]).state.noise is None
    with pytest.raises(ValueError, match="layers drawing noise, the file records the state of none"):
        train_image_model("digits", "nice", tmp_path / "old", hidden=(8,), epochs=2, batch_size=128, resume=True)
    path = list_checkpoints(tmp_path / "checkpoints")[0]
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = json.loads(arrays["meta"].tobytes())
    meta["state"]["noise"] = [{"bit_generator": "PCG64", "state": "hostile"}]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match=r"state\.noise is not a PCG64 state"):
        load_checkpoint(path)


class StepClock:
    """A ``time`` module whose clock reads the optimizer steps taken in this "process": one second each."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps = 0
        step = nflow_np.train.train_step

        def counted(*args: object, **kwargs: object) -> float:
            self.steps += 1
            return step(*args, **kwargs)

        monkeypatch.setattr(nflow_np.train, "train_step", counted)
        monkeypatch.setattr(nflow_np.train, "time", self)

    def perf_counter(self) -> float:
        return float(self.steps)


def test_a_time_budget_is_accounted_across_resumes(tmp_path, monkeypatch):
    """Budget 45 s at 10 s per epoch: 4 epochs. Interrupted in epoch 3, the resumed run gets the remaining time."""
    settings = {"hidden": (8,), "epochs": 100, "batch_size": 128, "time_limit": 45.0}
    with monkeypatch.context() as patch:
        StepClock(patch)
        uninterrupted = train_image_model("digits", "nice", tmp_path / "reference", **settings)
    assert uninterrupted["stopped_by"] == "time_limit" and uninterrupted["epochs_run"] == 4
    with monkeypatch.context() as patch:
        StepClock(patch)
        interrupt(patch, "step", 2 * STEPS_PER_EPOCH + 5)
        with pytest.raises(Interrupted):
            train_image_model("digits", "nice", tmp_path / "run", checkpoint_every=1, **settings)
    with monkeypatch.context() as patch:  # a fresh process: its clock starts at 0
        StepClock(patch)
        resumed = train_image_model("digits", "nice", tmp_path / "run", checkpoint_every=1, resume=True, **settings)
    # the same epochs, learning rates (a cosine over the budget) and clock readings: 20 s were spent before
    assert resumed["history"] == uninterrupted["history"] and resumed["train_seconds"] == 40
    assert resumed["stopped_by"] == "time_limit"
    assert_same_model(tmp_path / "reference", tmp_path / "run")
    with monkeypatch.context() as patch:  # a shorter budget on resume: 20 s spent, an epoch no longer fits in 25
        StepClock(patch)
        shorter = train_image_model("digits", "nice", tmp_path / "run", resume=True, **settings | {"time_limit": 25.0})
    assert shorter["epochs_run"] == 4 and shorter["stopped_by"] == "time_limit"  # the finished run stays finished
    longer = dict(settings, time_limit=65.0)
    with monkeypatch.context() as patch:  # a longer one: two more epochs
        StepClock(patch)
        extended = train_image_model("digits", "nice", tmp_path / "run", resume=True, **longer)
    assert extended["epochs_run"] == 6 and extended["stopped_by"] == "time_limit"
    assert "stopped_by" not in extended["history"][3]  # epoch 4 no longer ends the run


def test_image_resume_honours_length_options_and_refuses_every_other_change(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(command("nice", "--epochs", "2", "--lr", "0.003", "--checkpoint-every", "1", "--out", str(run))) == 0
    capsys.readouterr()
    before = {path: path.read_bytes() for path in [*run.iterdir(), *(run / "checkpoints").iterdir()] if path.is_file()}
    refusals = {
        ("--lr", "0.001"): "--lr 0.001 differs from the resumed run's 0.003; leave it out",
        ("--lr", "0.0002"): "--lr 0.0002 differs from the resumed run's 0.003",  # the recipe's default, typed
        ("--hidden", "32"): "--hidden 32 differs from the resumed run's 16",
        ("--weight-decay", "0"): "--weight-decay 0.0 differs from the resumed run's 0.01",
        ("--dtype", "float64"): "--dtype float64 differs from the resumed run's float32",
        ("--no-plots",): "--no-plots does not apply to image data (digits)",
        ("--layers", "3"): "--layers does not apply to image data (digits)",
        ("--out", str(tmp_path / "elsewhere")): "differs from --resume",
    }
    for typed, message in refusals.items():
        assert main(["train", "--resume", str(run), *typed]) == 2, typed
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    after = {path: path.read_bytes() for path in [*run.iterdir(), *(run / "checkpoints").iterdir()] if path.is_file()}
    assert after == before  # a refused resume touches nothing
    # typed again at their recorded values: accepted; --epochs lengthens the run
    assert main(["train", "--resume", str(run), "--lr", "0.003", "--hidden", "16", "--epochs", "3",
                 "--no-progress"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] == 3 and summary["steps"] == 3 * STEPS_PER_EPOCH
    assert summary["settings"]["epochs"] == 3 and summary["settings"]["lr"] == 0.003
    assert main(command("nice", "--epochs", "1", "--out", str(run))) == 2  # a fresh run needs --force
    assert "--force" in capsys.readouterr().err


def test_a_diverged_image_run_names_the_checkpoint_that_loads(tmp_path, monkeypatch, capsys):
    plain, calls = ImageFlowModel.nll_and_backward, [0]

    def diverging(self: ImageFlowModel, x: np.ndarray) -> float:
        calls[0] += 1
        return float("nan") if calls[0] == STEPS_PER_EPOCH + 3 else plain(self, x)

    monkeypatch.setattr(ImageFlowModel, "nll_and_backward", diverging)
    run = tmp_path / "run"
    assert main(command("nice", "--epochs", "3", "--checkpoint-every", "1", "--out", str(run))) == 1
    err = capsys.readouterr().err
    named = run / "checkpoints" / f"checkpoint-{STEPS_PER_EPOCH:09d}.npz"
    assert f"the last good checkpoint {named} is untouched" in err and len(err.strip().splitlines()) == 1
    assert load_checkpoint(named).state.steps == STEPS_PER_EPOCH
    assert list_checkpoints(run / "checkpoints") == [named] and not (run / "model.json").exists()
