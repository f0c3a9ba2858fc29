"""Checkpoints (nflow_np/checkpoint.py) and resumable training (nflow_np/train.py), in process.

An interruption is simulated by an exception raised from inside the optimizer step; the resumed run
then starts from fresh objects, as a new process would. Real processes killed with SIGKILL are in
tests/test_reliability.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nflow_np.architectures import build_model
from nflow_np.backend import get_backend
from nflow_np.checkpoint import (
    KEEP,
    CheckpointError,
    TrainState,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from nflow_np.data import load_toy
from nflow_np.optim import SGD, Adam, Optimizer
from nflow_np.train import NonFiniteLossError, fit

STEPS_PER_EPOCH = 200 // 32  # 6; 8 rows are dropped each epoch
EPOCHS = 4


@pytest.fixture(scope="module")
def data():
    return load_toy("two_moons", n_train=200, n_val=64, n_test=8, seed=0)


def make(kind: str = "adam", dtype: object = np.float64):
    model = build_model("realnvp", 2, layers=2, hidden=(8,), seed=1, dtype=dtype)
    optimizer = Adam(model, lr=5e-3) if kind == "adam" else SGD(model, lr=1e-2, momentum=0.9)
    return model, optimizer


def run(data, directory: Path | None = None, kind: str = "adam", dtype: object = np.float64, **overrides):
    model, optimizer = make(kind, dtype)
    arguments = dict(epochs=EPOCHS, batch_size=32, seed=3, patience=2, lr_schedule="cosine", progress=False)
    arguments |= overrides
    if directory is not None:
        arguments.setdefault("checkpoint_dir", directory)
    train, val = data.train.astype(dtype), data.val.astype(dtype)
    return model, fit(model, train, val, optimizer=optimizer, **arguments)


class Interrupted(Exception):
    """Stands in for the process dying."""


def interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the ``step``-th optimizer step (1-based) raise :class:`Interrupted` before it updates anything."""
    real_step, count = Optimizer.step, [0]

    def step_or_die(self: Optimizer) -> None:
        count[0] += 1
        if count[0] == step:
            raise Interrupted
        real_step(self)

    monkeypatch.setattr(Optimizer, "step", step_or_die)


def assert_same_run(model_a, result_a, model_b, result_b) -> None:
    for name, value in model_a.state_dict().items():
        np.testing.assert_array_equal(model_b.state_dict()[name], value, err_msg=name)
    drop_time = [{k: v for k, v in entry.items() if k != "seconds"} for entry in result_a.history]
    assert [{k: v for k, v in entry.items() if k != "seconds"} for entry in result_b.history] == drop_time
    assert (result_b.best_val_nll, result_b.best_epoch, result_b.steps) == (
        result_a.best_val_nll,
        result_a.best_epoch,
        result_a.steps,
    )


@pytest.mark.parametrize(("kind", "dtype"), [("adam", np.float64), ("sgd", np.float32)])
def test_resuming_after_any_interruption_reproduces_the_run_bit_for_bit(data, tmp_path, monkeypatch, kind, dtype):
    reference_model, reference = run(data, kind=kind, dtype=dtype)
    assert reference.steps == EPOCHS * STEPS_PER_EPOCH  # the run is long enough to be interrupted anywhere
    # Every interruption point between two checkpoints of every epoch (mid-epoch, at an epoch's last
    # batch, right after a checkpoint); a checkpoint every 4 steps does not line up with 6-step epochs.
    for stop in range(5, reference.steps + 1, 3):
        folder = tmp_path / f"{kind}-{stop}"
        with monkeypatch.context() as patch:
            interrupt_at(patch, stop)
            with pytest.raises(Interrupted):
                run(data, folder, kind, dtype, checkpoint_every=4)
        written = load_checkpoint(list_checkpoints(folder)[0]).state.steps
        assert written == (stop - 1) // 4 * 4
        model, result = run(data, folder, kind, dtype, checkpoint_every=4, resume=True)
        assert result.resumed_from == checkpoint_path(folder, written)
        assert_same_run(reference_model, reference, model, result)


