"""Optimizers against hand-computed updates; clipping; state save/restore."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nflow_np.module import Module
from nflow_np.optim import SGD, Adam, clip_grad_norm, global_grad_norm


def quadratic(values: np.ndarray) -> Module:
    """A module with one parameter ``θ`` for the loss ``½‖θ‖²`` (gradient ``θ``)."""
    module = Module()
    module.add_param("theta", values.copy())
    return module


def set_quadratic_grad(module: Module) -> None:
    module.grads["theta"][...] = module.params["theta"]


@given(st.lists(st.floats(-5, 5), min_size=1, max_size=6), st.floats(1e-4, 0.5), st.floats(0, 0.1))
@settings(max_examples=30, deadline=None)
def test_adam_matches_the_formula(values, lr, weight_decay):
    theta = np.array(values)
    module = quadratic(theta)
    adam = Adam(module, lr=lr, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for t in range(1, 4):
        set_quadratic_grad(module)
        g = theta.copy()
        adam.step()
        m = 0.8 * m + 0.2 * g
        v = 0.95 * v + 0.05 * g * g
        theta = theta * (1 - lr * weight_decay) - lr * (m / (1 - 0.8**t)) / (np.sqrt(v / (1 - 0.95**t)) + 1e-6)
        np.testing.assert_allclose(module.params["theta"], theta, rtol=1e-12, atol=1e-14)


@given(st.lists(st.floats(-5, 5), min_size=1, max_size=6), st.floats(1e-4, 0.5), st.floats(0, 0.95))
@settings(max_examples=30, deadline=None)
def test_sgd_momentum_matches_the_formula(values, lr, momentum):
    theta = np.array(values)
    module = quadratic(theta)
    sgd = SGD(module, lr=lr, momentum=momentum, weight_decay=0.01)
    velocity = np.zeros_like(theta)
    for _ in range(3):
        set_quadratic_grad(module)
        g = theta + 0.01 * theta
        sgd.step()
        velocity = momentum * velocity + g
        theta = theta - lr * velocity
        np.testing.assert_allclose(module.params["theta"], theta, rtol=1e-12, atol=1e-14)


def test_adam_minimises_a_quadratic():
    module = quadratic(np.array([3.0, -2.0, 1.0]))
    adam = Adam(module, lr=0.1)
    for _ in range(500):
        set_quadratic_grad(module)
        adam.step()
    assert np.abs(module.params["theta"]).max() < 1e-2


def test_clip_grad_norm_rescales_to_the_bound_and_keeps_direction():
    module = quadratic(np.array([3.0, 4.0]))
    set_quadratic_grad(module)
    assert clip_grad_norm(module, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(module.grads["theta"], [0.6, 0.8])
    assert global_grad_norm(module) == pytest.approx(1.0)
    # below the bound: untouched
    assert clip_grad_norm(module, 10.0) == pytest.approx(1.0)
    np.testing.assert_allclose(module.grads["theta"], [0.6, 0.8])


@pytest.mark.parametrize("make", [lambda m: Adam(m, lr=0.05), lambda m: SGD(m, lr=0.05, momentum=0.9)])
def test_restored_state_continues_identically(make):
    reference = quadratic(np.array([1.0, -2.0, 0.5]))
    optimizer = make(reference)
    for _ in range(3):
        set_quadratic_grad(reference)
        optimizer.step()
    saved_params, saved_state = reference.state_dict(), optimizer.state_dict()

    restored = quadratic(np.zeros(3))
    restored.load_state_dict(saved_params)
    restored_optimizer = make(restored)
    restored_optimizer.load_state_dict(saved_state)
    for _ in range(3):
        for module, opt in ((reference, optimizer), (restored, restored_optimizer)):
            set_quadratic_grad(module)
            opt.step()
    np.testing.assert_array_equal(reference.params["theta"], restored.params["theta"])


def test_bad_state_and_settings_are_refused():
    module = quadratic(np.zeros(2))
    adam = Adam(module)
    state = adam.state_dict()
    with pytest.raises(ValueError, match="missing"):
        adam.load_state_dict({k: v for k, v in state.items() if k != "m/theta"})
    with pytest.raises(ValueError, match="wrong shape"):
        adam.load_state_dict({**state, "v/theta": np.zeros(3)})
    with pytest.raises(ValueError, match="learning rate"):
        Adam(module, lr=0)
    with pytest.raises(ValueError, match="momentum"):
        SGD(module, momentum=1.0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(module, 0.0)


def test_float32_parameters_stay_float32():
    module = quadratic(np.array([1.0, 2.0], dtype=np.float32))
    adam = Adam(module, weight_decay=0.1)
    set_quadratic_grad(module)
    adam.step()
    assert module.params["theta"].dtype == np.float32
