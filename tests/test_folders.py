"""Whole-folder saves (nflow_np/files/folders.py): a full disk or a kill at any write leaves the old model.

Every system call a save makes (``os.mkdir``, ``os.write``, ``os.fsync``, ``os.link``, ``os.rename``,
``os.replace`` and the atomic swap) is counted by a wrapper; the tests then fail the k-th call with
ENOSPC, or kill the process there (``os._exit`` in a forked child, so no clean-up code runs), for every
k until the save completes. After each: the folder holds exactly the old files or exactly the new
ones, the model loads, and the next save removes whatever the interrupted one left.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nflow_np.architectures import build_model
from nflow_np.files import folders
from nflow_np.gmm import GaussianMixture
from nflow_np.io import (
    LOCK_FILE,
    FolderLockedError,
    acquire_lock,
    bytes_needed,
    check_writable,
    load_model,
    remove_leftovers,
    save_model,
)

CALLS = ("mkdir", "write", "fsync", "link", "rename", "replace")
POINTS = np.random.default_rng(0).normal(size=(5, 2))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    beside = [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.new-")]
    inside = [p.name for p in folder.rglob("*.tmp")]
    return beside + inside


class Faults:
    """Counts the save's system calls and acts at call number ``at``: raise ENOSPC, or exit at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int, action: str) -> None:
        self.count, self.at, self.action = 0, at, action
        for name in CALLS:
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))
        monkeypatch.setattr(folders, "exchange", self._wrap(folders.exchange))

    def _wrap(self, real):
        def call(*args, **kwargs):
            self.count += 1
            if self.count == self.at:
                if self.action == "kill":
                    os._exit(0)
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            return real(*args, **kwargs)

        return call


@pytest.fixture
def old_folder(tmp_path: Path) -> Path:
    """A finished run's folder: a model, a summary and a checkpoints folder beside it."""
    out = tmp_path / "run"
    save_model(old_model(), out)
    (out / "summary.json").write_text('{"old": true}\n')
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "checkpoint-000000004.npz").write_bytes(b"checkpoint bytes")
    return out


def model(layers: int, seed: int):
    """A RealNVP with random parameters (a fresh one is the identity map: old and new would look alike)."""
    built = build_model("realnvp", 2, layers=layers, hidden=(3,), seed=seed)
    rng = np.random.default_rng(seed)
    for _, value, _ in built.named_parameters():
        value[...] = rng.normal(0.0, 0.3, value.shape)
    return built


def old_model():
    return model(1, 1)


def new_model():
    return model(2, 2)


def test_a_full_disk_at_every_write_of_a_save_leaves_the_old_folder(old_folder, monkeypatch):
    old_log_prob, new_log_prob = load_model(old_folder).log_prob(POINTS), new_model().log_prob(POINTS)
    at = 0
    while True:
        at += 1
        before = snapshot(old_folder)
        with monkeypatch.context() as patch:
            faults = Faults(patch, at, "fail")
            try:
                save_model(new_model(), old_folder)
                failed = False
            except OSError as error:
                assert error.errno == errno.ENOSPC
                failed = True
        if failed:
            assert snapshot(old_folder) == before, f"call {at} changed the folder"
            np.testing.assert_array_equal(load_model(old_folder).log_prob(POINTS), old_log_prob)
            assert leftovers(old_folder) == [], f"call {at} left {leftovers(old_folder)}"
            continue
        # the failed call was one a save may survive (mkdir of a folder that exists): the save is whole
        np.testing.assert_array_equal(load_model(old_folder).log_prob(POINTS), new_log_prob)
        after = snapshot(old_folder)
        assert after["summary.json"] == before["summary.json"]
        assert after["checkpoints/checkpoint-000000004.npz"] == b"checkpoint bytes"
        assert leftovers(old_folder) == []
        if faults.count < at:
            break  # no call was failed: every point has been tried
        save_model(old_model(), old_folder)  # the old model again
    assert at > 8, "the save made suspiciously few calls"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child")
