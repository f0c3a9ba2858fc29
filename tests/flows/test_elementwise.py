"""``Standardize`` (nflow_np/flows/elementwise.py): what the registry's property suite does not say.

The protocol (gradients and log-dets against finite differences, round trips, both dtypes, save and load)
is proven by ``tests/flows/test_flows.py`` and ``tests/test_specs.py`` on the registry cases ``standardize``
and ``standardize_then_coupling`` (``tests/helpers.py``). Here: the density against a closed form, the
buffers that nothing trains, the values it refuses (built, cast or loaded), and
:func:`~nflow_np.model.with_standardization`. Rescale and the permutations are proven by the registry alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import HIDDEN, randomise
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from nflow_np import AffineCoupling, FlowModel, Sequential, StandardNormal
from nflow_np.flows import Standardize, leading_standardize
from nflow_np.io import ModelFileError, load_model, save_model
from nflow_np.model import with_standardization
from nflow_np.optim import Adam
from nflow_np.safetensors_io import decode, encode
from nflow_np.train import train_step


def layer(dim: int = 3, seed: int = 0, dtype: object = np.float64) -> Standardize:
    rng = np.random.default_rng(seed)
    return Standardize(rng.normal(0.0, 50.0, dim), rng.uniform(0.01, 20.0, dim), dtype=dtype)


@settings(max_examples=30, deadline=None)
@given(dim=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_the_density_is_the_gaussian_of_its_mean_and_std(dim: int, seed: int) -> None:
    """A normal base behind ``z = (x − μ)/σ`` is ``x ~ N(μ, diag σ²)``: scipy's density, independently of the
    ``−Σ log σ`` the layer computes."""
    standardize = layer(dim, seed)
    mean, std = standardize.buffers["mean"], standardize.buffers["std"]
    x = mean + std * np.random.default_rng(seed + 1).normal(0.0, 2.0, size=(9, dim))
    expected = stats.multivariate_normal(mean=mean, cov=np.diag(std**2)).logpdf(x).reshape(-1)
    np.testing.assert_allclose(FlowModel(standardize).log_prob(x), expected, rtol=1e-12, atol=1e-12)
    z, logdet = standardize.forward(x)
    np.testing.assert_array_equal(z, (x - mean) / std)
    np.testing.assert_array_equal(logdet, np.full(9, -np.log(std).sum()))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mean_and_std_are_buffers_that_nothing_trains(dtype: type) -> None:
    rng = np.random.default_rng(1)
    coupling = randomise(AffineCoupling(3, parity=0, hidden=HIDDEN, rng=rng, dtype=dtype), rng)
    model = FlowModel(Sequential([layer(3, 1, dtype), coupling]))
    before = {name: value.copy() for name, value in model.named_buffers()}
    assert set(before) == {"flow.0.mean", "flow.0.std"}
    assert [name for name, _, _ in model.named_parameters() if name.startswith("flow.0.")] == []
    assert model.flow[0].num_parameters() == 0 and model.flow[0].dtype == dtype
    assert {"flow.0.mean", "flow.0.std"} <= set(model.state_dict())  # saved with the model
    optimizer = Adam(model, lr=0.1, weight_decay=0.5)  # decoupled decay: would shrink anything it touched
    x = (before["flow.0.mean"] + before["flow.0.std"] * rng.normal(size=(16, 3))).astype(dtype)
    params = {name: value.copy() for name, value, _ in model.named_parameters()}
    for _ in range(3):
        train_step(model, optimizer, x)
    for name, value in model.named_buffers():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    assert all(not np.array_equal(value, params[name]) for name, value, _ in model.named_parameters())  # it trained


def test_bad_values_are_refused_naming_the_entry() -> None:
    cases = [
        (([0.0, 1.0], [1.0, 0.0]), np.float64, r"std\[1\] is 0\.0 in float64; it must be finite and positive"),
        (([0.0, 1.0], [-2.0, 1.0]), np.float64, r"std\[0\] is -2\.0"),
        (([0.0, 1.0], [1.0, np.inf]), np.float64, r"std\[1\] is inf"),
        (([np.nan, 1.0], [1.0, 1.0]), np.float64, r"mean\[0\] is nan in float64; it must be finite"),
        (([0.0, 1.0], [1.0, 1e-50]), np.float32, r"std\[1\] is 1e-50, which is 0\.0 in float32"),
        (([1e39, 1.0], [1.0, 1.0]), np.float32, r"mean\[0\] is 1e\+39, which is inf in float32"),
        (([0.0, 1.0], [1.0, 1e39]), np.float32, r"std\[1\] is 1e\+39, which is inf in float32"),
    ]
    for (mean, std), dtype, message in cases:
        with pytest.raises(ValueError, match=message):
            Standardize(mean, std, dtype=dtype)
    with pytest.raises(ValueError, match=r"one shape \(D,\), got \(2,\) and \(3,\)"):
        Standardize([0.0, 1.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"one shape \(D,\), got \(1, 2\) and \(1, 2\)"):
        Standardize([[0.0, 1.0]], [[1.0, 1.0]])
    with pytest.raises(ValueError, match=r"one shape \(D,\), got \(0,\)"):
        Standardize([], [])
    with pytest.raises(TypeError, match="must be real numbers"):
        Standardize(["a", "b"], [1.0, 1.0])
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        Standardize([0.0], [1.0], dtype=np.float16)
    with pytest.raises(ValueError, match=r"std\[0\] is .* in float32; it must be finite and positive"):
        Standardize([0.0, 1.0], [1e-50, 1.0]).astype(np.float32)


def test_mean_and_std_are_cast_to_the_models_dtype() -> None:
    standardize = Standardize(np.array([1, 2]), np.array([0.1, 3.0]), dtype=np.float32)  # integers are numbers
    assert standardize.buffers["mean"].dtype == standardize.buffers["std"].dtype == np.float32
    np.testing.assert_array_equal(standardize.buffers["std"], np.float32([0.1, 3.0]))
    assert standardize.astype(np.float64).buffers["std"].dtype == np.float64
    x = np.ones((2, 2), dtype=np.float32)
    with pytest.raises(TypeError, match="x has dtype float32 but the parameters are float64"):
        standardize.forward(x)


def test_load_state_dict_refuses_a_std_that_is_not_positive_and_writes_nothing() -> None:
    model = FlowModel(Sequential([layer(3, 2), AffineCoupling(3, parity=1, hidden=HIDDEN)]))
    good = model.state_dict()
    for bad_value in (0.0, -1.0):
        state = {name: value.copy() for name, value in good.items()}
        state["flow.0.std"][1] = bad_value
        state["flow.1.net.0.W"] += 1.0
        with pytest.raises(ValueError, match=rf"Standardize: flow\.0\.std\[1\] is {bad_value!r}"):
            model.load_state_dict(state)
        for name, value in model.state_dict().items():
            np.testing.assert_array_equal(value, good[name], err_msg=name)


def _rewrite_weights(folder: Path, name: str, index: int, value: float) -> None:
    """Set ``name[index] = value`` in ``model.safetensors`` and write the checksum that goes with it (a hostile
    but consistent pair of files)."""
    tensors, _ = decode((folder / "model.safetensors").read_bytes())
    tensors = {key: array.copy() for key, array in tensors.items()}
    tensors[name][index] = value
    data = encode(tensors)
    (folder / "model.safetensors").write_bytes(data)
    config = json.loads((folder / "model.json").read_text())
    config["sha256"] = hashlib.sha256(data).hexdigest()
    (folder / "model.json").write_text(json.dumps(config))


def test_a_folder_whose_std_is_not_positive_is_refused(tmp_path: Path) -> None:
    model = FlowModel(Sequential([layer(3, 3), AffineCoupling(3, parity=0, hidden=HIDDEN)]))
    save_model(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model.json").read_text())["flow"]["flows"][0] == {"kind": "standardize",
                                                                                            "dim": 3}
    _rewrite_weights(tmp_path / "m", "flow.0.std", 2, -0.5)
    with pytest.raises(ModelFileError, match=r"model.safetensors: Standardize: flow\.0\.std\[2\] is -0\.5"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_with_standardization_is_the_model_of_the_raw_rows(dtype: type) -> None:
    rng = np.random.default_rng(4)
    inner = FlowModel(Sequential([randomise(AffineCoupling(3, parity=p, hidden=HIDDEN, rng=rng, dtype=dtype), rng)
                                  for p in (0, 1)]), StandardNormal())
    mean, std = np.array([100.0, -5.0, 0.003]), np.array([10.0, 0.1, 0.001])
    model = with_standardization(inner, mean, std)
    assert [type(f).__name__ for f in model.flow.flows] == ["Standardize", "AffineCoupling", "AffineCoupling"]
    assert leading_standardize(model.flow) is model.flow[0] and leading_standardize(inner.flow) is None
    assert model.dtype == dtype and model.base is inner.base
    x = (mean + std * rng.normal(size=(50, 3))).astype(dtype)
    u = ((x - mean.astype(dtype)) / std.astype(dtype)).astype(dtype)
    tolerance = 1e-12 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(model.log_prob(x), inner.log_prob(u) - np.log(std).sum(), rtol=tolerance,
                               atol=tolerance)
    np.testing.assert_allclose(model.decode(model.encode(x)), x, rtol=10 * tolerance)
    samples = model.sample(20, np.random.default_rng(5))
    expected = mean.astype(dtype) + std.astype(dtype) * inner.sample(20, np.random.default_rng(5))
    np.testing.assert_array_equal(samples, expected)
    with pytest.raises(ValueError, match="mean and std have 2 entries but the model has dimension 3"):
        with_standardization(inner, mean[:2], std[:2])
