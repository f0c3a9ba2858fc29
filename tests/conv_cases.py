"""Convolutional couplings for the flow registry, with ``helpers.FLOW_CASES``'s factory signature.

Each factory takes ``(dim, rng, dtype)`` for any ``dim ≥ 2`` and returns a flow of dimension ``dim``
built on :class:`~nflow_np.flows.conv_coupling.ConvAffineCoupling`, every parameter random (batch-norm
running variances positive), the nets' batch norms in evaluation mode (training mode couples the rows
of a batch; ``tests/flows/test_conv_coupling.py`` checks it apart). A ``dim`` that cannot be an image
of the wanted shape puts the coupling inside a :class:`~nflow_np.flows.image.FactorOut`.

``tests/flows/test_conv_coupling.py`` runs the registry's checks on them; appending
:data:`CONV_FLOW_CASES` to ``helpers.FLOW_CASES`` runs every protocol test on them too. This module
does not import ``helpers`` (so ``helpers`` may import it). :func:`direct_conv` is the loop definition of a
"same" convolution that both formulations' tests (``tests/nn/test_conv.py``, ``tests/nn/test_shifted.py``) check
against.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from nflow_np.flows import Flow
from nflow_np.flows.conv_coupling import ConvAffineCoupling
from nflow_np.flows.image import FactorOut

NET = {"features": 2, "blocks": 1, "kernel_size": 3}
"""The registry's ResNets: two channels and one block, so finite differences over every parameter stay fast."""


def randomise_conv(flow: Flow, rng: np.random.Generator, std: float = 0.5) -> Flow:
    """Every parameter and buffer ``N(0, std²)`` (as ``helpers.randomise``), then positive running variances."""
    for _, value in flow.named_state():
        value[...] = rng.normal(0.0, std, size=value.shape)
    for module in flow.modules():
        if "running_var" in module.buffers:
            module.buffers["running_var"][...] = rng.uniform(0.5, 2.0, size=module.buffers["running_var"].shape)
    return flow


def _checkerboard_row(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    """One channel, a ``1 × dim`` image: the board alternates along the row."""
    return randomise_conv(ConvAffineCoupling((1, 1, dim), "checkerboard", 0, rng=rng, dtype=dtype, **NET), rng)


def _checkerboard_channels(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    """Two channels of ``1 × ⌊dim/2⌋`` pixels, parity 1, 5×5 kernels (factored out beside the odd last column)."""
    if dim < 4:
        return _checkerboard_row(dim, rng, dtype)
    net = NET | {"kernel_size": 5}
    coupling = ConvAffineCoupling((2, 1, dim // 2), "checkerboard", 1, rng=rng, dtype=dtype, **net)
    return randomise_conv(coupling if dim % 2 == 0 else FactorOut(dim, coupling), rng)


def _channel(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    """Channel-wise mask on two channels of ``1 × ⌊dim/2⌋`` pixels, 1×1 kernels."""
    coupling = ConvAffineCoupling((2, 1, dim // 2), "channel", 1, rng=rng, dtype=dtype, **(NET | {"kernel_size": 1}))
    return randomise_conv(coupling if dim % 2 == 0 else FactorOut(dim, coupling), rng)


CONV_FLOW_CASES: list[tuple[str, Callable[[int, np.random.Generator, object], Flow]]] = [
    ("conv_coupling_checkerboard", _checkerboard_row),
    ("conv_coupling_checkerboard_channels", _checkerboard_channels),
    ("conv_coupling_channel", _channel),
]


def direct_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The definition, one output entry at a time: ``y[n, o, h, w] = b[o] + Σ w[o, c, i, j] x_pad[n, c, h+i, w+j]``."""
    n, c, h, width = x.shape
    k = w.shape[-1]
    p = k // 2
    padded = np.zeros((n, c, h + 2 * p, width + 2 * p))
    padded[:, :, p : p + h, p : p + width] = x
    y = np.zeros((n, w.shape[0], h, width))
    for m in range(n):
        for o in range(w.shape[0]):
            for row in range(h):
                for col in range(width):
                    y[m, o, row, col] = b[o] + np.sum(w[o] * padded[m, :, row : row + k, col : col + k])
    return y
