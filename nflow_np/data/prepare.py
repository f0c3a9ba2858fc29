"""A data file made ready for a training run: read, checked, split, standardised, and recorded.

:func:`prepare_data` is what ``nflow train --data FILE`` calls: :func:`~nflow_np.data.files.read_table`
(NaN/Inf named by file row and column), seeded splits (:func:`~nflow_np.data.files.split_rows`), a
:class:`~nflow_np.data.files.Standardization` fitted on the training split and applied to all three, in
the model's dtype. :func:`source_record` is what the run writes about the file (path, array, SHA-256,
fractions), so ``nflow eval`` can rebuild the same test split later, or say that the file changed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nflow_np.data.files import (
    DataFileError,
    DataSplits,
    Standardization,
    Table,
    constant_columns,
    read_table,
    split_rows,
)
from nflow_np.files.safe import ModelFileError

_SOURCE_KEYS = {"path", "array", "sha256", "rows", "columns", "val_fraction", "test_fraction"}


def source_record(path: Path, array: str | None, table: Table, val_fraction: float, test_fraction: float) -> dict:
    """What a run records of its data file (metadata ``"data_file"``): enough to find it again, notice that it
    changed (``sha256``) and rebuild its splits (with the run's seed)."""
    return {"path": str(path), "array": array, "sha256": table.sha256, "rows": int(table.x.shape[0]),
            "columns": table.columns, "val_fraction": val_fraction, "test_fraction": test_fraction}


def check_source_record(record: object, where: str) -> dict:
    """Check a :func:`source_record` read from a file (types and ranges); return it.

    Raises
    ------
    ModelFileError
    """
    if not isinstance(record, dict) or set(record) != _SOURCE_KEYS:
        raise ModelFileError(f"{where}: expected an object with the keys {sorted(_SOURCE_KEYS)}")
    sha, rows, columns = record["sha256"], record["rows"], record["columns"]
    if not isinstance(record["path"], str) or not (record["array"] is None or isinstance(record["array"], str)):
        raise ModelFileError(f"{where}: path must be a string and array a string or null")
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ModelFileError(f"{where}.sha256: expected 64 lowercase hex digits")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise ModelFileError(f"{where}.rows: expected an integer >= 1, got {rows!r}")
    if columns is not None and not (isinstance(columns, list) and all(isinstance(c, str) for c in columns)):
        raise ModelFileError(f"{where}.columns: expected a list of names or null")
    fractions = [record[key] for key in ("val_fraction", "test_fraction")]
    if not all(isinstance(f, float | int) and not isinstance(f, bool) and 0 < f < 1 for f in fractions):
        raise ModelFileError(f"{where}: val_fraction and test_fraction must be numbers in (0, 1)")
    if sum(fractions) >= 1:
        raise ModelFileError(f"{where}: val_fraction + test_fraction must be below 1")
    return record


@dataclass
class PreparedData:
    """A data file ready to train on (:func:`prepare_data`).

    Attributes
    ----------
    raw : DataSplits
        The splits in the file's units (``val``/``test`` ``None`` for a fraction of 0).
    splits : DataSplits
        The same rows standardised with ``standardization`` (fitted on ``raw.train``), in the run's dtype.
    standardization : Standardization
    source : dict
        :func:`source_record` of the file.
    constant : list of str
        The columns constant in the training split (left unscaled: ``std = 1``), as messages name them.
    """

    raw: DataSplits
    splits: DataSplits
    standardization: Standardization
    source: dict
    constant: list[str]


def prepare_data(
    path: str | os.PathLike,
    array: str | None = None,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    dtype: object = np.float64,
    min_train: int = 2,
) -> PreparedData:
    """Read, check, split and standardise a data file for training.

    Parameters
    ----------
    path, array
        As for :func:`~nflow_np.data.files.load_data`.
    val_fraction, test_fraction : float
        Shares of the rows held out (:func:`~nflow_np.data.files.split_sizes`: ``⌈N · fraction⌉`` rows each).
    seed : int
        Of the split (``nflow train`` uses the run's seed).
    dtype
        Of ``splits`` (the model's): float32 or float64.
    min_train : int
        Fewest training rows accepted (a standard deviation needs two).

    Returns
    -------
    PreparedData

    Raises
    ------
    DataFileError
        Every problem, naming the file: its content, too few rows for the fractions, a column too wide to
        standardise, a value that overflows ``dtype`` (float32) as it is (the model saved takes the rows in
        ``dtype``) or a held-out row that does once standardised (by file row and column).
    """
    path = Path(path)
    table = read_table(path, array)
    try:
        rows = split_rows(table.x.shape[0], val_fraction, test_fraction, seed, min_train)
    except ValueError as error:
        raise DataFileError(f"{path}: {error}") from None
    raw = DataSplits(*(table.x[r] if len(r) else None for r in rows))
    try:
        standardization = Standardization.fit(raw.train)
    except ValueError as error:
        raise DataFileError(f"{path}: {error}") from None
    dtype = np.dtype(dtype)
    parts = []
    for name, r, x in zip(("training", "validation", "test"), rows, (raw.train, raw.val, raw.test), strict=True):
        if x is None:
            parts.append(None)
            continue
        with np.errstate(over="ignore"):  # an overflow to float32 is found and named just below
            rows = x.astype(dtype)
            u = standardization.apply(x.astype(np.float64)).astype(dtype)
        bad = np.argwhere(~np.isfinite(rows))
        if len(bad):  # the saved model takes the file's rows as they are, in dtype (docs/data.md)
            i, j = (int(k) for k in bad[0])
            raise DataFileError(
                f"{path}: row {int(r[i])}, column {table.column(j)} (value {x[i, j]:g}, in the {name} split) "
                f"overflows {dtype}, and the model saved takes the file's rows in {dtype}; train in float64"
            )
        bad = np.argwhere(~np.isfinite(u))
        if len(bad):
            i, j = (int(k) for k in bad[0])
            distance = abs(x[i, j] - standardization.mean[j]) / standardization.std[j]
            raise DataFileError(
                f"{path}: row {int(r[i])}, column {table.column(j)} (value {x[i, j]:g}, in the {name} split) lies "
                f"{distance:.3g} standard deviations from the training mean and overflows {dtype} once "
                "standardised; remove it or train in float64"
            )
        parts.append(u)
    constant = [table.column(j) for j in constant_columns(raw.train)]
    source = source_record(path, array, table, val_fraction, test_fraction)
    return PreparedData(raw, DataSplits(*parts), standardization, source, constant)
