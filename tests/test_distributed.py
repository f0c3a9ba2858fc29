"""Data-parallel training on MPI (nflow_np/distributed.py, docs/distributed.md).

The runs at P = 2 and 3 ranks are ``mpiexec`` subprocesses of ``tests/distributed_script.py`` and of
``nflow train``; their final parameters are compared with the single-process run on the same global
batches after 100 float64 Adam steps. Claim (docs/distributed.md#floating-point): at P = 1 bit for bit
equal; at P > 1 equal to 1e-6 relative (the sums are grouped per shard; measured ~1e-14).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import distributed_script
import numpy as np
import pytest

from nflow_np import backend, distributed, safetensors_io
from nflow_np.architectures import build_model
from nflow_np.flows.normalization import BatchNorm

SCRIPT = Path(__file__).with_name("distributed_script.py")
REPO = Path(__file__).resolve().parents[1]
RELATIVE = 1e-6
HANG_GUARD = 300  # seconds: a run that has not ended by then is hanging (the failures end in ~10 s)
TOY = ["--data", "two_moons", "--model", "realnvp", "--layers", "4", "--hidden", "32,32", "--n-train", "960",
       "--n-val", "101", "--n-test", "99", "--batch-size", "96", "--no-plots", "--no-progress",
       "--lr-schedule", "constant"]


def environment() -> dict[str, str]:
    """This checkout first on the path, this backend, one BLAS thread per rank."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return os.environ | {"PYTHONPATH": path, "NFLOW_BACKEND": backend.get_backend(), "OPENBLAS_NUM_THREADS": "1",
                         "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def mpiexec(ranks: int, *arguments: str, check: bool = True, **variables: str) -> subprocess.CompletedProcess:
    """``mpiexec -n ranks python arguments...`` in the repository (``variables``: more environment)."""
    done = subprocess.run([distributed.launcher(), "-n", str(ranks), sys.executable, *arguments], cwd=REPO,
                          env=environment() | variables, capture_output=True, text=True, timeout=HANG_GUARD)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def nflow(ranks: int, *arguments: str) -> subprocess.CompletedProcess:
    """``nflow train ...`` as ``python -m nflow_np`` under ``mpiexec -n ranks`` (1: a plain process)."""
    command = [sys.executable, "-m", "nflow_np", *arguments]
    if ranks > 1:
        command = [distributed.launcher(), "-n", str(ranks), *command]
    done = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=HANG_GUARD)
    assert done.returncode == 0, done.stderr
    return done


