"""Convolution for the coupling nets ``c(·)`` of image couplings: ``Conv2d`` and weight normalisation.

``Conv2d`` is a stride-1, "same"-padded convolution with an odd kernel, on ``(N, C, H, W)`` batches
(NCHW), computed as one GEMM per pass on an im2col matrix. The two pure functions :func:`im2col` and
:func:`col2im` are the reference (the specification) that a fused kernel may replace
(``kernels/conv/numba_cpu.py``, reached through :func:`nflow_np.backend.fused` under the names
``"im2col"`` and ``"col2im"``). Derivations: ``docs/conv.md``.

Layout of the im2col matrix (``docs/conv.md#one-gemm-per-pass``): rows ``(c, i, j)`` — input channel
and kernel offset — and columns ``(n, h, w)`` — every output pixel of every image, batch index
*outside* the pixels. Then the whole batch is one GEMM ``y = W₂ · cols`` with ``W₂: (C_out, C·k²)`` and
``cols: (C·k², N·H·W)``, whose long side ``N·H·W`` keeps the GEMM efficient even on 4×4 images,
where ``N`` per-image GEMMs of 16 columns each would not be.

``Conv2d(formulation="shifted")`` computes the same function without the im2col matrix, as ``k²``
accumulating GEMMs on a channel-major frame (:mod:`nflow_np.nn.shifted`); the ResNet's default path keeps
its activations in frames between layers (:mod:`nflow_np.nn.shifted_resnet`).
"""

from __future__ import annotations

import numpy as np

from nflow_np import backend
from nflow_np.module import as_float_dtype
from nflow_np.nn import shifted
from nflow_np.nn.layers import Layer


def check_kernel_size(kernel_size: int) -> int:
    """Return ``kernel_size`` as an int if it is a positive odd integer, else raise ``ValueError``."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int | np.integer) or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd ('same' padding needs a centre), got {kernel_size}")
    return int(kernel_size)


def im2col(x: np.ndarray, k: int) -> np.ndarray:
    """The patches of ``x`` as the columns of one matrix: ``cols[(c, i, j), (n, h, w)] = x_pad[n, c, h + i, w + j]``.

    ``x_pad`` is ``x`` with ``p = k // 2`` zeros on each side of ``H`` and ``W`` ("same" padding).

    Parameters
    ----------
    x : array, shape (N, C, H, W)
    k : int
        Odd kernel size.

    Returns
    -------
    array, shape (C·k², N·H·W)
        A new C-contiguous array on ``x``'s device.
    """
    n, c, h, w = x.shape
    if k == 1:
        cols = np.empty_like(x, shape=(c, n, h, w))
        cols[...] = x.transpose(1, 0, 2, 3)
        return cols.reshape(c, n * h * w)
    p = k // 2
    padded = np.zeros_like(x, shape=(c, n, h + 2 * p, w + 2 * p))  # channel outside batch, like cols
    padded[:, :, p : p + h, p : p + w] = x.transpose(1, 0, 2, 3)
    cols = np.empty_like(x, shape=(c, k, k, n, h, w))
    for i in range(k):
        for j in range(k):
            cols[:, i, j] = padded[:, :, i : i + h, j : j + w]
    return cols.reshape(c * k * k, n * h * w)


def col2im(cols: np.ndarray, shape: tuple[int, int, int, int], k: int) -> np.ndarray:
    """The adjoint of :func:`im2col`: every column entry added back to the pixel it was copied from.

    ``d_x[n, c, y, x] = Σ_{i, j} cols[(c, i, j), (n, y − i + p, x − j + p)]`` over the offsets whose
    source pixel lies inside the image; the contributions are added in the order ``i``, then ``j``
    (``kernels/conv/numba_cpu.py`` keeps that order, so the two agree bit for bit).

    Parameters
    ----------
    cols : array, shape (C·k², N·H·W)
        ``∂L/∂cols``.
    shape : (N, C, H, W)
        Shape of the image batch ``cols`` was built from.
    k : int

    Returns
    -------
    array, shape (N, C, H, W)
        ``∂L/∂x``, a new C-contiguous array.
    """
    n, c, h, w = shape
    d_x = np.empty_like(cols, shape=(n, c, h, w))
    if k == 1:
        d_x[...] = cols.reshape(c, n, h, w).transpose(1, 0, 2, 3)
        return d_x
    p = k // 2
    cols = cols.reshape(c, k, k, n, h, w)
    padded = np.zeros_like(cols, shape=(c, n, h + 2 * p, w + 2 * p))
    for i in range(k):
        for j in range(k):
            padded[:, :, i : i + h, j : j + w] += cols[:, i, j]
    d_x[...] = padded[:, :, p : p + h, p : p + w].transpose(1, 0, 2, 3)
    return d_x


def weight_norm(v: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weight normalisation (Salimans & Kingma 2016): ``w[o] = g[o] · v[o] / ‖v[o]‖`` per output channel ``o``.

    Parameters
    ----------
    v : array, shape (C_out, …)
        Direction; ``‖v[o]‖`` is the Euclidean norm over all its other axes (must be non-zero).
    g : array, shape (C_out,)
        Length of each output channel's filter.

    Returns
    -------
    w : array, shape like ``v``
    norm : array, shape (C_out,)
        ``‖v[o]‖``, what :func:`weight_norm_backward` needs.
    """
    axes = tuple(range(1, v.ndim))
    norm = np.sqrt((v * v).sum(axis=axes))
    expand = (slice(None),) + (None,) * (v.ndim - 1)
    return v * (g / norm)[expand], norm


