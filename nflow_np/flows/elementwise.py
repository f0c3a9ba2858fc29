"""Flows that act on each coordinate separately or only reorder them.

:class:`Rescale` is NICE's final diagonal scaling layer; :class:`Permutation` and
:class:`Reverse` change which coordinates the next coupling transforms (log-det 0).
"""

from __future__ import annotations

import numpy as np

from nflow_np.flows.base import Flow
from nflow_np.module import as_float_dtype
from nflow_np.specs import SpecReader, register_flow


@register_flow("rescale", "dim")
class Rescale(Flow):
    """NICE's diagonal scaling ``z = x ⊙ S`` with ``S = exp(σ)`` (Dinh et al. 2014).

    Parametrised by the log-scale ``σ`` (param ``log_scale``, shape (D,), initialised to 0) so
    that ``S > 0`` always and ``log|S_i| = σ_i``:

    forward  ``z = x ⊙ exp(σ)``,   ``logdet = Σ_i σ_i`` (the same for every row)
    inverse  ``x = z ⊙ exp(−σ)``,  ``logdet = −Σ_i σ_i``

    Backward (``docs/flows.md#rescale``), forward direction:
    ``∂L/∂x = d_z ⊙ e^σ``, ``∂L/∂σ = Σ_n d_z ⊙ x ⊙ e^σ + Σ_n d_logdet``;
    inverse direction: ``∂L/∂z = d_x ⊙ e^{−σ}``, ``∂L/∂σ = −Σ_n d_x ⊙ x − Σ_n d_logdet``.
    """

    def __init__(self, dim: int, dtype: object = np.float64) -> None:
        super().__init__(dim)
        self.add_param("log_scale", np.zeros(dim, dtype=as_float_dtype(dtype)))

    def spec(self, where: str = "flow") -> dict:
        """``{"kind": "rescale", "dim"}``."""
        return {"kind": "rescale", "dim": self.dim}

    @classmethod
    def from_spec(cls, read: SpecReader) -> Rescale:
        dim = read.dim()
        read.take(dim)
        return cls(dim, dtype=read.dtype)

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        log_scale = self.params["log_scale"]
        z = x * np.exp(log_scale)
        self._remember("forward", x.shape[0], z)
        return z, np.zeros_like(x, shape=x.shape[0]) + log_scale.sum()

    def _inverse(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        log_scale = self.params["log_scale"]
        x = z * np.exp(-log_scale)
        self._remember("inverse", z.shape[0], x)
        return x, np.zeros_like(z, shape=z.shape[0]) - log_scale.sum()

    def _reconstruct(self, z: np.ndarray) -> np.ndarray:
        # the forward cache is the output z itself
        x = z * np.exp(-self.params["log_scale"])
        self._remember("forward", z.shape[0], z)
        return x

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        direction, out = self._cache
        log_scale = self.params["log_scale"]
        if direction == "forward":
            # z = x e^σ, so x e^σ is the cached output z: ∂L/∂σ = Σ_n d_z ⊙ z + Σ_n d_logdet.
            self.grads["log_scale"] += (d_out * out).sum(axis=0) + d_logdet.sum()
            return d_out * np.exp(log_scale)
        # x = z e^{−σ} is the cached output x: ∂L/∂σ = −Σ_n d_x ⊙ x − Σ_n d_logdet.
        self.grads["log_scale"] -= (d_out * out).sum(axis=0) + d_logdet.sum()
        return d_out * np.exp(-log_scale)


@register_flow("permutation", "perm")
class Permutation(Flow):
    """``z = x[:, perm]``; a permutation matrix has ``|det| = 1`` so ``logdet = 0``.

    Backward scatters the gradient back: ``∂L/∂x = d_z[:, perm⁻¹]`` (forward direction),
    ``∂L/∂z = d_x[:, perm]`` (inverse direction). No parameters.

    Parameters
    ----------
    perm : array of int, shape (D,)
        A permutation of ``0 … D−1``.
    """

    def __init__(self, perm: np.ndarray) -> None:
        perm = np.asarray(perm)
        if perm.ndim != 1 or perm.dtype.kind not in "iu" or not np.array_equal(np.sort(perm), np.arange(len(perm))):
            raise ValueError(f"perm must be a permutation of 0..D-1, got {perm!r}")
        super().__init__(len(perm))
        self.perm = perm.astype(np.intp)
        self.inverse_perm = np.argsort(self.perm)

    def spec(self, where: str = "flow") -> dict:
        """``{"kind": "permutation", "perm"}``."""
        return {"kind": "permutation", "perm": self.perm.tolist()}

    @classmethod
    def from_spec(cls, read: SpecReader) -> Permutation:
        return cls(np.array(read.list("perm", int, minimum=0), dtype=np.int64))

    @classmethod
    def random(cls, dim: int, rng: np.random.Generator) -> Permutation:
        """A fixed permutation drawn once from ``rng``."""
        return cls(rng.permutation(dim))

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._remember("forward", x.shape[0])
        return x[:, self.perm], np.zeros_like(x, shape=x.shape[0])

    def _inverse(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._remember("inverse", z.shape[0])
        return z[:, self.inverse_perm], np.zeros_like(z, shape=z.shape[0])

    def _reconstruct(self, z: np.ndarray) -> np.ndarray:
        self._remember("forward", z.shape[0])
        return z[:, self.inverse_perm]

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        direction, _ = self._cache
        return d_out[:, self.inverse_perm] if direction == "forward" else d_out[:, self.perm]


@register_flow("reverse", "dim")
class Reverse(Permutation):
    """Reverse the order of the coordinates: ``perm = (D−1, …, 0)``; its own inverse."""

    def __init__(self, dim: int) -> None:
        super().__init__(np.arange(dim)[::-1])

    def spec(self, where: str = "flow") -> dict:
        """``{"kind": "reverse", "dim"}``."""
        return {"kind": "reverse", "dim": self.dim}

    @classmethod
    def from_spec(cls, read: SpecReader) -> Reverse:
        return cls(read.dim())
