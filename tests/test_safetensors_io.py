"""nflow_np.safetensors_io against the reference ``safetensors`` package, hostile bytes, and PyTorch by name."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import randomise
from hypothesis import given, settings
from hypothesis import strategies as st

from nflow_np.architectures import build_model
from nflow_np.safetensors_io import SafetensorsError, decode, encode, load, save

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "flow.0.net.0.W": rng.standard_normal((3, 5)),
        "flow.0.scale": rng.standard_normal(4).astype(np.float32),
        "counts": np.arange(6, dtype=np.int64).reshape(2, 3),
        "empty": np.zeros((0, 2)),
        "scalar": np.array(2.5),
    }


def test_round_trip_and_agreement_with_the_reference_package(tmp_path: Path) -> None:
    original = tensors()
    data = encode(original, {"format": "nflow_np", "version": "1"})
    ours, metadata = decode(data)
    theirs = safetensors_numpy.load(data)
    assert metadata == {"format": "nflow_np", "version": "1"}
    for name, array in original.items():
        for read in (ours[name], theirs[name]):
            assert read.dtype == array.dtype and read.shape == array.shape
            np.testing.assert_array_equal(read, array)
    written_by_them = safetensors_numpy.save(original, metadata={"m": "x"})
    read, metadata = decode(written_by_them)
    assert metadata == {"m": "x"} and all(np.array_equal(read[k], v) for k, v in original.items())
    path = save(tmp_path / "w.safetensors", original)
    loaded, _ = load(path)
    assert loaded.keys() == original.keys() and loaded["flow.0.scale"].flags.writeable


def header_file(header: dict, buffer: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + buffer


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01\x00", "too short"),
        (struct.pack("<Q", 2**40) + b"{}", "exceeds the cap"),
        (struct.pack("<Q", 50) + b"{}", "runs past the end"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (struct.pack("<Q", 9) + b'{"a":NaN}', "non-JSON constant NaN"),
        (struct.pack("<Q", 14) + b'{"a":1, "a":2}', "names 'a' twice"),
        (struct.pack("<Q", 3) + b"{\xff}", "not valid UTF-8 JSON"),
        (header_file({"x": {"dtype": "F64", "shape": [2]}}), "exactly dtype, shape and data_offsets"),
        (header_file({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)), "dtype 'C64'"),
        (header_file({"x": {"dtype": "F64", "shape": [-1], "data_offsets": [0, 8]}}, bytes(8)), "not a list of sizes"),
        (header_file({"x": {"dtype": "F64", "shape": [True], "data_offsets": [0, 8]}}, bytes(8)), "list of sizes"),
        (header_file({"x": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)), "needs 16 bytes"),
        (header_file({"x": {"dtype": "F64", "shape": [1], "data_offsets": [8, 16]}}, bytes(16)), "gap of 8 bytes"),
        (header_file({"x": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]},
                      "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)), "overlaps"),
        (header_file({"x": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}, bytes(9)), "cover 8 bytes of a 9"),
        (header_file({"__metadata__": {"a": 1}}), "__metadata__ must map strings to strings"),
    ],
)
def test_hostile_bytes_are_refused_with_the_reason(data: bytes, message: str) -> None:
    with pytest.raises(SafetensorsError, match=message):
        decode(data)


@settings(max_examples=200, deadline=None)
@given(position=st.integers(0, 10**6), value=st.integers(0, 255), cut=st.integers(0, 10**6))
def test_mutated_files_are_read_exactly_or_refused(position: int, value: int, cut: int) -> None:
    data = bytearray(encode(tensors(), {"k": "v"}))
    data[position % len(data)] = value
    data = bytes(data[: len(data) - cut % 16])
    try:
        decode(data)
    except SafetensorsError:
        return
    try:
        reference = safetensors_numpy.load(data)
    except Exception:  # the reference may be stricter, e.g. about a mutated name's bytes
        return
    ours, _ = decode(data)
    assert ours.keys() == reference.keys()
    for name, array in reference.items():
        np.testing.assert_array_equal(ours[name], array)


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(SafetensorsError, match="not a regular file"):
        load(fifo)
    target = save(tmp_path / "real.safetensors", tensors())
    (tmp_path / "link.safetensors").symlink_to(target)
    with pytest.raises(SafetensorsError, match="cannot be opened as a regular file"):
        load(tmp_path / "link.safetensors")
    with pytest.raises(SafetensorsError, match="over the limit"):
        load(target, max_bytes=10)


def test_pytorch_reads_nflow_np_weights_by_name(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    model = randomise(build_model("realnvp", 2, layers=2, hidden=(8,)), np.random.default_rng(1))
    path = save(tmp_path / "model.safetensors", model.state_dict(), {"format": "nflow_np"})
    state = load_file(str(path))
    assert state.keys() == model.state_dict().keys()
    # the first coupling's net in PyTorch: nflow_np's Dense keeps W as (in, out), torch's Linear weight is (out, in)
    first, last = state["flow.0.net.0.W"], state["flow.0.net.2.W"]
    net = torch.nn.Sequential(torch.nn.Linear(*first.shape), torch.nn.ReLU(), torch.nn.Linear(*last.shape)).double()
    with torch.no_grad():
        net[0].weight.copy_(first.T)
        net[0].bias.copy_(state["flow.0.net.0.b"])
        net[2].weight.copy_(last.T)
        net[2].bias.copy_(state["flow.0.net.2.b"])
    x1 = np.random.default_rng(2).standard_normal((5, 1))
    np.testing.assert_allclose(net(torch.from_numpy(x1)).detach().numpy(), model.flow[0].net.forward(x1), rtol=1e-12)
