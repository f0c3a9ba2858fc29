"""The multilayer perceptron used as coupling function ``c(·)``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nflow_np.nn.layers import ACTIVATIONS, INITS, Dense, Layer, Linear


class MLP(Layer):
    """``Dense → … → Dense → Linear``: ``sizes = (D_in, H_1, …, H_k, D_out)``.

    Each hidden layer is ``φ(x W + b)`` (:class:`nflow_np.nn.layers.Dense`: the same maps as a
    ``Linear`` followed by an activation layer, with bias and ``φ`` in one elementwise step); the
    last layer is a plain ``Linear``. Backward is the chain rule through the layers in reverse
    order (``docs/nn.md#mlp``).

    Parameters
    ----------
    sizes : sequence of int
        Input width, hidden widths, output width (at least two entries).
    rng : numpy.random.Generator
        Initialisation randomness.
    activation : {"relu", "leaky_relu", "tanh"}
        Non-linearity between the linear layers (none after the last).
    dtype : float32 or float64
    zero_last : bool
        Zero-initialise the last linear layer so the MLP starts as the constant 0 (a coupling
        built on it starts as the identity map); same as ``last_init="zeros"``.
    init : {"glorot", "he"}
        The hidden layers' initialisation (:data:`nflow_np.nn.layers.INITS`; ``"he"`` for ReLUs).
        Never ``"zeros"``: equal hidden units would stay equal.
    last_init : {"glorot", "he", "zeros"}, optional
        The last layer's; default ``"zeros"`` with ``zero_last``, else ``init``.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        rng: np.random.Generator,
        activation: str = "relu",
        dtype: object = np.float64,
        zero_last: bool = True,
        init: str = "glorot",
        last_init: str | None = None,
    ) -> None:
        super().__init__()
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least input and output sizes, got {sizes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        if init not in INITS or init == "zeros":
            raise ValueError(f"hidden layers need init 'glorot' or 'he' (zeros keep the units equal), got {init!r}")
        last_init = last_init or ("zeros" if zero_last else init)
        self.sizes = sizes
        self.activation = activation
        hidden = zip(sizes[:-2], sizes[1:-1], strict=True)
        self.layers: list[Layer] = [
            Dense(n_in, n_out, rng, dtype, activation=activation, init=init) for n_in, n_out in hidden
        ]
        self.layers.append(Linear(sizes[-2], sizes[-1], rng, dtype, init=last_init))
        # Layer i's parameters are named "2i.W", "2i.b": the slots the linear maps had when each
        # activation was a layer of its own, so model files saved then still load.
        self.children = {str(2 * i): layer for i, layer in enumerate(self.layers)}

    def spec(self) -> dict:
        """``{"sizes", "activation"}``: what :meth:`from_spec` rebuilds an MLP of this shape from."""
        return {"sizes": list(self.sizes), "activation": self.activation}

    @classmethod
    def from_spec(cls, spec: dict, rng: np.random.Generator, dtype: object = np.float64) -> MLP:
        """A freshly initialised MLP of the shape :meth:`spec` describes (values checked by the constructor)."""
        return cls(spec["sizes"], rng, activation=spec["activation"], dtype=dtype)

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, d_y: np.ndarray) -> np.ndarray:
        for layer in reversed(self.layers):
            d_y = layer.backward(d_y)
        return d_y
