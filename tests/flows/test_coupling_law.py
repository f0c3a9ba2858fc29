"""The coupling laws of ``nflow_np.flows.coupling_law`` as pure functions (the kernels' specification).

For each law: ``forward_vjp`` / ``inverse_vjp`` against central differences w.r.t. ``x₂``
(or ``z₂``), ``h`` and ``scale``; forward/inverse round trip; log-det against the Jacobian; the
affine law's bound ``|s| ≤ |a|`` when ``tanh`` saturates.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import FD_FLOOR, assert_gradients_match, numerical_gradient, numerical_jacobian
from hypothesis import given, settings
from hypothesis import strategies as st

import nflow_np
from nflow_np import Coupling, backend
from nflow_np.flows.coupling_law import COUPLING_LAWS, AdditiveLaw, AffineLaw

FAST = settings(max_examples=25, deadline=None)
LAWS = pytest.mark.parametrize("law", [AdditiveLaw, AffineLaw], ids=["additive", "affine"])

sizes = st.integers(1, 5)
widths = st.integers(1, 4)
seeds = st.integers(0, 2**32 - 1)
directions = st.sampled_from(["forward", "inverse"])


def draw(law: type, n: int, d2: int, rng: np.random.Generator, dtype: object = np.float64) -> tuple:
    """Random ``(x2, h, scale)`` for ``law``; ``scale`` is ``None`` for a law without one."""
    x2 = rng.standard_normal((n, d2)).astype(dtype)
    h = rng.standard_normal((n, law.out_features(d2))).astype(dtype)
    scale = rng.normal(0.0, 0.8, size=d2).astype(dtype) if law.has_scale else None
    return x2, h, scale


def law_pass(law: type, direction: str) -> tuple:
    if direction == "forward":
        return law.forward, law.forward_vjp
    return law.inverse, law.inverse_vjp


def check_law_gradients(law: type, direction: str, x2: np.ndarray, h: np.ndarray, scale, rng) -> None:
    """The law's backward of ``direction`` vs central differences of ``Σ A ⊙ out + Σ b ⊙ logdet``."""
    apply, backward = law_pass(law, direction)
    out, logdet = apply(x2, h, scale)
    weight_out, weight_logdet = rng.standard_normal(out.shape), rng.standard_normal(logdet.shape)

    def loss() -> float:
        out, logdet = apply(x2, h, scale)
        return float(np.sum(weight_out * out) + np.sum(weight_logdet * logdet))

    d_in, d_h, d_scale = backward(x2, h, scale, weight_out.copy(), weight_logdet.copy())
    analytic = {"input": d_in, "h": d_h}
    numeric = {"input": numerical_gradient(loss, x2), "h": numerical_gradient(loss, h)}
    if law.has_scale:
        analytic["scale"] = d_scale
        numeric["scale"] = numerical_gradient(loss, scale)
    else:
        assert d_scale is None
    size = 1.0 + float(np.sum(np.abs(weight_out * out)) + np.sum(np.abs(weight_logdet * logdet)))
    assert_gradients_match(analytic, numeric, FD_FLOOR * size, f"{law.__name__}.backward_{direction}")


def test_registry(reference_backend: None) -> None:
    assert COUPLING_LAWS == {"additive": AdditiveLaw, "affine": AffineLaw}
    assert backend.coupling_law("additive") is AdditiveLaw
    assert backend.coupling_law("affine") is AffineLaw
    with pytest.raises(ValueError, match="unknown coupling law 'spline'"):
        backend.coupling_law("spline")
    assert AdditiveLaw.out_features(3) == 3 and AffineLaw.out_features(3) == 6


@LAWS
@FAST
@given(n=sizes, d2=widths, seed=seeds, direction=directions)
def test_backward_matches_finite_differences(law: type, n: int, d2: int, seed: int, direction: str) -> None:
    rng = np.random.default_rng(seed)
    x2, h, scale = draw(law, n, d2, rng)
    check_law_gradients(law, direction, x2, h, scale, rng)


@LAWS
@FAST
@given(n=sizes, d2=widths, seed=seeds, direction=directions, magnitude=st.sampled_from([1.0, 1e3]))
def test_round_trip(law: type, n: int, d2: int, seed: int, direction: str, magnitude: float) -> None:
    rng = np.random.default_rng(seed)
    x2, h, scale = draw(law, n, d2, rng)
    x2 *= magnitude
    apply, _ = law_pass(law, direction)
    undo, _ = law_pass(law, "inverse" if direction == "forward" else "forward")
    out, logdet = apply(x2, h, scale)
    back, back_logdet = undo(out, h, scale)
    np.testing.assert_allclose(back, x2, rtol=0, atol=1e-12 * max(1.0, float(np.abs(out).max())))
    np.testing.assert_allclose(back_logdet, -logdet, rtol=0, atol=1e-12)


