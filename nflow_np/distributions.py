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


BASE_DISTRIBUTIONS = {"normal": StandardNormal, "logistic": StandardLogistic}
