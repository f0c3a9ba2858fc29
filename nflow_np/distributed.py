"""Data-parallel training on MPI whose result does not depend on the number of ranks (``docs/distributed.md``).

Every rank holds the whole model and draws the same seeded global batch; rank ``k`` of ``P`` takes the
contiguous shard ``rows[start_k : start_k + n_k]`` of it (:func:`shard`: the first ``N mod P`` ranks one
row more), computes the mean loss ``L_k`` of its shard and its gradient ``g_k``, and the ranks combine

    ``L = Σ_k (n_k / N) L_k``,   ``g = Σ_k (n_k / N) g_k``        (k = 0, 1, …, P − 1, in this order)

which is the mean over the global batch, ``(1/N) Σ_n ∇ℓ_n``, as one process computes it. The reduction
is one flat buffer per step (every gradient, the loss and a failure flag), reduced by a reduce-scatter
whose additions run in rank order and an all-gather (:func:`reduce_gradients`): the order of the
additions is fixed by the ranks, never by which message arrives first, and every rank receives the same
bits, so all ranks take the same optimizer step and their parameters never drift apart. Inside
:func:`training` (as ``fit`` and ``fit_vi`` train) the ranks of a node do this through their shared
memory and divide the optimizer step between them (:mod:`nflow_np.distributed_reduce`). At ``P = 1``
the result is bit for bit the single-process one; at ``P > 1`` the sums are grouped differently (per
shard, then across shards), so it agrees to rounding (``docs/distributed.md#floating-point``).

``comm`` everywhere is ``None`` (one process: every function here is the plain computation), an
``mpi4py`` communicator, or ``"auto"`` (``MPI.COMM_WORLD`` when launched by ``mpiexec`` with more than
one rank). ``mpi4py`` is imported only when a communicator is used (``pip install 'nflow_np[mpi]'``).

Failures: an exception on one rank inside a step, an evaluation or a root-only write is reported at the
next collective call and raised on every rank, the same type and message naming the rank
(:func:`collectively`), so no rank waits for one that has stopped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from nflow_np.distributed_layers import batch_norms, drawing_layers, global_draws, skip_draws, synced_batch_norms

MPI_EXTRA = "pip install 'nflow_np[mpi]'"
WORLD_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
"""Set by the launchers (MPICH's Hydra, Slurm's PMI, Open MPI): how :func:`launched_size` sees a world without
starting MPI. A PMIx launcher that sets neither sets ``PMIX_RANK``; then MPI itself is asked."""
WORLD_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


class RankError(RuntimeError):
    """An error raised on one rank, re-raised on every rank (when its own type cannot carry the message)."""


def _mpi() -> Any:
    """``mpi4py.MPI``, or an ImportError that says what to install."""
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError(
            f"distributed training needs mpi4py and an MPI library: {MPI_EXTRA} ({error})"
        ) from None
    return MPI


def launcher() -> str:
    """The ``mpiexec`` to start ranks with: this Python environment's own (the ``mpich`` wheel installs it
    beside ``python``, on no ``PATH`` unless the environment is activated), else the one on ``PATH``.

    Raises
    ------
    FileNotFoundError
        No ``mpiexec`` anywhere, with what to install.
    """
    import shutil
    import sysconfig

    own = Path(sysconfig.get_path("scripts")) / "mpiexec"
    if own.is_file() and os.access(own, os.X_OK):
        return str(own)
    found = shutil.which("mpiexec")
    if found is None:
        raise FileNotFoundError("no mpiexec here: pip install 'nflow_np[mpi]' (mpi4py and mpich)")
    return found


def launched_size() -> int:
    """The number of ranks the launcher started (1 without ``mpiexec``), from its environment variables."""
    for name in WORLD_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    if os.environ.get("PMIX_RANK", "").isdigit():
        return _mpi().COMM_WORLD.Get_size()
    return 1


def launched_rank() -> int:
    """This process's rank as the launcher numbered it (0 without ``mpiexec``), without starting MPI."""
    for name in WORLD_RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def resolve(comm: object) -> Any:
    """The communicator ``comm`` names: ``None`` (one process), an mpi4py communicator, or ``"auto"``.

    ``"auto"`` is ``MPI.COMM_WORLD`` under ``mpiexec -n P`` with ``P > 1``, else ``None``; mpi4py is
    imported only then.

    Raises
    ------
    ImportError
        ``"auto"`` under a launcher, or a communicator asked for, without mpi4py installed.
    TypeError
        Anything else.
    """
    if comm is None:
        return None
    if isinstance(comm, str):
        if comm != "auto":
            raise TypeError(f"comm must be None, 'auto' or an mpi4py communicator, got {comm!r}")
        return _mpi().COMM_WORLD if launched_size() > 1 else None
    if not all(hasattr(comm, name) for name in ("Get_rank", "Get_size", "Alltoall", "Allgather", "bcast", "gather")):
        raise TypeError(f"comm must be None, 'auto' or an mpi4py communicator, got {type(comm).__name__}")
    return comm


