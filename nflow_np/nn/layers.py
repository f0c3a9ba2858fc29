"""Neural-network layers for the coupling functions ``c(·)``, with hand-written backward passes.

Protocol (cs231n-style, one cache per layer): ``forward(x)`` computes the output and keeps exactly
what ``backward`` needs; ``backward(d_y)`` returns ``d_x = ∂L/∂x`` and *adds* ``∂L/∂θ`` to
``grads``. Shapes: ``x: (N, D_in)``, ``y: (N, D_out)``. Derivations: ``docs/nn.md``.
"""

from __future__ import annotations

import numpy as np

from nflow_np import backend
from nflow_np.gemm import matmul
from nflow_np.module import Module, as_float_dtype
from nflow_np.nn import bias_activation


class Layer(Module):
    """A differentiable map ``y = layer(x)`` on row batches."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Return ``y`` for ``x: (N, D_in)`` and cache what :meth:`backward` needs."""
        raise NotImplementedError

    def backward(self, d_y: np.ndarray) -> np.ndarray:
        """Given ``∂L/∂y: (N, D_out)`` of the last forward call, return ``∂L/∂x``; accumulate grads."""
        raise NotImplementedError


INITS = ("glorot", "he", "zeros")
"""Initialisations of a linear map's ``W`` (``b`` always starts at 0), ``n_in, n_out`` its fan-in and fan-out:

- ``"glorot"`` (Glorot & Bengio 2010): ``W ~ U(−a, a)``, ``a = √(6 / (n_in + n_out))``, variance
  ``2 / (n_in + n_out)``: keeps the variance of activations and of gradients about constant through
  layers whose activation is near-linear at 0 (tanh). The default.
- ``"he"`` (He et al. 2015): ``W ~ U(−a, a)``, ``a = √(6 / n_in)``, variance ``2 / n_in``: ReLU zeroes
  half of its inputs, and the factor 2 makes up for it, so activations keep their scale through ReLUs.
- ``"zeros"``: ``W = 0``. For the *last* layer of a coupling net: the net starts as the constant 0, so
  the coupling starts as the identity (``z = x``, ``logdet = 0``) and a deep stack starts as the
  identity too, with a well-scaled loss and no layer amplifying another's noise (NICE, Glow). Its
  gradient is not zero (``∂L/∂W = hᵀ d_y``), so training leaves 0 at the first step. Never for a
  hidden layer: equal units receive equal gradients and stay equal forever."""


def init_weight(n_in: int, n_out: int, init: str, rng: np.random.Generator, dtype: np.dtype) -> np.ndarray:
    """``W: (n_in, n_out)`` drawn by ``init`` (:data:`INITS`)."""
    if init == "zeros":
        return np.zeros((n_in, n_out), dtype=dtype)
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose from {list(INITS)}")
    bound = np.sqrt(6.0 / (n_in + n_out)) if init == "glorot" else np.sqrt(6.0 / n_in)
    return rng.uniform(-bound, bound, size=(n_in, n_out)).astype(dtype)


class Linear(Layer):
    """Affine map ``y = x W + b``.

    Backward (``docs/nn.md#linear``): ``∂L/∂W = xᵀ d_y``, ``∂L/∂b = Σ_n d_y[n]``, ``∂L/∂x = d_y Wᵀ``.

    Parameters
    ----------
    in_features, out_features : int
        ``W: (in_features, out_features)``, ``b: (out_features,)``.
    rng : numpy.random.Generator
        Source of the random initialisation.
    dtype : float32 or float64
    zero_init : bool
        Same as ``init="zeros"`` (kept for existing callers).
    init : {"glorot", "he", "zeros"}, optional
        How ``W`` starts (:data:`INITS`, which says what each is for); default ``"glorot"``.
    """

    cache_attributes = ("_x",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rng: np.random.Generator,
        dtype: object = np.float64,
        zero_init: bool = False,
        init: str | None = None,
    ) -> None:
        super().__init__()
        dtype = as_float_dtype(dtype)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Linear needs positive sizes, got {in_features} -> {out_features}")
        if zero_init and init not in (None, "zeros"):
            raise ValueError(f"zero_init=True contradicts init={init!r}")
        init = "zeros" if zero_init else (init or "glorot")
        self.init = init
        self.add_param("W", init_weight(in_features, out_features, init, rng, dtype))
        self.add_param("b", np.zeros(out_features, dtype=dtype))
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._x = x
        y = matmul(x, self.params["W"])
        y += self.params["b"]
        return y

    def backward(self, d_y: np.ndarray) -> np.ndarray:
        x = self._x
        self.grads["W"] += matmul(x.T, d_y)
        self.grads["b"] += d_y.sum(axis=0)
        return matmul(d_y, self.params["W"].T)


