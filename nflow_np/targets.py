"""The 2-D test energies of Rezende & Mohamed 2015 (Figure 3, Table 1), with gradients and log Z.

A target is an unnormalised density ``p̃(z) = exp(−U(z))``; variational inference needs ``U`` and
``∇U`` at the flow's samples. Every energy here is a function ``energy(z) -> (U, grad_U)`` with
``z: (N, 2)``, ``U: (N,)``, ``grad_U: (N, 2)``, in the dtype of ``z``. A user's own target is any
callable with that signature (of any dimension).

The paper's energies, with ``w₁(z) = sin(2π z₁/4)``, ``w₂(z) = 3 exp(−½((z₁ − 1)/0.6)²)``,
``w₃(z) = 3 σ((z₁ − 1)/0.3)``::

    U₁(z) = ½((‖z‖ − 2)/0.4)² − ln(exp(−½((z₁ − 2)/0.6)²) + exp(−½((z₁ + 2)/0.6)²))
    U₂(z) = ½((z₂ − w₁(z))/0.4)²
    U₃(z) = −ln(exp(−½((z₂ − w₁(z))/0.35)²) + exp(−½((z₂ − w₁(z) + w₂(z))/0.35)²))
    U₄(z) = −ln(exp(−½((z₂ − w₁(z))/0.4)²) + exp(−½((z₂ − w₁(z) + w₃(z))/0.35)²))

Normalisation. ``U₁`` grows like ``‖z‖²``: ``exp(−U₁)`` is integrable on ℝ² and
``log Z₁ = 1.8775`` (quadrature on ``[−6, 6]²``, where the rest is below 1e-20). ``U₂``–``U₄`` do
not depend on ``z₁`` outside a bounded range (``w₁`` is periodic, ``w₂, w₃`` saturate), so
``∫ exp(−U) dz₁ = ∞``: they are **not** normalisable on ℝ², and reverse-KL training on them as
written would spread ``q`` along ``z₁`` without end. This project does what the paper's plots do
and confines them to the box ``[−4, 4]²``, softly so that the gradient stays defined: the targets
``U2``–``U4`` of :data:`TARGETS` are ``U_k(z) + wall(z)``, with

    wall(z) = ½ Σ_i (max(|z_i| − 4, 0) / 0.1)²

zero inside the box and a Gaussian-like fall-off of width 0.1 outside it. ``log Z`` is then the
quadrature of exactly this energy, over ``[−5, 5]²`` (which holds the wall's tails), so that
``KL(q‖p) = F + log Z`` is a true KL divergence, ≥ 0. Another box or wall:
``get_target("U3", box_half_width=6, wall_width=0.2)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from nflow_np.validation import check_batch

Energy = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""``energy(z: (N, D)) -> (U: (N,), grad_U: (N, D))``."""


# -- building blocks ---------------------------------------------------------------------------