def rank(comm: Any) -> int:
    """This process's rank (0 for ``comm = None``)."""
    return 0 if comm is None else comm.Get_rank()


def size(comm: Any) -> int:
    """The number of ranks ``P`` (1 for ``comm = None``)."""
    return 1 if comm is None else comm.Get_size()


def is_root(comm: Any) -> bool:
    """Whether this process is rank 0, the one that prints, shows progress and writes files."""
    return rank(comm) == 0


def shard(comm: Any, n: int) -> slice:
    """The contiguous rows of ``n`` that this rank computes: ``n_k = ⌊n/P⌋ + (k < n mod P)``, in rank order.

    The shards tile ``range(n)`` exactly; with ``n < P`` the last ranks get empty shards.
    """
    k, p = rank(comm), size(comm)
    quotient, remainder = divmod(n, p)
    start = k * quotient + min(k, remainder)
    return slice(start, start + quotient + (k < remainder))


def _raise_agreed(comm: Any, failed: int, error: BaseException | None) -> None:
    """Every rank: raise the error of the lowest failing rank (``failed`` says whether there is one).

    Collective: every rank calls it with the same ``failed``. The error travels as (type, message), so an
    exception whose attributes do not pickle still arrives; it is rebuilt with the rank in its message.
    """
    if not failed:
        return
    mine = None if error is None else (_picklable(type(error)), f"{type(error).__name__}: {error}", str(error))
    reports = comm.gather((rank(comm), mine), root=0)
    if is_root(comm):
        first = next(report for report in reports if report[1] is not None)
    else:
        first = None
    where, (kind, described, message) = comm.bcast(first, root=0)
    text = f"rank {where} of {size(comm)} failed: {message}"
    try:
        agreed = kind(text)
    except Exception:  # no type (a class defined where it cannot be imported) or a constructor wanting more
        agreed = RankError(f"rank {where} of {size(comm)} failed: {described}")
    agreed.nflow_agreed = True  # the command line prints it on rank 0 only
    if error is not None and where == rank(comm):
        raise agreed from error
    raise agreed


def _picklable(kind: type) -> type | None:
    """``kind`` if it travels by pickle (an importable class), else ``None``."""
    import pickle

    try:
        pickle.dumps(kind)
    except Exception:
        return None
    return kind


@contextlib.contextmanager
def collectively(comm: Any) -> Iterator[None]:
    """Run the block on every rank; if it raises on any rank, raise that error on every rank.

    Every rank must enter the block (it ends with a collective call). With ``comm = None`` it is a no-op.
    """
    if comm is None:
        yield
        return
    error = None
    try:
        yield
    except Exception as raised:
        error = raised
    failed = comm.allreduce(int(error is not None))
    _raise_agreed(comm, failed, error)


def on_root(comm: Any, call: Callable[[], Any]) -> Any:
    """``call()`` on rank 0 only (a file write), its result broadcast; an error there is raised on every rank."""
    result = None
    with collectively(comm):
        if is_root(comm):
            result = call()
    return result if comm is None else comm.bcast(result, root=0)


def root_first(comm: Any, call: Callable[[], Any]) -> Any:
    """``call()`` on rank 0, then on the other ranks (reading what rank 0 may have tidied, e.g. a checkpoint folder)."""
    result = None
    with collectively(comm):
        if is_root(comm):
            result = call()
    with collectively(comm):
        if not is_root(comm):
            result = call()
    return result


