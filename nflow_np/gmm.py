"""A Gaussian mixture fitted by EM: the lecture's latent-variable model, as a baseline density.

Model, with a latent component ``t ∈ {1 … K}`` per point::

    p(t = k) = π_k,   p(x | t = k) = N(x | μ_k, Σ_k),   p(x) = Σ_k π_k N(x | μ_k, Σ_k)

EM (the lecture's "EM algorithm" slide) maximises the evidence lower bound

    L(q, θ) = Σ_n Σ_k r_nk [log π_k + log N(x_n | μ_k, Σ_k) − log r_nk] + log p(θ),  r_nk = q(t_n = k),

which equals ``log p(X | θ) + log p(θ) − KL(q ‖ p(T | X, θ))``, by alternating

- **E-step** ``q = argmax_q L = p(T | X, θ)``: ``log r_nk = log π_k + log N(x_n | μ_k, Σ_k) − log p(x_n)``
  with ``log p(x_n)`` a log-sum-exp over ``k``; the KL term is then 0, so ``L = log p(X | θ) + log p(θ)``;
- **M-step** ``θ = argmax_θ L`` in closed form, with ``N_k = Σ_n r_nk``, ``S_k = Σ_n r_nk (x_n − μ_k)(x_n − μ_k)ᵀ``::

      π_k = N_k / N,    μ_k = Σ_n r_nk x_n / N_k,    Σ_k = (S_k + λ I) / (N_k + ν).

Covariance regularisation is the (improper) prior ``log p(θ) = Σ_k [−(ν/2) log|Σ_k| − (λ/2) tr Σ_k⁻¹]``
(the ``log p(θ)`` in ``L``): its exact maximiser is the ``Σ_k`` above, which is positive definite for
every ``λ > 0`` however few points a component holds, so no component collapses onto a point
(the maximum-likelihood singularity of mixtures). Because both steps maximise the *same* ``L``
exactly, ``L`` never decreases; with ``λ, ν → 0`` it is the plain ELBO of ``log p(X | θ)``.
All values reported are per point (``L / N``), in nats.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np

from nflow_np.seeding import as_generator
from nflow_np.validation import check_batch

_LOG_2PI = math.log(2 * math.pi)


def log_sum_exp(a: np.ndarray, axis: int) -> np.ndarray:
    """``log Σ exp(a)`` along ``axis`` without overflow; ``−inf`` where every term is ``−inf``."""
    peak = np.max(a, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0)
    with np.errstate(divide="ignore"):  # a row of −inf sums to 0: log 0 = −inf is the answer
        return np.squeeze(peak, axis=axis) + np.log(np.sum(np.exp(a - peak), axis=axis))


class GaussianMixture:
    """Full-covariance Gaussian mixture with ``K`` components, fitted by EM.

    Parameters
    ----------
    n_components : int
        ``K ≥ 1``.
    reg_covar : float
        ``λ > 0`` of the covariance prior (module docstring).
    prior_dof : float
        ``ν ≥ 0`` of the covariance prior.
    max_iter : int
        Maximum number of EM iterations (E-step + M-step).
    tol : float
        Stop when an iteration raises ``L / N`` by less than this.
    init : {"kmeans++", "random"}
        ``kmeans++``: means drawn from the data by k-means++ seeding (each next mean with probability
        ∝ squared distance to the nearest chosen one), covariances the data covariance, equal weights.
        ``random``: means at ``K`` data points drawn uniformly without replacement; the rest as for
        ``kmeans++``.
    seed : int
        Seeds the initialisation.

    Attributes (after :meth:`fit`)
    ------------------------------
    weights : numpy.ndarray, shape (K,)
    means : numpy.ndarray, shape (K, D)
    covariances : numpy.ndarray, shape (K, D, D)
    elbo_history : list of float
        ``L / N`` after every half-step: E-step, M-step, E-step, … (never decreasing).
    n_iter : int
    converged : bool
    """

    def __init__(
        self,
        n_components: int,
        *,
        reg_covar: float = 1e-6,
        prior_dof: float = 1.0,
        max_iter: int = 300,
        tol: float = 1e-6,
        init: str = "kmeans++",
        seed: int = 0,
    ) -> None:
        if int(n_components) < 1:
            raise ValueError(f"n_components must be at least 1, got {n_components}")
        if not reg_covar > 0:
            raise ValueError(f"reg_covar must be positive (it keeps every covariance invertible), got {reg_covar}")
        if not prior_dof >= 0:
            raise ValueError(f"prior_dof must be non-negative, got {prior_dof}")
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be at least 1, got {max_iter}")
        if init not in ("kmeans++", "random"):
            raise ValueError(f"init must be 'kmeans++' or 'random', got {init!r}")
        self.n_components = int(n_components)
        self.reg_covar = float(reg_covar)
        self.prior_dof = float(prior_dof)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.init = init
        self.seed = seed
        self.weights: np.ndarray | None = None
        self.means: np.ndarray | None = None
        self.covariances: np.ndarray | None = None
        self.elbo_history: list[float] = []
        self.n_iter = 0
        self.converged = False

    @classmethod
    def from_parameters(cls, weights: np.ndarray, means: np.ndarray, covariances: np.ndarray) -> GaussianMixture:
        """A fitted mixture with the given ``π: (K,)``, ``μ: (K, D)``, ``Σ: (K, D, D)`` (e.g. a saved ``gmm.npz``).

        Raises
        ------
        ValueError
            Shapes that do not fit together, non-finite values, weights that are negative or do
            not sum to 1, or a covariance that is not symmetric positive definite.
        """
        weights, means, covariances = (np.asarray(a, dtype=np.float64) for a in (weights, means, covariances))
        if means.ndim != 2 or weights.shape != means.shape[:1] or covariances.shape != (*means.shape, means.shape[1]):
            raise ValueError(
                f"mixture parameters do not fit together: weights {weights.shape}, means {means.shape}, "
                f"covariances {covariances.shape} (expected (K,), (K, D), (K, D, D))"
            )
        if not all(np.isfinite(a).all() for a in (weights, means, covariances)):
            raise ValueError("mixture parameters hold non-finite values")
        if (weights < 0).any() or not np.isclose(weights.sum(), 1.0, rtol=0, atol=1e-9):
            raise ValueError(f"mixture weights must be non-negative and sum to 1, got sum {weights.sum()!r}")
        if not np.allclose(covariances, np.swapaxes(covariances, 1, 2)):
            raise ValueError("mixture covariances must be symmetric")
        try:
            np.linalg.cholesky(covariances)
        except np.linalg.LinAlgError:
            raise ValueError("mixture covariances must be positive definite") from None
        mixture = cls(weights.shape[0])
        mixture.weights, mixture.means, mixture.covariances = weights, means, covariances
        return mixture

    def rescaled(self, shift: np.ndarray, scale: np.ndarray) -> GaussianMixture:
        """The mixture of ``x = shift + scale ⊙ u`` for ``u`` drawn from this one (a data file's units).

        An affine map of a Gaussian is Gaussian: ``μ_k ↦ shift + scale ⊙ μ_k``, ``Σ_k ↦ S Σ_k S`` with
        ``S = diag(scale)``, weights unchanged, so ``log p_X(x) = log p_U(u) − Σ_j log scale_j`` exactly
        (``docs/data.md``). ``shift, scale: (D,)``, ``scale > 0``.
        """
        self._check_fitted()
        shift, scale = np.asarray(shift, dtype=np.float64), np.asarray(scale, dtype=np.float64)
        covariances = self.covariances * scale[:, None] * scale[None, :]  # (S Σ S)_ij = s_i Σ_ij s_j
        return type(self).from_parameters(self.weights, shift + scale * self.means, covariances)

    def save(self, directory: str | os.PathLike, summary: dict | None = None) -> Path:
        """Publish ``gmm.npz`` and ``summary.json`` in ``directory`` in one atomic step (other files kept).

        Raises
        ------
        RuntimeError
            Not fitted.
        OSError
            The write failed; the previous folder is unchanged.
        """
        from nflow_np.files.gmm_files import save_gmm

        self._check_fitted()
        summary = {"model": "gmm", "components": self.n_components} if summary is None else summary
        return save_gmm(self.weights, self.means, self.covariances, directory, summary)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> tuple[GaussianMixture, dict]:
        """The mixture of a folder written by :meth:`save` (or ``nflow train --model gmm``), and its summary.

        Raises
        ------
        ModelFileError
            A missing, hostile or inconsistent file; one line naming it and the problem.
        """
        from nflow_np.files.gmm_files import load_gmm
        from nflow_np.files.safe import ModelFileError

        arrays, summary = load_gmm(directory)
        try:
            return cls.from_parameters(arrays["weights"], arrays["means"], arrays["covariances"]), summary
        except ValueError as error:
            raise ModelFileError(f"{Path(directory) / 'gmm.npz'}: {error}") from error

    # -- the model -------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if self.means is None:
            raise RuntimeError("GaussianMixture is not fitted yet: call fit(x) first")

    def _check_data(self, x: np.ndarray, name: str = "x") -> np.ndarray:
        dim = None if self.means is None else self.means.shape[1]
        return check_batch(x, name, dim, None).astype(np.float64, copy=False)

    def log_joint(self, x: np.ndarray) -> np.ndarray:
        """``log π_k + log N(x_n | μ_k, Σ_k)``, shape (N, K), via the Cholesky factors ``Σ_k = L_k L_kᵀ``.

        ``log N(x | μ, Σ) = −½ ‖L⁻¹(x − μ)‖² − Σ_i log L_ii − (D/2) log 2π``.
        """
        self._check_fitted()
        x = self._check_data(x)
        cholesky = np.linalg.cholesky(self.covariances)
        inverse = np.linalg.inv(cholesky)
        squared = np.empty((x.shape[0], self.n_components))
        for k in range(self.n_components):
            white = (x - self.means[k]) @ inverse[k].T  # L_k⁻¹(x_n − μ_k), row by row
            squared[:, k] = np.einsum("ni,ni->n", white, white)
        half_log_det = np.log(np.diagonal(cholesky, axis1=1, axis2=2)).sum(axis=1)
        with np.errstate(divide="ignore"):
            log_weights = np.log(self.weights)
        return log_weights - 0.5 * squared - half_log_det - 0.5 * x.shape[1] * _LOG_2PI

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """``log p(x_n) = log Σ_k π_k N(x_n | μ_k, Σ_k)`` per row, ``x: (N, D)`` → ``(N,)``."""
        return log_sum_exp(self.log_joint(x), axis=1)

    def nll(self, x: np.ndarray) -> float:
        """Mean negative log-likelihood of the rows of ``x`` (nats), comparable with a flow's."""
        return float(-self.log_prob(x).mean())

    def log_prior(self) -> float:
        """``log p(θ) = Σ_k [−(ν/2) log|Σ_k| − (λ/2) tr Σ_k⁻¹]`` (the covariance regularisation)."""
        self._check_fitted()
        _, log_det = np.linalg.slogdet(self.covariances)
        trace_inverse = np.trace(np.linalg.inv(self.covariances), axis1=1, axis2=2)
        return float(np.sum(-0.5 * self.prior_dof * log_det - 0.5 * self.reg_covar * trace_inverse))

    def sample(self, n: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
        """``n`` draws: ``k ~ Categorical(π)``, then ``x = μ_k + L_k ε``, ``ε ~ N(0, I)``; shape (n, D).

        ``rng``: a Generator or an integer seed (default: a fresh unseeded generator).
        """
        self._check_fitted()
        if int(n) < 1:
            raise ValueError(f"n must be a positive number of samples, got {n}")
        rng = as_generator(rng)
        component = rng.choice(self.n_components, size=int(n), p=self.weights)
        noise = rng.standard_normal((int(n), self.means.shape[1]))
        cholesky = np.linalg.cholesky(self.covariances)
        return self.means[component] + np.einsum("nij,nj->ni", cholesky[component], noise)

    # -- EM --------------------------------------------------------------------------------------

    def e_step(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior responsibilities: ``log r_nk`` (N, K) and ``log p(x_n)`` (N,)."""
        joint = self.log_joint(x)
        log_px = log_sum_exp(joint, axis=1)
        return joint - log_px[:, None], log_px

    def m_step(self, x: np.ndarray, responsibilities: np.ndarray) -> None:
        """Set ``π, μ, Σ`` to the exact maximiser of ``L(q, ·)`` for ``q = responsibilities`` (N, K)."""
        x = self._check_data(x)
        n, dim = x.shape
        counts = responsibilities.sum(axis=0)  # N_k
        self.weights = counts / n
        # a component with N_k = 0 has no data term: any μ maximises L, take the numerator's 0
        self.means = (responsibilities.T @ x) / np.maximum(counts, np.finfo(np.float64).tiny)[:, None]
        scatter = np.empty((self.n_components, dim, dim))
        for k in range(self.n_components):
            centred = x - self.means[k]
            scatter[k] = (responsibilities[:, k, None] * centred).T @ centred  # S_k
        self.covariances = (scatter + self.reg_covar * np.eye(dim)) / (counts + self.prior_dof)[:, None, None]

    def elbo(self, x: np.ndarray, log_responsibilities: np.ndarray) -> float:
        """``L(q, θ) / N`` for any ``q`` given by ``log r_nk`` (N, K), at the current parameters.

        Terms with ``r_nk = 0`` contribute 0 (``0 · log 0 = 0``).
        """
        joint = self.log_joint(x)
        r = np.exp(log_responsibilities)
        with np.errstate(invalid="ignore"):
            terms = np.where(r > 0, r * (joint - log_responsibilities), 0.0)
        return float((terms.sum() + self.log_prior()) / x.shape[0])

    def _initialise(self, x: np.ndarray, rng: np.random.Generator) -> None:
        n, dim = x.shape
        if self.init == "random":
            chosen = rng.choice(n, size=self.n_components, replace=self.n_components > n)
        else:
            chosen = [int(rng.integers(n))]
            nearest = np.sum((x - x[chosen[0]]) ** 2, axis=1)
            for _ in range(1, self.n_components):
                total = nearest.sum()
                index = int(rng.choice(n, p=nearest / total)) if total > 0 else int(rng.integers(n))
                chosen.append(index)
                nearest = np.minimum(nearest, np.sum((x - x[index]) ** 2, axis=1))
        self.means = x[chosen].copy()
        covariance = np.atleast_2d(np.cov(x, rowvar=False)) if n > 1 else np.zeros((dim, dim))
        self.covariances = np.repeat((covariance + self.reg_covar * np.eye(dim))[None], self.n_components, axis=0)
        self.weights = np.full(self.n_components, 1.0 / self.n_components)

    def fit(self, x: np.ndarray) -> GaussianMixture:
        """Initialise, then alternate E- and M-steps until ``L / N`` rises by less than ``tol``.

        Parameters
        ----------
        x : numpy.ndarray, shape (N, D)
            Finite float data (float32 is computed in float64).

        Returns
        -------
        GaussianMixture
            ``self``.
        """
        self.means = None
        x = self._check_data(x)
        self._initialise(x, np.random.default_rng(self.seed))
        self.elbo_history = []
        self.converged = False
        previous = -math.inf
        for iteration in range(1, self.max_iter + 1):
            log_r, log_px = self.e_step(x)
            after_e = float((log_px.sum() + self.log_prior()) / x.shape[0])  # = L(q, θ), KL term 0
            self.elbo_history.append(after_e)
            self.n_iter = iteration
            if after_e - previous < self.tol:
                self.converged = True
                break
            previous = after_e
            self.m_step(x, np.exp(log_r))
            self.elbo_history.append(self.elbo(x, log_r))
        if not self.converged:
            warnings.warn(
                f"EM with K = {self.n_components} stopped at max_iter = {self.max_iter} iterations before L / N rose "
                f"by less than tol = {self.tol:g}; raise max_iter or tol",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self

    # -- scikit-learn's names -----------------------------------------------------------------------

    def score_samples(self, x: np.ndarray) -> np.ndarray:
        """``log p(x_n)`` per row, as :meth:`log_prob` (scikit-learn's name)."""
        return self.log_prob(x)

    def score(self, x: np.ndarray) -> float:
        """Mean log-likelihood per row (nats), ``−nll(x)`` (scikit-learn's ``score``)."""
        return -self.nll(x)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Posterior responsibilities ``r_nk = p(t_n = k | x_n)``, shape (N, K), each row summing to 1."""
        log_r, _ = self.e_step(x)
        return np.exp(log_r)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The most probable component of each row, ``argmax_k r_nk``, shape (N,)."""
        return np.argmax(self.log_joint(x), axis=1)

    def n_parameters(self) -> int:
        """Free parameters: ``K − 1`` weights, ``K·D`` means, ``K·D(D+1)/2`` covariance entries."""
        self._check_fitted()
        k, dim = self.means.shape
        return (k - 1) + k * dim + k * dim * (dim + 1) // 2

    def bic(self, x: np.ndarray) -> float:
        """Bayesian information criterion ``−2 log p(X) + p log N`` (lower is better; scikit-learn's definition)."""
        x = self._check_data(x)
        return float(-2 * self.log_prob(x).sum() + self.n_parameters() * math.log(x.shape[0]))

    def aic(self, x: np.ndarray) -> float:
        """Akaike information criterion ``−2 log p(X) + 2p`` (lower is better)."""
        return float(-2 * self.log_prob(x).sum() + 2 * self.n_parameters())

    def __repr__(self) -> str:
        fitted = "" if self.means is None else f", dim={self.means.shape[1]}, n_iter={self.n_iter}, " \
            f"converged={self.converged}"
        return f"GaussianMixture(n_components={self.n_components}, reg_covar={self.reg_covar:g}{fitted})"


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before it converged (scikit-learn's warning of the same name)."""
