"""Model files: a folder holding ``model.safetensors`` (the parameters) and ``model.json`` (the architecture).

``model.safetensors`` stores :meth:`~nflow_np.module.Module.state_dict` (every parameter and buffer
under its qualified name, e.g. ``flow.0.net.0.W``) in the field's safe tensor format
(:mod:`nflow_np.safetensors_io`), so PyTorch reads it by name with ``safetensors.torch.load_file``.
``model.json`` stores what is needed to rebuild the model before those arrays are copied in::

    {"format_version": 2, "dtype": "float64", "dim": 2, "base": "normal",
     "flow": {"kind": "sequential", "flows": [{"kind": "affine_coupling", "mask": [true, false],
              "hidden": [64, 64], "activation": "relu"}, ...]},
     "weights_file": "model.safetensors", "sha256": "…", "metadata": {...}}

Format 1 (nflow_np before safetensors) held the same arrays in ``model.npz`` and their checksum under
``npz_sha256``; such folders still load, through the same checks. A save always writes format 2 and
drops an old ``model.npz``, so a folder never holds two weights files.

The ``flow`` spec is written and read by the layers themselves (:mod:`nflow_np.specs`; the kinds and
their keys are listed in ``docs/files.md``). A save publishes both files, and any extra ones, as one
new folder with one atomic rename (:func:`~nflow_np.files.folders.publish_folder`), so a crash or a
full disk at any instant leaves the previous model loadable. The JSON also holds the SHA-256 of the
weights it belongs to, so a pair from different saves is refused. Loading checks everything (JSON
types, kinds, dimensions, dtype, array names, shapes and dtypes, the metadata fields nflow reads)
before any parameter is written. Every problem with the files raises :class:`ModelFileError`.

Hostile files: both files must be regular files inside the folder (a symbolic link is refused); the
JSON may be at most :data:`MAX_CONFIG_BYTES`, the weights at most :data:`MAX_WEIGHTS_BYTES` (refused
from their size, unread); ``.safetensors`` files are parsed by a strict reader (header length capped,
tensors tiling the buffer exactly, no copy of the data); old ``.npz`` archives are opened with
``allow_pickle=False`` and every member's declared size is checked against the shape the config implies
*before* it is decompressed; the config
may not describe more parameters than the weights file can hold, nor a dimension above :data:`MAX_DIM`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from nflow_np import safetensors_io
from nflow_np.distributions import BASE_DISTRIBUTIONS
from nflow_np.files import safe
from nflow_np.files.folders import publish_folder
from nflow_np.files.safe import (
    ModelFileError,
    archive_members,
    parse_json,
    read_arrays,
    read_file,
    read_tensors,
    tensor_sizes,
)
from nflow_np.flows.elementwise import leading_standardize
from nflow_np.model import FlowModel, with_standardization
from nflow_np.specs import MAX_DIM, check_int, flow_from_spec, to_spec

FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
NPZ_WEIGHTS_FILE = "model.npz"
"""Format 1's weights file: still read, and dropped when a model is saved over its folder."""
CONFIG_FILE = "model.json"
GMM_FILES = ("gmm.npz",)
"""A Gaussian-mixture folder's own file: dropped when a flow model is saved over it (no mixed folder)."""
_CONFIG_KEYS = {
    1: {"format_version", "dtype", "dim", "base", "flow", "npz_sha256", "metadata"},
    2: {"format_version", "dtype", "dim", "base", "flow", "weights_file", "sha256", "metadata"},
}
_CHECKSUM_KEY = {1: "npz_sha256", 2: "sha256"}
MODEL_KEYS = ("dtype", "dim", "base", "flow")
"""The fields of ``model.json`` (and of a checkpoint's ``model`` entry) that describe the architecture."""