class Dense(Linear):
    """A hidden layer ``out = φ(x W + b)``: a GEMM, then bias and activation in one elementwise step.

    Equals ``Linear`` followed by ``ReLU``/``LeakyReLU``/``Tanh`` (``tests/nn/test_layers.py`` checks
    that), computed as ``y = x W`` (BLAS) and ``y ← φ(y + b)`` in place on that fresh product, by
    :func:`nflow_np.nn.bias_activation.forward` or the active backend's fused kernel for it.

    Backward (``docs/nn.md#dense``): ``d_u = d_out ⊙ φ′`` with ``φ′`` read off the cached output
    (``[out > 0]``, ``1 | slope``, ``1 − out²``), ``∂L/∂b = Σ_n d_u[n]``, then the Linear rules
    with ``d_u`` for ``d_y``: ``∂L/∂W = xᵀ d_u``, ``∂L/∂x = d_u Wᵀ``.

    Parameters
    ----------
    in_features, out_features, rng, dtype, zero_init, init
        As for :class:`Linear` (``init="he"`` suits ReLUs).
    activation : {"relu", "leaky_relu", "tanh"}
    slope : float
        The leaky ReLU's slope (ignored by the others), in [0, 1).
    """

    cache_attributes = ("_x", "_out")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rng: np.random.Generator,
        dtype: object = np.float64,
        zero_init: bool = False,
        activation: str = "relu",
        slope: float = 0.01,
        init: str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, rng, dtype, zero_init, init)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {list(ACTIVATIONS)}")
        if not 0.0 <= slope < 1.0:
            raise ValueError(f"leaky ReLU slope must be in [0, 1), got {slope}")
        self.activation = activation
        self.slope = float(slope)
        self._out: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._x = x
        out = matmul(x, self.params["W"])
        backend.fused("bias_activation", bias_activation.forward)(out, self.params["b"], self.activation, self.slope)
        self._out = out
        return out

    def backward(self, d_out: np.ndarray) -> np.ndarray:
        fused_backward = backend.fused("bias_activation_backward", bias_activation.backward)
        d_u = fused_backward(d_out, self._out, self.activation, self.slope, self.grads["b"])
        self.grads["W"] += matmul(self._x.T, d_u)
        return matmul(d_u, self.params["W"].T)


class ReLU(Layer):
    """``y = max(x, 0)``; backward ``∂L/∂x = d_y ⊙ [x > 0]``."""

    cache_attributes = ("_positive",)

    def __init__(self) -> None:
        super().__init__()
        self._positive: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._positive = x > 0
        return x * self._positive

    def backward(self, d_y: np.ndarray) -> np.ndarray:
        return d_y * self._positive


class LeakyReLU(Layer):
    """``y = x`` for ``x > 0``, ``slope · x`` otherwise; backward ``∂L/∂x = d_y ⊙ (1 or slope)``."""

    cache_attributes = ("_factor",)

    def __init__(self, slope: float = 0.01) -> None:
        super().__init__()
        if not 0.0 <= slope < 1.0:
            raise ValueError(f"LeakyReLU slope must be in [0, 1), got {slope}")
        self.slope = slope
        self._factor: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._factor = np.where(x > 0, x.dtype.type(1), x.dtype.type(self.slope))
        return x * self._factor

    def backward(self, d_y: np.ndarray) -> np.ndarray:
        return d_y * self._factor


class Tanh(Layer):
    """``y = tanh(x)``; backward ``∂L/∂x = d_y ⊙ (1 − y²)`` (the cached output, not the input)."""

    cache_attributes = ("_y",)

    def __init__(self) -> None:
        super().__init__()
        self._y: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._y = np.tanh(x)
        return self._y

    def backward(self, d_y: np.ndarray) -> np.ndarray:
        return d_y * (1 - self._y * self._y)


ACTIVATIONS: dict[str, type[Layer]] = dict(zip(bias_activation.ACTIVATION_NAMES, (ReLU, LeakyReLU, Tanh), strict=True))
"""The one list of activations: the names of :mod:`nflow_np.nn.bias_activation` (the hidden layers'
elementwise reference, which the kernels implement), each with its stand-alone layer."""
