"""Inference mode (nflow_np/grad_mode.py): log_prob, sample, encode, decode and evaluate keep no backward
caches, give the same numbers as with caches kept, and leave training as it was.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import nflow_np
from nflow_np.architectures import build_model
from nflow_np.flows import Sequential
from nflow_np.image_models import build_nice, build_realnvp
from nflow_np.model import FlowModel


def trained_toy(memory: str = "store") -> tuple[FlowModel, np.ndarray]:
    """A RealNVP after one training forward/backward, so its caches are full before the call under test."""
    x = np.random.default_rng(0).standard_normal((128, 6))
    model = build_model("realnvp", 6, layers=4, hidden=(16, 16), seed=2)
    model.set_memory(memory)
    for _, param, _ in model.named_parameters():
        param += np.random.default_rng(3).normal(0.0, 0.1, size=param.shape)
    model.nll_and_backward(x)
    model.flow._forward(x)  # a forward whose backward never comes: caches held
    assert model.cached_nbytes() > 0
    return model, x


CALLS = {
    "log_prob": lambda model, x: model.log_prob(x),
    "encode": lambda model, x: model.encode(x),
    "decode": lambda model, x: model.decode(x),
    "sample": lambda model, x: model.sample(64, np.random.default_rng(1)),
    "nll": lambda model, x: model.nll(x),
}


def kept_caches(name: str, model: FlowModel, x: np.ndarray) -> object:
    """What ``CALLS[name]`` computes, by the flow's own methods with gradients enabled (caches kept)."""
    if name == "decode":
        return model.flow._inverse(x)[0]
    if name == "sample":
        return model.flow._inverse(model.base.sample(64, 6, np.random.default_rng(1), model.dtype))[0]
    z, logdet = model.flow._forward(x)
    log_prob = model.base.log_prob(z) + logdet
    return {"log_prob": log_prob, "encode": z, "nll": float(-log_prob.mean())}[name]


@pytest.mark.parametrize("memory", ["store", "invert"])
@pytest.mark.parametrize("name", list(CALLS))
def test_inference_calls_leave_no_caches_and_the_same_numbers(name: str, memory: str) -> None:
    model, x = trained_toy(memory)
    result = CALLS[name](model, x)
    assert model.cached_nbytes() == 0
    kept = kept_caches(name, model, x)  # the same numbers straight through the flow, caches kept
    assert model.cached_nbytes() > 0  # (the comparison above did keep caches: the check can fail)
    np.testing.assert_array_equal(result, kept)


def test_a_stack_frees_each_layer_as_it_goes() -> None:
    model, x = trained_toy()
    flow: Sequential = model.flow
    held = []
    original = type(flow.flows[1])._forward

    def watch(layer: object, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        held.append(flow.flows[0].cached_nbytes())
        return original(layer, inputs)

    flow.flows[1]._forward = watch.__get__(flow.flows[1])
    with nflow_np.no_grad():
        flow._forward(x)
    assert held == [0]  # layer 0's cache and its net's were gone before layer 1 ran
    with pytest.raises(RuntimeError, match="backward called before forward"):
        flow.backward(np.ones_like(x))  # nothing stale to back-propagate


def test_training_inside_no_grad_is_unchanged() -> None:
    model, x = trained_toy()
    model.zero_grad()
    model.nll_and_backward(x)
    expected = [grad.copy() for _, _, grad in model.named_parameters()]
    model.zero_grad()
    with nflow_np.no_grad():
        model.nll_and_backward(x)
        assert not nflow_np.is_grad_enabled()
    for (_, _, grad), want in zip(model.named_parameters(), expected, strict=True):
        np.testing.assert_array_equal(grad, want)


def test_the_flag_is_per_thread_and_restored() -> None:
    seen = []
    with nflow_np.no_grad():
        worker = threading.Thread(target=lambda: seen.append(nflow_np.is_grad_enabled()))
        worker.start()
        worker.join()
        with nflow_np.grad_mode.set_grad_enabled(True):
            assert nflow_np.is_grad_enabled()
        assert not nflow_np.is_grad_enabled()
    assert seen == [True] and nflow_np.is_grad_enabled()


@pytest.mark.parametrize("build", [build_nice, build_realnvp])
def test_image_models_evaluate_and_sample_leave_no_caches(build: object) -> None:
    rng = np.random.default_rng(0)
    model = build((1, 4, 4), 4, hidden=(8,), dtype=np.float64)
    images = rng.integers(0, 4, size=(20, 1, 4, 4)).astype(np.float64)
    model.nll_and_backward(images)
    model.flow._forward(model._check(images, "x"))
    assert model.cached_nbytes() > 0
    metrics = model.evaluate(images, batch_size=8)
    assert model.cached_nbytes() == 0 and np.isfinite(metrics["nll"])
    for call in (lambda: model.sample(5, np.random.default_rng(1)), lambda: model.decode(model.encode(images))):
        model.flow._forward(model._check(images, "x"))
        call()
        assert model.cached_nbytes() == 0
