"""Coupling laws ``τ``: the elementwise part of a coupling layer, as pure functions.

A coupling layer splits ``x`` into ``x₁`` (passed through) and ``x₂`` (transformed), computes
``h = c(x₁)`` with its net, and applies a coupling law ``z₂ = τ(x₂, h)``. This module is the
*reference and specification* of ``τ``: the fused kernels (``kernels/``) implement exactly these
signatures and are tested against these functions. Every law offers

- ``forward(x2, h, scale) -> (z2, logdet)``            ``logdet = log|det ∂z₂/∂x₂|``, shape (N,)
- ``inverse(z2, h, scale) -> (x2, logdet)``            ``logdet = log|det ∂x₂/∂z₂|``
- ``forward_vjp(x2, h, scale, d_z2, d_logdet) -> (d_x2, d_h, d_scale)``
- ``inverse_vjp(z2, h, scale, d_x2, d_logdet) -> (d_z2, d_h, d_scale)``

with ``x2, z2: (N, D₂)`` and ``h: (N, out_features(D₂))``. The ``*_vjp`` functions (vector-Jacobian
products: the backward of each direction) take the same *input* as the pass they differentiate
(and recompute the rest), so a kernel can do a whole backward in one sweep over memory.
Derivations: ``docs/flows.md#coupling-laws``.

The functions run unchanged on device (CuPy) arrays: they only call ufuncs, methods and
``np.*_like``, which dispatch on their argument.
"""

from __future__ import annotations

import numpy as np

from nflow_np import backend


class AdditiveLaw:
    """NICE's additive law (Dinh et al. 2014): ``z₂ = x₂ + t``, ``t = h``; volume preserving.

    forward  ``z₂ = x₂ + h``, ``logdet = 0``;  inverse ``x₂ = z₂ − h``, ``logdet = 0``.
    backward of forward: ``∂L/∂x₂ = d_z₂``, ``∂L/∂h = d_z₂``.
    backward of inverse: ``∂L/∂z₂ = d_x₂``, ``∂L/∂h = −d_x₂``.
    No scale parameter: ``scale`` is ``None`` and ``d_scale`` is returned as ``None``.
    """

    name = "additive"
    has_scale = False

    @staticmethod
    def out_features(d2: int) -> int:
        return d2

    @staticmethod
    def forward(x2: np.ndarray, h: np.ndarray, scale: None) -> tuple[np.ndarray, np.ndarray]:
        return x2 + h, np.zeros_like(x2, shape=x2.shape[0])

    @staticmethod
    def inverse(z2: np.ndarray, h: np.ndarray, scale: None) -> tuple[np.ndarray, np.ndarray]:
        return z2 - h, np.zeros_like(z2, shape=z2.shape[0])

    @staticmethod
    def forward_vjp(x2, h, scale, d_z2, d_logdet):
        return d_z2, d_z2.copy(), None

    @staticmethod
    def inverse_vjp(z2, h, scale, d_x2, d_logdet):
        return d_x2, -d_x2, None


class AffineLaw:
    """RealNVP's affine law (Dinh et al. 2016) with a bounded log-scale.

    The net output is split ``h = [ŝ, t]`` (``D₂`` columns each) and the log-scale is
    ``s = a ⊙ tanh(ŝ)`` with a learned per-dimension factor ``a`` (the coupling's ``scale``):

    forward  ``z₂ = x₂ ⊙ exp(s) + t``,         ``logdet = Σ_j s_j``
    inverse  ``x₂ = (z₂ − t) ⊙ exp(−s)``,      ``logdet = −Σ_j s_j``

    Why bounded: with a raw ``s = ŝ`` one large net output gives ``exp(s) = inf`` and NaN
    gradients (the failure users of flow libraries report most). With ``|s_j| ≤ |a_j|`` the
    per-layer stretch is at most ``exp(|a_j|)``, and ``a`` only moves at the optimizer's pace, so a
    single bad batch cannot overflow a layer. ``tanh`` is smooth and ``tanh(ŝ) ≈ ŝ`` near 0, so
    small net outputs act like the unbounded law with its log-scale multiplied by ``a``.

    Backward of forward, with ``g = tanh(ŝ)``, ``e = exp(s)``:
        ``∂L/∂x₂ = d_z₂ ⊙ e``;  ``∂L/∂t = d_z₂``;
        ``∂L/∂s = d_z₂ ⊙ x₂ ⊙ e + d_logdet``  (``d_logdet`` broadcast over columns);
        ``∂L/∂ŝ = ∂L/∂s ⊙ a ⊙ (1 − g²)``;  ``∂L/∂a = Σ_n ∂L/∂s ⊙ g``.
    Backward of inverse, with ``x₂ = (z₂ − t) ⊙ e⁻¹``:
        ``∂L/∂z₂ = d_x₂ ⊙ e⁻¹``;  ``∂L/∂t = −d_x₂ ⊙ e⁻¹``;
        ``∂L/∂s = −d_x₂ ⊙ x₂ − d_logdet``;  ``ŝ`` and ``a`` as above.
    """

    name = "affine"
    has_scale = True

    @staticmethod
    def out_features(d2: int) -> int:
        return 2 * d2

    @staticmethod
    def log_scale(h: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Split ``h`` and return ``(s, g, t)`` with ``g = tanh(ŝ)``, ``s = scale ⊙ g``."""
        d2 = h.shape[1] // 2
        g = np.tanh(h[:, :d2])
        return scale * g, g, h[:, d2:]

    @staticmethod
    def forward(x2: np.ndarray, h: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, _, t = AffineLaw.log_scale(h, scale)
        z2 = x2 * np.exp(s)
        z2 += t
        return z2, s.sum(axis=1)

    @staticmethod
    def inverse(z2: np.ndarray, h: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, _, t = AffineLaw.log_scale(h, scale)
        x2 = z2 - t
        x2 *= np.exp(-s)
        return x2, -s.sum(axis=1)

    @staticmethod
    def forward_vjp(x2, h, scale, d_z2, d_logdet):
        s, g, _ = AffineLaw.log_scale(h, scale)
        e = np.exp(s)
        d_x2 = d_z2 * e
        d_s = d_x2 * x2
        d_s += d_logdet[:, None]
        return d_x2, AffineLaw._d_h(d_s, g, scale, d_z2), (d_s * g).sum(axis=0)

    @staticmethod
    def inverse_vjp(z2, h, scale, d_x2, d_logdet):
        s, g, t = AffineLaw.log_scale(h, scale)
        e_inv = np.exp(-s)
        d_z2 = d_x2 * e_inv
        x2 = (z2 - t) * e_inv
        d_s = -d_x2 * x2
        d_s -= d_logdet[:, None]
        return d_z2, AffineLaw._d_h(d_s, g, scale, -d_z2), (d_s * g).sum(axis=0)

    @staticmethod
    def _d_h(d_s: np.ndarray, g: np.ndarray, scale: np.ndarray, d_t: np.ndarray) -> np.ndarray:
        """Stack ``[∂L/∂ŝ, ∂L/∂t]`` with ``∂L/∂ŝ = ∂L/∂s ⊙ a ⊙ (1 − g²)``."""
        d2 = g.shape[1]
        d_h = np.empty_like(g, shape=(g.shape[0], 2 * d2))
        np.multiply(d_s * scale, 1 - g * g, out=d_h[:, :d2])
        d_h[:, d2:] = d_t
        return d_h


backend.register_law(AdditiveLaw)
backend.register_law(AffineLaw)
COUPLING_LAWS: dict[str, type] = backend.LAWS
"""Every registered reference law by name (ours and those of :func:`nflow_np.backend.register_law`)."""
