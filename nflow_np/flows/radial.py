"""Radial flow (Rezende & Mohamed 2015, §4.1), with its inverse.

Direction. As for :class:`~nflow_np.flows.planar.Planar`: ``forward`` is the paper's map ``g``
(closed form), used as the sampling map in variational inference, and ``inverse`` solves for the
preimage.

Map, with ``v = z − z₀``, ``r = ‖v‖``, ``h = 1/(α + r)``::

    forward   y = z + β h(r) v  =  z₀ + f(r) v,      f(r) = 1 + β/(α + r) = (r + γ)/(α + r)

where ``α = softplus(α̂) > 0`` and ``β = −α + softplus(β̂)``, so ``γ = α + β = softplus(β̂) > 0``
(the paper's constraint ``β ≥ −α``, strictly). ``f > 0``: the map moves each point along its ray
from ``z₀`` and ``‖y − z₀‖ = R(r) = r f(r)``.

Log-determinant (the Jacobian is ``f I + f'(r) v vᵀ/r``: eigenvalue ``f`` on the ``D − 1``
directions orthogonal to ``v``, ``f + r f' = R'(r)`` along ``v``)::

    logdet = (D − 1) log f(r) + log q(r),   q(r) = R'(r) = 1 + αβ/(α + r)² = (r² + 2αr + αγ)/(α + r)²

Both factors are written as ratios of positive terms, so nothing cancels near ``β → −α``.

Inverse. Given ``y``, ``R = ‖y − z₀‖`` fixes ``r`` through the scalar equation ``r f(r) = R``.
``R(r)`` is continuous, ``R(0) = 0``, ``R → ∞``, and ``R'(r) = q(r) > 0``, so exactly one ``r ≥ 0``
solves it. Multiplying out, ``r² + (γ − R) r − αR = 0``: the product of its roots is ``−αR ≤ 0``,
so the solution is the non-negative root, taken in the form without cancellation
(:func:`solve_radial`). Then ``z = z₀ + (y − z₀)/f(r)``.

Gradients (``docs/vi.md#radial-flow``): through ``y = z₀ + f v`` and the log-det by the chain rule
(``∂r/∂v = v/r``); in the inverse direction the root ``r(R, α, γ)`` is differentiated implicitly,
``q dr = dR − r ∂f/∂α dα − r ∂f/∂γ dγ``. At ``v = 0`` (probability zero) ``∂r/∂v`` is taken as 0.
"""

from __future__ import annotations

import numpy as np

from nflow_np.flows.base import Flow
from nflow_np.flows.planar import sigmoid, softplus
from nflow_np.module import as_float_dtype
from nflow_np.seeding import as_generator
from nflow_np.specs import SpecReader, register_flow


def solve_radial(radius_out: np.ndarray, alpha: float, gamma: float) -> np.ndarray:
    """The ``r ≥ 0`` with ``r (r + γ)/(α + r) = R``, elementwise.

    It is the non-negative root of ``r² + (γ − R) r − αR = 0``. With ``d = √((R − γ)² + 4αR)``:
    ``r = ((R − γ) + d)/2`` when ``R ≥ γ``, else the equal ``r = 2αR/((γ − R) + d)``; in each form
    the two added terms have the same sign, so nothing cancels and ``r`` is exact to a few ulps.
    One Newton step on ``r (r + γ) − R(α + r)`` removes what rounding is left.

    Parameters
    ----------
    radius_out : numpy.ndarray, shape (N,)
        ``R = ‖y − z₀‖ ≥ 0``.
    alpha, gamma : float
        ``α > 0`` and ``γ = α + β > 0``.

    Returns
    -------
    numpy.ndarray, shape (N,)
    """
    shift = radius_out - gamma
    root = np.sqrt(shift * shift + 4 * alpha * radius_out)
    with np.errstate(divide="ignore", invalid="ignore"):
        small = 2 * alpha * radius_out / (root - shift)
    r = np.where(shift >= 0, 0.5 * (shift + root), np.where(radius_out > 0, small, 0.0))
    residual = r * (r + gamma) - radius_out * (alpha + r)
    return r - residual / (2 * r + gamma - radius_out)


def radial_terms(r: np.ndarray, alpha: float, gamma: float, dim: int) -> dict[str, np.ndarray]:
    """``f(r)``, the log-det and their partial derivatives in ``r``, ``α``, ``γ`` (shape (N,) each).

    ``f = (r + γ)/(α + r)``; ``logdet = (D − 1) log f + log q``,
    ``log q = log(r² + 2αr + αγ) − 2 log(α + r)``. Keys: ``f, f_r, f_alpha, f_gamma, q, logdet,
    logdet_r, logdet_alpha, logdet_gamma``.
    """
    s = alpha + r  # α + r
    p = r * (r + 2 * alpha) + alpha * gamma  # q (α + r)²
    f = (r + gamma) / s
    return {
        "f": f,
        "f_r": (alpha - gamma) / (s * s),
        "f_alpha": -f / s,
        "f_gamma": 1 / s,
        "q": p / (s * s),
        "logdet": (dim - 1) * np.log(f) + np.log(p) - 2 * np.log(s),
        "logdet_r": (dim - 1) * (1 / (r + gamma) - 1 / s) + 2 * s / p - 2 / s,
        "logdet_alpha": -(dim - 1) / s + (2 * r + gamma) / p - 2 / s,
        "logdet_gamma": (dim - 1) / (r + gamma) + alpha / p,
    }


