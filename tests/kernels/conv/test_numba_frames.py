"""``kernels.conv.numba_frames`` against the NumPy references of ``nflow_np.nn.shifted``.

Hypothesis draws frames (batch 1 up, sizes 1 up, one or several channels, kernel sizes 1, 3, 5), both dtypes,
and raw inputs whose ring holds garbage (NaN), which no kernel may read. The layout kernels and ``finish``
must give the reference's bits; so must batch norm + ReLU where the statistics are given (evaluation mode,
forward and backward ``∂L/∂t``); where a kernel sums over a channel (the batch statistics, the backward's
means and the gradient sums) it agrees to rounding. Every output frame is clean (zero ring), and the results
are the same on one thread and on two.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba", reason="the numba kernels need `pip install numba`")

import numba

from kernels.conv import numba_frames
from nflow_np import backend
from nflow_np.nn import shifted

SETTINGS = settings(max_examples=40, deadline=None)
frames = st.builds(shifted.Frame, st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.sampled_from([1, 3, 5]))
dtypes = st.sampled_from([np.float32, np.float64])
seeds = st.integers(0, 2**32 - 1)


def close(dtype: type) -> dict:
    return {"rtol": 1e-4, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-11, "atol": 1e-12}


def raw(rng: np.random.Generator, frame: shifted.Frame, channels: int, dtype: type) -> np.ndarray:
    """A convolution's raw output: values at the pixels, NaN on the ring."""
    values = np.full((channels, frame.length), np.nan, dtype=dtype)
    frame.pixels(values)[...] = rng.standard_normal(frame.pixels(values).shape)
    return values


def assert_clean(f: np.ndarray, frame: shifted.Frame) -> None:
    ring = np.ones(frame.length, dtype=bool)
    ring[frame.pixels(np.arange(frame.length)[None]).ravel()] = False
    assert not f[:, ring].any() and not np.isnan(f[:, ring]).any()


def on_threads(threads: int, call: object) -> object:
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        return call()
    finally:
        numba.set_num_threads(before)


def bn_arguments(rng: np.random.Generator, channels: int, dtype: type) -> dict:
    return {"bias": rng.standard_normal(channels).astype(dtype), "gamma": rng.uniform(0.5, 2, channels).astype(dtype),
            "beta": rng.standard_normal(channels).astype(dtype)}  # fmt: skip


@SETTINGS
@given(frame=frames, channels=st.integers(1, 4), dtype=dtypes, seed=seeds, with_bias=st.booleans())
def test_layout_kernels_give_the_references_bits(frame: shifted.Frame, channels: int, dtype: type, seed: int,
                                                 with_bias: bool) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((frame.n, channels, frame.h, frame.w)).astype(dtype)
    got = numba_frames.to_frame(x.transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2), frame)  # non-contiguous in
    np.testing.assert_array_equal(got, shifted.to_frame(x, frame))
    assert got.dtype == dtype
    bias = rng.standard_normal(channels).astype(dtype) if with_bias else None
    y = raw(rng, frame, channels, dtype)
    np.testing.assert_array_equal(numba_frames.from_frame(y, frame, bias), shifted.from_frame(y, frame, bias))
    skip = shifted.to_frame(rng.standard_normal(x.shape).astype(dtype), frame)
    for skip_in in (None, skip):
        got, want = numba_frames.finish(y.copy(), frame, bias, skip_in), shifted.finish(y.copy(), frame, bias, skip_in)
        np.testing.assert_array_equal(got, want)
        assert_clean(got, frame)


@SETTINGS
@given(frame=frames, channels=st.integers(1, 4), dtype=dtypes, seed=seeds, training=st.booleans(),
       threads=st.sampled_from([1, 2]))  # fmt: skip
