"""``nflow`` on a user's own data file: the ``--data`` argument, a run's data, scores and samples in the file's units.

``nflow train --data my.csv`` (or ``.npy``, ``.npz``, ``.npz:NAME``) reads the file through
:func:`~nflow_np.data.prepare.prepare_data`: every problem is one line naming the file, the column and
the row; seeded splits by ``--val-fraction``/``--test-fraction``; a standardisation fitted on the training
split, which the flow trains behind and the saved model begins with (a ``Standardize`` layer, recorded too in
``metadata.standardization``; for a mixture the fitted parameters are mapped back to the file's units). So
the model in the folder is a model of the file's rows, and ``load_model`` gives it so: ``nflow eval DIR
--data new.csv`` scores every row of a file with it, ``nflow eval DIR`` the run's own test split, rebuilt
from the recorded file (refused if the file changed), and ``nflow sample DIR`` draws from it, all in the
file's units and with nothing added by hand. Derivation of the log-det: ``docs/data.md``.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

from nflow_np.data import TOY_DATASETS
from nflow_np.data.files import DataFileError, is_data_file, parse_source, read_table, split_rows
from nflow_np.data.images import IMAGE_DATASETS
from nflow_np.data.prepare import PreparedData, prepare_data
from nflow_np.io import atomic_write
from nflow_np.preflight import check_memory, check_writable

CSV_BYTES_PER_BYTE = 40
"""Memory the ``.csv`` parser needs per byte of the file (one Python string per field), for the preflight."""


def _source(text: str, names: tuple[str, ...]) -> str:
    """A built-in data set's name as it is, or a data file as an absolute path (``…/x.npz:NAME`` kept)."""
    if text in names:
        return text
    if is_data_file(text):
        path, array = parse_source(text)
        return str(path.expanduser().resolve()) + ("" if array is None else f":{array}")
    listed = ", ".join(names)
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose a built-in data set: {listed}; or a data "
                                     "file: FILE.csv, FILE.npy, FILE.npz, FILE.npz:ARRAY)")


def train_data(text: str) -> str:
    """``nflow train --data``: a toy or image data set, or a data file."""
    return _source(text, (*TOY_DATASETS, *IMAGE_DATASETS))


def eval_data(text: str) -> str:
    """``nflow eval --data``: a toy data set, or a data file whose every row is scored."""
    return _source(text, tuple(TOY_DATASETS))


def run_name(data: str) -> str:
    """The ``<data>`` of the default ``runs/<data>-<model>``: a data file's stem (``my.csv`` → ``my``)."""
    return parse_source(data)[0].stem if is_data_file(data) else data


# -- train ---------------------------------------------------------------------------------------


def prepare_run(options: dict[str, object]) -> PreparedData:
    """Read, check, split and standardise the data file of ``nflow train --data FILE`` (before any training).

    A ``--batch-size`` not typed is lowered to the training rows when the file has fewer; a typed one larger
    than them is refused, naming both.
    """
    path, array = parse_source(str(options["data"]))
    if path.suffix.lower() == ".csv" and path.is_file():
        check_memory(CSV_BYTES_PER_BYTE * path.stat().st_size, f"parsing {path.name}", "--data")
    prepared = prepare_data(path, array, val_fraction=float(options["val_fraction"]),
                            test_fraction=float(options["test_fraction"]), seed=int(options["seed"]),
                            dtype=str(options.get("dtype", "float64")), min_train=2)  # fmt: skip
    rows = prepared.splits.train.shape[0]
    if "batch_size" in options and int(options["batch_size"]) > rows:
        if "batch_size" in options["given"]:
            raise ValueError(f"--batch-size {options['batch_size']} exceeds the {rows} training rows of {path.name} "
                             "(a batch is drawn from them); give at most that")
        options["batch_size"] = rows
    return prepared


