"""The elementwise passes of the shifted-GEMM ResNet on channel-major frames, fused, on the CPU with Numba.

The NumPy references are in ``nflow_np/nn/shifted.py`` (this package never imports it;
``tests/kernels/conv/test_numba_frames.py`` compares each kernel with its reference): ``to_frame``,
``from_frame``, ``finish``, ``batch_norm_relu`` and ``batch_norm_relu_backward``, with their signatures.
A frame is a ``(C, length)`` array; pixel ``(n, h, w)`` of a channel sits at ``lead + n·image + h·row + w``
and everything else (the ring) is zero in a clean frame (``docs/conv.md#the-shifted-gemm-convolution``). The
``frame`` argument is the reference's ``Frame`` (read for its integers only).

What the fusion saves (the references make a temporary per step and pass over the whole batch each time):

- ``batch_norm_relu``: per channel (a channel of the 28×28 nets at batch 64 is 215 KB, so it stays in the
  core's L2 cache between the passes) the mean, the variance about it, then ``ReLU(γ x̂ + β)`` written
  with the ring zeroed: the raw convolution output is read from memory once and ``u`` written once;
- ``batch_norm_relu_backward``: ``x̂``, the ReLU's mask and the two batch sums in one pass, ``∂L/∂t`` and its
  sum (the bias gradient) in a second, again per channel from the cache;
- ``finish``: bias, residual skip and the ring in one pass instead of four; ``to_frame``/``from_frame``:
  the transposition between ``(N, C, H, W)`` and frames without a zeroed temporary.

Arithmetic: the elementwise steps are the reference's, each rounded once in the data's dtype, no
``fastmath`` (no FMA): where the statistics are given (evaluation mode) and in ``finish``, ``to_frame`` and
``from_frame`` the results are the reference's bits. The batch sums (mean, variance, the backward's means
and the parameter-gradient sums) are accumulated in float64 over the channel in pixel order, where NumPy
sums pairwise in the data's dtype: they agree to rounding, and so does everything computed from them.
Channels run in parallel (``prange``); each channel's sums are one thread's, in a fixed order, so the
results are the same for every thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_OPTIONS = {"error_model": "numpy", "cache": True, "parallel": True}


def _geometry(frame: object) -> tuple[int, int, int, int, int, int, int]:
    """``(n, h, w, p, row, image, lead)`` of a ``Frame``."""
    return frame.n, frame.h, frame.w, frame.p, frame.row, frame.image, frame.lead


@njit(**_OPTIONS)
def _to_frame(x, out, n, h, w, p, row, image, lead):
    zero = out.dtype.type(0.0)
    for c in prange(x.shape[1]):
        dest = out[c]
        dest[:lead] = zero
        for m in range(n):
            for y in range(h):
                base = lead + m * image + y * row
                source = x[m, c, y]
                for col in range(w):
                    dest[base + col] = source[col]
                for col in range(w, row):
                    dest[base + col] = zero
            start = lead + m * image + h * row
            dest[start : start + p * row] = zero


@njit(**_OPTIONS)
def _from_frame(y, bias, has_bias, out, n, h, w, p, row, image, lead):
    for c in prange(y.shape[0]):
        source = y[c]
        b = bias[c]
        for m in range(n):
            for r in range(h):
                base = lead + m * image + r * row
                dest = out[m, c, r]
                if has_bias:
                    for col in range(w):
                        dest[col] = source[base + col] + b
                else:
                    for col in range(w):
                        dest[col] = source[base + col]


@njit(**_OPTIONS)
def _finish(y, bias, has_bias, skip, has_skip, n, h, w, p, row, image, lead):
    zero = y.dtype.type(0.0)
    for c in prange(y.shape[0]):
        dest = y[c]
        b = bias[c]
        dest[:lead] = zero
        for m in range(n):
            for r in range(h):
                base = lead + m * image + r * row
                for col in range(w):
                    v = dest[base + col]
                    if has_bias:
                        v = v + b
                    if has_skip:
                        v = v + skip[c, base + col]
                    dest[base + col] = v
                for col in range(w, row):
                    dest[base + col] = zero
            start = lead + m * image + h * row
            dest[start : start + p * row] = zero


@njit(**_OPTIONS)
def _batch_norm_relu(t, bias, gamma, beta, eps, mean, var, training, u, n, h, w, p, row, image, lead):
    zero, one = t.dtype.type(0.0), t.dtype.type(1.0)
    count = n * h * w
    for c in prange(t.shape[0]):
        source, dest = t[c], u[c]
        b = bias[c]
        if training:
            total = 0.0
            for m in range(n):
                for r in range(h):
                    base = lead + m * image + r * row
                    for col in range(w):
                        total += source[base + col] + b
            mean[c] = total / count
            mu = mean[c]
            squares = 0.0
            for m in range(n):
                for r in range(h):
                    base = lead + m * image + r * row
                    for col in range(w):
                        d = (source[base + col] + b) - mu
                        squares += float(d) * float(d)
            var[c] = squares / count
        mu = mean[c]
        inv_std = one / np.sqrt(var[c] + eps)
        g, bt = gamma[c], beta[c]
        dest[:lead] = zero
        for m in range(n):
            for r in range(h):
                base = lead + m * image + r * row
                for col in range(w):
                    z = ((source[base + col] + b) - mu) * inv_std * g + bt
                    dest[base + col] = z * (one if z > zero else zero)
                for col in range(w, row):
                    dest[base + col] = zero
            start = lead + m * image + h * row
            dest[start : start + p * row] = zero


@njit(**_OPTIONS)
def _batch_norm_relu_backward(d_u, t, bias, gamma, beta, mean, inv_std, training, d_t, sums,
                              n, h, w, p, row, image, lead):  # fmt: skip
    zero, one = t.dtype.type(0.0), t.dtype.type(1.0)
    count = n * h * w
    for c in prange(t.shape[0]):
        source, grad, dest = t[c], d_u[c], d_t[c]
        b, mu, inv, g, bt = bias[c], mean[c], inv_std[c], gamma[c], beta[c]
        sum_d_z, sum_d_z_x_hat, sum_d_x_hat, sum_d_x_hat_x_hat = 0.0, 0.0, 0.0, 0.0
        for m in range(n):
            for r in range(h):
                base = lead + m * image + r * row
                for col in range(w):
                    x_hat = ((source[base + col] + b) - mu) * inv
                    z = x_hat * g + bt
                    d_z = grad[base + col] * (one if z > zero else zero)
                    d_x_hat = d_z * g
                    sum_d_z += d_z
                    sum_d_z_x_hat += d_z * x_hat
                    sum_d_x_hat += d_x_hat
                    sum_d_x_hat_x_hat += d_x_hat * x_hat
        mean_d = t.dtype.type(sum_d_x_hat / count)
        mean_d_x_hat = t.dtype.type(sum_d_x_hat_x_hat / count)
        total = 0.0
        dest[:lead] = zero
        for m in range(n):
            for r in range(h):
                base = lead + m * image + r * row
                for col in range(w):
                    x_hat = ((source[base + col] + b) - mu) * inv
                    z = x_hat * g + bt
                    d_x_hat = grad[base + col] * (one if z > zero else zero) * g
                    if training:
                        d = (d_x_hat - mean_d - x_hat * mean_d_x_hat) * inv
                    else:
                        d = d_x_hat * inv
                    dest[base + col] = d
                    total += d
                for col in range(w, row):
                    dest[base + col] = zero
            start = lead + m * image + h * row
            dest[start : start + p * row] = zero
        sums[0, c] = sum_d_z
        sums[1, c] = sum_d_z_x_hat
        sums[2, c] = total


def _vector(v: np.ndarray | None, like: np.ndarray, channels: int) -> np.ndarray:
    """A contiguous ``(C,)`` array of ``like``'s dtype (zeros for ``None``)."""
    if v is None:
        return np.zeros(channels, dtype=like.dtype)
    return np.ascontiguousarray(v, dtype=like.dtype)