def test_a_kill_at_every_write_of_a_save_leaves_a_whole_folder(old_folder, monkeypatch):
    old = load_model(old_folder).log_prob(POINTS)
    new = new_model().log_prob(POINTS)
    outcomes, at = set(), 0
    while "new" not in outcomes or at < 4:
        at += 1
        pid = os.fork()
        if pid == 0:  # the child saves and is killed at call `at` (or finishes)
            Faults(monkeypatch, at, "kill")
            save_model(new_model(), old_folder)
            os._exit(3)
        _, status = os.waitpid(pid, 0)
        finished = os.waitstatus_to_exitcode(status) == 3
        loaded = load_model(old_folder).log_prob(POINTS)  # whatever was left must load
        outcome = "new" if np.array_equal(loaded, new) else "old"
        assert outcome == "new" or np.array_equal(loaded, old)
        outcomes.add(outcome)
        if finished:
            assert outcome == "new"
        if outcome == "old":
            assert (old_folder / "summary.json").read_text() == '{"old": true}\n'
        remove_leftovers(old_folder)  # what the next save or run does first
        assert leftovers(old_folder) == []
        if outcome == "new":
            save_model(old_model(), old_folder)  # back to old
            outcomes.add("restored")
    assert at > 8


def test_a_mixture_saved_over_a_flow_model_replaces_it_whole(old_folder, monkeypatch):
    rng = np.random.default_rng(0)
    mixture = GaussianMixture(2, seed=0).fit(rng.normal(size=(64, 2)))
    before = snapshot(old_folder)
    with monkeypatch.context() as patch:
        Faults(patch, 5, "fail")
        with pytest.raises(OSError):
            mixture.save(old_folder, {"data": "two_moons", "seed": 0, "components": 2})
    assert snapshot(old_folder) == before
    mixture.save(old_folder, {"data": "two_moons", "seed": 0, "components": 2})
    names = set(snapshot(old_folder))
    assert "gmm.npz" in names and not names & {"model.safetensors", "model.npz", "model.json"}
    loaded, summary = GaussianMixture.load(old_folder)
    np.testing.assert_array_equal(loaded.log_prob(POINTS), mixture.log_prob(POINTS))
    assert summary["components"] == 2
    save_model(new_model(), old_folder)  # and back: no gmm.npz beside a flow model
    assert "gmm.npz" not in set(snapshot(old_folder))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temporaries_of_killed_saves_are_removed_by_the_next_save(old_folder):
    stale = old_folder.parent / f".{old_folder.name}.new-{_dead_pid()}-0123456789ab"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = old_folder.parent / f".{old_folder.name}.new-{os.getpid()}-0123456789ab"
    live.mkdir()  # a save of a live process is not touched
    (old_folder / ".model.safetensors.0123456789ab.tmp").write_bytes(b"half")
    save_model(new_model(), old_folder)
    assert not stale.exists() and live.exists()
    assert not (old_folder / ".model.safetensors.0123456789ab.tmp").exists()


def test_the_lock_refuses_a_second_writer_by_pid_and_reclaims_a_dead_ones(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        (out / LOCK_FILE).write_text(f"{holder.pid} {os.uname().nodename}\n")
        with pytest.raises(FolderLockedError, match=f"in use by process {holder.pid}"):
            with acquire_lock(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with acquire_lock(out) as lock:  # the holder is dead: its lock is reclaimed
        assert lock.read_text().split()[0] == str(os.getpid())
        with pytest.raises(FolderLockedError, match="locked by this process already"):
            with acquire_lock(out):
                pass
        save_model(new_model(), out)  # a save keeps the lock in the folder
        assert (out / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    assert not (out / LOCK_FILE).exists()
    (out / LOCK_FILE).write_text("garbage")  # unreadable: counts as dead
    with acquire_lock(out):
        pass


def test_the_space_estimate_covers_a_model_and_its_checkpoints(tmp_path):
    from nflow_np.checkpoint import TrainState, save_checkpoint
    from nflow_np.optim import Adam

    model = build_model("realnvp", 2, layers=3, hidden=(16, 16))
    optimizer = Adam(model, lr=1e-3)
    save_model(model, tmp_path / "m")
    state = TrainState(best_params=model.state_dict())
    path = save_checkpoint(tmp_path / "c", model, optimizer, state, {}, lr=1e-3, backend="numpy")
    model_bytes = sum(p.stat().st_size for p in (tmp_path / "m").iterdir())
    needed = bytes_needed(model.num_parameters(), len(model.state_dict()), 8)
    assert 2 * model_bytes + 3 * path.stat().st_size <= needed <= 10 * (model_bytes + path.stat().st_size) + 10**6


def test_check_writable_names_the_problem(tmp_path):
    assert check_writable(tmp_path / "new" / "folder") == tmp_path / "new" / "folder"
    with pytest.raises(ValueError, match="bytes free, but the model and its checkpoints need"):
        check_writable(tmp_path, needed=2**62)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot write there"):
        check_writable(tmp_path / "file" / "below")
