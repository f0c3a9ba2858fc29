"""Normalisation as flows: batch normalisation (RealNVP) and ActNorm (Glow).

Both are per-coordinate affine maps ``z = γ ⊙ (x − μ) / σ + β`` (batch norm optionally shares
``γ, β, μ, σ`` across the pixels of an image channel) whose log-det is ``Σ_j log(γ_j / σ_j)``, the
same for every row. They differ in where ``μ, σ`` come from:

- :class:`BatchNorm` (Dinh et al. 2016, §3.7; Ioffe & Szegedy 2015): in training mode ``μ, σ²``
  are the statistics of the current batch (so every output row, and the log-det, depend on the
  whole batch, and the backward pass goes through the batch mean and variance); in evaluation mode
  they are running averages, and the layer is an ordinary per-row bijection.
- :class:`ActNorm` (Kingma & Dhariwal 2018): a learned ``z = (x + b) ⊙ exp(s)`` whose ``b, s`` are
  set from the first batch it sees (zero mean, unit variance per coordinate), then trained.

Modes: ``BatchNorm.training`` is ``False`` unless switched on; :func:`training_mode` switches it
on for every batch norm in a module for the duration of a ``with`` block (that is what
:meth:`nflow_np.image_models.ImageFlowModel.nll_and_backward` does around a training step).
Derivations: ``docs/images.md#batch-normalisation``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from nflow_np.flows.base import Flow
from nflow_np.module import Module, as_float_dtype
from nflow_np.specs import SpecReader, register_flow


@register_flow("batch_norm", "dim", "momentum", "eps", "channels")
class BatchNorm(Flow):
    """Batch normalisation as a flow layer, per coordinate or per image channel.

    The row ``x: (D,)`` is viewed as ``(C, P)``: ``C = D`` groups of ``P = 1`` (per coordinate, the
    default) or, with ``channels = C``, the ``C`` channels of a ``(C, H, W)`` image with
    ``P = H·W`` pixels each (RealNVP's batch norm: one mean and variance per channel, over the
    batch and the pixels). With ``γ = exp(log_gamma)`` (positive, so the map is invertible) and
    per-group ``μ_c, σ_c²``:

    forward  ``x̂ = (x − μ) / √(σ² + ε)``,  ``z = γ ⊙ x̂ + β``,
             ``logdet = P Σ_c [log γ_c − ½ log(σ_c² + ε)]`` (every row)
    inverse  ``x̂ = (z − β) / γ``,  ``x = x̂ ⊙ √(σ² + ε) + μ``,  ``logdet = −P Σ_c [log γ_c − ½ log(σ_c² + ε)]``

    **Training mode** (``training = True``): ``μ_c, σ_c²`` are the mean and (biased) variance of
    group ``c`` over the ``M = N·P`` entries of the batch, and the running averages move towards
    them, ``r ← (1 − m) r + m · batch`` (``m = momentum``). The backward pass differentiates
    through ``μ`` and ``σ²`` (``g = Σ_n d_logdet[n]``, sums and means over the ``M`` entries of a group):

        ``∂L/∂β = Σ d_z``,   ``∂L/∂log γ = γ ⊙ Σ d_z ⊙ x̂ + P g``,   ``d_x̂ = γ ⊙ d_z``
        ``∂L/∂x = (1/σ̃) ⊙ (d_x̂ − mean d_x̂ − x̂ ⊙ mean(d_x̂ ⊙ x̂)) − g · x̂ / (N σ̃)``

    with ``σ̃ = √(σ² + ε)``; the last term is the log-det's dependence on the batch variance,
    ``P · ∂(−½ log(σ_c² + ε))/∂x = −P x̂ / (M σ̃) = −x̂ / (N σ̃)``. The log-det is the per-row one with
    the batch statistics held fixed, as in RealNVP. There is no inverse in training mode: the
    output does not determine the batch statistics that produced it.

    **Evaluation mode** (``training = False``, the default): ``μ, σ²`` are ``running_mean``,
    ``running_var``; both directions are exact per-row inverses of each other. The running
    averages are **buffers** (:meth:`~nflow_np.module.Module.register_buffer`), not parameters:
    ``state_dict``, model files and ``fit``'s best-parameter restore carry them under the same names
    as ever, but they have no gradient and optimizers (AdamW's weight decay included) never touch them.

    Parameters
    ----------
    dim : int
        ``D``.
    momentum : float
        Weight ``m`` of the new batch in the running averages, in [0, 1] (0 freezes them).
    eps : float
        ``ε > 0`` added to the variance.
    dtype : float32 or float64
    channels : int, optional
        ``C``, a divisor of ``D``: statistics per channel of rows that are C-order ``(C, H, W)``
        images. Default: per coordinate (``C = D``).
    """

    @property
    def invertible_in_backward(self) -> bool:
        # training mode normalises by the batch's own statistics, which the output does not carry
        return not self.training

    def __init__(
        self,
        dim: int,
        momentum: float = 0.1,
        eps: float = 1e-5,
        dtype: object = np.float64,
        channels: int | None = None,
    ) -> None:
        super().__init__(dim)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        channels = self.dim if channels is None else channels
        if isinstance(channels, bool) or not isinstance(channels, int | np.integer) or channels < 1 or dim % channels:
            raise ValueError(f"channels must be a positive divisor of dim {dim}, got {channels!r}")
        dtype = as_float_dtype(dtype)
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.channels = int(channels)
        self.pixels = self.dim // self.channels
        self.training = False
        self.moments = None  # set by nflow_np.distributed: the batch's moments summed over the ranks' shards
        self.add_param("log_gamma", np.zeros(channels, dtype=dtype))
        self.add_param("beta", np.zeros(channels, dtype=dtype))
        self.register_buffer("running_mean", np.zeros(channels, dtype=dtype))
        self.register_buffer("running_var", np.ones(channels, dtype=dtype))

    def spec(self, where: str = "flow") -> dict:
        """``{"kind": "batch_norm", "dim", "momentum", "eps", "channels"}``."""
        return {"kind": "batch_norm", "dim": self.dim, "momentum": self.momentum, "eps": self.eps} | {
            "channels": self.channels
        }

    @classmethod
    def from_spec(cls, read: SpecReader) -> BatchNorm:
        dim = read.dim()
        channels = read.int("channels", 1, dim)
        read.take(4 * channels)
        return cls(dim, read.real("momentum"), read.real("eps"), read.dtype, channels=channels)

    def _view(self, a: np.ndarray) -> np.ndarray:
        """Rows ``(N, D)`` as ``(N, C, P)``: the statistics are over axes 0 and 2."""
        return a.reshape(a.shape[0], self.channels, self.pixels)

    def _group(self, v: np.ndarray) -> np.ndarray:
        """A per-group array ``(C,)`` shaped to broadcast against ``(N, C, P)``."""
        return v[:, None]

    def _logdet(self, inv_std: np.ndarray, like: np.ndarray) -> np.ndarray:
        """The log-det, the same for each of the rows of ``like``, on its device."""
        logdet = self.pixels * (self.params["log_gamma"] + np.log(inv_std)).sum()
        return np.zeros_like(like, shape=like.shape[0]) + logdet

    def update_running(self, mean: np.ndarray, var: np.ndarray) -> None:
        """Move the running averages towards a batch's ``mean, var: (C,)``: ``r ← (1 − m) r + m · batch``."""
        m = self.buffers["running_mean"].dtype.type(self.momentum)
        self.buffers["running_mean"] *= 1 - m
        self.buffers["running_mean"] += m * mean
        self.buffers["running_var"] *= 1 - m
        self.buffers["running_var"] += m * var

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p, g = self.params | self.buffers, self._group
        xv = self._view(x)
        if self.training:
            if self.moments is None:
                mean, var = xv.mean(axis=(0, 2)), xv.var(axis=(0, 2))
            else:  # the moments over every rank's shard of the batch
                mean, var = self.moments.mean_var(xv)
            self.update_running(mean, var)
        else:
            mean, var = p["running_mean"], p["running_var"]
        inv_std = 1 / np.sqrt(var + self.eps)
        x_hat = (xv - g(mean)) * g(inv_std)
        z = x_hat * g(np.exp(p["log_gamma"])) + g(p["beta"])
        self._remember("forward", x.shape[0], (self.training, x_hat, inv_std))
        return z.reshape(x.shape), self._logdet(inv_std, x)

    def _inverse(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.training:
            raise RuntimeError(
                "BatchNorm has no inverse in training mode (the batch statistics are not known from "
                "the output); set training = False to use the running averages"
            )
        p, g = self.params | self.buffers, self._group
        inv_std = 1 / np.sqrt(p["running_var"] + self.eps)
        x_hat = (self._view(z) - g(p["beta"])) * g(np.exp(-p["log_gamma"]))
        x = x_hat / g(inv_std) + g(p["running_mean"])
        self._remember("inverse", z.shape[0], (False, x_hat, inv_std))
        return x.reshape(z.shape), -self._logdet(inv_std, z)

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        direction, (training, x_hat, inv_std) = self._cache
        g = self._group
        gamma = np.exp(self.params["log_gamma"])
        d_logdet_sum = d_logdet.sum() * self.pixels  # ∂L/∂(Σ_c …) of the log-det, summed over the rows
        d_out = self._view(d_out)
        axes = (0, 2)
        if direction == "inverse":
            # x = x̂ σ̃ + μ with x̂ = (z − β)/γ; logdet = −P Σ (log γ + log(1/σ̃)).
            d_z = d_out / g(gamma * inv_std)
            d_out_x_hat = (d_out * x_hat).sum(axis=axes)
            self.grads["beta"] -= d_z.sum(axis=axes)
            self.grads["log_gamma"] -= d_out_x_hat / inv_std + d_logdet_sum
            return d_z.reshape(d_z.shape[0], -1)
        d_z_x_hat = (d_out * x_hat).sum(axis=axes)
        self.grads["beta"] += d_out.sum(axis=axes)
        self.grads["log_gamma"] += gamma * d_z_x_hat + d_logdet_sum
        d_x_hat = d_out * g(gamma)
        if not training:
            d_x = d_x_hat * g(inv_std)
            return d_x.reshape(d_x.shape[0], -1)
        if self.moments is None:
            mean_d = d_x_hat.mean(axis=axes, keepdims=True)
            mean_d_x_hat = (d_x_hat * x_hat).mean(axis=axes, keepdims=True)
            mean_d_logdet = d_logdet.sum() / d_out.shape[0]
        else:  # the means over every rank's shard of the batch
            mean_d, mean_d_x_hat, mean_d_logdet = self.moments.backward_means(d_x_hat, x_hat, d_logdet)
        d_x = d_x_hat - mean_d
        d_x -= x_hat * mean_d_x_hat
        d_x -= mean_d_logdet * x_hat  # the log-det's dependence on the batch variance
        d_x *= g(inv_std)
        return d_x.reshape(d_x.shape[0], -1)


@register_flow("actnorm", "dim", "initialized")
class ActNorm(Flow):
    """Glow's activation normalisation ``z = (x + b) ⊙ exp(s)`` with data-dependent initialisation.

    forward  ``z = (x + b) ⊙ e^s``,     ``logdet = Σ_j s_j``
    inverse  ``x = z ⊙ e^{−s} − b``,    ``logdet = −Σ_j s_j``

    On its first forward call (while ``initialized`` is False) it sets ``b = −mean_n x`` and
    ``s = −log(std_n x + 10⁻⁶)`` so that this batch comes out with zero mean and unit variance per
    coordinate; from then on ``b, s`` are ordinary trained parameters. ``initialized`` is saved with
    the model, so a loaded model is not re-initialised.

    Backward, forward direction: ``∂L/∂x = d_z ⊙ e^s``, ``∂L/∂b = Σ_n d_z ⊙ e^s``,
    ``∂L/∂s = Σ_n d_z ⊙ z + Σ_n d_logdet``. Inverse direction: ``∂L/∂z = d_x ⊙ e^{−s}``,
    ``∂L/∂b = −Σ_n d_x``, ``∂L/∂s = −Σ_n d_x ⊙ (x + b) − Σ_n d_logdet``.

    Parameters
    ----------
    dim : int
    dtype : float32 or float64
    """

    def __init__(self, dim: int, dtype: object = np.float64) -> None:
        super().__init__(dim)
        dtype = as_float_dtype(dtype)
        self.initialized = False
        self.add_param("bias", np.zeros(dim, dtype=dtype))
        self.add_param("log_scale", np.zeros(dim, dtype=dtype))

    def spec(self, where: str = "flow") -> dict:
        """``{"kind": "actnorm", "dim", "initialized"}``."""
        return {"kind": "actnorm", "dim": self.dim, "initialized": self.initialized}

    @classmethod
    def from_spec(cls, read: SpecReader) -> ActNorm:
        dim, initialized = read.dim(), read.bool("initialized")
        read.take(2 * dim)
        layer = cls(dim, dtype=read.dtype)
        layer.initialized = initialized
        return layer

    def initialize(self, x: np.ndarray) -> None:
        """Set ``b, s`` so that ``x: (N, D)`` maps to zero mean and unit variance per coordinate."""
        self.params["bias"][...] = -x.mean(axis=0)
        self.params["log_scale"][...] = -np.log(x.std(axis=0) + 1e-6)
        self.initialized = True

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.initialized:
            self.initialize(x)
        log_scale = self.params["log_scale"]
        z = (x + self.params["bias"]) * np.exp(log_scale)
        self._remember("forward", x.shape[0], z)
        return z, np.zeros_like(x, shape=x.shape[0]) + log_scale.sum()

    def _inverse(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        log_scale = self.params["log_scale"]
        shifted = z * np.exp(-log_scale)  # x + b
        self._remember("inverse", z.shape[0], shifted)
        return shifted - self.params["bias"], np.zeros_like(z, shape=z.shape[0]) - log_scale.sum()

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        direction, cached = self._cache
        log_scale = self.params["log_scale"]
        if direction == "forward":
            d_x = d_out * np.exp(log_scale)
            self.grads["bias"] += d_x.sum(axis=0)
            self.grads["log_scale"] += (d_out * cached).sum(axis=0) + d_logdet.sum()
            return d_x
        self.grads["bias"] -= d_out.sum(axis=0)
        self.grads["log_scale"] -= (d_out * cached).sum(axis=0) + d_logdet.sum()
        return d_out * np.exp(-log_scale)


def batch_norms(module: Module) -> Iterator[BatchNorm]:
    """Every :class:`BatchNorm` inside ``module`` (itself included)."""
    return (m for m in module.modules() if isinstance(m, BatchNorm))


def recalibrate(module: Module, forward: object, x: np.ndarray) -> None:
    """Set every batch norm's running averages to the exact statistics of its inputs over ``x``.

    Runs ``forward(x)`` once with all batch norms in training mode and momentum 1, so each layer
    normalises with, and stores, the statistics of the whole of ``x`` as it arrives at that layer
    (the layers before it already normalising with their new statistics, exactly as in evaluation
    mode afterwards). Running averages lag behind parameters that move fast; this replaces them
    by the population statistics of (a sample of) the training data.

    Parameters
    ----------
    module : Module
        Holds the batch norms (e.g. a model's flow).
    forward : callable
        Runs the data through ``module`` (e.g. ``model.log_prob``).
    x : numpy.ndarray
        Training rows (or images) as ``forward`` takes them.
    """
    layers = list(batch_norms(module))
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 1.0
    try:
        with training_mode(module):
            forward(x)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum


@contextmanager
def training_mode(module: Module) -> Iterator[Module]:
    """Put every :class:`BatchNorm` in ``module`` in training mode inside the ``with`` block.

    Each layer's previous mode is restored on exit, also after an exception.
    """
    layers = list(batch_norms(module))
    previous = [layer.training for layer in layers]
    for layer in layers:
        layer.training = True
    try:
        yield module
    finally:
        for layer, mode in zip(layers, previous, strict=True):
            layer.training = mode