@LAWS
@FAST
@given(n=sizes, d2=widths, seed=seeds, direction=directions)
def test_logdet_matches_jacobian(law: type, n: int, d2: int, seed: int, direction: str) -> None:
    rng = np.random.default_rng(seed)
    x2, h, scale = draw(law, n, d2, rng)
    apply, _ = law_pass(law, direction)
    _, logdet = apply(x2, h, scale)
    for i in range(n):
        jacobian = numerical_jacobian(lambda row, i=i: apply(row, h[i : i + 1], scale)[0], x2[i])
        np.testing.assert_allclose(jacobian, np.diag(np.diag(jacobian)), atol=1e-9)  # elementwise law
        assert logdet[i] == pytest.approx(np.linalg.slogdet(jacobian)[1], abs=1e-6)


def test_affine_law_closed_form() -> None:
    """z₂ = x₂ ⊙ exp(a ⊙ tanh(ŝ)) + t, logdet = Σ a ⊙ tanh(ŝ), written out independently."""
    x2 = np.array([[0.5, -2.0], [3.0, 0.25]])
    s_hat = np.array([[0.3, -1.0], [2.0, 0.0]])
    t = np.array([[1.0, 2.0], [-1.0, 0.5]])
    a = np.array([0.7, -1.5])
    z2, logdet = AffineLaw.forward(x2, np.hstack([s_hat, t]), a)
    s = a * np.tanh(s_hat)
    np.testing.assert_allclose(z2, x2 * np.exp(s) + t, rtol=1e-15)
    np.testing.assert_allclose(logdet, s.sum(axis=1), rtol=1e-15)


def test_additive_law_closed_form() -> None:
    x2 = np.array([[0.5, -2.0], [3.0, 0.25]])
    h = np.array([[1.0, 2.0], [-1.0, 0.5]])
    z2, logdet = AdditiveLaw.forward(x2, h, None)
    np.testing.assert_array_equal(z2, x2 + h)
    np.testing.assert_array_equal(logdet, np.zeros(2))
    back, back_logdet = AdditiveLaw.inverse(z2, h, None)
    np.testing.assert_array_equal(back, x2)
    np.testing.assert_array_equal(back_logdet, np.zeros(2))


@pytest.mark.parametrize("s_hat", [40.0, -40.0, 1e4, -1e4, 1e300])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_affine_law_at_the_bound(s_hat: float, direction: str) -> None:
    """A huge net output saturates tanh: |s| = |a| exactly, everything finite, ∂L/∂ŝ = 0."""
    rng = np.random.default_rng(0)
    n, d2 = 3, 2
    x2 = rng.standard_normal((n, d2))
    scale = np.array([3.0, -2.5])
    h = np.hstack([np.full((n, d2), s_hat), rng.standard_normal((n, d2))])
    apply, backward = law_pass(AffineLaw, direction)
    out, logdet = apply(x2, h, scale)
    sign = 1.0 if direction == "forward" else -1.0
    np.testing.assert_allclose(logdet, sign * np.sign(s_hat) * scale.sum(), rtol=1e-14)
    assert np.isfinite(out).all()
    d_in, d_h, d_scale = backward(x2, h, scale, rng.standard_normal((n, d2)), rng.standard_normal(n))
    assert np.isfinite(d_in).all() and np.isfinite(d_h).all() and np.isfinite(d_scale).all()
    np.testing.assert_array_equal(d_h[:, :d2], 0.0)
    if abs(s_hat) < 1e3:  # finite differences in h need h ± eps to be representable as distinct values
        check_law_gradients(AffineLaw, direction, x2, h, scale, rng)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_affine_law_bounded_for_any_net_output(direction: str) -> None:
    rng = np.random.default_rng(1)
    scale = np.array([1.0, -0.5, 2.0])
    h = np.hstack([rng.standard_normal((50, 3)) * 1e6, rng.standard_normal((50, 3))])
    _, logdet = law_pass(AffineLaw, direction)[0](rng.standard_normal((50, 3)), h, scale)
    assert np.all(np.abs(logdet) <= np.abs(scale).sum() * (1 + 1e-15))


