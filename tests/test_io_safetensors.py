"""Model folders as format 2 (``model.safetensors``): read by the reference package and by PyTorch, hostile
headers refused, and format-1 folders (``model.npz``) still loaded, checked, and replaced whole on a save."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import to_format_1

from nflow_np.architectures import build_model
from nflow_np.flows import BatchNorm, Sequential
from nflow_np.io import CONFIG_FILE, NPZ_WEIGHTS_FILE, WEIGHTS_FILE, ModelFileError, load_model, save_model
from nflow_np.model import FlowModel

FIXTURES = Path(__file__).parent / "fixtures"
POINTS = np.random.default_rng(0).normal(size=(8, 2))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    norm = BatchNorm(2)
    norm.buffers["running_mean"][...], norm.buffers["running_var"][...] = [0.25, -0.5], [2.0, 0.5]  # buffers
    model = FlowModel(Sequential([build_model("realnvp", 2, layers=2, hidden=(4,), seed=3).flow, norm]))
    save_model(model, tmp_path)
    return tmp_path


def test_the_reference_package_reads_our_weights_by_name(saved: Path) -> None:
    from safetensors.numpy import load_file

    state = load_model(saved).state_dict()
    stored = load_file(saved / WEIGHTS_FILE)
    assert stored.keys() == state.keys() and any("running" in name for name in state)
    for name, value in state.items():
        assert stored[name].dtype == value.dtype
        np.testing.assert_array_equal(stored[name], value)


def test_pytorch_reads_our_weights_by_name(saved: Path) -> None:
    torch_safetensors = pytest.importorskip("safetensors.torch")
    stored = torch_safetensors.load_file(str(saved / WEIGHTS_FILE))
    for name, value in load_model(saved).state_dict().items():
        np.testing.assert_array_equal(stored[name].numpy(), value)


def _header(entries: dict) -> bytes:
    text = json.dumps(entries).encode()
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(struct.pack("<Q", 2**63) + b"{}", "exceeds the cap", id="huge-header-length"),
        pytest.param(struct.pack("<Q", 100) + b"{}", "runs past the end", id="header-past-end"),
        pytest.param(_header({"a": {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]}, "b": {
            "dtype": "F64", "shape": [2], "data_offsets": [8, 24]}}) + bytes(24), "overlaps", id="overlap"),
        pytest.param(_header({"a": {"dtype": "F64", "shape": [10**9], "data_offsets": [0, 8 * 10**9]}}),
                     "cover 8000000000 bytes of a 0-byte buffer", id="claims-more-than-the-file"),
        pytest.param(_header({"a": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8], "x": 1}}) + bytes(8),
                     "exactly dtype, shape and data_offsets", id="extra-key"),
        pytest.param(_header({"__metadata__": {"a": 1}}), "map strings to strings", id="metadata"),
        pytest.param(struct.pack("<Q", 2) + b"[]", "not a JSON object", id="not-an-object"),
    ],
)
def test_hostile_headers_are_refused(saved: Path, data: bytes, message: str) -> None:
    (saved / WEIGHTS_FILE).write_bytes(data)
    with pytest.raises(ModelFileError, match=rf"not a readable \.safetensors file: .*model\.safetensors: .*{message}"):
        load_model(saved)


def test_a_format_1_folder_loads_and_a_save_over_it_leaves_one_weights_file(saved: Path) -> None:
    model = load_model(saved)
    to_format_1(saved)
    assert json.loads((saved / CONFIG_FILE).read_text())["format_version"] == 1
    np.testing.assert_array_equal(load_model(saved).log_prob(POINTS), model.log_prob(POINTS))
    save_model(load_model(saved), saved)
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert json.loads((saved / CONFIG_FILE).read_text())["format_version"] == 2
    np.testing.assert_array_equal(load_model(saved).log_prob(POINTS), model.log_prob(POINTS))


def test_a_committed_old_folder_resaved_is_format_2(tmp_path: Path) -> None:
    folder = shutil.copytree(FIXTURES / "toy_every_kind_float32", tmp_path / "old")
    model = load_model(folder)
    save_model(model, folder)
    assert not (folder / NPZ_WEIGHTS_FILE).exists() and (folder / WEIGHTS_FILE).exists()
    points = np.load(folder / "points.npy")
    np.testing.assert_array_equal(load_model(folder).log_prob(points), np.load(folder / "expected_log_prob.npy"))


def _npz_put(name: str, value: np.ndarray):
    return lambda state: state.update({name: value})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(_npz_put("flow.0.scale", np.ones(3)), r"'flow\.0\.scale' has shape \(3,\)", id="shape"),
        pytest.param(_npz_put("flow.0.scale", np.array([np.nan])), "non-finite", id="nan"),
        pytest.param(_npz_put("flow.0.scale", np.array([0.5])), "checksum differs", id="edited"),
        pytest.param(lambda state: state.pop("flow.1.net.0.W"), r"missing \['flow\.1\.net\.0\.W'\]", id="missing"),
    ],
)
def test_format_1_weights_keep_their_checks(tmp_path: Path, change, message: str) -> None:
    save_model(build_model("realnvp", 2, layers=2, hidden=(4,)), tmp_path)
    to_format_1(tmp_path)
    with np.load(tmp_path / NPZ_WEIGHTS_FILE) as archive:
        state = {name: archive[name] for name in archive.files}
    change(state)
    np.savez(tmp_path / NPZ_WEIGHTS_FILE, **state)
    with pytest.raises(ModelFileError, match=rf"model\.npz.*{message}|{message}"):
        load_model(tmp_path)
