"""The flow protocol, proven for every layer of ``helpers.FLOW_CASES``.

Gradients (both directions, input and every parameter) and log-dets against finite differences,
round trips, forward/inverse log-det consistency, dtype preservation, and the errors of the public
methods. Also a self-test that the helpers catch a wrong gradient and a wrong log-det.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    FLOW_CASES,
    check_flow_gradients,
    check_logdet,
    numerical_gradient,
    numerical_jacobian,
    randomise,
    relative_error,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.random import Generator

from nflow_np import AffineCoupling, Flow, Rescale, Reverse, Sequential

FAST = settings(max_examples=25, deadline=None)
FEW = settings(max_examples=10, deadline=None)

CASE_IDS = [name for name, _ in FLOW_CASES]
cases = pytest.mark.parametrize(("name", "factory"), FLOW_CASES, ids=CASE_IDS)

dims = st.integers(2, 6)
batches = st.integers(1, 5)
seeds = st.integers(0, 2**32 - 1)
directions = st.sampled_from(["forward", "inverse"])


def _has_parameters(factory: object) -> bool:
    return factory(3, np.random.default_rng(0), np.float64).num_parameters() > 0


PARAMETRISED_CASES = [(name, factory) for name, factory in FLOW_CASES if _has_parameters(factory)]
parametrised_cases = pytest.mark.parametrize(
    ("name", "factory"), PARAMETRISED_CASES, ids=[name for name, _ in PARAMETRISED_CASES]
)


def make(factory: object, dim: int, seed: int, dtype: object = np.float64) -> tuple[Flow, Generator]:
    rng = np.random.default_rng(seed)
    return factory(dim, rng, dtype), rng


def call(flow: Flow, direction: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return flow.forward(x) if direction == "forward" else flow.inverse(x)


def opposite(direction: str) -> str:
    return "inverse" if direction == "forward" else "forward"


# --- the registry itself ----------------------------------------------------------------------


def test_registry_names_are_unique() -> None:
    assert len(set(CASE_IDS)) == len(CASE_IDS)


@cases
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_factories_randomise_every_parameter(name: str, factory: object, dtype: object) -> None:
    flow, _ = make(factory, 4, 1, dtype)
    assert flow.dim == 4
    for param_name, param, _ in flow.named_parameters():
        assert param.dtype == dtype, param_name
        assert np.all(param != 0) and np.all(param != 1), f"{param_name} still at its initial value"
        assert len(np.unique(param)) == param.size, f"{param_name} has repeated entries"


# --- gradients and log-dets -------------------------------------------------------------------


@cases
@FAST
@given(dim=dims, n=batches, seed=seeds, direction=directions)
def test_gradients(name: str, factory: object, dim: int, n: int, seed: int, direction: str) -> None:
    flow, rng = make(factory, dim, seed)
    x = rng.standard_normal((n, dim))
    check_flow_gradients(flow, x, direction, rng)


@cases
@FAST
@given(dim=dims, n=batches, seed=seeds, direction=directions)
def test_logdet_matches_jacobian(
    name: str, factory: object, dim: int, n: int, seed: int, direction: str
) -> None:
    flow, rng = make(factory, dim, seed)
    check_logdet(flow, rng.standard_normal((n, dim)), direction)


@cases
@FEW
@given(dim=dims, n=batches, seed=seeds)
def test_gradients_accumulate(name: str, factory: object, dim: int, n: int, seed: int) -> None:
    """Two backward passes (one per direction) add up: grads == grads_forward + grads_inverse."""
    flow, rng = make(factory, dim, seed)
    x, z = rng.standard_normal((2, n, dim))
    d_out, d_logdet = rng.standard_normal((n, dim)), rng.standard_normal(n)
    separate = {}
    for direction, point in (("forward", x), ("inverse", z)):
        flow.zero_grad()
        call(flow, direction, point)
        flow.backward(d_out, d_logdet)
        separate[direction] = {name: grad.copy() for name, _, grad in flow.named_parameters()}
    flow.zero_grad()
    flow.forward(x)
    flow.backward(d_out, d_logdet)
    flow.inverse(z)
    flow.backward(d_out, d_logdet)
    for param_name, _, grad in flow.named_parameters():
        expected = separate["forward"][param_name] + separate["inverse"][param_name]
        np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-12, err_msg=param_name)
    flow.zero_grad()
    assert all(np.all(grad == 0) for _, _, grad in flow.named_parameters())


@cases
@FEW
@given(dim=dims, n=batches, seed=seeds)
def test_backward_uses_the_last_call(name: str, factory: object, dim: int, n: int, seed: int) -> None:
    """backward after forward(x) then inverse(z) differentiates the inverse call, not the forward one."""
    flow, rng = make(factory, dim, seed)
    x, z = rng.standard_normal((2, n, dim))
    d_out, d_logdet = rng.standard_normal((n, dim)), rng.standard_normal(n)
    flow.inverse(z)
    expected = flow.backward(d_out, d_logdet)
    flow.forward(x)
    flow.inverse(z)
    np.testing.assert_array_equal(flow.backward(d_out, d_logdet), expected)


@cases
@FEW
@given(dim=dims, n=batches, seed=seeds)
def test_backward_default_d_logdet_is_zero(name: str, factory: object, dim: int, n: int, seed: int) -> None:
    flow, rng = make(factory, dim, seed)
    x, d_out = rng.standard_normal((2, n, dim))
    flow.forward(x)
    flow.zero_grad()
    explicit = flow.backward(d_out, np.zeros(n))
    explicit_grads = [grad.copy() for _, _, grad in flow.named_parameters()]
    flow.zero_grad()
    np.testing.assert_array_equal(flow.backward(d_out), explicit)
    for grad, expected in zip([grad for _, _, grad in flow.named_parameters()], explicit_grads, strict=True):
        np.testing.assert_array_equal(grad, expected)


# --- round trips and log-det consistency ------------------------------------------------------


@cases
@FAST
@given(dim=dims, n=batches, seed=seeds, direction=directions, magnitude=st.sampled_from([1.0, 30.0, 1e3]))
def test_round_trip_float64(
    name: str, factory: object, dim: int, n: int, seed: int, direction: str, magnitude: float
) -> None:
    flow, rng = make(factory, dim, seed)
    x = magnitude * rng.standard_normal((n, dim))
    out, logdet = call(flow, direction, x)
    assert np.isfinite(out).all() and np.isfinite(logdet).all()
    back, back_logdet = call(flow, opposite(direction), out)
    scale = max(1.0, float(np.abs(x).max()), float(np.abs(out).max()))
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-10 * scale)
    logdet_scale = max(1.0, float(np.abs(logdet).max()))
    np.testing.assert_allclose(back_logdet, -logdet, rtol=0, atol=1e-10 * logdet_scale)


@cases
@FAST
@given(dim=dims, n=batches, seed=seeds, direction=directions)
def test_round_trip_float32(name: str, factory: object, dim: int, n: int, seed: int, direction: str) -> None:
    flow, rng = make(factory, dim, seed, np.float32)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    out, logdet = call(flow, direction, x)
    back, back_logdet = call(flow, opposite(direction), out)
    scale = max(1.0, float(np.abs(x).max()), float(np.abs(out).max()))
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-4 * scale)
    logdet_scale = max(1.0, float(np.abs(logdet).max()))
    np.testing.assert_allclose(back_logdet, -logdet, rtol=0, atol=1e-4 * logdet_scale)


@cases
@FEW
@given(dim=dims, n=batches, seed=seeds)
def test_float32_agrees_with_float64(name: str, factory: object, dim: int, n: int, seed: int) -> None:
    """The same flow in both precisions computes the same map (float32 rounding aside)."""
    flow64, rng = make(factory, dim, seed, np.float64)
    flow32, _ = make(factory, dim, seed, np.float32)
    x = rng.standard_normal((n, dim))
    z64, logdet64 = flow64.forward(x)
    z32, logdet32 = flow32.forward(x.astype(np.float32))
    np.testing.assert_allclose(z32, z64, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logdet32, logdet64, rtol=1e-4, atol=1e-4)


@cases
@FEW
@given(dim=dims, n=batches, seed=seeds)
def test_rows_are_independent(name: str, factory: object, dim: int, n: int, seed: int) -> None:
    flow, rng = make(factory, dim, seed)
    x = rng.standard_normal((n, dim))
    z, logdet = flow.forward(x)
    for i in range(n):
        z_i, logdet_i = flow.forward(x[i : i + 1])
        np.testing.assert_allclose(z_i[0], z[i], rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(logdet_i[0], logdet[i], rtol=1e-13, atol=1e-13)


@cases
@FEW
@given(dim=dims, n=batches, seed=seeds, direction=directions)
def test_calls_do_not_modify_their_input(
    name: str, factory: object, dim: int, n: int, seed: int, direction: str
) -> None:
    flow, rng = make(factory, dim, seed)
    x = rng.standard_normal((n, dim))
    original = x.copy()
    out, _ = call(flow, direction, x)
    flow.backward(rng.standard_normal((n, dim)), rng.standard_normal(n))
    np.testing.assert_array_equal(x, original)
    assert not np.shares_memory(out, x)


# --- dtypes -----------------------------------------------------------------------------------


@cases
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_in_is_dtype_out(name: str, factory: object, dtype: object) -> None:
    flow, rng = make(factory, 5, 3, dtype)
    x = rng.standard_normal((4, 5)).astype(dtype)
    for direction in ("forward", "inverse"):
        out, logdet = call(flow, direction, x)
        assert out.dtype == dtype and logdet.dtype == dtype, direction
        assert out.shape == (4, 5) and logdet.shape == (4,)
        d_in = flow.backward(np.ones((4, 5), dtype=dtype), np.ones(4, dtype=dtype))
        assert d_in.dtype == dtype and d_in.shape == (4, 5), direction
        for param_name, param, grad in flow.named_parameters():
            assert param.dtype == dtype and grad.dtype == dtype, param_name


# --- errors -----------------------------------------------------------------------------------


@cases
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_input_errors(name: str, factory: object, direction: str) -> None:
    flow, rng = make(factory, 4, 0)
    label = "x" if direction == "forward" else "z"
    x = rng.standard_normal((3, 4))
    with pytest.raises(ValueError, match=rf"{label} has 3 columns but this flow works in dimension 4"):
        call(flow, direction, x[:, :3])
    with pytest.raises(ValueError, match=rf"{label} must be 2-D with shape \(N, D\), got 1-D"):
        call(flow, direction, x[0])
    with pytest.raises(ValueError, match=rf"{label} must be 2-D"):
        call(flow, direction, x[None])
    with pytest.raises(TypeError, match=rf"{label} has dtype int64; expected float32 or float64"):
        call(flow, direction, np.ones((3, 4), dtype=np.int64))
    with pytest.raises(TypeError, match=rf"{label} has dtype float16"):
        call(flow, direction, x.astype(np.float16))
    with pytest.raises(TypeError, match=rf"{label} must be a numpy.ndarray, got list"):
        call(flow, direction, x.tolist())
    with pytest.raises(ValueError, match=rf"{label} is empty"):
        call(flow, direction, np.zeros((0, 4)))
    for bad, text in ((np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf")):
        poisoned = x.copy()
        poisoned[2, 1] = bad
        with pytest.raises(ValueError, match=rf"{label} has a non-finite value {text} at index \(2, 1\)"):
            call(flow, direction, poisoned)


@parametrised_cases
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_precision_mismatch_errors(name: str, factory: object, direction: str) -> None:
    label = "x" if direction == "forward" else "z"
    flow64, rng = make(factory, 4, 0, np.float64)
    x = rng.standard_normal((3, 4))
    with pytest.raises(TypeError, match=rf"{label} has dtype float32 but the parameters are float64"):
        call(flow64, direction, x.astype(np.float32))
    flow32, _ = make(factory, 4, 0, np.float32)
    with pytest.raises(TypeError, match=rf"{label} has dtype float64 but the parameters are float32"):
        call(flow32, direction, x)


@cases
def test_backward_errors(name: str, factory: object) -> None:
    flow, rng = make(factory, 4, 0)
    with pytest.raises(RuntimeError, match="backward called before forward or inverse"):
        flow.backward(np.ones((3, 4)), np.ones(3))
    flow.forward(rng.standard_normal((3, 4)))
    expected = r"d_out must have shape \(3, 4\) like the last output, got "
    with pytest.raises(ValueError, match=expected + r"\(2, 4\)"):
        flow.backward(np.ones((2, 4)), np.ones(2))
    with pytest.raises(ValueError, match=expected + r"\(3, 3\)"):
        flow.backward(np.ones((3, 3)), np.ones(3))
    with pytest.raises(ValueError, match=expected + "list"):
        flow.backward(np.ones((3, 4)).tolist(), np.ones(3))
    with pytest.raises(ValueError, match=r"d_logdet must have shape \(3,\), got \(3, 1\)"):
        flow.backward(np.ones((3, 4)), np.ones((3, 1)))
    flow.inverse(rng.standard_normal((5, 4)))
    with pytest.raises(ValueError, match=r"d_out must have shape \(5, 4\)"):
        flow.backward(np.ones((3, 4)), np.ones(3))


def test_construction_errors() -> None:
    with pytest.raises(ValueError, match="positive dimension"):
        Rescale(0)
    with pytest.raises(ValueError, match="at least one flow"):
        Sequential([])
    with pytest.raises(ValueError, match=r"share one dimension, got \[2, 3\]"):
        Sequential([Rescale(2), Rescale(3)])


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_a_flow_instance_used_twice_is_refused_or_differentiated_correctly(direction: str) -> None:
    """Sequential([c, Reverse, c]) reuses one layer (weight tying). Each layer keeps one cache, so the
    second call overwrites what the first call's backward needs; the library must either refuse the
    composition or still return correct gradients (the parameter then receives the sum of both uses)."""
    rng = np.random.default_rng(0)
    for shared in (randomise(Rescale(3), rng), randomise(AffineCoupling(3, hidden=(5,), rng=rng), rng)):
        try:
            flow = Sequential([shared, Reverse(3), shared])
        except ValueError:
            continue
        check_flow_gradients(flow, rng.standard_normal((4, 3)), direction, rng)


# --- the helpers catch what they should -------------------------------------------------------


class _WrongRescale(Rescale):
    """Rescale whose backward forgets the log-det term of ∂L/∂σ (a plausible hand-derivation slip)."""

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        return super()._backward(d_out, np.zeros_like(d_logdet))


class _SlightlyWrongInputGradient(Rescale):
    """Rescale whose input gradient is off by one part in 10⁵."""

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        return super()._backward(d_out, d_logdet) * (1 + 1e-5)


class _WrongLogdet(Rescale):
    """Rescale that reports twice its true log-det."""

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z, logdet = super()._forward(x)
        return z, 2 * logdet


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_gradient_check_catches_a_wrong_parameter_gradient(direction: str) -> None:
    rng = np.random.default_rng(0)
    flow = randomise(_WrongRescale(3), rng)
    with pytest.raises(AssertionError, match="log_scale"):
        check_flow_gradients(flow, rng.standard_normal((4, 3)), direction, rng)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_gradient_check_catches_a_small_input_gradient_error(direction: str) -> None:
    rng = np.random.default_rng(1)
    flow = randomise(_SlightlyWrongInputGradient(3), rng)
    with pytest.raises(AssertionError, match="input"):
        check_flow_gradients(flow, rng.standard_normal((4, 3)), direction, rng)


def test_gradient_check_catches_an_error_inside_a_sequential() -> None:
    rng = np.random.default_rng(2)
    flow = randomise(Sequential([Rescale(3), _WrongRescale(3)]), rng)
    with pytest.raises(AssertionError, match=r"1\.log_scale"):
        check_flow_gradients(flow, rng.standard_normal((4, 3)), "forward", rng)


def test_gradient_check_passes_the_correct_layer() -> None:
    rng = np.random.default_rng(0)
    check_flow_gradients(randomise(Rescale(3), rng), rng.standard_normal((4, 3)), "forward", rng)


def test_logdet_check_catches_a_wrong_logdet() -> None:
    rng = np.random.default_rng(0)
    flow = randomise(_WrongLogdet(3), rng)
    with pytest.raises(AssertionError, match="logdet"):
        check_logdet(flow, rng.standard_normal((2, 3)), "forward")


def test_finite_difference_primitives() -> None:
    """numerical_gradient / numerical_jacobian on functions with known derivatives; arrays restored."""
    a = np.array([[0.3, -1.2], [2.0, 0.7]])
    original = a.copy()
    grad = numerical_gradient(lambda: float(np.sum(np.sin(a)) + a[0, 0] * a[1, 1]), a)
    expected = np.cos(original)
    expected[0, 0] += original[1, 1]
    expected[1, 1] += original[0, 0]
    np.testing.assert_allclose(grad, expected, rtol=1e-8, atol=1e-9)
    np.testing.assert_array_equal(a, original)
    matrix = np.array([[2.0, 1.0], [-0.5, 3.0]])
    jacobian = numerical_jacobian(lambda row: np.tanh(row @ matrix.T), np.array([0.1, -0.2]))
    inner = matrix @ np.array([0.1, -0.2])
    np.testing.assert_allclose(jacobian, (1 - np.tanh(inner) ** 2)[:, None] * matrix, rtol=1e-8)
    assert relative_error(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    assert relative_error(np.array([1.0, 2.0 + 4e-6]), np.array([1.0, 2.0])) == pytest.approx(2e-6)
    assert relative_error(np.array([np.nan]), np.array([1.0])) == float("inf")
    assert relative_error(np.array([1e-9]), np.array([0.0])) > 1.0
    with pytest.raises(TypeError, match="float64"):
        numerical_gradient(lambda: 0.0, np.zeros(2, dtype=np.float32))
