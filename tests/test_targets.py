"""The 2-D test energies U1–U4: values against the formulas, gradients by differences, log Z by quadrature."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import FD_FLOOR, GRAD_RTOL, numerical_gradient, relative_error
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nflow_np.targets import TARGETS, box_wall, get_target, in_box, log_partition, u1, u2, u3, u4

ENERGIES = {"u1": u1, "u2": u2, "u3": u3, "u4": u4}
energies = pytest.mark.parametrize("energy", list(ENERGIES.values()), ids=list(ENERGIES))
coordinates = st.floats(-6.0, 6.0)
# the wall's second derivative jumps at |z_i| = 4; differences straddling the kink are off by ~eps/0.01
off_the_kink = st.floats(-6.0, 6.0).filter(lambda v: abs(abs(v) - 4.0) > 1e-4)


def by_hand(z: np.ndarray) -> dict[str, np.ndarray]:
    """The paper's formulas, written out independently of the module (Rezende & Mohamed 2015, Table 1)."""
    z1, z2 = z[:, 0], z[:, 1]
    w1 = np.sin(2 * np.pi * z1 / 4)
    w2 = 3 * np.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
    w3 = 3 / (1 + np.exp(-(z1 - 1) / 0.3))
    norm = np.sqrt(z1**2 + z2**2)
    return {
        "u1": 0.5 * ((norm - 2) / 0.4) ** 2
        - np.log(np.exp(-0.5 * ((z1 - 2) / 0.6) ** 2) + np.exp(-0.5 * ((z1 + 2) / 0.6) ** 2)),
        "u2": 0.5 * ((z2 - w1) / 0.4) ** 2,
        "u3": -np.log(np.exp(-0.5 * ((z2 - w1) / 0.35) ** 2) + np.exp(-0.5 * ((z2 - w1 + w2) / 0.35) ** 2)),
        "u4": -np.log(np.exp(-0.5 * ((z2 - w1) / 0.4) ** 2) + np.exp(-0.5 * ((z2 - w1 + w3) / 0.35) ** 2)),
    }


def test_values_match_the_papers_formulas() -> None:
    z = np.random.default_rng(0).uniform(-4, 4, (200, 2))
    expected = by_hand(z)
    for name, energy in ENERGIES.items():
        np.testing.assert_allclose(energy(z)[0], expected[name], rtol=1e-12, atol=1e-12, err_msg=name)


def test_values_by_hand() -> None:
    # on the ring at z = (2, 0): U1 = −ln(1 + exp(−½(4/0.6)²))
    assert u1(np.array([[2.0, 0.0]]))[0][0] == pytest.approx(-np.log1p(np.exp(-0.5 * (4 / 0.6) ** 2)), abs=1e-15)
    # on the ridge z₂ = sin(π z₁/2): U2 = 0
    assert u2(np.array([[1.0, 1.0]]))[0][0] == pytest.approx(0.0, abs=1e-15)
    # far from z₁ = 1, w₂ ≈ 0 and the two bumps of U3 coincide: U3 ≈ −ln 2 on the ridge
    assert u3(np.array([[-3.0, 1.0]]))[0][0] == pytest.approx(-np.log(2), abs=1e-6)


@energies
@settings(max_examples=40, deadline=None)
@given(z1=coordinates, z2=coordinates)
def test_gradients_match_differences(energy: object, z1: float, z2: float) -> None:
    z = np.array([[z1, z2]])
    if np.hypot(z1, z2) < 1e-3:  # U1's ‖z‖ has a cone at the origin: no derivative there
        z += 0.01
    value, grad = energy(z)
    numeric = numerical_gradient(lambda: float(energy(z)[0].sum()), z)
    assert relative_error(grad, numeric, FD_FLOOR * (1 + abs(value[0]))) <= GRAD_RTOL, (grad, numeric)


@pytest.mark.parametrize("name", list(TARGETS))
@settings(max_examples=30, deadline=None)
@given(z1=off_the_kink, z2=off_the_kink)
def test_built_in_targets_gradients_include_the_wall(name: str, z1: float, z2: float) -> None:
    target = TARGETS[name]
    z = np.array([[z1, z2]]) + (0.01 if np.hypot(z1, z2) < 1e-3 else 0.0)
    value, grad = target(z)
    numeric = numerical_gradient(lambda: float(target(z)[0].sum()), z)
    assert relative_error(grad, numeric, FD_FLOOR * (1 + abs(value[0]))) <= GRAD_RTOL, (grad, numeric)


def test_wall_is_zero_inside_the_box_and_grows_outside() -> None:
    inside = np.array([[0.0, 0.0], [3.99, -3.99], [-4.0, 4.0]])
    value, grad = box_wall(inside)
    np.testing.assert_array_equal(value, 0)
    np.testing.assert_array_equal(grad, 0)
    value, grad = box_wall(np.array([[4.1, 0.0], [0.0, -4.2]]))
    np.testing.assert_allclose(value, [0.5, 2.0])
    np.testing.assert_allclose(grad, [[10.0, 0.0], [0.0, -20.0]])
    np.testing.assert_array_equal(TARGETS["U2"](inside)[0], u2(inside)[0])