def test_checkpoint_holds_model_optimizer_and_position(data, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_at(patch, 10)
        with pytest.raises(Interrupted):
            run(data, tmp_path, checkpoint_every=3, metadata={"note": "x"})
    checkpoint = load_checkpoint(checkpoint_path(tmp_path, 9))
    state = checkpoint.state
    assert (state.epoch, state.batch, state.steps, state.epoch_batches) == (2, 3, 9, 3)
    assert len(state.history) == 1 and state.best_epoch == 1 and np.isfinite(state.best_val)
    assert state.rng["bit_generator"] == "PCG64"
    assert int(checkpoint.optimizer_state["step"]) == 9
    assert checkpoint.optimizer == {"kind": "adam", "lr": 5e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0}
    assert checkpoint.run["batch_size"] == 32 and checkpoint.run["train"]["shape"] == [200, 2]
    assert checkpoint.metadata == {"note": "x"} and checkpoint.backend == get_backend()
    assert set(checkpoint.state.best_params) == set(checkpoint.model.state_dict())
    # the model inside is usable on its own
    assert np.isfinite(checkpoint.model.log_prob(data.test)).all()


def test_a_folder_keeps_the_newest_checkpoints_and_a_final_one(data, tmp_path):
    _, result = run(data, tmp_path, checkpoint_every=5)
    names = [path.name for path in list_checkpoints(tmp_path)]
    assert names == ["checkpoint-000000024.npz", "checkpoint-000000020.npz"][:KEEP]
    final = load_checkpoint(tmp_path / names[0])
    assert final.state.finished and result.checkpoint == tmp_path / names[0]
    # resuming a finished run returns at once with the same result
    model, again = run(data, tmp_path, checkpoint_every=5, resume=True)
    assert again.steps == result.steps and again.history == result.history


def test_only_a_final_checkpoint_without_checkpoint_every(data, tmp_path):
    run(data, tmp_path)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-000000024.npz"]


def test_a_new_run_never_overwrites_checkpoints(data, tmp_path):
    run(data, tmp_path, checkpoint_every=5)
    before = {path: path.read_bytes() for path in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run(data, tmp_path, checkpoint_every=5)
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 16}, r"batch_size: it has 32, this run 16"),
        ({"lr_schedule": "constant"}, r"lr_schedule: it has 'cosine', this run 'constant'"),
        ({"seed": 4}, r"seed: it has 3, this run 4"),
        ({"data": "other"}, r"train: the data differ"),
        ({"optimizer": "lr"}, r"its optimizer is"),
        ({"optimizer": "sgd"}, r"its optimizer is"),
        ({"model": "wider"}, r"another architecture"),
    ],
)
def test_resume_refuses_another_run_and_changes_nothing(data, tmp_path, monkeypatch, change, message):
    with monkeypatch.context() as patch:
        interrupt_at(patch, 8)
        with pytest.raises(Interrupted):
            run(data, tmp_path, checkpoint_every=3)
    files = {path: path.read_bytes() for path in tmp_path.iterdir()}
    model, optimizer = make()
    if change.get("model"):
        model = build_model("realnvp", 2, layers=2, hidden=(9,), seed=1)
        optimizer = Adam(model, lr=5e-3)
    if change.get("optimizer") == "lr":
        optimizer = Adam(model, lr=1e-3)
    if change.get("optimizer") == "sgd":
        optimizer = SGD(model, lr=5e-3)
    initial = model.state_dict()
    train = data.train.copy()
    if change.get("data"):
        train[0, 0] += 1e-9
    arguments = dict(epochs=EPOCHS, batch_size=32, seed=3, patience=2, lr_schedule="cosine", progress=False)
    arguments |= {k: v for k, v in change.items() if k in arguments}
    with pytest.raises(ValueError, match=message):
        fit(
            model,
            train,
            data.val,
            optimizer=optimizer,
            checkpoint_dir=tmp_path,
            checkpoint_every=3,
            resume=True,
            **arguments,
        )
    for name, value in initial.items():
        np.testing.assert_array_equal(model.state_dict()[name], value)
    assert optimizer.step_count == 0
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == files


