"""Model files: a folder holding ``model.npz`` (the parameters) and ``model.json`` (the architecture).

``model.npz`` stores :meth:`~nflow_np.module.Module.state_dict` (every parameter under its
qualified name, e.g. ``flow.0.net.0.W``). ``model.json`` stores what is needed to rebuild the
model before those arrays are copied in::

    {"format_version": 1, "dtype": "float64", "dim": 2, "base": "normal",
     "flow": {"kind": "sequential", "flows": [{"kind": "affine_coupling", "mask": [true, false],
              "hidden": [64, 64], "activation": "relu"}, ...]},
     "npz_sha256": "…", "metadata": {...}}

Flow kinds: ``additive_coupling`` and ``affine_coupling`` (``mask``, ``hidden``, ``activation``),
``rescale`` and ``reverse`` (``dim``), ``permutation`` (``perm``), ``sequential`` (``flows``),
``inverse`` (``flow``); image flows (``docs/images.md``): ``squeeze`` (``shape``), ``factor_out``
(``dim``, ``flow``), ``batch_norm`` (``dim``, ``momentum``, ``eps``, ``channels``), ``actnorm`` (``dim``,
``initialized``), ``dequantize`` (``dim``, ``levels``, ``seed``), ``scale`` (``dim``, ``factor``),
``logit`` (``dim``, ``alpha``).

Each file is written atomically (temporary file, fsync, rename), the weights first. The JSON holds
the SHA-256 of the weights it belongs to, so if a crash between the two renames leaves new weights
beside an old config, loading reports the mismatch and does not build a model from the pair.
Loading checks everything (JSON types, kinds, dimensions, dtype, array names, shapes and dtypes)
before any parameter is written. Every problem with the files raises :class:`ModelFileError`.

Hostile files: both files must be regular files inside the folder (a symbolic link is refused, so a
folder cannot point the loader elsewhere); the JSON may be at most :data:`MAX_CONFIG_BYTES`; ``.npz``
archives are opened with ``allow_pickle=False`` and every member's declared size is checked against
the shape the config implies *before* it is decompressed; the config may not describe more parameters
than the weights file can hold (checked before anything is allocated), nor a dimension above
:data:`MAX_DIM`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import secrets
import stat
import zipfile
import zlib
from pathlib import Path

import numpy as np

from nflow_np.distributions import BASE_DISTRIBUTIONS
from nflow_np.flows import (
    AdditiveCoupling,
    AffineCoupling,
    Coupling,
    Flow,
    Inverse,
    Permutation,
    Rescale,
    Reverse,
    Sequential,
)
from nflow_np.flows.coupling_law import COUPLING_LAWS
from nflow_np.flows.image import FactorOut, Squeeze
from nflow_np.flows.normalization import ActNorm, BatchNorm
from nflow_np.flows.preprocessing import Dequantize, Logit, Scale
from nflow_np.model import FlowModel
from nflow_np.module import as_float_dtype
from nflow_np.nn import ACTIVATIONS, MLP

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.npz"
CONFIG_FILE = "model.json"
MAX_CONFIG_BYTES = 64 * 2**20
"""Largest ``model.json`` (or checkpoint description) the loader reads: far above any real model's."""
MAX_DIM = 2**24
"""Largest data dimension a file may describe (a parameter-free layer of that size is still cheap)."""
MAX_DEPTH = 64
"""Deepest nesting of JSON objects and lists in a flow spec. Real models use about ten levels; a much
deeper one would build, then exhaust the interpreter's stack at its first forward pass."""
_NPY_HEADER_ALLOWANCE = 2**16  # an .npy header is at most 64 KiB (format 1.0), so member size <= header + data

# what zipfile / np.load raise on a damaged archive (RuntimeError includes zipfile's NotImplementedError
# for unknown compression or encryption; MemoryError: a damaged header claiming a huge shape)
ARCHIVE_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, ValueError, KeyError, EOFError, RuntimeError, MemoryError)
_CONFIG_KEYS = {"format_version", "dtype", "dim", "base", "flow", "npz_sha256", "metadata"}
_COUPLING_KEYS = {"kind", "mask", "hidden", "activation"}
_SPEC_KEYS = {
    "additive_coupling": _COUPLING_KEYS,
    "affine_coupling": _COUPLING_KEYS,
    "rescale": {"kind", "dim"},
    "permutation": {"kind", "perm"},
    "reverse": {"kind", "dim"},
    "sequential": {"kind", "flows"},
    "inverse": {"kind", "flow"},
    # image flows (docs/images.md)
    "squeeze": {"kind", "shape"},
    "factor_out": {"kind", "dim", "flow"},
    "batch_norm": {"kind", "dim", "momentum", "eps", "channels"},
    "actnorm": {"kind", "dim", "initialized"},
    "dequantize": {"kind", "dim", "levels", "seed"},
    "scale": {"kind", "dim", "factor"},
    "logit": {"kind", "dim", "alpha"},
}


