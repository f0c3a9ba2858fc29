"""What a data-parallel step does to layers that look beyond their own row (``docs/distributed.md``).

Two kinds of layer would make a rank's shard step differ from its rows' part of the one-process step:

- a layer that draws noise in its forward pass from a generator of its own (``rng``: dequantisation):
  each rank draws the noise of the **whole** batch and keeps its shard's rows (:class:`ShardOfGlobalDraws`),
  so every row gets the noise one process gives it and every rank's generator advances alike;
- a batch norm in training mode, which normalises by the batch's moments: its ``moments`` slot gets a
  :class:`SyncedMoments`, which sums the shards' moments over the ranks in its forward and backward passes.

:mod:`nflow_np.distributed` installs both for the duration of a shard's step (:func:`global_draws`,
:func:`synced_batch_norms`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from nflow_np import backend


class ShardOfGlobalDraws:
    """A layer's generator, seen by a rank: each draw for the shard's rows is the slice of one draw for all rows.

    So a layer that draws per-row noise in its forward pass (dequantisation) gives each row the noise one
    process would have given it, and every rank's generator advances alike (by the whole batch's draws).
    """

    def __init__(self, rng: np.random.Generator, n_global: int, rows: slice) -> None:
        self.rng, self.n_global, self.rows = rng, n_global, rows

    def _slice(self, method: str, shape: tuple, **kwargs: object) -> np.ndarray:
        return getattr(self.rng, method)((self.n_global, *tuple(shape)[1:]), **kwargs)[self.rows]

    def random(self, size: tuple, dtype: object = np.float64) -> np.ndarray:
        return self._slice("random", size, dtype=dtype)

    def standard_normal(self, size: tuple, dtype: object = np.float64) -> np.ndarray:
        return self._slice("standard_normal", size, dtype=dtype)


def drawing_layers(module: Any) -> list[Any]:
    """The layers that draw from a NumPy generator of their own in the forward pass (``rng``)."""
    return [layer for layer in module.modules() if isinstance(getattr(layer, "rng", None), np.random.Generator)]


@contextlib.contextmanager
def global_draws(module: Any, n_global: int, rows: slice) -> Iterator[None]:
    """Inside the block, the drawing layers of ``module`` draw for ``n_global`` rows and keep ``rows``."""
    layers = drawing_layers(module)
    for layer in layers:
        layer.rng = ShardOfGlobalDraws(layer.rng, n_global, rows)
    try:
        yield
    finally:
        for layer in layers:
            layer.rng = layer.rng.rng


def skip_draws(module: Any, n_global: int, dtype: np.dtype) -> None:
    """An empty shard: advance each drawing layer's generator as the others' do (``n_global`` rows of ``dtype``)."""
    for layer in drawing_layers(module):
        layer.rng.random((n_global, layer.dim), dtype=dtype)


class SyncedMoments:
    """A batch norm's moments over the whole global batch, for a rank that holds shard ``k`` (``docs/distributed.md``).

    ``add`` is the sum over the ranks (:func:`nflow_np.distributed.sum_in_rank_order`).
    Forward: ``μ = Σ_k Σ_{S_k} x / (N·P_pixels)`` and ``σ² = Σ_k Σ_{S_k} (x − μ)² / (N·P_pixels)`` (two passes, as
    ``numpy.var``). Backward: the three batch means of the backward pass (``docs/images.md#batch-normalisation``)
    over every row. A rank's upstream gradients carry its shard's scale ``1/n_k``, the batch's carry ``1/N``:
    each rank's sums are weighted by ``w_k = n_k/N`` before they are added, and the batch means are handed
    back in the shard's scale (divided by ``w_k``), so that the reduction after the backward pass (which
    weights by ``w_k`` again) yields the global batch's gradient.
    """

    def __init__(self, add: Callable[[np.ndarray], np.ndarray], weight: float, n_global: int) -> None:
        self.add, self.weight, self.n_global = add, weight, n_global

    def _sum(self, local: np.ndarray, like: np.ndarray) -> np.ndarray:
        host = np.asarray(backend.to_host(local)).reshape(-1)
        return backend.array_module(like).asarray(self.add(host))

    def mean_var(self, xv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(μ, σ²)``, each ``(C,)``, of the global batch, from this shard's ``xv: (n_k, C, P)``."""
        entries = self.n_global * xv.shape[2]
        mean = self._sum(xv.sum(axis=(0, 2)), xv) / entries
        var = self._sum(((xv - mean[:, None]) ** 2).sum(axis=(0, 2)), xv) / entries
        return mean, var

    def backward_means(
        self, d_x_hat: np.ndarray, x_hat: np.ndarray, d_logdet: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``mean d_x̂``, ``mean d_x̂ ⊙ x̂`` (each ``(1, C, 1)``) and ``Σ d_logdet / N`` over the batch, shard's scale."""
        channels, entries = d_x_hat.shape[1], self.n_global * d_x_hat.shape[2]
        w = d_x_hat.dtype.type(self.weight)
        sums = (d_x_hat.sum(axis=(0, 2)), (d_x_hat * x_hat).sum(axis=(0, 2)), d_logdet.sum().reshape(1))
        local = np.concatenate([backend.to_host(part) for part in sums]) * w
        total = self._sum(local, d_x_hat) / w
        mean_d = (total[:channels] / entries).reshape(1, channels, 1)
        mean_d_x_hat = (total[channels : 2 * channels] / entries).reshape(1, channels, 1)
        return mean_d, mean_d_x_hat, total[2 * channels] / self.n_global


def batch_norms(module: Any) -> list[Any]:
    """The layers that normalise by batch statistics (they carry a ``moments`` slot: BatchNorm)."""
    return [layer for layer in module.modules() if hasattr(layer, "moments") and "running_mean" in layer.buffers]


@contextlib.contextmanager
def synced_batch_norms(
    add: Callable[[np.ndarray], np.ndarray], module: Any, n_local: int, n_global: int
) -> Iterator[None]:
    """Inside the block, every batch norm of ``module`` normalises by the global batch's moments."""
    layers = batch_norms(module)
    for layer in layers:
        layer.moments = SyncedMoments(add, n_local / n_global, n_global)
    try:
        yield
    finally:
        for layer in layers:
            layer.moments = None
