"""Preprocessing flows (nflow_np/flows/preprocessing.py): Dequantize, Scale, Logit."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import check_flow_gradients, check_logdet
from hypothesis import given, settings
from hypothesis import strategies as st

from nflow_np.flows import Dequantize, Logit, Scale

FAST = settings(max_examples=15, deadline=None)
seeds = st.integers(0, 2**32 - 1)
dims = st.integers(1, 6)
directions = st.sampled_from(["forward", "inverse"])
alphas = st.sampled_from([0.0, 0.05, 0.2])


class FixedNoiseDequantize(Dequantize):
    """Dequantize that draws the same noise on every call (restarts its stream), so that finite
    differences see the map ``x ↦ x + u`` for one fixed ``u``."""

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.reseed(self.seed)
        return super()._forward(x)


# --- dequantize ----------------------------------------------------------------------------------------


@FAST
@given(dim=dims, n=st.integers(1, 5), seed=seeds)
def test_dequantize_forward_gradient_and_logdet_with_the_noise_fixed(dim: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    layer = FixedNoiseDequantize(dim, levels=5, seed=seed % 1000)
    x = rng.integers(0, 5, size=(n, dim)).astype(np.float64)
    check_flow_gradients(layer, x, "forward", rng)
    check_logdet(layer, x, "forward")


@FAST
@given(dim=dims, n=st.integers(1, 5), levels=st.integers(2, 300), seed=seeds)
def test_dequantize_noise_stays_in_the_cell_and_the_inverse_quantises(dim: int, n: int, levels: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    layer = Dequantize(dim, levels, seed=seed % 1000)
    x = rng.integers(0, levels, size=(n, dim)).astype(np.float64)
    y, logdet = layer.forward(x)
    assert np.all((y >= x) & (y < x + 1)) and np.array_equal(logdet, np.zeros(n))
    back, inverse_logdet = layer.inverse(y)
    assert np.array_equal(back, x) and np.array_equal(inverse_logdet, np.zeros(n))  # ⌊x + u⌋ = x
    # the quantiser clips to the levels and has zero derivative
    wide = rng.uniform(-3, levels + 3, size=(n, dim))
    assert np.array_equal(layer.inverse(wide)[0], np.clip(np.floor(wide), 0, levels - 1))
    check_flow_gradients(layer, wide, "inverse", rng)
    assert not layer.backward(np.ones((n, dim)), np.ones(n)).any()


def test_dequantize_noise_is_fresh_per_call_and_reproducible_by_reseeding() -> None:
    layer = Dequantize(4, levels=17, seed=3)
    x = np.zeros((1000, 4))
    first, second = layer.forward(x)[0], layer.forward(x)[0]
    assert not np.array_equal(first, second)
    assert abs(first.mean() - 0.5) < 0.03 and abs(first.var() - 1 / 12) < 0.01  # U[0, 1)
    layer.reseed(3)
    assert np.array_equal(layer.forward(x)[0], first)
    assert layer.forward(x.astype(np.float32))[0].dtype == np.float32


@pytest.mark.parametrize("levels", [1, 2.5, True])
def test_dequantize_refuses_bad_levels(levels: object) -> None:
    with pytest.raises(ValueError, match="levels must be an integer >= 2"):
        Dequantize(3, levels)


# --- scale ---------------------------------------------------------------------------------------------


@FAST
@given(
    dim=dims,
    n=st.integers(1, 5),
    factor=st.sampled_from([1 / 17, 1 / 256, -2.5, 3.0]),
    seed=seeds,
    direction=directions,
)
def test_scale_gradients_logdet_and_round_trip(dim: int, n: int, factor: float, seed: int, direction: str) -> None:
    rng = np.random.default_rng(seed)
    layer = Scale(dim, factor)
    x = rng.standard_normal((n, dim))
    check_flow_gradients(layer, x, direction, rng)
    check_logdet(layer, x, direction)
    z, logdet = layer.forward(x)
    np.testing.assert_allclose(logdet, dim * np.log(abs(factor)))
    np.testing.assert_allclose(layer.inverse(z)[0], x, rtol=1e-14)


@pytest.mark.parametrize("factor", [0.0, np.inf, np.nan])
def test_scale_refuses_degenerate_factors(factor: float) -> None:
    with pytest.raises(ValueError, match="finite non-zero factor"):
        Scale(2, factor)


# --- logit ---------------------------------------------------------------------------------------------


@FAST
@given(dim=dims, n=st.integers(1, 5), alpha=alphas, seed=seeds, direction=directions)
def test_logit_gradients_logdet_and_round_trip(dim: int, n: int, alpha: float, seed: int, direction: str) -> None:
    rng = np.random.default_rng(seed)
    layer = Logit(dim, alpha)
    x = rng.uniform(0.02, 0.98, (n, dim)) if direction == "forward" else rng.normal(0, 2, (n, dim))
    check_flow_gradients(layer, x, direction, rng)
    check_logdet(layer, x, direction)
    out, logdet = (layer.forward if direction == "forward" else layer.inverse)(x)
    back, back_logdet = (layer.inverse if direction == "forward" else layer.forward)(out)
    np.testing.assert_allclose(back, x, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(back_logdet, -logdet, rtol=1e-9, atol=1e-9)


def test_logit_formula_and_edges() -> None:
    layer = Logit(3, alpha=0.05)
    x = np.array([[0.0, 0.5, 1.0]])
    z, logdet = layer.forward(x)
    y = 0.05 + 0.9 * x
    np.testing.assert_allclose(z, np.log(y / (1 - y)))
    np.testing.assert_allclose(logdet, np.sum(np.log(0.9 / (y * (1 - y)))))
    assert np.isfinite(z).all()  # α > 0 keeps the edges finite
    big = np.array([[-800.0, 0.0, 800.0]])  # the inverse never overflows
    x_back, inverse_logdet = layer.inverse(big)
    np.testing.assert_allclose(x_back, [[-0.05 / 0.9, 0.5, 0.95 / 0.9]])
    assert np.isfinite(inverse_logdet).all()


def test_logit_refuses_data_outside_the_unit_interval() -> None:
    layer = Logit(2)
    with pytest.raises(ValueError, match=r"Logit needs x in \(-0.0555556, 1.05556\)"):
        layer.forward(np.array([[0.5, 1.2]]))
    layer.forward(np.array([[0.0, 1.0]]))  # the edges of [0, 1] are inside the domain when α > 0
    with pytest.raises(ValueError, match=r"Logit needs x in \(0, 1\)"):
        Logit(2, alpha=0.0).forward(np.array([[0.0, 0.5]]))
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 0.5\)"):
        Logit(2, alpha=0.5)
