"""Coupling-specific behaviour of ``nflow_np.flows.coupling`` (the generic protocol is in test_flows.py).

Identity at initialisation, mask validation, the pass-through part, complementary parities, the
layer against an independent evaluation of its formula, and parameter naming.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import random_mask, randomise
from hypothesis import given, settings
from hypothesis import strategies as st

from nflow_np import AdditiveCoupling, AffineCoupling, Coupling
from nflow_np.flows.coupling import parity_mask
from nflow_np.nn import MLP, Linear

FAST = settings(max_examples=25, deadline=None)
ACTIVATIONS = ["relu", "leaky_relu", "tanh"]
COUPLINGS = pytest.mark.parametrize("cls", [AdditiveCoupling, AffineCoupling], ids=["additive", "affine"])

dims = st.integers(2, 7)
batches = st.integers(1, 5)
seeds = st.integers(0, 2**32 - 1)


def test_parity_mask() -> None:
    np.testing.assert_array_equal(parity_mask(5, 0), [True, False, True, False, True])
    np.testing.assert_array_equal(parity_mask(5, 1), [False, True, False, True, False])
    with pytest.raises(ValueError, match="parity must be 0 or 1, got 2"):
        parity_mask(4, 2)


@COUPLINGS
@FAST
@given(dim=dims, n=batches, seed=seeds, parity=st.integers(0, 1), activation=st.sampled_from(ACTIVATIONS))
def test_identity_at_initialisation(
    cls: type, dim: int, n: int, seed: int, parity: int, activation: str
) -> None:
    """The default net's last layer starts at zero, so z == x and logdet == 0 exactly, both ways."""
    rng = np.random.default_rng(seed)
    flow = cls(dim, parity=parity, hidden=(8,), rng=rng, activation=activation)
    x = 3.0 * rng.standard_normal((n, dim))
    for apply in (flow.forward, flow.inverse):
        out, logdet = apply(x)
        np.testing.assert_array_equal(out, x)
        np.testing.assert_array_equal(logdet, np.zeros(n))
    if cls is AffineCoupling:
        np.testing.assert_array_equal(flow.params["scale"], np.ones(flow.d2))


def test_identity_start_still_learns() -> None:
    """At the identity start the last layer gets a gradient through ŝ and t (because a = 1 ≠ 0).

    ``∂L/∂a = Σ ∂L/∂s ⊙ tanh(ŝ)`` is exactly 0 there (ŝ = 0); ``a`` starts moving once ŝ does.
    """
    rng = np.random.default_rng(0)
    flow = AffineCoupling(4, hidden=(8,), rng=rng)
    x = rng.standard_normal((16, 4))
    flow.forward(x)
    flow.backward(rng.standard_normal((16, 4)), rng.standard_normal(16))
    grads = dict((name, grad) for name, _, grad in flow.named_parameters())
    np.testing.assert_array_equal(grads["scale"], 0.0)
    assert np.all(grads["net.2.W"] != 0) and np.all(grads["net.2.b"] != 0)
    assert np.all(grads["net.0.W"] == 0) and np.all(grads["net.0.b"] == 0)  # behind the zero last layer


@COUPLINGS
def test_mask_validation(cls: type) -> None:
    with pytest.raises(ValueError, match=r"mask must be a boolean array of shape \(4,\), got bool \(3,\)"):
        cls(4, mask=np.array([True, False, True]))
    with pytest.raises(ValueError, match=r"mask must be a boolean array of shape \(4,\), got int64 \(4,\)"):
        cls(4, mask=np.array([1, 0, 1, 0]))
    with pytest.raises(ValueError, match=r"mask must be a boolean array of shape \(4,\)"):
        cls(4, mask=np.array([[True, False], [True, False]]))
    with pytest.raises(ValueError, match="mask must leave both parts non-empty"):
        cls(4, mask=np.ones(4, dtype=bool))
    with pytest.raises(ValueError, match="mask must leave both parts non-empty"):
        cls(4, mask=np.zeros(4, dtype=bool))
    with pytest.raises(ValueError, match="mask must leave both parts non-empty"):
        cls(1)
    with pytest.raises(ValueError, match="parity must be 0 or 1"):
        cls(4, parity=-1)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        cls(4, dtype=np.int32)
    with pytest.raises(ValueError, match="unknown activation 'sigmoid'"):
        cls(4, activation="sigmoid")
    flow = cls(4, mask=[False, True, True, False])  # a list of bools is accepted
    assert (flow.d1, flow.d2) == (2, 2)


def test_unknown_law() -> None:
    with pytest.raises(ValueError, match="unknown coupling law 'spline'; choose from"):
        Coupling(4, "spline")


@COUPLINGS
def test_net_with_wrong_output_width_is_refused(cls: type) -> None:
    """A user net must map (N, D₁) to (N, out_features(D₂)); another width is an error, not a silent result.

    With D₂ = 2, additive needs 2 outputs and affine 4. Today a 1-output net (additive: ``t`` broadcast
    over both columns) or a 3-output net (affine: ŝ = h[:, :1] broadcast, t = h[:, 1:]) is accepted and
    silently computes a different map; the check belongs at construction or at the first forward.
    """
    rng = np.random.default_rng(0)
    wrong_width = {AdditiveCoupling: 1, AffineCoupling: 3}[cls]
    x = rng.standard_normal((5, 4))
    with pytest.raises(ValueError, match="net"):
        flow = cls(4, net=Linear(2, wrong_width, rng))
        flow.forward(x)


