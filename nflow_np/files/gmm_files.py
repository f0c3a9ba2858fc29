"""The Gaussian-mixture folder of ``nflow train --model gmm``: ``gmm.npz`` + ``summary.json``.

``gmm.npz`` holds ``weights: (K,)``, ``means: (K, D)``, ``covariances: (K, D, D)`` in float64;
``summary.json`` the run's record (``data``, ``seed``, ``n_test``, ``components``, the NLLs...). Both
are published together in one atomic step (:func:`~nflow_np.files.folders.publish_folder`; a flow
model's weights and ``model.json`` are dropped, so a folder never holds both), and read with the
protections of model files: regular files only (no FIFO hang, no symbolic link followed), size caps,
``allow_pickle=False``, array shapes read from the ``.npy`` headers and checked to fit together before
anything is decompressed, ``summary.json`` nesting and the types of the fields nflow reads checked.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from nflow_np.files import safe
from nflow_np.files.folders import publish_folder
from nflow_np.files.safe import ARCHIVE_ERRORS, ModelFileError, parse_json, read_arrays, read_file
from nflow_np.specs import MAX_DIM, check_int

GMM_FILE = "gmm.npz"
SUMMARY_FILE = "summary.json"
MAX_COMPONENTS = 2**16
_ARRAYS = ("weights", "means", "covariances")


def save_gmm(
    weights: np.ndarray, means: np.ndarray, covariances: np.ndarray, directory: str | os.PathLike, summary: dict
) -> Path:
    """Publish ``gmm.npz`` and ``summary.json`` in ``directory`` in one atomic step (other files kept).

    Raises
    ------
    TypeError, ValueError
        ``summary`` is not JSON (finite numbers only), before anything is written.
    OSError
        The write failed; the previous folder is unchanged.
    """
    text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    buffer = io.BytesIO()
    arrays = dict(zip(_ARRAYS, (weights, means, covariances), strict=True))
    np.savez(buffer, **{name: np.asarray(value, dtype=np.float64) for name, value in arrays.items()})
    files = {GMM_FILE: buffer.getvalue(), SUMMARY_FILE: text.encode("utf-8")}
    publish_folder(directory, files, drop=("model.safetensors", "model.npz", "model.json"))
    return Path(directory)


def load_gmm(directory: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """The checked arrays and summary of a Gaussian-mixture folder.

    Returns
    -------
    arrays : dict
        ``weights (K,)``, ``means (K, D)``, ``covariances (K, D, D)``, float64 and finite
        (:meth:`~nflow_np.gmm.GaussianMixture.from_parameters` checks the rest).
    summary : dict
        ``summary.json``; ``data``, ``model`` (strings), ``seed`` (int >= 0), ``n_test`` (int >= 1),
        ``components`` (= K) and ``data_file`` (:func:`~nflow_np.data.prepare.check_source_record`) are
        checked where present.

    Raises
    ------
    ModelFileError
        One line naming the file and the problem.
    """
    directory = Path(directory)
    summary_path, gmm_path = directory / SUMMARY_FILE, directory / GMM_FILE
    summary = parse_json(read_file(summary_path, safe.MAX_CONFIG_BYTES), summary_path, max_depth=safe.MAX_DEPTH)
    data = read_file(gmm_path, safe.MAX_WEIGHTS_BYTES)
    shapes = _npy_shapes(data, gmm_path)
    if set(shapes) != set(_ARRAYS):
        raise ModelFileError(f"{gmm_path}: holds {sorted(shapes)}, expected {list(_ARRAYS)}")
    (k,), (k2, d) = _shape(shapes["weights"], 1, gmm_path), _shape(shapes["means"], 2, gmm_path)
    check_int(k, f"{gmm_path}: components", 1, MAX_COMPONENTS)
    check_int(d, f"{gmm_path}: dimension", 1, MAX_DIM)
    if k2 != k or shapes["covariances"] != (k, d, d):
        raise ModelFileError(f"{gmm_path}: shapes {shapes} do not fit together (expected (K,), (K, D), (K, D, D))")
    if k * d * d * 8 > safe.MAX_WEIGHTS_BYTES:
        raise ModelFileError(f"{gmm_path}: {k} components in dimension {d} are more than this loader reads")
    expected = {"weights": ((k,), np.float64), "means": ((k, d), np.float64), "covariances": ((k, d, d), np.float64)}
    arrays = read_arrays(data, gmm_path, expected, "its own array headers")
    where = f"{summary_path}"
    for key in ("data", "model"):
        if key in summary and not isinstance(summary[key], str):
            raise ModelFileError(f"{where}: {key} must be a string, got {summary[key]!r}")
    if "seed" in summary:
        check_int(summary["seed"], f"{where}: seed", 0, 2**63 - 1)
    if "n_test" in summary:
        check_int(summary["n_test"], f"{where}: n_test", 1, 2**31)
    if "components" in summary and check_int(summary["components"], f"{where}: components", 1, MAX_COMPONENTS) != k:
        raise ModelFileError(f"{where}: components is {summary['components']} but {GMM_FILE} holds {k}")
    if "data_file" in summary:  # trained on a user's file: the record nflow eval rebuilds its test split from
        from nflow_np.data.prepare import check_source_record

        check_source_record(summary["data_file"], f"{where}: data_file")
    return arrays, summary


def _shape(shape: tuple, ndim: int, path: Path) -> tuple:
    if len(shape) != ndim:
        raise ModelFileError(f"{path}: expected a {ndim}-D array, got shape {shape}")
    return shape


def _npy_shapes(data: bytes, path: Path) -> dict[str, tuple]:
    """``{name: shape}`` from each member's ``.npy`` header alone (nothing else is decompressed)."""
    shapes = {}
    safe.archive_members(data, path)  # one .npy per name, no duplicates
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for member in archive.infolist():
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else None
                    header = header or np.lib.format.read_array_header_2_0
                    shape, _, dtype = header(stream)
                if dtype != np.float64:
                    raise ModelFileError(f"{path}: {member.filename!r} has dtype {dtype}, expected float64")
                shapes[member.filename.removesuffix(".npy")] = tuple(shape)
    except ModelFileError:
        raise
    except ARCHIVE_ERRORS as error:
        raise ModelFileError(f"{path}: not a readable .npz archive ({type(error).__name__}: {error})") from error
    return shapes
