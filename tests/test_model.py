"""``nflow_np.model.FlowModel``: the change-of-variables density, its gradient, encode/decode, sampling.

The NLL gradient of every parameter against finite differences of ``nll`` (float64), the density
against a closed form and against normalisation (it integrates to 1 on a grid), round trips,
sampling shape/dtype/temperature, and the errors.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import FD_FLOOR, FLOW_CASES, assert_gradients_match, numerical_gradient, randomise
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from nflow_np import (
    AdditiveCoupling,
    AffineCoupling,
    FlowModel,
    Permutation,
    Rescale,
    Reverse,
    Sequential,
    StandardLogistic,
    StandardNormal,
)

FAST = settings(max_examples=25, deadline=None)
FEW = settings(max_examples=10, deadline=None)
BASES = pytest.mark.parametrize("base", [StandardNormal(), StandardLogistic()], ids=["normal", "logistic"])
CASES = dict(FLOW_CASES)

dims = st.integers(2, 5)
batches = st.integers(1, 5)
seeds = st.integers(0, 2**32 - 1)


def make_model(dim: int, seed: int, base: object = None, dtype: object = np.float64) -> FlowModel:
    """A model on a mixed stack (every kind of layer) with all parameters randomised."""
    return FlowModel(CASES["sequential"](dim, np.random.default_rng(seed), dtype), base)


# --- the loss and its gradient ----------------------------------------------------------------


@BASES
@FAST
@given(dim=dims, n=batches, seed=seeds)
def test_nll_and_backward_matches_finite_differences(base: object, dim: int, n: int, seed: int) -> None:
    model = make_model(dim, seed, base)
    x = np.random.default_rng(seed + 1).standard_normal((n, dim))
    model.zero_grad()
    loss = model.nll_and_backward(x)
    assert isinstance(loss, float)
    assert loss == pytest.approx(model.nll(x), rel=1e-14, abs=1e-14)
    analytic, numeric = {}, {}
    for name, param, grad in model.named_parameters():
        analytic[name] = grad.copy()
        numeric[name] = numerical_gradient(lambda: model.nll(x), param)
    assert analytic, "the model has parameters"
    assert all(name.startswith("flow.") for name in analytic)
    size = 1.0 + float(np.abs(model.base.log_prob(model.encode(x))).mean() + np.abs(model.log_prob(x)).mean())
    assert_gradients_match(analytic, numeric, FD_FLOOR * size, "FlowModel.nll_and_backward")


def test_nll_and_backward_accumulates() -> None:
    model = make_model(3, 0)
    x = np.random.default_rng(1).standard_normal((4, 3))
    model.zero_grad()
    model.nll_and_backward(x)
    once = {name: grad.copy() for name, _, grad in model.named_parameters()}
    model.nll_and_backward(x)
    for name, _, grad in model.named_parameters():
        np.testing.assert_allclose(grad, 2 * once[name], rtol=1e-14, atol=1e-15, err_msg=name)


@pytest.mark.parametrize("seed", [0, 1])
def test_nll_is_mean_over_rows(seed: int) -> None:
    model = make_model(3, seed)
    x = np.random.default_rng(seed).standard_normal((6, 3))
    per_row = [model.log_prob(x[i : i + 1])[0] for i in range(6)]
    assert model.nll(x) == pytest.approx(-np.mean(per_row), rel=1e-13)


# --- the density ------------------------------------------------------------------------------


@BASES
def test_log_prob_is_change_of_variables(base: object) -> None:
    model = make_model(4, 3, base)
    x = np.random.default_rng(0).standard_normal((5, 4))
    z, logdet = model.flow.forward(x)
    np.testing.assert_allclose(model.log_prob(x), base.log_prob(z) + logdet, rtol=1e-14)


def test_log_prob_of_a_rescale_is_a_gaussian() -> None:
    """z = x ⊙ e^σ with a normal base is x ~ N(0, diag(e^{−2σ})): an independent closed form."""
    rng = np.random.default_rng(4)
    flow = randomise(Rescale(3), rng, std=0.8)
    model = FlowModel(flow, StandardNormal())
    x = rng.standard_normal((10, 3)) * 2
    std = np.exp(-flow.params["log_scale"])
    expected = stats.multivariate_normal(mean=np.zeros(3), cov=np.diag(std**2)).logpdf(x)
    np.testing.assert_allclose(model.log_prob(x), expected, rtol=1e-13)


@BASES
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_density_integrates_to_one(base: object, seed: int) -> None:
    """∫ exp(log p(x)) dx ≈ 1 on a grid over a 2-D model with randomised parameters.

    The grid covers the samples' range plus that range again on each side (the tails beyond hold
    < 1e-4 of the mass), with a 500 × 500 midpoint rule.
    """
    rng = np.random.default_rng(seed)
    flow = Sequential(
        [
            AffineCoupling(2, parity=0, hidden=(8,), rng=rng, activation="tanh"),
            AffineCoupling(2, parity=1, hidden=(8,), rng=rng),
            Rescale(2),
            AdditiveCoupling(2, parity=0, hidden=(8,), rng=rng, activation="tanh"),
            Reverse(2),
        ]
    )
    model = FlowModel(randomise(flow, rng), base)
    samples = model.sample(20_000, np.random.default_rng(seed + 100))
    low, high = samples.min(axis=0), samples.max(axis=0)
    low, high = low - (high - low), high + (high - low)
    cells = 500
    axes = [np.linspace(low[i], high[i], cells + 1) for i in range(2)]
    centres = [(a[1:] + a[:-1]) / 2 for a in axes]
    grid = np.stack(np.meshgrid(*centres, indexing="ij"), axis=-1).reshape(-1, 2)
    cell_area = np.prod([(high[i] - low[i]) / cells for i in range(2)])
    mass = np.exp(model.log_prob(grid)).sum() * cell_area
    assert mass == pytest.approx(1.0, abs=1e-2)


# --- encode, decode, sample -------------------------------------------------------------------


@FAST
@given(dim=dims, n=batches, seed=seeds)
def test_encode_decode_round_trip(dim: int, n: int, seed: int) -> None:
    model = make_model(dim, seed)
    x = np.random.default_rng(seed).standard_normal((n, dim)) * 3
    z = model.encode(x)
    np.testing.assert_array_equal(z, model.flow.forward(x)[0])
    scale = max(1.0, float(np.abs(z).max()))
    np.testing.assert_allclose(model.decode(z), x, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(model.encode(model.decode(x)), x, rtol=0, atol=1e-10 * scale)


@BASES
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sample_shape_and_dtype(base: object, dtype: object) -> None:
    model = make_model(3, 0, base, dtype)
    samples = model.sample(7, np.random.default_rng(0))
    assert samples.shape == (7, 3) and samples.dtype == dtype
    assert np.isfinite(samples).all()
    assert model.sample(1, np.random.default_rng(0), temperature=0.5).dtype == dtype
    assert model.log_prob(samples).dtype == dtype
    assert model.sample(2).shape == (2, 3)  # default generator


@BASES
def test_sample_is_decode_of_base_draws(base: object) -> None:
    model = make_model(3, 5, base)
    samples = model.sample(6, np.random.default_rng(9), temperature=0.7)
    z = 0.7 * base.sample(6, 3, np.random.default_rng(9))
    np.testing.assert_allclose(samples, model.decode(z), rtol=1e-14, atol=1e-14)


@BASES
def test_sample_temperature(base: object) -> None:
    model = make_model(3, 1, base)
    centre = model.decode(np.zeros((1, 3)))
    cold = model.sample(50, np.random.default_rng(0), temperature=1e-8)
    np.testing.assert_allclose(cold, np.repeat(centre, 50, axis=0), atol=1e-6)
    spread = [model.sample(4000, np.random.default_rng(1), temperature=t).std() for t in (0.3, 1.0)]
    assert spread[0] < spread[1]


def test_sample_of_a_parameter_free_model() -> None:
    model = FlowModel(Permutation(np.array([2, 0, 1])))
    assert model.dtype is None
    samples = model.sample(3, np.random.default_rng(0))
    assert samples.shape == (3, 3) and samples.dtype == np.float64


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -3])
def test_sample_rejects_bad_n(n: int) -> None:
    with pytest.raises(ValueError, match=f"n must be a positive number of samples, got {n}"):
        make_model(2, 0).sample(n, np.random.default_rng(0))


def test_sample_rejects_a_non_integer_n() -> None:
    """Asked for 2.5 samples, the model must say so rather than silently return 2 (``int(2.5)``)."""
    with pytest.raises((TypeError, ValueError), match="n"):
        make_model(2, 0).sample(2.5, np.random.default_rng(0))


@pytest.mark.parametrize("temperature", [0.0, -1.0, np.nan, np.inf])
def test_sample_rejects_bad_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        make_model(2, 0).sample(3, np.random.default_rng(0), temperature=temperature)


def test_input_errors() -> None:
    model = make_model(3, 0)
    x = np.zeros((2, 3))
    for method in (model.log_prob, model.nll, model.nll_and_backward, model.encode):
        with pytest.raises(ValueError, match="x has 2 columns but this flow works in dimension 3"):
            method(x[:, :2])
        with pytest.raises(TypeError, match="x has dtype float32 but the parameters are float64"):
            method(x.astype(np.float32))
        bad = x.copy()
        bad[1, 2] = np.nan
        with pytest.raises(ValueError, match=r"x has a non-finite value nan at index \(1, 2\)"):
            method(bad)
    with pytest.raises(ValueError, match="z must be 2-D"):
        model.decode(np.zeros(3))
    with pytest.raises(TypeError, match="z has dtype int64"):
        model.decode(np.zeros((2, 3), dtype=np.int64))
