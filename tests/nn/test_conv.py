"""``nflow_np.nn.conv`` and ``nflow_np.nn.resnet``: Conv2d, weight normalisation, batch norm, residual nets.

Conv2d against a direct loop convolution; im2col and col2im as adjoints; every layer's gradients
(input and every parameter) against central differences in float64 over hypothesis-drawn shapes (batch
from 1, odd heights and widths, one or several channels, kernel sizes 1, 3 and 5), through
``helpers.check_layer_gradients``; dtypes kept; bad input refused with a clear message.
"""

from __future__ import annotations

import numpy as np
import pytest
from conv_cases import direct_conv
from helpers import check_layer_gradients, randomise
from hypothesis import given, settings
from hypothesis import strategies as st

from nflow_np.nn.conv import Conv2d, col2im, im2col, weight_norm, weight_norm_backward
from nflow_np.nn.resnet import BatchNorm2d, ResidualBlock, ResNet, resnet_parameters

FAST = settings(max_examples=20, deadline=None)
FEW = settings(max_examples=8, deadline=None)

batches = st.integers(1, 3)
channels = st.integers(1, 3)
odd_sizes = st.sampled_from([1, 3, 5])
sizes = st.integers(1, 5)
kernels = st.sampled_from([1, 3, 5])
seeds = st.integers(0, 2**32 - 1)


def positive_running_var(module: object, rng: np.random.Generator) -> object:
    """Random positive running variances for every batch norm below ``module`` (after :func:`randomise`)."""
    for m in module.modules():
        if "running_var" in m.buffers:
            m.buffers["running_var"][...] = rng.uniform(0.5, 2.0, size=m.buffers["running_var"].shape)
    return module


def training(module: object, momentum: float = 0.0) -> object:
    """Batch norms in training mode with frozen running averages (so finite differences see one function)."""
    for m in module.modules():
        if hasattr(m, "training"):
            m.training, m.momentum = True, momentum
    return module


# -- Conv2d is a convolution -------------------------------------------------------------------------------
@FAST
@given(n=batches, c_in=channels, c_out=channels, h=sizes, w=sizes, k=kernels, wn=st.booleans(), seed=seeds)
def test_conv2d_matches_the_direct_loop(n: int, c_in: int, c_out: int, h: int, w: int, k: int, wn: bool,
                                        seed: int) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    layer = randomise(Conv2d(c_in, c_out, k, rng, weight_norm=wn), rng)
    x = rng.standard_normal((n, c_in, h, w))
    filters, _ = layer.weight()
    np.testing.assert_allclose(layer.forward(x), direct_conv(x, filters, layer.params["b"]), rtol=1e-12, atol=1e-12)


