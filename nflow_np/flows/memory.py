"""Backpropagation by inversion: :class:`~nflow_np.flows.base.Sequential`'s ``memory="invert"`` mode.

In the default ``memory="store"`` every layer keeps its cache from the forward call to the backward
call, so activation memory grows linearly with the depth ``K``. A coupling is an exact bijection,
so its input can be recomputed from its output instead (``x_{k−1} = f_k⁻¹(x_k)``): the invert mode
frees each layer's cache as soon as the next layer has run and, walking back, reconstructs each
input with :meth:`Flow._reconstruct <nflow_np.flows.base.Flow._reconstruct>`, back-propagates
through that layer and frees it again (RevNets, Gomez et al. 2017; ``docs/memory.md``).

Anchors bound the round-off: the inputs of layers ``0, k, 2k, …`` (``anchor_every = k``) are
stored, so no input is rebuilt through more than ``k − 1`` inversions. A layer with
``invertible_in_backward = False`` keeps its cache and its input is stored.

These functions take the :class:`Sequential` they serve (``seq``) and use only its ``flows``, its
memory settings and the flow protocol (``_forward``, ``_backward``, ``_reconstruct``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from nflow_np.flows.base import Flow, Sequential

MEMORY_MODES = ("store", "invert")
REMEASURE_EVERY = 100
"""With a ``tolerance``, ``anchor_every`` is chosen again every this many forward calls."""


def check_memory_options(memory: str, anchor_every: int | None, tolerance: float | None) -> None:
    """Raise ``ValueError`` unless ``(memory, anchor_every, tolerance)`` is a valid memory setting."""
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    if anchor_every is not None and (isinstance(anchor_every, bool) or int(anchor_every) < 1):
        raise ValueError(f"anchor_every must be a positive integer, got {anchor_every!r}")
    if tolerance is not None and not (np.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be a positive number, got {tolerance!r}")
    if anchor_every is not None and tolerance is not None:
        raise ValueError("give anchor_every or tolerance, not both")
    if memory == "store" and (anchor_every is not None or tolerance is not None):
        raise ValueError('anchor_every and tolerance apply to memory="invert" only')


def forward_invert(seq: Sequential, x: np.ndarray, remeasure_every: int) -> tuple[np.ndarray, np.ndarray]:
    """The forward pass of ``seq`` keeping only the anchors (and fallback layers' inputs and caches).

    With a ``tolerance``, ``anchor_every`` is measured again at call ``0, remeasure_every, …``:
    training changes how well the layers invert (they start as the identity).
    """
    if seq.tolerance is not None and seq._forwards % remeasure_every == 0:
        seq.anchor_every = anchor_every_for(seq.reconstruction_errors(x), seq.tolerance)
    seq._forwards += 1
    every = seq.anchor_every or len(seq.flows)
    logdet = np.zeros_like(x, shape=x.shape[0])
    stored: dict[int, np.ndarray] = {}
    for k, flow in enumerate(seq.flows):
        exact = flow.invertible_in_backward
        if k % every == 0 or not exact:
            stored[k] = x
        x, layer_logdet = flow._forward(x)
        logdet += layer_logdet
        if exact:
            flow.free_caches()
    seq._remember("forward", x.shape[0], (stored, x))
    return x, logdet


def backward_invert(seq: Sequential, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
    """The backward pass after :func:`forward_invert`: rebuild each input from the output, then back-propagate."""
    _, (stored, x) = seq._cache
    seq._cache = None  # one backward per forward: the stored inputs go as they are used
    for k in reversed(range(len(seq.flows))):
        flow = seq.flows[k]
        if not flow.invertible_in_backward:
            x = stored.pop(k)  # its cache was kept
        elif k in stored:
            x = stored.pop(k)
            flow._forward(x)
        else:
            x = flow._reconstruct(x)
        d_out = flow._backward(d_out, d_logdet)
        flow.free_caches()
    return d_out


def reconstruction_errors(flows: list[Flow], x: np.ndarray) -> np.ndarray:
    """How far inputs recomputed by inversion drift from the true ones, on the batch ``x``.

    Runs the layers forward keeping every input ``x_k``, then reconstructs them from the output
    with no anchor (as ``memory="invert"`` with ``anchor_every = K``, fallback layers still stored)
    and compares.

    Returns
    -------
    numpy.ndarray, shape (K,)
        ``errors[j] = max|x̂ − x| / max|x|`` for the input of layer ``K − 1 − j``, the one reached
        after ``j + 1`` inversions from the output. Every cache is freed afterwards.
    """
    inputs = []
    for flow in flows:
        inputs.append(x)
        x, _ = flow._forward(x)
        flow.free_caches()
    errors = np.zeros(len(flows))
    for j, k in enumerate(reversed(range(len(flows)))):
        flow = flows[k]
        x = inputs[k] if not flow.invertible_in_backward else flow._inverse(x)[0]
        flow.free_caches()
        scale = max(float(np.max(np.abs(inputs[k]))), float(np.finfo(x.dtype).tiny))
        errors[j] = float(np.max(np.abs(x - inputs[k]))) / scale
    return errors


def anchor_every_for(errors: np.ndarray, tolerance: float) -> int:
    """The ``anchor_every`` that keeps reconstruction within ``tolerance``, from measured ``errors``.

    ``errors[j]`` is the relative error after ``j + 1`` inversions (:func:`reconstruction_errors`);
    with ``anchor_every = m`` no input is more than ``m − 1`` inversions from a stored one, so
    ``m = 1 +`` the number of leading entries within ``tolerance`` (all of them: ``m = K``).
    """
    within = 0
    for error in errors:
        if not error <= tolerance:
            break
        within += 1
    return min(within + 1, len(errors))