class ModelFileError(ValueError):
    """A model folder is missing, malformed or inconsistent; the message names the file and the problem."""


# -- flow <-> spec -------------------------------------------------------------------------------
def flow_to_spec(flow: Flow) -> dict:
    """Describe ``flow`` as a JSON-ready nested dict (its parameters are not included).

    Parameters
    ----------
    flow : Flow
        Built from :class:`Coupling` (and its additive/affine subclasses) with an :class:`MLP` net,
        :class:`Rescale`, :class:`Permutation`, :class:`Reverse`, :class:`Sequential`, :class:`Inverse`.

    Returns
    -------
    dict
        The spec; :func:`flow_from_spec` rebuilds an equivalent flow from it.

    Raises
    ------
    TypeError
        A layer type the format cannot describe (a subclass, or a coupling whose net is not an MLP).
    """
    return _to_spec(flow, "flow")


def _to_spec(flow: Flow, where: str) -> dict:
    # exact types: a subclass may behave differently, and the file could not say how
    kind = type(flow)
    if kind in (Coupling, AdditiveCoupling, AffineCoupling):
        net = flow.net
        if type(net) is not MLP:
            raise TypeError(f"{where}: cannot save a coupling whose net is a {type(net).__name__}; only MLP nets")
        out = COUPLING_LAWS[flow.law].out_features(flow.d2)
        if net.sizes[0] != flow.d1 or net.sizes[-1] != out:
            raise ValueError(
                f"{where}: the MLP maps {net.sizes[0]} -> {net.sizes[-1]}, the coupling needs {flow.d1} -> {out}"
            )
        return {
            "kind": f"{flow.law}_coupling",
            "mask": flow.mask.tolist(),
            "hidden": net.sizes[1:-1],
            "activation": net.activation,
        }
    if kind is Rescale:
        return {"kind": "rescale", "dim": flow.dim}
    if kind is Reverse:
        return {"kind": "reverse", "dim": flow.dim}
    if kind is Permutation:
        return {"kind": "permutation", "perm": flow.perm.tolist()}
    if kind is Sequential:
        return {"kind": "sequential", "flows": [_to_spec(f, f"{where}.flows[{i}]") for i, f in enumerate(flow.flows)]}
    if kind is Inverse:
        return {"kind": "inverse", "flow": _to_spec(flow.flow, f"{where}.flow")}
    if kind is Squeeze:
        return {"kind": "squeeze", "shape": list(flow.shape)}
    if kind is FactorOut:
        return {"kind": "factor_out", "dim": flow.dim, "flow": _to_spec(flow.flow, f"{where}.flow")}
    if kind is BatchNorm:
        spec = {"kind": "batch_norm", "dim": flow.dim, "momentum": flow.momentum, "eps": flow.eps}
        return spec | {"channels": flow.channels}
    if kind is ActNorm:
        return {"kind": "actnorm", "dim": flow.dim, "initialized": flow.initialized}
    if kind is Dequantize:
        return {"kind": "dequantize", "dim": flow.dim, "levels": flow.levels, "seed": flow.seed}
    if kind is Scale:
        return {"kind": "scale", "dim": flow.dim, "factor": flow.factor}
    if kind is Logit:
        return {"kind": "logit", "dim": flow.dim, "alpha": flow.alpha}
    raise TypeError(f"{where}: cannot save a {kind.__name__}; the model format knows {', '.join(_SPEC_KEYS)}")


def flow_from_spec(spec: dict, dtype: object = np.float64, max_parameters: int | None = None) -> Flow:
    """Build the flow described by ``spec`` (from :func:`flow_to_spec`), freshly initialised.

    Parameters
    ----------
    spec : dict
        A flow spec, typically read from ``model.json``.
    dtype : float32 or float64
        dtype of the parameters.
    max_parameters : int, optional
        Refuse (before allocating anything) a spec that needs more scalar parameters than this;
        the loaders pass what the weights file could hold, so a hostile spec cannot exhaust memory.

    Returns
    -------
    Flow

    Raises
    ------
    ModelFileError
        The spec is malformed or too large: the message gives the path inside it (``flow.flows[3].mask``).
    """
    if _nesting(spec) > MAX_DEPTH:
        raise ModelFileError(f"flow: nested deeper than {MAX_DEPTH} levels")
    return _from_spec(spec, as_float_dtype(dtype), "flow", _Budget(max_parameters))