def _unit(v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``v / r`` row by row, 0 where ``r = 0`` (the subgradient used at the centre)."""
    safe = np.where(r > 0, r, 1)
    return np.where(r[:, None] > 0, v / safe[:, None], 0)


@register_flow("radial", "dim")
class Radial(Flow):
    """Radial flow ``y = z + β (z − z₀)/(α + ‖z − z₀‖)`` (see the module docstring for the maths).

    ``forward`` is the paper's map ``g`` (closed form); ``inverse`` solves the scalar equation in
    ``r`` (:func:`solve_radial`). Parameters: ``z0`` of shape (D,), ``alpha_hat`` and ``beta_hat``
    of shape (1,), with ``α = softplus(α̂)`` and ``β = −α + softplus(β̂)``; every parameter value
    gives an invertible map.

    Parameters
    ----------
    dim : int
        ``D``.
    rng : numpy.random.Generator, optional
        Initialisation randomness (default: seeded 0).
    init_scale : float
        ``z0 ~ N(0, init_scale²)``; ``α̂ = 0`` (``α = log 2``) and ``β̂`` such that ``β = 0``: the
        identity map at the start.
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
        self.add_param("z0", rng.normal(0.0, init_scale, dim).astype(dtype))
        self.add_param("alpha_hat", np.zeros(1, dtype=dtype))
        # softplus(β̂) = α = log 2  ⇔  β̂ = log(e^{log 2} − 1) = 0
        self.add_param("beta_hat", np.zeros(1, dtype=dtype))

    def spec(self, where: str = "flow") -> dict:
        """``{"kind": "radial", "dim"}`` (``z0``, ``alpha_hat``, ``beta_hat`` are in the weights file)."""
        return {"kind": "radial", "dim": self.dim}

    @classmethod
    def from_spec(cls, read: SpecReader) -> Radial:
        dim = read.dim()
        read.take(dim + 2)
        return cls(dim, dtype=read.dtype)

    def alpha_gamma(self) -> tuple[float, float]:
        """``(α, γ)`` with ``α = softplus(α̂)``, ``γ = α + β = softplus(β̂)``."""
        return softplus(self.params["alpha_hat"][0]), softplus(self.params["beta_hat"][0])

    def _forward(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        alpha, gamma = self.alpha_gamma()
        v = z - self.params["z0"]
        r = np.sqrt(np.einsum("nd,nd->n", v, v))
        terms = radial_terms(r, alpha, gamma, self.dim)
        y = self.params["z0"] + terms["f"][:, None] * v
        self._remember("forward", z.shape[0], (v, r, terms))
        return y, terms["logdet"]

    def _inverse(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        alpha, gamma = self.alpha_gamma()
        v_out = y - self.params["z0"]
        radius_out = np.sqrt(np.einsum("nd,nd->n", v_out, v_out))
        r = solve_radial(radius_out, alpha, gamma)
        terms = radial_terms(r, alpha, gamma, self.dim)
        z = self.params["z0"] + v_out / terms["f"][:, None]
        self._remember("inverse", y.shape[0], (v_out, radius_out, r, terms))
        return z, -terms["logdet"]

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        direction, cache = self._cache
        alpha, gamma = self.alpha_gamma()
        if direction == "forward":
            # y = z₀ + f(r; α, γ) v,  logdet(r; α, γ),  r = ‖v‖,  v = z − z₀
            v, r, t = cache
            d_f = np.einsum("nd,nd->n", d_out, v)
            d_r = d_f * t["f_r"] + d_logdet * t["logdet_r"]
            d_alpha = d_f @ t["f_alpha"] + d_logdet @ t["logdet_alpha"]
            d_gamma = d_f @ t["f_gamma"] + d_logdet @ t["logdet_gamma"]
            d_v = t["f"][:, None] * d_out + d_r[:, None] * _unit(v, r)
        else:
            # z = z₀ + v_out / f(r; α, γ),  logdet = −logdet(r; α, γ),  r = r(R; α, γ),  R = ‖v_out‖
            v_out, radius_out, r, t = cache
            d_inv_f = np.einsum("nd,nd->n", d_out, v_out)  # ∂L/∂(1/f)
            d_f = -d_inv_f / (t["f"] * t["f"])
            d_r = d_f * t["f_r"] - d_logdet * t["logdet_r"]
            d_alpha = d_f @ t["f_alpha"] - d_logdet @ t["logdet_alpha"]
            d_gamma = d_f @ t["f_gamma"] - d_logdet @ t["logdet_gamma"]
            # implicit: q dr = dR − r f_α dα − r f_γ dγ
            d_radius_out = d_r / t["q"]
            d_alpha -= d_radius_out @ (r * t["f_alpha"])
            d_gamma -= d_radius_out @ (r * t["f_gamma"])
            d_v = d_out / t["f"][:, None] + d_radius_out[:, None] * _unit(v_out, radius_out)
        self.grads["z0"] += d_out.sum(axis=0) - d_v.sum(axis=0)
        self.grads["alpha_hat"] += d_alpha * sigmoid(self.params["alpha_hat"][0])
        self.grads["beta_hat"] += d_gamma * sigmoid(self.params["beta_hat"][0])
        return d_v
