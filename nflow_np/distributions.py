"""Base distributions ``p(z)`` of a flow, with the gradient of their log-density.

Both factorise over coordinates, ``log p(z) = Σ_i log p(z_i)``, and are written so that no
intermediate overflows at large ``|z|`` (``docs/distributions.md``). They run on whichever arrays they
are given (host or device), and ``sample`` draws with the generator it is given: a NumPy
``Generator`` on the host, ``cupy.random.default_rng()`` on the GPU (same method names).
"""

from __future__ import annotations

import numpy as np

from nflow_np.module import as_float_dtype
from nflow_np.seeding import as_generator

_LOG_2PI = float(np.log(2 * np.pi))


class StandardNormal:
    """``N(0, I)``: ``log p(z) = −½ Σ_i z_i² − (D/2) log 2π``, ``∇ log p(z) = −z``."""

    name = "normal"

    def log_prob(self, z: np.ndarray) -> np.ndarray:
        """Log-density of each row of ``z: (N, D)``; shape (N,)."""
        return -0.5 * np.einsum("nd,nd->n", z, z) - z.dtype.type(0.5 * z.shape[1] * _LOG_2PI)

    def grad_log_prob(self, z: np.ndarray) -> np.ndarray:
        """``∂ log p(z) / ∂z``, shape (N, D)."""
        return -z

    def sample(self, n: int, dim: int, rng: np.random.Generator, dtype: object = np.float64) -> np.ndarray:
        """``n`` draws of dimension ``dim``, shape (n, dim); ``rng`` a Generator or an integer seed."""
        rng = as_generator(rng)
        return rng.standard_normal((n, dim)).astype(as_float_dtype(dtype), copy=False)


class StandardLogistic:
    """Standard logistic, NICE's prior: ``p(z_i) = σ(z_i)(1 − σ(z_i))``.

    ``log p(z_i) = −z_i − 2 log(1 + e^{−z_i}) = −|z_i| − 2 log1p(e^{−|z_i|})``: the second form is
    symmetric and its exponent is never positive, so it is exact at any ``|z|`` (the first
    overflows for ``z ≪ 0``). ``∂ log p / ∂z_i = 1 − 2σ(z_i) = −tanh(z_i / 2)``.
    Sampling inverts the CDF: ``z = log u − log(1 − u)``, ``u ~ U(0, 1)``.
    """

    name = "logistic"

    def log_prob(self, z: np.ndarray) -> np.ndarray:
        """Log-density of each row of ``z: (N, D)``; shape (N,)."""
        a = np.abs(z)
        return -(a + 2 * np.log1p(np.exp(-a))).sum(axis=1)

    def grad_log_prob(self, z: np.ndarray) -> np.ndarray:
        """``∂ log p(z) / ∂z = −tanh(z / 2)``, shape (N, D)."""
        return -np.tanh(0.5 * z)

    def sample(self, n: int, dim: int, rng: np.random.Generator, dtype: object = np.float64) -> np.ndarray:
        """``n`` draws of dimension ``dim``, shape (n, dim); ``rng`` a Generator or an integer seed."""
        rng = as_generator(rng)
        # u ~ U[0, 1): log1p(−u) is always finite since u < 1; only log(u) fails, at u = 0, which
        # has probability 2⁻⁵³. Such zeros are redrawn rather than clipped, so the law stays exact.
        u = rng.random((n, dim))
        while (zero := u == 0).any():
            u[zero] = rng.random(int(zero.sum()))
        return (np.log(u) - np.log1p(-u)).astype(as_float_dtype(dtype), copy=False)


class DiagonalNormal:
    """``N(μ, diag(σ²))`` with fixed (not learned) ``μ, σ: (D,)``, e.g. a VI base other than ``N(0, I)``.

    With ``u = (z − μ)/σ``: ``log p(z) = −½ Σ_i u_i² − Σ_i log σ_i − (D/2) log 2π``,
    ``∇ log p(z) = −u/σ``; sampling is ``z = μ + σ ⊙ ε``, ``ε ~ N(0, I)``.

    Parameters
    ----------
    mean, std : float or array of shape (D,)
        ``μ`` and ``σ``; ``σ > 0``. Scalars broadcast over every coordinate.
    """

    name = "diagonal_normal"

    def __init__(self, mean: object = 0.0, std: object = 1.0) -> None:
        mean, std = np.atleast_1d(np.asarray(mean, dtype=np.float64)), np.atleast_1d(np.asarray(std, dtype=np.float64))
        if mean.ndim != 1 or std.ndim != 1:
            raise ValueError(f"mean and std must be scalars or vectors, got shapes {mean.shape} and {std.shape}")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ValueError("mean must be finite and std finite and positive")
        self.mean, self.std = np.broadcast_arrays(mean, std)

    def _standardise(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.mean.shape[0] not in (1, z.shape[1]):
            raise ValueError(f"this base has dimension {self.mean.shape[0]}; z has {z.shape[1]} columns")
        std = self.std.astype(z.dtype)
        return (z - self.mean.astype(z.dtype)) / std, std

    def log_prob(self, z: np.ndarray) -> np.ndarray:
        """Log-density of each row of ``z: (N, D)``; shape (N,)."""
        u, std = self._standardise(z)
        constant = np.log(std).sum() * (z.shape[1] // std.shape[0]) + z.dtype.type(0.5 * z.shape[1] * _LOG_2PI)
        return -0.5 * np.einsum("nd,nd->n", u, u) - constant

    def grad_log_prob(self, z: np.ndarray) -> np.ndarray:
        """``∂ log p(z) / ∂z = −(z − μ)/σ²``, shape (N, D)."""
        u, std = self._standardise(z)
        return -u / std

    def sample(self, n: int, dim: int, rng: np.random.Generator, dtype: object = np.float64) -> np.ndarray:
        """``n`` draws of dimension ``dim``, shape (n, dim)."""
        if self.mean.shape[0] not in (1, dim):
            raise ValueError(f"this base has dimension {self.mean.shape[0]}, asked for {dim}")
        return (self.mean + self.std * rng.standard_normal((n, dim))).astype(as_float_dtype(dtype), copy=False)


BASE_DISTRIBUTIONS = {"normal": StandardNormal, "logistic": StandardLogistic}
