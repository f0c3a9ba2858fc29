"""Your own data: ``.csv``, ``.npy`` and ``.npz`` files read into a checked float array, split and standardised.

- :func:`load_data` reads one table, one row per data point: a ``.csv`` (an optional header is a first
  row of names, none of them a number; delimiter ``,`` ``;`` tab or whitespace detected; a non-numeric
  column named and refused), an ``.npy`` array or one named array of an ``.npz``. Every NaN/Inf is
  refused by row and column, before any training. :func:`read_table` gives the header and the file's
  SHA-256 with it; :func:`parse_source` reads the command line's ``FILE`` or ``FILE.npz:NAME``.
- :func:`split_data`: seeded train/validation/test splits (one permutation of the rows).
- :class:`Standardization`: ``u = (x − μ) / σ`` per column, fitted on the training split. A model
  trained on ``u`` has, in the user's units, ``log p_X(x) = log p_U(u) − Σ_j log σ_j`` (change of
  variables with the diagonal Jacobian ``∂u/∂x = diag(1/σ)``; ``docs/data.md``), and samples
  ``x = μ + σ ⊙ u``. The saved model carries it as its first layer
  (:class:`~nflow_np.flows.elementwise.Standardize`, so ``load_model`` gives a model of ``x``); the record
  also goes into the model's metadata (``"standardization"``), where :func:`~nflow_np.io.read_config`
  checks it.
- :func:`nflow_np.data.prepare.prepare_data` does all of it for a training run (``nflow train --data FILE``).

Every problem is a :class:`DataFileError` (a ``ValueError``) with a one-line message naming the file.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nflow_np.files import safe
from nflow_np.files.safe import ModelFileError, archive_members, read_file

MAX_DATA_BYTES = 16 * 2**30
"""Largest data file :func:`load_data` reads (it is read into memory whole)."""
DATA_SUFFIXES = (".csv", ".npy", ".npz")
_DELIMITERS = (",", ";", "\t")


class DataFileError(ValueError):
    """A data file is missing, unreadable, or holds something that is not a finite numeric table."""


def parse_source(text: str) -> tuple[Path, str | None]:
    """The file and the array name of a data source as the command line writes it.

    ``"my.csv"`` → ``(Path("my.csv"), None)``; ``"runs.npz:train"`` → ``(Path("runs.npz"), "train")``: the
    text after the last ``:`` names an array when what comes before it ends in ``.npz`` (so a ``:`` elsewhere
    in a path is kept). An archive holding one array needs no name.

    Raises
    ------
    DataFileError
        ``FILE.npz:`` with an empty name.
    """
    head, colon, name = text.rpartition(":")
    if colon and head.lower().endswith(".npz"):
        if not name:
            raise DataFileError(f"{text}: no array name after ':' (write FILE.npz:NAME, or FILE.npz for one array)")
        return Path(head), name
    return Path(text), None


def is_data_file(text: str) -> bool:
    """Whether ``text`` names a data file (``.csv``, ``.npy``, ``.npz``, ``.npz:NAME``) rather than a data set."""
    head, colon, _ = text.rpartition(":")
    path = head if colon and head.lower().endswith(".npz") else text
    return Path(path).suffix.lower() in DATA_SUFFIXES


@dataclass
class Table:
    """A data file as :func:`read_table` reads it.

    Attributes
    ----------
    x : numpy.ndarray, shape (N, D)
        Finite; float64 (float32 ``.npy``/``.npz`` data stays float32).
    columns : list of str or None
        The ``.csv`` header's names, if it has one.
    sha256 : str
        Of the file's bytes: a run records it, so a changed file is noticed.
    """

    x: np.ndarray
    columns: list[str] | None
    sha256: str

    def column(self, j: int) -> str:
        """``"1 ('y')"`` (with a header) or ``"1"``: column ``j`` as messages name it."""
        return f"{j} ({self.columns[j]!r})" if self.columns else str(j)


def load_data(path: str | os.PathLike, array: str | None = None) -> np.ndarray:
    """Read a data table, shape ``(N, D)``, float64 (float32 ``.npy`` data stays float32).

    Parameters
    ----------
    path : str or os.PathLike
        ``.csv``, ``.npy`` or ``.npz``.
    array : str, optional
        ``.npz`` only: the array to read (required when the archive holds more than one).

    Returns
    -------
    numpy.ndarray, shape (N, D)
        Finite, at least one row. Integer ``.npy``/``.npz`` data is converted to float64 exactly.

    Raises
    ------
    DataFileError
        The message names the file and the problem: the column that is not numeric (by header name
        and first bad row), the row and column of a NaN/Inf, a ragged row, a wrong array name or shape.
    """
    return read_table(path, array).x


def read_table(path: str | os.PathLike, array: str | None = None) -> Table:
    """:func:`load_data`, with the ``.csv`` header and the file's SHA-256 (:class:`Table`).

    Raises
    ------
    DataFileError
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataFileError(f"{path}: unknown data file type {suffix or '(none)'!r}; use .csv, .npy or .npz")
    if array is not None and suffix != ".npz":
        raise DataFileError(f"{path}: an array name applies to .npz files only")
    try:
        data = read_file(path, MAX_DATA_BYTES)
    except ModelFileError as error:
        raise DataFileError(str(error)) from None
    if suffix == ".csv":
        x, columns = _parse_csv(data, path)
    else:
        x, columns = _read_numpy(data, path, array), None
    _check_finite(x, path, columns)
    return Table(x, columns, hashlib.sha256(data).hexdigest())


