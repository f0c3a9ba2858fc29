"""Bad training data (nflow_np/validation.py, check_data via fit): refused before the first step, by name.

Every case checks three things: the error type, a message that names the problem (for a NaN/Inf:
its row and column), and that nothing happened yet (parameters, optimizer and checkpoint folder
untouched).
"""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nflow_np.architectures import build_model
from nflow_np.optim import Adam
from nflow_np.train import fit
from nflow_np.validation import DataConversionWarning

FAST = settings(max_examples=30, deadline=None)


def tiny_model(dtype: object = np.float64):
    return build_model("realnvp", 2, layers=1, hidden=(4,), dtype=dtype)


def assert_refused_before_training(train, error: type, message: str, val=None, batch_size: int = 4) -> None:
    """``fit`` raises ``error`` matching ``message`` and leaves the model, optimizer and folder untouched."""
    model = tiny_model()
    optimizer = Adam(model)
    before = model.state_dict()
    with tempfile.TemporaryDirectory() as folder:
        checkpoints = Path(folder) / "checkpoints"
        with pytest.raises(error, match=message):
            fit(
                model,
                train,
                val,
                optimizer=optimizer,
                epochs=1,
                batch_size=batch_size,
                checkpoint_dir=checkpoints,
                checkpoint_every=1,
                progress=False,
            )
        assert not checkpoints.exists()
    assert optimizer.step_count == 0
    for name, value in before.items():
        np.testing.assert_array_equal(model.state_dict()[name], value)


def finite_data() -> st.SearchStrategy:
    return st.integers(4, 30).flatmap(
        lambda n: hnp.arrays(np.float64, (n, 2), elements=st.floats(-10, 10, allow_nan=False, allow_infinity=False))
    )


@FAST
@given(
    data=finite_data(),
    bad=st.lists(
        st.tuples(st.integers(0, 29), st.integers(0, 1), st.sampled_from([np.nan, np.inf, -np.inf])),
        min_size=1,
        max_size=5,
    ),
    in_val=st.booleans(),
)
def test_nan_or_inf_is_named_by_its_first_row_and_column(data, bad, in_val):
    poisoned = data.copy()
    for row, column, value in bad:
        poisoned[row % len(data), column] = value
    first = np.argwhere(~np.isfinite(poisoned))[0]
    name = "val" if in_val else "train"
    count = int((~np.isfinite(poisoned)).sum())
    message = rf"{name} has a non-finite value .* row {first[0]}, column {first[1]} \({count} non-finite entr"
    if in_val:
        assert_refused_before_training(data, ValueError, message, val=poisoned)
    else:
        assert_refused_before_training(poisoned, ValueError, message)


@FAST
@given(shape=st.one_of(hnp.array_shapes(min_dims=1, max_dims=1, min_side=4), hnp.array_shapes(min_dims=3, max_dims=4)))
def test_wrong_number_of_dimensions_is_refused(shape):
    x = np.zeros(shape)
    assert_refused_before_training(x, ValueError, rf"train must be 2-D with shape \(N, 2\).*got {len(shape)}-D")


@FAST
@given(columns=st.integers(1, 6).filter(lambda c: c != 2), rows=st.integers(4, 10))
def test_wrong_number_of_columns_is_refused(columns, rows):
    message = f"train has {columns} columns but this flow works in dimension 2"
    assert_refused_before_training(np.zeros((rows, columns)), ValueError, message)


@FAST
@given(
    dtype=st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]),
    data=st.data(),
)
def test_integers_are_converted_explicitly_and_train_like_floats(dtype, data):
    low = 0 if np.dtype(dtype).kind == "u" else -20
    x = data.draw(hnp.arrays(dtype, (12, 2), elements=st.integers(low, 20)))
    results = []
    for train in (x, x.astype(np.float64)):
        model = tiny_model()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(model, train, epochs=1, batch_size=4, progress=False)
        converted = [w for w in caught if issubclass(w.category, DataConversionWarning)]
        assert len(converted) == (train.dtype.kind != "f")
        if converted:
            assert f"train has integer dtype {np.dtype(dtype)}; converted to float64" in str(converted[0].message)
        results.append(model.state_dict())
    for name in results[0]:
        np.testing.assert_array_equal(results[0][name], results[1][name])


@FAST
@given(row=st.integers(0, 7), column=st.integers(0, 1), excess=st.integers(1, 2**20))
def test_integers_too_large_for_the_float_dtype_are_refused(row, column, excess):
    x = np.zeros((8, 2), dtype=np.int64)
    x[row, column] = 2**53 + excess
    message = rf"holds the integer {2**53 + excess} at index \({row}, {column}\), too large to convert to float64"
    assert_refused_before_training(x, ValueError, message)


@pytest.mark.parametrize(
    ("x", "what"),
    [
        (np.array([[None, 1.0]] * 8, dtype=object), "Python objects"),
        (np.ones((8, 2), dtype=bool), "booleans"),
        (np.ones((8, 2), dtype=complex), "complex numbers"),
        (np.full((8, 2), "1.5"), "strings"),
        (np.zeros((8, 2), dtype="datetime64[s]"), "not numbers"),
    ],
    ids=["object", "bool", "complex", "str", "datetime"],
)
def test_non_numeric_dtypes_are_refused_by_name(x, what):
    assert_refused_before_training(x, TypeError, rf"train has dtype {re.escape(str(x.dtype))} \({what}\)")


def test_other_float_precisions_and_non_arrays_are_refused():
    assert_refused_before_training(np.zeros((8, 2), np.float16), TypeError, "float16; expected float32 or float64")
    assert_refused_before_training(np.zeros((8, 2), np.float32), TypeError, "but the parameters are float64")
    assert_refused_before_training([[0.0, 1.0]] * 8, TypeError, "must be a numpy.ndarray, got list")


def test_empty_data_is_refused():
    assert_refused_before_training(np.zeros((0, 2)), ValueError, r"train is empty: shape \(0, 2\), no rows")
    assert_refused_before_training(np.zeros((8, 2)), ValueError, r"val is empty", val=np.zeros((0, 2)))


@FAST
@given(rows=st.integers(1, 20), extra=st.integers(1, 100))
def test_a_batch_larger_than_the_data_is_refused(rows, extra):
    message = rf"batch_size must be between 1 and the {rows} training rows, got {rows + extra} \(the batch is larger"
    assert_refused_before_training(np.zeros((rows, 2)), ValueError, message, batch_size=rows + extra)