def _nesting(value: object) -> int:
    """Deepest nesting of dicts and lists in ``value``, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


class _Budget:
    """Counts the parameters a spec asks for, layer by layer, and refuses once they exceed ``limit``."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0

    def take(self, count: int, where: str) -> None:
        self.used += count
        if self.limit is not None and self.used > self.limit:
            raise ModelFileError(
                f"{where}: the flow needs more than {self.limit} parameters, more than the weights file can hold"
            )


def _coupling_parameters(kind: str, mask: list, hidden: list) -> int:
    """Number of parameters of a coupling with this mask and these hidden widths (MLP net)."""
    d1 = sum(mask)
    d2 = len(mask) - d1
    law = COUPLING_LAWS[kind.removesuffix("_coupling")]
    sizes = [d1, *hidden, law.out_features(d2)]
    weights = sum(n_in * n_out + n_out for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True))
    return weights + (d2 if law.has_scale else 0)


def _from_spec(spec: object, dtype: np.dtype, where: str, budget: _Budget) -> Flow:
    if not isinstance(spec, dict):
        raise ModelFileError(f"{where}: expected an object, got {type(spec).__name__}")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in _SPEC_KEYS:
        raise ModelFileError(f"{where}: unknown kind {kind!r}; known: {', '.join(_SPEC_KEYS)}")
    _check_keys(spec, _SPEC_KEYS[kind], where)
    try:
        if kind in ("additive_coupling", "affine_coupling"):
            mask = _list_of(spec["mask"], bool, f"{where}.mask")
            hidden = _list_of(spec["hidden"], int, f"{where}.hidden", minimum=1)
            activation = spec["activation"]
            if not isinstance(activation, str) or activation not in ACTIVATIONS:
                raise ModelFileError(f"{where}.activation: unknown {activation!r}; known: {', '.join(ACTIVATIONS)}")
            budget.take(_coupling_parameters(kind, mask, hidden), where)
            coupling = AffineCoupling if kind == "affine_coupling" else AdditiveCoupling
            mask = np.array(mask, dtype=bool)
            return coupling(len(mask), mask=mask, hidden=hidden, activation=activation, dtype=dtype)
        if kind == "rescale":
            dim = _int(spec["dim"], f"{where}.dim", minimum=1, maximum=MAX_DIM)
            budget.take(dim, where)
            return Rescale(dim, dtype=dtype)
        if kind == "reverse":
            return Reverse(_int(spec["dim"], f"{where}.dim", minimum=1, maximum=MAX_DIM))
        if kind == "permutation":
            return Permutation(np.array(_list_of(spec["perm"], int, f"{where}.perm", minimum=0), dtype=np.int64))
        if kind == "sequential":
            flows = _list_of(spec["flows"], dict, f"{where}.flows")
            return Sequential([_from_spec(s, dtype, f"{where}.flows[{i}]", budget) for i, s in enumerate(flows)])
        if kind == "inverse":
            return Inverse(_from_spec(spec["flow"], dtype, f"{where}.flow", budget))
        return _image_flow_from_spec(kind, spec, dtype, where, budget)
    except ModelFileError:
        raise
    except (ValueError, TypeError, OverflowError) as error:  # a constructor refused the values
        raise ModelFileError(f"{where}: {error}") from error


def _image_flow_from_spec(kind: str, spec: dict, dtype: np.dtype, where: str, budget: _Budget) -> Flow:
    """The image-flow kinds (``squeeze`` … ``logit``); keys already checked by :func:`_from_spec`."""
    if kind == "squeeze":
        shape = _list_of(spec["shape"], int, f"{where}.shape", minimum=1)
        return Squeeze(tuple(_int(v, f"{where}.shape", minimum=1, maximum=MAX_DIM) for v in shape))
    dim = _int(spec["dim"], f"{where}.dim", minimum=1, maximum=MAX_DIM)
    if kind == "factor_out":
        return FactorOut(dim, _from_spec(spec["flow"], dtype, f"{where}.flow", budget))
    if kind == "batch_norm":
        channels = _int(spec["channels"], f"{where}.channels", minimum=1, maximum=dim)
        budget.take(4 * channels, where)
        momentum, eps = _real(spec["momentum"], f"{where}.momentum"), _real(spec["eps"], f"{where}.eps")
        return BatchNorm(dim, momentum, eps, dtype, channels=channels)
    if kind == "actnorm":
        if not isinstance(spec["initialized"], bool):
            raise ModelFileError(f"{where}.initialized: expected true or false, got {spec['initialized']!r}")
        budget.take(2 * dim, where)
        layer = ActNorm(dim, dtype=dtype)
        layer.initialized = spec["initialized"]
        return layer
    if kind == "dequantize":
        levels = _int(spec["levels"], f"{where}.levels", minimum=2)
        return Dequantize(dim, levels, seed=_int(spec["seed"], f"{where}.seed", minimum=0))
    if kind == "scale":
        return Scale(dim, _real(spec["factor"], f"{where}.factor"))
    return Logit(dim, _real(spec["alpha"], f"{where}.alpha"))


