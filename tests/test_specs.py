"""Layers that describe themselves (nflow_np/specs.py): every registered kind saves and loads exactly.

The round trip runs over the whole layer registry: every case of ``tests/helpers.py``'s FLOW_CASES,
plus the image layers that need an input of their own, and a check that no registered kind is left
out. A toy layer defined in the test joins the format by its decorator and two methods alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import FLOW_CASES

from nflow_np import specs
from nflow_np.distributions import StandardNormal
from nflow_np.flows import (
    AffineCoupling,
    Dequantize,
    FactorOut,
    Flow,
    Inverse,
    Logit,
    Planar,
    Radial,
    Scale,
    Sequential,
    Squeeze,
)
from nflow_np.io import ModelFileError, load_model, save_model
from nflow_np.model import FlowModel
from nflow_np.specs import SpecReader, flow_from_spec, register_flow, to_spec

DIM = 6


def _image_layers(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    """Squeeze and FactorOut on a (2, 2, 2) image (dim 8), inside a Sequential."""
    squeeze = Squeeze((2, 2, 2))
    inner = AffineCoupling(4, parity=0, hidden=(3,), rng=rng, dtype=dtype)
    return Sequential([squeeze, FactorOut(8, inner)])


def _preprocessing(dim: int, rng: np.random.Generator, dtype: object) -> Flow:
    """Dequantize, Scale, Logit: the image-model preprocessing (input in [0, levels))."""
    return Sequential([Dequantize(dim, 5, seed=3), Scale(dim, 1 / 5), Logit(dim, 0.05)])


EXTRA_CASES = [("image_layers", _image_layers, 8), ("preprocessing", _preprocessing, DIM)]
ALL_CASES = [(name, factory, DIM) for name, factory in FLOW_CASES] + EXTRA_CASES


def _kinds(spec: dict) -> set[str]:
    found, stack = set(), [spec]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.add(item.get("kind"))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found - {None}


def _input(flow: Flow, dim: int, rng: np.random.Generator, dtype: object) -> np.ndarray:
    if any(isinstance(module, Dequantize) for module in flow.modules()):
        return rng.integers(0, 5, size=(7, dim)).astype(dtype)
    return rng.normal(size=(7, dim)).astype(dtype)


def test_every_registered_kind_is_covered_by_a_case() -> None:
    rng = np.random.default_rng(0)
    covered = set().union(*(_kinds(to_spec(factory(dim, rng, np.float64))) for _, factory, dim in ALL_CASES))
    assert covered == set(specs.FLOW_KINDS), f"kinds without a save/load case: {set(specs.FLOW_KINDS) - covered}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("name", "factory", "dim"), ALL_CASES, ids=[case[0] for case in ALL_CASES])
def test_every_layer_saves_and_loads_exactly(tmp_path: Path, name: str, factory, dim: int, dtype: type) -> None:
    rng = np.random.default_rng(1)
    flow = factory(dim, rng, dtype)
    for parameter_name, value, _ in flow.named_parameters():  # nothing at its initial value
        value[...] = (
            rng.uniform(0.5, 1.5, value.shape) if "running_var" in parameter_name else rng.normal(0, 0.4, value.shape)
        )
    model = FlowModel(flow, StandardNormal())
    save_model(model, tmp_path / name)
    loaded = load_model(tmp_path / name)

    assert type(loaded.flow) is type(flow)
    assert to_spec(loaded.flow) == to_spec(flow)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key], value)
        assert loaded.state_dict()[key].dtype == np.dtype(dtype)
    x = _input(flow, dim, np.random.default_rng(2), dtype)
    if any(isinstance(module, Dequantize) for module in flow.modules()):  # noise drawn from the layer's seed
        for module in [*flow.modules(), *loaded.flow.modules()]:
            if isinstance(module, Dequantize):
                module.reseed(9)
    np.testing.assert_array_equal(loaded.log_prob(x), model.log_prob(x))


@pytest.mark.parametrize("layer", [Planar, Radial])
def test_planar_and_radial_models_save_and_load(tmp_path: Path, layer: type) -> None:
    rng = np.random.default_rng(3)
    flow = Sequential([layer(3, rng=rng), Inverse(layer(3, rng=rng)), layer(3, rng=rng)])
    model = FlowModel(flow)
    save_model(model, tmp_path)
    x = rng.normal(size=(5, 3))
    np.testing.assert_array_equal(load_model(tmp_path).log_prob(x), model.log_prob(x))


def test_a_spec_asking_for_more_parameters_than_the_weights_hold_is_refused() -> None:
    with pytest.raises(ModelFileError, match="more than 10 parameters"):
        flow_from_spec({"kind": "planar", "dim": 100}, max_parameters=10)


def test_a_new_layer_joins_the_format_with_its_class_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What README's "how to add a layer" says: a decorator and two methods; nothing else is edited."""
    monkeypatch.setattr(specs, "FLOW_KINDS", dict(specs.FLOW_KINDS))
    monkeypatch.setattr(specs, "SPEC_KEYS", dict(specs.SPEC_KEYS))
    monkeypatch.setattr(specs, "_SAVABLE", set(specs._SAVABLE))

    @register_flow("shift", "dim", "offset")
    class Shift(Flow):
        """``z = x + offset``: log-det 0."""

        def __init__(self, dim: int, offset: float) -> None:
            super().__init__(dim)
            self.offset = offset

        def spec(self, where: str = "flow") -> dict:
            return {"kind": "shift", "dim": self.dim, "offset": self.offset}

        @classmethod
        def from_spec(cls, read: SpecReader) -> Shift:
            return cls(read.dim(), read.real("offset"))

        def _forward(self, x):
            return x + self.offset, np.zeros(x.shape[0], dtype=x.dtype)

        def _inverse(self, z):
            return z - self.offset, np.zeros(z.shape[0], dtype=z.dtype)

        def _backward(self, d_out, d_logdet):
            return d_out

    model = FlowModel(Sequential([Shift(2, 0.5), Inverse(Shift(2, -1.5))]))
    save_model(model, tmp_path)
    x = np.random.default_rng(0).normal(size=(4, 2))
    np.testing.assert_array_equal(load_model(tmp_path).log_prob(x), model.log_prob(x))
    with pytest.raises(ValueError, match="registered already"):
        register_flow("shift")(type("Other", (Flow,), {}))
    config = (tmp_path / "model.json").read_text().replace('"offset": 0.5', '"offset": "half"')
    (tmp_path / "model.json").write_text(config)
    with pytest.raises(ModelFileError, match=r"flow\.flows\[0\]\.offset: expected a number"):
        load_model(tmp_path)
