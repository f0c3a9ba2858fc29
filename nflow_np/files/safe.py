"""Hardened file handling: what every loader of nflow_np reads files through.

- :func:`read_file`: the bytes of a *regular* file (a symbolic link, FIFO, device or folder is
  refused without blocking), never more than a size cap;
- :func:`parse_json`: one JSON object, nesting bounded by :data:`MAX_DEPTH`, every problem a
  :class:`ModelFileError`;
- :func:`archive_members` / :func:`read_arrays`: an ``.npz`` archive opened with ``allow_pickle=False``,
  every member's declared size checked against the shape it must have *before* it is decompressed;
- :func:`atomic_write`: one file replaced whole or not at all (temporary file, fsync, rename, fsync
  of the folder).

Writes go through ``os.open``/``os.write``/``os.fsync``/``os.replace``/``os.rename``, looked up at
call time, so the tests wrap them to inject a full disk or a crash at every one of them.
"""

from __future__ import annotations

import errno
import io
import json
import os
import secrets
import stat
import zipfile
import zlib
from pathlib import Path

import numpy as np

MAX_CONFIG_BYTES = 64 * 2**20
"""Largest ``model.json`` (or checkpoint description, ``summary.json``) the loader reads: far above any real one."""
MAX_WEIGHTS_BYTES = 4 * 2**30
"""Largest weights file (``model.safetensors``, an old ``model.npz``, a checkpoint, ``gmm.npz``) a loader
reads: 4 GiB, about 500 million float64 parameters. A larger (e.g. sparse) file is refused from its size,
before a byte is read."""
MAX_DEPTH = 64
"""Deepest nesting of JSON objects and lists in a flow spec. Real models use about ten levels; a much
deeper one would build, then exhaust the interpreter's stack at its first forward pass."""
_NPY_HEADER_ALLOWANCE = 2**16  # an .npy header is at most 64 KiB (format 1.0), so member size <= header + data

# what zipfile / np.load raise on a damaged archive (RuntimeError includes zipfile's NotImplementedError
# for unknown compression or encryption; MemoryError: a damaged header claiming a huge shape)
ARCHIVE_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, ValueError, KeyError, EOFError, RuntimeError, MemoryError)


class ModelFileError(ValueError):
    """A model folder is missing, malformed or inconsistent; the message names the file and the problem."""


