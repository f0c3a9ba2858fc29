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
from nflow_np.module import Module
from nflow_np.nn import shifted_resnet
from nflow_np.nn.conv import Conv2d, check_formulation
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

    Two formulations of the same function (:data:`~nflow_np.nn.conv.FORMULATIONS`, equal to round-off):
    ``"shifted"`` (the default) runs the whole net on channel-major frames
    (:mod:`nflow_np.nn.shifted_resnet`: every convolution ``k²`` accumulating GEMMs, batch norm, ReLU, bias
    and skip in fused passes, converted from and to ``(N, C, H, W)`` only at the net's input and output);
    ``"im2col"`` calls :attr:`layers` one after another (each convolution im2col + one GEMM). The shifted
    path needs host NumPy arrays and a batch norm that normalises by its own batch: with device arrays
    (CuPy) or batch norms synchronised across ranks (``moments`` set by :mod:`nflow_np.distributed`) the
    layers run instead. The formulation is not part of the parameters, so model files do not record it.

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
    formulation : {"shifted", "im2col"}
    """

    cache_attributes = ("_frames",)

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
        formulation: str = "shifted",
    ) -> None:
        super().__init__()
        if isinstance(blocks, bool) or not isinstance(blocks, int | np.integer) or blocks < 0:
            raise ValueError(f"blocks must be a non-negative integer, got {blocks!r}")
        rng = np.random.default_rng(0) if rng is None else rng
        height, width = (int(v) for v in shape)
        self.in_channels, self.out_channels, self.shape = int(in_channels), int(out_channels), (height, width)
        self.features, self.blocks, self.kernel_size = int(features), int(blocks), int(kernel_size)
        self.formulation = check_formulation(formulation)
        self.layers: list[Layer] = [Conv2d(in_channels, features, kernel_size, rng, dtype)]
        block = (features, height, width, kernel_size, rng, dtype, momentum)
        self.layers += [ResidualBlock(*block) for _ in range(blocks)]
        self.layers += [
            BatchNorm2d(features, height, width, momentum, dtype),
            ReLU(),
            Conv2d(features, out_channels, kernel_size, rng, dtype, zero_init=True),
        ]
        self.children = {str(i): layer for i, layer in enumerate(self.layers)}
        self._frames: dict | None = None
        self._path: str | None = None

    def _shifted(self, x: np.ndarray) -> bool:
        """Whether this call runs on frames (see the class docstring for when it cannot)."""
        if self.formulation != "shifted" or not isinstance(x, np.ndarray) or x.shape[0] == 0:
            return False
        return all(getattr(m, "moments", None) is None for m in self.modules())

    def forward(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, *self.shape):
            raise ValueError(f"ResNet expects (N, {self.in_channels}, {self.shape[0]}, {self.shape[1]}) images, "
                             f"got shape {x.shape}")  # fmt: skip
        self._frames = None
        if self._shifted(x):
            self._path = "shifted"
            y, self._frames = shifted_resnet.forward(self, x)
            return y
        self._path = "layers"
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, d_y: np.ndarray) -> np.ndarray:
        if self._path == "shifted":
            if self._frames is None:
                raise RuntimeError("ResNet.backward called before forward (or after a forward under no_grad)")
            return shifted_resnet.backward(self, self._frames, d_y)
        for layer in reversed(self.layers):
            d_y = layer.backward(d_y)
        return d_y


def set_formulation(module: Module, formulation: str) -> list[ResNet]:
    """Set ``formulation`` (:data:`~nflow_np.nn.conv.FORMULATIONS`) on every :class:`ResNet` in ``module``.

    Returns the nets it set.
    """
    check_formulation(formulation)
    nets = [m for m in module.modules() if isinstance(m, ResNet)]
    for net in nets:
        net.formulation = formulation
    return nets


def resnet_parameters(in_channels: int, out_channels: int, features: int, blocks: int, kernel_size: int) -> int:
    """Number of scalars in ``ResNet(...).state_dict()`` (batch norms: ``log_gamma``, ``beta`` and the
    running averages, which are buffers), computed without building it (the model loader's budget check)."""
    k2 = kernel_size * kernel_size

    def conv(c_in: int, c_out: int) -> int:
        return c_out * c_in * k2 + 2 * c_out  # v, g, b

    batch_norm = 4 * features
    block = 2 * conv(features, features) + batch_norm
    return conv(in_channels, features) + blocks * block + batch_norm + conv(features, out_channels)