@FAST
@given(n=batches, c=channels, h=sizes, w=sizes, k=kernels, seed=seeds)
def test_col2im_is_the_adjoint_of_im2col(n: int, c: int, h: int, w: int, k: int, seed: int) -> None:
    """``⟨im2col(x), C⟩ = ⟨x, col2im(C)⟩`` for all ``x, C``: the backward pass of the copy is its transpose."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    cols = rng.standard_normal((c * k * k, n * h * w))
    assert im2col(x, k).shape == cols.shape
    assert np.vdot(im2col(x, k), cols) == pytest.approx(np.vdot(x, col2im(cols, x.shape, k)), rel=1e-12, abs=1e-12)


def test_weight_norm_gives_each_filter_length_g() -> None:
    rng = np.random.default_rng(0)
    v, g = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    w, norm = weight_norm(v, g)
    np.testing.assert_allclose(np.sqrt((w * w).sum(axis=(1, 2, 3))), np.abs(g), rtol=1e-13)
    np.testing.assert_allclose(norm, np.sqrt((v * v).sum(axis=(1, 2, 3))), rtol=1e-13)
    # scaling v leaves w unchanged, so the gradient w.r.t. v is orthogonal to v
    d_v, _ = weight_norm_backward(rng.standard_normal(v.shape), v, g, norm)
    np.testing.assert_allclose((d_v * v).sum(axis=(1, 2, 3)), 0.0, atol=1e-12)
    np.testing.assert_allclose(weight_norm(3.0 * v, g)[0], w, rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wn", [True, False])
def test_conv2d_keeps_the_dtype(dtype: object, wn: bool) -> None:
    rng = np.random.default_rng(0)
    layer = Conv2d(2, 3, 3, rng, dtype=dtype, weight_norm=wn)
    x = rng.standard_normal((2, 2, 5, 4)).astype(dtype)
    y = layer.forward(x)
    d_x = layer.backward(np.ones_like(y))
    assert y.dtype == d_x.dtype == dtype and y.shape == (2, 3, 5, 4) and d_x.shape == x.shape
    assert all(grad.dtype == dtype for _, _, grad in layer.named_parameters())


@pytest.mark.parametrize("wn", [True, False])
def test_a_zero_initialised_conv_outputs_zero_and_still_learns(wn: bool) -> None:
    rng = np.random.default_rng(0)
    layer = Conv2d(2, 3, 3, rng, weight_norm=wn, zero_init=True)
    x = rng.standard_normal((2, 2, 3, 3))
    assert not layer.forward(x).any()
    layer.backward(rng.standard_normal((2, 3, 3, 3)))
    assert np.abs(layer.grads["g" if wn else "W"]).max() > 0


def test_conv2d_errors() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        Conv2d(1, 1, 2, rng)
    with pytest.raises(ValueError, match="positive odd integer"):
        Conv2d(1, 1, 0, rng)
    with pytest.raises(ValueError, match="positive integer in_channels"):
        Conv2d(0, 1, 3, rng)
    with pytest.raises(ValueError, match=r"expects \(N, 2, H, W\) images, got shape \(3, 1, 4, 4\)"):
        Conv2d(2, 1, 3, rng).forward(np.zeros((3, 1, 4, 4)))
    with pytest.raises(ValueError, match="expects"):
        Conv2d(2, 1, 3, rng).forward(np.zeros((3, 8)))


# -- gradients ------------------------------------------------------------------------------------------------
@FAST
@given(n=batches, c_in=channels, c_out=channels, h=odd_sizes, w=odd_sizes, k=kernels, wn=st.booleans(), seed=seeds)
def test_conv2d_gradients(n: int, c_in: int, c_out: int, h: int, w: int, k: int, wn: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    layer = randomise(Conv2d(c_in, c_out, k, rng, weight_norm=wn), rng)
    check_layer_gradients(layer, rng.standard_normal((n, c_in, h, w)), rng)


@FAST
@given(n=batches, c=channels, h=odd_sizes, w=odd_sizes, mode=st.sampled_from(["eval", "train"]), seed=seeds)
def test_batch_norm_2d_gradients(n: int, c: int, h: int, w: int, mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    if mode == "train" and n * h * w == 1:
        n = 2  # one value per channel has no variance
    layer = positive_running_var(randomise(BatchNorm2d(c, h, w), rng), rng)
    if mode == "train":
        training(layer)
    check_layer_gradients(layer, rng.standard_normal((n, c, h, w)), rng)


@FEW
@given(n=batches, f=channels, h=odd_sizes, w=odd_sizes, k=kernels, mode=st.sampled_from(["eval", "train"]),
       seed=seeds)  # fmt: skip
def test_residual_block_gradients(n: int, f: int, h: int, w: int, k: int, mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = max(n, 2) if mode == "train" else n
    block = positive_running_var(randomise(ResidualBlock(f, h, w, k, rng), rng), rng)
    if mode == "train":
        training(block)
    check_layer_gradients(block, rng.standard_normal((n, f, h, w)), rng)


@FEW
@given(n=batches, c_in=channels, c_out=channels, h=odd_sizes, w=odd_sizes, k=kernels,
       blocks=st.integers(0, 2), mode=st.sampled_from(["eval", "train"]), seed=seeds)  # fmt: skip
def test_resnet_gradients(n: int, c_in: int, c_out: int, h: int, w: int, k: int, blocks: int, mode: str,
                          seed: int) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    n = max(n, 2) if mode == "train" else n
    net = ResNet(c_in, c_out, (h, w), features=2, blocks=blocks, kernel_size=k, rng=rng)
    positive_running_var(randomise(net, rng), rng)
    if mode == "train":
        training(net)
    check_layer_gradients(net, rng.standard_normal((n, c_in, h, w)), rng)


# -- the ResNet -------------------------------------------------------------------------------------------------
def test_resnet_starts_at_zero_counts_its_parameters_and_keeps_the_dtype() -> None:
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        net = ResNet(3, 4, (5, 3), features=6, blocks=2, kernel_size=3, rng=rng, dtype=dtype)
        x = rng.standard_normal((2, 3, 5, 3)).astype(dtype)
        y = net.forward(x)
        assert y.shape == (2, 4, 5, 3) and y.dtype == dtype and not y.any()  # zero-initialised last conv
        assert net.backward(np.ones_like(y)).dtype == dtype
    # what the model file stores: the parameters and the batch norms' running averages (buffers)
    assert sum(v.size for v in net.state_dict().values()) == resnet_parameters(3, 4, 6, 2, 3)


def test_resnet_batch_norms_follow_training_mode() -> None:
    """The net's batch norms are flows.BatchNorm children, so training_mode finds and switches them."""
    from nflow_np.flows.normalization import batch_norms, training_mode

    net = ResNet(1, 2, (3, 3), features=2, blocks=1)
    layers = list(batch_norms(net))
    assert len(layers) == 2 and not any(layer.training for layer in layers)
    with training_mode(net):
        assert all(layer.training for layer in layers)
    assert not any(layer.training for layer in layers)


def test_resnet_errors() -> None:
    with pytest.raises(ValueError, match="blocks must be a non-negative integer"):
        ResNet(1, 2, (3, 3), blocks=-1)
    with pytest.raises(ValueError, match=r"expects \(N, 1, 3, 3\) images, got shape \(2, 1, 3, 4\)"):
        ResNet(1, 2, (3, 3), features=2, blocks=0).forward(np.zeros((2, 1, 3, 4)))
