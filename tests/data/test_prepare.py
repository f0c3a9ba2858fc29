"""A data file made ready for a run (nflow_np/data/prepare.py): split, standardised on the training rows, recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nflow_np.data.files import DataFileError, Standardization, is_data_file, parse_source, split_rows
from nflow_np.data.prepare import check_source_record, prepare_data
from nflow_np.io import ModelFileError


def test_prepare_data_splits_and_standardises_on_the_training_rows(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(101, 3)) * [5.0, 0.01, 1.0] + [50.0, 0.0, -3.0]
    x[:, 2] = 4.0  # a constant column
    np.save(tmp_path / "x.npy", x)
    prepared = prepare_data(tmp_path / "x.npy", val_fraction=0.2, test_fraction=0.1, seed=5, dtype=np.float32)
    train, val, test = split_rows(101, 0.2, 0.1, 5)
    assert (len(train), len(val), len(test)) == (69, 21, 11)  # ⌈101 · 0.2⌉, ⌈101 · 0.1⌉, the rest
    assert sorted(np.concatenate([train, val, test])) == list(range(101))
    np.testing.assert_array_equal(prepared.raw.val, x[val])
    mean, std = prepared.standardization.mean, prepared.standardization.std
    np.testing.assert_allclose(mean[:2], x[train, :2].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std[:2], x[train, :2].std(axis=0), rtol=1e-12)
    assert (mean[2], std[2]) == (4.0, 1.0) and prepared.constant == ["2"]
    for split, raw in zip(prepared.splits.__dict__.values(), prepared.raw.__dict__.values(), strict=True):
        assert split.dtype == np.float32
        np.testing.assert_allclose(split, ((raw - mean) / std).astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(prepared.splits.train[:, :2].std(axis=0), 1, rtol=1e-5)
    record = check_source_record(prepared.source, "data_file")
    assert (record["rows"], record["val_fraction"], record["array"]) == (101, 0.2, None)
    for bad in ({**record, "sha256": "x"}, {**record, "rows": True}, {**record, "val_fraction": 0.6,
                                                                       "test_fraction": 0.5}, [1]):
        with pytest.raises(ModelFileError, match="data_file"):
            check_source_record(bad, "data_file")


def test_a_held_out_row_that_overflows_float32_is_named_by_its_file_row(tmp_path):
    x = np.random.default_rng(1).normal(size=(50, 2))
    _, _, test = split_rows(50, 0.1, 0.1, 0)
    row = int(test[0])
    x[row, 1] = 1e300  # far beyond float32 once standardised with the training rows' spread (about 1)
    (tmp_path / "x.csv").write_text("a,b\n" + "\n".join(f"{p!r},{q!r}" for p, q in x.tolist()) + "\n")
    with pytest.raises(DataFileError, match=rf"row {row}, column 1 \('b'\) \(value 1e\+300, in the test split\)"):
        prepare_data(tmp_path / "x.csv", seed=0, dtype=np.float32)
    assert prepare_data(tmp_path / "x.csv", seed=0).splits.test.dtype == np.float64  # float64 holds it


def test_a_value_beyond_float32_is_refused_for_a_float32_model_even_in_the_training_split(tmp_path):
    """The model saved takes the file's rows as they are, in its dtype (Standardize ∘ flow): a value float32
    cannot hold could never be scored by it, wherever it sits; and one that fits but whose standardised value
    does not is named too."""
    x = np.random.default_rng(2).normal(size=(50, 2))
    train, _, test = split_rows(50, 0.1, 0.1, 0)
    x[int(train[3]), 0] = 1e39  # standardised it would be about 7 (the column's spread grows with it)
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(DataFileError, match=rf"row {int(train[3])}, column 0 \(value 1e\+39, in the training split\) "
                                            r"overflows float32, and the model saved takes the file's rows in float32"):
        prepare_data(tmp_path / "x.npy", seed=0, dtype=np.float32)
    assert np.isfinite(prepare_data(tmp_path / "x.npy", seed=0).splits.train).all()
    y = np.random.default_rng(3).normal(size=(50, 2)) * [1.0, 1e-10]
    y[int(test[0]), 1] = 1e30  # fits float32, but lies 1e40 standard deviations out
    np.save(tmp_path / "y.npy", y)
    with pytest.raises(DataFileError, match=rf"row {int(test[0])}, column 1 \(value 1e\+30, in the test split\) lies "
                                            r".* standard deviations from the training mean and overflows float32"):
        prepare_data(tmp_path / "y.npy", seed=0, dtype=np.float32)


def test_too_few_rows_and_columns_too_wide_are_refused(tmp_path):
    np.save(tmp_path / "small.npy", np.arange(6.0).reshape(3, 2))
    with pytest.raises(DataFileError, match="3 rows are too few.*leave 1, at least 2 needed"):
        prepare_data(tmp_path / "small.npy")
    with pytest.raises(ValueError, match="column 1: its values span too wide a range"):
        Standardization.fit(np.array([[0.0, -1e308], [1.0, 1e308]]))


def test_data_sources_as_the_command_line_writes_them():
    assert parse_source("a/b.csv") == (Path("a/b.csv"), None)
    assert parse_source("runs.npz:train") == (Path("runs.npz"), "train")
    assert parse_source("c:/data/x.npz") == (Path("c:/data/x.npz"), None)  # a ':' in the path stays
    assert is_data_file("x.NPY") and is_data_file("x.npz:y") and not is_data_file("two_moons")
    with pytest.raises(DataFileError, match="no array name after ':'"):
        parse_source("x.npz:")