def to_frame(x: np.ndarray, frame: object) -> np.ndarray:
    """``nflow_np.nn.shifted.to_frame``: ``(N, C, H, W)`` → a clean ``(C, length)`` frame."""
    x = np.ascontiguousarray(x)
    out = np.empty((x.shape[1], frame.length), dtype=x.dtype)
    _to_frame(x, out, *_geometry(frame))
    return out


def from_frame(y: np.ndarray, frame: object, bias: np.ndarray | None = None) -> np.ndarray:
    """``nflow_np.nn.shifted.from_frame``: the pixels of ``y`` (plus ``bias``) as ``(N, C, H, W)``."""
    y = np.ascontiguousarray(y)
    out = np.empty((frame.n, y.shape[0], frame.h, frame.w), dtype=y.dtype)
    _from_frame(y, _vector(bias, y, y.shape[0]), bias is not None, out, *_geometry(frame))
    return out


def finish(y: np.ndarray, frame: object, bias: np.ndarray | None = None, skip: np.ndarray | None = None) -> np.ndarray:
    """``nflow_np.nn.shifted.finish``: in place, pixels ``(y + bias) + skip``, ring 0; returns ``y``."""
    if not y.flags.c_contiguous:
        return NotImplemented
    skip_array = y[:, :0] if skip is None else np.ascontiguousarray(skip)
    _finish(y, _vector(bias, y, y.shape[0]), bias is not None, skip_array, skip is not None, *_geometry(frame))
    return y


