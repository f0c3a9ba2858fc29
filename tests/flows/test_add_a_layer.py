"""README, "How to add a layer", followed step by step: a new layer is its class plus one registry entry.

``Shift`` below is the whole of the new code (a learned translation ``z = x + b``); the one
``FlowCase(...)`` line is what would go into ``helpers.CASES``. The test then runs the whole property
suite on it, on every backend, exactly as ``tests/flows/test_flows.py`` does for the library's own
layers; and the same suite rejects a broken variant, so passing it means something.
"""

from __future__ import annotations

import numpy as np
import pytest
from flow_properties import PROPERTIES, prove, prove_all
from helpers import BACKENDS, FlowCase, GradcheckError, randomise

from nflow_np import gradcheck
from nflow_np.flows import Flow


class Shift(Flow):
    """A learned translation ``z = x + b``, ``b: (D,)``.

    forward ``z = x + b``, ``logdet = 0``;  inverse ``x = z − b``, ``logdet = 0``.
    backward: ``∂L/∂x = d_z``, ``∂L/∂b = Σ_n d_z[n]`` (forward); ``∂L/∂z = d_x``, ``∂L/∂b = −Σ_n d_x[n]``.
    """

    def __init__(self, dim: int, dtype: object = np.float64) -> None:
        super().__init__(dim)
        self.add_param("b", np.zeros(dim, dtype=dtype))

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._remember("forward", x.shape[0])
        return x + self.params["b"], np.zeros_like(x, shape=x.shape[0])

    def _inverse(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._remember("inverse", z.shape[0])
        return z - self.params["b"], np.zeros_like(z, shape=z.shape[0])

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        direction, _ = self._cache
        sign = 1 if direction == "forward" else -1
        self.grads["b"] += sign * d_out.sum(axis=0)
        return d_out.copy()


SHIFT = FlowCase("shift", lambda dim, rng, dtype: randomise(Shift(dim, dtype), rng))
"""The one line a new layer adds to ``helpers.CASES``."""


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_whole_property_suite_passes_on_the_new_layer(backend: str) -> None:
    prove_all(SHIFT, backend)


def test_gradcheck_works_on_the_new_layer_directly() -> None:
    rng = np.random.default_rng(0)
    flow = randomise(Shift(3), rng)
    x = rng.standard_normal((4, 3))
    for direction in ("forward", "inverse"):
        gradcheck.check_flow_gradients(flow, x, direction, rng)
        gradcheck.check_logdet(flow, x, direction)


class _ShiftForgettingTheInverseSign(Shift):
    """The slip the suite must catch: ``∂L/∂b`` of the inverse with the wrong sign."""

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        self.grads["b"] += d_out.sum(axis=0)
        return d_out.copy()


class _ShiftWithAScale(Shift):
    """``z = 1.5 x + b`` reporting ``logdet = 0``: a wrong log-det (and a wrong backward)."""

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z, logdet = super()._forward(1.5 * x)
        return z, logdet


def test_the_suite_rejects_a_wrong_gradient_and_a_wrong_logdet() -> None:
    wrong_sign = FlowCase(
        "wrong_sign", lambda dim, rng, dtype: randomise(_ShiftForgettingTheInverseSign(dim, dtype), rng)
    )
    with pytest.raises(GradcheckError, match=r"Shift.*inverse.*'b'"):
        prove(wrong_sign, "gradients")
    wrong_logdet = FlowCase("wrong_logdet", lambda dim, rng, dtype: randomise(_ShiftWithAScale(dim, dtype), rng))
    with pytest.raises(GradcheckError, match=r"log\|det J\|"):
        prove(wrong_logdet, "logdet_matches_jacobian")
    assert {"gradients", "logdet_matches_jacobian", "round_trip_float64"} <= set(PROPERTIES)
