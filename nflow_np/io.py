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
``inverse`` (``flow``).

Each file is written atomically (temporary file, fsync, rename), the weights first. The JSON holds
the SHA-256 of the weights it belongs to, so if a crash between the two renames leaves new weights
beside an old config, loading reports the mismatch and does not build a model from the pair.
Loading checks everything (JSON types, kinds, dimensions, dtype, array names, shapes and dtypes)
before any parameter is written. Every problem with the files raises :class:`ModelFileError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
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
from nflow_np.model import FlowModel
from nflow_np.module import as_float_dtype
from nflow_np.nn import ACTIVATIONS, MLP

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.npz"
CONFIG_FILE = "model.json"

# what zipfile / np.load raise on a damaged archive (RuntimeError includes zipfile's NotImplementedError
# for unknown compression or encryption; MemoryError: a damaged header claiming a huge shape)
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, ValueError, KeyError, EOFError, RuntimeError, MemoryError)
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
    raise TypeError(f"{where}: cannot save a {kind.__name__}; the model format knows {', '.join(_SPEC_KEYS)}")


def flow_from_spec(spec: dict, dtype: object = np.float64) -> Flow:
    """Build the flow described by ``spec`` (from :func:`flow_to_spec`), freshly initialised.

    Parameters
    ----------
    spec : dict
        A flow spec, typically read from ``model.json``.
    dtype : float32 or float64
        dtype of the parameters.

    Returns
    -------
    Flow

    Raises
    ------
    ModelFileError
        The spec is malformed: the message gives the path inside it (``flow.flows[3].mask``).
    """
    return _from_spec(spec, as_float_dtype(dtype), "flow")


def _from_spec(spec: object, dtype: np.dtype, where: str) -> Flow:
    if not isinstance(spec, dict):
        raise ModelFileError(f"{where}: expected an object, got {type(spec).__name__}")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in _SPEC_KEYS:
        raise ModelFileError(f"{where}: unknown kind {kind!r}; known: {', '.join(_SPEC_KEYS)}")
    _check_keys(spec, _SPEC_KEYS[kind], where)
    try:
        if kind in ("additive_coupling", "affine_coupling"):
            mask = np.array(_list_of(spec["mask"], bool, f"{where}.mask"), dtype=bool)
            hidden = _list_of(spec["hidden"], int, f"{where}.hidden", minimum=1)
            activation = spec["activation"]
            if not isinstance(activation, str) or activation not in ACTIVATIONS:
                raise ModelFileError(f"{where}.activation: unknown {activation!r}; known: {', '.join(ACTIVATIONS)}")
            coupling = AffineCoupling if kind == "affine_coupling" else AdditiveCoupling
            return coupling(len(mask), mask=mask, hidden=hidden, activation=activation, dtype=dtype)
        if kind == "rescale":
            return Rescale(_int(spec["dim"], f"{where}.dim", minimum=1), dtype=dtype)
        if kind == "reverse":
            return Reverse(_int(spec["dim"], f"{where}.dim", minimum=1))
        if kind == "permutation":
            return Permutation(np.array(_list_of(spec["perm"], int, f"{where}.perm", minimum=0), dtype=np.int64))
        if kind == "sequential":
            flows = _list_of(spec["flows"], dict, f"{where}.flows")
            return Sequential([_from_spec(s, dtype, f"{where}.flows[{i}]") for i, s in enumerate(flows)])
        return Inverse(_from_spec(spec["flow"], dtype, f"{where}.flow"))
    except ModelFileError:
        raise
    except (ValueError, TypeError, OverflowError) as error:  # a constructor refused the values
        raise ModelFileError(f"{where}: {error}") from error


def _check_keys(obj: dict, expected: set[str], where: str) -> None:
    missing, unexpected = sorted(expected - set(obj)), sorted(set(obj) - expected)
    if missing or unexpected:
        raise ModelFileError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")


def _int(value: object, where: str, minimum: int) -> int:
    # bool is an int subclass; JSON true is not a size
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ModelFileError(f"{where}: expected an integer >= {minimum}, got {value!r}")
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
    spec = flow_to_spec(model.flow)
    base = [name for name, cls in BASE_DISTRIBUTIONS.items() if type(model.base) is cls]
    if not base:
        raise TypeError(f"cannot save base distribution {type(model.base).__name__}; known: {list(BASE_DISTRIBUTIONS)}")
    state = model.state_dict()
    dtypes = {value.dtype for value in state.values()}
    if len(dtypes) > 1:
        raise ValueError(f"parameters have mixed dtypes {sorted(map(str, dtypes))}; call model.astype(...) first")
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    weights = buffer.getvalue()
    config = {
        "format_version": FORMAT_VERSION,
        "dtype": str(dtypes.pop() if dtypes else np.dtype(np.float64)),
        "dim": model.dim,
        "base": base[0],
        "flow": spec,
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
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file (is {directory} a folder written by save_model?)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{path}: cannot read: {error}") from error
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise ModelFileError(f"{path}: invalid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: expected a JSON object, got {type(config).__name__}")
    version = config.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: format_version {version!r} is not supported (this version reads {FORMAT_VERSION})"
        )
    _check_keys(config, _CONFIG_KEYS, str(path))
    if config["dtype"] not in ("float32", "float64"):
        raise ModelFileError(f"{path}: dtype must be 'float32' or 'float64', got {config['dtype']!r}")
    _int(config["dim"], f"{path}: dim", minimum=1)
    if config["base"] not in BASE_DISTRIBUTIONS:
        raise ModelFileError(f"{path}: unknown base {config['base']!r}; known: {', '.join(BASE_DISTRIBUTIONS)}")
    sha = config["npz_sha256"]
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ModelFileError(f"{path}: npz_sha256 must be 64 lowercase hex digits, got {sha!r}")
    if not isinstance(config["metadata"], dict):
        raise ModelFileError(f"{path}: metadata must be an object, got {type(config['metadata']).__name__}")
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
    config_path = directory / CONFIG_FILE
    try:
        flow = flow_from_spec(config["flow"], config["dtype"])
    except ModelFileError as error:
        raise ModelFileError(f"{config_path}: {error}") from error
    except (MemoryError, RecursionError) as error:
        raise ModelFileError(f"{config_path}: the flow it describes is too large or deep to build") from error
    if flow.dim != config["dim"]:
        raise ModelFileError(f"{config_path}: dim is {config['dim']} but the flow works in dimension {flow.dim}")
    model = FlowModel(flow, BASE_DISTRIBUTIONS[config["base"]]())
    expected = {name: value for name, value, _ in model.named_parameters()}
    state = _read_weights(directory / WEIGHTS_FILE, expected, np.dtype(config["dtype"]), config["npz_sha256"])
    model.load_state_dict(state)
    return model


def _read_weights(path: Path, expected: dict[str, np.ndarray], dtype: np.dtype, sha256: str) -> dict:
    """The arrays of ``path`` after checking them against the freshly built ``expected`` parameters."""
    try:
        data = path.read_bytes()  # read once: the checksum and the arrays come from the same bytes
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except OSError as error:
        raise ModelFileError(f"{path}: cannot read: {error}") from error
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ModelFileError(f"{path}: not an .npz archive")
        with archive:
            names = list(archive.files)
            state = {}
            for name in names:
                try:
                    state[name] = archive[name]
                except _ARCHIVE_ERRORS as error:
                    raise ModelFileError(f"{path}: array {name!r} cannot be read: {error}") from error
    except ModelFileError:
        raise
    except _ARCHIVE_ERRORS as error:
        raise ModelFileError(f"{path}: not a readable .npz archive ({type(error).__name__}: {error})") from error
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelFileError(f"{path}: arrays do not match model.json: missing {missing}, unexpected {unexpected}")
    for name, value in state.items():
        if not isinstance(value, np.ndarray):
            raise ModelFileError(f"{path}: {name!r} is not a .npy array")
        if value.dtype != dtype:
            raise ModelFileError(f"{path}: {name!r} has dtype {value.dtype}, model.json says {dtype}")
        if value.shape != expected[name].shape:
            raise ModelFileError(f"{path}: {name!r} has shape {value.shape}, model.json implies {expected[name].shape}")
        if not np.isfinite(value).all():
            raise ModelFileError(f"{path}: {name!r} has non-finite values")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ModelFileError(
            f"{path}: checksum differs from the one in {CONFIG_FILE}; the two files come from "
            "different saves (save the model again)"
        )
    return state
