"""Convolutional affine couplings (RealNVP §3.3–3.4): image masks, a ResNet as the coupling function.

A :class:`ConvAffineCoupling` is an :class:`~nflow_np.flows.coupling.AffineCoupling` (the same class,
so the same law through the same backend seam, the same backward, the same ``memory="invert"``
reconstruction) whose net is a :class:`MaskedResNet`: a :class:`~nflow_np.nn.Layer` from the rows of
``x₁`` to the rows of ``h = [ŝ, t]`` that does its work on images. Rows are C-order flattenings of
``(C, H, W)`` images (``docs/images.md#images-and-rows``), so the coupling composes with ``Sequential``,
``Squeeze``, ``FactorOut``, the model and the trainer like any other layer.

The two masks of RealNVP, and what the ResNet sees (``docs/conv.md#convolutional-couplings``):

- **checkerboard** ``b[c, h, w] = ((h + w) % 2 == parity)``: the net gets the ``C + 1`` channels
  ``[x ⊙ b, b]`` (the masked image and the mask itself, as in the paper) and returns ``2C`` channels
  ``[ŝ, t]`` at every pixel; only the values at the transformed pixels (``b = 0``) are used.
- **channel** (first or second half of the channels passed through): the net gets the ``C/2``
  pass-through channels and returns ``2 · C/2`` channels, exactly ``[ŝ, t]`` for the other half; the
  rows are the images' flattenings, no gather needed.
"""

from __future__ import annotations

import numpy as np

from nflow_np.files.safe import MAX_DEPTH
from nflow_np.flows.coupling import AffineCoupling
from nflow_np.flows.image import Shape, channel_mask, check_shape, checkerboard_mask
from nflow_np.flows.normalization import batch_norms
from nflow_np.nn.layers import Layer
from nflow_np.nn.resnet import ResNet, resnet_parameters
from nflow_np.specs import MAX_DIM, SpecReader, register_flow

MASKS = ("checkerboard", "channel")


def image_mask(shape: Shape, mask: str, parity: int) -> np.ndarray:
    """The boolean row mask (True = passed through) of RealNVP's ``mask`` kind on ``shape`` images."""
    if mask == "checkerboard":
        return checkerboard_mask(shape, parity)
    if mask == "channel":
        return channel_mask(shape, parity)
    raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")


