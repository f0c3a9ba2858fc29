"""Planar flow (Rezende & Mohamed 2015, §4.1), with the inverse most libraries leave out.

Direction. This layer's ``forward`` is the paper's map ``g`` (a closed form) and its ``inverse``
the numerical solve. In a density model (``FlowModel``, forward = data → noise) that makes
``g`` the data → noise map; in variational inference (:mod:`nflow_np.vi`) ``g`` is the sampling
map ``z_k = g_k(z_{k−1})`` applied to base draws, which is the direction the paper trains in.

Map, with ``h = tanh`` and the reparametrised ``û`` (below)::

    forward   y = z + û h(a),          a = wᵀz + b
    logdet    log|det ∂y/∂z| = log(1 + h'(a) wᵀû)        (matrix determinant lemma)
    inverse   z = y − û h(a),          a solves  a + (wᵀû) h(a) = wᵀy + b

Invertibility (Rezende & Mohamed 2015, appendix A). Write ``m = wᵀû``. The reparametrisation
``û = u + (m(wᵀu) − wᵀu) w/‖w‖²`` with ``m(x) = −1 + softplus(x)`` gives ``wᵀû = m(wᵀu) > −1``.
Taking ``wᵀ`` of the forward map, ``wᵀy + b = a + m h(a) =: φ(a)``. Because ``0 < h' ≤ 1``,
``φ'(a) = 1 + m h'(a) ≥ min(1, 1 + m) > 0``: ``φ`` is continuous, strictly increasing and
unbounded both ways, so for every ``y`` exactly one ``a`` solves ``φ(a) = wᵀy + b``, and then
``z = y − û h(a)`` is the one preimage. Since ``|h| < 1`` the root lies in
``[wᵀy + b − |m|, wᵀy + b + |m|]``, which is the bracket :func:`solve_planar` starts from.

Numerics. ``1 + h'(a) m = tanh²(a) + (1 − tanh²(a)) softplus(wᵀu)`` is a sum of non-negative
terms: no cancellation near the boundary ``wᵀû → −1`` (``softplus → 0``), where the product form
``1 + h' m`` would lose every digit. The inverse is as accurate as the map's conditioning
allows: an error ``ε`` in ``y`` moves the preimage by about ``ε / (1 + h'(a) m)``.

Gradients, forward direction (``docs/vi.md#planar-flow``), with ``t = h(a)``, ``h' = 1 − t²``,
``det = 1 + h' m``::

    d_û  = Σ_n t d_y                      d_t = d_y · û − 2t m d_logdet/det
    d_m  = Σ_n h' d_logdet/det            d_a = h' d_t
    d_z  = d_y + d_a w                    d_w = Σ_n d_a z,   d_b = Σ_n d_a

then through ``û(u, w)`` and ``m(wᵀu)`` (:meth:`Planar._reparametrisation_backward`). The inverse
direction differentiates the root implicitly: ``∂a/∂(wᵀy + b) = 1/φ'(a)``, ``∂a/∂m = −h(a)/φ'(a)``.
"""

from __future__ import annotations

import numpy as np

from nflow_np.flows.base import Flow
from nflow_np.module import as_float_dtype
from nflow_np.seeding import as_generator
from nflow_np.specs import SpecReader, register_flow


def softplus(x: np.ndarray) -> np.ndarray:
    """``log(1 + eˣ)``, without overflow for large ``x`` or underflow to 0 before it must."""
    return np.logaddexp(0, x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + e⁻ˣ) = softplus'(x)``, written with ``tanh`` so it never overflows."""
    return 0.5 * (1 + np.tanh(0.5 * x))


