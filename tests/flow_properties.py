"""The property suite: what every flow layer must satisfy, as plain functions of one registry case.

Each property is ``check(case, dim, n, seed, direction)`` for a :class:`helpers.FlowCase`; :func:`prove`
runs one on one backend, drawing ``(dim, n, seed, direction)`` with Hypothesis (or once per direction
for the fixed ones). ``tests/flows/test_flows.py`` runs every property on every case and backend; a
new layer's test can run them all on its own case (``tests/flows/test_add_a_layer.py``).

The properties: gradients (both directions, input and every parameter) and log-dets against finite
differences, that gradients accumulate, that backward follows the last call and defaults
``d_logdet`` to zero, round trips in float64 and float32 with log-dets that negate, float32 agreeing
with float64, independent rows, inputs left untouched, dtype in = dtype out, and the errors of the
public methods.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from helpers import REFERENCE, FlowCase, check_flow_gradients, check_logdet
from hypothesis import given, settings
from hypothesis import seed as fixed_seed
from hypothesis import strategies as st

from nflow_np import using
from nflow_np.flows import Flow

Property = Callable[[FlowCase, int, int, int, str], None]

dims = st.integers(2, 6)
batches = st.integers(1, 5)
seeds = st.integers(0, 2**32 - 1)
directions = st.sampled_from(["forward", "inverse"])
MAGNITUDES = (1.0, 30.0, 1e3)


def make(case: FlowCase, dim: int, seed: int, dtype: object = np.float64) -> tuple[Flow, np.random.Generator]:
    rng = np.random.default_rng(seed)
    return case.build(dim, rng, dtype), rng


def call(flow: Flow, direction: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return flow.forward(x) if direction == "forward" else flow.inverse(x)


def opposite(direction: str) -> str:
    return "inverse" if direction == "forward" else "forward"


# --- the registry entry itself ----------------------------------------------------------------


def factories_randomise_every_parameter(case: FlowCase, dim: int, n: int, seed: int, direction: str) -> None:
    for dtype in (np.float32, np.float64):
        flow, _ = make(case, dim, seed, dtype)
        for name, param, _ in flow.named_parameters():
            assert param.dtype == dtype, name
            assert np.all(param != 0) and np.all(param != 1), f"{name} still at its initial value"
            assert len(np.unique(param)) == param.size, f"{name} has repeated entries"


# --- gradients and log-dets -------------------------------------------------------------------


def gradients(case: FlowCase, dim: int, n: int, seed: int, direction: str) -> None:
    flow, rng = make(case, dim, seed)
    check_flow_gradients(flow, case.sample(flow, direction, n, rng), direction, rng)


def logdet_matches_jacobian(case: FlowCase, dim: int, n: int, seed: int, direction: str) -> None:
    direction = direction if direction in case.directions else "forward"
    flow, rng = make(case, dim, seed)
    check_logdet(flow, case.sample(flow, direction, n, rng), direction)


def gradients_accumulate(case: FlowCase, dim: int, n: int, seed: int, direction: str) -> None:
    """Two backward passes (one per direction) add up: grads == grads_forward + grads_inverse."""
    flow, rng = make(case, dim, seed)
    x, z = case.sample(flow, "forward", n, rng), case.sample(flow, "inverse", n, rng)
    d_out, d_logdet = rng.standard_normal((n, flow.dim)), rng.standard_normal(n)
    separate = {}
    for way, point in (("forward", x), ("inverse", z)):
        flow.zero_grad()
        call(flow, way, point)
        flow.backward(d_out, d_logdet)
        separate[way] = {name: grad.copy() for name, _, grad in flow.named_parameters()}
    flow.zero_grad()
    flow.forward(x)
    flow.backward(d_out, d_logdet)
    flow.inverse(z)
    flow.backward(d_out, d_logdet)
    for name, _, grad in flow.named_parameters():
        expected = separate["forward"][name] + separate["inverse"][name]
        np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-12, err_msg=name)
    flow.zero_grad()
    assert all(np.all(grad == 0) for _, _, grad in flow.named_parameters())


def backward_uses_the_last_call(case: FlowCase, dim: int, n: int, seed: int, direction: str) -> None:
    """backward after forward(x) then inverse(z) differentiates the inverse call, not the forward one."""
    flow, rng = make(case, dim, seed)
    x, z = case.sample(flow, "forward", n, rng), case.sample(flow, "inverse", n, rng)
    d_out, d_logdet = rng.standard_normal((n, flow.dim)), rng.standard_normal(n)
    flow.inverse(z)
    expected = flow.backward(d_out, d_logdet)
    flow.forward(x)
    flow.inverse(z)
    np.testing.assert_array_equal(flow.backward(d_out, d_logdet), expected)


def backward_default_d_logdet_is_zero(case: FlowCase, dim: int, n: int, seed: int, direction: str) -> None:
    flow, rng = make(case, dim, seed)
    x = case.sample(flow, direction, n, rng)
    d_out = rng.standard_normal((n, flow.dim))
    call(flow, direction, x)
    flow.zero_grad()
    explicit = flow.backward(d_out, np.zeros(n))
    explicit_grads = [grad.copy() for _, _, grad in flow.named_parameters()]
    flow.zero_grad()
    np.testing.assert_array_equal(flow.backward(d_out), explicit)
    for grad, expected in zip([grad for _, _, grad in flow.named_parameters()], explicit_grads, strict=True):
        np.testing.assert_array_equal(grad, expected)


# --- round trips and log-det consistency ------------------------------------------------------


def round_trip_float64(case: FlowCase, dim: int, n: int, seed: int, direction: str) -> None:
    direction = direction if direction in case.directions else "forward"
    flow, rng = make(case, dim, seed)
    x = case.sample(flow, direction, n, rng, MAGNITUDES[seed % len(MAGNITUDES)])
    out, logdet = call(flow, direction, x)
    assert np.isfinite(out).all() and np.isfinite(logdet).all()
    back, back_logdet = call(flow, opposite(direction), out)
    scale = max(1.0, float(np.abs(x).max()), float(np.abs(out).max()))
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-10 * scale)
    logdet_scale = max(1.0, float(np.abs(logdet).max()))
    np.testing.assert_allclose(back_logdet, -logdet, rtol=0, atol=1e-10 * logdet_scale)


def round_trip_float32(case: FlowCase, dim: int, n: int, seed: int, direction: str) -> None:
    direction = direction if direction in case.directions else "forward"
    flow, rng = make(case, dim, seed, np.float32)
    x = case.sample(flow, direction, n, rng).astype(np.float32)
    out, logdet = call(flow, direction, x)
    back, back_logdet = call(flow, opposite(direction), out)
    scale = max(1.0, float(np.abs(x).max()), float(np.abs(out).max()))
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-4 * scale)
    logdet_scale = max(1.0, float(np.abs(logdet).max()))
    np.testing.assert_allclose(back_logdet, -logdet, rtol=0, atol=1e-4 * logdet_scale)


def float32_agrees_with_float64(case: FlowCase, dim: int, n: int, seed: int, direction: str) -> None:
    """The same flow in both precisions computes the same map (float32 rounding aside)."""
    flow64, rng = make(case, dim, seed, np.float64)
    flow32, _ = make(case, dim, seed, np.float32)
    x = case.sample(flow64, direction, n, rng)
    out64, logdet64 = call(flow64, direction, x)
    out32, logdet32 = call(flow32, direction, x.astype(np.float32))
    np.testing.assert_allclose(out32, out64, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logdet32, logdet64, rtol=1e-4, atol=1e-4)


def rows_are_independent(case: FlowCase, dim: int, n: int, seed: int, direction: str) -> None:
    flow, rng = make(case, dim, seed)
    x = case.sample(flow, direction, n, rng)
    out, logdet = call(flow, direction, x)
    for i in range(n):
        out_i, logdet_i = call(flow, direction, x[i : i + 1])
        np.testing.assert_allclose(out_i[0], out[i], rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(logdet_i[0], logdet[i], rtol=1e-13, atol=1e-13)


def calls_do_not_modify_their_input(case: FlowCase, dim: int, n: int, seed: int, direction: str) -> None:
    flow, rng = make(case, dim, seed)
    x = case.sample(flow, direction, n, rng)
    original = x.copy()
    out, _ = call(flow, direction, x)
    flow.backward(rng.standard_normal((n, flow.dim)), rng.standard_normal(n))
    np.testing.assert_array_equal(x, original)
    assert not np.shares_memory(out, x)


def agrees_with_the_reference(case: FlowCase, dim: int, n: int, seed: int, direction: str) -> None:
    """On the active backend, the call and its backward equal the NumPy reference's (kernels: to a few ulps)."""
    results = []
    for backend in (None, REFERENCE):
        with contextlib.nullcontext() if backend is None else using(backend):
            flow, rng = make(case, dim, seed)
            x = case.sample(flow, direction, n, rng)
            out, logdet = call(flow, direction, x)
            d_in = flow.backward(rng.standard_normal(out.shape), rng.standard_normal(n))
            results.append({"out": out, "logdet": logdet, "input": d_in} | dict(flow.state_dict()))
            results[-1] |= {f"grad {name}": grad.copy() for name, _, grad in flow.named_parameters()}
    for name, expected in results[1].items():
        scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
        np.testing.assert_allclose(results[0][name], expected, rtol=0, atol=1e-12 * scale, err_msg=name)


