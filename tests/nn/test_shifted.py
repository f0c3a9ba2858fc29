"""``nflow_np.nn.shifted`` and the ResNet's shifted path (``nflow_np.nn.shifted_resnet``).

The frame's geometry (every pixel once, every shifted read inside the frame, the ring where the doc says);
the shifted convolution against a direct loop and against im2col, in both dtypes, with chunks from one
column up (so every chunk boundary is crossed); the mask argument (garbage in the raw output's ring is
discarded, a non-zero ring in the input would change the border pixels); central-difference gradients in
float64 over hypothesis-drawn shapes (batch 1 up, odd sizes, one or several channels, kernel sizes 1, 3, 5)
for ``Conv2d(formulation="shifted")`` and the ResNet on the shifted path, in evaluation and training mode;
the ResNet's two formulations equal to round-off (output, input gradient, every parameter gradient, running
averages), on every backend; no caches under ``no_grad``; the layers' path where frames cannot be used.
"""

from __future__ import annotations

import contextlib
import itertools
from unittest import mock

import numpy as np
import pytest
from conv_cases import direct_conv
from helpers import BACKENDS, check_layer_gradients, randomise
from hypothesis import given, settings
from hypothesis import strategies as st

from nflow_np import backend, gemm, no_grad
from nflow_np.nn import shifted
from nflow_np.nn.conv import Conv2d
from nflow_np.nn.resnet import ResNet, set_formulation

FAST = settings(max_examples=20, deadline=None)
FEW = settings(max_examples=8, deadline=None)

batches = st.integers(1, 3)
channels = st.integers(1, 3)
sizes = st.integers(1, 7)
odd_sizes = st.sampled_from([1, 3, 5])
kernels = st.sampled_from([1, 3, 5])
seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from([np.float32, np.float64])
thins = st.sampled_from([0, 1000])  # THIN_CHANNELS: 0 computes every convolution shifted, 1000 every one by a gather


def thin_channels(thin: int) -> contextlib.AbstractContextManager:
    """``shifted.THIN_CHANNELS`` set to ``thin``: the tests' channel counts (1–3) would otherwise always gather."""
    return mock.patch.object(shifted, "THIN_CHANNELS", thin)


def tolerance(dtype: type) -> dict:
    return {"rtol": 2e-4, "atol": 2e-5} if dtype == np.float32 else {"rtol": 1e-11, "atol": 1e-12}


# -- the frame ----------------------------------------------------------------------------------------------------
@FAST
@given(n=batches, h=sizes, w=sizes, k=kernels)
def test_the_frame_holds_every_pixel_once_and_every_shifted_read_inside(n: int, h: int, w: int, k: int) -> None:
    frame = shifted.Frame(n, h, w, k)
    positions = np.arange(frame.length)[None]
    pixel_positions = frame.pixels(positions).ravel()
    assert len(np.unique(pixel_positions)) == n * h * w == frame.pixel_count
    assert pixel_positions.min() == frame.start and pixel_positions.max() == frame.stop - 1
    for _, _, d in frame.offsets():  # every read of every computed column lies inside the frame
        assert frame.start + d >= 0 and frame.stop - 1 + d <= frame.length - 1
    # a pixel's shifted read is the padded image's entry: the pixel it names, or a ring position
    ring = np.ones(frame.length, dtype=bool)
    ring[pixel_positions] = False
    index = frame.pixels(positions)[0]
    p = k // 2
    for (m, r, c), q in np.ndenumerate(index):
        for i, j, d in frame.offsets():
            rr, cc = r + i - p, c + j - p
            if 0 <= rr < h and 0 <= cc < w:
                assert q + d == index[m, rr, cc]
            else:
                assert ring[q + d]