def describe_data(prepared: PreparedData, seed: int) -> str:
    """The line ``nflow train`` prints about a data file's splits."""
    counts = [0 if x is None else x.shape[0] for x in (prepared.raw.train, prepared.raw.val, prepared.raw.test)]
    path = Path(prepared.source["path"])
    columns = prepared.splits.train.shape[1]
    return (f"nflow: {path.name}: {prepared.source['rows']} rows of {columns} column{'s' * (columns != 1)}; "
            f"{counts[0]} train, {counts[1]} validation, {counts[2]} test (seed {seed}); each column standardised "
            "with the training split's mean and standard deviation (recorded in the model)")


def warn_constant(prepared: PreparedData) -> None:
    """Say which columns are constant in the training split: they are shifted, not scaled (no division by 0)."""
    if prepared.constant:
        columns = ", ".join(prepared.constant)
        print(f"nflow train: warning: {Path(prepared.source['path']).name}: column(s) {columns} hold one value in "
              "the training split: left unscaled (std 1, no division by zero); a density along a constant column "
              "is degenerate, so consider dropping it", file=sys.stderr)


RESOLUTION = 1e-3
"""Coarsest spacing of a column's values in the model's dtype, in standard deviations, before a warning."""


def warn_resolution(prepared: PreparedData, dtype: object) -> None:
    """Say which columns ``dtype`` resolves coarsely: values far from 0 beside their spread (a timestamp).

    The flow trains on rows standardised in float64, but the model saved takes the file's rows in ``dtype``
    (``Standardize ∘ flow``): a float32 value ``x`` is exact only to ``spacing(x)``, which is
    ``spacing(x)/σ`` standard deviations once standardised. Warned above :data:`RESOLUTION`.
    """
    x, std = prepared.raw.train, prepared.standardization.std
    largest = np.abs(x).max(axis=0).astype(dtype)
    steps = np.spacing(largest).astype(np.float64) / std
    coarse = [int(j) for j in np.flatnonzero(steps > RESOLUTION)]
    if coarse:
        table = Path(prepared.source["path"]).name
        names = prepared.source["columns"]
        listed = ", ".join(f"{j}{'' if names is None else f' ({names[j]!r})'}: {steps[j]:.2g}" for j in coarse)
        print(f"nflow train: warning: {table}: {np.dtype(dtype)} resolves the values of column(s) {listed} "
              "standard deviations only (values far from 0 beside their spread), and the model saved takes the "
              "file's rows in that dtype; train in float64, or subtract an offset from those columns",
              file=sys.stderr)


def row_counts(options: dict[str, object]) -> tuple[int, int]:
    """``(training rows, all rows)`` of a run: of its data file, or the built-in data set's ``--n-*``."""
    prepared = options.get("prepared")
    if prepared is not None:
        return prepared.splits.train.shape[0], int(prepared.source["rows"])
    return int(options["n_train"]), int(options["n_train"]) + int(options["n_val"]) + int(options["n_test"])


# -- eval and sample -----------------------------------------------------------------------------


def refuse_split_options(args: argparse.Namespace, data_file: bool) -> None:
    """``--seed``/``--n-test`` choose a built-in data set's test split; with a data file they mean nothing."""
    typed = [flag for flag, value in (("--seed", args.seed), ("--n-test", args.n_test)) if value is not None]
    if data_file and typed:
        raise ValueError(f"{', '.join(typed)}: not for a data file: --data FILE scores every row of FILE, and a "
                         "model trained on a file is evaluated on the test split recorded with it")


def file_rows(data: str, dim: int, folder: Path) -> tuple[np.ndarray, str]:
    """Every row of the data file ``data``, checked against the model's dimension ``dim``; and its label."""
    path, array = parse_source(data)
    x = read_table(path, array).x
    check_dimension(x, dim, path, folder)
    return x, f"{path.name} ({x.shape[0]} rows)"


