"""Normalisation flows (nflow_np/flows/normalization.py): BatchNorm in both modes, ActNorm, training_mode.

Batch norm in training mode is checked through the batch statistics: the finite differences of
``check_flow_gradients`` perturb one entry and recompute the whole batch, so they see how every
output row and the log-det move with the batch mean and variance.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import check_flow_gradients, check_logdet, randomise
from hypothesis import given, settings
from hypothesis import strategies as st
from image_cases import eval_batch_norms

from nflow_np.flows import ActNorm, BatchNorm, Sequential, training_mode

FAST = settings(max_examples=15, deadline=None)
seeds = st.integers(0, 2**32 - 1)
dims = st.integers(1, 6)
directions = st.sampled_from(["forward", "inverse"])


def make_batch_norm(dim: int, rng: np.random.Generator, training: bool, per_channel: bool = False) -> BatchNorm:
    """Per coordinate, or per channel with a random divisor of ``dim`` as the number of channels."""
    channels = int(rng.choice([c for c in range(1, dim + 1) if dim % c == 0])) if per_channel else None
    # momentum 0 keeps the running averages still while finite differences call forward many times
    layer = BatchNorm(dim, momentum=0.0, channels=channels)
    layer = eval_batch_norms(randomise(layer, rng), rng)
    layer.training = training
    return layer


def batch(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Rows with per-coordinate offsets and scales, so the statistics are far from (0, 1)."""
    return rng.standard_normal((n, dim)) * rng.uniform(0.5, 3.0, dim) + rng.normal(0, 2, dim)


# --- batch norm ----------------------------------------------------------------------------------------


@FAST
@given(dim=dims, n=st.integers(2, 6), seed=seeds, per_channel=st.booleans())
def test_batch_norm_training_gradients_through_batch_statistics(dim: int, n: int, seed: int, per_channel: bool) -> None:
    rng = np.random.default_rng(seed)
    layer = make_batch_norm(dim, rng, training=True, per_channel=per_channel)
    check_flow_gradients(layer, batch(rng, n, dim), "forward", rng)


@FAST
@given(dim=dims, n=st.integers(1, 5), seed=seeds, direction=directions, per_channel=st.booleans())
def test_batch_norm_eval_gradients_and_logdet(dim: int, n: int, seed: int, direction: str, per_channel: bool) -> None:
    rng = np.random.default_rng(seed)
    layer = make_batch_norm(dim, rng, training=False, per_channel=per_channel)
    x = batch(rng, n, dim)
    check_flow_gradients(layer, x, direction, rng)
    check_logdet(layer, x, direction)


