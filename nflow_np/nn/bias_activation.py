"""The elementwise work of a hidden layer, ``y ← φ(y + b)``, and its backward: the nets' kernel seam.

A hidden layer of the coupling net is ``y = φ(x W + b)`` (:class:`nflow_np.nn.layers.Dense`). The
product ``x W`` is a GEMM; everything else is elementwise and is done here, on the GEMM's fresh
output, in place. These two functions are the reference (the specification) that a backend may
replace by a fused one-pass kernel (``kernels/bias_activation/numba_cpu.py`` on the ``"numba"`` backend, chosen by
:func:`nflow_np.backend.fused`); NumPy needs three passes and two temporaries for the same work.

Activations ``φ``, with ``u = y + b`` the pre-activation and ``out = φ(u)``; each derivative is
written in terms of ``out``, so the layer caches only its output (``docs/nn.md#dense``):

==============  ==========================  ================================================
name            ``φ(u)``                    ``φ′`` from the output
==============  ==========================  ================================================
``relu``        ``max(u, 0)``               ``[out > 0]``
``leaky_relu``  ``u`` if ``u > 0`` else     ``1`` if ``out > 0`` else ``slope`` (``slope ≥ 0``
                ``slope · u``               keeps the sign of ``u`` in ``out``)
``tanh``        ``tanh(u)``                 ``1 − out²``
==============  ==========================  ================================================

Backward: ``∂L/∂u = ∂L/∂out ⊙ φ′``, and since ``u[n] = (x W)[n] + b`` for every row ``n``,
``∂L/∂b = Σ_n ∂L/∂u[n]`` (the column sums), *added* to the bias gradient.
"""

from __future__ import annotations

import numpy as np

ACTIVATION_NAMES = ("relu", "leaky_relu", "tanh")


def forward(y: np.ndarray, b: np.ndarray, activation: str, slope: float) -> None:
    """``y ← φ(y + b)`` in place.

    Parameters
    ----------
    y : array, shape (N, K)
        The GEMM output ``x W``; overwritten with the layer's output.
    b : array, shape (K,)
    activation : {"relu", "leaky_relu", "tanh"}
    slope : float
        The leaky ReLU's slope for ``u ≤ 0`` (ignored by the others).
    """
    y += b
    if activation == "relu":
        np.maximum(y, 0, out=y)  # NaN stays NaN
    elif activation == "leaky_relu":
        np.multiply(y, np.where(y > 0, y.dtype.type(1), y.dtype.type(slope)), out=y)
    elif activation == "tanh":
        np.tanh(y, out=y)
    else:
        raise ValueError(f"unknown activation {activation!r}; choose from {list(ACTIVATION_NAMES)}")


def backward(d_out: np.ndarray, out: np.ndarray, activation: str, slope: float, d_b: np.ndarray) -> np.ndarray:
    """``∂L/∂u = ∂L/∂out ⊙ φ′`` (returned), and ``d_b += Σ_n ∂L/∂u[n]``.

    Parameters
    ----------
    d_out : array, shape (N, K)
        ``∂L/∂out``; not modified.
    out : array, shape (N, K)
        The layer's output from the forward pass.
    activation, slope
        As in :func:`forward`.
    d_b : array, shape (K,)
        The bias gradient, accumulated in place.

    Returns
    -------
    array, shape (N, K)
        ``∂L/∂u``, a new array.
    """
    if activation == "relu":
        derivative = out > 0
    elif activation == "leaky_relu":
        derivative = np.where(out > 0, out.dtype.type(1), out.dtype.type(slope))
    elif activation == "tanh":
        derivative = 1 - out * out
    else:
        raise ValueError(f"unknown activation {activation!r}; choose from {list(ACTIVATION_NAMES)}")
    d_u = d_out * derivative
    d_b += d_u.sum(axis=0)
    return d_u