def test_u1_is_symmetric() -> None:
    z = np.random.default_rng(1).normal(size=(50, 2)) * 2
    for flip in ([-1, 1], [1, -1], [-1, -1]):
        np.testing.assert_allclose(u1(z * flip)[0], u1(z)[0], rtol=1e-13)


def test_log_z_of_u1_is_the_papers() -> None:
    assert TARGETS["U1"].log_z() == pytest.approx(1.8775, abs=5e-5)
    # the grid covers ℝ² in effect: a wider box and a finer grid change nothing
    assert log_partition(u1, -8, 8, points=1400) == pytest.approx(TARGETS["U1"].log_z(), abs=1e-10)


def test_log_partition_of_a_gaussian_is_exact() -> None:
    """U = ½‖z − μ‖²/σ² has log Z = log(2πσ²)."""

    def gaussian(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        centred = (z - [0.3, -0.2]) / 0.7
        return 0.5 * np.sum(centred**2, axis=1), centred / 0.7

    assert log_partition(gaussian, -6, 6, points=300) == pytest.approx(np.log(2 * np.pi * 0.49), abs=1e-12)


@pytest.mark.parametrize("name", ["U2", "U3", "U4"])
def test_log_z_of_the_confined_targets(name: str) -> None:
    """Converged in the grid, and between the hard box [−4, 4]² and a box widened by the wall's reach."""
    target = TARGETS[name]
    log_z = target.log_z()
    assert target.log_z(points=1400) == pytest.approx(log_z, abs=1e-6)
    raw = {"U2": u2, "U3": u3, "U4": u4}[name]
    assert log_partition(raw, -4, 4) < log_z < log_partition(raw, -4.25, 4.25)


def test_float32_in_float32_out() -> None:
    z = np.random.default_rng(2).normal(size=(10, 2)).astype(np.float32)
    for name, target in TARGETS.items():
        value, grad = target(z)
        assert value.dtype == np.float32 and grad.dtype == np.float32, name
        np.testing.assert_allclose(value, target(z.astype(np.float64))[0], rtol=1e-4, atol=1e-4)


def test_errors() -> None:
    with pytest.raises(ValueError, match="z has 3 columns but this flow works in dimension 2"):
        u1(np.zeros((4, 3)))
    with pytest.raises(TypeError, match="z has dtype int64"):
        u2(np.zeros((4, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="z has a non-finite value nan"):
        u3(np.array([[np.nan, 0.0]]))
    with pytest.raises(ValueError, match="unknown target 'U5'; choose from U1, U2, U3, U4"):
        get_target("U5")
    with pytest.raises(ValueError, match="need low < high"):
        log_partition(u1, 1, -1)
    assert in_box(u4).__name__ == "u4_in_box"


@settings(max_examples=30, deadline=None)
@given(
    z1=st.floats(-9, 9),
    z2=st.floats(-9, 9),
    half_width=st.sampled_from([1.5, 4.0, 6.0]),
    width=st.sampled_from([0.05, 0.1, 0.5]),
)
def test_a_configured_box_wall_has_the_gradient_of_its_energy(z1: float, z2: float, half_width: float, width: float):
    """``∂wall/∂z_i = sign(z_i) max(|z_i| − b, 0)/w²`` by central differences (off the kinks |z_i| = b)."""
    z = np.array([[z1, z2]])
    assume(np.all(np.abs(np.abs(z) - half_width) > 1e-4))
    value, grad = box_wall(z, half_width, width)
    numeric = numerical_gradient(lambda: float(box_wall(z, half_width, width)[0].sum()), z)
    assert relative_error(grad, numeric, FD_FLOOR * (1 + abs(value[0]))) <= GRAD_RTOL, (grad, numeric)


def test_get_target_with_another_box() -> None:
    assert get_target("U3") is TARGETS["U3"]
    same = get_target("U3", box_half_width=4.0, wall_width=0.1)
    assert same.log_z() == pytest.approx(TARGETS["U3"].log_z(), abs=1e-9)
    wide = get_target("U2", box_half_width=6.0, wall_width=0.2)
    assert wide.plot_bounds == (-6.0, 6.0) and wide.quadrature_bounds == (-8.0, 8.0)
    inside = np.array([[5.5, -5.9]])
    np.testing.assert_array_equal(wide(inside)[0], u2(inside)[0])  # inside the wider box: no wall
    assert TARGETS["U2"](inside)[0] > u2(inside)[0]  # outside the paper's
    # a wider box holds more of the z₁-independent ridge: log Z grows by about log(12 / 8)
    assert wide.log_z(points=600) - TARGETS["U2"].log_z(points=600) == pytest.approx(np.log(12 / 8), abs=0.05)
    with pytest.raises(ValueError, match="U1 is normalisable on R² and takes no box"):
        get_target("U1", box_half_width=5.0)
    with pytest.raises(ValueError, match="box half-width must be a positive number, got -1.0"):
        get_target("U4", box_half_width=-1)
    with pytest.raises(ValueError, match="wall width must be a positive number, got 0.0"):
        get_target("U4", wall_width=0)
