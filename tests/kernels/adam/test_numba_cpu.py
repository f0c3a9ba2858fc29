"""``kernels.adam.numba_cpu.adam_update`` gives the bits of the NumPy reference ``nflow_np.optim.adam_update``.

Hypothesis draws shapes (scalars, odd sizes, sizes across the parallel threshold), dtypes, step
counts, constants and value ranges including gradients of 1e±20 and exact zeros; the kernel must
equal the reference bit for bit (same operations, same order, no FMA). Also: the optimizer uses
the kernel on the numba backend and gives the same training run as on numpy; bad arguments are
refused before anything is written.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba", reason="the numba backend needs `pip install numba`")

from kernels.adam import numba_cpu
from nflow_np import backend
from nflow_np.architectures import build_model
from nflow_np.optim import Adam, adam_update


def _arrays(rng: np.random.Generator, shape: tuple[int, ...], dtype: type, magnitude: float) -> list[np.ndarray]:
    param = np.asarray(rng.standard_normal(shape), dtype=dtype)
    grad = np.asarray(magnitude * rng.standard_normal(shape), dtype=dtype)
    grad[rng.random(shape) < 0.1] = 0  # exact zeros: v stays 0 there, the step is m / ε
    m = np.asarray(magnitude * rng.standard_normal(shape), dtype=dtype)
    v = np.asarray(magnitude**2 * rng.random(shape), dtype=dtype)
    return [param, grad, m, v]


@settings(max_examples=60, deadline=None)
@given(
    shape=st.sampled_from([(), (1,), (7,), (33, 5), (4, 3, 2), (1000,), (numba_cpu.PARALLEL_MIN_ELEMENTS + 3,)]),
    dtype=st.sampled_from([np.float32, np.float64]),
    step=st.integers(1, 10_000),
    lr=st.floats(1e-6, 1.0),
    betas=st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.9999)),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
    weight_decay=st.sampled_from([0.0, 1e-2, 0.5]),
    magnitude=st.sampled_from([1e-20, 1e-3, 1.0, 1e20]),
    seed=st.integers(0, 2**32 - 1),
)
def test_fused_adam_equals_reference_bit_for_bit(
    shape: tuple[int, ...],
    dtype: type,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    magnitude: float,
    seed: int,
) -> None:
    beta1, beta2 = betas
    constants = {
        "beta1": beta1,
        "beta2": beta2,
        "eps": eps,
        "step_size": lr / (1 - beta1**step),
        "bias2": 1 - beta2**step,
        "decay": 1 - lr * weight_decay,
    }
    with np.errstate(over="ignore"):  # g² of 1e20 overflows float32 to inf in both: same bits
        reference = _arrays(np.random.default_rng(seed), shape, dtype, magnitude)
        fused = [array.copy() for array in reference]
        adam_update(*reference, **constants)
        numba_cpu.adam_update(*fused, **constants)
    for name, want, got in zip(("param", "grad", "m", "v"), reference, fused, strict=True):
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name, strict=True)


@pytest.mark.parametrize(
    ("index", "bad", "message"),
    [
        (1, np.zeros(4, np.float32), "grad must be an array of shape (3,) and dtype float32"),
        (2, np.zeros(3, np.float64), "m must be an array of shape (3,) and dtype float32"),
        (3, np.zeros(6, np.float32)[::2], "v must be C-contiguous"),
    ],
)
def test_bad_arguments_are_refused_before_writing(index: int, bad: np.ndarray, message: str) -> None:
    arrays = [np.ones(3, np.float32) for _ in range(4)]
    arrays[index] = bad
    before = [array.copy() for array in arrays]
    constants = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "step_size": 1e-3, "bias2": 1e-3, "decay": 1.0}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        numba_cpu.adam_update(*arrays, **constants)
    for array, copy in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(array, copy)


def test_integer_parameters_are_refused() -> None:
    arrays = [np.ones(3, np.int64) for _ in range(4)]
    with pytest.raises(TypeError, match="float32 or float64"):
        numba_cpu.adam_update(*arrays, beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3, bias2=1e-3, decay=1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_on_the_numba_backend_gives_the_numpy_run(dtype: type) -> None:
    """The backend picks the fused update, and a short run agrees with NumPy's to rounding.

    Not bit for bit: the numba coupling-law kernels differ from NumPy's ufuncs in the last bits
    (their bound is in ``law_check``); the optimizer's own bits are the test above.
    """
    x = np.random.default_rng(1).standard_normal((64, 6)).astype(dtype)
    runs = {}
    for name in ("numpy", "numba"):
        with backend.using(name):
            assert (backend.fused("adam_update", adam_update) is adam_update) == (name == "numpy")
            model = build_model("realnvp", 6, layers=2, hidden=(8,), dtype=dtype)
            optimizer = Adam(model, lr=1e-2, weight_decay=1e-3)
            for _ in range(5):
                model.zero_grad()
                model.nll_and_backward(x)
                optimizer.step()
            runs[name] = (model.state_dict(), optimizer.state_dict())
    for key, value in runs["numpy"][0].items():
        np.testing.assert_allclose(runs["numba"][0][key], value, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    ranks=st.integers(1, 5),
    width=st.sampled_from([1, 17, 2048, 2049, 5000]),
    dtype=st.sampled_from([np.float32, np.float64]),
    zero_rows=st.sets(st.integers(0, 4)),
    seed=st.integers(0, 2**32 - 1),
)
def test_fused_sum_of_regions_equals_reference_bit_for_bit(
    ranks: int, width: int, dtype: type, zero_rows: set[int], seed: int
) -> None:
    """The ranks' weighted gradients summed in rank order into every row; rows of weight 0 hold NaN and ∞
    (a failed rank's half-written gradient) and must add +0, never be read into a product."""
    from nflow_np.distributed_reduce import sum_regions

    rng = np.random.default_rng(seed)
    regions = (rng.standard_normal((ranks, width)) * 10.0 ** rng.integers(-20, 20, (ranks, width))).astype(dtype)
    regions[:, : min(width, 3)] = -0.0  # a sum of negative zeros stays -0.0 unless a row of weight 0 adds +0
    weights = rng.random(ranks).astype(dtype)
    for row in zero_rows & set(range(ranks)):
        weights[row] = 0
        regions[row, ::2] = np.nan
        regions[row, 1::2] = np.inf
    start, stop = sorted(rng.integers(0, width + 1, 2).tolist())
    reference, fused = regions.copy(), regions.copy()
    with np.errstate(over="ignore"):
        sum_regions(reference, weights, start, stop)
        numba_cpu.sum_regions(fused, weights, start, stop)
    np.testing.assert_array_equal(fused.view(np.uint8), reference.view(np.uint8))  # bits, the sign of 0 included
    if stop > start:
        np.testing.assert_array_equal(reference[:, start:stop], np.broadcast_to(reference[0, start:stop],
                                                                                (ranks, stop - start)))
    np.testing.assert_array_equal(reference[:, :start].view(np.uint8), regions[:, :start].view(np.uint8))
    np.testing.assert_array_equal(reference[:, stop:].view(np.uint8), regions[:, stop:].view(np.uint8))


def test_sum_of_regions_refuses_mismatched_weights() -> None:
    regions = np.zeros((2, 4), np.float32)
    with pytest.raises(TypeError, match="weights of their dtype"):
        numba_cpu.sum_regions(regions, np.ones(2), 0, 4)
    with pytest.raises(ValueError, match="P weights"):
        numba_cpu.sum_regions(regions, np.ones(3, np.float32), 0, 4)
    with pytest.raises(ValueError, match="outside"):
        numba_cpu.sum_regions(regions, np.ones(2, np.float32), 0, 5)
