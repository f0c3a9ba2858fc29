"""Small image flows for the tests of the image layers, all parameters random, in float64.

Shared by ``tests/flows/test_image.py``, ``tests/flows/test_normalization.py``,
``tests/test_bits_per_dim.py`` and ``tests/test_image_models.py``; the checks themselves are the
library-wide ones of ``helpers`` (``check_flow_gradients``, ``check_logdet``).
"""

from __future__ import annotations

import numpy as np
from helpers import randomise

from nflow_np.flows import BatchNorm, Flow, Sequential
from nflow_np.image_models import ImageFlowModel, build_realnvp

HIDDEN = (5,)
"""Widths of the coupling nets: tiny, so that finite differences over every parameter stay fast."""


def eval_batch_norms(flow: Flow, rng: np.random.Generator) -> Flow:
    """Give every batch norm in ``flow`` positive random running variances (after :func:`randomise`)."""
    for module in flow.modules():
        if isinstance(module, BatchNorm):
            module.buffers["running_var"][...] = rng.uniform(0.5, 2.0, size=module.channels)
    return flow


def small_realnvp(rng: np.random.Generator, levels: int = 4, shape: tuple[int, int, int] = (1, 4, 4)) -> ImageFlowModel:
    """A two-scale RealNVP on ``shape`` images (checkerboard, squeeze, channel-wise, factor-out, batch norm).

    float64, every parameter random (running variances positive), batch norms in evaluation mode.
    """
    model = build_realnvp(
        shape,
        levels,
        scales=2,
        couplings=2,
        final_couplings=2,
        hidden=HIDDEN,
        dtype=np.float64,
        seed=int(rng.integers(2**31)),
    )
    randomise(model.flow, rng, std=0.3)
    eval_batch_norms(model.flow, rng)
    return model


def core_flow(model: ImageFlowModel) -> Flow:
    """The model's flow without its first layer (the dequantiser, which draws noise on every call)."""
    return Sequential(model.flow.flows[1:])


def interior_levels(rng: np.random.Generator, n: int, dim: int, levels: int) -> np.ndarray:
    """``(n, dim)`` points strictly inside ``(0, levels)``: dequantised data, away from the edges."""
    return rng.uniform(0.05, levels - 0.05, size=(n, dim))