def planar_reparametrisation(u: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``û = u + (m(wᵀu) − wᵀu) w/‖w‖²`` with ``m(x) = −1 + softplus(x)``, so that ``wᵀû = m > −1``.

    Parameters
    ----------
    u, w : numpy.ndarray, shape (D,)
        ``w`` must not be zero.

    Returns
    -------
    u_hat : numpy.ndarray, shape (D,)
    m : float
        ``wᵀû = −1 + softplus(wᵀu)``.
    softplus_wu : float
        ``softplus(wᵀu) = 1 + m``, kept separately because ``1 + m`` cancels near the boundary.
    """
    w_norm2 = w @ w
    if not w_norm2 > 0:
        raise ValueError("planar flow: w is zero, so û = u + (m − wᵀu) w/‖w‖² is undefined")
    wu = w @ u
    softplus_wu = softplus(wu)
    m = softplus_wu - 1
    return u + ((m - wu) / w_norm2) * w, m, softplus_wu


def solve_planar(target: np.ndarray, m: float, softplus_wu: float, max_iter: int = 200) -> np.ndarray:
    """Solve ``φ(a) = a + m tanh(a) = target`` for ``a``, elementwise, to machine precision.

    ``φ`` is strictly increasing when ``m > −1`` (module docstring), so the root is unique and lies
    in ``[target − |m|, target + |m|]``. Safeguarded Newton (``rtsafe``, Numerical Recipes §9.4):
    every evaluation of ``φ`` shrinks the bracket, and an entry bisects instead of taking its Newton
    step when that step would leave the bracket or when the one before did not halve the step
    before it (Newton can cycle on ``φ``, which is convex on one side of 0 and concave on the other).
    So each entry converges at least as fast as bisection, and quadratically near its root. It
    stops when every step is below a few ulps of ``a``.

    Parameters
    ----------
    target : numpy.ndarray, shape (N,)
        ``wᵀy + b`` per row.
    m : float
        ``wᵀû > −1``.
    softplus_wu : float
        ``1 + m``, for the cancellation-free ``φ'(a) = tanh²(a) + (1 − tanh²(a)) softplus_wu``.
    max_iter : int
        Safety cap; bisection alone needs about 60 halvings from the initial bracket plus one per
        binary order of magnitude of ``|m|``.

    Returns
    -------
    numpy.ndarray, shape (N,), float64
    """
    target = target.astype(np.float64)
    low, high = target - abs(m), target + abs(m)
    a = np.clip(target - m * np.tanh(target), low, high)  # one fixed-point step: exact for small m
    step = step_before = high - low
    eps = np.finfo(np.float64).eps
    for _ in range(max_iter):
        t = np.tanh(a)
        residual = a + m * t - target
        slope = t * t + (1 - t * t) * softplus_wu  # φ'(a) > 0
        high = np.where(residual > 0, a, high)
        low = np.where(residual < 0, a, low)
        newton = a - residual / slope  # = a at an exact root, which may sit on the bracket's edge
        outside = ~((newton >= low) & (newton <= high))
        bisect = (outside | (np.abs(2 * residual) > np.abs(step_before * slope))) & (residual != 0)
        step_before = step
        step = np.where(bisect, 0.5 * (high - low), residual / slope)
        a = np.where(bisect, low + step, newton)
        if np.all(np.abs(step) <= 2 * eps * np.abs(a)):
            break
    return a


@register_flow("planar", "dim")
class Planar(Flow):
    """Planar flow ``y = z + û tanh(wᵀz + b)`` (see the module docstring for the maths).

    ``forward`` is the paper's map ``g`` (closed form), ``inverse`` solves a scalar equation per
    row (:func:`solve_planar`). Parameters: ``u`` and ``w`` of shape (D,), ``b`` of shape (1,);
    ``û`` is derived from ``u`` and ``w`` at every call, so any ``u`` is allowed and the layer is
    invertible for every parameter value with ``w ≠ 0``.

    Parameters
    ----------
    dim : int
        ``D``.
    rng : numpy.random.Generator, optional
        Initialisation randomness (default: seeded 0).
    init_scale : float
        ``w`` gets a uniformly random direction and a norm in ``[init_scale/2, init_scale]`` (never near
        0, where ``û`` is undefined); ``u`` is drawn from ``U(−init_scale, init_scale)`` and then moved
        along ``w`` until ``wᵀu = log(e − 1)``, i.e. ``m(wᵀu) = wᵀû = 0``; ``b = 0``. So every layer
        starts as a volume-preserving shear ``z + û tanh(wᵀz)`` with ``û ⊥ w`` and log-det exactly 0:
        a deep stack starts with ``q_K`` as spread out as ``q₀``, not collapsed (at ``wᵀu = 0`` each
        layer would start with ``wᵀû = −0.31`` and contract).
    dtype : float32 or float64
    """

    invertible_in_backward = False  # the inverse is an iterative solve, exact only to its tolerance

    def __init__(
        self,
        dim: int,
        *,
        rng: np.random.Generator | None = None,
        init_scale: float = 1.0,
        dtype: object = np.float64,
    ) -> None:
        super().__init__(dim)
        dtype = as_float_dtype(dtype)
        rng = as_generator(rng, 0)
        direction = rng.standard_normal(dim)
        w = direction / np.linalg.norm(direction) * rng.uniform(0.5 * init_scale, init_scale)
        u = rng.uniform(-init_scale, init_scale, dim)
        u += (np.log(np.e - 1) - w @ u) * w / (w @ w)  # softplus(wᵀu) = 1 ⇔ m = 0
        self.add_param("u", u.astype(dtype))
        self.add_param("w", w.astype(dtype))
        self.add_param("b", np.zeros(1, dtype=dtype))

    def spec(self, where: str = "flow") -> dict:
        """``{"kind": "planar", "dim"}`` (``u``, ``w``, ``b`` are in the weights file)."""
        return {"kind": "planar", "dim": self.dim}

    @classmethod
    def from_spec(cls, read: SpecReader) -> Planar:
        dim = read.dim()
        read.take(2 * dim + 1)
        return cls(dim, dtype=read.dtype)

    def _reparametrisation(self) -> tuple[np.ndarray, float, float]:
        return planar_reparametrisation(self.params["u"], self.params["w"])

    def _forward(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u_hat, m, softplus_wu = self._reparametrisation()
        a = z @ self.params["w"] + self.params["b"][0]
        t = np.tanh(a)
        y = z + t[:, None] * u_hat
        det = t * t + (1 - t * t) * softplus_wu  # = 1 + h'(a) m
        self._remember("forward", z.shape[0], (z, t, det, u_hat, m))
        return y, np.log(det)

    def _inverse(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u_hat, m, softplus_wu = self._reparametrisation()
        target = y @ self.params["w"] + self.params["b"][0]
        a = solve_planar(target, float(m), float(softplus_wu)).astype(y.dtype)
        t = np.tanh(a)
        z = y - t[:, None] * u_hat
        det = t * t + (1 - t * t) * softplus_wu  # = 1 + h'(a) m = φ'(a)
        self._remember("inverse", y.shape[0], (y, t, det, u_hat, m))
        return z, -np.log(det)

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        direction, (inp, t, det, u_hat, m) = self._cache
        w = self.params["w"]
        h_prime = 1 - t * t
        d_det = d_logdet / det
        # d_pre = ∂L/∂(wᵀ·input + b): the input reaches a (forward) or the root a (inverse) only through it
        if direction == "forward":
            # y = z + û t,  logdet = log det,  det = 1 + h' m,  t = tanh(a),  a = wᵀz + b
            d_u_hat = t @ d_out
            d_t = d_out @ u_hat - 2 * t * m * d_det
            d_m = h_prime @ d_det
            d_pre = h_prime * d_t
        else:
            # z = y − û t,  logdet = −log det,  t = tanh(a),  a solves φ(a) = a + m t = wᵀy + b
            d_u_hat = -(t @ d_out)
            d_t = -(d_out @ u_hat) + 2 * t * m * d_det
            d_m = -(h_prime @ d_det)
            d_a = h_prime * d_t
            d_pre = d_a / det  # ∂a/∂(wᵀy + b) = 1/φ'(a), and φ'(a) = det
            d_m -= t @ d_pre  # ∂a/∂m = −t/φ'(a)
        self.grads["w"] += d_pre @ inp
        self.grads["b"] += d_pre.sum()
        self._reparametrisation_backward(d_u_hat, d_m)
        return d_out + d_pre[:, None] * w

    def _reparametrisation_backward(self, d_u_hat: np.ndarray, d_m: float) -> None:
        """Add ``∂L/∂u`` and ``∂L/∂w`` through ``û = u + c w``, ``c = (m − wᵀu)/‖w‖²``, ``m = −1 + softplus(wᵀu)``."""
        u, w = self.params["u"], self.params["w"]
        w_norm2 = w @ w
        wu = w @ u
        c = (softplus(wu) - 1 - wu) / w_norm2
        d_c = d_u_hat @ w
        d_m = d_m + d_c / w_norm2
        d_wu = d_m * sigmoid(wu) - d_c / w_norm2
        d_w_norm2 = -d_c * c / w_norm2
        self.grads["u"] += d_u_hat + d_wu * w
        self.grads["w"] += c * d_u_hat + d_wu * u + 2 * d_w_norm2 * w
