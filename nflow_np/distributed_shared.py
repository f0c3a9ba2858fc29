"""The data-parallel step through a node's shared memory, with the optimizer step divided between its ranks.

``docs/distributed.md#shared-memory`` derives it. While :func:`training` is active, the ranks of one node
(``MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)``) keep in one MPI-3 shared window

- the parameters ``θ`` (one copy, every rank's ``params`` are views of it) and the optimizer's state;
- one **region** per rank, ``[g_k (every gradient, in named_parameters order), L_k, failed_k]``: rank ``k``'s
  ``grads`` are views of its region, so the backward pass writes its gradients straight into shared memory.

A step (:meth:`SharedStep.reduce`, then the optimizer): barrier; local rank ``r`` of ``R`` sums columns
``[c_r, c_{r+1})`` of the regions in rank order, ``t = w_0 g_0; t += w_1 g_1; …`` (``w_k = n_k / N``), and
writes ``t`` into every region (one pass, :func:`sum_regions`); barrier: every region holds the global
gradient. Every rank checks the norm, and the optimizer updates only columns ``[c_r, c_{r+1})`` of ``θ``
and of its state (:attr:`nflow_np.optim.Optimizer.partition`); barrier: ``θ`` is updated for all. Each
element is summed by one rank in the order of the ranks and updated by one rank from those bits, so the
result is the bits of :func:`nflow_np.distributed.reduce_gradients` followed by the whole update on every
rank. Across nodes the node leaders (local rank 0) reduce their nodes' sums in node order by the
reduce-scatter + all-gather of :mod:`nflow_np.distributed`, then every node updates its own copy of ``θ``
alike. ``NFLOW_MPI_RANKS_PER_NODE=k`` treats each ``k`` consecutive ranks as a node (to test the path across
nodes on one machine); ``NFLOW_MPI_SHARED=0`` turns the whole path off (every rank then keeps its own
parameters and repeats the whole update).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from nflow_np import backend, distributed

RANKS_PER_NODE_VARIABLE = "NFLOW_MPI_RANKS_PER_NODE"
SHARED_VARIABLE = "NFLOW_MPI_SHARED"
ALIGN = 16
"""Columns are cut at multiples of 16 elements (a 64-byte cache line of float32), so that two ranks
never write the same cache line."""

ACTIVE: dict[int, SharedStep] = {}
"""The step in force for a module (by ``id``), looked up by :func:`nflow_np.distributed.reduce_gradients`."""


def sum_regions(regions: np.ndarray, weights: np.ndarray, start: int, stop: int) -> None:
    """``regions[k, start:stop] ← Σ_j w_j regions[j, start:stop]`` for every row ``k``, terms in row order.

    The reference of the fused kernel (``kernels.numba_optim.sum_regions``). Each term ``w_j · x`` is
    rounded once to the regions' dtype and added in the order ``j = 0, 1, …``; a row of weight ``0``
    (an empty shard, a failed rank) adds ``+0`` and is never read into a product. These are the
    additions :func:`nflow_np.distributed.reduce_gradients` makes, so the bits are its bits.

    Parameters
    ----------
    regions : numpy.ndarray, shape (P, n)
    weights : numpy.ndarray, shape (P,), regions' dtype
    start, stop : int
        The columns summed.
    """
    part = regions[:, start:stop]
    total = part[0] * weights[0] if weights[0] != 0 else np.zeros_like(part[0])
    for row, weight in zip(part[1:], weights[1:], strict=True):
        total += row * weight if weight != 0 else 0
    part[...] = total


def _split(comm: Any) -> tuple[Any, Any]:
    """``(node, leaders)``: the ranks sharing this one's memory, and the communicator of each node's rank 0
    (``MPI.COMM_NULL`` on the others), both ordered as ``comm``."""
    mpi = distributed._mpi()
    me = comm.Get_rank()
    forced = os.environ.get(RANKS_PER_NODE_VARIABLE, "")
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"{RANKS_PER_NODE_VARIABLE} must be a positive integer, got {forced!r}")
        node = comm.Split(me // int(forced), me)
    else:
        node = comm.Split_type(mpi.COMM_TYPE_SHARED, key=me)
    leaders = comm.Split(0 if node.Get_rank() == 0 else mpi.UNDEFINED, me)
    return node, leaders


class _Partition:
    """What :attr:`nflow_np.optim.Optimizer.partition` holds: this rank's columns of each parameter, and the
    barrier after the update."""

    def __init__(self, slices: dict[str, slice], done: Any) -> None:
        self.slices, self.done = slices, done


class SharedStep:
    """The shared window of a node, the module's and the optimizer's arrays swapped for views of it.

    Made by :func:`training`; :meth:`reduce` replaces the reduction of
    :func:`nflow_np.distributed.reduce_gradients`, :meth:`close` gives every array back as a private copy.

    Parameters
    ----------
    comm : mpi4py communicator
        Of two or more ranks.
    module : Module
        Host NumPy parameters of one float dtype, C-contiguous.
    optimizer : Optimizer or None
        Of ``module``; its state is shared and its step divided (``None``: only the reduction is shared).
    """

    def __init__(self, comm: Any, module: Any, optimizer: Any) -> None:
        mpi = distributed._mpi()
        self.comm, self.module, self.optimizer = comm, module, optimizer
        self.node, self.leaders = _split(comm)
        self.local, ranks = self.node.Get_rank(), self.node.Get_size()
        self.ranks = self.node.allgather(comm.Get_rank())  # the global ranks of this node, in order
        self.nodes = comm.allreduce(int(self.local == 0))
        self.owners = [(owner, key, prefix + key) for owner, prefix in module._named_modules() for key in owner.params]
        first = self.owners[0][0].params[self.owners[0][1]]
        dtype, sizes = first.dtype, [owner.params[key].size for owner, key, _ in self.owners]
        self.size = total = sum(sizes)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        stride = -(-(total + 2) // ALIGN) * ALIGN
        buffers = list(optimizer.state) if optimizer is not None else []
        count = stride * (1 + len(buffers) + ranks)
        self.window = mpi.Win.Allocate_shared(count * dtype.itemsize if self.local == 0 else 0, dtype.itemsize,
                                              comm=self.node)
        memory = np.frombuffer(self.window.Shared_query(0)[0], dtype=dtype, count=count)
        params = memory[:stride]
        state = {buffer: memory[(1 + i) * stride : (2 + i) * stride] for i, buffer in enumerate(buffers)}
        self.regions = memory[(1 + len(buffers)) * stride :].reshape(ranks, stride)
        views = list(zip(self.owners, self.offsets, self.offsets[1:], strict=False))
        if self.local == 0:  # every rank holds the same values: one copies them in
            for (owner, key, name), low, high in views:
                params[low:high] = owner.params[key].reshape(-1)
                for buffer in buffers:
                    state[buffer][low:high] = backend.to_host(optimizer.state[buffer][name]).reshape(-1)
        self.node.Barrier()
        for (owner, key, name), low, high in views:
            shape = owner.params[key].shape
            owner.params[key] = params[low:high].reshape(shape)
            own = self.regions[self.local, low:high].reshape(shape)
            own[...] = owner.grads[key]
            owner.grads[key] = own
            for buffer in buffers:
                optimizer.state[buffer][name] = state[buffer][low:high].reshape(shape)
        bounds = [min(total, (r * total // ranks) // ALIGN * ALIGN) for r in range(ranks)] + [total]
        self.columns = bounds[self.local], bounds[self.local + 1]
        if optimizer is not None:
            mine = {}
            for (_, _, name), low, high in views:
                start, stop = max(low, self.columns[0]), min(high, self.columns[1])
                if start < stop:
                    mine[name] = slice(start - low, stop - low)
            optimizer.partition = _Partition(mine, self.node.Barrier)

    def reduce(self, loss: float, n_local: int, n_global: int, error: BaseException | None) -> float:
        """The reduction of :func:`nflow_np.distributed.reduce_gradients` through the window: same arguments,
        same result, the global gradient left in every rank's ``grads``."""
        own, m = self.regions[self.local], self.size
        counts = [shard_size(k, distributed.size(self.comm), n_global) for k in self.ranks]
        own[m] = (n_local / n_global) * loss if error is None and n_local else 0
        own[m + 1] = error is not None
        self.node.Barrier()  # every shard's gradient is in its region
        tails = self.regions[:, m : m + 2].copy()
        cast = own.dtype.type
        weights = np.array([cast(n / n_global) if n and not failed else cast(0) for n, failed in
                            zip(counts, tails[:, 1], strict=True)], dtype=own.dtype)
        summed = tails[0].copy()
        for row in tails[1:]:  # the loss and the failure count, in rank order like the gradients
            summed += row
        backend.fused("sum_regions", sum_regions)(self.regions, weights, *self.columns)
        self.node.Barrier()  # every region holds this node's sum
        if self.nodes > 1:  # the node leaders add the nodes' sums in node order; each node takes the result
            if self.local == 0:
                own[m : m + 2] = summed
                distributed.reduce_flat(self.leaders, own[: m + 2])
            self.node.Barrier()
            if self.local:
                own[: m + 2] = self.regions[0, : m + 2]
            summed = own[m : m + 2].copy()
            self.node.Barrier()  # before the leader's next step writes region 0 again
        distributed._raise_agreed(self.comm, int(summed[1]), error)
        return float(summed[0])

    def close(self, free: bool) -> None:
        """Give the module and the optimizer private copies of their arrays again; ``free``: release the
        window (collective: every rank of the node must call it, so only on a normal exit)."""
        for (owner, key, name), _, _ in zip(self.owners, self.offsets, self.offsets[1:], strict=False):
            owner.params[key] = owner.params[key].copy()
            owner.grads[key] = owner.grads[key].copy()
            if self.optimizer is not None:
                for arrays in self.optimizer.state.values():
                    arrays[name] = arrays[name].copy()
        if self.optimizer is not None:
            self.optimizer.partition = None
        self.regions = None
        if free:
            self.window.Free()
            for comm in (self.node, self.leaders):
                if comm != distributed._mpi().COMM_NULL:
                    comm.Free()