def _check(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    check_batch(z, "z", 2, None)
    return z[:, 0], z[:, 1]


def _neg_log_sum_exp(e1: np.ndarray, g1: np.ndarray, e2: np.ndarray, g2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``−ln(exp(e₁) + exp(e₂))`` and its gradient ``−(p₁ ∇e₁ + p₂ ∇e₂)``, ``p_i = exp(e_i)/(exp(e₁) + exp(e₂))``."""
    value = np.logaddexp(e1, e2)
    p1 = np.exp(e1 - value)
    p2 = np.exp(e2 - value)
    return -value, -(p1[:, None] * g1 + p2[:, None] * g2)


def _stack(g1: np.ndarray, g2: np.ndarray) -> np.ndarray:
    return np.stack([g1, g2], axis=1)


def w1(z1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w₁ = sin(2π z₁/4)`` and ``dw₁/dz₁``."""
    angle = 0.5 * np.pi * z1
    return np.sin(angle), 0.5 * np.pi * np.cos(angle)


def w2(z1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w₂ = 3 exp(−½((z₁ − 1)/0.6)²)`` and ``dw₂/dz₁``."""
    value = 3 * np.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
    return value, -value * (z1 - 1) / 0.36


def w3(z1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w₃ = 3 σ((z₁ − 1)/0.3)`` and ``dw₃/dz₁``."""
    s = 0.5 * (1 + np.tanh(0.5 * (z1 - 1) / 0.3))
    return 3 * s, 3 * s * (1 - s) / 0.3


def _bump(z2: np.ndarray, centre: np.ndarray, d_centre: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """``e = −½((z₂ − c(z₁))/width)²`` and ``∇e`` for a centre ``c(z₁)`` with derivative ``d_centre``."""
    d = (z2 - centre) / width**2
    return -0.5 * (z2 - centre) ** 2 / width**2, _stack(d * d_centre, -d)


# -- the four energies -------------------------------------------------------------------------


def u1(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``U₁``: a ring of radius 2 cut by two Gaussian bumps at ``z₁ = ±2``.

    ``∇U₁ = ((‖z‖ − 2)/0.4²) z/‖z‖ − (p₊ ∇e₊ + p₋ ∇e₋)``; at ``z = 0`` the first term is taken as 0.
    """
    z1, z2 = _check(z)
    r = np.sqrt(z1 * z1 + z2 * z2)
    ring = 0.5 * ((r - 2) / 0.4) ** 2
    radial = np.where(r > 0, (r - 2) / 0.16 / np.where(r > 0, r, 1), 0)
    zero = np.zeros_like(z1)
    bumps, grad_bumps = _neg_log_sum_exp(
        -0.5 * ((z1 - 2) / 0.6) ** 2,
        _stack(-(z1 - 2) / 0.36, zero),
        -0.5 * ((z1 + 2) / 0.6) ** 2,
        _stack(-(z1 + 2) / 0.36, zero),
    )
    return ring + bumps, radial[:, None] * z + grad_bumps


def u2(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``U₂ = ½((z₂ − w₁)/0.4)²``: a sine-shaped ridge."""
    z1, z2 = _check(z)
    w, dw = w1(z1)
    e, grad_e = _bump(z2, w, dw, 0.4)
    return -e, -grad_e


def u3(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``U₃``: the ridge of ``U₂`` (width 0.35) and a copy shifted down by ``w₂`` near ``z₁ = 1``."""
    z1, z2 = _check(z)
    w, dw = w1(z1)
    v, dv = w2(z1)
    e1, g1 = _bump(z2, w, dw, 0.35)
    e2, g2 = _bump(z2, w - v, dw - dv, 0.35)
    return _neg_log_sum_exp(e1, g1, e2, g2)


def u4(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``U₄``: the ridge of ``U₂`` and a copy shifted down by ``w₃`` for ``z₁ ≳ 1``."""
    z1, z2 = _check(z)
    w, dw = w1(z1)
    v, dv = w3(z1)
    e1, g1 = _bump(z2, w, dw, 0.4)
    e2, g2 = _bump(z2, w - v, dw - dv, 0.35)
    return _neg_log_sum_exp(e1, g1, e2, g2)


BOX_HALF_WIDTH = 4.0
"""The paper's plotting box is ``[−4, 4]²``."""

WALL_WIDTH = 0.1
"""Length scale of the soft wall outside the box."""


def box_wall(
    z: np.ndarray, half_width: float = BOX_HALF_WIDTH, width: float = WALL_WIDTH
) -> tuple[np.ndarray, np.ndarray]:
    """``wall(z) = ½ Σ_i (max(|z_i| − b, 0)/w)²`` and its gradient (zero inside ``[−b, b]^D``).

    ``∂wall/∂z_i = sign(z_i) max(|z_i| − b, 0) / w²``. Defaults: the paper's box, ``b = 4``, ``w = 0.1``.

    Parameters
    ----------
    z : array, shape (N, D)
    half_width : float
        ``b``: the box is ``[−b, b]^D``.
    width : float
        ``w``: the length scale of the fall-off outside the box (smaller: harder wall).
    """
    excess = np.maximum(np.abs(z) - half_width, 0) / width
    return 0.5 * np.einsum("nd,nd->n", excess, excess), excess * np.sign(z) / width


def _check_box(half_width: float, width: float) -> None:
    if not (np.isfinite(half_width) and half_width > 0):
        raise ValueError(f"the box half-width must be a positive number, got {half_width!r}")
    if not (np.isfinite(width) and width > 0):
        raise ValueError(f"the wall width must be a positive number, got {width!r}")


def in_box(energy: Energy, half_width: float = BOX_HALF_WIDTH, width: float = WALL_WIDTH) -> Energy:
    """``z ↦ energy(z) + wall(z)``: confine an energy to ``[−b, b]^D`` (:func:`box_wall`, module docstring)."""
    _check_box(half_width, width)

    def confined(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        value, grad = energy(z)
        wall, grad_wall = box_wall(z, half_width, width)
        return value + wall, grad + grad_wall

    confined.__name__ = f"{getattr(energy, '__name__', 'energy')}_in_box"
    return confined


# -- normalising constants ---------------------------------------------------------------------


def grid_points(bounds: tuple[float, float], points: int) -> np.ndarray:
    """Cell centres of a ``points × points`` grid on ``[low, high]²``, shape ``(points², 2)``.

    Row ``i · points + j`` is the centre of the cell in row ``i`` (along z₂) and column ``j`` (along
    z₁), so ``values.reshape(points, points)`` is an image with z₁ across and z₂ up (``origin="lower"``).
    """
    low, high = bounds
    cell = (high - low) / points
    centres = low + cell * (np.arange(points) + 0.5)
    z1, z2 = np.meshgrid(centres, centres, indexing="xy")
    return np.stack([z1.ravel(), z2.ravel()], axis=1)


def log_partition(energy: Energy, low: float, high: float, points: int = 1000) -> float:
    """``log Z = log ∫ exp(−U(z)) dz`` over the square ``[low, high]²`` by the midpoint rule.

    For a smooth integrand that is negligible at the edges the midpoint rule converges faster than
    any power of the cell size; 1000² cells on ``[−6, 6]²`` give ``log Z₁`` to about 1e-12. The sum
    is a log-sum-exp, so no ``exp(−U)`` under- or overflows.

    Parameters
    ----------
    energy : callable
        A 2-D energy, ``energy(z) -> (U, grad_U)``.
    low, high : float
        The square's sides.
    points : int
        Cells per side.

    Returns
    -------
    float
    """
    if not high > low:
        raise ValueError(f"need low < high, got [{low}, {high}]")
    if int(points) < 2:
        raise ValueError(f"points must be at least 2, got {points}")
    cell = (high - low) / points
    values, _ = energy(grid_points((low, high), points))
    neg = -values
    peak = np.max(neg)
    return float(peak + np.log(np.sum(np.exp(neg - peak))) + 2 * np.log(cell))


@dataclass(frozen=True)
class Target:
    """A named 2-D target ``p(z) = exp(−U(z))/Z``.

    Attributes
    ----------
    name : str
    energy : callable
        ``energy(z) -> (U, grad_U)``; ``U`` includes the box wall for U2–U4.
    quadrature_bounds : tuple of float
        ``(low, high)``: the square on which :meth:`log_z` integrates ``exp(−U)``.
    plot_bounds : tuple of float
        The square the figures show, the paper's ``[−4, 4]²``.
    """

    name: str
    energy: Energy
    quadrature_bounds: tuple[float, float]
    plot_bounds: tuple[float, float] = (-BOX_HALF_WIDTH, BOX_HALF_WIDTH)

    def __call__(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.energy(z)

    def log_z(self, points: int = 1000) -> float:
        """``log Z`` by :func:`log_partition` over :attr:`quadrature_bounds`."""
        return log_partition(self.energy, *self.quadrature_bounds, points=points)


TARGETS: dict[str, Target] = {
    "U1": Target("U1", u1, (-6.0, 6.0)),
    "U2": Target("U2", in_box(u2), (-5.0, 5.0)),
    "U3": Target("U3", in_box(u3), (-5.0, 5.0)),
    "U4": Target("U4", in_box(u4), (-5.0, 5.0)),
}
"""The paper's four energies, ``U2``–``U4`` confined to ``[−4, 4]²`` (module docstring; another box:
:func:`get_target`)."""

CONFINED: dict[str, Energy] = {"U2": u2, "U3": u3, "U4": u4}
"""The energies that are not normalisable on ``R²`` and are confined to a box."""


WALL_REACH = 10
"""The quadrature square reaches ``WALL_REACH`` wall widths (and at least 1) beyond the box: at 10 widths
``exp(−wall) = exp(−50)``, so the tails it cuts off are below 1e-21 of the mass."""


def get_target(name: str, box_half_width: float | None = None, wall_width: float | None = None) -> Target:
    """The :class:`Target` called ``name`` (``"U1"`` … ``"U4"``), with a clear error otherwise.

    Parameters
    ----------
    name : str
    box_half_width, wall_width : float, optional
        For ``U2``–``U4``: confine to ``[−b, b]²`` with a wall of width ``w`` instead of the paper's
        ``b = 4``, ``w = 0.1`` (:func:`box_wall`); ``log Z`` is then integrated over
        ``[−b − r, b + r]²``, ``r = max(1, WALL_REACH · w)``, and the figures show ``[−b, b]²``.
        ``U1`` is normalisable as it is and takes no box.
    """
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")
    if box_half_width is None and wall_width is None:
        return TARGETS[name]
    if name not in CONFINED:
        raise ValueError(f"{name} is normalisable on R² and takes no box; only {', '.join(CONFINED)} do")
    half_width = BOX_HALF_WIDTH if box_half_width is None else float(box_half_width)
    width = WALL_WIDTH if wall_width is None else float(wall_width)
    energy = in_box(CONFINED[name], half_width, width)
    reach = half_width + max(1.0, WALL_REACH * width)
    return Target(name, energy, (-reach, reach), (-half_width, half_width))
