"""The ResNet's forward and backward on frames: the shifted-GEMM path of :class:`~nflow_np.nn.resnet.ResNet`.

The same net, parameters and gradients as the layer-by-layer path (``ResNet.layers`` called in turn, each
convolution by im2col), computed on the channel-major frames of :mod:`nflow_np.nn.shifted`: the input is put
into a frame once, every activation between the layers stays a frame, and only the output (and, backward,
the input gradient) is converted back to ``(N, C, H, W)``. Per residual block (``docs/conv.md#the-resnet-on-frames``):

    forward    t = conv₁(h)                          k² accumulating GEMMs, raw (garbage ring)
               u = ReLU(BN(t + b₁))                  one fused pass per channel: statistics, normalise, ReLU, clean
               h' = (conv₂(u) + b₂) + h              k² GEMMs, then bias, skip and ring in one pass
    backward   ∂u, ∂W₂ = conv₂ᵀ(∂h')                 one pass over the chunks for both
               ∂t, Σ's = BN-ReLU backward(∂u)        one fused pass per channel
               ∂h = ∂h' + conv₁ᵀ(∂t), ∂W₁            the input gradient accumulated into ∂h' itself (β = 1)

The elementwise passes go through :func:`nflow_np.backend.fused` (the NumPy references in
:mod:`nflow_np.nn.shifted`, Numba kernels in ``kernels/conv/numba_frames.py``). Batch norm in training mode
updates the running averages exactly as :class:`~nflow_np.flows.normalization.BatchNorm` does.

The functions take the :class:`~nflow_np.nn.resnet.ResNet` (duck-typed: its ``layers``, each block's ``layers``)
and return the cache :meth:`ResNet.backward` hands back; nothing here holds state.
"""

from __future__ import annotations

import numpy as np

from nflow_np import backend, grad_mode
from nflow_np.allocator import keep_freed_memory
from nflow_np.nn import shifted
from nflow_np.nn.shifted import Frame, conv_backward, conv_forward, stack_weights


def _kernels() -> dict:
    fused = backend.fused
    return {"to": fused("frame.to", shifted.to_frame), "from": fused("frame.from", shifted.from_frame),
            "finish": fused("frame.finish", shifted.finish),
            "bn_relu": fused("frame.batch_norm_relu", shifted.batch_norm_relu),
            "bn_relu_backward": fused("frame.batch_norm_relu_backward", shifted.batch_norm_relu_backward)}  # fmt: skip


def _weights(conv: object) -> tuple[np.ndarray, np.ndarray | None]:
    """``(W_ij stacked, ‖v‖)`` of a :class:`~nflow_np.nn.conv.Conv2d`."""
    w, norm = conv.weight()
    return stack_weights(w), norm


def _norm_relu(kernels: dict, norm: object, t: np.ndarray, frame: Frame, bias: np.ndarray) -> tuple[np.ndarray, tuple]:
    """``ReLU(BN(t + bias))`` with batch norm ``norm`` (a flows ``BatchNorm``), as its own ``_forward`` would."""
    p = norm.params
    gamma = np.exp(p["log_gamma"])
    if norm.training:
        u, mean, var = kernels["bn_relu"](t, frame, bias, gamma, p["beta"], norm.eps)
        norm.update_running(mean, var)
    else:
        mean, var = norm.buffers["running_mean"].copy(), norm.buffers["running_var"].copy()
        u, _, _ = kernels["bn_relu"](t, frame, bias, gamma, p["beta"], norm.eps, mean, var)
    return u, (norm.training, mean, 1 / np.sqrt(var + norm.eps), gamma)


