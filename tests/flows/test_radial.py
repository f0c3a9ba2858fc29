"""Radial flow: gradients, log-dets and the inverse, including near the boundary β → −α.

``β = −α + softplus(β̂)``, so ``β̂ ≪ 0`` puts ``γ = α + β = softplus(β̂)`` within 1e-5 of 0: the
map then squeezes a ball around ``z₀`` almost to a point (``f(0) = γ/α``).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import check_flow_gradients, check_logdet
from hypothesis import given, settings
from hypothesis import strategies as st

from nflow_np import FlowModel, Sequential
from nflow_np.flows.radial import Radial, radial_terms, solve_radial
from nflow_np.targets import grid_points

FAST = settings(max_examples=30, deadline=None)
seeds = st.integers(0, 2**32 - 1)
dims = st.integers(1, 4)
directions = st.sampled_from(["forward", "inverse"])
alpha_hats = st.floats(-3.0, 3.0)
# β̂: far from the boundary, and near it (γ = softplus(β̂) down to 6e-6)
beta_hats = st.one_of(st.floats(-2.0, 4.0), st.floats(-12.0, -6.0))


def radial_with(dim: int, alpha_hat: float, beta_hat: float, rng: np.random.Generator, dtype=np.float64) -> Radial:
    flow = Radial(dim, rng=rng, dtype=dtype)
    flow.params["alpha_hat"][...] = alpha_hat
    flow.params["beta_hat"][...] = beta_hat
    return flow


def points_around_centre(flow: Radial, n: int, rng: np.random.Generator, low: float = 0.05) -> np.ndarray:
    """Rows at distances from ``z₀`` spread over [low, 5]: small radii are where the map bends most."""
    direction = rng.standard_normal((n, flow.dim))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    radius = np.exp(rng.uniform(np.log(low), np.log(5.0), n))
    return flow.params["z0"] + radius[:, None] * direction


@FAST
@given(dim=dims, n=st.integers(1, 5), alpha_hat=alpha_hats, beta_hat=beta_hats, seed=seeds, direction=directions)
def test_gradients(dim: int, n: int, alpha_hat: float, beta_hat: float, seed: int, direction: str) -> None:
    rng = np.random.default_rng(seed)
    flow = radial_with(dim, alpha_hat, beta_hat, rng)
    x = points_around_centre(flow, n, rng)
    if direction == "inverse":  # the inverse's input is an output of the map
        x = flow.forward(x)[0]
    check_flow_gradients(flow, x, direction, rng)


@FAST
@given(dim=dims, n=st.integers(1, 4), alpha_hat=alpha_hats, beta_hat=beta_hats, seed=seeds, direction=directions)
def test_logdet_matches_jacobian(dim: int, n: int, alpha_hat: float, beta_hat: float, seed: int, direction: str):
    rng = np.random.default_rng(seed)
    flow = radial_with(dim, alpha_hat, beta_hat, rng)
    check_logdet(flow, points_around_centre(flow, n, rng), direction)


@FAST
@given(dim=dims, alpha_hat=alpha_hats, beta_hat=beta_hats, seed=seeds)
def test_round_trip_to_1e_10(dim: int, alpha_hat: float, beta_hat: float, seed: int) -> None:
    """Points from 1e-8 to 500 away from z₀.

    Log-dets agree to 1e-10 from distance 1e-3 on. Closer in, at the boundary, ``y − z₀`` is ~1e-12 and
    the rounding of ``y`` (ε of ``|y|``) moves the recovered ``r`` by ``δR/q(r)`` and so the log-det by
    ``|∂logdet/∂r| δR/q(r)`` (slope up to 1/γ): conditioning. There they must agree to 100 times that.
    """
    rng = np.random.default_rng(seed)
    flow = radial_with(dim, alpha_hat, beta_hat, rng)
    z = np.concatenate([points_around_centre(flow, 30, rng, low=1e-8), 100 * rng.standard_normal((5, dim))])
    y, logdet = flow.forward(z)
    back, back_logdet = flow.inverse(y)
    scale = max(1.0, float(np.abs(z).max()))
    np.testing.assert_allclose(back, z, rtol=0, atol=1e-10 * scale)
    far = np.linalg.norm(z - flow.params["z0"], axis=1) >= 1e-3
    logdet_scale = max(1.0, float(np.abs(logdet).max()))
    np.testing.assert_allclose(back_logdet[far], -logdet[far], rtol=0, atol=1e-10 * logdet_scale)
    terms = radial_terms(np.linalg.norm(z - flow.params["z0"], axis=1), *flow.alpha_gamma(), dim)
    rounding = np.finfo(np.float64).eps * np.abs(y).max(axis=1)
    bound = 1e-10 * logdet_scale + 100 * rounding * np.abs(terms["logdet_r"]) / terms["q"]
    assert np.all(np.abs(back_logdet + logdet) <= bound)
    x, _ = flow.inverse(z)
    np.testing.assert_allclose(flow.forward(x)[0], z, rtol=0, atol=1e-10 * scale)


def test_forward_matches_the_papers_formula() -> None:
    """g(z) = z + β (z − z₀)/(α + ‖z − z₀‖) with α = softplus(α̂), β = −α + softplus(β̂); logdet by slogdet."""
    rng = np.random.default_rng(4)
    flow = radial_with(3, 0.3, -1.2, rng)
    z = rng.standard_normal((5, 3))
    alpha = np.log1p(np.exp(0.3))
    beta = -alpha + np.log1p(np.exp(-1.2))
    v = z - flow.params["z0"]
    r = np.linalg.norm(v, axis=1)
    h = 1 / (alpha + r)
    expected = z + beta * h[:, None] * v
    # the paper's log-det: (D − 1) log(1 + βh) + log(1 + βh + βh'(r) r), h' = −1/(α + r)²
    expected_logdet = 2 * np.log(1 + beta * h) + np.log(1 + beta * h - beta * r * h * h)
    out, logdet = flow.forward(z)
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(logdet, expected_logdet, rtol=1e-12, atol=1e-12)


@given(
    radius_out=st.one_of(st.floats(0.0, 1e-6), st.floats(0.0, 1e4)),
    alpha=st.floats(1e-3, 1e2),
    gamma=st.floats(1e-8, 1e2),
)
@settings(max_examples=200, deadline=None)
def test_solver_is_exact(radius_out: float, alpha: float, gamma: float) -> None:
    """r (r + γ)/(α + r) = R with r ≥ 0, to a few ulps, across scales and on both branches of the root."""
    r = solve_radial(np.array([radius_out]), alpha, gamma)[0]
    assert r >= 0
    assert r * (r + gamma) / (alpha + r) == pytest.approx(radius_out, rel=1e-14, abs=1e-300)


def test_identity_at_initialisation_and_centre_is_fixed() -> None:
    flow = Radial(3, rng=np.random.default_rng(0))
    z = np.random.default_rng(1).standard_normal((6, 3))
    out, logdet = flow.forward(z)
    np.testing.assert_allclose(out, z, atol=1e-15)
    np.testing.assert_allclose(logdet, 0, atol=1e-15)
    # z₀ maps to itself for any parameters, in both directions, with finite gradients
    flow = radial_with(3, 0.5, -8.0, np.random.default_rng(2))
    centre = flow.params["z0"][None].copy()
    for call in (flow.forward, flow.inverse):
        out, logdet = call(centre)
        np.testing.assert_allclose(out, centre, atol=1e-15)
        assert np.isfinite(logdet).all()
        assert np.isfinite(flow.backward(np.ones((1, 3)), np.ones(1))).all()


def test_density_of_a_radial_model_integrates_to_one() -> None:
    rng = np.random.default_rng(3)
    model = FlowModel(Sequential([radial_with(2, a, b, rng) for a, b in ((0.0, 1.0), (-1.0, -6.0), (1.0, 2.0))]))
    x = grid_points((-8.0, 8.0), 400)
    assert np.exp(model.log_prob(x)).sum() * (16 / 400) ** 2 == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_float32_in_float32_out(direction: str) -> None:
    rng = np.random.default_rng(0)
    flow32 = radial_with(2, 0.2, -0.5, rng, np.float32)
    x = rng.standard_normal((8, 2)).astype(np.float32)
    call = flow32.forward if direction == "forward" else flow32.inverse
    other = flow32.inverse if direction == "forward" else flow32.forward
    out, logdet = call(x)
    assert out.dtype == np.float32 and logdet.dtype == np.float32
    d_in = flow32.backward(np.ones((8, 2), np.float32), np.ones(8, np.float32))
    assert d_in.dtype == np.float32
    assert all(grad.dtype == np.float32 for _, _, grad in flow32.named_parameters())
    back, back_logdet = other(out)
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-5)
    np.testing.assert_allclose(back_logdet, -logdet, rtol=0, atol=1e-5)


def test_errors() -> None:
    flow = Radial(2)
    with pytest.raises(ValueError, match="z has 1 columns but this flow works in dimension 2"):
        flow.inverse(np.zeros((4, 1)))
    with pytest.raises(ValueError, match="x has a non-finite value inf"):
        flow.forward(np.array([[np.inf, 0.0]]))
    with pytest.raises(RuntimeError, match="backward called before forward or inverse"):
        flow.backward(np.zeros((1, 2)))
