"""Flows that act on each coordinate separately or only reorder them.

:class:`Rescale` is NICE's final diagonal scaling layer; :class:`Standardize` the fixed per-column
standardisation a model trained on a data file begins with (``docs/data.md``); :class:`Permutation`
and :class:`Reverse` change which coordinates the next coupling transforms (log-det 0).
"""

from __future__ import annotations

import numpy as np

from nflow_np import backend
from nflow_np.flows.base import Flow, Sequential
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


@register_flow("standardize", "dim")
class Standardize(Flow):
    """The fixed standardisation ``z = (x − μ) / σ`` per column: a data file's units to the flow's.

    ``μ`` (buffer ``mean``) and ``σ`` (buffer ``std``), shape (D,), every ``σ_j > 0``, are fixed
    numbers (a training split's mean and standard deviation), not parameters: they are **buffers**
    (:meth:`~nflow_np.module.Module.register_buffer`), saved in the weights file and converted and moved
    with the model, but nothing trains them and optimizers (AdamW's weight decay included) never see
    them. The Jacobian is ``∂z/∂x = diag(1/σ_1, …, 1/σ_D)`` (``docs/data.md#the-density-in-the-users-units``):

    forward  ``z = (x − μ) / σ``,   ``logdet = −Σ_j log σ_j`` (the same for every row)
    inverse  ``x = μ + σ ⊙ z``,     ``logdet = +Σ_j log σ_j``

    Backward: forward direction ``∂L/∂x = d_z / σ``; inverse direction ``∂L/∂z = d_x ⊙ σ``. The log-det
    depends on no input, so ``d_logdet`` contributes nothing; there are no parameter gradients.

    Parameters
    ----------
    mean : array-like, shape (D,)
        ``μ``: finite.
    std : array-like, shape (D,)
        ``σ``: finite and positive (in ``dtype`` too: a float64 ``σ`` that rounds to 0 or overflows in
        float32 is refused).
    dtype : float32 or float64
        Of the buffers (the model's dtype): ``μ`` and ``σ`` are cast to it.
    """

    def __init__(self, mean: object, std: object, dtype: object = np.float64) -> None:
        dtype = as_float_dtype(dtype)
        mean, std = np.asarray(mean), np.asarray(std)
        if mean.ndim != 1 or mean.shape != std.shape or mean.size == 0:
            raise ValueError(f"mean and std must have one shape (D,), got {mean.shape} and {std.shape}")
        if mean.dtype.kind not in "fiu" or std.dtype.kind not in "fiu":
            raise TypeError(f"mean and std must be real numbers, got dtypes {mean.dtype} and {std.dtype}")
        self._check_values(mean.astype(np.float64), std.astype(np.float64), "")
        with np.errstate(over="ignore"):  # a value that overflows dtype is named just below
            cast = mean.astype(dtype), std.astype(dtype)
        self._check_values(*cast, "", given=(mean, std))
        super().__init__(mean.shape[0])
        self.register_buffer("mean", cast[0])
        self.register_buffer("std", cast[1])

    @staticmethod
    def _check_values(mean: object, std: object, prefix: str, given: tuple[object, object] | None = None) -> None:
        """Refuse a non-finite ``μ_j`` and a ``σ_j`` that is not finite and positive, naming the first
        (and the value ``given`` before a cast made it so)."""
        values = {"mean": backend.to_host(mean), "std": backend.to_host(std)}
        bad = {"mean": ~np.isfinite(values["mean"]), "std": ~(np.isfinite(values["std"]) & (values["std"] > 0))}
        for k, (name, rule) in enumerate((("mean", "finite"), ("std", "finite and positive"))):
            if bad[name].any():
                j = int(np.flatnonzero(bad[name])[0])
                value = float(values[name][j])
                was = "" if given is None else f"{float(np.asarray(given[k])[j])!r}, which is "
                raise ValueError(f"Standardize: {prefix}{name}[{j}] is {was}{value!r} in {values[name].dtype}; "
                                 f"it must be {rule}")

    def check_state(self, state: dict[str, np.ndarray], prefix: str = "") -> None:
        """A state loaded into the layer must hold a finite ``mean`` and a finite positive ``std``."""
        self._check_values(state["mean"], state["std"], prefix)

    def _astype_own(self, dtype: np.dtype) -> None:
        with np.errstate(over="ignore"):
            mean, std = self.buffers["mean"].astype(dtype), self.buffers["std"].astype(dtype)
        self._check_values(mean, std, "")  # float64 → float32 may overflow σ or round it to 0
        self.buffers["mean"], self.buffers["std"] = mean, std

    def spec(self, where: str = "flow") -> dict:
        """``{"kind": "standardize", "dim"}`` (``μ`` and ``σ`` are buffers, in the weights file)."""
        return {"kind": "standardize", "dim": self.dim}

    @classmethod
    def from_spec(cls, read: SpecReader) -> Standardize:
        dim = read.dim()
        read.take(2 * dim)
        return cls(np.zeros(dim), np.ones(dim), dtype=read.dtype)

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, std = self.buffers["mean"], self.buffers["std"]
        z = (x - mean) / std
        self._remember("forward", x.shape[0])
        return z, np.zeros_like(x, shape=x.shape[0]) - np.log(std).sum()

    def _inverse(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, std = self.buffers["mean"], self.buffers["std"]
        x = mean + std * z
        self._remember("inverse", z.shape[0])
        return x, np.zeros_like(z, shape=z.shape[0]) + np.log(std).sum()

    def _reconstruct(self, z: np.ndarray) -> np.ndarray:
        # the backward pass needs no cache, only the direction
        x = self.buffers["mean"] + self.buffers["std"] * z
        self._remember("forward", z.shape[0])
        return x

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        direction, _ = self._cache
        # ∂z_j/∂x_j = 1/σ_j (forward), ∂x_j/∂z_j = σ_j (inverse); the log-det is constant in the input
        return d_out / self.buffers["std"] if direction == "forward" else d_out * self.buffers["std"]


def leading_standardize(flow: Flow) -> Standardize | None:
    """The :class:`Standardize` layer ``flow`` begins with (itself, or the first layer of a Sequential), or ``None``."""
    if isinstance(flow, Sequential):
        flow = flow.flows[0]
    return flow if isinstance(flow, Standardize) else None


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