def _parse_csv(data: bytes, path: Path) -> tuple[np.ndarray, list[str] | None]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataFileError(f"{path}: not UTF-8 text ({error})") from None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise DataFileError(f"{path}: no rows")
    first = lines[0][1]
    delimiter = next((d for d in _DELIMITERS if d in first), None)  # None: any whitespace

    def fields(line: str) -> list[str]:
        return [field.strip() for field in line.split(delimiter)]

    header = None
    if all(field and not _is_number(field) for field in fields(first)):  # a row of names, none a number
        header, lines = fields(first), lines[1:]
        if not lines:
            raise DataFileError(f"{path}: a header and no rows")
    width = len(header) if header else len(fields(first))
    rows = []
    for number, line in lines:
        row = fields(line)
        if len(row) != width:
            raise DataFileError(f"{path}: line {number} has {len(row)} fields, expected {width}")
        rows.append(row)
    table = np.array(rows, dtype=object)
    for column in range(width):
        bad = [i for i, value in enumerate(table[:, column]) if not _is_number(value)]
        if bad:
            name = f"{column} ({header[column]!r})" if header else str(column)
            value = table[bad[0], column]
            raise DataFileError(
                f"{path}: column {name} is not numeric: {value!r} at line {lines[bad[0]][0]} "
                f"({len(bad)} non-numeric values); drop or encode that column"
            )
    return table.astype(np.float64), header


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def _read_numpy(data: bytes, path: Path, array: str | None) -> np.ndarray:
    try:
        if path.suffix.lower() == ".npz":
            names = sorted(archive_members(data, path))
            if array is None and len(names) != 1:
                raise DataFileError(f"{path}: holds the arrays {names}; name one (array=... / --data FILE:NAME)")
            name = names[0] if array is None else array
            if name not in names:
                raise DataFileError(f"{path}: no array {name!r}; it holds {names}")
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                x = archive[name]
        else:
            x = np.load(io.BytesIO(data), allow_pickle=False)
    except DataFileError:
        raise
    except (ModelFileError, *safe.ARCHIVE_ERRORS) as error:
        raise DataFileError(f"{path}: cannot be read as {path.suffix} ({error})") from None
    if x.ndim != 2 or 0 in x.shape:
        raise DataFileError(f"{path}: expected a 2-D array (N rows, D columns), got shape {x.shape}")
    if x.dtype.kind in "iu":
        return x.astype(np.float64)
    if x.dtype.kind != "f" or x.dtype not in (np.float32, np.float64):
        raise DataFileError(f"{path}: dtype {x.dtype} is not a float32/float64/integer table")
    return x


def _check_finite(x: np.ndarray, path: Path, columns: list[str] | None) -> None:
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.argwhere(~finite)
        row, column = (int(i) for i in bad[0])
        name = f"{column} ({columns[column]!r})" if columns else str(column)
        raise DataFileError(
            f"{path}: non-finite value {x[row, column]} at row {row}, column {name} "
            f"({len(bad)} non-finite entries in {len(np.unique(bad[:, 0]))} rows); remove or impute them"
        )


@dataclass
class DataSplits:
    """Rows of one table split three ways (:func:`split_data`); ``val``/``test`` may be ``None``."""

    train: np.ndarray
    val: np.ndarray | None
    test: np.ndarray | None


