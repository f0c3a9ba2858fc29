"""Base distributions of ``nflow_np.distributions`` against scipy.stats and closed forms.

log-densities (also far in the tails, |z| up to 1e4), their gradients against finite differences,
sample moments and a Kolmogorov–Smirnov test with fixed seeds, and dtypes.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import numerical_gradient, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from nflow_np import StandardLogistic, StandardNormal
from nflow_np.distributions import BASE_DISTRIBUTIONS

FAST = settings(max_examples=25, deadline=None)
BASES = pytest.mark.parametrize("base", [StandardNormal(), StandardLogistic()], ids=["normal", "logistic"])
SCIPY = {"normal": stats.norm, "logistic": stats.logistic}
VARIANCE = {"normal": 1.0, "logistic": np.pi**2 / 3}

rows = st.integers(1, 6)
widths = st.integers(1, 5)
seeds = st.integers(0, 2**32 - 1)


def test_registry() -> None:
    assert BASE_DISTRIBUTIONS == {"normal": StandardNormal, "logistic": StandardLogistic}
    assert StandardNormal.name == "normal" and StandardLogistic.name == "logistic"


@BASES
@FAST
@given(n=rows, d=widths, seed=seeds, spread=st.sampled_from([1.0, 5.0, 30.0]))
def test_log_prob_matches_scipy(base: object, n: int, d: int, seed: int, spread: float) -> None:
    z = spread * np.random.default_rng(seed).standard_normal((n, d))
    expected = SCIPY[base.name].logpdf(z).sum(axis=1)
    log_prob = base.log_prob(z)
    assert log_prob.shape == (n,)
    np.testing.assert_allclose(log_prob, expected, rtol=1e-13, atol=1e-12)


@BASES
@pytest.mark.parametrize("magnitude", [1e2, 1e3, 1e4])
def test_log_prob_exact_far_in_the_tails(base: object, magnitude: float) -> None:
    z = np.array([[magnitude, -magnitude], [-magnitude, 0.5], [magnitude, magnitude]])
    log_prob = base.log_prob(z)
    assert np.isfinite(log_prob).all()
    np.testing.assert_allclose(log_prob, SCIPY[base.name].logpdf(z).sum(axis=1), rtol=1e-14)
    if base.name == "logistic":
        # log p(z) = −|z| − 2 log1p(e^{−|z|}) ≈ −|z| once e^{−|z|} is below rounding
        np.testing.assert_allclose(base.log_prob(z[:1, :1]), [-magnitude], rtol=1e-15)
        np.testing.assert_allclose(base.log_prob(-z[:1, :1]), [-magnitude], rtol=1e-15)
    else:
        np.testing.assert_allclose(
            base.log_prob(z[:1, :1]), [-0.5 * magnitude**2 - 0.5 * np.log(2 * np.pi)], rtol=1e-15
        )
    gradient = base.grad_log_prob(z)
    assert np.isfinite(gradient).all()


def test_logistic_closed_form() -> None:
    """p(z) = σ(z)(1 − σ(z)) at a few points, and the density is symmetric."""
    z = np.array([[-3.0, -0.7, 0.0, 0.2, 4.0]])
    sigmoid = 1 / (1 + np.exp(-z))
    logistic, normal = StandardLogistic(), StandardNormal()
    np.testing.assert_allclose(logistic.log_prob(z), np.log(sigmoid * (1 - sigmoid)).sum(axis=1), rtol=1e-14)
    np.testing.assert_allclose(logistic.log_prob(z), logistic.log_prob(-z), rtol=1e-15)
    np.testing.assert_allclose(logistic.log_prob(np.zeros((1, 3))), [3 * np.log(0.25)], rtol=1e-15)
    np.testing.assert_allclose(normal.log_prob(np.zeros((1, 3))), [-1.5 * np.log(2 * np.pi)], rtol=1e-15)


@BASES
@FAST
@given(n=rows, d=widths, seed=seeds, spread=st.sampled_from([1.0, 8.0]))
def test_grad_log_prob_matches_finite_differences(base: object, n: int, d: int, seed: int, spread: float) -> None:
    rng = np.random.default_rng(seed)
    z = spread * rng.standard_normal((n, d))
    weight = rng.standard_normal(n)  # a different weight per row also checks that rows are independent
    numeric = numerical_gradient(lambda: float(np.sum(weight * base.log_prob(z))), z)
    analytic = weight[:, None] * base.grad_log_prob(z)
    assert relative_error(analytic, numeric, floor=1e-3 * (1 + spread**2) * d) <= 1e-6


@BASES
def test_grad_log_prob_closed_form(base: object) -> None:
    z = np.array([[-1e4, -2.0, 0.0, 0.3, 1e4]])
    expected = -z if base.name == "normal" else -np.tanh(z / 2)
    np.testing.assert_allclose(base.grad_log_prob(z), expected, rtol=1e-15)
    if base.name == "logistic":
        np.testing.assert_array_equal(base.grad_log_prob(z)[0, [0, 4]], [1.0, -1.0])


@BASES
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_moments(base: object, seed: int) -> None:
    samples = base.sample(100_000, 4, np.random.default_rng(seed))
    assert samples.shape == (100_000, 4) and samples.dtype == np.float64
    assert np.isfinite(samples).all()
    variance = VARIANCE[base.name]
    # standard errors: mean √(var/n) ≈ 0.006, variance ≈ 0.013 (logistic); bounds are > 5 standard errors
    np.testing.assert_allclose(samples.mean(axis=0), 0.0, atol=0.03)
    np.testing.assert_allclose(samples.var(axis=0), variance, rtol=0.03)
    np.testing.assert_allclose(np.median(samples, axis=0), 0.0, atol=0.05)
    # the columns are independent
    correlation = np.corrcoef(samples.T)
    np.testing.assert_allclose(correlation, np.eye(4), atol=0.02)


@BASES
def test_sample_follows_the_law(base: object) -> None:
    samples = base.sample(20_000, 1, np.random.default_rng(123))[:, 0]
    assert stats.kstest(samples, SCIPY[base.name].cdf).pvalue > 1e-3
    other = StandardLogistic() if base.name == "normal" else StandardNormal()
    assert stats.kstest(samples, SCIPY[other.name].cdf).pvalue < 1e-3  # the test can tell the two apart


@BASES
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtypes(base: object, dtype: object) -> None:
    samples = base.sample(50, 3, np.random.default_rng(0), dtype=dtype)
    assert samples.dtype == dtype and samples.shape == (50, 3)
    log_prob = base.log_prob(samples)
    assert log_prob.dtype == dtype and log_prob.shape == (50,)
    assert base.grad_log_prob(samples).dtype == dtype
    np.testing.assert_allclose(log_prob, base.log_prob(samples.astype(np.float64)), rtol=1e-5)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        base.sample(5, 2, np.random.default_rng(0), dtype=np.int64)


@BASES
def test_sampling_is_reproducible(base: object) -> None:
    first = base.sample(10, 2, np.random.default_rng(5))
    np.testing.assert_array_equal(first, base.sample(10, 2, np.random.default_rng(5)))
    assert not np.array_equal(first, base.sample(10, 2, np.random.default_rng(6)))


class _ZerosFirst:
    """A stand-in generator whose first draw contains exact zeros (probability 2⁻⁵³ each in reality)."""

    def __init__(self) -> None:
        self.calls = 0

    def random(self, size: object) -> np.ndarray:
        self.calls += 1
        if self.calls == 1:
            return np.array([[0.0, 0.25], [0.5, 0.0]])
        return np.full(size, 0.75)


def test_logistic_sampler_redraws_exact_zeros() -> None:
    samples = StandardLogistic().sample(2, 2, _ZerosFirst())
    assert np.isfinite(samples).all()
    expected = np.log(np.array([[0.75, 0.25], [0.5, 0.75]]) / (1 - np.array([[0.75, 0.25], [0.5, 0.75]])))
    np.testing.assert_allclose(samples, expected, rtol=1e-15)


# --- a diagonal Gaussian (a VI base other than N(0, I)) ------------------------------------------


@FAST
@given(n=rows, d=widths, seed=seeds)
def test_diagonal_normal_against_scipy_and_its_gradient(n: int, d: int, seed: int) -> None:
    from nflow_np.distributions import DiagonalNormal

    rng = np.random.default_rng(seed)
    mean, std = rng.normal(size=d), rng.uniform(0.2, 3.0, size=d)
    base = DiagonalNormal(mean, std)
    z = rng.normal(size=(n, d)) * 3
    expected = stats.norm.logpdf(z, loc=mean, scale=std).sum(axis=1)
    np.testing.assert_allclose(base.log_prob(z), expected, rtol=1e-12, atol=1e-12)
    numeric = numerical_gradient(lambda: float(base.log_prob(z).sum()), z)
    assert relative_error(base.grad_log_prob(z), numeric, 1e-6) <= 1e-6
    assert base.log_prob(z.astype(np.float32)).dtype == np.float32
    scalar = DiagonalNormal(0.5, 2.0)  # a scalar broadcasts over every coordinate
    np.testing.assert_allclose(scalar.log_prob(z), stats.norm.logpdf(z, 0.5, 2.0).sum(axis=1), rtol=1e-12)


def test_diagonal_normal_samples_and_errors() -> None:
    from nflow_np.distributions import DiagonalNormal

    base = DiagonalNormal([1.0, -2.0], [0.5, 3.0])
    draws = base.sample(200_000, 2, np.random.default_rng(0), np.float32)
    assert draws.dtype == np.float32 and draws.shape == (200_000, 2)
    np.testing.assert_allclose(draws.mean(axis=0), [1.0, -2.0], atol=0.02)
    np.testing.assert_allclose(draws.std(axis=0), [0.5, 3.0], rtol=0.01)
    with pytest.raises(ValueError, match="std finite and positive"):
        DiagonalNormal(0.0, [1.0, 0.0])
    with pytest.raises(ValueError, match="this base has dimension 2; z has 3 columns"):
        base.log_prob(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="this base has dimension 2, asked for 3"):
        base.sample(4, 3, np.random.default_rng(0))