# --- dtypes and errors (one fixed example per direction) --------------------------------------


def dtype_in_is_dtype_out(case: FlowCase, dim: int, n: int, seed: int, direction: str) -> None:
    for dtype in (np.float32, np.float64):
        flow, rng = make(case, dim, seed, dtype)
        x = case.sample(flow, direction, n, rng).astype(dtype)
        out, logdet = call(flow, direction, x)
        assert out.dtype == dtype and logdet.dtype == dtype, direction
        assert out.shape == (n, flow.dim) and logdet.shape == (n,)
        d_in = flow.backward(np.ones((n, flow.dim), dtype=dtype), np.ones(n, dtype=dtype))
        assert d_in.dtype == dtype and d_in.shape == (n, flow.dim), direction
        for name, param, grad in flow.named_parameters():
            assert param.dtype == dtype and grad.dtype == dtype, name


def input_errors(case: FlowCase, dim: int, n: int, seed: int, direction: str) -> None:
    flow, rng = make(case, dim, seed)
    d = flow.dim
    label = "x" if direction == "forward" else "z"
    x = case.sample(flow, direction, 3, rng)
    with pytest.raises(ValueError, match=rf"{label} has {d - 1} columns but this flow works in dimension {d}"):
        call(flow, direction, x[:, :-1])
    with pytest.raises(ValueError, match=rf"{label} must be 2-D with shape \(N, D\), got 1-D"):
        call(flow, direction, x[0])
    with pytest.raises(ValueError, match=rf"{label} must be 2-D"):
        call(flow, direction, x[None])
    with pytest.raises(TypeError, match=rf"{label} has dtype int64; expected float32 or float64"):
        call(flow, direction, np.ones((3, d), dtype=np.int64))
    with pytest.raises(TypeError, match=rf"{label} has dtype float16"):
        call(flow, direction, x.astype(np.float16))
    with pytest.raises(TypeError, match=rf"{label} must be a numpy.ndarray, got list"):
        call(flow, direction, x.tolist())
    with pytest.raises(ValueError, match=rf"{label} is empty"):
        call(flow, direction, np.zeros((0, d)))
    for bad, text in ((np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf")):
        poisoned = x.copy()
        poisoned[2, 1] = bad
        with pytest.raises(ValueError, match=rf"{label} has a non-finite value {text} at index \(2, 1\)"):
            call(flow, direction, poisoned)


def precision_mismatch_errors(case: FlowCase, dim: int, n: int, seed: int, direction: str) -> None:
    """A flow with parameters or buffers (a dtype) refuses the other precision; one without takes either."""
    label = "x" if direction == "forward" else "z"
    flow64, rng = make(case, dim, seed, np.float64)
    x = case.sample(flow64, direction, 3, rng)
    flow32, _ = make(case, dim, seed, np.float32)
    assert (flow64.dtype, flow32.dtype) in ((None, None), (np.float64, np.float32))
    if flow64.dtype is None:
        assert call(flow64, direction, x.astype(np.float32))[0].dtype == np.float32
        assert call(flow32, direction, x)[0].dtype == np.float64
        return
    with pytest.raises(TypeError, match=rf"{label} has dtype float32 but the parameters are float64"):
        call(flow64, direction, x.astype(np.float32))
    with pytest.raises(TypeError, match=rf"{label} has dtype float64 but the parameters are float32"):
        call(flow32, direction, x)


def backward_errors(case: FlowCase, dim: int, n: int, seed: int, direction: str) -> None:
    flow, rng = make(case, dim, seed)
    d = flow.dim
    with pytest.raises(RuntimeError, match="backward called before forward or inverse"):
        flow.backward(np.ones((3, d)), np.ones(3))
    call(flow, direction, case.sample(flow, direction, 3, rng))
    expected = rf"d_out must have shape \(3, {d}\) like the last output, got "
    with pytest.raises(ValueError, match=expected + rf"\(2, {d}\)"):
        flow.backward(np.ones((2, d)), np.ones(2))
    with pytest.raises(ValueError, match=expected + rf"\(3, {d - 1}\)"):
        flow.backward(np.ones((3, d - 1)), np.ones(3))
    with pytest.raises(ValueError, match=expected + "list"):
        flow.backward(np.ones((3, d)).tolist(), np.ones(3))
    with pytest.raises(ValueError, match=r"d_logdet must have shape \(3,\), got \(3, 1\)"):
        flow.backward(np.ones((3, d)), np.ones((3, 1)))
    other = opposite(direction)
    call(flow, other, case.sample(flow, other, 5, rng))
    with pytest.raises(ValueError, match=rf"d_out must have shape \(5, {d}\)"):
        flow.backward(np.ones((3, d)), np.ones(3))


PROPERTIES: dict[str, tuple[Property, int | None]] = {
    "factories_randomise_every_parameter": (factories_randomise_every_parameter, None),
    "gradients": (gradients, 25),
    "logdet_matches_jacobian": (logdet_matches_jacobian, 25),
    "gradients_accumulate": (gradients_accumulate, 10),
    "backward_uses_the_last_call": (backward_uses_the_last_call, 10),
    "backward_default_d_logdet_is_zero": (backward_default_d_logdet_is_zero, 10),
    "round_trip_float64": (round_trip_float64, 25),
    "round_trip_float32": (round_trip_float32, 25),
    "float32_agrees_with_float64": (float32_agrees_with_float64, 10),
    "rows_are_independent": (rows_are_independent, 10),
    "calls_do_not_modify_their_input": (calls_do_not_modify_their_input, 10),
    "dtype_in_is_dtype_out": (dtype_in_is_dtype_out, None),
    "input_errors": (input_errors, None),
    "precision_mismatch_errors": (precision_mismatch_errors, None),
    "backward_errors": (backward_errors, None),
}
"""``name -> (check, Hypothesis examples on the reference backend)``; ``None``: one fixed example
(``dim = 4, n = 4, seed = 0``) per direction."""

BACKEND_PROPERTIES: dict[str, tuple[Property, int | None]] = {
    "agrees_with_the_reference": (agrees_with_the_reference, 25),
}
"""Properties of a backend other than the reference (on the reference itself they would compare it with itself)."""

OTHER_BACKEND_SHARE = 5
"""On a backend other than the reference, each property draws ``1 / OTHER_BACKEND_SHARE`` of the
examples (at least 2): the kernels are proven against the reference function by function in
``tests/kernels``; here they are proven again inside every layer, more cheaply."""


def prove(case: FlowCase, name: str, backend: str = REFERENCE) -> None:
    """Run property ``name`` (of :data:`PROPERTIES` or :data:`BACKEND_PROPERTIES`) on ``case`` on ``backend``."""
    check, examples = (PROPERTIES | BACKEND_PROPERTIES)[name]
    with using(backend):
        if examples is None:
            for direction in ("forward", "inverse"):
                check(case, 4, 4, 0, direction)
            return
        if backend != REFERENCE:
            examples = max(2, examples // OTHER_BACKEND_SHARE)

        @settings(max_examples=examples, deadline=None)
        @given(dim=dims, n=batches, seed=seeds, direction=directions)
        def run(dim: int, n: int, seed: int, direction: str) -> None:
            check(case, dim, n, seed, direction)

        if settings.default.derandomize:  # the reproducible profile: its own examples per property and case
            run = fixed_seed(zlib.crc32(f"{name}/{case.name}".encode()))(run)
        run()


def prove_all(case: FlowCase, backend: str = REFERENCE) -> None:
    """Every property of :data:`PROPERTIES` on ``case``: what the suite proves of each registered layer."""
    for name in PROPERTIES:
        prove(case, name, backend)
    if backend != REFERENCE:
        for name in BACKEND_PROPERTIES:
            prove(case, name, backend)