def check_dimension(x: np.ndarray, dim: int, path: Path, folder: Path) -> None:
    """Refuse data with another number of columns than the model's dimension, naming both."""
    if x.shape[1] != dim:
        raise ValueError(f"{path.name} has {x.shape[1]} column{'s' * (x.shape[1] != 1)} but the model in {folder} "
                         f"has dimension {dim}; score data with the columns it was trained on")


def recorded_test_split(record: dict, seed: int, folder: Path) -> tuple[np.ndarray, str]:
    """The test rows of the run that trained the model in ``folder``, rebuilt from its data file's ``record``.

    Raises
    ------
    ValueError
        The file is gone or changed since (its SHA-256 differs): the split cannot be rebuilt.
    """
    path = Path(record["path"])
    try:
        table = read_table(path, record["array"])
    except DataFileError as error:
        raise ValueError(f"{folder} was trained on {path}, which cannot be read now ({error}); pass --data FILE "
                         "to score a file") from None
    if table.sha256 != record["sha256"]:
        raise ValueError(f"{path} changed since the model in {folder} was trained on it (its SHA-256 differs), so "
                         "its test split cannot be rebuilt; pass --data FILE to score a file")
    _, _, test = split_rows(table.x.shape[0], record["val_fraction"], record["test_fraction"], seed)
    return table.x[test], f"{path.name} (its {len(test)} test rows, seed {seed})"


def model_rows(x: np.ndarray, dtype: object, label: str) -> np.ndarray:
    """The rows ``x`` (float64, in the file's units) in the model's ``dtype``, refusing a value that overflows it.

    A model trained on a file is a model of its rows (``Standardize ∘ flow``, ``docs/data.md``): they go in
    as they are, and the training run scored its test split exactly so, which is why ``nflow eval DIR`` prints
    ``summary.json``'s test NLL to the last bit.

    Raises
    ------
    ValueError
        A value beyond the largest ``dtype`` number (float32: about 3.4e38), named by row and column.
    """
    with np.errstate(over="ignore"):  # an overflow is found and named just below
        rows = x.astype(dtype, copy=False)
    bad = np.argwhere(~np.isfinite(rows))
    if len(bad):
        i, j = (int(k) for k in bad[0])
        raise ValueError(f"{label}: row {i}, column {j} (value {x[i, j]:g}) overflows {np.dtype(dtype)}, the model's "
                         "dtype; a model trained in float64 takes it")
    return rows


def log_density(model: object, x: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """``log p(x)`` per row, in blocks of ``batch_size`` rows: ``x: (N, D)`` → ``(N,)`` float64.

    For a model trained on a data file, the density in the file's units: its flow begins with the
    standardisation, so ``log p_X(x) = log p_U(u) − Σ_j log σ_j`` is what ``model.log_prob`` gives.
    """
    rows = [np.asarray(model.log_prob(x[start : start + batch_size]), dtype=np.float64)
            for start in range(0, x.shape[0], batch_size)]
    return np.concatenate(rows)


def column_header(record: dict, dim: int) -> str | None:
    """The ``.csv`` header of samples: the names of the data file's columns, where it had a header."""
    columns = record.get("data_file", {}).get("columns")
    return ",".join(columns) if columns and len(columns) == dim else None


def write_rows(out: Path, x: np.ndarray, header: str | None = None) -> None:
    """``x`` (rows, or one value per row) to ``out``: ``.npy``, or ``.csv`` with enough digits to read it back."""
    if out.suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, x)
        content = buffer.getvalue()
    else:
        rows = x.reshape(x.shape[0], -1)  # a CSV row per sample: images flattened in C order
        text = io.StringIO()
        digits = 17 if rows.dtype == np.float64 else 9  # enough to read back the exact value
        header = header or ",".join(f"x{j}" for j in range(rows.shape[1]))
        np.savetxt(text, rows, fmt=f"%.{digits}g", delimiter=",", header=header, comments="")
        content = text.getvalue().encode("utf-8")
    check_writable(out.parent, len(content))
    atomic_write(out, content)