@LAWS
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_dtypes_and_inputs_untouched(law: type, dtype: object, direction: str) -> None:
    rng = np.random.default_rng(2)
    x2, h, scale = draw(law, 4, 3, rng, dtype)
    originals = [x2.copy(), h.copy(), None if scale is None else scale.copy()]
    apply, backward = law_pass(law, direction)
    out, logdet = apply(x2, h, scale)
    assert out.dtype == dtype and logdet.dtype == dtype and out.shape == (4, 3) and logdet.shape == (4,)
    d_out, d_logdet = rng.standard_normal((4, 3)).astype(dtype), rng.standard_normal(4).astype(dtype)
    d_copies = (d_out.copy(), d_logdet.copy())
    d_in, d_h, d_scale = backward(x2, h, scale, d_out, d_logdet)
    assert d_in.dtype == dtype and d_h.dtype == dtype and d_h.shape == h.shape and d_in.shape == x2.shape
    if law.has_scale:
        assert d_scale.dtype == dtype and d_scale.shape == scale.shape
    for array, original in zip([x2, h, scale], originals, strict=True):
        if original is not None:
            np.testing.assert_array_equal(array, original)
    np.testing.assert_array_equal(d_out, d_copies[0])
    np.testing.assert_array_equal(d_logdet, d_copies[1])
    # the returned d_h is a fresh array: a caller may update it in place without corrupting d_in
    assert not np.shares_memory(d_h, d_in)


class ExpLaw:
    """A user's own law, for the test: ``z₂ = x₂ ⊙ exp(h)`` (unbounded log-scale ``s = h``), ``logdet = Σ h``.

    forward_vjp: ``∂L/∂x₂ = d_z₂ ⊙ e``, ``∂L/∂h = d_z₂ ⊙ z₂ + d_logdet``.
    inverse_vjp: ``x₂ = z₂ ⊙ e⁻¹``: ``∂L/∂z₂ = d_x₂ ⊙ e⁻¹``, ``∂L/∂h = −d_x₂ ⊙ x₂ − d_logdet``.
    """

    name = "toy-exp"
    has_scale = False

    @staticmethod
    def out_features(d2: int) -> int:
        return d2

    @staticmethod
    def forward(x2, h, scale):
        return x2 * np.exp(h), h.sum(axis=1)

    @staticmethod
    def inverse(z2, h, scale):
        return z2 * np.exp(-h), -h.sum(axis=1)

    @staticmethod
    def forward_vjp(x2, h, scale, d_z2, d_logdet):
        d_x2 = d_z2 * np.exp(h)
        return d_x2, d_x2 * x2 + d_logdet[:, None], None

    @staticmethod
    def inverse_vjp(z2, h, scale, d_x2, d_logdet):
        e_inv = np.exp(-h)
        return d_x2 * e_inv, -d_x2 * (z2 * e_inv) - d_logdet[:, None], None


@pytest.fixture
def toy_law(reference_backend: None):
    """``ExpLaw`` registered with a kernel on the reference backend that declines float32 calls."""
    calls = {"ran": 0, "declined": 0}

    def forward_kernel(x2, h, scale):
        if x2.dtype != np.float64:
            calls["declined"] += 1
            return NotImplemented
        calls["ran"] += 1
        z2 = np.exp(h)
        z2 *= x2
        return z2, h.sum(axis=1)

    nflow_np.register_law(ExpLaw, kernels={"numpy": {"forward": forward_kernel}})
    yield calls
    backend._forget_law(ExpLaw.name)


def test_a_registered_law_runs_in_a_coupling_layer_and_passes_the_shared_checks(toy_law: dict) -> None:
    from helpers import check_flow_gradients, check_logdet, randomise

    rng = np.random.default_rng(3)
    flow = randomise(Coupling(4, "toy-exp", hidden=(5,), rng=rng), rng)
    x = rng.standard_normal((6, 4))
    for direction in ("forward", "inverse"):
        check_flow_gradients(flow, x, direction, rng)
        check_logdet(flow, x, direction)
    z, logdet = flow.forward(x)
    x_back, logdet_back = flow.inverse(z)
    np.testing.assert_allclose(x_back, x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(logdet_back, -logdet, rtol=1e-12, atol=1e-12)
    assert toy_law["ran"] > 0 and toy_law["declined"] == 0
    flow32 = Coupling(4, "toy-exp", hidden=(5,), rng=rng, dtype=np.float32)
    z32, _ = flow32.forward(x.astype(np.float32))
    assert z32.dtype == np.float32 and toy_law["declined"] == 1  # the reference ran instead


def test_register_law_refuses_an_incomplete_law_or_unknown_methods() -> None:
    with pytest.raises(ValueError, match="lacks"):
        nflow_np.register_law(type("Half", (), {"name": "half", "has_scale": False}))
    with pytest.raises(ValueError, match="unknown law methods"):
        nflow_np.register_law(ExpLaw, kernels={"numba": {"backward": print}})
    assert "toy-exp" not in COUPLING_LAWS
