"""Numerics at the edges: inputs up to 1e4 through every layer, far-out log-probs, overflow, the logit edges.

The rule (README, "Reliability"): a public forward or inverse either returns finite values that
invert, or raises a clear error; it never returns a silent Inf or NaN.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import FLOW_CASES
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nflow_np.architectures import build_model
from nflow_np.data import load_toy
from nflow_np.flows import Rescale
from nflow_np.model import FlowModel
from nflow_np.optim import Adam
from nflow_np.train import fit
from nflow_np.validation import NonFiniteError

EDGE = settings(max_examples=15, deadline=None)
# Round-trip error allowed, relative to the row's largest magnitude (at least 1). Measured worst
# cases over the registry: 1e-13 (float64) and 2e-4 (float32), from cancellation in z₂ − t.
ROUND_TRIP = {np.float64: 1e-10, np.float32: 2e-3}
# the layers of the reference library: these must stay finite up to 1e4, not merely refuse
MUST_STAY_FINITE = {
    "additive_coupling",
    "affine_coupling_parity0",
    "affine_coupling_parity1",
    "affine_coupling_random_mask",
    "affine_coupling_user_net",
    "rescale",
    "permutation",
    "reverse",
    "sequential",
    "inverse_affine_coupling",
    "inverse_sequential",
}


def edge_inputs(dim: int) -> st.SearchStrategy:
    """Rows of magnitude up to 1e4, including ±1e4, 0, and subnormal values."""
    return st.integers(1, 8).flatmap(
        lambda n: hnp.arrays(np.float64, (n, dim), elements=st.floats(-1e4, 1e4) | st.sampled_from([1e4, -1e4, 0.0]))
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("name", "factory"), FLOW_CASES, ids=[name for name, _ in FLOW_CASES])
@EDGE
@given(data=st.data(), dim=st.integers(2, 5), seed=st.integers(0, 2**16), direction=st.sampled_from(["fwd", "inv"]))
def test_inputs_up_to_1e4_stay_finite_and_invert_or_raise(name, factory, dtype, data, dim, seed, direction):
    flow = factory(dim, np.random.default_rng(seed), dtype)
    x = data.draw(edge_inputs(dim)).astype(dtype)
    there, back = (flow.forward, flow.inverse) if direction == "fwd" else (flow.inverse, flow.forward)
    try:
        out, logdet = there(x)
    except ValueError as error:  # a refusal must say why, and only a new kind of layer may refuse
        assert name not in MUST_STAY_FINITE, f"{name} refused |x| <= 1e4: {error}"
        assert str(error)
        return
    assert np.isfinite(out).all() and np.isfinite(logdet).all()
    restored, logdet_back = back(out)
    scale = np.maximum(1.0, np.abs(x.astype(np.float64)).max(axis=1, keepdims=True))
    error = np.abs(restored.astype(np.float64) - x) / scale
    assert error.max() <= ROUND_TRIP[dtype], f"round trip off by {error.max():.2e} (relative)"
    # log-dets of the two directions cancel up to the same round-off. The round trip rebuilds the
    # input to a relative ε, i.e. an absolute ε|x|, which the nets turn into log-det error: the bound
    # grows with |x| past 100 (measured worst for float32 stacks: 3.6e-7 |x|, 28× inside 1e-5 |x|).
    tolerance = (1e-6 if dtype == np.float64 else 1e-3) * np.maximum(1.0, scale[:, 0] / 100)
    assert (np.abs(logdet.astype(np.float64) + logdet_back) <= tolerance).all(), (logdet + logdet_back, tolerance)


@pytest.fixture(scope="module", params=["realnvp", "nice"])
def trained(request):
    """A RealNVP (normal base) or NICE (logistic base) fitted for a few epochs: scales and shifts far from 0."""
    data = load_toy("two_moons", n_train=1024, n_val=256, n_test=8, seed=0)
    model = build_model(request.param, 2, layers=6, hidden=(32, 32), seed=1)
    fit(model, data.train, data.val, optimizer=Adam(model, lr=3e-3), epochs=8, batch_size=128, progress=False)
    assert model.base.name == ("normal" if request.param == "realnvp" else "logistic")
    return model


@settings(max_examples=25, deadline=None)
@given(exponent=st.floats(0, 8), angle=st.floats(0, 2 * np.pi))
def test_far_out_log_probs_are_finite_in_float64(trained, exponent, angle):
    x = 10.0**exponent * np.array([[np.cos(angle), np.sin(angle)]])
    log_p = trained.log_prob(x)
    assert np.isfinite(log_p).all()
    if exponent >= 1:  # 10 or more from the moons: less likely than a point on them
        assert log_p[0] < trained.log_prob(np.array([[0.5, 0.25]]))[0]
    z = trained.encode(x)
    np.testing.assert_allclose(trained.decode(z), x, rtol=1e-9, atol=1e-9 * 10.0**exponent)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_overflow_raises_a_clear_error_instead_of_inf():
    layer = Rescale(2, dtype=np.float32)
    layer.params["log_scale"][...] = 80.0  # e^80 · 1e4 > the float32 maximum 3.4e38
    x = np.array([[1.0, -1.0], [1e4, 2.0]], dtype=np.float32)
    with pytest.raises(NonFiniteError, match=r"Rescale\.forward gave a non-finite result at row 1.* 1e\+04.*float32"):
        layer.forward(x)

    model = build_model("realnvp", 2, layers=2, hidden=(4,), dtype=np.float32)
    far = np.array([[0.0, 0.0], [3e19, 0.0]], dtype=np.float32)  # z² overflows float32
    with pytest.raises(NonFiniteError, match="log_prob gave a non-finite result at row 1"):
        model.log_prob(far)
    stretch = Rescale(2)
    stretch.params["log_scale"][...] = -10.0  # sampling multiplies by e^10
    with pytest.raises(NonFiniteError, match="sample gave a non-finite result"):
        FlowModel(stretch).sample(4, np.random.default_rng(0), temperature=1e306)


# -- the logit transform of image flows (nflow_np/flows/preprocessing.py) at exactly 0 and 1 --------------------
def test_logit_at_exactly_0_and_1():
    from nflow_np.flows.preprocessing import Logit

    for dtype in (np.float64, np.float32):
        layer = Logit(3, alpha=0.05)
        x = np.array([[0.0, 1.0, 0.5], [1.0, 0.0, 0.0]], dtype=dtype)
        z, logdet = layer.forward(x)
        assert np.isfinite(z).all() and np.isfinite(logdet).all()
        np.testing.assert_allclose(z[0, :2], [-np.log(19.0), np.log(19.0)], rtol=1e-5)  # logit(0.05), logit(0.95)
        restored, logdet_back = layer.inverse(z)
        np.testing.assert_allclose(restored, x, atol=1e-12 if dtype == np.float64 else 1e-6)
        np.testing.assert_allclose(logdet + logdet_back, 0.0, atol=1e-9 if dtype == np.float64 else 1e-4)
    # without the margin α the edges map to ±inf: refused by name, not returned
    with pytest.raises(ValueError, match="Logit needs x in"):
        Logit(2, alpha=0.0).forward(np.array([[0.0, 0.5]]))
    with pytest.raises(ValueError, match="Logit needs x in"):
        Logit(2, alpha=0.0).forward(np.array([[0.5, 1.0]]))
    # the inverse of far-out z lands on the edges, finitely
    x, logdet = Logit(2, alpha=0.05).inverse(np.array([[1e4, -1e4]]))
    assert np.isfinite(x).all() and np.isfinite(logdet).all()