@FAST
@given(n=batches, h=sizes, w=sizes, k=kernels, chunk=st.integers(1, 300), dtype=dtypes)
def test_chunks_cover_the_range_and_frames_are_aligned(n: int, h: int, w: int, k: int, chunk: int,
                                                       dtype: type) -> None:  # fmt: skip
    frame = shifted.Frame(n, h, w, k)
    spans = shifted._chunks(frame, chunk)
    assert spans[0][0] == frame.start and spans[-1][1] == frame.stop
    assert all(b > a for a, b in spans) and all(b == a for (_, b), (a, _) in itertools.pairwise(spans))
    if chunk >= 4 * shifted.ALIGN:
        assert all(a % shifted.ALIGN == 0 for a, _ in spans[1:])
        assert max(b - a for a, b in spans) <= chunk + shifted.ALIGN
    else:
        assert max(b - a for a, b in spans) <= chunk
    assert frame.length % shifted.ALIGN == 0 and 0 <= frame.length - frame.end < shifted.ALIGN
    for zero in (False, True):
        f = shifted.new_frame(3, frame, dtype, zero=zero)
        assert f.shape == (3, frame.length) and f.dtype == dtype and f.flags.c_contiguous
        assert f.ctypes.data % 64 == 0 and f.strides[0] % 64 == 0
    assert not np.any(shifted.new_frame(2, frame, dtype, zero=True))


def test_frame_layout_functions() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5))
    frame = shifted.frame_of(x.shape, 3)
    f = shifted.to_frame(x, frame)
    assert f.shape == (3, frame.length) and np.count_nonzero(f) == x.size
    bias = rng.standard_normal(3)
    np.testing.assert_array_equal(shifted.from_frame(f, frame), x)
    np.testing.assert_array_equal(shifted.from_frame(f, frame, bias), x + bias[None, :, None, None])
    dirty = f + 7.0  # garbage everywhere but at the pixels: finish clears it and adds bias and skip
    shifted.finish(dirty, frame, bias, skip=f)
    np.testing.assert_array_equal(shifted.from_frame(dirty, frame), (x + 7.0 + bias[None, :, None, None]) + x)
    assert np.count_nonzero(dirty) == np.count_nonzero(shifted.from_frame(dirty, frame))


# -- the convolution ----------------------------------------------------------------------------------------------
@FAST
@given(n=batches, c_in=channels, c_out=channels, h=sizes, w=sizes, k=kernels, dtype=dtypes, seed=seeds,
       chunk=st.sampled_from([None, 1, 2, 7]), method=st.sampled_from(shifted.METHODS))  # fmt: skip
def test_shifted_conv_matches_the_direct_loop_and_im2col(n: int, c_in: int, c_out: int, h: int, w: int, k: int,
                                                        dtype: type, seed: int, chunk: int | None,
                                                        method: str) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c_in, h, w)).astype(dtype)
    filters = rng.standard_normal((c_out, c_in, k, k)).astype(dtype)
    bias = rng.standard_normal(c_out).astype(dtype)
    frame = shifted.frame_of(x.shape, k)
    raw = np.full((c_out, frame.length), np.nan, dtype=dtype)  # garbage the pass must not read
    shifted.conv_forward(shifted.to_frame(x, frame), shifted.stack_weights(filters), frame, out=raw, chunk=chunk,
                         method=method)
    y = shifted.from_frame(raw, frame, bias)
    assert y.dtype == dtype
    want = direct_conv(x.astype(np.float64), filters.astype(np.float64), bias)
    np.testing.assert_allclose(y, want, **tolerance(dtype))
    im2col = Conv2d(c_in, c_out, k, rng, dtype=dtype, weight_norm=False)
    im2col.params["W"][...], im2col.params["b"][...] = filters, bias
    np.testing.assert_allclose(y, im2col.forward(x), **tolerance(dtype))


@FAST
@given(n=batches, c_in=channels, c_out=channels, h=sizes, w=sizes, k=kernels, dtype=dtypes, seed=seeds,
       chunk=st.sampled_from([None, 1, 3]), wn=st.booleans(), thin=thins)  # fmt: skip
