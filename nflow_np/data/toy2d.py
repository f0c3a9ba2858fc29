"""The 2-D benchmark densities of the flow literature, as seeded samplers.

Every sampler is a function ``make_<name>(n, rng, *, noise) -> x`` with ``x: (n, 2)`` float64 whose
only effect is to advance ``rng`` (a ``numpy.random.Generator``): the same generator state gives
bit-identical samples. Rows are shuffled, so any slice of ``x`` is a sample of the whole density.

``noise`` is the standard deviation of the isotropic Gaussian jitter ``ε ~ N(0, noise² I)`` added
to every point (except for :func:`make_pinwheel`, where it is the arm width). The jitter is drawn
even when ``noise = 0``, so changing ``noise`` moves each point by its own ``ε`` and changes
nothing else: from equal generator states, ``make_x(n, rng_a, noise=s) − make_x(n, rng_b, noise=0)``
is ``N(0, s² I)`` row by row.

:func:`load_toy` draws train, validation and test sets from three independent seeded streams.

References: two moons and circles follow ``sklearn.datasets`` (with random rather than evenly spaced
angles); eight Gaussians, checkerboard, pinwheel and two spirals follow FFJORD (Grathwohl et al.
2018, arXiv 1810.01367, ``lib/toy_data.py``); the pinwheel is from Johnson et al. 2016
(arXiv 1603.06277).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from nflow_np.module import as_float_dtype


def _check_sampler_args(n: int, noise: float) -> int:
    """Return ``n`` as an ``int`` after checking ``n ≥ 0`` and ``noise ≥ 0``."""
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n}")
    if not noise >= 0:  # also refuses NaN
        raise ValueError(f"noise must be a non-negative standard deviation, got {noise}")
    return n


def _jitter_and_shuffle(x: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Return the rows of ``x + ε``, ``ε ~ N(0, noise² I)``, in a random order; ``x: (n, 2)``."""
    epsilon = rng.normal(0.0, 1.0, size=x.shape) * noise
    return (x + epsilon)[rng.permutation(x.shape[0])]


def make_two_moons(n: int, rng: np.random.Generator, *, noise: float = 0.05) -> np.ndarray:
    """Two interleaving half circles (the standard ``make_moons``).

    With ``t ~ U[0, π]`` drawn independently for every point:

    - the first ``n // 2`` points lie on the upper moon ``(cos t, sin t)`` (unit circle, ``y ≥ 0``);
    - the other ``n − n // 2`` lie on the lower moon ``(1 − cos t, 0.5 − sin t)`` (unit circle
      centred at ``(1, 0.5)``, ``y ≤ 0.5``);

    then ``ε ~ N(0, noise² I)`` is added and the rows are shuffled. Raw coordinates: no
    standardisation (the support is roughly ``[−1, 2] × [−0.5, 1]``).

    Parameters
    ----------
    n : int
        Number of points, ``n ≥ 0``.
    rng : numpy.random.Generator
        Source of all randomness.
    noise : float
        Standard deviation of the Gaussian jitter on both coordinates.

    Returns
    -------
    numpy.ndarray
        ``x: (n, 2)``, float64.
    """
    n = _check_sampler_args(n, noise)
    n_upper = n // 2
    t = rng.uniform(0.0, np.pi, size=n)
    t_upper, t_lower = t[:n_upper], t[n_upper:]
    upper = np.stack([np.cos(t_upper), np.sin(t_upper)], axis=1)
    lower = np.stack([1.0 - np.cos(t_lower), 0.5 - np.sin(t_lower)], axis=1)
    return _jitter_and_shuffle(np.concatenate([upper, lower]), rng, noise)