def test_resume_without_checkpoints_is_a_clear_error(data, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        run(data, tmp_path, resume=True)
    with pytest.raises(ValueError, match="need checkpoint_dir"):
        run(data, None, resume=True)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(data, tmp_path, monkeypatch):
    reference_model, reference = run(data)
    with monkeypatch.context() as patch:
        interrupt_at(patch, 14)
        with pytest.raises(Interrupted):
            run(data, tmp_path, checkpoint_every=4)
    newest, previous = list_checkpoints(tmp_path)
    newest.write_bytes(newest.read_bytes()[:-100])  # a disk that lost the tail of the file
    with pytest.warns(UserWarning, match=r"passed over a damaged checkpoint: .*checkpoint-000000012\.npz"):
        model, result = run(data, tmp_path, checkpoint_every=4, resume=True)
    assert result.resumed_from == previous
    assert_same_run(reference_model, reference, model, result)
    assert (tmp_path / "damaged-checkpoint-000000012.npz").exists()  # kept for a post-mortem, never loaded


def test_every_checkpoint_damaged_is_a_clear_error(data, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_at(patch, 14)
        with pytest.raises(Interrupted):
            run(data, tmp_path, checkpoint_every=4)
    for path in list_checkpoints(tmp_path):
        path.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match="no checkpoint loads"):
        latest_checkpoint(tmp_path)


def test_temporary_files_of_a_killed_writer_are_ignored_and_removed(data, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_at(patch, 6)
        with pytest.raises(Interrupted):
            run(data, tmp_path, checkpoint_every=4)
    stray = tmp_path / ".checkpoint-000000008.npz.0123456789ab.tmp"
    stray.write_bytes(b"half a checkpoint")
    assert latest_checkpoint(tmp_path)[0].state.steps == 4
    run(data, tmp_path, checkpoint_every=4, resume=True)
    assert not stray.exists()


# -- non-finite losses ------------------------------------------------------------------------------
def with_outlier(data, row: int):
    """The training set with one finite row so far out that its loss overflows to inf."""
    train = data.train.copy()
    train[row] = 1e200
    return train


def test_nonfinite_loss_stops_keeps_the_last_checkpoint_and_names_causes(data, tmp_path):
    model, optimizer = make()
    with pytest.raises(NonFiniteLossError) as caught:
        fit(
            model,
            with_outlier(data, 7),
            data.val,
            optimizer=optimizer,
            epochs=EPOCHS,
            batch_size=32,
            seed=3,
            checkpoint_dir=tmp_path,
            checkpoint_every=1,
            progress=False,
        )
    message = str(caught.value)
    assert "non-finite loss (inf)" in message and "learning rate" in message and "scale bound" in message
    assert "skip_nonfinite" in message
    failed_at = int(message.split("step ")[1].split(";")[0])
    newest = load_checkpoint(list_checkpoints(tmp_path)[0])
    assert newest.state.steps == failed_at - 1  # the last good step, untouched
    assert str(newest.path) in message
    for _, value, _ in model.named_parameters():
        assert np.isfinite(value).all()
    # resuming without skipping meets the same batch again: the same error, the same last good checkpoint
    before = newest.path.read_bytes()
    model, optimizer = make()
    with pytest.raises(NonFiniteLossError, match=f"step {failed_at};.*{newest.path}"):
        fit(
            model,
            with_outlier(data, 7),
            data.val,
            optimizer=optimizer,
            epochs=EPOCHS,
            batch_size=32,
            seed=3,
            checkpoint_dir=tmp_path,
            checkpoint_every=1,
            resume=True,
            progress=False,
        )
    assert list_checkpoints(tmp_path)[0] == newest.path and newest.path.read_bytes() == before


def test_skip_nonfinite_skips_exactly_the_bad_batches_and_counts_them(data):
    outlier = 7
    model, optimizer = make()
    result = fit(
        model,
        with_outlier(data, outlier),
        data.val,
        optimizer=optimizer,
        epochs=EPOCHS,
        batch_size=32,
        seed=3,
        patience=None,
        skip_nonfinite=True,
        progress=False,
    )
    rng = np.random.default_rng(3)  # the shuffle fit draws: the outlier's batch is skipped unless it is dropped
    used = [int(np.flatnonzero(rng.permutation(200) == outlier)[0]) < STEPS_PER_EPOCH * 32 for _ in range(EPOCHS)]
    assert result.skipped_batches == sum(used) > 0
    assert [entry["skipped"] for entry in result.history] == [int(u) for u in used]
    assert result.steps == EPOCHS * STEPS_PER_EPOCH - sum(used)
    assert np.isfinite(result.best_val_nll)


def test_resume_with_skip_nonfinite_recovers_a_diverged_run(data, tmp_path):
    train = with_outlier(data, 7)
    model, optimizer = make()
    with pytest.raises(NonFiniteLossError):
        fit(
            model,
            train,
            data.val,
            optimizer=optimizer,
            epochs=EPOCHS,
            batch_size=32,
            seed=3,
            checkpoint_dir=tmp_path,
            checkpoint_every=2,
            progress=False,
        )
    resumed, optimizer = make()
    result = fit(
        resumed,
        train,
        data.val,
        optimizer=optimizer,
        epochs=EPOCHS,
        batch_size=32,
        seed=3,
        checkpoint_dir=tmp_path,
        checkpoint_every=2,
        resume=True,
        skip_nonfinite=True,
        progress=False,
    )
    straight, optimizer = make()
    expected = fit(
        straight,
        train,
        data.val,
        optimizer=optimizer,
        epochs=EPOCHS,
        batch_size=32,
        seed=3,
        skip_nonfinite=True,
        progress=False,
    )
    assert_same_run(straight, expected, resumed, result)


def test_skipping_every_batch_of_an_epoch_still_stops(data):
    model, optimizer = make()
    model.flow[0].params["scale"][...] = np.inf
    with pytest.raises(NonFiniteLossError, match="every batch of epoch 1.*parameter flow.0.scale is not finite"):
        fit(
            model,
            data.train,
            data.val,
            optimizer=optimizer,
            epochs=2,
            batch_size=32,
            skip_nonfinite=True,
            progress=False,
        )


def test_nonfinite_validation_stops_with_the_best_parameters(data):
    model, optimizer = make()
    initial = model.state_dict()
    val = data.val.copy()
    val[3] = 1e200
    with pytest.raises(NonFiniteLossError, match=r"validation NLL after epoch 1 is not finite .*row 3"):
        fit(model, data.train, val, optimizer=optimizer, epochs=2, batch_size=32, progress=False)
    for name, value in initial.items():
        np.testing.assert_array_equal(model.state_dict()[name], value)


def test_negative_losses_round_trip(tmp_path):
    """A density above 1 gives a negative NLL: the state must store and load it like any other."""
    model, optimizer = make()
    rng = np.random.default_rng(0).bit_generator.state
    state = TrainState(
        epoch=2,
        batch=1,
        steps=7,
        epoch_loss=-12.25,
        epoch_batches=1,
        rng=rng,
        best_val=-3.5,
        best_epoch=1,
        best_params=model.state_dict(),
        history=[{"epoch": 1, "val_nll": -3.5}],
    )
    path = save_checkpoint(tmp_path, model, optimizer, state, {"epochs": 3}, lr=5e-3, backend="numpy")
    loaded = load_checkpoint(path).state
    assert (loaded.epoch_loss, loaded.best_val, loaded.history) == (-12.25, -3.5, [{"epoch": 1, "val_nll": -3.5}])


def test_what_a_checkpoint_cannot_hold_is_refused_before_training(data, tmp_path):
    from nflow_np.flows import Inverse, Rescale
    from nflow_np.model import FlowModel

    class Subclass(Rescale):
        pass

    model = FlowModel(Inverse(Subclass(2)))
    with pytest.raises(TypeError, match="Subclass"):
        fit(model, data.train, epochs=1, batch_size=32, checkpoint_dir=tmp_path, progress=False)
    model, optimizer = make()
    with pytest.raises(TypeError, match="not JSON serializable"):
        fit(
            model,
            data.train,
            optimizer=optimizer,
            epochs=1,
            batch_size=32,
            checkpoint_dir=tmp_path,
            metadata={"bad": object()},
            progress=False,
        )
    assert optimizer.step_count == 0 and not list_checkpoints(tmp_path)


def test_resuming_on_another_backend_warns(data, tmp_path, monkeypatch):
    import types

    import nflow_np.backend
    import nflow_np.train

    # the name the checkpoint records (the layers still compute on the active backend through the seam)
    recorded = types.SimpleNamespace(get_backend=lambda: "some_kernel", array_module=nflow_np.backend.array_module)
    with monkeypatch.context() as patch:
        patch.setattr(nflow_np.train, "backend", recorded)
        interrupt_at(patch, 8)
        with pytest.raises(Interrupted):
            run(data, tmp_path, checkpoint_every=3)
    assert load_checkpoint(list_checkpoints(tmp_path)[0]).backend == "some_kernel"
    with pytest.warns(UserWarning, match=f"'some_kernel' backend, this run uses '{get_backend()}'.*not be bit for bit"):
        run(data, tmp_path, checkpoint_every=3, resume=True)


def test_a_failed_write_keeps_the_previous_checkpoints(data, tmp_path, monkeypatch):
    import os

    real_fsync, calls = os.fsync, [0]

    def fsync_until_the_disk_is_full(fd: int) -> None:
        calls[0] += 1
        if calls[0] > 4:  # two checkpoints of two fsyncs each (file, folder) succeed
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_until_the_disk_is_full)
    with pytest.raises(OSError, match="No space left"):
        run(data, tmp_path, checkpoint_every=3)
    monkeypatch.undo()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-000000003.npz", "checkpoint-000000006.npz"]
    assert latest_checkpoint(tmp_path)[0].state.steps == 6


def test_non_finite_state_is_never_checkpointed(data, tmp_path):
    """Issue 14: a checkpoint of NaN/Inf parameters was written, then called "the last good checkpoint"."""
    from nflow_np.checkpoint import NonFiniteCheckpointError

    model, optimizer = make()
    state = TrainState(steps=3, best_params=model.state_dict())
    good = save_checkpoint(tmp_path, model, optimizer, state, {}, lr=5e-3, backend="numpy")
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    for poison in ("parameter", "optimizer"):
        state.steps += 1
        if poison == "parameter":
            model.flow.flows[0].params["scale"][0] = np.inf
        else:
            model.flow.flows[0].params["scale"][0] = 1.0
            optimizer.state_dict = lambda: {"step": np.array(4), "lr": np.array(5e-3), "m/x": np.array([np.nan])}
        message = f"the last good checkpoint {good} is untouched: resume from it"
        with pytest.raises(NonFiniteCheckpointError, match=message):
            save_checkpoint(tmp_path, model, optimizer, state, {}, lr=5e-3, backend="numpy")
        assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    assert latest_checkpoint(tmp_path)[0].path == good  # and it really loads


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # lr 1e39 in float32
def test_a_run_whose_first_step_diverges_writes_no_checkpoint(data, tmp_path):
    """``lr`` so large that the first step makes the parameters infinite: nothing is called a good checkpoint."""
    from nflow_np.checkpoint import NonFiniteCheckpointError

    model, optimizer = make(dtype=np.float32)
    optimizer.lr = 1e39
    with pytest.raises(NonFiniteCheckpointError, match="not checkpointed, and no checkpoint of this run loads"):
        fit(
            model,
            data.train.astype(np.float32),
            None,
            optimizer=optimizer,
            epochs=3,
            batch_size=32,
            progress=False,
            lr_schedule="constant",
            checkpoint_dir=tmp_path,
            checkpoint_every=1,
        )
    assert list_checkpoints(tmp_path) == []
