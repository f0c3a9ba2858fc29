"""The conventions users bring: integer seeds for ``rng``, readable reprs, scikit-learn's names, the EM checked
against scikit-learn's ``GaussianMixture`` on the same data and initialisation."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
from helpers import randomise

from nflow_np import GaussianMixture, Planar, Radial
from nflow_np.architectures import build_model
from nflow_np.cli_options import TRAIN_DEFAULTS
from nflow_np.data import load_toy
from nflow_np.gmm import ConvergenceWarning
from nflow_np.seeding import as_generator
from nflow_np.train import fit
from nflow_np.vi import make_vi_flow, sample


@pytest.fixture
def model():
    m = build_model("realnvp", 2, layers=3, hidden=(8,), seed=1)
    randomise(m, np.random.default_rng(3))
    return m


def test_an_integer_seed_is_a_generator_everywhere(model) -> None:
    np.testing.assert_array_equal(model.sample(7, 0), model.sample(7, np.random.default_rng(0)))
    gmm = GaussianMixture(2, seed=0).fit(load_toy("two_moons", n_train=300, n_val=1, n_test=1).train)
    np.testing.assert_array_equal(gmm.sample(5, 4), gmm.sample(5, np.random.default_rng(4)))
    np.testing.assert_array_equal(Planar(2, rng=5).params["w"], Planar(2, rng=np.random.default_rng(5)).params["w"])
    np.testing.assert_array_equal(Radial(2, rng=5).params["z0"], Radial(2, rng=np.random.default_rng(5)).params["z0"])
    flow = make_vi_flow("planar", 2, 2, rng=0)
    np.testing.assert_array_equal(sample(flow, 4, 1)[0], sample(flow, 4, np.random.default_rng(1))[0])
    with pytest.raises(TypeError, match="rng must be an integer seed or a numpy.random.Generator, got str"):
        model.sample(3, "abc")
    with pytest.raises(TypeError, match="RandomState"):
        as_generator(np.random.RandomState(0))
    with pytest.raises(ValueError, match="non-negative"):
        as_generator(-1)


def test_reprs_show_the_architecture(model) -> None:
    text = repr(model)
    assert text.startswith("FlowModel(dim=2, base=StandardNormal, dtype=float64; ")
    assert f"{model.num_parameters():,} parameters" in text.splitlines()[0]
    assert "(0): AffineCoupling(dim=2, law='affine'" in text and "MLP(sizes=[1, 8, 2], activation='relu'" in text
    assert len(text.splitlines()) == 2 + 3  # model, flow, three layers
    assert repr(GaussianMixture(3)) == "GaussianMixture(n_components=3, reg_covar=1e-06)"


def test_scikit_learn_names_on_a_flow_model(model) -> None:
    x = model.sample(50, 2)
    np.testing.assert_array_equal(model.score_samples(x), model.log_prob(x))
    assert model.score(x) == pytest.approx(float(model.log_prob(x).mean()), rel=1e-12)
    for temperature in (1.0, 0.7):
        drawn, log_prob = model.sample_and_log_prob(40, 9, temperature=temperature)
        np.testing.assert_array_equal(drawn, model.sample(40, 9, temperature=temperature))
        np.testing.assert_allclose(log_prob, model.log_prob(drawn), rtol=1e-10, atol=1e-10)
    f32 = build_model("nice", 2, layers=2, hidden=(8,), dtype=np.float32)
    drawn, log_prob = f32.sample_and_log_prob(5, 0)
    assert drawn.dtype == log_prob.dtype == np.float32
    with pytest.raises(ValueError, match="positive integer number of samples"):
        model.sample_and_log_prob(0)


def test_gmm_predict_proba_bic_and_the_convergence_warning() -> None:
    x = load_toy("two_moons", n_train=400, n_val=1, n_test=1).train
    gmm = GaussianMixture(3, seed=0).fit(x)
    proba = gmm.predict_proba(x)
    assert proba.shape == (400, 3) and np.allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(gmm.predict(x), proba.argmax(axis=1))
    p = 2 + 3 * 2 + 3 * 3
    assert gmm.n_parameters() == p
    assert gmm.bic(x) == pytest.approx(-2 * gmm.log_prob(x).sum() + p * np.log(400))
    assert gmm.aic(x) == pytest.approx(-2 * gmm.log_prob(x).sum() + 2 * p)
    assert gmm.score(x) == pytest.approx(-gmm.nll(x)) and np.array_equal(gmm.score_samples(x), gmm.log_prob(x))
    with pytest.warns(ConvergenceWarning, match="stopped at max_iter = 2"):
        GaussianMixture(3, max_iter=2, seed=0).fit(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        assert GaussianMixture(1).fit(x).converged  # one component converges in two iterations: no warning


@pytest.mark.parametrize("k", [1, 3, 5])
def test_em_matches_scikit_learn_from_the_same_initialisation(k: int) -> None:
    from sklearn.mixture import GaussianMixture as Reference

    x = load_toy("pinwheel", n_train=600, n_val=1, n_test=1, seed=2).train
    iterations, reg = 25, 1e-9
    start = GaussianMixture(k, reg_covar=reg, prior_dof=0.0, seed=4)
    start._initialise(x, np.random.default_rng(4))  # the initial θ that fit() starts from with this seed
    ours = GaussianMixture(k, reg_covar=reg, prior_dof=0.0, seed=4, max_iter=iterations, tol=-np.inf)
    with pytest.warns(ConvergenceWarning):
        ours.fit(x)
    # scikit-learn: Σ_k = S_k / N_k + λ I; ours with ν = 0: (S_k + λ I) / N_k; with λ = 1e-9 both are S_k / N_k
    reference = Reference(k, covariance_type="full", reg_covar=reg, max_iter=iterations, tol=0.0,
                          weights_init=start.weights, means_init=start.means,
                          precisions_init=np.linalg.inv(start.covariances))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its own ConvergenceWarning
        reference.fit(x)
    np.testing.assert_allclose(ours.weights, reference.weights_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours.means, reference.means_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ours.covariances, reference.covariances_, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(ours.log_prob(x), reference.score_samples(x), rtol=1e-6, atol=1e-8)


def test_fit_defaults_equal_the_command_lines() -> None:
    defaults = {name: p.default for name, p in inspect.signature(fit).parameters.items()}
    for name in ("epochs", "batch_size", "patience", "lr_schedule", "clip_norm", "seed"):
        assert defaults[name] == TRAIN_DEFAULTS[name], name
