"""Gaussian mixture by EM: the ELBO never decreases, is tight after an E-step, and the fit is right."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nflow_np.cli import main
from nflow_np.gmm import GaussianMixture, log_sum_exp
from nflow_np.vi_cli import add_gmm_arguments, run_gmm_command


def mixture_data(rng: np.random.Generator, n: int, dim: int, components: int) -> np.ndarray:
    centres = 3 * rng.standard_normal((components, dim))
    scales = rng.uniform(0.2, 1.5, (components, dim, dim))
    labels = rng.integers(components, size=n)
    return centres[labels] + np.einsum("nij,nj->ni", scales[labels], rng.standard_normal((n, dim)))


def naive_log_prob(gmm: GaussianMixture, x: np.ndarray) -> np.ndarray:
    """log Σ_k π_k N(x | μ_k, Σ_k) written out with inv and det, one point and one component at a time."""
    out = []
    for point in x:
        total = 0.0
        for weight, mean, cov in zip(gmm.weights, gmm.means, gmm.covariances, strict=True):
            diff = point - mean
            quad = diff @ np.linalg.inv(cov) @ diff
            total += weight * math.exp(-0.5 * quad) / math.sqrt(np.linalg.det(2 * math.pi * cov))
        out.append(math.log(total))
    return np.array(out)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(5, 120),
    dim=st.integers(1, 3),
    true_components=st.integers(1, 4),
    components=st.integers(1, 6),
    init=st.sampled_from(["kmeans++", "random"]),
    duplicates=st.booleans(),
)
def test_elbo_never_decreases_and_is_tight_after_e_steps(
    seed: int, n: int, dim: int, true_components: int, components: int, init: str, duplicates: bool
) -> None:
    rng = np.random.default_rng(seed)
    x = mixture_data(rng, n, dim, true_components)
    if duplicates:  # repeated points invite a component to collapse onto them
        x[: n // 2] = x[0]
    gmm = GaussianMixture(components, init=init, seed=seed, max_iter=25, tol=0.0).fit(x)
    history = np.array(gmm.elbo_history)
    assert np.isfinite(history).all()
    # every half-step (E, then M, then E…) is a coordinate ascent step on one objective. At convergence
    # the steps shrink to rounding: that of a sum of n·K log-terms (1e-10 relative), and that of an
    # M-step recomputing a near-singular Σ_k after a collapse, which moves L by about ε·cond(Σ_k)
    slack = (1e-10 + 1e-15 * np.linalg.cond(gmm.covariances).max()) * np.maximum(1.0, np.abs(history[1:]))
    assert np.all(np.diff(history) >= -slack), np.diff(history).min()
    # after an E-step q is the exact posterior, so L = log p(X | θ) + log p(θ)
    log_r, log_px = gmm.e_step(x)
    tight = (log_px.sum() + gmm.log_prior()) / n
    assert gmm.elbo(x, log_r) == pytest.approx(tight, rel=1e-10, abs=1e-10)
    # any other q gives a lower bound
    other = np.log(rng.dirichlet(np.ones(components), size=n))
    assert gmm.elbo(x, other) <= tight + 1e-12
    for cov in gmm.covariances:
        assert np.all(np.linalg.eigvalsh(cov) > 0)


def test_log_prob_matches_a_naive_implementation() -> None:
    rng = np.random.default_rng(1)
    x = mixture_data(rng, 300, 2, 3)
    gmm = GaussianMixture(3, seed=1).fit(x)
    query = rng.normal(size=(20, 2)) * 4
    np.testing.assert_allclose(gmm.log_prob(query), naive_log_prob(gmm, query), rtol=1e-10)
    assert gmm.nll(query) == pytest.approx(-naive_log_prob(gmm, query).mean(), rel=1e-10)


def test_one_component_is_the_regularised_gaussian_fit() -> None:
    x = np.random.default_rng(2).normal(size=(500, 3)) @ np.array([[1.0, 0.3, 0], [0, 0.5, 0.2], [0, 0, 2.0]])
    gmm = GaussianMixture(1, reg_covar=1e-3, prior_dof=2.0).fit(x)
    centred = x - x.mean(axis=0)
    np.testing.assert_allclose(gmm.means[0], x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(gmm.covariances[0], (centred.T @ centred + 1e-3 * np.eye(3)) / 502, rtol=1e-12)
    assert gmm.weights[0] == pytest.approx(1.0)
    assert gmm.converged and gmm.n_iter <= 3


def test_recovers_separated_components() -> None:
    rng = np.random.default_rng(3)
    centres = np.array([[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]])
    x = np.concatenate([c + 0.5 * rng.standard_normal((n, 2)) for c, n in zip(centres, (200, 400, 600), strict=True)])
    gmm = GaussianMixture(3, seed=0).fit(x)
    order = np.argsort(gmm.means[:, 0] + 0.01 * gmm.means[:, 1])
    np.testing.assert_allclose(gmm.means[order], centres, atol=0.1)
    np.testing.assert_allclose(gmm.weights[order], [1 / 6, 1 / 3, 1 / 2], atol=0.01)
    np.testing.assert_allclose(gmm.covariances[order], np.tile(0.25 * np.eye(2), (3, 1, 1)), atol=0.05)
    assert gmm.converged


def test_sample_has_the_mixtures_moments() -> None:
    rng = np.random.default_rng(4)
    gmm = GaussianMixture(2, seed=0).fit(mixture_data(rng, 400, 2, 2))
    draws = gmm.sample(200000, np.random.default_rng(5))
    mean = gmm.weights @ gmm.means
    second = np.einsum("k,kij->ij", gmm.weights, gmm.covariances + np.einsum("ki,kj->kij", gmm.means, gmm.means))
    np.testing.assert_allclose(draws.mean(axis=0), mean, atol=0.03)
    np.testing.assert_allclose(draws.T @ draws / len(draws), second, rtol=0.02, atol=0.05)


def test_degenerate_data_stays_finite() -> None:
    """All points equal: the covariance prior keeps Σ = λI/(N + ν) positive definite; more components than points."""
    x = np.ones((10, 2))
    gmm = GaussianMixture(3, reg_covar=1e-4).fit(x)
    assert np.isfinite(gmm.elbo_history).all() and np.isfinite(gmm.log_prob(x)).all()
    x = np.random.default_rng(6).normal(size=(3, 2))
    assert np.isfinite(GaussianMixture(5, init="random").fit(x).log_prob(x)).all()


def test_log_sum_exp_is_stable() -> None:
    a = np.array([[1000.0, 1000.0], [-1000.0, -np.inf], [-np.inf, -np.inf]])
    np.testing.assert_allclose(log_sum_exp(a, axis=1), [1000 + np.log(2), -1000, -np.inf])


def test_errors() -> None:
    with pytest.raises(ValueError, match="n_components must be at least 1"):
        GaussianMixture(0)
    with pytest.raises(ValueError, match="reg_covar must be positive"):
        GaussianMixture(2, reg_covar=0.0)
    with pytest.raises(ValueError, match="init must be"):
        GaussianMixture(2, init="kmeans")
    with pytest.raises(RuntimeError, match="not fitted yet"):
        GaussianMixture(2).log_prob(np.zeros((1, 2)))
    gmm = GaussianMixture(1).fit(np.random.default_rng(0).normal(size=(20, 2)))
    with pytest.raises(ValueError, match="x has 3 columns"):
        gmm.log_prob(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="x has a non-finite value nan"):
        GaussianMixture(1).fit(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="positive number of samples"):
        gmm.sample(0)


def test_train_command(tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="two_moons")
    for flag, value in (("--n-train", 600), ("--n-val", 300), ("--n-test", 300), ("--seed", 0)):
        parser.add_argument(flag, type=int, default=value)
    parser.add_argument("--out", default=None)
    add_gmm_arguments(parser)
    args = parser.parse_args(["--components", "1,4", "--out", str(tmp_path)])
    args.out = tmp_path
    assert run_gmm_command(args) == 0
    printed = capsys.readouterr().out
    assert "two_moons / gmm: test NLL" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["components"] == 4  # two moons are far from one Gaussian
    assert [row["components"] for row in summary["tried"]] == [1, 4]
    assert summary["test_nll"] < summary["tried"][0]["val_nll"]
    assert np.load(tmp_path / "gmm.npz")["means"].shape == (4, 2)
    # nflow eval reads the folder back: the same test NLL, on the split recorded in summary.json
    assert main(["eval", str(tmp_path)]) == 0
    assert f"test NLL {summary['test_nll']:.4f} nats on two_moons" in capsys.readouterr().out
    saved = dict(np.load(tmp_path / "gmm.npz"))
    np.savez(tmp_path / "gmm.npz", **(saved | {"weights": saved["weights"] * 2}))
    assert main(["eval", str(tmp_path)]) == 2
    assert "gmm.npz: mixture weights must be non-negative and sum to 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--components", "0,2"])


def test_from_parameters_refuses_what_is_not_a_mixture() -> None:
    weights, means, covariances = np.array([0.25, 0.75]), np.zeros((2, 3)), np.stack([np.eye(3)] * 2)
    mixture = GaussianMixture.from_parameters(weights, means, covariances)
    np.testing.assert_allclose(mixture.log_prob(np.zeros((1, 3))), -1.5 * math.log(2 * math.pi))
    with pytest.raises(ValueError, match="do not fit together"):
        GaussianMixture.from_parameters(weights, means, covariances[:, :2, :2])
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture.from_parameters(np.array([0.5, 0.6]), means, covariances)
    with pytest.raises(ValueError, match="non-finite"):
        GaussianMixture.from_parameters(weights, means + np.nan, covariances)
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture.from_parameters(weights, means, -covariances)
    with pytest.raises(ValueError, match="symmetric"):
        GaussianMixture.from_parameters(weights, means, covariances + np.triu(np.ones((3, 3)), 1))