@FAST
@given(dim=dims, n=st.integers(2, 6), seed=seeds, per_channel=st.booleans())
def test_batch_norm_training_output_is_the_eval_map_at_the_batch_statistics(
    dim: int, n: int, seed: int, per_channel: bool
) -> None:
    """Training mode = the per-row affine map with μ, σ² frozen at the batch's: same z, same log-det (slogdet)."""
    rng = np.random.default_rng(seed)
    layer = make_batch_norm(dim, rng, training=True, per_channel=per_channel)
    x = batch(rng, n, dim)
    z, logdet = layer.forward(x)
    groups = x.reshape(n, layer.channels, layer.pixels)
    np.testing.assert_allclose(z.reshape(groups.shape).mean(axis=(0, 2)), layer.params["beta"], atol=1e-9)
    frozen = BatchNorm(dim, channels=layer.channels)
    statistics = {"running_mean": groups.mean(axis=(0, 2)), "running_var": groups.var(axis=(0, 2))}
    frozen.load_state_dict(layer.state_dict() | statistics)
    z_frozen, logdet_frozen = frozen.forward(x)
    np.testing.assert_allclose(z, z_frozen, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(logdet, logdet_frozen, rtol=1e-12)
    check_logdet(frozen, x, "forward")
    np.testing.assert_allclose(frozen.inverse(z)[0], x, rtol=1e-9, atol=1e-9)


def test_batch_norm_running_averages() -> None:
    rng = np.random.default_rng(0)
    layer = BatchNorm(3, momentum=0.25)
    x1, x2 = batch(rng, 50, 3), batch(rng, 40, 3)
    layer.forward(x1)  # evaluation mode: no update
    assert np.array_equal(layer.buffers["running_mean"], np.zeros(3))
    layer.training = True
    layer.forward(x1)
    layer.forward(x2)
    expected_mean = 0.25 * x2.mean(axis=0) + 0.75 * (0.25 * x1.mean(axis=0))
    expected_var = 0.25 * x2.var(axis=0) + 0.75 * (0.25 * x1.var(axis=0) + 0.75)
    np.testing.assert_allclose(layer.buffers["running_mean"], expected_mean)
    np.testing.assert_allclose(layer.buffers["running_var"], expected_var)
    layer.zero_grad()
    layer.forward(x1)
    layer.backward(rng.standard_normal((50, 3)), rng.standard_normal(50))
    assert set(layer.grads) == {"log_gamma", "beta"}  # the running averages are buffers: no gradient slot


def test_batch_norm_has_no_inverse_in_training_mode() -> None:
    layer = BatchNorm(2)
    layer.training = True
    with pytest.raises(RuntimeError, match="no inverse in training mode"):
        layer.inverse(np.zeros((3, 2)))


def test_training_mode_switches_every_batch_norm_and_restores() -> None:
    layers = [BatchNorm(2), BatchNorm(2), BatchNorm(2)]
    layers[2].training = True
    flow = Sequential(layers)
    with pytest.raises(KeyError), training_mode(flow):
        assert all(layer.training for layer in layers)
        raise KeyError("restored even after an exception")
    assert [layer.training for layer in layers] == [False, False, True]


@pytest.mark.parametrize(
    ("momentum", "eps", "channels"), [(-0.1, 1e-5, None), (1.5, 1e-5, None), (0.1, 0.0, None), (0.1, 1e-5, 2)]
)
def test_batch_norm_construction_errors(momentum: float, eps: float, channels: int | None) -> None:
    with pytest.raises(ValueError, match="momentum|eps|divisor"):
        BatchNorm(3, momentum=momentum, eps=eps, channels=channels)


def test_per_channel_statistics_pool_the_pixels_of_each_channel() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 2 * 3 * 2)) * np.repeat([1.0, 5.0], 6) + np.repeat([0.0, 7.0], 6)
    layer = BatchNorm(12, channels=2)
    layer.training = True
    z, logdet = layer.forward(x)
    images = z.reshape(10, 2, 6)
    np.testing.assert_allclose(images.mean(axis=(0, 2)), 0, atol=1e-12)
    np.testing.assert_allclose(images.var(axis=(0, 2)), 1, rtol=1e-4)
    variances = x.reshape(10, 2, 6).var(axis=(0, 2))
    np.testing.assert_allclose(logdet, -0.5 * 6 * np.log(variances + 1e-5).sum())


def test_batch_norm_float32() -> None:
    layer = BatchNorm(4, dtype=np.float32)
    layer.training = True
    z, logdet = layer.forward(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    assert z.dtype == logdet.dtype == np.float32
    assert layer.backward(np.ones((8, 4), np.float32), np.ones(8, np.float32)).dtype == np.float32


# --- actnorm -------------------------------------------------------------------------------------------


def make_actnorm(dim: int, rng: np.random.Generator) -> ActNorm:
    layer = ActNorm(dim)
    layer.forward(batch(rng, 4, dim))  # the data-dependent initialisation, then random parameters
    return randomise(layer, rng)


def test_actnorm_data_dependent_initialisation() -> None:
    rng = np.random.default_rng(0)
    layer = ActNorm(3)
    x = batch(rng, 200, 3)
    z, logdet = layer.forward(x)
    assert layer.initialized
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=0), 1, rtol=1e-5)
    np.testing.assert_allclose(logdet, -np.log(x.std(axis=0) + 1e-6).sum())
    before = layer.state_dict()
    layer.forward(batch(rng, 10, 3))  # no second initialisation
    assert all(np.array_equal(before[name], value) for name, value in layer.state_dict().items())


@FAST
@given(dim=dims, n=st.integers(1, 5), seed=seeds, direction=directions)
def test_actnorm_gradients_logdet_and_round_trip(dim: int, n: int, seed: int, direction: str) -> None:
    rng = np.random.default_rng(seed)
    layer = make_actnorm(dim, rng)
    x = batch(rng, n, dim)
    check_flow_gradients(layer, x, direction, rng)
    check_logdet(layer, x, direction)
    z, logdet = layer.forward(x)
    back, inverse_logdet = layer.inverse(z)
    np.testing.assert_allclose(back, x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(inverse_logdet, -logdet)
