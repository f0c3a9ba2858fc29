"""Planar flow: gradients, log-dets, the reparametrisation and the inverse, near the boundary wᵀû → −1.

Parameters are drawn by hypothesis with ``wᵀu`` set on purpose: around −1 (the raw constraint
the paper states), far below it (``wᵀû = −1 + softplus(wᵀu)`` within 1e-4 of −1: the boundary of
invertibility), around 0 and far above it (large ``m``, where Newton alone cycles).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import LOGDET_ATOL, check_flow_gradients, check_logdet
from hypothesis import given, settings
from hypothesis import strategies as st

from nflow_np import FlowModel, Sequential
from nflow_np.flows.planar import Planar, planar_reparametrisation, softplus, solve_planar
from nflow_np.targets import grid_points

FAST = settings(max_examples=30, deadline=None)
seeds = st.integers(0, 2**32 - 1)
dims = st.integers(1, 4)
directions = st.sampled_from(["forward", "inverse"])
# wᵀu: the paper's −1, the boundary of invertibility (wᵀû + 1 = softplus(wᵀu) down to 1e-4), ordinary, large
inner_products = st.one_of(st.floats(-1.05, -0.95), st.floats(-9.2, -5.0), st.floats(-2.0, 2.0), st.floats(2.0, 40.0))


def planar_with(dim: int, wu: float, rng: np.random.Generator, dtype: object = np.float64) -> Planar:
    """A planar layer with random ``w`` (norm 0.3–3), ``b``, and ``u`` chosen so that ``wᵀu = wu``."""
    flow = Planar(dim, rng=rng, dtype=dtype)
    w = rng.standard_normal(dim)
    w *= rng.uniform(0.3, 3.0) / np.linalg.norm(w)
    u = rng.standard_normal(dim)
    u += (wu - w @ u) * w / (w @ w)
    flow.params["w"][...] = w
    flow.params["u"][...] = u
    flow.params["b"][...] = rng.normal()
    return flow


def points_near_the_fold(flow: Planar, n: int, rng: np.random.Generator, spread: float = 2.0) -> np.ndarray:
    """Rows of which half sit where ``wᵀz + b ≈ 0``: there ``1 + h'(a) m`` is smallest."""
    w, b = flow.params["w"], flow.params["b"][0]
    z = spread * rng.standard_normal((n, flow.dim))
    half = n // 2
    a = z[:half] @ w + b
    z[:half] -= ((a - 1e-3 * rng.standard_normal(half)) / (w @ w))[:, None] * w
    return z


# --- the reparametrisation ---------------------------------------------------------------------