class MaskedResNet(Layer):
    """``h = c(x₁)``: rows of the pass-through pixels ``(N, D₁)`` → rows ``[ŝ, t]`` of the others ``(N, 2 D₂)``.

    Forward (checkerboard): scatter ``x₁`` into a zero image (``x ⊙ b``), append the mask channel ``b``,
    run the :class:`~nflow_np.nn.resnet.ResNet` to ``2C`` channels, and gather its two halves at the
    transformed positions. Backward: the adjoint of each step in reverse — scatter ``∂L/∂h`` into a zero
    image of ``2C`` channels, back through the ResNet, gather the first ``C`` channels at the
    pass-through positions (the mask channel is a constant). Channel masks skip the scatter and
    gather: ``x₁`` and ``h`` are already the rows of the net's input and output images.

    Parameters
    ----------
    shape : (C, H, W)
    mask : {"checkerboard", "channel"}
    parity : {0, 1}
    features, blocks, kernel_size, rng, dtype, momentum
        Passed to :class:`~nflow_np.nn.resnet.ResNet`.
    """

    cache_attributes = ("_n",)

    def __init__(
        self,
        shape: Shape,
        mask: str,
        parity: int,
        *,
        features: int = 64,
        blocks: int = 4,
        kernel_size: int = 3,
        rng: np.random.Generator | None = None,
        dtype: object = np.float64,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.shape = check_shape(shape)
        self.mask_kind, self.parity = mask, int(parity)
        c, h, w = self.shape
        row_mask = image_mask(self.shape, mask, parity)
        self.idx1, self.idx2 = np.flatnonzero(row_mask), np.flatnonzero(~row_mask)
        self.d1, self.d2 = len(self.idx1), len(self.idx2)
        if mask == "checkerboard":
            self.board = np.flatnonzero(row_mask[: h * w])  # pass-through pixels of one channel
            in_channels, out_channels = c + 1, 2 * c
        else:
            in_channels, out_channels = c // 2, c
        self.features, self.blocks, self.kernel_size, self.momentum = features, blocks, kernel_size, momentum
        self.resnet = ResNet(in_channels, out_channels, (h, w), features, blocks, kernel_size, rng, dtype, momentum)
        self.children = {"resnet": self.resnet}
        self._n: int | None = None

    def forward(self, x1: np.ndarray) -> np.ndarray:
        c, h, w = self.shape
        n = x1.shape[0]
        self._n = n
        if self.mask_kind == "channel":
            return self.resnet.forward(x1.reshape(n, c // 2, h, w)).reshape(n, 2 * self.d2)
        image = np.zeros_like(x1, shape=(n, c * h * w))
        image[:, self.idx1] = x1
        board = np.zeros_like(x1, shape=h * w)
        board[self.board] = 1
        net_input = np.empty_like(x1, shape=(n, c + 1, h * w))
        net_input[:, :c] = image.reshape(n, c, h * w)
        net_input[:, c] = board
        out = self.resnet.forward(net_input.reshape(n, c + 1, h, w)).reshape(n, 2, c * h * w)
        result = np.empty_like(x1, shape=(n, 2 * self.d2))
        result[:, : self.d2] = out[:, 0][:, self.idx2]
        result[:, self.d2 :] = out[:, 1][:, self.idx2]
        return result

    def backward(self, d_h: np.ndarray) -> np.ndarray:
        c, h, w = self.shape
        n = self._n
        if self.mask_kind == "channel":
            return self.resnet.backward(d_h.reshape(n, c, h, w)).reshape(n, self.d1)
        d_out = np.zeros_like(d_h, shape=(n, 2, c * h * w))
        d_out[:, 0, self.idx2] = d_h[:, : self.d2]
        d_out[:, 1, self.idx2] = d_h[:, self.d2 :]
        d_input = self.resnet.backward(d_out.reshape(n, 2 * c, h, w))
        return d_input[:, :c].reshape(n, c * h * w)[:, self.idx1]


@register_flow("conv_affine_coupling", "shape", "mask", "parity", "features", "blocks", "kernel_size", "momentum")
class ConvAffineCoupling(AffineCoupling):
    """RealNVP's convolutional affine coupling on rows of ``(C, H, W)`` images.

    ``z₂ = x₂ ⊙ exp(s) + t``, ``[ŝ, t] = ResNet(x₁)``, ``s = a ⊙ tanh(ŝ)``, ``logdet = Σ_j s_j``
    (:class:`~nflow_np.flows.coupling_law.AffineLaw`), with ``x₁`` the pixels the mask passes through.
    Everything but the net is :class:`~nflow_np.flows.coupling.AffineCoupling`'s.

    Parameters
    ----------
    shape : (C, H, W)
    mask : {"checkerboard", "channel"}
        RealNVP's spatial checkerboard, or the channel-wise mask (``C`` even).
    parity : {0, 1}
        Which squares (checkerboard) or which half of the channels (0: the first) pass through.
    features : int
        Hidden channels of the ResNet.
    blocks : int
        Residual blocks of the ResNet.
    kernel_size : int
        Odd kernel size of its convolutions.
    rng : numpy.random.Generator, optional
    dtype : float32 or float64
    momentum : float
        Running-average weight of the net's batch norms.
    """

    def __init__(
        self,
        shape: Shape,
        mask: str = "checkerboard",
        parity: int = 0,
        *,
        features: int = 64,
        blocks: int = 4,
        kernel_size: int = 3,
        rng: np.random.Generator | None = None,
        dtype: object = np.float64,
        momentum: float = 0.1,
    ) -> None:
        shape = check_shape(shape)
        net = MaskedResNet(shape, mask, parity, features=features, blocks=blocks, kernel_size=kernel_size,
                           rng=rng, dtype=dtype, momentum=momentum)  # fmt: skip
        super().__init__(int(np.prod(shape)), mask=image_mask(shape, mask, parity), net=net, dtype=dtype)
        self.shape, self.mask_kind, self.parity = shape, mask, int(parity)

    def spec(self, where: str = "flow") -> dict:
        """``{"kind": "conv_affine_coupling", "shape", "mask", "parity", "features", "blocks", "kernel_size",
        "momentum"}`` (``docs/conv.md``)."""
        net = self.net
        return {"kind": "conv_affine_coupling", "shape": list(self.shape), "mask": self.mask_kind,
                "parity": self.parity, "features": int(net.features), "blocks": int(net.blocks),
                "kernel_size": int(net.kernel_size), "momentum": float(net.momentum)}  # fmt: skip

    @classmethod
    def from_spec(cls, read: SpecReader) -> ConvAffineCoupling:
        shape = tuple(read.list("shape", int, minimum=1, maximum=MAX_DIM))
        mask, parity = read.choice("mask", MASKS), read.int("parity", 0, 1)
        features, kernel_size = read.dim("features"), read.dim("kernel_size")
        blocks = read.int("blocks", 0, MAX_DEPTH)
        read.take(conv_coupling_parameters(shape, mask, parity, features, blocks, kernel_size))
        return cls(shape, mask, parity, features=features, blocks=blocks, kernel_size=kernel_size,
                   momentum=read.real("momentum"), dtype=read.dtype)  # fmt: skip

    @property
    def invertible_in_backward(self) -> bool:
        # in training mode the net's batch norms update their running averages on every call: a
        # recomputation in memory="invert" would count the batch twice, so the input is stored instead
        return not any(layer.training for layer in batch_norms(self.net))


def conv_coupling_parameters(shape: Shape, mask: str, parity: int, features: int, blocks: int, kernel_size: int) -> int:
    """Number of scalars of a :class:`ConvAffineCoupling`, computed without building it (the loader's budget)."""
    c, h, w = check_shape(shape)
    d2 = int((~image_mask(shape, mask, parity)).sum())  # the affine law's scale a has one entry per x₂
    if mask == "checkerboard":
        in_channels, out_channels = c + 1, 2 * c
    else:
        in_channels, out_channels = c // 2, c
    return resnet_parameters(in_channels, out_channels, features, blocks, kernel_size) + d2