def nesting(value: object) -> int:
    """Deepest nesting of dicts and lists in ``value``, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``.

    The bytes go to a temporary file in the same folder, are flushed and fsync'ed, and the file is
    renamed over ``path`` (``os.replace`` is atomic within a file system); on failure the temporary
    file is removed.

    Parameters
    ----------
    path : str or os.PathLike
    data : bytes

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # os.open with mode 0o666 (not mkstemp's 0o600) so the final file gets the usual umask permissions
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte of ``data`` is written (a short write is not an error; ENOSPC is)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_folder(folder: Path) -> None:
    """Make the renames inside ``folder`` durable (POSIX; a no-op elsewhere)."""
    if os.name == "posix":
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_file(path: Path, limit: int | None = None, hint: str = "") -> bytes:
    """The bytes of ``path``, which must be a regular file (not a symbolic link, FIFO or device).

    Parameters
    ----------
    path : pathlib.Path
    limit : int, optional
        Refuse a file larger than this many bytes.
    hint : str
        Appended to the "no such file" message.

    Raises
    ------
    ModelFileError
        Missing, a symbolic link, not a regular file, too large, or unreadable.
    """
    # O_NOFOLLOW: a link named model.npz could point anywhere on the machine; O_NONBLOCK: opening
    # a FIFO must not hang (it is refused by the regular-file check right after)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file{hint}") from None
    except OSError as error:
        if error.errno == errno.ELOOP or path.is_symlink():
            raise ModelFileError(f"{path}: is a symbolic link; model files must be regular files") from None
        raise ModelFileError(f"{path}: cannot read: {error}") from error
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ModelFileError(f"{path}: not a regular file")
        if limit is not None and info.st_size > limit:
            raise ModelFileError(f"{path}: {info.st_size} bytes, more than the {limit} this loader reads")
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read() if limit is None else file.read(limit + 1)
    except OSError as error:
        raise ModelFileError(f"{path}: cannot read: {error}") from error
    finally:
        os.close(fd)
    if limit is not None and len(data) > limit:  # the file grew while being read
        raise ModelFileError(f"{path}: more than the {limit} bytes this loader reads")
    return data


def parse_json(data: bytes, path: Path, max_depth: int | None = None) -> dict:
    """Decode UTF-8 JSON ``data`` holding one object; any problem is a :class:`ModelFileError`.

    ``max_depth``: refuse objects nested deeper than this (see :func:`nesting`).
    """
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ModelFileError(f"{path}: cannot read: {error}") from error
    except (json.JSONDecodeError, RecursionError) as error:
        raise ModelFileError(f"{path}: invalid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if max_depth is not None and nesting(config) > max_depth:
        raise ModelFileError(f"{path}: nested deeper than {max_depth} levels")
    return config


def archive_members(data: bytes, path: Path) -> dict[str, int]:
    """``{array name: declared uncompressed size}`` of the ``.npz`` archive ``data``; nothing is decompressed.

    Raises
    ------
    ModelFileError
        Not a zip archive, or a member that is not an ``.npy`` file (or appears twice).
    """
    if data[:6] == b"\x93NUMPY":
        raise ModelFileError(f"{path}: not an .npz archive (it holds a single .npy array)")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except ARCHIVE_ERRORS as error:
        raise ModelFileError(f"{path}: not a readable .npz archive ({type(error).__name__}: {error})") from error
    sizes: dict[str, int] = {}
    for member in members:
        name = member.filename.removesuffix(".npy")
        if name == member.filename or name in sizes:
            raise ModelFileError(f"{path}: member {member.filename!r} is not one .npy array of an .npz archive")
        sizes[name] = member.file_size
    return sizes


def read_arrays(data: bytes, path: Path, expected: dict[str, tuple], source: str) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` archive ``data`` after checking them against ``expected``.

    Names are checked before anything is read, and each member's declared size before it is
    decompressed, so a hostile archive cannot make the loader allocate more than ``expected``
    implies. Arrays are read with ``allow_pickle=False``.

    Parameters
    ----------
    data : bytes
        The archive.
    path : pathlib.Path
        Where it comes from, for error messages.
    expected : dict[str, (tuple, numpy.dtype)]
        ``name -> (shape, dtype)`` of every array the archive must hold, and no other.
    source : str
        What ``expected`` comes from, for error messages (``"model.json"``).

    Returns
    -------
    dict[str, numpy.ndarray]
        Arrays of the expected shapes and dtypes; floating-point ones are finite.

    Raises
    ------
    ModelFileError
    """
    sizes = archive_members(data, path)
    missing, unexpected = sorted(set(expected) - set(sizes)), sorted(set(sizes) - set(expected))
    if missing or unexpected:
        raise ModelFileError(f"{path}: arrays do not match {source}: missing {missing}, unexpected {unexpected}")
    for name, (shape, dtype) in expected.items():
        largest = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize + _NPY_HEADER_ALLOWANCE
        if sizes[name] > largest:
            raise ModelFileError(f"{path}: {name!r} declares {sizes[name]} bytes; shape {shape} needs <= {largest}")
    state = {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            for name in expected:
                try:
                    state[name] = archive[name]
                except ARCHIVE_ERRORS as error:
                    raise ModelFileError(f"{path}: array {name!r} cannot be read: {error}") from error
    except ModelFileError:
        raise
    except ARCHIVE_ERRORS as error:
        raise ModelFileError(f"{path}: not a readable .npz archive ({type(error).__name__}: {error})") from error
    check_arrays(state, path, expected, source)
    return state


def _decode_tensors(data: bytes, path: Path) -> dict[str, np.ndarray]:
    from nflow_np.safetensors_io import SafetensorsError, decode

    try:
        return decode(data, str(path))[0]
    except SafetensorsError as error:
        raise ModelFileError(f"not a readable .safetensors file: {error}") from error


def tensor_sizes(data: bytes, path: Path) -> dict[str, int]:
    """``{tensor name: bytes}`` of the ``.safetensors`` bytes ``data`` (its header parsed, no data copied).

    Raises
    ------
    ModelFileError
        Not a valid ``.safetensors`` file (:func:`nflow_np.safetensors_io.decode`).
    """
    return {name: tensor.nbytes for name, tensor in _decode_tensors(data, path).items()}


def read_tensors(data: bytes, path: Path, expected: dict[str, tuple], source: str) -> dict[str, np.ndarray]:
    """The tensors of the ``.safetensors`` bytes ``data`` after checking them against ``expected``.

    The file is parsed by the strict reader :func:`nflow_np.safetensors_io.decode` (header length
    capped and inside the file, offsets tiling the buffer exactly); the tensors are views of ``data``,
    so nothing is allocated beyond the bytes already read. Then the same checks as :func:`read_arrays`:
    exactly the expected names, shapes and dtype, finite values.

    Raises
    ------
    ModelFileError
    """
    tensors = _decode_tensors(data, path)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelFileError(f"{path}: tensors do not match {source}: missing {missing}, unexpected {unexpected}")
    check_arrays(tensors, path, expected, source)
    return tensors


def check_arrays(state: dict[str, object], path: Path, expected: dict[str, tuple], source: str) -> None:
    """Check that every array of ``state`` has the ``(shape, dtype)`` of ``expected`` and finite values.

    Raises
    ------
    ModelFileError
    """
    for name, (shape, dtype) in expected.items():
        value = state[name]
        if not isinstance(value, np.ndarray):
            raise ModelFileError(f"{path}: {name!r} is not a .npy array")
        if value.dtype != dtype:
            raise ModelFileError(f"{path}: {name!r} has dtype {value.dtype}, {source} says {np.dtype(dtype)}")
        if value.shape != shape:
            raise ModelFileError(f"{path}: {name!r} has shape {value.shape}, {source} implies {shape}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ModelFileError(f"{path}: {name!r} has non-finite values")
