"""Model weights as ``.safetensors``, the field's safe tensor format, read and written with NumPy alone.

The format (https://github.com/huggingface/safetensors, "Format")::

    8 bytes    N, little-endian unsigned 64-bit: the length of the header
    N bytes    a UTF-8 JSON object: {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
               ..., "__metadata__": {str: str}} (optional metadata), padded with spaces
    the rest   the byte buffer: every tensor's bytes, little-endian, C order, at [begin, end) of the buffer

Nothing in it is executable, so reading it can never run code (unlike a pickle). The reader here
is strict, so a damaged or hostile file is refused with a message naming the problem rather than
read wrongly: the header length is capped and must fit in the file; the JSON must be an object with
no duplicate keys and no NaN/Infinity constants; every entry has exactly the three keys, a known
dtype, a shape of non-negative integers, and offsets that match ``prod(shape) · itemsize``; the
tensors tile the buffer exactly (no gap, no overlap, nothing after the last); metadata maps strings
to strings. The checks are those of the reference implementation's ``SafeTensors::deserialize``.

PyTorch users read these files by name: ``safetensors.torch.load_file(path)`` (README, "Model files").
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from nflow_np.files.safe import atomic_write

MAX_HEADER_BYTES = 100_000_000
"""The reference implementation's cap on the header (a larger ``N`` is refused before anything is read)."""
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
"""safetensors dtype names and the NumPy dtypes they read as (BF16 and the float8 kinds have no NumPy dtype)."""
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsError(ValueError):
    """A ``.safetensors`` file (or bytes) that is not a valid one; the message says what is wrong."""


def encode(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """The ``.safetensors`` bytes of ``tensors`` (stored in name order) and string ``metadata``.

    Raises
    ------
    TypeError
        A name or metadata entry that is not a string, or an array of a dtype the format has no name for.
    """
    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    chunks, offset = [], 0
    for name in sorted(tensors):
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise TypeError(f"a tensor name must be a non-empty string other than __metadata__, got {name!r}")
        array = np.asarray(tensors[name])
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in _NAMES:
            raise TypeError(f"tensor {name!r}: dtype {array.dtype} has no safetensors name")
        data = np.ascontiguousarray(array, dtype=dtype).tobytes()
        offsets = [offset, offset + len(data)]
        header[name] = {"dtype": _NAMES[dtype], "shape": list(array.shape), "data_offsets": offsets}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the buffer starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise SafetensorsError(f"the header names {key!r} twice")
        seen[key] = value
    return seen


def _refuse_constant(name: str) -> None:
    raise SafetensorsError(f"the header holds the non-JSON constant {name}")


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def decode(data: bytes, where: str = "safetensors data") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (read-only arrays over ``data``, no copy) and metadata of ``.safetensors`` bytes.

    Raises
    ------
    SafetensorsError
        Anything that is not a valid file (module docstring); ``where`` names it in the message.
    """
    view = memoryview(data)
    if len(view) < 8:
        raise SafetensorsError(f"{where}: {len(view)} bytes, too short for the 8-byte header length")
    (length,) = struct.unpack("<Q", view[:8])
    if length > MAX_HEADER_BYTES:
        raise SafetensorsError(f"{where}: header length {length} exceeds the cap of {MAX_HEADER_BYTES} bytes")
    if 8 + length > len(view):
        raise SafetensorsError(f"{where}: header length {length} runs past the end of the {len(view)}-byte file")
    raw = bytes(view[8 : 8 + length])
    if not raw.startswith(b"{"):
        raise SafetensorsError(f"{where}: the header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise SafetensorsError(f"{where}: the header is not valid UTF-8 JSON ({error})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{where}: the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{where}: __metadata__ must map strings to strings")
    buffer = view[8 + length :]
    entries = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"{where}: tensor {name!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise SafetensorsError(f"{where}: tensor {name!r} has dtype {dtype!r}; readable: {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(_integer(size) for size in shape):
            raise SafetensorsError(f"{where}: tensor {name!r} has shape {shape!r}, not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_integer(o) for o in offsets)):
            raise SafetensorsError(f"{where}: tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
        begin, end = offsets
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise SafetensorsError(
                f"{where}: tensor {name!r} of shape {shape} and dtype {dtype} needs {expected} bytes, its offsets "
                f"[{begin}, {end}] span {end - begin}"
            )
        entries.append((begin, end, name, DTYPES[dtype], tuple(shape)))
    entries.sort()
    position = 0
    for begin, end, name, _, _ in entries:
        if begin != position:
            what = "overlaps the one before" if begin < position else f"leaves a gap of {begin - position} bytes"
            raise SafetensorsError(f"{where}: tensor {name!r} at [{begin}, {end}] {what}")
        position = end
    if position != len(buffer):
        raise SafetensorsError(f"{where}: the tensors cover {position} bytes of a {len(buffer)}-byte buffer")
    tensors = {}
    for begin, end, name, dtype, shape in entries:
        array = np.frombuffer(buffer[begin:end], dtype=dtype).reshape(shape)
        tensors[name] = array.astype(dtype.newbyteorder("="), copy=False)
    return tensors, metadata


def save(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` and ``metadata`` to ``path`` atomically (a temporary file renamed in); return ``path``."""
    return atomic_write(path, encode(tensors, metadata))


def load(path: str | os.PathLike, max_bytes: int = 4 * 2**30) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of the ``.safetensors`` file ``path``.

    Only a regular file is read (a FIFO, a device or a symbolic link is refused, so nothing hangs or
    leaves the folder), and only up to ``max_bytes``.

    Raises
    ------
    SafetensorsError
        Not a regular file, larger than ``max_bytes``, or not a valid file (:func:`decode`).
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        raise SafetensorsError(f"{path}: cannot be opened as a regular file ({error.strerror})") from None
    with os.fdopen(descriptor, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SafetensorsError(f"{path}: not a regular file")
        if info.st_size > max_bytes:
            raise SafetensorsError(f"{path}: {info.st_size} bytes, over the limit of {max_bytes}")
        data = file.read(max_bytes + 1)
    tensors, metadata = decode(data, str(path))
    return {name: array.copy() for name, array in tensors.items()}, metadata