def make_circles(n: int, rng: np.random.Generator, *, noise: float = 0.05) -> np.ndarray:
    """Two concentric circles centred at the origin.

    With ``θ ~ U[0, 2π)`` drawn independently for every point, the first ``n // 2`` points are
    ``(cos θ, sin θ)`` (radius 1) and the other ``n − n // 2`` are ``0.5 (cos θ, sin θ)``
    (radius 0.5); then ``ε ~ N(0, noise² I)`` is added and the rows are shuffled.

    Parameters
    ----------
    n : int
        Number of points, ``n ≥ 0``.
    rng : numpy.random.Generator
        Source of all randomness.
    noise : float
        Standard deviation of the Gaussian jitter on both coordinates.

    Returns
    -------
    numpy.ndarray
        ``x: (n, 2)``, float64.
    """
    n = _check_sampler_args(n, noise)
    n_outer = n // 2
    theta = rng.uniform(0.0, 2.0 * np.pi, size=n)
    radius = np.where(np.arange(n) < n_outer, 1.0, 0.5)
    x = radius[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    return _jitter_and_shuffle(x, rng, noise)


def make_eight_gaussians(n: int, rng: np.random.Generator, *, noise: float = 0.2) -> np.ndarray:
    """An equal-weight mixture of 8 isotropic Gaussians on a circle of radius 2.

    Component ``k ~ Uniform{0, …, 7}`` per point, centre ``μ_k = 2 (cos(2πk/8), sin(2πk/8))``,
    point ``μ_k + ε`` with ``ε ~ N(0, noise² I)``; rows shuffled. So ``noise`` is the standard
    deviation of each component (0.2 by default). FFJORD's version is the same mixture scaled by
    √2 (radius ≈ 2.83, std ≈ 0.35).

    Parameters
    ----------
    n : int
        Number of points, ``n ≥ 0``.
    rng : numpy.random.Generator
        Source of all randomness.
    noise : float
        Standard deviation of each Gaussian component.

    Returns
    -------
    numpy.ndarray
        ``x: (n, 2)``, float64.
    """
    n = _check_sampler_args(n, noise)
    k = rng.integers(0, 8, size=n)
    angle = 2.0 * np.pi * k / 8
    centres = 2.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return _jitter_and_shuffle(centres, rng, noise)


def make_checkerboard(n: int, rng: np.random.Generator, *, noise: float = 0.0) -> np.ndarray:
    """Uniform density on the dark squares of a 4 × 4 checkerboard covering ``[−4, 4]²``.

    The FFJORD construction: ``u ~ U[−2, 2)``, ``v ~ U[0, 1) − 2b`` with ``b ~ Uniform{0, 1}``,
    ``w = v + (⌊u⌋ mod 2)``, point ``2 (u, w)``. The board has 16 squares of side 2; the result is
    uniform on the 8 squares with ``⌊x/2⌋ + ⌊y/2⌋`` even (each with probability 1/8). Then
    ``ε ~ N(0, noise² I)`` is added (none by default: the density is already continuous inside the
    squares) and the rows are shuffled.

    Parameters
    ----------
    n : int
        Number of points, ``n ≥ 0``.
    rng : numpy.random.Generator
        Source of all randomness.
    noise : float
        Standard deviation of the Gaussian jitter on both coordinates.

    Returns
    -------
    numpy.ndarray
        ``x: (n, 2)``, float64.
    """
    n = _check_sampler_args(n, noise)
    u = rng.uniform(-2.0, 2.0, size=n)
    v = rng.uniform(0.0, 1.0, size=n) - 2.0 * rng.integers(0, 2, size=n)
    w = v + np.floor(u) % 2
    return _jitter_and_shuffle(2.0 * np.stack([u, w], axis=1), rng, noise)


def make_pinwheel(n: int, rng: np.random.Generator, *, noise: float = 0.1) -> np.ndarray:
    """Five curved arms, the pinwheel of Johnson et al. (2016) as used by FFJORD.

    Point ``i`` belongs to arm ``k = i mod 5`` (arms as equal as ``n`` allows). Draw a radial
    coordinate ``r = 1 + 0.3 z₁`` and a tangential one ``τ = noise · z₂``, ``z ~ N(0, I)``; the
    arm bends with radius: angle ``a = 2πk/5 + 0.25 exp(r)``. The point is the row vector
    ``2 (r, τ) R(a)`` with ``R(a) = [[cos a, −sin a], [sin a, cos a]]``, i.e.
    ``x = 2 (r cos a + τ sin a)``, ``y = 2 (τ cos a − r sin a)``; rows shuffled.

    Unlike the other samplers, ``noise`` is the arm width (FFJORD's ``tangential_std``, 0.1);
    the radial spread 0.3 is fixed. With ``noise = 0`` every point lies on one of the curves
    ``2 r (cos a, −sin a)``.

    Parameters
    ----------
    n : int
        Number of points, ``n ≥ 0``.
    rng : numpy.random.Generator
        Source of all randomness.
    noise : float
        Tangential standard deviation (arm width before the factor 2).

    Returns
    -------
    numpy.ndarray
        ``x: (n, 2)``, float64.
    """
    n = _check_sampler_args(n, noise)
    radial_std = 0.3
    rate = 0.25
    k = np.arange(n) % 5
    z = rng.normal(0.0, 1.0, size=(n, 2))
    r = 1.0 + radial_std * z[:, 0]
    tau = noise * z[:, 1]
    a = 2.0 * np.pi * k / 5 + rate * np.exp(r)
    x = 2.0 * np.stack([r * np.cos(a) + tau * np.sin(a), tau * np.cos(a) - r * np.sin(a)], axis=1)
    return x[rng.permutation(n)]


def make_two_spirals(n: int, rng: np.random.Generator, *, noise: float = 0.1) -> np.ndarray:
    """Two interleaved Archimedean spirals, point-symmetric about the origin.

    With ``t = 3π √u``, ``u ~ U[0, 1)`` (so points are roughly uniform along the arc), the first
    ``n // 2`` points are ``(−t cos t, t sin t) / 3`` and the other ``n − n // 2`` are its mirror
    ``(t cos t, −t sin t) / 3``; each arm makes 1.5 turns out to radius π. Then
    ``ε ~ N(0, noise² I)`` is added and the rows are shuffled. This is FFJORD's ``2spirals``
    without its extra ``U[0, 0.5)`` shift of each coordinate (a bias, not a symmetric jitter).

    Parameters
    ----------
    n : int
        Number of points, ``n ≥ 0``.
    rng : numpy.random.Generator
        Source of all randomness.
    noise : float
        Standard deviation of the Gaussian jitter on both coordinates.

    Returns
    -------
    numpy.ndarray
        ``x: (n, 2)``, float64.
    """
    n = _check_sampler_args(n, noise)
    t = 3.0 * np.pi * np.sqrt(rng.uniform(0.0, 1.0, size=n))
    sign = np.where(np.arange(n) < n // 2, 1.0, -1.0)
    x = (sign * t / 3.0)[:, None] * np.stack([-np.cos(t), np.sin(t)], axis=1)
    return _jitter_and_shuffle(x, rng, noise)


TOY_DATASETS: dict[str, Callable[..., np.ndarray]] = {
    "two_moons": make_two_moons,
    "circles": make_circles,
    "eight_gaussians": make_eight_gaussians,
    "checkerboard": make_checkerboard,
    "pinwheel": make_pinwheel,
    "two_spirals": make_two_spirals,
}


# eq=False: the fields are arrays, whose == is elementwise, so a generated __eq__ is ambiguous.
@dataclass(frozen=True, eq=False)
class Splits:
    """Train, validation and test samples of one density; each ``(n_split, 2)``."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def load_toy(
    name: str,
    *,
    n_train: int = 15000,
    n_val: int = 5000,
    n_test: int = 5000,
    seed: int = 0,
    dtype: object = np.float64,
) -> Splits:
    """Sample train, validation and test sets of the toy density ``name`` at its default noise.

    The splits come from independent streams ``np.random.default_rng([seed, k])``, ``k = 0, 1, 2``
    for train, val, test: changing ``n_train`` leaves ``val`` and ``test`` bit-identical, and the
    same arguments always give bit-identical arrays. Samples are drawn in float64, then cast.

    Parameters
    ----------
    name : str
        A key of :data:`TOY_DATASETS`.
    n_train, n_val, n_test : int
        Split sizes, each positive.
    seed : int
        Non-negative seed shared by the three streams.
    dtype : float32 or float64
        dtype of the returned arrays.

    Returns
    -------
    Splits
        ``train: (n_train, 2)``, ``val: (n_val, 2)``, ``test: (n_test, 2)``.

    Raises
    ------
    ValueError
        Unknown ``name`` (the known names are listed), a non-positive size or a negative seed.
    TypeError
        ``dtype`` other than float32 or float64, or a size or seed that is not an integer.
    """
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown toy dataset {name!r}; known: {', '.join(TOY_DATASETS)}")
    sizes = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    for argument, size in sizes.items():
        if operator.index(size) < 1:
            raise ValueError(f"{argument} must be a positive integer, got {size}")
    if operator.index(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    dtype = as_float_dtype(dtype)
    make = TOY_DATASETS[name]
    train, val, test = (
        make(size, np.random.default_rng([seed, k])).astype(dtype)
        for k, size in enumerate(sizes.values())
    )
    return Splits(train=train, val=val, test=test)