def weight_norm_backward(
    d_w: np.ndarray, v: np.ndarray, g: np.ndarray, norm: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(∂L/∂v, ∂L/∂g)`` from ``∂L/∂w`` for ``w = g · u``, ``u = v / ‖v‖`` (``docs/conv.md#weight-normalisation``).

    ``∂L/∂g[o] = Σ d_w[o] ⊙ u[o]``;  ``∂L/∂v[o] = (g[o] / ‖v[o]‖) · (d_w[o] − ∂L/∂g[o] · u[o])``:
    the gradient of ``w`` with its component along ``v`` removed (a change of ``‖v‖`` alone does not
    change ``w``), scaled by ``g / ‖v‖``.

    Parameters
    ----------
    d_w, v : array, shape (C_out, …)
    g, norm : array, shape (C_out,)

    Returns
    -------
    d_v : array, shape like ``v``
    d_g : array, shape (C_out,)
    """
    expand = (slice(None),) + (None,) * (v.ndim - 1)
    u = v / norm[expand]
    d_g = (d_w * u).sum(axis=tuple(range(1, v.ndim)))
    d_v = (d_w - d_g[expand] * u) * (g / norm)[expand]
    return d_v, d_g


FORMULATIONS = ("im2col", "shifted")
"""How a convolution is computed: im2col + one GEMM (:func:`im2col`), or ``k²`` accumulating GEMMs on
channel-major frames (:mod:`nflow_np.nn.shifted`). Both compute the same function (to round-off)."""


def check_formulation(formulation: str) -> str:
    """``formulation`` if it is one of :data:`FORMULATIONS`, else ``ValueError`` naming the choices."""
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown convolution formulation {formulation!r}; choose from {list(FORMULATIONS)}")
    return formulation


class Conv2d(Layer):
    """``y[n, o] = b[o] + Σ_{c, i, j} w[o, c, i, j] · x_pad[n, c, h + i, w + j]``: stride 1, "same" padding.

    ``x: (N, C_in, H, W)`` → ``y: (N, C_out, H, W)``, any odd kernel size ``k``, zero padding
    ``p = k // 2``. With ``cols = im2col(x)`` and ``W₂ = w.reshape(C_out, C_in·k²)`` the forward pass is
    the GEMM ``y₂ = W₂ · cols`` (``(C_out, N·H·W)``, then transposed to NCHW with the bias added).

    Backward (``docs/conv.md#conv2d``), with ``d_y₂`` the gradient in the GEMM's layout and ``cols``
    recomputed from the cached input (caching it would hold ``k²`` times the activation memory):
    ``∂L/∂W₂ = d_y₂ · colsᵀ``, ``∂L/∂b = Σ_{n, h, w} d_y``, ``∂L/∂x = col2im(W₂ᵀ · d_y₂)``.

    With ``formulation="shifted"`` the same function is computed on a frame of the input
    (:mod:`nflow_np.nn.shifted`: ``k²`` GEMMs accumulating into the output, no im2col matrix); arrays of a
    device module (CuPy) always take the im2col path.

    With ``weight_norm=True`` (RealNVP's nets) the parameters are ``v: (C_out, C_in, k, k)`` and
    ``g: (C_out,)``, ``w = g · v / ‖v‖`` per output channel (:func:`weight_norm`), and ``∂L/∂W₂`` goes on
    through :func:`weight_norm_backward`; otherwise the parameter is ``W: (C_out, C_in, k, k)`` itself.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int
        Odd, ≥ 1.
    rng : numpy.random.Generator
        ``v`` (or ``W``) is drawn ``N(0, 1 / (C_in k²))``; with weight norm ``g = 1``, so every output
        channel's filter starts with unit norm (the output's variance is the input's, for independent
        inputs).
    dtype : float32 or float64
    weight_norm : bool
    zero_init : bool
        Start with ``w = 0``, ``b = 0`` (the last layer of a coupling net, so the coupling starts as
        the identity): ``g = 0`` with weight norm (``v`` stays random, so ``∂L/∂g ≠ 0``), else ``W = 0``.
    formulation : {"im2col", "shifted"}
        :data:`FORMULATIONS`; not part of the parameters (a model file does not record it).
    """

    cache_attributes = ("_x", "_w")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        rng: np.random.Generator,
        dtype: object = np.float64,
        weight_norm: bool = True,
        zero_init: bool = False,
        formulation: str = "im2col",
    ) -> None:
        super().__init__()
        dtype = as_float_dtype(dtype)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"Conv2d needs a positive integer {name}, got {value!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = check_kernel_size(kernel_size)
        self.weight_norm = bool(weight_norm)
        self.formulation = check_formulation(formulation)
        k = self.kernel_size
        shape = (self.out_channels, self.in_channels, k, k)
        direction = rng.normal(0.0, 1.0 / np.sqrt(self.in_channels * k * k), size=shape).astype(dtype)
        if self.weight_norm:
            self.add_param("v", direction)
            self.add_param("g", np.full(self.out_channels, 0.0 if zero_init else 1.0, dtype=dtype))
        else:
            self.add_param("W", np.zeros(shape, dtype=dtype) if zero_init else direction)
        self.add_param("b", np.zeros(self.out_channels, dtype=dtype))
        self._x: np.ndarray | None = None
        self._w: tuple | None = None

    def weight(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The effective filter ``w: (C_out, C_in, k, k)`` and ``‖v‖`` (``None`` without weight norm)."""
        if self.weight_norm:
            return weight_norm(self.params["v"], self.params["g"])
        return self.params["W"], None

    def accumulate_weight_grad(self, d_w: np.ndarray, norm: np.ndarray | None) -> None:
        """Add ``∂L/∂w: (C_out, C_in, k, k)`` to the parameters' gradients (through weight norm, if used)."""
        if self.weight_norm:
            d_v, d_g = weight_norm_backward(d_w, self.params["v"], self.params["g"], norm)
            self.grads["v"] += d_v
            self.grads["g"] += d_g
        else:
            self.grads["W"] += d_w

    def _shifted(self, x: np.ndarray) -> bool:
        return self.formulation == "shifted" and isinstance(x, np.ndarray) and x.shape[0] > 0

    def forward(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Conv2d expects (N, {self.in_channels}, H, W) images, got shape {x.shape}")
        n, _, h, w_ = x.shape
        w, norm = self.weight()
        if self._shifted(x):
            frame = shifted.frame_of(x.shape, self.kernel_size)
            x_frame = backend.fused("frame.to", shifted.to_frame)(np.ascontiguousarray(x), frame)
            wk = shifted.stack_weights(w)
            y = shifted.conv_forward(x_frame, wk, frame)
            self._x, self._w = x_frame, (w, norm, wk, frame)
            return backend.fused("frame.from", shifted.from_frame)(y, frame, self.params["b"])
        cols = backend.fused("im2col", im2col)(x, self.kernel_size)
        y2 = w.reshape(self.out_channels, -1) @ cols  # (C_out, N·H·W): the one GEMM
        y = np.empty_like(x, shape=(n, self.out_channels, h, w_))
        np.add(y2.reshape(self.out_channels, n, h * w_).transpose(1, 0, 2), self.params["b"][:, None],
               out=y.reshape(n, self.out_channels, h * w_))  # fmt: skip
        self._x, self._w = x, (w, norm, None, None)
        return y

    def backward(self, d_y: np.ndarray) -> np.ndarray:
        x, (w, norm, wk, frame) = self._x, self._w
        if frame is not None:
            d_frame = backend.fused("frame.to", shifted.to_frame)(np.ascontiguousarray(d_y), frame)
            self.grads["b"] += d_frame[:, frame.start : frame.stop].sum(axis=1)
            d_wk, d_x = shifted.conv_backward(d_frame, x, wk, frame)
            self.accumulate_weight_grad(d_wk.transpose(2, 3, 0, 1), norm)
            return backend.fused("frame.from", shifted.from_frame)(d_x, frame)
        n, _, h, w_ = x.shape
        d_y2 = np.empty_like(d_y, shape=(self.out_channels, n, h * w_))
        d_y2[...] = d_y.reshape(n, self.out_channels, h * w_).transpose(1, 0, 2)
        d_y2 = d_y2.reshape(self.out_channels, n * h * w_)
        self.grads["b"] += d_y2.sum(axis=1)
        cols = backend.fused("im2col", im2col)(x, self.kernel_size)
        self.accumulate_weight_grad((d_y2 @ cols.T).reshape(w.shape), norm)
        d_cols = w.reshape(self.out_channels, -1).T @ d_y2
        return backend.fused("col2im", col2im)(d_cols, x.shape, self.kernel_size)
