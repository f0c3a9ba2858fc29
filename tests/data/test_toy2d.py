"""Tests for ``nflow_np.data.toy2d``: each density's construction, determinism, and the splits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nflow_np.data import TOY_DATASETS, Splits, load_toy
from nflow_np.data.toy2d import (
    make_checkerboard,
    make_circles,
    make_eight_gaussians,
    make_pinwheel,
    make_two_moons,
    make_two_spirals,
)

NAMES = ["two_moons", "circles", "eight_gaussians", "checkerboard", "pinwheel", "two_spirals"]
# Samplers whose `noise` is additive isotropic jitter (pinwheel's is the arm width instead).
JITTERED = [name for name in NAMES if name != "pinwheel"]
FAST = settings(max_examples=20, deadline=None)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_registry_names() -> None:
    assert list(TOY_DATASETS) == NAMES


# --- every sampler: shape, dtype, determinism ------------------------------------------------


@FAST
@given(name=st.sampled_from(NAMES), n=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_shape_dtype_finite(name: str, n: int, seed: int) -> None:
    x = TOY_DATASETS[name](n, rng(seed))
    assert x.shape == (n, 2)
    assert x.dtype == np.float64
    assert np.isfinite(x).all()


@FAST
@given(name=st.sampled_from(NAMES), n=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_same_seed_is_bit_identical(name: str, n: int, seed: int) -> None:
    a = TOY_DATASETS[name](n, rng(seed))
    b = TOY_DATASETS[name](n, rng(seed))
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("name", NAMES)
def test_different_seeds_differ(name: str) -> None:
    assert not np.array_equal(TOY_DATASETS[name](100, rng(0)), TOY_DATASETS[name](100, rng(1)))


@pytest.mark.parametrize("name", JITTERED)
def test_noise_is_only_an_additive_jitter(name: str) -> None:
    # Same stream, different noise: the difference is the jitter itself, N(0, s² I) per row.
    s = 0.3
    noisy = TOY_DATASETS[name](20000, rng(5), noise=s)
    clean = TOY_DATASETS[name](20000, rng(5), noise=0.0)
    difference = noisy - clean
    np.testing.assert_allclose(difference.mean(axis=0), 0.0, atol=0.01)
    np.testing.assert_allclose(difference.std(axis=0), s, rtol=0.02)
    np.testing.assert_allclose(np.corrcoef(difference.T)[0, 1], 0.0, atol=0.03)


@pytest.mark.parametrize("name", NAMES)
def test_rows_are_shuffled(name: str) -> None:
    # Without shuffling the first half would be one moon / circle / arm; any half must look alike.
    x = TOY_DATASETS[name](4000, rng(3))
    np.testing.assert_allclose(x[:2000].mean(axis=0), x[2000:].mean(axis=0), atol=0.15)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("n", "noise", "message"), [(-1, 0.1, "n must"), (10, -0.1, "noise"), (10, np.nan, "noise")]
)
def test_sampler_rejects_bad_arguments(name: str, n: int, noise: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TOY_DATASETS[name](n, rng(0), noise=noise)


def test_sampler_rejects_float_n() -> None:
    with pytest.raises(TypeError):
        make_two_moons(10.0, rng(0))  # type: ignore[arg-type]


# --- the construction of each density (noise = 0 exposes it exactly) -------------------------


@FAST
@given(n=st.integers(0, 400), seed=st.integers(0, 2**32 - 1))
def test_two_moons_definition(n: int, seed: int) -> None:
    x = make_two_moons(n, rng(seed), noise=0.0)
    on_upper = np.isclose(np.hypot(x[:, 0], x[:, 1]), 1.0, atol=1e-12) & (x[:, 1] >= 0)
    upper, lower = x[on_upper], x[~on_upper]
    assert len(upper) == n // 2
    assert len(lower) == n - n // 2
    np.testing.assert_allclose(np.hypot(lower[:, 0] - 1.0, lower[:, 1] - 0.5), 1.0, atol=1e-12)
    assert (lower[:, 1] <= 0.5).all()


def test_two_moons_angle_is_uniform_and_noise_default() -> None:
    x = make_two_moons(20000, rng(0), noise=0.0)
    upper = x[x[:, 1] > 0.5]  # the lower moon never goes above 0.5
    t = np.arctan2(upper[:, 1], upper[:, 0])
    # U[0, π] restricted to sin t > 0.5, i.e. U[π/6, 5π/6]: mean π/2, std (2π/3)/√12.
    np.testing.assert_allclose(t.mean(), np.pi / 2, atol=0.02)
    np.testing.assert_allclose(t.std(), (2 * np.pi / 3) / np.sqrt(12), rtol=0.02)
    difference = make_two_moons(20000, rng(0)) - x
    np.testing.assert_allclose(difference.std(axis=0), 0.05, rtol=0.02)


def test_two_moons_is_raw_coordinates() -> None:
    x = make_two_moons(5000, rng(0), noise=0.0)
    np.testing.assert_allclose(x.min(axis=0), [-1.0, -0.5], atol=0.01)
    np.testing.assert_allclose(x.max(axis=0), [2.0, 1.0], atol=0.01)


def test_circles_definition() -> None:
    n = 1001
    radius = np.hypot(*make_circles(n, rng(0), noise=0.0).T)
    assert np.isclose(radius, 1.0).sum() == n // 2
    assert np.isclose(radius, 0.5).sum() == n - n // 2


def test_eight_gaussians_definition() -> None:
    x = make_eight_gaussians(8000, rng(0), noise=0.0)
    angle = 2 * np.pi * np.arange(8) / 8
    centres = 2 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    distance = np.linalg.norm(x[:, None, :] - centres[None, :, :], axis=2)
    assert (distance.min(axis=1) < 1e-12).all()
    counts = np.bincount(distance.argmin(axis=1), minlength=8)
    np.testing.assert_allclose(counts / 8000, 1 / 8, atol=0.02)
    np.testing.assert_allclose((make_eight_gaussians(8000, rng(0)) - x).std(axis=0), 0.2, rtol=0.03)


def test_checkerboard_definition() -> None:
    x = make_checkerboard(16000, rng(0))
    assert (x >= -4).all() and (x < 4).all()
    square = np.floor(x / 2).astype(int)
    assert ((square[:, 0] + square[:, 1]) % 2 == 0).all()
    counts = np.unique(square, axis=0, return_counts=True)[1]
    assert len(counts) == 8
    np.testing.assert_allclose(counts / 16000, 1 / 8, atol=0.01)


def test_pinwheel_definition() -> None:
    # With no tangential noise each point is 2 r (cos a, −sin a), a = 2πk/5 + 0.25 exp(r), so from
    # the point's polar angle θ and radius ρ = 2|r|: −θ − 0.25 exp(ρ/2) ≡ 0 mod 2π/5 when r > 0
    # (r < 0 happens for z₁ < −3.3, flipping the point through the origin).
    x = make_pinwheel(5000, rng(0), noise=0.0)
    theta, rho = np.arctan2(x[:, 1], x[:, 0]), np.hypot(x[:, 0], x[:, 1])

    def off_arm(phase: np.ndarray) -> np.ndarray:
        return np.abs(np.angle(np.exp(5j * phase)))  # distance of 5·phase from a multiple of 2π

    r_positive = off_arm(-theta - 0.25 * np.exp(rho / 2))
    r_negative = off_arm(np.pi - theta - 0.25 * np.exp(-rho / 2))
    assert (np.minimum(r_positive, r_negative) < 1e-9).all()
    np.testing.assert_allclose(np.median(rho), 2.0, atol=0.05)


def test_pinwheel_arms_are_balanced() -> None:
    x = make_pinwheel(5000, rng(1), noise=0.0)
    theta, rho = np.arctan2(x[:, 1], x[:, 0]), np.hypot(x[:, 0], x[:, 1])
    arm = np.round((-theta - 0.25 * np.exp(rho / 2)) / (2 * np.pi / 5)).astype(int) % 5
    counts = np.bincount(arm, minlength=5)
    assert np.abs(counts - 1000).max() <= 5  # arm k is i mod 5; only r < 0 points may miscount


def test_two_spirals_definition() -> None:
    n = 2001
    x = make_two_spirals(n, rng(0), noise=0.0)
    rho = np.hypot(x[:, 0], x[:, 1])  # = t / 3
    t = 3 * rho
    arm = np.stack([-rho * np.cos(t), rho * np.sin(t)], axis=1)
    on_first = np.isclose(x, arm, atol=1e-12).all(axis=1)
    on_second = np.isclose(x, -arm, atol=1e-12).all(axis=1)
    assert (on_first | on_second).all()
    assert on_first.sum() == n // 2  # no point sits at the origin, where the arms meet
    assert rho.max() <= np.pi


# --- load_toy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_load_toy_shapes_and_default_dtype(name: str) -> None:
    splits = load_toy(name, n_train=300, n_val=200, n_test=100)
    assert isinstance(splits, Splits)
    assert splits.train.shape == (300, 2)
    assert splits.val.shape == (200, 2)
    assert splits.test.shape == (100, 2)
    assert splits.train.dtype == splits.val.dtype == splits.test.dtype == np.float64


def test_load_toy_default_sizes() -> None:
    splits = load_toy("two_moons")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15000, 5000, 5000)


@pytest.mark.parametrize("dtype", [np.float32, "float32", np.dtype(np.float32)])
def test_load_toy_float32_is_a_cast_of_float64(dtype: object) -> None:
    single = load_toy("pinwheel", n_train=50, n_val=50, n_test=50, dtype=dtype)
    double = load_toy("pinwheel", n_train=50, n_val=50, n_test=50)
    for part in ("train", "val", "test"):
        assert getattr(single, part).dtype == np.float32
        np.testing.assert_array_equal(
            getattr(single, part), getattr(double, part).astype(np.float32)
        )


@FAST
@given(name=st.sampled_from(NAMES), seed=st.integers(0, 2**32 - 1), n_train=st.integers(1, 200))
def test_load_toy_is_deterministic_and_splits_are_independent(
    name: str, seed: int, n_train: int
) -> None:
    reference = load_toy(name, n_train=100, n_val=30, n_test=40, seed=seed)
    again = load_toy(name, n_train=100, n_val=30, n_test=40, seed=seed)
    resized = load_toy(name, n_train=n_train, n_val=30, n_test=40, seed=seed)
    for part in ("train", "val", "test"):
        assert getattr(reference, part).tobytes() == getattr(again, part).tobytes()
    assert resized.val.tobytes() == reference.val.tobytes()
    assert resized.test.tobytes() == reference.test.tobytes()
    # Each split is the sampler run on its own stream [seed, k].
    np.testing.assert_array_equal(
        reference.test, TOY_DATASETS[name](40, np.random.default_rng([seed, 2]))
    )


@pytest.mark.parametrize("name", NAMES)
def test_load_toy_seeds_and_splits_differ(name: str) -> None:
    a = load_toy(name, n_train=100, n_val=100, n_test=100, seed=0)
    b = load_toy(name, n_train=100, n_val=100, n_test=100, seed=1)
    assert not np.array_equal(a.test, b.test)
    assert not np.array_equal(a.train, a.val)
    assert not np.array_equal(a.val, a.test)


def test_splits_is_frozen() -> None:
    splits = load_toy("circles", n_train=10, n_val=10, n_test=10)
    with pytest.raises(AttributeError):
        splits.train = splits.test  # type: ignore[misc]


def test_load_toy_unknown_name_lists_known_names() -> None:
    with pytest.raises(
        ValueError, match="'moons'.*two_moons, circles, eight_gaussians, checkerboard"
    ):
        load_toy("moons")


@pytest.mark.parametrize("argument", ["n_train", "n_val", "n_test"])
@pytest.mark.parametrize("size", [0, -5])
def test_load_toy_rejects_non_positive_sizes(argument: str, size: int) -> None:
    with pytest.raises(ValueError, match=f"{argument} must be a positive integer, got {size}"):
        load_toy("two_moons", **{argument: size})


def test_load_toy_rejects_negative_seed() -> None:
    with pytest.raises(ValueError, match="seed"):
        load_toy("two_moons", seed=-1)


@pytest.mark.parametrize(
    ("dtype", "name"), [(np.int32, "int32"), (np.float16, "float16"), ("complex128", "complex128")]
)
def test_load_toy_rejects_other_dtypes(dtype: object, name: str) -> None:
    with pytest.raises(TypeError, match=f"float32 or float64, got {name}"):
        load_toy("two_moons", n_train=10, n_val=10, n_test=10, dtype=dtype)