def _real(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelFileError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _check_keys(obj: dict, expected: set[str], where: str) -> None:
    missing, unexpected = sorted(expected - set(obj)), sorted(set(obj) - expected)
    if missing or unexpected:
        raise ModelFileError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")


def _int(value: object, where: str, minimum: int, maximum: int | None = None) -> int:
    # bool is an int subclass; JSON true is not a size
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ModelFileError(f"{where}: expected an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ModelFileError(f"{where}: {value} is above the largest supported value {maximum}")
    return value


def _list_of(value: object, kind: type, where: str, minimum: int = 0) -> list:
    if not isinstance(value, list):
        raise ModelFileError(f"{where}: expected a list, got {type(value).__name__}")
    for i, item in enumerate(value):
        if kind is int:
            _int(item, f"{where}[{i}]", minimum)
        elif not isinstance(item, kind):
            raise ModelFileError(f"{where}[{i}]: expected {kind.__name__}, got {item!r}")
    return value


# -- the model description shared by model files and checkpoints ------------------------------
MODEL_KEYS = ("dtype", "dim", "base", "flow")
"""The fields of ``model.json`` (and of a checkpoint's ``model`` entry) that describe the architecture."""


def describe_model(model: FlowModel) -> dict:
    """``{"dtype", "dim", "base", "flow"}``: what :func:`model_from_description` rebuilds ``model`` from.

    Raises
    ------
    TypeError, ValueError
        A layer or base the format cannot describe, or parameters of mixed dtypes.
    """
    spec = flow_to_spec(model.flow)
    base = [name for name, cls in BASE_DISTRIBUTIONS.items() if type(model.base) is cls]
    if not base:
        raise TypeError(f"cannot save base distribution {type(model.base).__name__}; known: {list(BASE_DISTRIBUTIONS)}")
    dtypes = {value.dtype for _, value in model.named_state()}
    if len(dtypes) > 1:
        raise ValueError(f"parameters have mixed dtypes {sorted(map(str, dtypes))}; call model.astype(...) first")
    dtype = dtypes.pop() if dtypes else np.dtype(np.float64)
    return {"dtype": str(dtype), "dim": model.dim, "base": base[0], "flow": spec}


def check_description(description: dict, where: str) -> None:
    """Check the scalar fields of a model description (the flow spec is checked when it is built).

    Raises
    ------
    ModelFileError
    """
    if not isinstance(description["dtype"], str) or description["dtype"] not in ("float32", "float64"):
        raise ModelFileError(f"{where}: dtype must be 'float32' or 'float64', got {description['dtype']!r}")
    _int(description["dim"], f"{where}: dim", minimum=1, maximum=MAX_DIM)
    if not isinstance(description["base"], str) or description["base"] not in BASE_DISTRIBUTIONS:
        raise ModelFileError(
            f"{where}: unknown base {description['base']!r}; known: {', '.join(BASE_DISTRIBUTIONS)}"
        )


def model_from_description(description: dict, where: str, max_parameters: int | None = None) -> FlowModel:
    """Build a freshly initialised model from a checked description (see :func:`check_description`).

    Parameters
    ----------
    description : dict
        ``dtype``, ``dim``, ``base``, ``flow``.
    where : str
        The file it comes from, for error messages.
    max_parameters : int, optional
        Passed to :func:`flow_from_spec`.

    Raises
    ------
    ModelFileError
    """
    try:
        flow = flow_from_spec(description["flow"], description["dtype"], max_parameters)
    except ModelFileError as error:
        raise ModelFileError(f"{where}: {error}") from error
    except (MemoryError, RecursionError) as error:
        raise ModelFileError(f"{where}: the flow it describes is too large or deep to build") from error
    if flow.dim != description["dim"]:
        raise ModelFileError(f"{where}: dim is {description['dim']} but the flow works in dimension {flow.dim}")
    return FlowModel(flow, BASE_DISTRIBUTIONS[description["base"]]())


# -- files ---------------------------------------------------------------------------------------
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
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def save_model(model: FlowModel, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Save ``model`` as ``directory/model.npz`` and ``directory/model.json`` (created if needed).

    Parameters
    ----------
    model : FlowModel
        Its flow must be describable by :func:`flow_to_spec`; all parameters must share one dtype.
    directory : str or os.PathLike
    metadata : dict, optional
        Anything JSON-serialisable (finite numbers only), stored under ``"metadata"`` and returned
        by :func:`read_config`.

    Returns
    -------
    pathlib.Path
        ``directory``.

    Raises
    ------
    TypeError, ValueError
        Before anything is written: an unsupported layer, mixed dtypes, unserialisable metadata.
    """
    directory = Path(directory)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    description = describe_model(model)
    buffer = io.BytesIO()
    np.savez(buffer, **model.state_dict())
    weights = buffer.getvalue()
    config = {
        "format_version": FORMAT_VERSION,
        **description,
        "npz_sha256": hashlib.sha256(weights).hexdigest(),
        "metadata": metadata,
    }
    try:
        text = json.dumps(config, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise type(error)(f"metadata cannot be written as JSON: {error}") from error
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_FILE, weights)
    atomic_write(directory / CONFIG_FILE, text.encode("utf-8"))
    return directory


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


def read_config(directory: str | os.PathLike) -> dict:
    """Read and check ``directory/model.json`` (the flow spec itself is checked when it is built).

    Parameters
    ----------
    directory : str or os.PathLike

    Returns
    -------
    dict
        ``format_version``, ``dtype``, ``dim``, ``base``, ``flow``, ``npz_sha256``, ``metadata``.

    Raises
    ------
    ModelFileError
    """
    path = Path(directory) / CONFIG_FILE
    data = read_file(path, MAX_CONFIG_BYTES, hint=f" (is {directory} a folder written by save_model?)")
    config = parse_json(data, path)
    version = config.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: format_version {version!r} is not supported (this version reads {FORMAT_VERSION})"
        )
    _check_keys(config, _CONFIG_KEYS, str(path))
    check_description(config, str(path))
    sha = config["npz_sha256"]
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ModelFileError(f"{path}: npz_sha256 must be 64 lowercase hex digits, got {sha!r}")
    if not isinstance(config["metadata"], dict):
        raise ModelFileError(f"{path}: metadata must be an object, got {type(config['metadata']).__name__}")
    return config


def parse_json(data: bytes, path: Path) -> dict:
    """Decode UTF-8 JSON ``data`` holding one object; any problem is a :class:`ModelFileError`."""
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ModelFileError(f"{path}: cannot read: {error}") from error
    except (json.JSONDecodeError, RecursionError) as error:
        raise ModelFileError(f"{path}: invalid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def load_model(directory: str | os.PathLike) -> FlowModel:
    """Load a model saved by :func:`save_model`.

    The whole model is built from ``model.json`` and every array of ``model.npz`` is checked
    against it (names, shapes, dtype, finiteness, checksum) before any parameter is written.

    Parameters
    ----------
    directory : str or os.PathLike

    Returns
    -------
    FlowModel

    Raises
    ------
    ModelFileError
        Anything missing, malformed or inconsistent; the message names the file and the problem.
    """
    directory = Path(directory)
    config = read_config(directory)
    weights_path = directory / WEIGHTS_FILE
    data = read_file(weights_path)  # read once: the checksum and the arrays come from the same bytes
    dtype = np.dtype(config["dtype"])
    # honest weights hold every parameter, so their size bounds what the config may ask to allocate
    stored = sum(archive_members(data, weights_path).values())
    model = model_from_description(config, str(directory / CONFIG_FILE), max_parameters=stored // dtype.itemsize)
    expected = {name: (value.shape, dtype) for name, value in model.named_state()}
    state = read_arrays(data, weights_path, expected, CONFIG_FILE)
    if hashlib.sha256(data).hexdigest() != config["npz_sha256"]:
        raise ModelFileError(
            f"{weights_path}: checksum differs from the one in {CONFIG_FILE}; the two files come from "
            "different saves (save the model again)"
        )
    model.load_state_dict(state)
    return model


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
    return state
