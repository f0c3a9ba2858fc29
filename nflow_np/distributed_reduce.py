"""The reduction of a data-parallel step, ``g = Σ_k (n_k/N) g_k`` in rank order (``docs/distributed.md``).

Two ways, the same bits. **By messages** (:func:`reduce_gradients` outside :func:`training`, or for a GPU
model): one flat buffer per rank, a reduce-scatter whose additions run in rank order and an all-gather.

**Through a node's shared memory** (``docs/distributed.md#shared-memory``): while :func:`training` is
active, the ranks of one node (``MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)``) keep in one MPI-3 window

- the parameters ``θ`` (one copy: every rank's ``params`` are views of it) and the optimizer's state;
- one **region** per rank, ``[g_k (every gradient, in named_parameters order), L_k, failed_k]``: rank ``k``'s
  ``grads`` are views of its region, so the backward pass writes its gradients straight into shared memory.

A step (:meth:`SharedStep.reduce`, then the optimizer): barrier; local rank ``r`` of ``R`` sums columns
``[c_r, c_{r+1})`` of the regions in rank order, ``t = w_0 g_0; t += w_1 g_1; …``, and writes ``t`` into
every region (one pass, :func:`sum_regions`); barrier: every region holds the global gradient. Every
rank checks the norm, and the optimizer updates only columns ``[c_r, c_{r+1})`` of ``θ`` and of its
state (:attr:`nflow_np.optim.Optimizer.partition`, ZeRO stage 1); barrier: ``θ`` is updated for all.
Each element is summed by one rank in rank order and updated by one rank from those bits, so the
result is the bits of the message path followed by the whole update on every rank. Across nodes the
node leaders (local rank 0) add their nodes' sums in node order by the message path, and every node
updates its own copy of ``θ`` alike. ``NFLOW_MPI_RANKS_PER_NODE=k`` treats each ``k`` consecutive ranks as
a node (to test the path across nodes on one machine); ``NFLOW_MPI_SHARED=0`` turns the shared path off.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from nflow_np import backend
from nflow_np.distributed import _mpi, _raise_agreed, rank, size

RANKS_PER_NODE_VARIABLE = "NFLOW_MPI_RANKS_PER_NODE"
SHARED_VARIABLE = "NFLOW_MPI_SHARED"
ALIGN = 16
"""Columns are cut at multiples of 16 elements (a 64-byte cache line of float32), so that two ranks
never write the same cache line."""

ACTIVE: dict[int, SharedStep] = {}
"""The step in force for a module (by ``id``), looked up by :func:`nflow_np.distributed.reduce_gradients`."""


def sum_regions(regions: np.ndarray, weights: np.ndarray, start: int, stop: int) -> None:
    """``regions[k, start:stop] ← Σ_j w_j regions[j, start:stop]`` for every row ``k``, terms in row order.

    The reference of the fused kernel (``kernels.adam.numba_cpu.sum_regions``). Each term ``w_j · x`` is
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
    mpi = _mpi()
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
        mpi = _mpi()
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
        counts = [shard_size(k, size(self.comm), n_global) for k in self.ranks]
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
                reduce_flat(self.leaders, own[: m + 2])
            self.node.Barrier()
            if self.local:
                own[: m + 2] = self.regions[0, : m + 2]
            summed = own[m : m + 2].copy()
            self.node.Barrier()  # before the leader's next step writes region 0 again
        _raise_agreed(self.comm, int(summed[1]), error)
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
                if comm != _mpi().COMM_NULL:
                    comm.Free()


def shard_size(k: int, p: int, n: int) -> int:
    """``n_k = ⌊n/P⌋ + [k < n mod P]``: the rows of rank ``k`` (:func:`nflow_np.distributed.shard`)."""
    quotient, remainder = divmod(n, p)
    return quotient + (k < remainder)


def shareable(comm: Any, module: Any, optimizer: Any) -> bool:
    """Whether :func:`training` shares ``module``'s step over ``comm``: two or more ranks, not switched off,
    host NumPy parameters of one float dtype, C-contiguous, and an optimizer of this module (or none)."""
    if comm is None or size(comm) == 1 or os.environ.get(SHARED_VARIABLE, "1") == "0":
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
    if comm is None or size(comm) == 1 or not comm.allreduce(int(shareable(comm, module, optimizer)), op=_mpi().MIN):
        yield None  # (every rank takes the same way, even were one rank's model on another device)
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