@FAST
@given(dim=st.integers(1, 5), wu=inner_products, seed=seeds)
def test_reparametrisation_gives_w_dot_u_hat_equal_m(dim: int, wu: float, seed: int) -> None:
    """wᵀû = m(wᵀu) = −1 + softplus(wᵀu) > −1 for any norm of w: the ‖w‖² (not ‖w‖) in û."""
    flow = planar_with(dim, wu, np.random.default_rng(seed))
    u_hat, m, softplus_wu = planar_reparametrisation(flow.params["u"], flow.params["w"])
    w = flow.params["w"]
    assert m > -1 and softplus_wu > 0
    np.testing.assert_allclose(m, -1 + np.log1p(np.exp(wu)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w @ u_hat, m, rtol=1e-10, atol=1e-10 * max(1.0, abs(wu)))
    # û differs from u only along w
    residual = (u_hat - flow.params["u"]) - ((u_hat - flow.params["u"]) @ w) * w / (w @ w)
    np.testing.assert_allclose(residual, 0, atol=1e-12 * max(1.0, abs(wu)) / np.linalg.norm(w))


def test_reparametrisation_by_hand() -> None:
    """‖w‖ = 5, wᵀu = 14: m = −1 + softplus(14) ≈ 13, so û = u + (m − 14) w/25 ≈ u − w/25 (not w/5)."""
    w = np.array([3.0, 4.0])
    u = np.array([4.0, 0.5])
    u_hat, m, _ = planar_reparametrisation(u, w)
    assert m == pytest.approx(13 + np.log1p(np.exp(-14)), rel=1e-14)
    np.testing.assert_allclose(u_hat, u + (m - 14) * w / 25, rtol=1e-14)
    np.testing.assert_allclose(u_hat, [3.88, 0.34], atol=1e-6)


def test_forward_matches_the_papers_formula() -> None:
    """An independent evaluation: g(z) = z + û tanh(wᵀz + b), logdet = log|1 + tanh'(wᵀz + b) wᵀû|."""
    rng = np.random.default_rng(5)
    flow = planar_with(3, 0.7, rng)
    u, w, b = (flow.params[name] for name in ("u", "w", "b"))
    z = rng.standard_normal((6, 3))
    u_hat = u + (-1 + np.log(1 + np.exp(w @ u)) - w @ u) * w / np.sum(w**2)
    expected = z + np.outer(np.tanh(z @ w + b), u_hat)
    expected_logdet = np.log(np.abs(1 + (1 - np.tanh(z @ w + b) ** 2) * (w @ u_hat)))
    out, logdet = flow.forward(z)
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(logdet, expected_logdet, rtol=1e-12, atol=1e-12)


# --- gradients and log-dets --------------------------------------------------------------------


# Central differences (step 1e-6) of the *inverse* lose their accuracy where its derivatives grow like
# 1/φ'(a), i.e. on the fold at the boundary; there the inverse's backward is proven by the exact
# identity of test_inverse_backward_undoes_forward_backward instead, at any distance from the boundary.
inverse_inner_products = st.one_of(st.floats(-1.05, -0.95), st.floats(-3.0, 2.0), st.floats(2.0, 40.0))


@FAST
@given(dim=dims, n=st.integers(1, 5), wu=inner_products, seed=seeds)
def test_forward_gradients(dim: int, n: int, wu: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    flow = planar_with(dim, wu, rng)
    check_flow_gradients(flow, points_near_the_fold(flow, n, rng), "forward", rng)


@FAST
@given(dim=dims, n=st.integers(1, 5), wu=inverse_inner_products, seed=seeds)
def test_inverse_gradients(dim: int, n: int, wu: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    flow = planar_with(dim, wu, rng)
    check_flow_gradients(flow, flow.forward(points_near_the_fold(flow, n, rng))[0], "inverse", rng)


@FAST
@given(dim=dims, n=st.integers(1, 5), wu=st.one_of(inner_products, st.floats(-40.0, -9.0)), seed=seeds)
def test_inverse_backward_undoes_forward_backward(dim: int, n: int, wu: float, seed: int) -> None:
    """y ↦ x = g⁻¹(y) ↦ g(x) is the identity with total log-det 0, for any parameters.

    So back-propagating ``(A, c)`` through ``g`` (a copy) and then ``g⁻¹`` must return ``A`` exactly (up
    to rounding) and leave parameter gradients that cancel. The forward backward is proven by finite
    differences above; this identity then proves the inverse's, right up to the boundary.
    """
    rng = np.random.default_rng(seed)
    flow = planar_with(dim, wu, rng)
    copy = Planar(dim)
    copy.load_state_dict(flow.state_dict())
    y = points_near_the_fold(flow, n, rng)
    a, c = rng.standard_normal((n, dim)), rng.standard_normal(n)
    flow.zero_grad()
    copy.zero_grad()
    x, _ = flow.inverse(y)
    copy.forward(x)
    d_x = copy.backward(a, c)
    d_y = flow.backward(d_x, c)
    # rounding scales with the intermediate gradient, which grows like 1/φ'(a) near the boundary
    np.testing.assert_allclose(d_y, a, rtol=0, atol=1e-9 * (1 + float(np.abs(d_x).max())))
    for name in ("u", "w", "b"):
        size = max(1.0, float(np.abs(flow.grads[name]).max()))
        np.testing.assert_allclose(flow.grads[name] + copy.grads[name], 0, atol=1e-9 * size, err_msg=name)


@FAST
@given(dim=dims, n=st.integers(1, 4), wu=inner_products, seed=seeds, direction=directions)
def test_logdet_matches_jacobian(dim: int, n: int, wu: float, seed: int, direction: str) -> None:
    if direction == "inverse":
        wu = max(wu, -3.0)  # the inverse's Jacobian by differences: see inverse_inner_products
    rng = np.random.default_rng(seed)
    flow = planar_with(dim, wu, rng)
    x = points_near_the_fold(flow, n, rng)
    # Near the fold the forward Jacobian's smallest singular value is φ'(a) ≈ softplus(wᵀu) (e^−9 at
    # wu = −9); the differences' round-off, ≈ 1e-10 · |y| ≲ 1e-9 per entry, is divided by it in log|det J|.
    atol = LOGDET_ATOL + 1e-9 / float(np.logaddexp(0.0, wu))
    check_logdet(flow, x if direction == "forward" else flow.forward(x)[0], direction, atol=atol)


# --- the inverse --------------------------------------------------------------------------------


@FAST
@given(dim=dims, wu=inner_products, seed=seeds, spread=st.sampled_from([0.1, 2.0, 50.0]))
def test_round_trip_to_1e_10(dim: int, wu: float, seed: int, spread: float) -> None:
    """inverse(forward(z)) == z and forward(inverse(y)) == y to 1e-10; log-dets opposite.

    The log-dets agree to 1e-10 except where conditioning forbids it: on the fold at the boundary, the
    rounding ``δ`` of ``wᵀy + b`` moves the root by ``δ/det`` and the log-det by ``|2 t h' m| δ/det²``
    (``d det/da = −2 t h' m``); there they must agree to 100 times that.
    """
    rng = np.random.default_rng(seed)
    flow = planar_with(dim, wu, rng)
    z = points_near_the_fold(flow, 40, rng, spread)
    y, logdet = flow.forward(z)
    back, back_logdet = flow.inverse(y)
    scale = max(1.0, float(np.abs(z).max()))
    np.testing.assert_allclose(back, z, rtol=0, atol=1e-10 * scale)
    w, b = flow.params["w"], flow.params["b"][0]
    t, softplus_wu = np.tanh(z @ w + b), np.logaddexp(0, wu)
    det = t * t + (1 - t * t) * softplus_wu
    rounding = np.finfo(np.float64).eps * (np.linalg.norm(w) * np.linalg.norm(y, axis=1) + abs(b))
    slope = np.abs(2 * t * (1 - t * t) * (softplus_wu - 1)) / det**2
    bound = 1e-10 * max(1.0, float(np.abs(logdet).max())) + 100 * rounding * slope
    assert np.all(np.abs(back_logdet + logdet) <= bound)
    x, _ = flow.inverse(z)
    again, _ = flow.forward(x)
    np.testing.assert_allclose(again, z, rtol=0, atol=1e-10 * scale)


@FAST
@given(dim=dims, wu=st.floats(-40.0, -9.0), seed=seeds)
def test_inverse_is_backward_stable_at_the_boundary(dim: int, wu: float, seed: int) -> None:
    """Within 1e-4 of wᵀû = −1 the map nearly folds; the inverse still returns a preimage of y to rounding.

    (There z itself is only determined to ``ε / (1 + h'(a) wᵀû)``: the conditioning, not the solver.)
    """
    rng = np.random.default_rng(seed)
    flow = planar_with(dim, wu, rng)
    y = points_near_the_fold(flow, 40, rng)
    z, logdet = flow.inverse(y)
    assert np.isfinite(z).all() and np.isfinite(logdet).all()
    again, forward_logdet = flow.forward(z)
    np.testing.assert_allclose(again, y, rtol=0, atol=1e-12 * max(1.0, float(np.abs(y).max())))
    np.testing.assert_allclose(forward_logdet, -logdet, rtol=1e-9, atol=1e-9)


@given(
    m_offset=st.one_of(st.floats(1e-12, 1e-3), st.floats(1e-3, 2.0), st.floats(2.0, 1e3)),
    target=st.one_of(st.floats(-1e4, 1e4), st.floats(-1e-6, 1e-6), st.sampled_from([0.0, -4.132810040600382])),
)
@settings(max_examples=200, deadline=None)
def test_solver_reaches_machine_precision(m_offset: float, target: float) -> None:
    """φ(a) = a + m tanh(a) = target solved to a few ulps, for m from −1 + 1e-12 to 1e3.

    The sampled target −4.1328… with m = 5.68 made plain bracketed Newton cycle between the two
    concave/convex sides for hundreds of steps; the bisection safeguard must catch it.
    """
    m = m_offset - 1
    a = solve_planar(np.array([target, -4.132810040600382]), m, m_offset)
    residual = a + m * np.tanh(a) - np.array([target, -4.132810040600382])
    scale = np.maximum(1.0, np.abs(a) + abs(m))
    assert np.all(np.abs(residual) <= 8 * np.finfo(np.float64).eps * scale), residual


def test_density_of_a_planar_model_integrates_to_one() -> None:
    """A planar stack as a data → noise flow is a valid density: ∫ N(g(x)) |det ∂g/∂x| dx = 1."""
    rng = np.random.default_rng(2)
    model = FlowModel(Sequential([planar_with(2, wu, rng) for wu in (-3.0, 0.5, 4.0)]))
    x = grid_points((-8.0, 8.0), 400)
    assert np.exp(model.log_prob(x)).sum() * (16 / 400) ** 2 == pytest.approx(1.0, abs=1e-6)


# --- dtypes and errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_float32_in_float32_out(direction: str) -> None:
    rng = np.random.default_rng(0)
    flow32 = planar_with(3, -2.0, rng, np.float32)
    flow64 = Planar(3)
    flow64.load_state_dict(flow32.state_dict())
    x = rng.standard_normal((8, 3))
    call32 = flow32.forward if direction == "forward" else flow32.inverse
    call64 = flow64.forward if direction == "forward" else flow64.inverse
    out, logdet = call32(x.astype(np.float32))
    assert out.dtype == np.float32 and logdet.dtype == np.float32
    d_in = flow32.backward(np.ones((8, 3), np.float32), np.ones(8, np.float32))
    assert d_in.dtype == np.float32
    assert all(grad.dtype == np.float32 for _, _, grad in flow32.named_parameters())
    out64, logdet64 = call64(x)
    np.testing.assert_allclose(out, out64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logdet, logdet64, rtol=1e-4, atol=1e-4)
    back, _ = (flow32.inverse if direction == "forward" else flow32.forward)(out)
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-5)


def test_errors() -> None:
    flow = Planar(2)
    with pytest.raises(ValueError, match="x has 3 columns but this flow works in dimension 2"):
        flow.forward(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="z has a non-finite value nan"):
        flow.inverse(np.array([[0.0, np.nan]]))
    with pytest.raises(TypeError, match="x has dtype float32 but the parameters are float64"):
        flow.forward(np.zeros((1, 2), np.float32))
    flow.params["w"][...] = 0
    with pytest.raises(ValueError, match="w is zero"):
        flow.forward(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="positive dimension"):
        Planar(0)
    with pytest.raises(TypeError, match="float32 or float64"):
        Planar(2, dtype=np.int32)


def test_initialisation_is_a_volume_preserving_shear_and_seeded() -> None:
    a, b = Planar(4, rng=np.random.default_rng(3)), Planar(4, rng=np.random.default_rng(3))
    for name in ("u", "w", "b"):
        np.testing.assert_array_equal(a.params[name], b.params[name])
    assert 0.5 <= np.linalg.norm(a.params["w"]) <= 1.0 and a.params["b"][0] == 0
    u_hat, m, _ = planar_reparametrisation(a.params["u"], a.params["w"])
    assert m == pytest.approx(0.0, abs=1e-15) and u_hat @ a.params["w"] == pytest.approx(0.0, abs=1e-14)
    z = np.random.default_rng(0).standard_normal((10, 4))
    out, logdet = a.forward(z)
    np.testing.assert_allclose(logdet, 0.0, atol=1e-15)
    np.testing.assert_allclose(out @ a.params["w"], z @ a.params["w"], atol=1e-14)  # moves only across w
    assert softplus(0.0) == pytest.approx(np.log(2))