def shard_size(k: int, p: int, n: int) -> int:
    """``n_k = ⌊n/P⌋ + [k < n mod P]``: the rows of rank ``k`` (:func:`nflow_np.distributed.shard`)."""
    quotient, remainder = divmod(n, p)
    return quotient + (k < remainder)


def shareable(comm: Any, module: Any, optimizer: Any) -> bool:
    """Whether :func:`training` shares ``module``'s step over ``comm``: two or more ranks, not switched off,
    host NumPy parameters of one float dtype, C-contiguous, and an optimizer of this module (or none)."""
    if comm is None or distributed.size(comm) == 1 or os.environ.get(SHARED_VARIABLE, "1") == "0":
        return False
    arrays = [array for _, param, grad in module.named_parameters() for array in (param, grad)]
    if not arrays or id(module) in ACTIVE:
        return False
    if not all(type(a) is np.ndarray and a.flags.c_contiguous and a.dtype == arrays[0].dtype for a in arrays):
        return False
    if optimizer is None:
        return True
    state = [value for values in optimizer.state.values() for value in values.values()]
    return (optimizer.module is module and optimizer.partition is None
            and all(type(value) is np.ndarray for value in state))


@contextlib.contextmanager
def training(comm: Any, module: Any, optimizer: Any = None) -> Iterator[SharedStep | None]:
    """Train ``module`` with ``optimizer`` through the node's shared memory while the block runs.

    Collective: every rank of ``comm`` enters it. Where :func:`shareable` says no (one process, a GPU
    model), nothing changes and the block gets ``None``. Inside, every rank's parameters and optimizer
    state are views of the node's one copy: only the optimizer's divided step (and writes of the same
    values on every rank, such as restoring saved parameters) may change them. At the end the module and
    the optimizer hold private copies again, with the values they had.
    """
    if not shareable(comm, module, optimizer):
        yield None
        return
    step = SharedStep(comm, module, optimizer)
    ACTIVE[id(module)] = step
    finished = False
    try:
        yield step
        finished = True
    finally:
        del ACTIVE[id(module)]
        step.close(free=finished)
