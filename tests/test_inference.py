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


# -- blocks of rows (FlowModel.inference_rows) ---------------------------------------------------------------------
BLOCK_CALLS = {
    "log_prob": lambda model, x, rng: model.log_prob(x),
    "encode": lambda model, x, rng: model.encode(x),
    "decode": lambda model, x, rng: model.decode(x),
    "sample": lambda model, x, rng: model.sample(x.shape[0], rng),
    "sample_and_log_prob": lambda model, x, rng: np.column_stack(model.sample_and_log_prob(x.shape[0], rng)),
}


def whole_and_in_blocks(model: FlowModel, call: object, x: np.ndarray, rows: int) -> tuple[object, object]:
    """``call`` with every batch passed whole, then in blocks of ``rows`` rows (the same draws for both)."""
    model.inference_rows = None
    whole = call(model, x, np.random.default_rng(5))
    model.inference_rows = rows
    blocks = call(model, x, np.random.default_rng(5))
    return whole, blocks


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(BLOCK_CALLS))
@pytest.mark.parametrize("kind", ["realnvp", "nice"])
def test_blocks_of_rows_give_the_whole_batch_numbers(kind: str, name: str, dtype: str) -> None:
    model = build_model(kind, 5, layers=3, dtype=dtype, seed=1)
    for _, param, _ in model.named_parameters():
        param += np.random.default_rng(3).normal(0.0, 0.1, size=param.shape).astype(dtype)
    x = np.random.default_rng(0).standard_normal((103, 5)).astype(dtype)  # 103 = 10 blocks of 10 and one of 3
    whole, blocks = whole_and_in_blocks(model, BLOCK_CALLS[name], x, rows=10)
    assert np.asarray(blocks).dtype == np.dtype(dtype)
    np.testing.assert_allclose(blocks, whole, rtol=0, atol=8 * np.finfo(dtype).eps * np.abs(whole).max())
    assert model.cached_nbytes() == 0


def test_blocks_are_the_default_for_large_batches_and_cut_peak_memory() -> None:
    import tracemalloc

    model = build_model("realnvp", 16, layers=4, hidden=(256, 256), seed=0)
    x = np.random.default_rng(0).standard_normal((8192, 16))
    assert model.inference_rows is not None and x.shape[0] > model.inference_rows
    peaks = {}
    for rows in (None, model.inference_rows):
        model.inference_rows = rows
        model.log_prob(x)  # warm-up
        tracemalloc.start()
        model.log_prob(x)
        peaks[rows] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # the hidden activations of 8192 rows are 16 MiB each; of a block, a quarter of that
    assert peaks[model.inference_rows] < 0.5 * peaks[None]


def test_rows_that_depend_on_each_other_are_passed_whole() -> None:
    from nflow_np.flows import ActNorm, BatchNorm
    from nflow_np.flows.normalization import training_mode

    x = np.random.default_rng(0).standard_normal((64, 4)) * 3 + 1
    for make in (lambda: Sequential([BatchNorm(4)]), lambda: Sequential([ActNorm(4)])):
        whole_model, block_model = FlowModel(make()), FlowModel(make())
        whole_model.inference_rows, block_model.inference_rows = None, 8
        with training_mode(whole_model.flow), training_mode(block_model.flow):
            whole, blocks = whole_model.log_prob(x), block_model.log_prob(x)
        np.testing.assert_array_equal(blocks, whole)
        # the batch statistics (BatchNorm in training mode) or the first-call initialisation (ActNorm) use
        # all 64 rows; a model fed blocks of 8 gets other numbers, so passing whole is what kept them
        fed_blocks = FlowModel(make())
        with training_mode(fed_blocks.flow):
            naive = np.concatenate([fed_blocks.log_prob(x[i : i + 8]) for i in range(0, 64, 8)])
        assert not np.allclose(naive, whole)