def broadcast(comm: Any, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a clock reading that decides when to stop, so all ranks decide alike)."""
    return value if comm is None else comm.bcast(value, root=0)


def sum_in_rank_order(comm: Any, values: np.ndarray) -> np.ndarray:
    """``Σ_k values_k`` over the ranks, added in rank order, the same bits on every rank.

    For small arrays (a batch norm's moments, an evaluation's sum): every rank gathers every rank's
    ``values`` (one ``MPI_Allgather``) and adds them itself in rank order; IEEE addition is correctly
    rounded, so the same additions in the same order give every rank the same bits. ``values`` is a flat
    host array of the same length and dtype on every rank; the result is a new array.
    """
    values = np.ascontiguousarray(values).reshape(-1)
    if comm is None:
        return values.copy()
    gathered = np.empty((size(comm), values.size), dtype=values.dtype)
    comm.Allgather(values, gathered)
    total = gathered[0].copy()
    for row in gathered[1:]:  # k = 1, …, P − 1: the order is the ranks', not the arrivals'
        total += row
    return total


def _uninitialized(module: Any) -> bool:
    """Whether a layer still waits for its data-dependent start (ActNorm's first batch)."""
    return any(getattr(layer, "initialized", True) is False for layer in module.modules())


def backward(comm: Any, module: Any, batch: np.ndarray, loss_and_backward: Callable[[np.ndarray], float]) -> float:
    """One data-parallel forward/backward of ``module`` on the global ``batch``: the mean loss, gradients in ``grads``.

    ``loss_and_backward(rows)`` is the single-process step (e.g. ``model.nll_and_backward``): it returns
    the mean loss of ``rows`` and adds its gradient to ``module``'s ``grads`` (zeroed by the caller). Each
    rank calls it on its :func:`shard` of ``batch`` (every rank holds the same ``batch``), then
    :func:`reduce_gradients` leaves the global batch's mean gradient on every rank.

    A layer waiting for a data-dependent start (ActNorm) first sees the whole global batch on every rank,
    as it would in one process. An exception on a rank is raised on every rank (:func:`collectively`).
    """
    if comm is None:
        return loss_and_backward(batch)
    n, mine = batch.shape[0], shard(comm, batch.shape[0])
    if n < size(comm) and batch_norms(module):
        raise ValueError(
            f"a batch of {n} rows on {size(comm)} ranks leaves a rank without rows, and its batch norms could not "
            "take part in the batch statistics: use a batch of at least one row per rank"
        )
    error, loss, rows = None, 0.0, batch[mine]
    try:
        if _uninitialized(module):  # the start one process takes from this batch, taken from all of it
            states = [layer.rng.bit_generator.state for layer in drawing_layers(module)]
            running = [{k: v.copy() for k, v in layer.buffers.items() if k.startswith("running_")}
                       for layer in batch_norms(module)]
            loss_and_backward(batch)
            module.zero_grad()
            for layer, state in zip(drawing_layers(module), states, strict=True):
                layer.rng.bit_generator.state = state  # the step below draws this batch's noise again
            for layer, saved in zip(batch_norms(module), running, strict=True):
                for name, value in saved.items():  # ... and moves the running averages again
                    layer.buffers[name][...] = value
        if rows.shape[0]:
            add = partial(sum_in_rank_order, comm)
            with global_draws(module, n, mine), synced_batch_norms(add, module, rows.shape[0], n):
                loss = loss_and_backward(rows)
        else:
            skip_draws(module, n, batch.dtype)
    except Exception as raised:
        if batch_norms(module):
            _abort(comm, raised)
        error = raised
    return reduce_gradients(comm, module, loss, rows.shape[0], n, error)


def _abort(comm: Any, error: BaseException) -> None:
    """End the job from a rank that failed inside a step with batch norms, whose partners wait in a batch statistic.

    The batch norms' reductions sit inside the forward and backward passes, so the other ranks cannot
    reach the step's reduction where an error is shared: the error is printed here and ``MPI_Abort``
    ends every rank (``docs/distributed.md#failures``).
    """
    import sys
    import time
    import traceback

    traceback.print_exception(error, file=sys.stderr)
    print(f"nflow: rank {rank(comm)} of {size(comm)} failed inside a step whose batch norms the other ranks wait "
          f"in ({type(error).__name__}: {error}): aborting the job", file=sys.stderr, flush=True)
    time.sleep(1.0)  # the launcher forwards the message before the abort tears the job down
    comm.Abort(2)


def reduce_gradients(
    comm: Any, module: Any, loss: float, n_local: int, n_global: int, error: BaseException | None = None
) -> float:
    """Replace this rank's shard-mean gradients by the global batch's mean, ``g = Σ_k (n_k/N) g_k`` in rank order,
    the same bits on every rank; return the global batch's mean loss. An error on any rank is raised on every
    rank. By MPI messages, or through the node's shared memory inside :func:`training`
    (:func:`nflow_np.distributed_reduce.reduce_gradients`, where the parameters are described)."""
    return _reduce().reduce_gradients(comm, module, loss, n_local, n_global, error)


def _reduce() -> Any:
    """:mod:`nflow_np.distributed_reduce` (imported on first use: it imports this module)."""
    from nflow_np import distributed_reduce

    return distributed_reduce


def training(comm: Any, module: Any, optimizer: Any = None) -> contextlib.AbstractContextManager:
    """While the block runs, train ``module`` through the node's shared memory, the optimizer's step divided
    between the node's ranks (:func:`nflow_np.distributed_reduce.training`; nothing changes for one process)."""
    return _reduce().training(comm, module, optimizer)


def barrier(comm: Any) -> None:
    """Wait for every rank (nothing for one process): e.g. before every rank overwrites the shared parameters."""
    if comm is not None:
        comm.Barrier()


def evaluate_nll(comm: Any, model: Any, x: np.ndarray, batch_size: int = 8192) -> float:
    """Mean NLL (nats) of the rows of ``x``: each rank sums ``−log p`` over its shard, the sums added in rank order.

    An error on one rank (a row whose density overflows) is raised on every rank, its type kept.
    """
    total = np.zeros(1)
    with collectively(comm):
        for start in range(0, x.shape[0], batch_size):  # one process's batches, each one sharded
            chunk = x[start : start + batch_size]
            mine = shard(comm, chunk.shape[0])
            if mine.stop > mine.start:
                with global_draws(model, chunk.shape[0], mine):
                    total[0] += float(-model.log_prob(chunk[mine]).sum())
            else:
                skip_draws(model, chunk.shape[0], chunk.dtype)
    return float(sum_in_rank_order(comm, total)[0]) / x.shape[0]