def describe_model(model: FlowModel) -> dict:
    """``{"dtype", "dim", "base", "flow"}``: what :func:`model_from_description` rebuilds ``model`` from.

    Raises
    ------
    TypeError, ValueError
        A layer or base the format cannot describe, or parameters of mixed dtypes.
    """
    spec = to_spec(model.flow)
    base = [name for name, cls in BASE_DISTRIBUTIONS.items() if type(model.base) is cls]
    if not base:
        raise TypeError(f"cannot save base distribution {type(model.base).__name__}; known: {list(BASE_DISTRIBUTIONS)}")
    dtypes = {value.dtype for _, value in model.named_state()}  # parameters and buffers
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
    check_int(description["dim"], f"{where}: dim", minimum=1, maximum=MAX_DIM)
    if not isinstance(description["base"], str) or description["base"] not in BASE_DISTRIBUTIONS:
        raise ModelFileError(f"{where}: unknown base {description['base']!r}; known: {', '.join(BASE_DISTRIBUTIONS)}")


def model_from_description(description: dict, where: str, max_parameters: int | None = None) -> FlowModel:
    """Build a freshly initialised model from a checked description (see :func:`check_description`).

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


def model_file_bytes(model: FlowModel, metadata: dict | None = None) -> dict[str, bytes]:
    """``{WEIGHTS_FILE: …, CONFIG_FILE: …}``: the two files of ``model``, nothing written.

    Raises
    ------
    TypeError, ValueError
        An unsupported layer, mixed dtypes, metadata that is not a dict or not JSON (finite numbers only).
    """
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    description = describe_model(model)
    weights = safetensors_io.encode(model.state_dict())
    config = {
        "format_version": FORMAT_VERSION,
        **description,
        "weights_file": WEIGHTS_FILE,
        "sha256": hashlib.sha256(weights).hexdigest(),
        "metadata": metadata,
    }
    try:
        text = json.dumps(config, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise type(error)(f"metadata cannot be written as JSON: {error}") from error
    return {WEIGHTS_FILE: weights, CONFIG_FILE: text.encode("utf-8")}


def save_model(
    model: FlowModel,
    directory: str | os.PathLike,
    metadata: dict | None = None,
    *,
    extra_files: dict[str, bytes] | None = None,
    drop: tuple[str, ...] = (),
) -> Path:
    """Save ``model`` as ``directory/model.safetensors`` and ``directory/model.json``, replacing the folder whole.

    Every other file of ``directory`` (checkpoints, plots) is kept, except a Gaussian mixture's
    ``gmm.npz`` and a format-1 ``model.npz``. The new folder is published in one atomic step
    (:mod:`nflow_np.files.folders`).

    Parameters
    ----------
    model : FlowModel
        Its layers must be registered (:mod:`nflow_np.specs`); all parameters must share one dtype.
    directory : str or os.PathLike
        Created if needed.
    metadata : dict, optional
        Anything JSON-serialisable (finite numbers only), stored under ``"metadata"`` and returned
        by :func:`read_config`.
    extra_files : dict of str to bytes, optional
        More files (``{"summary.json": …}``) published in the same atomic step.
    drop : tuple of str
        Files of the old folder not to carry over (e.g. plots of the previous model that this save does not
        replace).

    Returns
    -------
    pathlib.Path
        ``directory``.

    Raises
    ------
    TypeError, ValueError
        Before anything is written: an unsupported layer, mixed dtypes, unserialisable metadata.
    OSError
        The write failed; the previous folder is unchanged.
    """
    return publish_model_files(directory, model_file_bytes(model, metadata), extra_files, drop)


def publish_model_files(
    directory: str | os.PathLike,
    model_files: dict[str, bytes],
    extra_files: dict[str, bytes] | None = None,
    drop: tuple[str, ...] = (),
) -> Path:
    """:func:`save_model` of files made by :func:`model_file_bytes` (so that ``extra_files`` can name the weights'
    SHA-256, :func:`weights_sha256`): all of them published in one atomic step.

    Raises
    ------
    OSError
        The write failed; the previous folder is unchanged.
    """
    files = {**(extra_files or {}), **model_files}  # model.json last (in-place mode)
    publish_folder(directory, files, drop=(*GMM_FILES, NPZ_WEIGHTS_FILE, *drop))
    return Path(directory)


def weights_sha256(model_files: dict[str, bytes]) -> str:
    """The SHA-256 of the weights in :func:`model_file_bytes`' files, as ``model.json`` records it."""
    return hashlib.sha256(model_files[WEIGHTS_FILE]).hexdigest()


