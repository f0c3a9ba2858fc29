"""Neural-network layers for the coupling functions ``c(·)``, with hand-written backward passes.

Protocol (cs231n-style, one cache per layer): ``forward(x)`` computes the output and keeps exactly
what ``backward`` needs; ``backward(d_y)`` returns ``d_x = ∂L/∂x`` and *adds* ``∂L/∂θ`` to
``grads``. Shapes: ``x: (N, D_in)``, ``y: (N, D_out)``. Derivations: ``docs/nn.md``.
"""

from __future__ import annotations

import numpy as np

from nflow_np.module import Module, as_float_dtype


class Layer(Module):
    """A differentiable map ``y = layer(x)`` on row batches."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Return ``y`` for ``x: (N, D_in)`` and cache what :meth:`backward` needs."""
        raise NotImplementedError

    def backward(self, d_y: np.ndarray) -> np.ndarray:
        """Given ``∂L/∂y: (N, D_out)`` of the last forward call, return ``∂L/∂x``; accumulate grads."""
        raise NotImplementedError


class Linear(Layer):
    """Affine map ``y = x W + b``.

    Backward (``docs/nn.md#linear``): ``∂L/∂W = xᵀ d_y``, ``∂L/∂b = Σ_n d_y[n]``, ``∂L/∂x = d_y Wᵀ``.

    Parameters
    ----------
    in_features, out_features : int
        ``W: (in_features, out_features)``, ``b: (out_features,)``.
    rng : numpy.random.Generator
        Source of the Glorot-uniform initialisation ``W ~ U(−a, a)``, ``a = √(6 / (in + out))``.
    dtype : float32 or float64
    zero_init : bool
        Start with ``W = 0, b = 0`` (the last layer of a coupling net, so the coupling starts as
        the identity).
    """

    cache_attributes = ("_x",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rng: np.random.Generator,
        dtype: object = np.float64,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        dtype = as_float_dtype(dtype)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Linear needs positive sizes, got {in_features} -> {out_features}")
        if zero_init:
            weight = np.zeros((in_features, out_features), dtype=dtype)
        else:
            bound = np.sqrt(6.0 / (in_features + out_features))
            weight = rng.uniform(-bound, bound, size=(in_features, out_features)).astype(dtype)
        self.add_param("W", weight)
        self.add_param("b", np.zeros(out_features, dtype=dtype))
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._x = x
        y = x @ self.params["W"]
        y += self.params["b"]
        return y

    def backward(self, d_y: np.ndarray) -> np.ndarray:
        x = self._x
        self.grads["W"] += x.T @ d_y
        self.grads["b"] += d_y.sum(axis=0)
        return d_y @ self.params["W"].T


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


ACTIVATIONS: dict[str, type[Layer]] = {"relu": ReLU, "leaky_relu": LeakyReLU, "tanh": Tanh}