def assert_close(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    """The same arrays, every entry within ``RELATIVE`` of the parameters' scale (their largest magnitude).

    The scale is the whole model's: a parameter whose gradient is zero in exact arithmetic (a batch norm's
    shift in front of a layer that removes the mean) holds only rounding, which no relative test can compare.
    """
    assert sorted(ours) == sorted(reference)
    scale = max(float(np.abs(value).max()) for value in reference.values() if value.dtype.kind == "f")
    for name, value in reference.items():
        if value.dtype.kind == "f":
            assert float(np.abs(ours[name] - value).max()) <= RELATIVE * scale, name
        else:
            np.testing.assert_array_equal(ours[name], value)


def load(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return safetensors_io.load(path)[0]
    with np.load(path) as arrays:
        return {name: arrays[name] for name in arrays.files}


# -- the pieces, in one process -------------------------------------------------------------------------------


class FakeComm:
    """Rank ``k`` of ``p`` for the functions that only ask where they are."""

    def __init__(self, k: int, p: int) -> None:
        self.k, self.p = k, p

    def Get_rank(self) -> int:
        return self.k

    def Get_size(self) -> int:
        return self.p


@pytest.mark.parametrize("p", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 96, 97, 101])
def test_shards_tile_the_batch_in_rank_order(n: int, p: int) -> None:
    shards = [distributed.shard(FakeComm(k, p), n) for k in range(p)]
    assert [i for s in shards for i in range(n)[s]] == list(range(n))
    sizes = [s.stop - s.start for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*distributed.WORLD_SIZE_VARIABLES, *distributed.WORLD_RANK_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    assert distributed.resolve(None) is None
    assert distributed.resolve("auto") is None  # not launched by mpiexec: one process, nothing imported
    with pytest.raises(TypeError, match="'auto' or an mpi4py communicator"):
        distributed.resolve("world")
    with pytest.raises(TypeError, match="got FakeComm"):
        distributed.resolve(FakeComm(0, 2))
    from mpi4py import MPI

    assert distributed.resolve(MPI.COMM_SELF) is MPI.COMM_SELF


def test_missing_mpi4py_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'nflow_np\[mpi\]'"):
        distributed.resolve("auto")


def test_one_rank_is_the_single_process_run_bit_for_bit() -> None:
    """P = 1 through the whole reduction (weight 1, a sum of one term) changes no bit."""
    from mpi4py import MPI

    single = distributed_script.run_fit(None, None, None, epochs=3)
    one_rank = distributed_script.run_fit(MPI.COMM_SELF, None, None, epochs=3)
    for name, value in single.items():
        np.testing.assert_array_equal(one_rank[name], value, err_msg=name)


def test_batch_norms_need_a_row_on_every_rank() -> None:
    """A rank without rows could not take part in the batch statistics: refused before any collective call."""
    model = build_model("realnvp", 2, layers=2, hidden=(8,))
    model.flow.flows.insert(1, BatchNorm(2))
    model.flow.children = {str(k): layer for k, layer in enumerate(model.flow.flows)}
    with pytest.raises(ValueError, match="a batch of 2 rows on 3 ranks leaves a rank without rows"):
        distributed.backward(FakeComm(0, 3), model, np.zeros((2, 2)), model.nll_and_backward)


# -- the library under mpiexec ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [2, 3])
def test_fit_on_ranks_matches_one_process(ranks: int, tmp_path: Path) -> None:
    """Batch 96 (shards 48 or 32), validation 101 rows (shards 51/50, 34/34/33), 100 steps; every rank the same bits."""
    done = mpiexec(ranks, str(SCRIPT), "fit", str(tmp_path / "params.npz"), "--every-rank")
    assert_close(load(tmp_path / "params.npz"), distributed_script.run_fit(None, None, None))
    for k in range(ranks):
        theirs = load(tmp_path / f"params.npz.rank{k}.npz")
        for name, value in load(tmp_path / "params.npz").items():
            np.testing.assert_array_equal(theirs[name], value, err_msg=f"rank {k}: {name}")
        assert f"rank {k}: 100 steps through shared memory" in done.stdout  # the node's shared window, each step


@pytest.mark.parametrize(("ranks", "per_node"), [(2, ""), (3, ""), (3, "2"), (3, "1")])
def test_shared_memory_gives_the_bits_of_the_messages(ranks: int, per_node: str, tmp_path: Path) -> None:
    """Through a node's shared memory, with the optimizer step divided (SGD, groups, weight decay, a frozen
    parameter, clipping), the run is bit for bit the run by MPI messages where every rank updates everything.

    ``per_node`` "2" makes ranks {0, 1} and {2} two nodes (their leaders reduce the nodes' sums by messages),
    "1" every rank a node of its own; the additions stay in rank order, so the bits stay the same.
    """
    runs = {}
    for label, variables in (("messages", {"NFLOW_MPI_SHARED": "0"}),
                             ("shared", {"NFLOW_MPI_RANKS_PER_NODE": per_node} if per_node else {})):
        out = tmp_path / f"{label}.npz"
        done = mpiexec(ranks, str(SCRIPT), "fit-variants", str(out), "--every-rank", **variables)
        counted = 0 if label == "messages" else 100
        assert all(f"rank {k}: {counted} steps through shared memory" in done.stdout for k in range(ranks))
        runs[label] = [load(Path(f"{out}.rank{k}.npz")) for k in range(ranks)]
    reference = runs["messages"][0]
    for label, per_rank in runs.items():
        for k, params in enumerate(per_rank):
            for name, value in reference.items():
                np.testing.assert_array_equal(params[name], value, err_msg=f"{label}, rank {k}: {name}")
    assert_close(reference, distributed_script.run_fit(None, None, None, variants=True))


def test_fit_vi_on_three_ranks_matches_one_process(tmp_path: Path) -> None:
    """50 draws per step: shards 17, 17, 16."""
    mpiexec(3, str(SCRIPT), "vi", str(tmp_path / "params.npz"))
    assert_close(load(tmp_path / "params.npz"), distributed_script.run_vi(None))


@pytest.mark.parametrize("kind", ["nice", "realnvp"])
def test_image_models_on_three_ranks_match_one_process(kind: str, tmp_path: Path) -> None:
    """Dequantisation noise drawn in the forward pass: each shard gets the rows' noise one process draws;
    RealNVP's batch norms normalise every shard by the moments of the whole batch (and the running averages follow).
    """
    mpiexec(3, str(SCRIPT), kind, str(tmp_path / "params.npz"))
    assert_close(load(tmp_path / "params.npz"), distributed_script.run_image(None, kind))


@pytest.mark.parametrize(("what", "message"), [("fail", "RuntimeError: rank 1 of 3 failed: injected failure in the "
                                                "third step"),
                                               ("fail-eval", "ValueError: rank 2 of 3 failed: injected failure in "
                                                "the validation")])
def test_a_failing_rank_stops_every_rank_with_its_error(what: str, message: str, tmp_path: Path) -> None:
    done = mpiexec(3, str(SCRIPT), what, str(tmp_path / "params.npz"), check=False)
    assert done.returncode != 0
    for k in range(3):  # every rank raised the failing rank's error, rank 0 included
        assert f"rank {k}: {message}" in done.stderr
    assert not (tmp_path / "params.npz").exists()


def test_a_rank_failing_inside_a_step_with_batch_norms_aborts_the_job(tmp_path: Path) -> None:
    """The others wait in a batch norm's moments, not at the step's reduction: the failing rank aborts the job."""
    done = mpiexec(3, str(SCRIPT), "fail-realnvp", str(tmp_path / "params.npz"), check=False)
    assert done.returncode != 0
    assert "RuntimeError: injected failure in the third step" in done.stderr
    assert "rank 1 of 3 failed inside a step whose batch norms the other ranks wait in" in done.stderr
    assert not (tmp_path / "params.npz").exists()


# -- nflow train under mpiexec ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [2, 3])
def test_nflow_train_on_ranks_matches_one_process(ranks: int, tmp_path: Path) -> None:
    nflow(1, "train", *TOY, "--epochs", "10", "--out", str(tmp_path / "one"))
    done = nflow(ranks, "train", *TOY, "--epochs", "10", "--out", str(tmp_path / "many"))
    assert done.stdout.count("wrote model.safetensors") == 1 and done.stderr == ""  # rank 0 alone speaks
    assert_close(load(tmp_path / "many" / "model.safetensors"), load(tmp_path / "one" / "model.safetensors"))


def test_nflow_train_images_on_two_ranks_matches_one_process(tmp_path: Path) -> None:
    """The image trainer (NICE on the digits, 2 epochs): rank 0's clock, sharded validation, rank 0 writes the files."""
    images = ["--data", "digits", "--model", "nice", "--epochs", "2", "--hidden", "16,16", "--dtype", "float64",
              "--no-progress"]
    nflow(1, "train", *images, "--out", str(tmp_path / "one"))
    done = nflow(2, "train", *images, "--out", str(tmp_path / "two"))
    assert done.stdout.count("wrote model.safetensors") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert_close(load(tmp_path / "two" / "model.safetensors"), load(tmp_path / "one" / "model.safetensors"))
    one, two = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two"))
    assert (one["ranks"], two["ranks"]) == (1, 2)
    for split in ("train", "val", "test"):  # sharded over the ranks, each row with the noise one process draws
        assert two[f"{split}_nll"] == pytest.approx(one[f"{split}_nll"], rel=1e-12)


def test_checkpoint_at_two_ranks_resumes_at_one_and_three(tmp_path: Path) -> None:
    """50 steps at P = 2, then 50 more at P = 1 and at P = 3: the run checkpointed and resumed in one process."""
    first = [*TOY, "--epochs", "5", "--checkpoint-every", "50"]
    nflow(1, "train", *first, "--out", str(tmp_path / "single"))
    nflow(1, "train", "--resume", str(tmp_path / "single"), "--epochs", "10", "--no-progress")
    nflow(2, "train", *first, "--out", str(tmp_path / "two"))
    shutil.copytree(tmp_path / "two", tmp_path / "two-again")
    nflow(1, "train", "--resume", str(tmp_path / "two"), "--epochs", "10", "--no-progress")
    nflow(3, "train", "--resume", str(tmp_path / "two-again"), "--epochs", "10", "--no-progress")
    reference = load(tmp_path / "single" / "model.safetensors")
    assert_close(load(tmp_path / "two" / "model.safetensors"), reference)
    assert_close(load(tmp_path / "two-again" / "model.safetensors"), reference)


def test_nflow_train_stops_every_rank_when_one_fails_in_a_step(tmp_path: Path) -> None:
    done = mpiexec(2, str(SCRIPT), "cli-fail", "--", "train", *TOY, "--epochs", "10", "--out", str(tmp_path / "run"),
                   check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == "nflow train: error: rank 1 of 2 failed: injected failure in the third step"
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_nflow_train_aborts_the_job_when_a_rank_leaves_outside_a_step(tmp_path: Path) -> None:
    """Rank 1 fails before training while rank 0 waits for it in the first step: the exit agreement aborts."""
    done = mpiexec(2, str(SCRIPT), "cli-leave", "--", "train", *TOY, "--epochs", "10", "--out", str(tmp_path / "run"),
                   check=False)
    assert done.returncode != 0
    assert "nflow (rank 1 of 2): OSError: injected failure before training; the other ranks do not" in done.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_rank_killed_by_a_signal_ends_the_job_and_the_checkpoint_resumes(tmp_path: Path) -> None:
    """SIGKILL on rank 1 in step 45: MPI's launcher ends the job; the checkpoint of step 30 resumes in one process."""
    arguments = [*TOY, "--epochs", "10", "--checkpoint-every", "30"]
    done = mpiexec(2, str(SCRIPT), "cli-kill", "--", "train", *arguments, "--out", str(tmp_path / "run"), check=False)
    assert done.returncode != 0
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["checkpoint-000000030.npz"]
    nflow(1, "train", "--resume", str(tmp_path / "run"), "--no-plots", "--no-progress")
    nflow(1, "train", *arguments, "--out", str(tmp_path / "uninterrupted"))
    assert_close(load(tmp_path / "run" / "model.safetensors"), load(tmp_path / "uninterrupted" / "model.safetensors"))


def test_an_image_run_killed_on_two_ranks_resumes_on_two(tmp_path: Path) -> None:
    """NICE on the digits at P = 2 (10 steps an epoch), a checkpoint every 2 epochs, rank 1 killed in step 45: rank 0
    wrote the checkpoints, every rank reads the one of step 40, and the run ends as the one-process run does."""
    images = ["--data", "digits", "--model", "nice", "--epochs", "5", "--hidden", "16,16", "--dtype", "float64",
              "--batch-size", "128", "--no-progress", "--checkpoint-every", "2"]
    done = mpiexec(2, str(SCRIPT), "cli-kill", "--", "train", *images, "--out", str(tmp_path / "run"), check=False)
    assert done.returncode != 0
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["checkpoint-000000020.npz", "checkpoint-000000040.npz"]
    nflow(2, "train", "--resume", str(tmp_path / "run"), "--no-progress")
    nflow(1, "train", *images, "--out", str(tmp_path / "one"))
    assert_close(load(tmp_path / "run" / "model.safetensors"), load(tmp_path / "one" / "model.safetensors"))
    resumed, one = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("run", "one"))
    assert resumed["ranks"] == 2 and resumed["resumed_from"].endswith("checkpoint-000000040.npz")
    assert resumed["epochs_run"] == one["epochs_run"] == 5 and resumed["steps"] == one["steps"] == 50


def test_one_process_imports_no_mpi(tmp_path: Path) -> None:
    """fit, nflow train and "auto" outside mpiexec never import mpi4py (it is an optional extra)."""
    code = ("import sys, numpy as np; from nflow_np.cli import main; from nflow_np.train import fit; "
            "from nflow_np.architectures import build_model; m = build_model('nice', 2, layers=2, hidden=(4,)); "
            "fit(m, np.zeros((8, 2)), epochs=1, batch_size=4, progress=False, comm='auto'); "
            f"main(['train', '--data', 'two_moons', '--epochs', '1', '--n-train', '64', '--no-plots', '--out', "
            f"{str(tmp_path / 'run')!r}]); assert 'mpi4py' not in sys.modules, 'mpi4py was imported'")
    launcher = (*distributed.WORLD_SIZE_VARIABLES, *distributed.WORLD_RANK_VARIABLES)
    environment_without_launcher = {k: v for k, v in environment().items() if k not in launcher}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environment_without_launcher,
                          capture_output=True, text=True, timeout=HANG_GUARD)
    assert done.returncode == 0, done.stderr


def test_ranks_with_empty_shards_contribute_nothing(tmp_path: Path) -> None:
    """Batches of 2 rows on 3 ranks: rank 2's shards are empty (weight 0); the run is still the one-process run."""
    mpiexec(3, str(SCRIPT), "fit", str(tmp_path / "params.npz"), "--batch", "2", "--epochs", "1")
    assert_close(load(tmp_path / "params.npz"), distributed_script.run_fit(None, None, None, epochs=1, batch=2))


def test_distributed_benchmark_runs_quick(tmp_path: Path) -> None:
    """``python -m benchmarks.distributed --quick`` at P = 1 and 2: a row per model and rank count, every rank timed."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.distributed", "--quick", "--steps", "2", "--out",
                           str(tmp_path)], cwd=REPO, env=environment(), capture_output=True, text=True,
                          timeout=HANG_GUARD)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "distributed.json").read_text())["results"]
    assert [(r["model"], r["ranks"], r["path"]) for r in results] == [
        (model, ranks, path) for model in ("realnvp", "nice")
        for ranks, path in ((1, "one process"), (2, "shared"), (2, "messages"))]
    for r in results:
        assert len(r["per_rank_ms"]) == r["ranks"] and r["samples_per_s"] > 0 and r["steps"] == 2
        assert all(m["reduce"] >= 0 and m["wait"] >= 0 and m["compute"] > 0 for m in r["per_rank_ms"])
    assert "samples/s" in (tmp_path / "distributed.txt").read_text()