@COUPLINGS
@FAST
@given(dim=dims, n=batches, seed=seeds)
def test_masked_part_passes_through(cls: type, dim: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = random_mask(dim, rng)
    flow = randomise(cls(dim, mask=mask, hidden=(6,), rng=rng), rng)
    x = rng.standard_normal((n, dim))
    for apply in (flow.forward, flow.inverse):
        out, _ = apply(x)
        np.testing.assert_array_equal(out[:, mask], x[:, mask])
        assert np.all(out[:, ~mask] != x[:, ~mask])


@COUPLINGS
@FAST
@given(dim=dims, n=batches, seed=seeds)
def test_matches_independent_formula(cls: type, dim: int, n: int, seed: int) -> None:
    """z₁ = x₁, z₂ = τ(x₂, c(x₁)) evaluated by hand from the layer's own net and scale."""
    rng = np.random.default_rng(seed)
    mask = random_mask(dim, rng)
    flow = randomise(cls(dim, mask=mask, hidden=(6,), rng=rng), rng)
    x = rng.standard_normal((n, dim))
    h = flow.net.forward(x[:, mask])
    expected = x.copy()
    if cls is AffineCoupling:
        s = flow.params["scale"] * np.tanh(h[:, : flow.d2])
        expected[:, ~mask] = x[:, ~mask] * np.exp(s) + h[:, flow.d2 :]
        expected_logdet = s.sum(axis=1)
    else:
        expected[:, ~mask] = x[:, ~mask] + h
        expected_logdet = np.zeros(n)
    z, logdet = flow.forward(x)
    np.testing.assert_allclose(z, expected, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(logdet, expected_logdet, rtol=1e-14, atol=1e-14)


@COUPLINGS
@FAST
@given(dim=dims, n=batches, seed=seeds)
def test_alternating_parities_transform_complementary_halves(cls: type, dim: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    changed = []
    for parity in (0, 1):
        flow = randomise(cls(dim, parity=parity, hidden=(6,), rng=rng), rng)
        z, _ = flow.forward(x)
        moved = np.any(z != x, axis=0)
        np.testing.assert_array_equal(moved, ~parity_mask(dim, parity))
        changed.append(moved)
    np.testing.assert_array_equal(changed[0] ^ changed[1], np.ones(dim, dtype=bool))  # disjoint and covering
    np.testing.assert_array_equal(changed[0], np.arange(dim) % 2 == 1)  # parity 0 transforms the odd indices


@COUPLINGS
def test_mask_layouts_agree(cls: type) -> None:
    """The same split as a contiguous, strided or scattered mask gives the same map up to relabelling."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 6))
    first_half = np.array([True, True, True, False, False, False])
    reference = randomise(cls(6, mask=first_half, hidden=(5,), rng=rng), rng)
    z_ref, logdet_ref = reference.forward(x)
    for columns in ([0, 2, 4], [5, 0, 3], [1, 3, 5]):
        others = [c for c in range(6) if c not in columns]
        mask = np.zeros(6, dtype=bool)
        mask[columns] = True
        flow = cls(6, mask=mask, hidden=(5,), rng=rng)
        flow.load_state_dict(reference.state_dict())
        order = np.array(sorted(columns) + others)
        x_perm = np.empty_like(x)
        x_perm[:, order] = x
        z, logdet = flow.forward(x_perm)
        np.testing.assert_allclose(z[:, order], z_ref, rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(logdet, logdet_ref, rtol=1e-14, atol=1e-14)


@COUPLINGS
def test_parameter_names_and_sizes(cls: type) -> None:
    flow = cls(5, parity=0, hidden=(4, 3), rng=np.random.default_rng(0))
    d1, d2 = 3, 2
    out = 2 * d2 if cls is AffineCoupling else d2
    expected = {"net.0.W": (d1, 4), "net.0.b": (4,), "net.2.W": (4, 3), "net.2.b": (3,)}
    expected |= {"net.4.W": (3, out), "net.4.b": (out,)}
    if cls is AffineCoupling:
        expected = {"scale": (d2,)} | expected
    assert {name: param.shape for name, param, _ in flow.named_parameters()} == expected
    assert [name for name, _, _ in flow.named_parameters()] == list(expected)
    assert flow.num_parameters() == sum(int(np.prod(shape)) for shape in expected.values())


def test_user_net_is_used_as_given() -> None:
    rng = np.random.default_rng(0)
    net = MLP([2, 3, 4], rng, activation="tanh", zero_last=False)
    flow = AffineCoupling(4, net=net)
    assert flow.net is net and flow.children["net"] is net
    assert not np.all(flow.forward(rng.standard_normal((2, 4)))[0] == 0)


@COUPLINGS
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype(cls: type, dtype: object) -> None:
    flow = cls(4, hidden=(3,), dtype=dtype)
    assert flow.dtype == dtype
    assert all(param.dtype == dtype for _, param, _ in flow.named_parameters())