def test_batch_norm_relu_matches_the_reference(frame: shifted.Frame, channels: int, dtype: type, seed: int,
                                               training: bool, threads: int) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    t = raw(rng, frame, channels, dtype)
    a = bn_arguments(rng, channels, dtype)
    stats = {} if training else {"mean": rng.standard_normal(channels).astype(dtype),
                                 "var": rng.uniform(0.5, 2, channels).astype(dtype)}  # fmt: skip
    want = shifted.batch_norm_relu(t, frame, a["bias"], a["gamma"], a["beta"], 1e-5, **stats)
    got = on_threads(threads, lambda: numba_frames.batch_norm_relu(t, frame, a["bias"], a["gamma"], a["beta"], 1e-5,
                                                                   **stats))  # fmt: skip
    again = on_threads(1, lambda: numba_frames.batch_norm_relu(t, frame, a["bias"], a["gamma"], a["beta"], 1e-5,
                                                               **stats))  # fmt: skip
    for g, w, r in zip(got, want, again, strict=True):
        assert g.dtype == dtype
        np.testing.assert_array_equal(g, r)  # the same for every thread count
        if training:
            np.testing.assert_allclose(g, w, **close(dtype))
        else:
            np.testing.assert_array_equal(g, w)
    assert_clean(got[0], frame)


@SETTINGS
@given(frame=frames, channels=st.integers(1, 4), dtype=dtypes, seed=seeds, training=st.booleans(),
       threads=st.sampled_from([1, 2]))  # fmt: skip
def test_batch_norm_relu_backward_matches_the_reference(frame: shifted.Frame, channels: int, dtype: type, seed: int,
                                                        training: bool, threads: int) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    t, d_u = raw(rng, frame, channels, dtype), raw(rng, frame, channels, dtype)
    a = bn_arguments(rng, channels, dtype)
    _, mean, var = shifted.batch_norm_relu(t, frame, a["bias"], a["gamma"], a["beta"], 1e-5)
    inv_std = 1 / np.sqrt(var + 1e-5)
    arguments = (d_u, t, frame, a["bias"], a["gamma"], a["beta"], mean, inv_std, training)
    want = shifted.batch_norm_relu_backward(*arguments)
    got = on_threads(threads, lambda: numba_frames.batch_norm_relu_backward(*arguments))
    again = on_threads(1, lambda: numba_frames.batch_norm_relu_backward(*arguments))
    channel = (slice(None), None, None, None)
    x_hat = (frame.pixels(t) + a["bias"][channel] - mean[channel]) * inv_std[channel]
    # the sums' terms are at most |d_u| (1 + |x̂|) γ inv_std in size: their rounding is relative to that
    scale = float(np.abs(frame.pixels(d_u)).sum()) * (1 + np.abs(x_hat).max()) * (1 + (a["gamma"] * inv_std).max())
    for index, (g, w, r) in enumerate(zip(got, want, again, strict=True)):
        assert g.dtype == dtype
        np.testing.assert_array_equal(g, r)
        if index == 0 and not training:
            np.testing.assert_array_equal(g, w)
        elif index == 0:
            np.testing.assert_allclose(g, w, **close(dtype))
        else:
            np.testing.assert_allclose(g, w, rtol=0, atol=32 * np.finfo(dtype).eps * scale)
    assert_clean(got[0], frame)


def test_the_numba_backend_runs_the_resnet_on_its_kernels() -> None:
    """The numba record lists the frame kernels; the ResNet on them equals the ResNet on the references."""
    from nflow_np.nn.resnet import ResNet

    with backend.using("numba"):
        assert backend.fused("frame.batch_norm_relu", shifted.batch_norm_relu) is numba_frames.batch_norm_relu
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 5, 4)).astype(np.float32)
    d_y = rng.standard_normal((3, 3, 5, 4)).astype(np.float32)
    results = []
    for name in ("numpy", "numba"):
        net = ResNet(2, 3, (5, 4), features=4, blocks=2, rng=np.random.default_rng(1), dtype=np.float32)
        for m in net.modules():
            if hasattr(m, "training"):
                m.training = True
        net.layers[-1].params["g"][...] = 1.0  # a live last layer, so every gradient is non-zero
        with backend.using(name):
            y = net.forward(x)
            d_x = net.backward(d_y)
        results.append([y, d_x, *(g for _, _, g in net.named_parameters())])
    for got, want in zip(*results, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