def _norm_relu_backward(kernels: dict, norm: object, d_u: np.ndarray, t: np.ndarray, frame: Frame,
                        bias: np.ndarray, stats: tuple) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``∂L/∂t`` (clean) and ``Σ ∂L/∂t`` (the bias's gradient); adds batch norm's own gradients."""
    training, mean, inv_std, gamma = stats
    d_t, sum_d_z, sum_d_z_x_hat, sum_d_t = kernels["bn_relu_backward"](
        d_u, t, frame, bias, gamma, norm.params["beta"], mean, inv_std, training
    )
    norm.grads["beta"] += sum_d_z
    norm.grads["log_gamma"] += gamma * sum_d_z_x_hat
    return d_t, sum_d_t


def forward(net: object, x: np.ndarray) -> tuple[np.ndarray, dict | None]:
    """``net(x)`` for ``x: (N, C_in, H, W)`` on frames; returns ``(y, cache)`` (``cache`` is ``None`` under no_grad)."""
    kernels = _kernels()
    keep_freed_memory()  # a step allocates ~30 frames: without it each page-faults fresh memory (allocator.py)
    frame = shifted.frame_of(x.shape, net.kernel_size)
    conv_in, *blocks, final_norm, _, conv_out = net.layers
    keep = grad_mode.is_grad_enabled()
    x_frame = kernels["to"](np.ascontiguousarray(x), frame)
    wk_in, norm_in = _weights(conv_in)
    h = kernels["finish"](conv_forward(x_frame, wk_in, frame), frame, conv_in.params["b"])
    records = []
    for block in blocks:
        conv1, batch_norm, _, conv2 = block.layers
        wk1, norm1 = _weights(conv1)
        t = conv_forward(h, wk1, frame)
        u, stats = _norm_relu(kernels, batch_norm.norm, t, frame, conv1.params["b"])
        wk2, norm2 = _weights(conv2)
        h_next = kernels["finish"](conv_forward(u, wk2, frame), frame, conv2.params["b"], h)
        if keep:
            records.append((h, wk1, norm1, t, stats, u, wk2, norm2))
        h = h_next
    zero = np.zeros_like(h, shape=h.shape[0])
    u_out, stats_out = _norm_relu(kernels, final_norm.norm, h, frame, zero)
    wk_out, norm_out = _weights(conv_out)
    y = kernels["from"](conv_forward(u_out, wk_out, frame), frame, conv_out.params["b"])
    if not keep:
        return y, None
    cache = {"frame": frame, "input": (x_frame, wk_in, norm_in), "blocks": records,
             "output": (h, stats_out, u_out, wk_out, norm_out)}  # fmt: skip
    return y, cache


def backward(net: object, cache: dict, d_y: np.ndarray) -> np.ndarray:
    """``∂L/∂x`` from ``∂L/∂y: (N, C_out, H, W)``; adds every parameter's gradient (``docs/conv.md``)."""
    kernels = _kernels()
    frame = cache["frame"]
    columns = slice(frame.start, frame.stop)
    conv_in, *blocks, final_norm, _, conv_out = net.layers
    h, stats_out, u_out, wk_out, norm_out = cache["output"]
    d_frame = kernels["to"](np.ascontiguousarray(d_y), frame)
    conv_out.grads["b"] += d_frame[:, columns].sum(axis=1)
    d_wk, d_u = conv_backward(d_frame, u_out, wk_out, frame)
    conv_out.accumulate_weight_grad(d_wk.transpose(2, 3, 0, 1), norm_out)
    zero = np.zeros_like(h, shape=h.shape[0])
    d_h, _ = _norm_relu_backward(kernels, final_norm.norm, d_u, h, frame, zero, stats_out)
    for block, (h_in, wk1, norm1, t, stats, u, wk2, norm2) in zip(reversed(blocks), reversed(cache["blocks"]),
                                                                  strict=True):  # fmt: skip
        conv1, batch_norm, _, conv2 = block.layers
        conv2.grads["b"] += d_h[:, columns].sum(axis=1)
        d_wk, d_u = conv_backward(d_h, u, wk2, frame)
        conv2.accumulate_weight_grad(d_wk.transpose(2, 3, 0, 1), norm2)
        d_t, sum_d_t = _norm_relu_backward(kernels, batch_norm.norm, d_u, t, frame, conv1.params["b"], stats)
        conv1.grads["b"] += sum_d_t
        d_wk, _ = conv_backward(d_t, h_in, wk1, frame, d_x=d_h, beta=1.0)  # the skip's gradient plus the branch's
        conv1.accumulate_weight_grad(d_wk.transpose(2, 3, 0, 1), norm1)
        d_h = kernels["finish"](d_h, frame)
    x_frame, wk_in, norm_in = cache["input"]
    conv_in.grads["b"] += d_h[:, columns].sum(axis=1)
    d_wk, d_x = conv_backward(d_h, x_frame, wk_in, frame)
    conv_in.accumulate_weight_grad(d_wk.transpose(2, 3, 0, 1), norm_in)
    return kernels["from"](d_x, frame)