def read_config(directory: str | os.PathLike) -> dict:
    """Read and check ``directory/model.json`` (the flow spec itself is checked when it is built).

    Returns
    -------
    dict
        ``format_version``, ``dtype``, ``dim``, ``base``, ``flow``, ``metadata`` (whose fields nflow
        reads are checked: :func:`check_metadata`), and the weights' SHA-256: ``weights_file`` and
        ``sha256`` (format 2) or ``npz_sha256`` (format 1).

    Raises
    ------
    ModelFileError
    """
    path = Path(directory) / CONFIG_FILE
    data = read_file(path, safe.MAX_CONFIG_BYTES, hint=f" (is {directory} a folder written by save_model?)")
    config = parse_json(data, path)
    version = config.get("format_version")
    if type(version) is not int or version not in _CONFIG_KEYS:
        raise ModelFileError(
            f"{path}: format_version {version!r} is not supported (this version reads 1 and {FORMAT_VERSION}; "
            "a newer file needs a newer nflow_np)"
        )
    keys = _CONFIG_KEYS[version]
    missing, unexpected = sorted(keys - set(config)), sorted(set(config) - keys)
    if missing or unexpected:
        raise ModelFileError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    check_description(config, str(path))
    if version == 2 and config["weights_file"] != WEIGHTS_FILE:  # never a path chosen by the file
        raise ModelFileError(f"{path}: weights_file must be {WEIGHTS_FILE!r}, got {config['weights_file']!r}")
    key = _CHECKSUM_KEY[version]
    sha = config[key]
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ModelFileError(f"{path}: {key} must be 64 lowercase hex digits, got {sha!r}")
    if not isinstance(config["metadata"], dict):
        raise ModelFileError(f"{path}: metadata must be an object, got {type(config['metadata']).__name__}")
    check_metadata(config["metadata"], f"{path}: metadata", config["dim"])
    return config


def check_metadata(metadata: dict, where: str, dim: int) -> None:
    """Check the metadata fields nflow itself reads, where present, so a hostile value is a clean error.

    ``data``, ``model``: strings; ``seed``: integer >= 0; ``n_test``: integer >= 1; ``image_shape``:
    three positive integers whose product is ``dim``; ``levels``: integer >= 2; ``standardization``:
    a record of :class:`~nflow_np.data.files.Standardization` for ``dim`` columns; ``data_file``: the record
    of a data file (:func:`~nflow_np.data.prepare.check_source_record`).

    Raises
    ------
    ModelFileError
    """
    for key in ("data", "model"):
        if key in metadata and not isinstance(metadata[key], str):
            raise ModelFileError(f"{where}.{key}: expected a string, got {metadata[key]!r}")
    if "seed" in metadata:
        check_int(metadata["seed"], f"{where}.seed", 0, 2**63 - 1)
    if "n_test" in metadata:
        check_int(metadata["n_test"], f"{where}.n_test", 1, 2**31)
    if "levels" in metadata:
        check_int(metadata["levels"], f"{where}.levels", 2, 2**16)
    if "image_shape" in metadata:
        shape = metadata["image_shape"]
        if not isinstance(shape, list) or len(shape) != 3:
            raise ModelFileError(f"{where}.image_shape: expected [channels, height, width], got {shape!r}")
        sizes = [check_int(s, f"{where}.image_shape[{i}]", 1, MAX_DIM) for i, s in enumerate(shape)]
        if int(np.prod(sizes)) != dim:
            raise ModelFileError(f"{where}.image_shape: {shape} images do not have the model's {dim} dimensions")
    if "standardization" in metadata:
        from nflow_np.data.files import Standardization

        Standardization.from_json(metadata["standardization"], f"{where}.standardization", dim)
    if "data_file" in metadata:
        from nflow_np.data.prepare import check_source_record

        check_source_record(metadata["data_file"], f"{where}.data_file")


