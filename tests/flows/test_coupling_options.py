"""Options of the coupling layers and their nets: ``init=`` choices and the log-scale bound ``a``.

The fixed bound is also a registry case (``affine_coupling_fixed_bound``), so the whole property
suite (gradients by central differences included) proves it; here: what each option means.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import check_flow_gradients, check_layer_gradients, randomise
from hypothesis import given, settings
from hypothesis import strategies as st

from nflow_np import AdditiveCoupling, AffineCoupling
from nflow_np.nn import ACTIVATIONS, MLP, Linear, bias_activation
from nflow_np.nn.layers import INITS

seeds = st.integers(0, 2**32 - 1)


# --- init choices -----------------------------------------------------------------------------


@pytest.mark.parametrize(("init", "variance"), [("glorot", 2 / (300 + 200)), ("he", 2 / 300)])
def test_random_inits_have_their_stated_variance(init: str, variance: float) -> None:
    layer = Linear(300, 200, np.random.default_rng(0), init=init)
    weight = layer.params["W"]
    assert weight.std() ** 2 == pytest.approx(variance, rel=0.02)
    bound = np.sqrt(6 / 500) if init == "glorot" else np.sqrt(6 / 300)
    assert np.abs(weight).max() <= bound and np.abs(weight).max() > 0.99 * bound
    np.testing.assert_array_equal(layer.params["b"], 0)


def test_glorot_is_the_default_and_draws_what_it_always_drew() -> None:
    """Models built before the option existed are rebuilt identically (same generator stream)."""
    rng = np.random.default_rng(5)
    bound = np.sqrt(6.0 / 7)
    expected = rng.uniform(-bound, bound, size=(3, 4))
    np.testing.assert_array_equal(Linear(3, 4, np.random.default_rng(5)).params["W"], expected)
    np.testing.assert_array_equal(Linear(3, 4, np.random.default_rng(5), init="glorot").params["W"], expected)
    assert not Linear(3, 4, np.random.default_rng(5), zero_init=True).params["W"].any()


def test_mlp_and_coupling_pass_the_inits_on() -> None:
    rng = np.random.default_rng(1)
    net = MLP([4, 50, 60, 3], rng, init="he", last_init="glorot")
    assert [layer.init for layer in net.layers] == ["he", "he", "glorot"]
    assert [layer.init for layer in MLP([4, 5, 3], rng).layers] == ["glorot", "zeros"]
    assert [layer.init for layer in MLP([4, 5, 3], rng, zero_last=False).layers] == ["glorot", "glorot"]
    coupling = AffineCoupling(4, hidden=(8,), rng=rng, init="he", last_init="glorot")
    assert [layer.init for layer in coupling.net.layers] == ["he", "glorot"]
    x = rng.standard_normal((3, 4))
    assert not np.allclose(coupling.forward(x)[0], x)  # a random last layer: not the identity
    identity = AffineCoupling(4, hidden=(8,), rng=rng, init="he")
    np.testing.assert_array_equal(identity.forward(x)[0], x)  # the default last layer: the identity


@settings(max_examples=10, deadline=None)
@given(seed=seeds, init=st.sampled_from(["glorot", "he"]))
def test_gradients_do_not_depend_on_the_init(seed: int, init: str) -> None:
    rng = np.random.default_rng(seed)
    check_layer_gradients(MLP([3, 5, 2], rng, init=init, last_init=init), rng.standard_normal((4, 3)), rng)


def test_init_errors() -> None:
    rng = np.random.default_rng(0)
    assert INITS == ("glorot", "he", "zeros")
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        Linear(2, 3, rng, init="xavier")
    with pytest.raises(ValueError, match="zero_init=True contradicts init='he'"):
        Linear(2, 3, rng, zero_init=True, init="he")
    with pytest.raises(ValueError, match="hidden layers need init 'glorot' or 'he'"):
        MLP([2, 3, 2], rng, init="zeros")
    with pytest.raises(ValueError, match="init and last_init apply to the default net"):
        AffineCoupling(4, net=MLP([2, 3, 4], rng), init="he")


def test_one_list_of_activations() -> None:
    assert tuple(ACTIVATIONS) == bias_activation.ACTIVATION_NAMES


# --- the log-scale bound ----------------------------------------------------------------------


def test_the_learned_bound_keeps_its_file_key_and_its_honest_name() -> None:
    flow = AffineCoupling(4, hidden=(5,), log_scale_bound=2.5)
    assert "scale" in flow.state_dict() and flow.log_scale_bound is flow.params["scale"]
    np.testing.assert_array_equal(flow.log_scale_bound, [2.5, 2.5])
    old = AffineCoupling(4, hidden=(5,)).state_dict()  # what a model file of today's format holds
    flow.load_state_dict(old)
    np.testing.assert_array_equal(flow.log_scale_bound, 1.0)
    assert AdditiveCoupling(4, hidden=(5,)).log_scale_bound is None


@settings(max_examples=8, deadline=None)
@given(seed=seeds, bound=st.floats(0.1, 3.0), n=st.integers(1, 5))
def test_a_fixed_bound_is_not_a_parameter_and_bounds_every_stretch(seed: int, bound: float, n: int) -> None:
    rng = np.random.default_rng(seed)
    flow = AffineCoupling(5, hidden=(6,), rng=rng, log_scale_bound=bound, learn_log_scale_bound=False)
    assert flow.log_scale_bound == bound and "scale" not in flow.params
    randomise(flow, rng, std=3.0)  # large net outputs: tanh saturates, |s_j| reaches the bound
    x = rng.standard_normal((n, 5))
    _, logdet = flow.forward(x)
    assert np.all(np.abs(logdet) <= flow.d2 * bound + 1e-12)
    check_flow_gradients(flow, x, "forward", rng)  # the law's d_scale is dropped, everything else exact
    check_flow_gradients(flow, x, "inverse", rng)


def test_bound_errors() -> None:
    with pytest.raises(ValueError, match="log_scale_bound must be a positive number, got 0"):
        AffineCoupling(4, log_scale_bound=0)
    with pytest.raises(ValueError, match="the additive law has no log-scale to bound"):
        AdditiveCoupling(4, learn_log_scale_bound=False)
