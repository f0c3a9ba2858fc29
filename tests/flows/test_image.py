"""Image flows (nflow_np/flows/image.py): masks, Squeeze, FactorOut, and a small multi-scale model end to end.

Every layer is checked with the library-wide helpers: gradients (input and every parameter, both
directions) against central differences in float64, log-dets against ``slogdet`` of the numerical
Jacobian, and exact round trips.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import check_flow_gradients, check_logdet, randomise
from hypothesis import given, settings
from hypothesis import strategies as st
from image_cases import HIDDEN, core_flow, interior_levels, small_realnvp

from nflow_np.flows import AffineCoupling, FactorOut, Rescale, Sequential, Squeeze, channel_mask, checkerboard_mask

FEW = settings(max_examples=8, deadline=None)
seeds = st.integers(0, 2**32 - 1)
directions = st.sampled_from(["forward", "inverse"])
# (C, H, W) with even H, W, at most 24 pixels so finite differences stay cheap
even_shapes = st.tuples(st.integers(1, 3), st.sampled_from([2, 4]), st.sampled_from([2, 4])).filter(
    lambda s: s[0] * s[1] * s[2] <= 24
)


# --- masks ---------------------------------------------------------------------------------------


def test_checkerboard_mask_pattern() -> None:
    mask = checkerboard_mask((2, 3, 4), 0).reshape(2, 3, 4)
    expected = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0]], dtype=bool)
    assert np.array_equal(mask[0], expected) and np.array_equal(mask[1], expected)
    assert np.array_equal(checkerboard_mask((2, 3, 4), 1), ~checkerboard_mask((2, 3, 4), 0))


def test_channel_mask_is_contiguous_halves() -> None:
    mask = channel_mask((4, 2, 3), 0)
    assert mask.tolist() == [True] * 12 + [False] * 12
    assert np.array_equal(channel_mask((4, 2, 3), 1), ~mask)
    coupling = AffineCoupling(24, mask=mask, hidden=HIDDEN)
    assert isinstance(coupling.idx1, slice) and isinstance(coupling.idx2, slice)  # views, no gather


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: checkerboard_mask((1, 4, 4), 2), "parity must be 0 or 1"),
        (lambda: checkerboard_mask((3, 1, 1), 0), "at least two pixels"),
        (lambda: channel_mask((3, 2, 2), 0), "even number of channels"),
        (lambda: checkerboard_mask((1, 4), 0), r"\(C, H, W\)"),
        (lambda: Squeeze((1, 3, 4)), "even height and width"),
        (lambda: Squeeze((0, 2, 2)), "positive integers"),
        (lambda: FactorOut(4, Rescale(4)), "1 to 3 coordinates"),
    ],
)
def test_construction_errors(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@FEW
@given(shape=even_shapes, parity=st.sampled_from([0, 1]), channel=st.booleans(), seed=seeds, direction=directions)
def test_masked_coupling_gradients_and_logdet(
    shape: tuple[int, int, int], parity: int, channel: bool, seed: int, direction: str
) -> None:
    """A coupling on a checkerboard or channel-wise mask is an ordinary coupling over the C·H·W columns."""
    if channel and shape[0] % 2:
        shape = (2, shape[1], shape[2])
    rng = np.random.default_rng(seed)
    mask = channel_mask(shape, parity) if channel else checkerboard_mask(shape, parity)
    flow = randomise(AffineCoupling(mask.size, mask=mask, hidden=HIDDEN, rng=rng), rng)
    x = rng.standard_normal((3, mask.size))
    check_flow_gradients(flow, x, direction, rng)
    check_logdet(flow, x, direction, rows=2)


# --- squeeze ---------------------------------------------------------------------------------------


def test_squeeze_moves_each_pixel_where_the_docstring_says() -> None:
    c, h, w = 2, 4, 6
    squeeze = Squeeze((c, h, w))
    x = np.arange(2 * c * h * w, dtype=np.float64).reshape(2, -1)
    z, logdet = squeeze.forward(x)
    image, out = x.reshape(2, c, h, w), z.reshape(2, *squeeze.out_shape)
    assert squeeze.out_shape == (4 * c, h // 2, w // 2)
    for ch in range(c):
        for i in range(2):
            for j in range(2):
                assert np.array_equal(out[:, 4 * ch + 2 * i + j], image[:, ch, i::2, j::2])
    assert np.array_equal(logdet, np.zeros(2))


@FEW
@given(shape=even_shapes, n=st.integers(1, 4), seed=seeds, direction=directions)
def test_squeeze_gradients_logdet_and_round_trip(
    shape: tuple[int, int, int], n: int, seed: int, direction: str
) -> None:
    rng = np.random.default_rng(seed)
    squeeze = Squeeze(shape)
    x = rng.standard_normal((n, squeeze.dim))
    check_flow_gradients(squeeze, x, direction, rng)
    check_logdet(squeeze, x, direction, rows=1)
    z, _ = squeeze.forward(x)
    assert np.array_equal(squeeze.inverse(z)[0], x)
    assert np.array_equal(squeeze.forward(squeeze.inverse(x)[0])[0], x)


# --- factor-out --------------------------------------------------------------------------------------


@FEW
@given(dim=st.integers(3, 7), seed=seeds, direction=directions)
def test_factor_out_gradients_logdet_and_round_trip(dim: int, seed: int, direction: str) -> None:
    rng = np.random.default_rng(seed)
    keep = int(rng.integers(2, dim))
    inner = Sequential([AffineCoupling(keep, parity=0, hidden=HIDDEN, rng=rng), Rescale(keep)])
    flow = randomise(FactorOut(dim, inner), rng)
    x = rng.standard_normal((3, dim))
    check_flow_gradients(flow, x, direction, rng)
    check_logdet(flow, x, direction, rows=2)
    z, logdet = flow.forward(x)
    assert np.array_equal(z[:, keep:], x[:, keep:])  # the factored-out part goes to z unchanged
    assert np.allclose(logdet, inner.forward(x[:, :keep])[1])
    back, inverse_logdet = flow.inverse(z)
    np.testing.assert_allclose(back, x, atol=1e-12)
    np.testing.assert_allclose(inverse_logdet, -logdet, atol=1e-12)


# --- a small multi-scale model, end to end -----------------------------------------------------------


def test_multi_scale_structure() -> None:
    model = small_realnvp(np.random.default_rng(0))
    names = [type(layer).__name__ for layer in model.flow.flows]
    assert names == ["Dequantize", "Scale", "Logit", "Sequential"]
    scale1 = model.flow.flows[3]
    kinds = [type(layer).__name__ for layer in scale1.flows]
    assert kinds == ["AffineCoupling", "BatchNorm"] * 2 + ["Squeeze"] + ["AffineCoupling", "BatchNorm"] * 2 + [
        "FactorOut"
    ]
    factor_out = scale1.flows[-1]
    assert (factor_out.dim, factor_out.keep) == (16, 8)  # (4, 2, 2) after the squeeze; 2 channels go on


@settings(max_examples=4, deadline=None)
@given(seed=seeds, direction=directions)
def test_multi_scale_gradients(seed: int, direction: str) -> None:
    rng = np.random.default_rng(seed)
    model = small_realnvp(rng)
    flow = core_flow(model)  # scale to [0, 1], logit, couplings, squeeze, batch norms, factor-out
    x = interior_levels(rng, 2, model.dim, model.levels) if direction == "forward" else rng.standard_normal((2, 16))
    check_flow_gradients(flow, x, direction, rng)


@settings(max_examples=4, deadline=None)
@given(seed=seeds)
def test_multi_scale_logdet_and_round_trip(seed: int) -> None:
    rng = np.random.default_rng(seed)
    model = small_realnvp(rng)
    flow = core_flow(model)
    x = interior_levels(rng, 3, model.dim, model.levels)
    check_logdet(flow, x, "forward", rows=2)
    z, logdet = flow.forward(x)
    check_logdet(flow, z, "inverse", rows=2)
    back, inverse_logdet = flow.inverse(z)
    np.testing.assert_allclose(back, x, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(inverse_logdet, -logdet, rtol=1e-9, atol=1e-9)
