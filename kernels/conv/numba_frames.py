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
- ``batch_norm_relu_backward``: the two batch sums in one pass (``x̂`` and the ReLU's mask recomputed), ``∂L/∂t``
  in a second and its sum (the bias gradient) from the cache;
- ``finish``: bias, residual skip and the ring in one pass instead of four; ``to_frame``/``from_frame``:
  the transposition between ``(N, C, H, W)`` and frames without a zeroed temporary.

Measured at 28×28, batch 64, float32, one thread (``docs/conv.md#speed``): batch norm + ReLU 2.7 ms (reference
29 ms), its backward 5.2 ms (37 ms), ``finish`` 1.9 ms (7.9 ms).

Arithmetic: the elementwise steps are the reference's, each rounded once in the data's dtype, no FMA (the only
``fastmath`` flag anywhere is ``reassoc``, on the additions of the batch sums): where the statistics are given
(evaluation mode) and in ``finish``, ``to_frame`` and ``from_frame`` the results are the reference's bits. The
batch sums (mean, variance, the backward's two sums and the bias gradient's) are accumulated in float64 over
the channel, in the order the vectorised loop takes (fixed by the compiled code), where NumPy sums pairwise in
the data's dtype: they agree to rounding, and so does everything computed from them (inside the sums ``reassoc``
may also regroup the per-pixel terms, ``(t + b) − μ`` as ``t + (b − μ)``: a rounding of a sum, never of an output
entry, whose values the second pass computes without it). Channels run in parallel
(``prange``); each channel's sums are one thread's, so the results are the same for every thread count.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

_OPTIONS = {"error_model": "numpy", "cache": True, "parallel": True}


def _geometry(frame: object) -> tuple[int, int, int, int, int, int, int]:
    """``(n, h, w, p, row, image, lead)`` of a ``Frame``."""
    return frame.n, frame.h, frame.w, frame.p, frame.row, frame.image, frame.lead


# Every pass runs over a channel's whole range with the pixel mask (1 at pixels, 0 on the ring), one loop from 0
# with a select per entry: the loops vectorise (no short rows, no negative-index checks) and garbage on the ring of
# a raw convolution output (NaN or inf included) is never read into a pixel's value or into a sum.
@njit(**_OPTIONS)
def _to_frame(x, out, n, h, w, p, row, image, lead):
    zero = out.dtype.type(0.0)
    for c in prange(x.shape[1]):
        dest = out[c]
        dest[:] = zero
        for m in range(n):
            for y in range(h):
                base = lead + m * image + y * row
                dest[base : base + w] = x[m, c, y]


@njit(**_OPTIONS)
def _from_frame(y, bias, has_bias, out, n, h, w, p, row, image, lead):
    for c in prange(y.shape[0]):
        source = y[c]
        b = bias[c]
        for m in range(n):
            for r in range(h):
                base = lead + m * image + r * row
                pixels, dest = source[base : base + w], out[m, c, r]
                if has_bias:
                    for col in range(w):
                        dest[col] = pixels[col] + b
                else:
                    dest[:] = pixels


@njit(**_OPTIONS)
def _finish(y, mask, bias, has_bias, skip, has_skip):
    zero = y.dtype.type(0.0)
    for c in prange(y.shape[0]):
        dest = y[c]
        b = bias[c]
        if has_skip:
            extra = skip[c]
            for q in range(dest.shape[0]):
                v = (dest[q] + b) + extra[q] if has_bias else dest[q] + extra[q]
                dest[q] = v if mask[q] else zero
        else:
            for q in range(dest.shape[0]):
                v = dest[q] + b if has_bias else dest[q]
                dest[q] = v if mask[q] else zero


# The batch sums, in float64 over a channel's pixels. Only the additions may be reassociated ("reassoc", in
# these functions alone), so that LLVM vectorises them: a chain of dependent float64 additions would cost four
# cycles per pixel. The values summed are computed as everywhere else.
_SUMS = {"error_model": "numpy", "cache": True, "fastmath": {"reassoc"}}


@njit(**_SUMS)
def _sum(source, mask, b):
    total = 0.0
    for q in range(source.shape[0]):
        value = float(source[q] + b)
        total += value if mask[q] else 0.0
    return total


@njit(**_SUMS)
def _sum_squares(source, mask, b, mu):
    total = 0.0
    for q in range(source.shape[0]):
        d = float((source[q] + b) - mu)
        square = d * d
        total += square if mask[q] else 0.0
    return total


@njit(**_SUMS)
def _backward_sums(grad, source, mask, b, mu, inv, g, bt):
    zero = source.dtype.type(0.0)
    sum_d_z, sum_d_z_x_hat = 0.0, 0.0
    for q in range(source.shape[0]):
        x_hat = ((source[q] + b) - mu) * inv
        z = x_hat * g + bt
        upstream = grad[q]
        pixel = mask[q] != 0
        d_z = upstream if pixel & (z > zero) else zero
        x_hat = x_hat if pixel else zero
        sum_d_z += d_z
        sum_d_z_x_hat += d_z * x_hat
    return sum_d_z, sum_d_z_x_hat


@njit(**_SUMS)
def _plain_sum(values):
    total = 0.0
    for q in range(values.shape[0]):
        total += values[q]
    return total


@njit(**_OPTIONS)
def _batch_norm_relu(t, mask, bias, gamma, beta, eps, mean, var, training, u, count):
    zero, one = t.dtype.type(0.0), t.dtype.type(1.0)
    for c in prange(t.shape[0]):
        source, dest = t[c], u[c]
        b = bias[c]
        if training:
            mean[c] = _sum(source, mask, b) / count
            var[c] = _sum_squares(source, mask, b, mean[c]) / count
        mu = mean[c]
        inv_std = one / np.sqrt(var[c] + eps)
        g, bt = gamma[c], beta[c]
        for q in range(dest.shape[0]):
            z = ((source[q] + b) - mu) * inv_std * g + bt
            value = z * (one if z > zero else zero)
            dest[q] = value if mask[q] else zero