def reduce_gradients(
    comm: Any, module: Any, loss: float, n_local: int, n_global: int, error: BaseException | None = None
) -> float:
    """Replace this rank's shard-mean gradients by the global batch's mean: ``g = Σ_k (n_k/N) g_k`` in rank order.

    One flat buffer ``[w·g_k (every parameter, in named_parameters order), w·L_k, failed]`` with
    ``w = n_local / n_global``, cut into ``P`` blocks: rank ``j`` receives block ``j`` of every rank
    (``MPI_Alltoall``), adds them in rank order, and every rank receives every summed block
    (``MPI_Allgather``): a reduce-scatter and an all-gather, each element added by one rank in rank
    order, so every rank holds the same bits. Each gradient array is then overwritten with its slice.
    The buffers have the gradients' dtype and are kept between steps. With one rank nothing is sent:
    the weight is 1 and the sum has one term.

    Parameters
    ----------
    comm : mpi4py communicator or None
    module : Module
        Its ``grads`` hold the mean gradient of this rank's ``n_local`` rows.
    loss : float
        Mean loss of those rows (ignored if ``n_local`` is 0).
    n_local, n_global : int
        Rows of this rank's shard and of the global batch.
    error : Exception, optional
        What this rank raised while computing its shard: every rank then raises it.

    Returns
    -------
    float
        The global batch's mean loss, the same on every rank.
    """
    if comm is None or size(comm) == 1:  # w = 1 and a sum of one term: the gradients as they are
        if error is not None:
            raise error
        return loss
    shared = ACTIVE.get(id(module))
    if shared is not None and shared.comm is comm:  # inside training(): through the node's shared memory
        return shared.reduce(loss, n_local, n_global, error)
    grads = [grad for _, _, grad in module.named_parameters()]
    dtype = grads[0].dtype if grads else np.dtype(np.float64)
    sizes = [grad.size for grad in grads]
    blocks, received = _buffers(comm, sum(sizes) + 2, dtype)
    buffer = blocks.reshape(-1)[: sum(sizes) + 2]  # block j (padded) is what rank j sums
    weight = n_local / n_global
    if error is None and n_local:
        offset = 0
        for grad, count in zip(grads, sizes, strict=True):
            np.multiply(backend.to_host(grad).reshape(-1), dtype.type(weight), out=buffer[offset : offset + count])
            offset += count
        buffer[-2] = weight * loss
    else:
        buffer[:-1] = 0
    buffer[-1] = error is not None
    _sum_blocks(comm, blocks, received)
    total = buffer
    _raise_agreed(comm, int(total[-1]), error)
    offset = 0
    for grad, count in zip(grads, sizes, strict=True):
        values = total[offset : offset + count].reshape(grad.shape)
        grad[...] = values if isinstance(grad, np.ndarray) else backend.array_module(grad).asarray(values)
        offset += count
    return float(total[-2])


def _sum_blocks(comm: Any, blocks: np.ndarray, received: np.ndarray) -> None:
    """Every rank's ``blocks`` replaced by their sum over the ranks, each block summed by one rank in rank order.

    ``MPI_Alltoall`` (``received[i]`` = rank ``i``'s block ``k``), the ``P`` copies added in rank order
    by rank ``k``, ``MPI_Allgather`` of the summed blocks: the same bits on every rank.
    """
    comm.Alltoall(blocks, received)
    mine = blocks[rank(comm)]
    np.copyto(mine, received[0])
    for row in received[1:]:  # i = 1, …, P − 1: the order is the ranks', not the arrivals'
        mine += row
    comm.Allgather(_mpi().IN_PLACE, blocks)  # every rank's summed block, to every rank


def reduce_flat(comm: Any, values: np.ndarray) -> None:
    """``values`` (a flat host array, the same length and dtype on every rank) replaced in place by its sum
    over the ranks in rank order, the bits of :func:`reduce_gradients`' sum (between node leaders)."""
    blocks, received = _buffers(comm, values.size, values.dtype)
    flat = blocks.reshape(-1)
    flat[: values.size] = values
    _sum_blocks(comm, blocks, received)
    values[...] = flat[: values.size]


_BUFFERS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _buffers(comm: Any, count: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The reduction's two ``(P, ⌈count/P⌉)`` buffers (blocks sent, blocks received), kept between steps.

    Fresh pages every step would cost a page fault each; every step overwrites them (the padding stays 0).
    """
    p = size(comm)
    key = (id(comm), p, count, np.dtype(dtype).str)
    if key not in _BUFFERS:
        _BUFFERS.clear()  # one model trains at a time: keep only its buffers
        block = -(-count // p)
        _BUFFERS[key] = (np.zeros((p, block), dtype=dtype), np.zeros((p, block), dtype=dtype))
    return _BUFFERS[key]
