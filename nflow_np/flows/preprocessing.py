"""Preprocessing as flows, so that the likelihood of the discrete data counts every Jacobian.

An image model reads integer levels ``x ∈ {0, …, L−1}^D`` and, in the forward (data → noise)
direction, applies

1. :class:`Dequantize`: ``y = x + u``, ``u ~ U[0, 1)^D``: a continuous point in the unit cell of ``x``;
2. :class:`Scale` with ``factor = 1/L``: ``y/L ∈ [0, 1)^D``, ``logdet = −D log L``;
3. :class:`Logit` (RealNVP): ``logit(α + (1 − 2α) y/L)``, so the flow proper works on ``R^D``;

before the couplings. Because all of them are flow layers, ``model.log_prob(x)`` is
``log p(x + u)``, the density of the dequantised data *on the scale of the integer levels*, and
bits per dimension ``−log p(x + u) / (D ln 2)`` is that of the discrete data (an upper bound on
``−log₂ P(x) / D`` in expectation over ``u``). Derivation: ``docs/images.md#bits-per-dimension``.
"""

from __future__ import annotations

import numpy as np

from nflow_np import backend
from nflow_np.flows.base import Flow
from nflow_np.specs import SpecReader, register_flow
from nflow_np.validation import check_batch


@register_flow("dequantize", "dim", "levels", "seed")
class Dequantize(Flow):
    """Uniform dequantisation of integer levels ``0 … L−1`` (Theis et al. 2016; NICE, RealNVP).

    forward  ``y = x + u``, ``u ~ U[0, 1)^D`` drawn afresh on every call,  ``logdet = 0``
    inverse  ``x = clip(⌊y⌋, 0, L − 1)``: the quantiser, ``logdet = 0``

    For a fixed ``u`` the forward map is a translation (Jacobian ``I``), hence ``logdet = 0`` and
    ``∂L/∂x = d_y``. The inverse is not a bijection but the decoder of the discrete model:
    ``P(x) = ∫_{[0,1)^D} p(x + u) du`` is the mass of the unit cell of ``x``, and a continuous sample
    ``y ~ p`` gives the discrete sample ``⌊y⌋``. It has zero derivative almost everywhere, so the
    backward pass of the inverse returns zeros; its logdet is reported as 0 (the cell's mass is an
    integral, not a change of variables). ``⌊x + u⌋ = x`` for every integer ``x``: the inverse undoes
    the forward exactly on the data.

    Parameters
    ----------
    dim : int
    levels : int
        ``L``, the number of integer levels (17 for the 8×8 digits, 256 for MNIST).
    seed : int
        Seeds the noise; :meth:`reseed` restarts the stream (e.g. for a reproducible test NLL).
    """

    invertible_in_backward = False  # the forward draws fresh noise that the quantiser cannot recover

    def __init__(self, dim: int, levels: int, seed: int = 0) -> None:
        super().__init__(dim)
        if isinstance(levels, bool) or not isinstance(levels, int | np.integer) or levels < 2:
            raise ValueError(f"levels must be an integer >= 2, got {levels!r}")
        self.levels = int(levels)
        self.seed = int(seed)
        self.reseed(self.seed)

    def spec(self, where: str = "flow") -> dict:
        """``{"kind": "dequantize", "dim", "levels", "seed"}``."""
        return {"kind": "dequantize", "dim": self.dim, "levels": self.levels, "seed": self.seed}

    @classmethod
    def from_spec(cls, read: SpecReader) -> Dequantize:
        return cls(read.dim(), read.int("levels", 2), seed=read.int("seed", 0))

    def reseed(self, seed: int) -> None:
        """Restart the noise stream from ``seed``."""
        self.rng = np.random.default_rng(seed)

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._remember("forward", x.shape[0])
        # drawn on the host, so the stream (and a checkpoint of it) is the same on every device
        noise = backend.array_module(x).asarray(self.rng.random(x.shape, dtype=x.dtype))
        return x + noise, np.zeros_like(x, shape=x.shape[0])

    def _inverse(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._remember("inverse", z.shape[0])
        return np.clip(np.floor(z), 0, self.levels - 1), np.zeros_like(z, shape=z.shape[0])

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        direction, _ = self._cache
        return d_out.copy() if direction == "forward" else np.zeros_like(d_out)


@register_flow("scale", "dim", "factor")
class Scale(Flow):
    """A fixed scaling ``z = c · x`` (e.g. ``c = 1/L`` to map levels to [0, 1)); no parameters.

    forward  ``z = c x``,    ``logdet = D log|c|``
    inverse  ``x = z / c``,  ``logdet = −D log|c|``
    backward ``∂L/∂x = c d_z`` (forward), ``∂L/∂z = d_x / c`` (inverse).

    Parameters
    ----------
    dim : int
    factor : float
        ``c``, finite and non-zero.
    """

    def __init__(self, dim: int, factor: float) -> None:
        super().__init__(dim)
        factor = float(factor)
        if not np.isfinite(factor) or factor == 0:
            raise ValueError(f"Scale needs a finite non-zero factor, got {factor}")
        self.factor = factor

    def spec(self, where: str = "flow") -> dict:
        """``{"kind": "scale", "dim", "factor"}``."""
        return {"kind": "scale", "dim": self.dim, "factor": self.factor}

    @classmethod
    def from_spec(cls, read: SpecReader) -> Scale:
        return cls(read.dim(), read.real("factor"))

    def _log_factor(self, like: np.ndarray) -> np.ndarray:
        return np.full_like(like, self.dim * np.log(abs(self.factor)), shape=like.shape[0])

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._remember("forward", x.shape[0])
        return x * x.dtype.type(self.factor), self._log_factor(x)

    def _inverse(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._remember("inverse", z.shape[0])
        return z / z.dtype.type(self.factor), -self._log_factor(z)

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        direction, _ = self._cache
        factor = d_out.dtype.type(self.factor)
        return d_out * factor if direction == "forward" else d_out / factor


@register_flow("logit", "dim", "alpha")
class Logit(Flow):
    """RealNVP's logit transform of data in [0, 1]: ``z = logit(α + (1 − 2α) x)``.

    With ``y = α + (1 − 2α) x ∈ [α, 1 − α]`` and ``σ`` the logistic sigmoid:

    forward  ``z = log y − log(1 − y)``,  ``logdet = Σ_j [log(1 − 2α) − log y_j − log(1 − y_j)]``
    inverse  ``x = (σ(z) − α) / (1 − 2α)``,  ``logdet = Σ_j [log σ(z_j) + log σ(−z_j) − log(1 − 2α)]``

    ``α > 0`` keeps ``z`` finite at the edges ``x = 0`` and ``x = 1``.

    Backward, forward direction (``∂z/∂x = (1 − 2α)/(y(1 − y))``, ``∂logdet/∂x_j = (1 − 2α)(2y_j − 1)/(y_j(1 − y_j))``):
    ``∂L/∂x = (1 − 2α)/(y(1 − y)) ⊙ (d_z + d_logdet (2y − 1))``.
    Inverse direction, ``s = σ(z)`` (``∂x/∂z = s(1 − s)/(1 − 2α)``, ``∂logdet/∂z_j = 1 − 2s_j``):
    ``∂L/∂z = d_x ⊙ s(1 − s)/(1 − 2α) + d_logdet (1 − 2s)``.

    Parameters
    ----------
    dim : int
    alpha : float
        ``α`` in [0, 0.5); RealNVP uses 0.05.
    """

    invertible_in_backward = False  # the logit loses the digits of inputs close to 0 and 1

    def __init__(self, dim: int, alpha: float = 0.05) -> None:
        super().__init__(dim)
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), got {alpha}")
        self.alpha = float(alpha)

    def spec(self, where: str = "flow") -> dict:
        """``{"kind": "logit", "dim", "alpha"}``."""
        return {"kind": "logit", "dim": self.dim, "alpha": self.alpha}

    @classmethod
    def from_spec(cls, read: SpecReader) -> Logit:
        return cls(read.dim(), read.real("alpha"))

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``z = logit(α + (1 − 2α) x)`` for ``x: (N, D)`` (see the class doc).

        The map is a bijection from ``(−α/(1 − 2α), 1 + α/(1 − 2α)) ⊇ [0, 1]`` (where ``y ∈ (0, 1)``)
        onto ``R``; values outside it are refused rather than turned into NaN or ±inf.
        """
        check_batch(x, "x", self.dim, self.dtype)
        margin = self.alpha / (1 - 2 * self.alpha)
        low, high = 0.0 - margin, 1.0 + margin
        if not (x.min() > low and x.max() < high):
            raise ValueError(f"Logit needs x in ({low:.6g}, {high:.6g}), got values in [{x.min()}, {x.max()}]")
        return self._forward(x)

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = x.dtype.type(self.alpha)
        y = a + (1 - 2 * a) * x
        log_y, log_1my = np.log(y), np.log1p(-y)
        logdet = (np.log1p(-2 * a) - log_y - log_1my).sum(axis=1)
        self._remember("forward", x.shape[0], y)
        return log_y - log_1my, logdet

    def _inverse(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = z.dtype.type(self.alpha)
        # log σ(z) = −softplus(−z), log σ(−z) = −softplus(z); logaddexp(0, ·) is softplus without overflow
        log_s, log_1ms = -np.logaddexp(0, -z), -np.logaddexp(0, z)
        s = np.exp(log_s)
        logdet = (log_s + log_1ms - np.log1p(-2 * a)).sum(axis=1)
        self._remember("inverse", z.shape[0], s)
        return (s - a) / (1 - 2 * a), logdet

    def _backward(self, d_out: np.ndarray, d_logdet: np.ndarray) -> np.ndarray:
        direction, cached = self._cache
        a = d_out.dtype.type(self.alpha)
        if direction == "forward":
            y = cached
            return (1 - 2 * a) / (y * (1 - y)) * (d_out + d_logdet[:, None] * (2 * y - 1))
        s = cached
        return d_out * (s * (1 - s) / (1 - 2 * a)) + d_logdet[:, None] * (1 - 2 * s)
