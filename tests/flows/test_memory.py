"""Backpropagation by inversion (Sequential's ``memory="invert"``, nflow_np/flows/base.py; docs/memory.md).

The specification is the standard backward pass (``memory="store"``): the invert mode must give
the same outputs bit for bit and the same gradients up to the round-off of the reconstructed
inputs, keep no layer's cache between the forward and the backward pass, and fall back to storing
for layers that declare ``invertible_in_backward = False``.

Gradient metric (per array: the input gradient and each parameter's)::

    err = max|g_invert − g_store| / max(max|g_store|, 1e-6 · G),   G = the largest |g_store| of all arrays

so an array whose gradient is zero or negligible next to the others is compared absolutely.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import FLOW_CASES, HIDDEN, randomise
from hypothesis import given, settings
from hypothesis import strategies as st

from nflow_np import AdditiveCoupling, AffineCoupling, FlowModel, Permutation, Planar, Rescale, Sequential
from nflow_np.flows import BatchNorm, Dequantize, Logit, Scale, training_mode
from nflow_np.flows.base import anchor_every_for
from nflow_np.train import fit

FLOAT64_RTOL = 1e-10
FLOAT32_RTOL = 1e-3
"""Stated float32 bound for a 32-coupling stack at dim 8 (measured: about 1e-5; docs/memory.md)."""


def backprop(flow: Sequential, x: np.ndarray, d_out: np.ndarray, d_logdet: np.ndarray) -> dict:
    """One forward + backward; the outputs and every gradient, by name."""
    flow.zero_grad()
    z, logdet = flow.forward(x)
    result = {"z": z.copy(), "logdet": logdet.copy(), "input": flow.backward(d_out, d_logdet)}
    result |= {name: grad.copy() for name, _, grad in flow.named_parameters()}
    return result


def gradient_error(store: dict, invert: dict) -> float:
    names = [name for name in store if name not in ("z", "logdet")]
    largest = max(float(np.max(np.abs(store[name]), initial=0.0)) for name in names)
    floor = max(1e-6 * largest, 1e-300)
    return max(
        float(np.max(np.abs(invert[name] - store[name]), initial=0.0))
        / max(float(np.max(np.abs(store[name]), initial=0.0)), floor)
        for name in names
    )


def compare_modes(flow: Sequential, x: np.ndarray, rng: np.random.Generator, **invert: object) -> float:
    """Run both modes on the same batch and loss; outputs must agree bit for bit; return the gradient error."""
    d_out = rng.standard_normal(x.shape).astype(x.dtype)
    d_logdet = rng.standard_normal(x.shape[0]).astype(x.dtype)
    flow.set_memory("store")
    store = backprop(flow, x, d_out, d_logdet)
    flow.set_memory("invert", **invert)
    inverted = backprop(flow, x, d_out, d_logdet)
    assert np.array_equal(store["z"], inverted["z"]) and np.array_equal(store["logdet"], inverted["logdet"])
    return gradient_error(store, inverted)


def coupling_stack(depth: int, dim: int, rng: np.random.Generator, dtype: object) -> Sequential:
    """RealNVP-style stack: alternating affine/additive couplings, a permutation between them."""
    flows = []
    for k in range(depth):
        kind = AffineCoupling if k % 2 == 0 else AdditiveCoupling
        flows.append(kind(dim, parity=k % 2, hidden=HIDDEN, rng=rng, dtype=dtype))
        if k % 4 == 3:
            flows.append(Permutation.random(dim, rng))
    flows.append(Rescale(dim, dtype=dtype))
    return randomise(Sequential(flows), rng, std=0.3)


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    cases=st.lists(st.integers(0, len(FLOW_CASES) - 1), min_size=1, max_size=10),
    dim=st.integers(2, 6),
    n=st.integers(1, 8),
    anchor_every=st.one_of(st.none(), st.integers(1, 6)),
    scale=st.floats(0.1, 3.0),
)
def test_invert_mode_gradients_equal_backprop_float64(
    seed: int, cases: list[int], dim: int, n: int, anchor_every: int | None, scale: float
) -> None:
    rng = np.random.default_rng(seed)
    flow = Sequential([FLOW_CASES[i][1](dim, rng, np.float64) for i in cases])
    x = scale * rng.standard_normal((n, dim))
    error = compare_modes(flow, x, rng, anchor_every=anchor_every)
    assert error <= FLOAT64_RTOL, error


@pytest.mark.parametrize("anchor_every", [None, 4])
def test_invert_mode_gradients_float32_within_stated_bound(anchor_every: int | None) -> None:
    rng = np.random.default_rng(1)
    flow = coupling_stack(32, 8, rng, np.float32)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    assert compare_modes(flow, x, rng, anchor_every=anchor_every) <= FLOAT32_RTOL


def test_fallback_layers_keep_their_cache_and_match_backprop() -> None:
    rng = np.random.default_rng(2)
    dim = 4

    def build() -> Sequential:
        layer_rng = np.random.default_rng(5)
        flows = [
            Dequantize(dim, levels=5, seed=3),
            Scale(dim, 1 / 5),
            Logit(dim),
            AffineCoupling(dim, parity=0, hidden=HIDDEN, rng=layer_rng),
            BatchNorm(dim),
            AdditiveCoupling(dim, parity=1, hidden=HIDDEN, rng=layer_rng),
            Planar(dim, rng=layer_rng),
            AffineCoupling(dim, parity=1, hidden=HIDDEN, rng=layer_rng),
        ]
        return randomise(Sequential(flows), np.random.default_rng(6), std=0.3)

    x = rng.integers(0, 5, size=(16, dim)).astype(np.float64)
    d_out, d_logdet = rng.standard_normal(x.shape), rng.standard_normal(16)
    results, stats = [], []
    for memory in ("store", "invert"):
        flow = build()
        flow.set_memory(memory)
        with training_mode(flow):  # BatchNorm on batch statistics: no inverse, so it must store
            exact = [layer.invertible_in_backward for layer in flow]
            assert exact == [False, True, False, True, False, True, False, True]
            flow.zero_grad()
            z, logdet = flow.forward(x)
            if memory == "invert":
                kept = [i for i, layer in enumerate(flow) if layer.cached_nbytes() > 0]
                assert kept == [2, 4, 6]  # Logit, BatchNorm, Planar (Dequantize caches no array)
            result = {"z": z, "logdet": logdet, "input": flow.backward(d_out, d_logdet)}
        results.append(result | {name: grad.copy() for name, _, grad in flow.named_parameters()})
        stats.append(flow[4].buffers["running_mean"].copy())
    assert np.array_equal(results[0]["z"], results[1]["z"])
    assert gradient_error(*results) <= FLOAT64_RTOL
    assert np.array_equal(*stats)  # the batch statistics entered the running averages once


def test_caches_are_freed_and_activation_memory_is_flat_in_depth() -> None:
    rng = np.random.default_rng(3)
    n, dim = 32, 6
    x = rng.standard_normal((n, dim))
    held = {}
    for depth in (4, 16):
        flow = coupling_stack(depth, dim, rng, np.float64)
        flow.set_memory("store")
        flow.forward(x)
        store_bytes = flow.cached_nbytes()
        flow.set_memory("invert")
        z, _ = flow.forward(x)
        assert all(layer.cached_nbytes() == 0 for layer in flow)  # no layer keeps anything
        held[depth] = flow.cached_nbytes()
        assert held[depth] == x.nbytes + z.nbytes  # only the input (stored anchor) and the output
        assert store_bytes > 4 * held[depth]
        flow.backward(np.ones_like(z), np.ones(n))
        assert flow.cached_nbytes() == 0  # everything reconstructed was freed again
    assert held[4] == held[16]


def test_anchors_are_stored_every_k_layers() -> None:
    rng = np.random.default_rng(4)
    flow = coupling_stack(8, 4, rng, np.float64)  # 8 couplings, 2 permutations, 1 rescale: 11 layers
    flow.set_memory("invert", anchor_every=3)
    x = rng.standard_normal((5, 4))
    flow.forward(x)
    _, (stored, _) = flow._cache
    assert sorted(stored) == [0, 3, 6, 9]


def test_tolerance_chooses_anchor_every_from_measured_errors() -> None:
    assert anchor_every_for(np.array([0.0, 1e-9, 1e-7, 1e-5]), 1e-8) == 3
    assert anchor_every_for(np.array([1e-3, 1e-9]), 1e-8) == 1
    assert anchor_every_for(np.array([0.0, 1e-9]), 1e-8) == 2
    rng = np.random.default_rng(5)
    flow = coupling_stack(24, 6, rng, np.float32)
    x = rng.standard_normal((64, 6)).astype(np.float32)
    errors = flow.reconstruction_errors(x)
    assert errors.shape == (len(flow),) and errors[-1] > 0
    tolerance = float(np.sort(errors)[len(errors) // 2])
    flow.set_memory("invert", tolerance=tolerance)
    assert flow.anchor_every is None
    flow.forward(x)
    assert flow.anchor_every == anchor_every_for(errors, tolerance)
    assert 1 <= flow.anchor_every < len(flow)


def test_bad_memory_settings_are_refused() -> None:
    flow = coupling_stack(2, 4, np.random.default_rng(0), np.float64)
    with pytest.raises(ValueError, match="memory must be one of"):
        flow.set_memory("recompute")
    with pytest.raises(ValueError, match="anchor_every must be a positive integer"):
        flow.set_memory("invert", anchor_every=0)
    with pytest.raises(ValueError, match="not both"):
        flow.set_memory("invert", anchor_every=2, tolerance=1e-6)
    with pytest.raises(ValueError, match="invert"):
        flow.set_memory("store", anchor_every=2)
    with pytest.raises(ValueError, match="needs a Sequential"):
        FlowModel(Rescale(3), memory="invert")
    flow.set_memory("invert")
    flow.forward(np.zeros((2, 4)))
    flow.backward(np.zeros((2, 4)))
    with pytest.raises(RuntimeError, match="before forward"):
        flow.backward(np.zeros((2, 4)))  # the stored activations went with the first backward


def test_fit_in_invert_mode_follows_standard_training() -> None:
    rng = np.random.default_rng(6)
    data = np.concatenate([rng.normal(-1, 0.3, (128, 2)), rng.normal(1, 0.5, (128, 2))])
    models = []
    for memory in ("store", "invert"):
        model = FlowModel(coupling_stack(6, 2, np.random.default_rng(7), np.float64))
        fit(model, data, epochs=2, batch_size=64, progress=False, memory=memory)
        assert model.flow.memory == memory
        models.append(model)
    for (name, a, _), (_, b, _) in zip(models[0].named_parameters(), models[1].named_parameters(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10, err_msg=name)


def test_tolerance_is_measured_again_as_training_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from nflow_np.flows import base

    flow = coupling_stack(4, 4, np.random.default_rng(8), np.float64)
    measured = []
    monkeypatch.setattr(base, "REMEASURE_EVERY", 3)
    monkeypatch.setattr(Sequential, "reconstruction_errors", lambda self, x: measured.append(1) or np.zeros(len(self)))
    flow.set_memory("invert", tolerance=1e-12)
    for _ in range(7):
        flow.forward(np.zeros((2, 4)))
    assert len(measured) == 3  # calls 0, 3 and 6