finish.may_decline = True


def batch_norm_relu(t: np.ndarray, frame: object, bias: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float,
                    mean: np.ndarray | None = None,
                    var: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """``nflow_np.nn.shifted.batch_norm_relu``: ``(u, mean, var)``, ``u`` a clean frame."""
    t = np.ascontiguousarray(t)
    channels, dtype = t.shape[0], t.dtype
    training = mean is None
    mean = np.empty(channels, dtype=dtype) if training else _vector(mean, t, channels).copy()
    var = np.empty(channels, dtype=dtype) if training else _vector(var, t, channels).copy()
    u = np.empty_like(t)
    _batch_norm_relu(t, _vector(bias, t, channels), _vector(gamma, t, channels), _vector(beta, t, channels),
                     dtype.type(eps), mean, var, training, u, *_geometry(frame))  # fmt: skip
    return u, mean, var


def batch_norm_relu_backward(d_u: np.ndarray, t: np.ndarray, frame: object, bias: np.ndarray, gamma: np.ndarray,
                             beta: np.ndarray, mean: np.ndarray, inv_std: np.ndarray,
                             training: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """``nflow_np.nn.shifted.batch_norm_relu_backward``: ``(d_t, Σ d_z, Σ d_z ⊙ x̂, Σ d_t)``."""
    t, d_u = np.ascontiguousarray(t), np.ascontiguousarray(d_u)
    channels = t.shape[0]
    d_t = np.empty_like(t)
    sums = np.empty((3, channels), dtype=t.dtype)
    vectors = [_vector(v, t, channels) for v in (bias, gamma, beta, mean, inv_std)]
    _batch_norm_relu_backward(d_u, t, *vectors, bool(training), d_t, sums, *_geometry(frame))
    return d_t, sums[0], sums[1], sums[2]


FUSED = {
    "frame.to": to_frame,
    "frame.from": from_frame,
    "frame.finish": finish,
    "frame.batch_norm_relu": batch_norm_relu,
    "frame.batch_norm_relu_backward": batch_norm_relu_backward,
}
"""The reference functions these kernels replace, by the name ``nflow_np.backend.fused`` looks up."""
