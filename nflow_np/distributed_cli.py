"""``mpiexec -n P nflow train ...``: the command line on every rank, speaking through rank 0.

:func:`command_line` wraps a command's run. Under a launcher with ``P > 1`` ranks (seen in its
environment variables, :func:`nflow_np.distributed.launched_size`) it starts MPI, silences stdout and
stderr on ranks ``1 … P−1`` (rank 0 prints, shows progress and writes every file; the library calls
receive ``comm="auto"``), and ends the run with an **exit agreement**: every rank, having finished or
failed, joins a non-blocking all-reduce of "I failed" on a communicator of its own. Then

- all ranks arrive (the run finished, or failed alike on every rank, or failed on one rank inside a
  step, an evaluation or a write, which :func:`~nflow_np.distributed.collectively` already raised
  everywhere): rank 0 prints its error, the others print nothing unless rank 0 succeeded;
- a failed rank waits :data:`EXIT_TIMEOUT` seconds and the others do not arrive (they wait inside a
  training step for the rank that left): it prints its error, naming its rank, and calls
  ``MPI_Abort``, which ends every rank of the job. No rank is left waiting.

Outside a launcher (or with ``P = 1``) it does nothing.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from collections.abc import Iterator

import numpy as np

from nflow_np import distributed

EXIT_TIMEOUT = 10.0
"""Seconds a failed rank waits for the others at the exit agreement before aborting the job."""
POLL = 0.005  # seconds between tests of the agreement, so a waiting rank does not spin on a core
FORWARD = 1.0  # seconds between a rank's last words and MPI_Abort


class Job:
    """One command-line run on every rank of an MPI job (:func:`command_line`)."""

    def __init__(self, world: object | None) -> None:
        self.world = world
        self.agreed = world is None
        self._streams: tuple | None = None

    @property
    def root(self) -> bool:
        """Whether this is rank 0 (or no MPI job)."""
        return distributed.is_root(self.world)

    def silence(self) -> None:
        """Ranks 1 … P−1: send stdout and stderr nowhere (rank 0 speaks for the job)."""
        if not self.root:
            self._streams = (sys.stdout, sys.stderr)
            sys.stdout, sys.stderr = io.StringIO(), io.StringIO()

    def _restore(self) -> None:
        if self._streams is not None:
            sys.stdout, sys.stderr = self._streams
            self._streams = None

    def says(self, error: BaseException | None) -> bool:
        """Agree with the other ranks on how the run ends; whether this rank prints ``error``.

        Collective (every rank calls it once, succeeded or failed). A failed rank whose partners do
        not arrive within :data:`EXIT_TIMEOUT` prints ``error`` and aborts the job instead of returning.
        """
        if self.agreed:
            self._restore()
            return self.root or error is None
        self.agreed = True
        failed = error is not None
        mine = np.array([failed, failed and self.root], dtype=np.int64)
        total = np.zeros(2, dtype=np.int64)
        request = self.exit_comm.Iallreduce(mine, total, op=distributed._mpi().MAX)
        deadline = time.monotonic() + EXIT_TIMEOUT
        while not request.Test():
            if failed and time.monotonic() > deadline:
                self._restore()
                print(f"nflow (rank {distributed.rank(self.world)} of {distributed.size(self.world)}): "
                      f"{type(error).__name__}: {error}; the other ranks do not answer: aborting the job",
                      file=sys.stderr, flush=True)
                time.sleep(FORWARD)  # the launcher forwards the message before the abort tears the job down
                self.world.Abort(2)
            time.sleep(POLL)
        self._restore()
        root_failed = bool(total[1])
        return failed and (self.root or not root_failed)


@contextlib.contextmanager
def command_line(command: str) -> Iterator[Job]:
    """Run a command on every rank of an MPI job (module docstring); a no-op ``Job`` outside one.

    Only ``train`` is run data-parallel; another command under ``mpiexec`` runs alike on every rank.
    """
    world = None
    if command == "train" and distributed.launched_size() > 1:
        world = distributed.resolve("auto")
    job = Job(world)
    if world is not None:
        job.exit_comm = world.Dup()  # the agreement never meets a training step's collective
        job.silence()
    try:
        yield job
    except Exception as error:  # one no handler printed: agree, then let the rank that speaks show its traceback
        if not job.agreed and not job.says(error):
            raise SystemExit(2) from None
        raise
    else:
        if not job.agreed:
            job.says(None)
    finally:
        job._restore()
