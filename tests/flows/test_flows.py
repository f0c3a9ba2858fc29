"""The flow protocol, proven for every layer of ``helpers.CASES`` on every backend of ``helpers.BACKENDS``.

The properties themselves are ``tests/flow_properties.py`` (gradients and log-dets against finite
differences, round trips, log-det consistency, dtypes, the errors of the public methods); here they
run for every (property, case, backend). Also: construction errors, weight tying, and a self-test
that the checks catch a wrong gradient and a wrong log-det.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flow_properties import BACKEND_PROPERTIES, PROPERTIES, prove
from helpers import (
    BACKENDS,
    CASES,
    FLOW_CASES,
    REFERENCE,
    GradcheckError,
    check_flow_gradients,
    check_logdet,
    numerical_gradient,
    numerical_jacobian,
    randomise,
    relative_error,
)

from nflow_np import AffineCoupling, Rescale, Reverse, Sequential

CASE_IDS = [case.name for case in CASES]


def test_registry_names_are_unique() -> None:
    assert len(set(CASE_IDS)) == len(CASE_IDS)


def test_every_flow_class_of_the_library_is_in_the_registry() -> None:
    """A new Flow subclass in nflow_np.flows joins the registry (README, "How to add a layer")."""
    import nflow_np.flows as flows
    from nflow_np.flows import Flow

    rng = np.random.default_rng(0)
    covered = set()
    for case in CASES:
        covered |= {type(module) for module in case.build(4, rng, np.float64).modules()}
    classes = {value for value in vars(flows).values() if isinstance(value, type) and issubclass(value, Flow)}
    abstract = {Flow, flows.Coupling}  # Coupling is covered by its two laws' subclasses
    assert classes - abstract - covered == set()


def test_the_suite_runs_on_every_backend_that_loads_unless_told_otherwise() -> None:
    import importlib.util
    import os

    if os.environ.get("NFLOW_TEST_BACKENDS"):
        assert BACKENDS == [name.strip() for name in os.environ["NFLOW_TEST_BACKENDS"].split(",") if name.strip()]
        return
    assert BACKENDS[0] == "numpy"
    assert ("numba" in BACKENDS) == (importlib.util.find_spec("numba") is not None)


def test_flow_cases_are_the_bijections_of_all_of_r_d() -> None:
    names = [name for name, _ in FLOW_CASES]
    assert "factor_out" in names and not {"squeeze", "logit", "dequantize"} & set(names)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("prop", list(PROPERTIES))
def test_property(prop: str, case: object, backend: str) -> None:
    prove(case, prop, backend)


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != REFERENCE])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("prop", list(BACKEND_PROPERTIES))
def test_backend_property(prop: str, case: object, backend: str) -> None:
    prove(case, prop, backend)


CUDASIM_CASES = ("additive_coupling", "affine_coupling_random_mask", "inverse_affine_coupling")
"""Layers whose code reaches the GPU kernels (the coupling laws); the simulator runs every CUDA thread
as a Python thread, so finite differences there would take many minutes: the kernels' gradients are
proven against the reference instead (``agrees_with_the_reference``), whose gradients are proven here."""
CUDASIM_PROPERTIES = ("agrees_with_the_reference", "round_trip_float32", "dtype_in_is_dtype_out")


def test_the_coupling_layers_on_numba_cuda_under_the_cuda_simulator() -> None:
    """As ``tests/kernels/coupling/test_numba_cuda.py``: ``NUMBA_ENABLE_CUDASIM`` must be set before ``numba.cuda``
    is imported, so this part of the suite runs in a subprocess with it set."""
    pytest.importorskip("numba", reason="the numba-cuda backend needs `pip install numba`")
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "NFLOW_TEST_BACKENDS": "numba-cuda"}
    select = f"({' or '.join(CUDASIM_CASES)}) and ({' or '.join(CUDASIM_PROPERTIES)})"
    tests = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__)), "-p", "no:cacheprovider", "-k", select],
        cwd=tests.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, f"the suite under the simulator failed:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
    expected = len(CUDASIM_CASES) * len(CUDASIM_PROPERTIES)
    assert f"{expected} passed" in run.stdout, run.stdout[-2000:]


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
    with pytest.raises(GradcheckError, match="log_scale"):
        check_flow_gradients(flow, rng.standard_normal((4, 3)), direction, rng)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_gradient_check_catches_a_small_input_gradient_error(direction: str) -> None:
    rng = np.random.default_rng(1)
    flow = randomise(_SlightlyWrongInputGradient(3), rng)
    with pytest.raises(GradcheckError, match="input"):
        check_flow_gradients(flow, rng.standard_normal((4, 3)), direction, rng)


def test_gradient_check_catches_an_error_inside_a_sequential() -> None:
    rng = np.random.default_rng(2)
    flow = randomise(Sequential([Rescale(3), _WrongRescale(3)]), rng)
    with pytest.raises(GradcheckError, match=r"1\.log_scale"):
        check_flow_gradients(flow, rng.standard_normal((4, 3)), "forward", rng)


def test_gradient_check_passes_the_correct_layer() -> None:
    rng = np.random.default_rng(0)
    check_flow_gradients(randomise(Rescale(3), rng), rng.standard_normal((4, 3)), "forward", rng)


def test_logdet_check_catches_a_wrong_logdet() -> None:
    rng = np.random.default_rng(0)
    flow = randomise(_WrongLogdet(3), rng)
    with pytest.raises(GradcheckError, match="logdet"):
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
