"""RealNVP's coupling nets: a convolutional residual network with batch and weight normalisation.

Dinh, Sohl-Dickstein, Bengio 2016 (arXiv 1605.08803), §4.1: the coupling functions ``s`` and ``t`` are
deep convolutional residual networks (He et al. 2016) with batch normalisation and weight normalisation.
Here (``docs/conv.md#the-resnet``), on ``(N, C, H, W)`` images:

    ResNet(x) = conv_out(ReLU(BN(body(x)))),   body = block_B ∘ … ∘ block_1 ∘ conv_in
    block(x)  = x + conv₂(ReLU(BN(conv₁(x))))

every convolution weight-normalised (:class:`~nflow_np.nn.conv.Conv2d`), ``conv_out`` zero-initialised
so that a coupling built on the net starts as the identity map. The batch norm is the flows' own
:class:`~nflow_np.flows.normalization.BatchNorm` (per channel, over the batch and the pixels), held as a
child module, so :func:`~nflow_np.flows.normalization.training_mode` and
:func:`~nflow_np.flows.normalization.recalibrate` switch and recalibrate it with the others: batch
statistics while training, running averages everywhere else.

This module imports :mod:`nflow_np.flows` and is therefore not imported by ``nflow_np.nn`` itself.
"""

from __future__ import annotations

import numpy as np

from nflow_np.flows.normalization import BatchNorm
from nflow_np.nn.conv import Conv2d
from nflow_np.nn.layers import Layer, ReLU


class BatchNorm2d(Layer):
    """Per-channel batch normalisation of ``(N, C, H, W)`` images as a net layer.

    ``y = γ ⊙ (x − μ) / √(σ² + ε) + β`` with ``μ_c, σ_c²`` over the batch and the ``H·W`` pixels of
    channel ``c`` (training mode) or their running averages (evaluation mode); ``γ = exp(log_gamma) > 0``
    loses nothing here, since the convolution before it can flip the sign of its input. Forward and
    backward are :class:`~nflow_np.flows.normalization.BatchNorm`'s with ``d_logdet = 0``
    (``docs/images.md#batch-normalisation``), on the images' C-order rows.

    Parameters
    ----------
    channels, height, width : int
        The image shape ``(C, H, W)`` (the flow layer works on rows of a fixed length ``C·H·W``).
    momentum : float
        Weight of a new batch in the running averages.
    dtype : float32 or float64
    """

    def __init__(self, channels: int, height: int, width: int, momentum: float = 0.1, dtype: object = np.float64):
        super().__init__()
        self.norm = BatchNorm(channels * height * width, momentum=momentum, dtype=dtype, channels=channels)
        self.children = {"norm": self.norm}

    def forward(self, x: np.ndarray) -> np.ndarray:
        y, _ = self.norm._forward(x.reshape(x.shape[0], -1))
        return y.reshape(x.shape)

    def backward(self, d_y: np.ndarray) -> np.ndarray:
        rows = d_y.reshape(d_y.shape[0], -1)
        return self.norm._backward(rows, np.zeros_like(rows, shape=rows.shape[0])).reshape(d_y.shape)


class ResidualBlock(Layer):
    """``x + conv₂(ReLU(BN(conv₁(x))))`` on ``(N, F, H, W)``; backward: ``d_x = d_y + branch.backward(d_y)``.

    Parameters
    ----------
    features, height, width : int
        Channels ``F`` and spatial size.
    kernel_size : int
    rng, dtype, momentum
        As for :class:`~nflow_np.nn.conv.Conv2d` and :class:`BatchNorm2d`.
    """

    def __init__(
        self,
        features: int,
        height: int,
        width: int,
        kernel_size: int,
        rng: np.random.Generator,
        dtype: object = np.float64,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.layers: list[Layer] = [
            Conv2d(features, features, kernel_size, rng, dtype),
            BatchNorm2d(features, height, width, momentum, dtype),
            ReLU(),
            Conv2d(features, features, kernel_size, rng, dtype),
        ]
        self.children = {str(i): layer for i, layer in enumerate(self.layers)}

    def forward(self, x: np.ndarray) -> np.ndarray:
        branch = x
        for layer in self.layers:
            branch = layer.forward(branch)
        branch += x
        return branch

    def backward(self, d_y: np.ndarray) -> np.ndarray:
        d_branch = d_y
        for layer in reversed(self.layers):
            d_branch = layer.backward(d_branch)
        d_branch += d_y
        return d_branch


class ResNet(Layer):
    """RealNVP's coupling net: ``(N, C_in, H, W) → (N, C_out, H, W)`` (see the module docstring).

    Backward is the chain rule through :attr:`layers` in reverse order; each residual block adds its
    skip connection's gradient (``docs/conv.md#the-resnet``).

    Parameters
    ----------
    in_channels, out_channels : int
    shape : (H, W)
        Spatial size (fixed: the batch norms' row length depends on it).
    features : int
        Channels ``F`` of the hidden layers.
    blocks : int
        Number of residual blocks ``B ≥ 0``.
    kernel_size : int
        Odd kernel size of every convolution.
    rng : numpy.random.Generator
    dtype : float32 or float64
    momentum : float
        The batch norms' running-average weight.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        shape: tuple[int, int],
        features: int = 64,
        blocks: int = 4,
        kernel_size: int = 3,
        rng: np.random.Generator | None = None,
        dtype: object = np.float64,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if isinstance(blocks, bool) or not isinstance(blocks, int | np.integer) or blocks < 0:
            raise ValueError(f"blocks must be a non-negative integer, got {blocks!r}")
        rng = np.random.default_rng(0) if rng is None else rng
        height, width = (int(v) for v in shape)
        self.in_channels, self.out_channels, self.shape = int(in_channels), int(out_channels), (height, width)
        self.features, self.blocks, self.kernel_size = int(features), int(blocks), int(kernel_size)
        self.layers: list[Layer] = [Conv2d(in_channels, features, kernel_size, rng, dtype)]
        block = (features, height, width, kernel_size, rng, dtype, momentum)
        self.layers += [ResidualBlock(*block) for _ in range(blocks)]
        self.layers += [
            BatchNorm2d(features, height, width, momentum, dtype),
            ReLU(),
            Conv2d(features, out_channels, kernel_size, rng, dtype, zero_init=True),
        ]
        self.children = {str(i): layer for i, layer in enumerate(self.layers)}

    def forward(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, *self.shape):
            raise ValueError(f"ResNet expects (N, {self.in_channels}, {self.shape[0]}, {self.shape[1]}) images, "
                             f"got shape {x.shape}")  # fmt: skip
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, d_y: np.ndarray) -> np.ndarray:
        for layer in reversed(self.layers):
            d_y = layer.backward(d_y)
        return d_y


def resnet_parameters(in_channels: int, out_channels: int, features: int, blocks: int, kernel_size: int) -> int:
    """Number of scalars in ``ResNet(...).state_dict()`` (batch norms: ``log_gamma``, ``beta`` and the
    running averages, which are buffers), computed without building it (the model loader's budget check)."""
    k2 = kernel_size * kernel_size

    def conv(c_in: int, c_out: int) -> int:
        return c_out * c_in * k2 + 2 * c_out  # v, g, b

    batch_norm = 4 * features
    block = 2 * conv(features, features) + batch_norm
    return conv(in_channels, features) + blocks * block + batch_norm + conv(features, out_channels)
