"""NICE and RealNVP builders: structure, identity at initialisation, argument errors."""

import numpy as np
import pytest

from nflow_np.architectures import build_model
from nflow_np.distributions import StandardLogistic, StandardNormal
from nflow_np.flows import AdditiveCoupling, AffineCoupling, Rescale


def test_realnvp_alternates_affine_couplings():
    model = build_model("realnvp", 4, layers=3)
    assert isinstance(model.base, StandardNormal)
    assert all(isinstance(flow, AffineCoupling) for flow in model.flow.flows)
    masks = [flow.mask for flow in model.flow.flows]
    assert np.array_equal(masks[0], ~masks[1]) and np.array_equal(masks[0], masks[2])


def test_nice_ends_with_rescale_and_logistic_prior():
    model = build_model("nice", 6, layers=4)
    assert isinstance(model.base, StandardLogistic)
    assert all(isinstance(flow, AdditiveCoupling) for flow in model.flow.flows[:4])
    assert isinstance(model.flow.flows[-1], Rescale)


@pytest.mark.parametrize("kind", ["realnvp", "nice"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_new_model_is_the_identity(kind, dtype):
    model = build_model(kind, 3, dtype=dtype)
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(dtype)
    np.testing.assert_array_equal(model.encode(x), x)
    np.testing.assert_allclose(model.log_prob(x), model.base.log_prob(x), rtol=1e-6)
    assert model.log_prob(x).dtype == dtype


def test_builder_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("glow", 2)
    with pytest.raises(ValueError, match="dimension >= 2"):
        build_model("realnvp", 1)
    with pytest.raises(ValueError, match="base distribution"):
        build_model("realnvp", 2, base="cauchy")
    with pytest.raises(TypeError, match="float32 or float64"):
        build_model("realnvp", 2, dtype=np.int32)
