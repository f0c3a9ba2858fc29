"""User data files (nflow_np/data/files.py): .csv/.npy/.npz read into checked tables, split, standardised."""

from __future__ import annotations

import numpy as np
import pytest

from nflow_np.data.files import DataFileError, Standardization, load_data, split_data
from nflow_np.flows import Standardize
from nflow_np.io import ModelFileError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,2\n3,4\n", [[1, 2], [3, 4]]),
        ("x,y\n1,2\n3,4\n", [[1, 2], [3, 4]]),
        ("x;y\n1.5;-2e3\n\n3;4\n", [[1.5, -2e3], [3, 4]]),
        ("1\t2\n3\t4\n", [[1, 2], [3, 4]]),
        ("1 2\n3   4\n", [[1, 2], [3, 4]]),
        ("\ufeffa,b\n1,2\n", [[1, 2]]),
    ],
    ids=["plain", "header", "semicolon-blank-line", "tab", "spaces", "bom"],
)
def test_csv_with_or_without_header_and_any_delimiter(tmp_path, text, expected):
    (tmp_path / "d.csv").write_text(text, encoding="utf-8")
    x = load_data(tmp_path / "d.csv")
    assert x.dtype == np.float64
    np.testing.assert_array_equal(x, expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x,name\n1,a\n2,b\n", r"column 1 \('name'\) is not numeric: 'a' at line 2 \(2 non-numeric values\)"),
        ("1,2\n3\n", "line 2 has 1 fields, expected 2"),
        ("x,y\n1,2\n3,nan\n", r"non-finite value nan at row 1, column 1 \('y'\)"),
        ("1,inf\n", "non-finite value inf at row 0, column 1"),
        ("x,y\n", "a header and no rows"),
        ("", "no rows"),
        ("1,\n", r"column 1 is not numeric: ''"),
    ],
)
def test_bad_csv_is_named_by_column_and_row(tmp_path, text, message):
    (tmp_path / "d.csv").write_text(text)
    with pytest.raises(DataFileError, match=message):
        load_data(tmp_path / "d.csv")


def test_npy_and_npz(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    np.save(tmp_path / "d.npy", x)
    assert load_data(tmp_path / "d.npy").dtype == np.float32
    np.savez(tmp_path / "one.npz", data=x)
    np.testing.assert_array_equal(load_data(tmp_path / "one.npz"), x)
    np.savez(tmp_path / "two.npz", train=x, other=np.arange(6).reshape(3, 2))
    with pytest.raises(DataFileError, match=r"holds the arrays \['other', 'train'\]; name one"):
        load_data(tmp_path / "two.npz")
    np.testing.assert_array_equal(load_data(tmp_path / "two.npz", array="other"), [[0, 1], [2, 3], [4, 5]])
    with pytest.raises(DataFileError, match="no array 'missing'"):
        load_data(tmp_path / "two.npz", array="missing")
    np.save(tmp_path / "flat.npy", np.ones(4))
    with pytest.raises(DataFileError, match=r"expected a 2-D array.*\(4,\)"):
        load_data(tmp_path / "flat.npy")
    np.save(tmp_path / "obj.npy", np.array([[{"a": 1}]], dtype=object), allow_pickle=True)
    with pytest.raises(DataFileError, match="cannot be read"):
        load_data(tmp_path / "obj.npy")
    bad = x.astype(np.float64)
    bad[3, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(DataFileError, match="non-finite value nan at row 3, column 2"):
        load_data(tmp_path / "nan.npy")


def test_unknown_missing_and_special_files(tmp_path):
    with pytest.raises(DataFileError, match="unknown data file type '.txt'"):
        load_data(tmp_path / "d.txt")
    with pytest.raises(DataFileError, match="no such file"):
        load_data(tmp_path / "d.csv")
    import os

    os.mkfifo(tmp_path / "fifo.csv")
    with pytest.raises(DataFileError, match="not a regular file"):
        load_data(tmp_path / "fifo.csv")


def test_splits_are_seeded_and_disjoint():
    x = np.arange(100.0).reshape(50, 2)
    first, again, other = split_data(x, 0.2, 0.1, seed=3), split_data(x, 0.2, 0.1, seed=3), split_data(x, 0.2, 0.1, 4)
    np.testing.assert_array_equal(first.train, again.train)
    assert not np.array_equal(first.train, other.train)
    assert (first.train.shape[0], first.val.shape[0], first.test.shape[0]) == (35, 10, 5)
    rows = np.concatenate([first.train, first.val, first.test])[:, 0]
    assert sorted(rows) == sorted(x[:, 0])
    assert split_data(x, 0.0, 0.0).val is None
    with pytest.raises(ValueError, match="below 1"):
        split_data(x, 0.5, 0.5)
    with pytest.raises(ValueError, match="too few"):
        split_data(x[:2], 0.4, 0.4)


def test_standardization_gives_the_density_in_the_users_units():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2)) * [3.0, 0.5] + [10.0, -2.0]
    record = Standardization.fit(x)
    u = record.apply(x)
    np.testing.assert_allclose(u.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(u.std(axis=0), 1, atol=1e-12)
    np.testing.assert_allclose(Standardize(record.mean, record.std).inverse(u)[0], x)  # the saved layer's inverse
    # a standard normal model of u is the Gaussian N(mean, diag(std²)) of x
    log_p_u = -0.5 * (u**2).sum(axis=1) - np.log(2 * np.pi)
    gaussian = -0.5 * (((x - record.mean) / record.std) ** 2).sum(axis=1) - np.log(2 * np.pi * record.std.prod())
    np.testing.assert_allclose(log_p_u + record.log_abs_det, gaussian)
    again = Standardization.from_json(record.to_json(), "m", 2)
    np.testing.assert_array_equal(again.std, record.std)
    with pytest.raises(ModelFileError, match="finite"):
        Standardization.from_json({"mean": [0, float("nan")], "std": [1, 1]}, "m", 2)
    assert Standardization.fit(np.ones((3, 1))).std[0] == 1.0  # a constant column is left unscaled


def test_standardization_is_stored_in_the_model_folder(tmp_path):
    from nflow_np.architectures import build_model
    from nflow_np.io import read_config, save_model

    record = Standardization.fit(np.random.default_rng(0).normal(size=(10, 2)))
    save_model(build_model("nice", 2, layers=1, hidden=(3,)), tmp_path, {"standardization": record.to_json()})
    stored = Standardization.from_json(read_config(tmp_path)["metadata"]["standardization"], "m", 2)
    np.testing.assert_array_equal(stored.mean, record.mean)