def test_the_shifted_conv2d_layer_equals_the_im2col_layer(n: int, c_in: int, c_out: int, h: int, w: int, k: int,
                                                          dtype: type, seed: int, chunk: int | None, wn: bool,
                                                          thin: int) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    layers = [Conv2d(c_in, c_out, k, np.random.default_rng(1), dtype, wn, formulation=f) for f in ("im2col", "shifted")]
    for layer in layers:
        randomise(layer, np.random.default_rng(2))
    x = rng.standard_normal((n, c_in, h, w)).astype(dtype)
    d_y = rng.standard_normal((n, c_out, h, w)).astype(dtype)
    results = []
    chunks = mock.patch.object(shifted, "chunk_columns", lambda *args: chunk) if chunk else contextlib.nullcontext()
    for layer in layers:
        with chunks, thin_channels(thin):
            y = layer.forward(x)
            d_x = layer.backward(d_y)
        assert y.dtype == d_x.dtype == dtype
        results.append([y, d_x] + [grad for _, _, grad in layer.named_parameters()])
    for got, want in zip(*results, strict=True):
        np.testing.assert_allclose(got, want, **tolerance(dtype))


def test_the_ring_must_be_zero() -> None:
    """The mask argument: with a non-zero ring the border pixels read it (so ``finish`` zeroes it)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 4, 4))
    filters = rng.standard_normal((3, 2, 3, 3))
    frame = shifted.frame_of(x.shape, 3)
    clean = shifted.to_frame(x, frame)
    wk = shifted.stack_weights(filters)
    want = shifted.from_frame(shifted.conv_forward(clean, wk, frame), frame)
    dirty = clean + (clean == 0)  # ones on the ring
    got = shifted.from_frame(shifted.conv_forward(dirty, wk, frame), frame)
    border = np.ones((4, 4), dtype=bool)
    border[1:-1, 1:-1] = False
    assert np.all(np.abs(got - want)[:, :, border] > 0)
    np.testing.assert_allclose(got[:, :, 1:-1, 1:-1], want[:, :, 1:-1, 1:-1], rtol=1e-12, atol=1e-12)


@FAST
@given(n=batches, c_in=channels, c_out=channels, h=odd_sizes, w=odd_sizes, k=kernels, wn=st.booleans(), seed=seeds,
       thin=thins)  # fmt: skip
def test_shifted_conv2d_gradients(n: int, c_in: int, c_out: int, h: int, w: int, k: int, wn: bool, seed: int,
                                  thin: int) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    layer = randomise(Conv2d(c_in, c_out, k, rng, weight_norm=wn, formulation="shifted"), rng)
    with thin_channels(thin):
        check_layer_gradients(layer, rng.standard_normal((n, c_in, h, w)), rng)


# -- the ResNet on frames -----------------------------------------------------------------------------------------
def resnet(c_in: int, c_out: int, shape: tuple, k: int, blocks: int, features: int, dtype: type, mode: str,
           formulation: str, seed: int) -> ResNet:  # fmt: skip
    """A ResNet with random parameters and positive running variances, in ``mode`` (momentum 0.5 in training)."""
    net = ResNet(c_in, c_out, shape, features, blocks, k, np.random.default_rng(seed), dtype, formulation=formulation)
    rng = np.random.default_rng(seed + 1)
    randomise(net, rng)
    for m in net.modules():
        if "running_var" in m.buffers:
            m.buffers["running_var"][...] = rng.uniform(0.5, 2.0, size=m.buffers["running_var"].shape)
        if hasattr(m, "training"):
            m.training, m.momentum = mode == "train", 0.5
    return net


@FEW
@given(n=batches, c_in=channels, c_out=channels, h=odd_sizes, w=odd_sizes, k=kernels, blocks=st.integers(0, 2),
       mode=st.sampled_from(["eval", "train"]), seed=seeds, thin=thins)  # fmt: skip
def test_shifted_resnet_gradients(n: int, c_in: int, c_out: int, h: int, w: int, k: int, blocks: int, mode: str,
                                  seed: int, thin: int) -> None:  # fmt: skip
    n = max(n, 2) if mode == "train" else n
    net = resnet(c_in, c_out, (h, w), k, blocks, 2, np.float64, mode, "shifted", seed)
    if mode == "train":
        for m in net.modules():
            if hasattr(m, "momentum"):
                m.momentum = 0.0  # frozen running averages: finite differences see one function
    rng = np.random.default_rng(seed)
    with thin_channels(thin):
        check_layer_gradients(net, rng.standard_normal((n, c_in, h, w)), rng)
    assert net._path == "shifted"


@FEW
@given(n=batches, c_in=channels, c_out=channels, h=sizes, w=sizes, k=kernels, blocks=st.integers(0, 2),
       mode=st.sampled_from(["eval", "train"]), dtype=dtypes, seed=seeds,
       name=st.sampled_from(BACKENDS), thin=thins)  # fmt: skip
def test_the_two_formulations_agree(n: int, c_in: int, c_out: int, h: int, w: int, k: int, blocks: int, mode: str,
                                    dtype: type, seed: int, name: str, thin: int) -> None:  # fmt: skip
    n = max(n, 2) if mode == "train" else n
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c_in, h, w)).astype(dtype)
    d_y = rng.standard_normal((n, c_out, h, w)).astype(dtype)
    results = []
    with backend.using(name), thin_channels(thin):
        for formulation in ("im2col", "shifted"):
            net = resnet(c_in, c_out, (h, w), k, blocks, 3, dtype, mode, formulation, seed)
            y = net.forward(x)
            d_x = net.backward(d_y)
            assert net._path == ("layers" if formulation == "im2col" else "shifted")
            assert y.dtype == d_x.dtype == dtype
            results.append([y, d_x, *(g for _, _, g in net.named_parameters()), *(b for _, b in net.named_buffers())])
    for got, want in zip(*results, strict=True):
        np.testing.assert_allclose(got, want, **tolerance(dtype))


def test_no_caches_under_no_grad_and_backward_refuses() -> None:
    net = resnet(1, 2, (5, 3), 3, 1, 2, np.float64, "eval", "shifted", 0)
    x = np.random.default_rng(0).standard_normal((2, 1, 5, 3))
    with no_grad():
        y = net.forward(x)
    assert net.cached_arrays() == []
    with pytest.raises(RuntimeError, match="backward called before forward"):
        net.backward(np.ones_like(y))
    net.forward(x)
    assert net.cached_arrays()  # kept with gradients enabled
    net.free_caches()
    assert net.cached_arrays() == []


def test_synchronised_batch_norms_take_the_layers_path() -> None:
    """``moments`` set (data-parallel training) normalises by the global batch: the layers path does that."""

    class LocalMoments:
        def mean_var(self, xv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return xv.mean(axis=(0, 2)), xv.var(axis=(0, 2))

        def backward_means(self, d_x_hat: np.ndarray, x_hat: np.ndarray, d_logdet: np.ndarray) -> tuple:
            return (d_x_hat.mean(axis=(0, 2), keepdims=True), (d_x_hat * x_hat).mean(axis=(0, 2), keepdims=True),
                    d_logdet.sum() / d_x_hat.shape[0])  # fmt: skip

    x = np.random.default_rng(0).standard_normal((3, 1, 3, 3))
    plain = resnet(1, 2, (3, 3), 3, 1, 2, np.float64, "train", "shifted", 0)
    synced = resnet(1, 2, (3, 3), 3, 1, 2, np.float64, "train", "shifted", 0)
    for m in synced.modules():
        if "running_var" in m.buffers:
            m.moments = LocalMoments()
    np.testing.assert_allclose(synced.forward(x), plain.forward(x), rtol=1e-12, atol=1e-12)
    assert synced._path == "layers" and plain._path == "shifted"


def test_formulation_is_checked_and_set_on_every_net() -> None:
    with pytest.raises(ValueError, match="unknown convolution formulation 'fft'"):
        ResNet(1, 2, (3, 3), features=2, blocks=0, formulation="fft")
    with pytest.raises(ValueError, match="unknown convolution formulation"):
        Conv2d(1, 1, 3, np.random.default_rng(0), formulation="winograd")
    net = ResNet(1, 2, (3, 3), features=2, blocks=1)
    assert net.formulation == "shifted"
    assert set_formulation(net, "im2col") == [net] and net.formulation == "im2col"


@pytest.mark.parametrize("thin", [0, 1000])
@pytest.mark.parametrize("engine", gemm.available_engines())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_gemm_engine_gives_the_same_convolution(engine: str, dtype: type, thin: int) -> None:
    """Forward, weight and input gradients of the shifted conv on each engine equal the im2col layer's."""
    rng = np.random.default_rng(3)
    layers = [Conv2d(3, 4, 3, np.random.default_rng(1), dtype, formulation=f) for f in ("im2col", "shifted")]
    for layer in layers:
        randomise(layer, np.random.default_rng(2))
    x = rng.standard_normal((2, 3, 5, 6)).astype(dtype)
    d_y = rng.standard_normal((2, 4, 5, 6)).astype(dtype)
    results = []
    for layer in layers:
        with gemm.using_engine(engine), thin_channels(thin):
            results.append([layer.forward(x), layer.backward(d_y), *(g for _, _, g in layer.named_parameters())])
    for got, want in zip(*results, strict=True):
        np.testing.assert_allclose(got, want, **tolerance(dtype))