def split_sizes(n: int, val_fraction: float, test_fraction: float, min_train: int = 1) -> tuple[int, int, int]:
    """``(n_train, n_val, n_test)`` of :func:`split_data`: ``n_val = ⌈n · val_fraction⌉``, the same for test.

    Raises
    ------
    ValueError
        Fractions outside ``[0, 1)`` or summing to 1 or more, or fewer than ``min_train`` training rows left.
    """
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= fraction < 1:
            raise ValueError(f"{name} must be in [0, 1), got {fraction}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}")
    n_val, n_test = math.ceil(n * val_fraction), math.ceil(n * test_fraction)
    if n - n_val - n_test < min_train:
        raise ValueError(
            f"{n} rows are too few for a training split with these fractions: {n_val} validation and {n_test} "
            f"test rows leave {n - n_val - n_test}, at least {min_train} needed"
        )
    return n - n_val - n_test, n_val, n_test


def split_rows(
    n: int, val_fraction: float, test_fraction: float, seed: int, min_train: int = 1
) -> list[np.ndarray]:
    """Row indices ``[train, val, test]`` of :func:`split_data` (one seeded permutation of ``range(n)``).

    Raises
    ------
    ValueError
        As :func:`split_sizes`.
    """
    _, n_val, n_test = split_sizes(n, val_fraction, test_fraction, min_train)
    order = np.random.default_rng(seed).permutation(n)
    return [order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]]


def split_data(x: np.ndarray, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0) -> DataSplits:
    """Split the rows of ``x`` at random (``numpy.random.default_rng(seed)``), the same for the same seed.

    Raises
    ------
    ValueError
        Fractions outside ``[0, 1)`` or summing to 1 or more, or too few rows for a non-empty split.
    """
    train, val, test = split_rows(x.shape[0], val_fraction, test_fraction, seed)
    return DataSplits(x[train], x[val] if len(val) else None, x[test] if len(test) else None)


def constant_columns(x: np.ndarray) -> list[int]:
    """The columns of ``x: (N, D)`` whose values are all equal (:class:`Standardization` leaves them unscaled)."""
    return [int(j) for j in np.flatnonzero(x.max(axis=0) == x.min(axis=0))]


@dataclass
class Standardization:
    """``u = (x − mean) / std`` per column (module docstring for the density in the user's units).

    Attributes
    ----------
    mean, std : numpy.ndarray, shape (D,)
        float64; ``std > 0`` (a constant column gets ``std = 1``).
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardization:
        """Mean and standard deviation of the columns of ``x`` (the training split).

        A column whose values are all equal (:func:`constant_columns`) gets ``std = 1``: it is shifted to 0,
        never divided by zero.

        Raises
        ------
        ValueError
            A column whose mean or standard deviation overflows float64 (values near 1e308), named.
        """
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is found and named just below
            mean, std = x.mean(axis=0, dtype=np.float64), x.std(axis=0, dtype=np.float64)
        wide = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(std)))
        if len(wide):
            raise ValueError(f"column {wide[0]}: its values span too wide a range to standardise (the standard "
                             "deviation overflows float64); rescale that column")
        std[constant_columns(x)] = 1.0
        return cls(mean, np.where(std > 0, std, 1.0))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``(x − mean) / std`` in ``x``'s dtype."""
        return ((x - self.mean) / self.std).astype(x.dtype, copy=False)

    @property
    def log_abs_det(self) -> float:
        """``log|det ∂u/∂x| = −Σ_j log std_j``: add it to the model's ``log_prob(u)`` for ``log p_X(x)``."""
        return float(-np.log(self.std).sum())

    def to_json(self) -> dict:
        """``{"mean": [...], "std": [...]}`` for the model's metadata."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_json(cls, record: object, where: str, dim: int) -> Standardization:
        """Check a record from :meth:`to_json` (``dim`` finite means, ``dim`` positive finite stds).

        Raises
        ------
        ModelFileError
        """
        if not isinstance(record, dict) or set(record) != {"mean", "std"}:
            raise ModelFileError(f"{where}: expected {{'mean': [...], 'std': [...]}}, got {str(record)[:80]}")
        values = {}
        for key in ("mean", "std"):
            value = record[key]
            if not (isinstance(value, list) and len(value) == dim):
                raise ModelFileError(f"{where}.{key}: expected a list of {dim} numbers")
            if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value):
                raise ModelFileError(f"{where}.{key}: expected finite numbers")
            values[key] = np.array(value, dtype=np.float64)
        if (values["std"] <= 0).any():
            raise ModelFileError(f"{where}.std: every std must be positive")
        return cls(values["mean"], values["std"])