def load_model(directory: str | os.PathLike) -> FlowModel:
    """Load a model saved by :func:`save_model` (format 2) or by an earlier nflow_np (format 1, ``model.npz``).

    The whole model is built from ``model.json`` and every array of the weights file is checked
    against it (names, shapes, dtype, finiteness, checksum, and what a layer refuses to hold: a
    Standardize's ``std`` must be positive) before any parameter is written.

    A model trained on a data file (``nflow train --data FILE``) loads as a model of the file's rows, in
    its units: its flow begins with the :class:`~nflow_np.flows.elementwise.Standardize` layer of the
    training split's mean and standard deviation, so ``log_prob``, ``sample``, ``encode`` and ``decode``
    take and give rows of the file, and ``log_prob`` includes ``−Σ_j log σ_j`` (``docs/data.md``). Folders
    written before that layer existed are given it from their ``metadata.standardization``
    (:func:`_in_recorded_units`).

    Raises
    ------
    ModelFileError
        Anything missing, malformed or inconsistent; the message names the file and the problem.
    """
    directory = Path(directory)
    config = read_config(directory)
    version = config["format_version"]
    weights_path = directory / (WEIGHTS_FILE if version == 2 else NPZ_WEIGHTS_FILE)
    data = read_file(weights_path, safe.MAX_WEIGHTS_BYTES)  # read once: checksum and arrays from the same bytes
    dtype = np.dtype(config["dtype"])
    # honest weights hold every parameter, so their size bounds what the config may ask to allocate
    # (the whole file, like an archive's member sizes, counts headers too: a loose bound, checked exactly later)
    if version == 2:
        tensor_sizes(data, weights_path)  # a damaged file is named as such before the config is built
        stored = len(data)
    else:
        stored = sum(archive_members(data, weights_path).values())
    model = model_from_description(config, str(directory / CONFIG_FILE), max_parameters=stored // dtype.itemsize)
    expected = {name: (value.shape, dtype) for name, value in model.named_state()}  # parameters and buffers
    read = read_tensors if version == 2 else read_arrays
    state = read(data, weights_path, expected, CONFIG_FILE)
    if hashlib.sha256(data).hexdigest() != config[_CHECKSUM_KEY[version]]:
        raise ModelFileError(
            f"{weights_path}: checksum differs from the one in {CONFIG_FILE}; the two files come from "
            "different saves (save the model again)"
        )
    try:
        model.load_state_dict(state)
    except ValueError as error:  # a value a layer may not hold (Standardize: a std that is not positive)
        raise ModelFileError(f"{weights_path}: {error}") from None
    return _in_recorded_units(model, config, directory / CONFIG_FILE)


def _in_recorded_units(model: FlowModel, config: dict, where: Path) -> FlowModel:
    """The model of a folder with ``metadata.standardization`` (trained on a data file) in the file's units.

    A folder written since the :class:`~nflow_np.flows.elementwise.Standardize` layer exists holds the model
    ``Standardize ∘ flow`` already, and its record must agree with the layer's buffers (to the last bit,
    in the model's dtype). A folder written before (by the first ``nflow train --data FILE``) holds the
    flow of the standardised rows alone: the layer is put in front of it here
    (:func:`~nflow_np.model.with_standardization`), so every folder loads as a model of the file's rows.
    A folder without the record is returned as it is.

    Raises
    ------
    ModelFileError
        The record and the model's Standardize layer disagree.
    """
    record = config["metadata"].get("standardization")
    if record is None:
        return model
    from nflow_np.data.files import Standardization

    units = Standardization.from_json(record, f"{where}: metadata.standardization", config["dim"])
    layer = leading_standardize(model.flow)
    if layer is None:
        return with_standardization(model, units.mean, units.std)
    for name, recorded in (("mean", units.mean), ("std", units.std)):
        if not np.array_equal(recorded.astype(model.dtype), layer.buffers[name]):
            raise ModelFileError(f"{where}: metadata.standardization.{name} differs from the {name} of the model's "
                                 "Standardize layer (flow.0); the two come from different models")
    return model