def test_thin_convolutions_gather() -> None:
    """The method by shape (``docs/conv.md#thin-convolutions``): the gathers for a side under 16 channels."""
    assert shifted.method_for(64, 64, 3) == shifted.method_for(16, 64, 3) == "shifted"
    assert shifted.method_for(5, 64, 3) == shifted.method_for(15, 16, 5) == "gather_input"
    assert shifted.method_for(64, 8, 3) == shifted.method_for(16, 2, 3) == "gather_output"
    assert shifted.method_for(2, 2, 3) == "gather_input"
    assert shifted.method_for(2, 64, 1) == "shifted"  # a 1×1 convolution has nothing to gather


@pytest.mark.parametrize("method", shifted.METHODS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_method_gives_the_same_gradients_and_accumulates(method: str, dtype: type) -> None:
    """``conv_backward``'s three methods: the same ``∂W`` and ``∂x``, with ``beta = 1`` adding to ``d_x``, on a
    chunk size that splits the frame unevenly; ``input_grad=False`` gives the same ``∂W`` and no ``∂x``."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 2, 5, 4)).astype(dtype)
    d_y = rng.standard_normal((3, 6, 5, 4)).astype(dtype)
    frame = shifted.frame_of(x.shape, 3)
    wk = shifted.stack_weights(rng.standard_normal((6, 2, 3, 3)).astype(dtype))
    x_frame, d_frame = shifted.to_frame(x, frame), shifted.to_frame(d_y, frame)
    start = rng.standard_normal((2, frame.length)).astype(dtype)
    want_w, want_x = shifted.conv_backward(d_frame, x_frame, wk, frame, method="shifted")
    got_w, got_x = shifted.conv_backward(d_frame, x_frame, wk, frame, d_x=start.copy(), beta=1.0, chunk=7,
                                         method=method)  # fmt: skip
    assert got_w.dtype == got_x.dtype == dtype
    np.testing.assert_allclose(got_w, want_w, **tolerance(dtype))
    np.testing.assert_allclose(shifted.from_frame(got_x, frame), shifted.from_frame(want_x + start, frame),
                               **tolerance(dtype))  # fmt: skip
    only_w, none = shifted.conv_backward(d_frame, x_frame, wk, frame, input_grad=False, method=method)
    assert none is None
    np.testing.assert_allclose(only_w, want_w, **tolerance(dtype))