@njit(**_OPTIONS)
def _batch_norm_relu_backward(d_u, t, mask, bias, gamma, beta, mean, inv_std, training, d_t, sums, count):
    zero, one = t.dtype.type(0.0), t.dtype.type(1.0)
    for c in prange(t.shape[0]):
        source, grad, dest = t[c], d_u[c], d_t[c]
        b, mu, inv, g, bt = bias[c], mean[c], inv_std[c], gamma[c], beta[c]
        sum_d_z, sum_d_z_x_hat = _backward_sums(grad, source, mask, b, mu, inv, g, bt)
        # mean(γ d_z) and mean(γ d_z ⊙ x̂): the reference's means of d_x̂ = γ d_z, to rounding
        mean_d = t.dtype.type(float(g) * sum_d_z / count)
        mean_d_x_hat = t.dtype.type(float(g) * sum_d_z_x_hat / count)
        if training:
            for q in range(dest.shape[0]):
                x_hat = ((source[q] + b) - mu) * inv
                z = x_hat * g + bt
                d_x_hat = grad[q] * (one if z > zero else zero) * g
                d = (d_x_hat - mean_d - x_hat * mean_d_x_hat) * inv
                dest[q] = d if mask[q] else zero
        else:
            for q in range(dest.shape[0]):
                x_hat = ((source[q] + b) - mu) * inv
                z = x_hat * g + bt
                d = grad[q] * (one if z > zero else zero) * g * inv
                dest[q] = d if mask[q] else zero
        sums[0, c] = sum_d_z
        sums[1, c] = sum_d_z_x_hat
        sums[2, c] = _plain_sum(dest)  # the ring is zero now


@functools.lru_cache(maxsize=32)
def _pixel_mask(n: int, h: int, w: int, k: int, length: int) -> np.ndarray:
    """``mask[q] = 1`` where position ``q`` of a frame holds a pixel (uint8, ``length`` long: the frame's row,
    which may run past the last image's ring, ``Frame.end``, to an aligned length)."""
    p = k // 2
    row, lead = w + p, p * (w + p) + p
    mask = np.zeros(length, dtype=np.uint8)
    mask[lead : lead + n * (h + p) * row].reshape(n, h + p, row)[:, :h, :w] = 1
    mask.flags.writeable = False
    return mask


def _mask(frame: object) -> np.ndarray:
    return _pixel_mask(frame.n, frame.h, frame.w, frame.k, frame.length)


def _new_frame(channels: int, frame: object, dtype: np.dtype) -> np.ndarray:
    """An uninitialised ``(channels, frame.length)`` array with 64-byte aligned rows, as the reference's
    ``new_frame`` makes them (``frame.length`` is a multiple of 16 entries)."""
    dtype = np.dtype(dtype)
    size, spare = channels * frame.length, 64 // dtype.itemsize
    flat = np.empty(size + spare, dtype=dtype)
    offset = (-flat.ctypes.data % 64) // dtype.itemsize
    return flat[offset : offset + size].reshape(channels, frame.length)


def _vector(v: np.ndarray | None, like: np.ndarray, channels: int) -> np.ndarray:
    """A contiguous ``(C,)`` array of ``like``'s dtype (zeros for ``None``)."""
    if v is None:
        return np.zeros(channels, dtype=like.dtype)
    return np.ascontiguousarray(v, dtype=like.dtype)


def to_frame(x: np.ndarray, frame: object) -> np.ndarray:
    """``nflow_np.nn.shifted.to_frame``: ``(N, C, H, W)`` → a clean ``(C, length)`` frame."""
    x = np.ascontiguousarray(x)
    out = _new_frame(x.shape[1], frame, x.dtype)
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
    _finish(y, _mask(frame), _vector(bias, y, y.shape[0]), bias is not None, skip_array, skip is not None)
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
    u = _new_frame(channels, frame, dtype)
    vectors = [_vector(v, t, channels) for v in (bias, gamma, beta)]
    _batch_norm_relu(t, _mask(frame), *vectors, dtype.type(eps), mean, var, training, u, frame.pixel_count)
    return u, mean, var


def batch_norm_relu_backward(d_u: np.ndarray, t: np.ndarray, frame: object, bias: np.ndarray, gamma: np.ndarray,
                             beta: np.ndarray, mean: np.ndarray, inv_std: np.ndarray,
                             training: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """``nflow_np.nn.shifted.batch_norm_relu_backward``: ``(d_t, Σ d_z, Σ d_z ⊙ x̂, Σ d_t)``."""
    t, d_u = np.ascontiguousarray(t), np.ascontiguousarray(d_u)
    channels = t.shape[0]
    d_t = _new_frame(channels, frame, t.dtype)
    sums = np.empty((3, channels), dtype=t.dtype)
    vectors = [_vector(v, t, channels) for v in (bias, gamma, beta, mean, inv_std)]
    _batch_norm_relu_backward(d_u, t, _mask(frame), *vectors, bool(training), d_t, sums, frame.pixel_count)
    return d_t, sums[0], sums[1], sums[2]


FUSED = {
    "frame.to": to_frame,
    "frame.from": from_frame,
    "frame.finish": finish,
    "frame.batch_norm_relu": batch_norm_relu,
    "frame.batch_norm_relu_backward": batch_norm_relu_backward,
}
"""The reference functions these kernels replace, by the name ``nflow_np.backend.fused`` looks up."""
