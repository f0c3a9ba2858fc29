"""Model files (nflow_np/io.py): exact round trips for every layer kind, and one error type for every bad file."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from nflow_np.architectures import build_model
from nflow_np.distributions import StandardLogistic, StandardNormal
from nflow_np.flows import (
    AdditiveCoupling,
    AffineCoupling,
    Coupling,
    Inverse,
    Permutation,
    Rescale,
    Reverse,
    Sequential,
)
from nflow_np.io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ModelFileError,
    flow_from_spec,
    flow_to_spec,
    load_model,
    read_config,
    save_model,
)
from nflow_np.model import FlowModel
from nflow_np.nn import Linear
from nflow_np.safetensors_io import decode, encode

DIM = 5


def every_layer_model(dtype: object, seed: int = 0) -> FlowModel:
    """A 5-D model using every layer kind (nested), with random parameters so nothing is at its initial value."""
    rng = np.random.default_rng(seed)
    odd_mask = np.array([True, False, False, True, False])
    flows = [
        AffineCoupling(DIM, parity=0, hidden=(7, 3), activation="tanh", rng=rng, dtype=dtype),
        AdditiveCoupling(DIM, mask=odd_mask, hidden=(6,), activation="leaky_relu", rng=rng, dtype=dtype),
        Coupling(DIM, "affine", parity=1, hidden=(), rng=rng, dtype=dtype),
        Rescale(DIM, dtype=dtype),
        Permutation(rng.permutation(DIM)),
        Reverse(DIM),
        Inverse(AffineCoupling(DIM, mask=~odd_mask, hidden=(4, 4), rng=rng, dtype=dtype)),
        Sequential([Reverse(DIM), Inverse(Sequential([Rescale(DIM, dtype=dtype), Permutation([4, 0, 3, 1, 2])]))]),
    ]
    model = FlowModel(Sequential(flows), StandardLogistic())
    for _, value, _ in model.named_parameters():
        value[...] = rng.normal(0.0, 0.3, size=value.shape)
    return model


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_every_layer_kind_is_exact(tmp_path: Path, dtype: type) -> None:
    model = every_layer_model(dtype)
    x = np.random.default_rng(1).normal(size=(64, DIM)).astype(dtype)
    save_model(model, tmp_path / "m", metadata={"note": "hi", "values": [1, 2.5]})

    loaded = load_model(tmp_path / "m")

    assert loaded.dtype == np.dtype(dtype)
    assert isinstance(loaded.base, StandardLogistic)
    assert flow_to_spec(loaded.flow) == flow_to_spec(model.flow)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        np.testing.assert_array_equal(restored[name], original[name])
    np.testing.assert_array_equal(loaded.log_prob(x), model.log_prob(x))
    np.testing.assert_array_equal(loaded.sample(8, np.random.default_rng(2)), model.sample(8, np.random.default_rng(2)))
    assert read_config(tmp_path / "m")["metadata"] == {"note": "hi", "values": [1, 2.5]}


def test_spec_round_trip_and_config_fields(tmp_path: Path) -> None:
    model = build_model("nice", 2, layers=3, hidden=(8,), dtype=np.float32)
    spec = flow_to_spec(model.flow)
    assert flow_to_spec(flow_from_spec(spec, np.float32)) == spec
    assert [layer["kind"] for layer in spec["flows"]] == ["additive_coupling"] * 3 + ["rescale"]

    save_model(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert (config["format_version"], config["dtype"], config["dim"], config["base"]) == (2, "float32", 2, "logistic")
    assert (config["weights_file"], len(config["sha256"]), config["metadata"]) == (WEIGHTS_FILE, 64, {})


def test_parameterless_model_round_trips(tmp_path: Path) -> None:
    model = FlowModel(Sequential([Reverse(3), Permutation([2, 0, 1])]), StandardNormal())
    x = np.random.default_rng(0).normal(size=(4, 3))
    save_model(model, tmp_path)
    np.testing.assert_array_equal(load_model(tmp_path).log_prob(x), model.log_prob(x))


def test_save_refuses_what_the_format_cannot_describe(tmp_path: Path) -> None:
    net = Linear(1, 2, np.random.default_rng(0))  # a valid net for a 2-D affine coupling, but not an MLP
    coupling = AffineCoupling(2, net=net)
    with pytest.raises(TypeError, match=r"flow\.flows\[1\].*Linear.*only MLP"):
        save_model(FlowModel(Sequential([Reverse(2), coupling])), tmp_path / "a")

    class MyRescale(Rescale):
        pass

    with pytest.raises(TypeError, match="MyRescale"):
        save_model(FlowModel(MyRescale(2)), tmp_path / "b")
    with pytest.raises(TypeError, match="metadata"):
        save_model(FlowModel(Reverse(2)), tmp_path / "c", metadata={"bad": object()})
    with pytest.raises(ValueError, match="metadata"):
        save_model(FlowModel(Reverse(2)), tmp_path / "d", metadata={"nan": float("nan")})
    assert not any(tmp_path.iterdir()), "nothing may be written when saving fails"


def test_save_leaves_no_temporary_files_and_overwrites(tmp_path: Path) -> None:
    save_model(build_model("realnvp", 2, layers=1, hidden=(4,)), tmp_path)
    second = build_model("realnvp", 2, layers=2, hidden=(4,), seed=1)
    save_model(second, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert load_model(tmp_path).num_parameters() == second.num_parameters()


def test_failed_save_keeps_the_previous_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = every_layer_model(np.float64)
    save_model(first, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(every_layer_model(np.float64, seed=5), tmp_path)
    monkeypatch.undo()

    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    x = np.random.default_rng(0).normal(size=(3, DIM))
    np.testing.assert_array_equal(load_model(tmp_path).log_prob(x), first.log_prob(x))


# -- malformed files: each raises ModelFileError naming the problem ------------------------------
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    save_model(build_model("realnvp", 2, layers=2, hidden=(4,)), tmp_path)
    return tmp_path


def edit_config(directory: Path, change: Callable) -> None:
    config = json.loads((directory / CONFIG_FILE).read_text())
    change(config)
    (directory / CONFIG_FILE).write_text(json.dumps(config))


def rewrite_weights(directory: Path, change: Callable) -> None:
    state, _ = decode((directory / WEIGHTS_FILE).read_bytes())
    state = dict(state)
    change(state)
    (directory / WEIGHTS_FILE).write_bytes(encode(state))


def test_missing_files(saved: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    with pytest.raises(ModelFileError, match="no such file"):
        load_model(tmp_path_factory.mktemp("empty") / "does-not-exist")
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelFileError, match=r"model\.safetensors: no such file"):
        load_model(saved)
    (saved / CONFIG_FILE).unlink()
    with pytest.raises(ModelFileError, match=r"model\.json: no such file"):
        load_model(saved)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ("", "invalid JSON"),
    ],
)
def test_invalid_json(saved: Path, text: str, message: str) -> None:
    (saved / CONFIG_FILE).write_text(text)
    with pytest.raises(ModelFileError, match=message):
        load_model(saved)


def _set(path: tuple, value: object) -> Callable:
    def change(config: dict) -> None:
        target = config
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set(("format_version",), 3), "format_version 3 is not supported"),
        (_set(("format_version",), "2"), "format_version '2' is not supported"),
        (_set(("format_version",), 1), r"missing keys \['npz_sha256'\], unexpected keys \['sha256', 'weights_file'\]"),
        (_set(("weights_file",), "../model.safetensors"), "weights_file must be 'model.safetensors'"),
        (_set(("dtype",), "float16"), "dtype must be 'float32' or 'float64'"),
        (_set(("dim",), 3), "dim is 3 but the flow works in dimension 2"),
        (_set(("dim",), True), "dim: expected an integer"),
        (_set(("base",), "cauchy"), "unknown base 'cauchy'"),
        (_set(("metadata",), []), "metadata must be an object"),
        (_set(("sha256",), "xyz"), "sha256 must be 64 lowercase hex digits"),
        (_set(("extra",), 1), r"unexpected keys \['extra'\]"),
        (_set(("flow", "kind"), "spline_flow"), "flow: unknown kind 'spline_flow'"),
        (_set(("flow", "kind"), "planar"), r"flow: missing keys \['dim'\], unexpected keys \['flows'\]"),
        (_set(("flow", "flows", 1, "kind"), "spline"), r"flow\.flows\[1\]: unknown kind 'spline'"),
        (_set(("flow", "flows", 0, "mask"), [1, 0]), r"flow\.flows\[0\]\.mask\[0\]: expected bool"),
        (_set(("flow", "flows", 0, "mask"), [True, True]), r"flow\.flows\[0\]: mask must leave both parts"),
        (_set(("flow", "flows", 0, "mask"), [True, False, True]), "dimension"),
        (_set(("flow", "flows", 0, "hidden"), [0]), r"hidden\[0\]: expected an integer >= 1"),
        (_set(("flow", "flows", 0, "activation"), "gelu"), "unknown 'gelu'"),
        (_set(("flow", "flows", 0, "scale"), 1.0), r"unexpected keys \['scale'\]"),
        (_set(("flow", "flows"), []), "at least one flow"),
        (_set(("flow", "flows", 1), {"kind": "reverse", "dim": 3}), "must share one dimension"),
        (_set(("flow", "flows", 1), {"kind": "permutation", "perm": [0, 0]}), "permutation"),
    ],
)
def test_malformed_config(saved: Path, change: Callable, message: str) -> None:
    edit_config(saved, change)
    with pytest.raises(ModelFileError, match=message):
        load_model(saved)


def test_wrong_dtype_in_config_is_caught_by_the_arrays(saved: Path) -> None:
    edit_config(saved, _set(("dtype",), "float32"))
    with pytest.raises(ModelFileError, match="has dtype float64, model.json says float32"):
        load_model(saved)


def _put(name: str, value: np.ndarray) -> Callable:
    return lambda state: state.update({name: value})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(_put("flow.0.scale", np.ones(3)), r"'flow\.0\.scale' has shape \(3,\)", id="shape"),
        pytest.param(_put("flow.9.extra", np.ones(1)), r"unexpected \['flow\.9\.extra'\]", id="extra"),
        pytest.param(lambda state: state.pop("flow.1.net.0.W"), r"missing \['flow\.1\.net\.0\.W'\]", id="missing"),
        pytest.param(_put("flow.0.scale", np.ones(1, dtype=np.int64)), "has dtype int64", id="integer"),
        pytest.param(_put("flow.0.scale", np.ones(1, dtype=np.float32)), "has dtype float32", id="dtype"),
        pytest.param(_put("flow.0.scale", np.array([np.nan])), "non-finite", id="nan"),
        pytest.param(_put("flow.0.scale", np.array([0.5])), "checksum differs", id="edited"),
    ],
)
def test_malformed_weights(saved: Path, change: Callable, message: str) -> None:
    rewrite_weights(saved, change)
    with pytest.raises(ModelFileError, match=message):
        load_model(saved)


@pytest.mark.parametrize("keep", [0, 10, 200, -1])
def test_truncated_weights(saved: Path, keep: int) -> None:
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[:keep])
    with pytest.raises(ModelFileError, match=r"model\.safetensors.*(too short|runs past|cover)"):
        load_model(saved)


def test_weights_that_are_not_safetensors(saved: Path) -> None:
    state, _ = decode((saved / WEIGHTS_FILE).read_bytes())
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    (saved / WEIGHTS_FILE).write_bytes(buffer.getvalue())  # the old format under the new name
    with pytest.raises(ModelFileError, match=r"not a readable \.safetensors file: .*header length"):
        load_model(saved)


def test_weights_from_another_save_are_refused(saved: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("other")
    save_model(build_model("realnvp", 2, layers=2, hidden=(4,), seed=1), other)
    (saved / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())  # same names and shapes
    with pytest.raises(ModelFileError, match="checksum differs"):
        load_model(saved)


def test_any_damaged_byte_gives_model_file_error(saved: Path) -> None:
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        path = saved / name
        original = path.read_bytes()
        for i in range(0, len(original), 13):
            damaged = bytearray(original)
            damaged[i] ^= 0x5A
            path.write_bytes(bytes(damaged))
            with pytest.raises(ModelFileError):
                load_model(saved)
        path.write_bytes(original)
    load_model(saved)


# -- size caps and hostile metadata (issue 14) ----------------------------------------------------
def test_a_huge_sparse_weights_file_is_refused_unread(saved: Path) -> None:
    with open(saved / WEIGHTS_FILE, "r+b") as file:
        file.truncate(6 * 2**30)  # 6 GiB, sparse: costs no disk, would cost 6 GiB of memory to read
    message = r"model\.safetensors: 6442450944 bytes, more than the \d+ this loader reads"
    with pytest.raises(ModelFileError, match=message):
        load_model(saved)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"seed": "abc"}, r"metadata\.seed: expected an integer >= 0, got 'abc'"),
        ({"seed": -1}, r"metadata\.seed: expected an integer >= 0"),
        ({"n_test": 0}, r"metadata\.n_test: expected an integer >= 1"),
        ({"data": 5}, r"metadata\.data: expected a string"),
        ({"image_shape": 5}, r"metadata\.image_shape: expected \[channels, height, width\], got 5"),
        ({"image_shape": [1, 1, 3]}, "do not have the model's 2 dimensions"),
        ({"image_shape": [1, 1, 2], "levels": "17"}, r"metadata\.levels: expected an integer"),
        ({"standardization": {"mean": [0, 0], "std": [1, 0]}}, "every std must be positive"),
        ({"standardization": {"mean": [0], "std": [1]}}, "expected a list of 2 numbers"),
    ],
)
def test_hostile_metadata_is_a_model_file_error(saved: Path, metadata: dict, message: str) -> None:
    edit_config(saved, _set(("metadata",), metadata))
    with pytest.raises(ModelFileError, match=message):
        read_config(saved)
    with pytest.raises(ModelFileError, match=message):
        load_model(saved)


def test_hostile_image_metadata_is_a_model_file_error_for_image_models(saved: Path) -> None:
    from nflow_np.image_models import load_image_model

    edit_config(saved, _set(("metadata",), {"image_shape": 5, "levels": 17}))
    with pytest.raises(ModelFileError, match="image_shape"):
        load_image_model(saved)


def test_extra_files_are_published_with_the_model(tmp_path: Path) -> None:
    model = build_model("realnvp", 2, layers=1, hidden=(4,))
    save_model(model, tmp_path / "m", extra_files={"summary.json": b"{}\n"})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE, "summary.json"]
    with pytest.raises(ValueError, match="not a plain file name"):
        save_model(model, tmp_path / "m", extra_files={"../escape": b""})
