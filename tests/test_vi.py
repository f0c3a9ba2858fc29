"""Variational inference: the free energy's gradient, KL estimates, training, the q_K density, the CLI.

The free-energy gradient is checked by central differences with the base draws held fixed (then the
estimate is a deterministic function of the parameters), for planar and radial stacks with
parameters at the boundary of invertibility, for coupling layers, and for a mixed stack.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from helpers import FD_FLOOR, assert_gradients_match, numerical_gradient, randomise
from hypothesis import given, settings
from hypothesis import strategies as st

from nflow_np import AffineCoupling, Inverse, Rescale, Sequential
from nflow_np.flows.planar import Planar
from nflow_np.flows.radial import Radial
from nflow_np.targets import TARGETS, grid_points, u1
from nflow_np.train import NonFiniteLossError
from nflow_np.vi import (
    BASE,
    FLOW_KINDS,
    annealing_beta,
    estimate_kl,
    fit_vi,
    free_energy,
    free_energy_and_backward,
    log_q,
    make_vi_flow,
    push_to_target,
    sample,
)
from nflow_np.vi_cli import add_vi_subcommand, main, run_vi_command

seeds = st.integers(0, 2**32 - 1)


def boundary_planar(dim: int, rng: np.random.Generator, boundary: bool = True) -> Planar:
    """A planar layer whose wᵀu is drawn from ordinary values and (if ``boundary``) from the boundary
    of invertibility (wᵀû + 1 ≈ 1e-4)."""
    flow = Planar(dim, rng=rng)
    w, u = flow.params["w"], flow.params["u"]
    w[...] = rng.standard_normal(dim)
    u[...] = rng.standard_normal(dim)
    wu = rng.choice([rng.uniform(-9.0, -5.0) if boundary else 0.0, rng.uniform(-1.5, 3.0)])
    u += (wu - w @ u) * w / (w @ w)
    flow.params["b"][...] = rng.normal()
    return flow


def boundary_radial(dim: int, rng: np.random.Generator, boundary: bool = True) -> Radial:
    """A radial layer with β near −α (γ = α + β ≈ 5e-5 … 2.5e-3) or ordinary."""
    flow = Radial(dim, rng=rng)
    flow.params["alpha_hat"][...] = rng.normal()
    flow.params["beta_hat"][...] = rng.choice([rng.uniform(-10.0, -6.0) if boundary else 0.0, rng.uniform(-1.0, 2.0)])
    return flow


def stack(kind: str, dim: int, rng: np.random.Generator) -> Inverse:
    """A VI flow ``f = Inverse(Sequential(layers))``: its inverse (the sampling map) runs each layer's ``_forward``."""
    if kind == "planar":
        return Inverse(Sequential([boundary_planar(dim, rng) for _ in range(3)]))
    if kind == "radial":
        return Inverse(Sequential([boundary_radial(dim, rng) for _ in range(3)]))
    if kind == "affine":
        layers = [AffineCoupling(dim, parity=k % 2, hidden=(5,), rng=rng, activation="tanh") for k in range(2)]
        return Inverse(randomise(Sequential(layers), rng))
    coupling = randomise(AffineCoupling(dim, hidden=(4,), rng=rng), rng, std=0.3)
    return Inverse(Sequential([boundary_planar(dim, rng), boundary_radial(dim, rng), coupling]))


def quadratic_energy(centre: np.ndarray, scale: float):
    """``U(z) = ½‖z − c‖²/s² + (D/2) log(2π s²)``: a normalised Gaussian, log Z = 0."""

    def energy(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        centred = (z - centre) / scale
        constant = float(0.5 * z.shape[1] * np.log(2 * np.pi * scale**2))
        return 0.5 * np.sum(centred**2, axis=1) + constant, centred / scale

    return energy


# --- the gradient of the free energy -------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    kind=st.sampled_from(["planar", "radial", "affine", "mixed"]),
    n=st.integers(1, 6),
    seed=seeds,
    beta=st.sampled_from([1.0, 0.01, 0.37]),
)
def test_free_energy_gradient_matches_differences(kind: str, n: int, seed: int, beta: float) -> None:
    rng = np.random.default_rng(seed)
    flow = stack(kind, 2, rng)
    z0 = rng.standard_normal((n, 2))
    energy = TARGETS["U3"] if kind == "mixed" else u1  # U3 carries the box wall
    flow.zero_grad()
    value = free_energy_and_backward(flow, energy, z0, beta)
    assert value == pytest.approx(free_energy(flow, energy, z0, beta), rel=1e-14, abs=1e-14)
    analytic = {name: grad.copy() for name, _, grad in flow.named_parameters()}
    numeric = {
        name: numerical_gradient(lambda: free_energy(flow, energy, z0, beta), param)
        for name, param, _ in flow.named_parameters()
    }
    # the helpers' floor: FD_FLOOR times the size S of the loss's terms (tests/helpers.py docstring)
    z_k, logdet = flow.inverse(z0)
    size = 1.0 + float(np.mean(np.abs(BASE.log_prob(z0)) + np.abs(logdet) + beta * np.abs(energy(z_k)[0])))
    assert_gradients_match(analytic, numeric, FD_FLOOR * size, f"free energy of a {kind} stack")


def test_gradient_signs_by_hand() -> None:
    """One radial layer at the identity, centred at 0, and a target N(0, 0.25 I) tighter than q₀.

    Raising β̂ raises β above 0: the layer expands q₀, away from the target, so F must rise. For
    q = N(0, s²I) the exact slope is d KL/ds = 2 (2s/σ² − 2/s) = 12 at s = 1: the energy term (pushed
    by +β∇U/N) outweighs the entropy term (pushed by −1/N per log-det); a sign error in either flips it.
    """
    flow = Inverse(Sequential([Radial(2, rng=np.random.default_rng(0))]))
    flow.flow.flows[0].params["z0"][...] = 0
    energy = quadratic_energy(np.zeros(2), 0.5)  # target tighter than q₀: contracting lowers F
    z0 = np.random.default_rng(1).standard_normal((4000, 2))
    flow.zero_grad()
    free_energy_and_backward(flow, energy, z0)
    d_beta_hat = flow.flow.flows[0].grads["beta_hat"][0]
    assert d_beta_hat > 0  # raising β̂ raises β, expands q, moves it away from the tight target
    param = flow.flow.flows[0].params["beta_hat"]
    numeric = numerical_gradient(lambda: free_energy(flow, energy, z0), param)[0]
    assert d_beta_hat == pytest.approx(numeric, rel=1e-6)


# --- estimates of F and KL ---------------------------------------------------------------------


def test_free_energy_is_exact_kl_for_gaussians() -> None:
    """q_K = N(0, e^{2σ}) through a Rescale layer, p = N(c, s²) normalised: KL in closed form."""
    flow = Inverse(Sequential([Rescale(2)]))
    flow.flow.flows[0].params["log_scale"][...] = [0.3, -0.4]
    centre, scale = np.array([0.5, -1.0]), 0.8
    energy = quadratic_energy(centre, scale)
    variance = np.exp(2 * flow.flow.flows[0].params["log_scale"])
    exact = 0.5 * np.sum(variance / scale**2 + centre**2 / scale**2 - 1 - np.log(variance / scale**2))
    estimate = estimate_kl(flow, energy, log_z=0.0, samples=40000, rng=np.random.default_rng(3))
    assert estimate.kl == pytest.approx(estimate.free_energy)
    assert abs(estimate.kl - exact) < 4 * estimate.stderr
    assert 0 < estimate.stderr < 0.02


def test_identity_flow_on_its_own_base_has_zero_free_energy() -> None:
    """q_K = q₀ = p: every per-sample term log q₀ − 0 + U vanishes, so F = 0 exactly, stderr 0."""
    flow = make_vi_flow("radial", 3, 2)  # radial layers start as the identity
    estimate = estimate_kl(flow, quadratic_energy(np.zeros(3), 1.0), log_z=0.0, samples=500)
    assert estimate.free_energy == pytest.approx(0.0, abs=1e-12)
    assert estimate.stderr == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kind", ["planar", "radial", "affine", "mixed"])
def test_log_q_agrees_with_push_to_target(kind: str) -> None:
    """Density through the inverse at z_K equals log q₀(z₀) − logdet along the sampling path."""
    rng = np.random.default_rng(4)
    flow = stack(kind, 2, rng)
    z_k, log_q_k = push_to_target(flow, rng.standard_normal((50, 2)))
    np.testing.assert_allclose(log_q(flow, z_k), log_q_k, rtol=1e-9, atol=1e-9)


def test_q_k_integrates_to_one() -> None:
    """∫ q_K = 1 by the midpoint rule (boundary parameters would put spikes narrower than the grid)."""
    rng = np.random.default_rng(5)
    coupling = randomise(AffineCoupling(2, hidden=(4,), rng=rng), rng, std=0.3)
    flow = Inverse(Sequential([boundary_planar(2, rng, False), boundary_radial(2, rng, False), coupling]))
    grid = grid_points((-9.0, 9.0), 500)
    assert np.exp(log_q(flow, grid)).sum() * (18 / 500) ** 2 == pytest.approx(1.0, abs=1e-4)


# --- training ----------------------------------------------------------------------------------


def test_annealing_schedule() -> None:
    assert annealing_beta(0, 10000) == pytest.approx(0.01)
    assert annealing_beta(5000, 10000) == pytest.approx(0.51)
    assert annealing_beta(9900, 10000) == 1.0 and annealing_beta(20000, 10000) == 1.0
    assert annealing_beta(0, None) == 1.0 and annealing_beta(0, 0) == 1.0


def test_training_on_u1_lowers_kl_and_keeps_history() -> None:
    target = TARGETS["U1"]
    log_z = 1.8775016261097
    flow = make_vi_flow("planar", 2, 8, rng=np.random.default_rng(0))
    before = estimate_kl(flow, target, log_z, samples=2000)
    result = fit_vi(flow, target, steps=1500, anneal_steps=1000, log_every=250)
    after = estimate_kl(flow, target, log_z, samples=2000)
    assert after.kl < 0.5 < before.kl
    assert after.kl > -3 * after.stderr  # a KL divergence: non-negative up to noise
    assert [entry["step"] for entry in result.history] == [250, 500, 750, 1000, 1250, 1500]
    assert result.history[-1]["beta"] == 1.0 and result.steps == 1500 and result.steps_per_second > 0


def test_training_a_coupling_stack_in_float32() -> None:
    flow = make_vi_flow("affine", 2, 4, rng=np.random.default_rng(1), dtype=np.float32)
    energy = quadratic_energy(np.array([1.0, -1.0], np.float32), 0.5)
    fit_vi(flow, energy, steps=600, anneal_steps=None, batch_size=200, log_every=100)
    assert all(param.dtype == np.float32 for _, param, _ in flow.named_parameters())
    z_k, log_q_k = sample(flow, 1000, np.random.default_rng(2))
    assert z_k.dtype == np.float32 and log_q_k.dtype == np.float32
    assert np.abs(z_k.mean(axis=0) - [1.0, -1.0]).max() < 0.1
    assert estimate_kl(flow, energy, 0.0, samples=2000).kl < 0.05


def test_radial_stack_trains_too() -> None:
    flow = make_vi_flow("radial", 2, 4, rng=np.random.default_rng(2))
    energy = quadratic_energy(np.array([0.5, 0.0]), 0.6)
    before = estimate_kl(flow, energy, 0.0, samples=1000).kl
    fit_vi(flow, energy, steps=400, anneal_steps=None, batch_size=200)
    assert estimate_kl(flow, energy, 0.0, samples=1000).kl < before / 3


# --- bad inputs ----------------------------------------------------------------------------------


def test_target_errors() -> None:
    flow = make_vi_flow("planar", 2, 1)
    z0 = np.zeros((3, 2))
    with pytest.raises(TypeError, match=r"must return a pair \(U\(z\), grad U\(z\)\)"):
        free_energy(flow, lambda z: z[:, 0], z0)
    with pytest.raises(ValueError, match=r"must return U of shape \(3,\) and grad U of shape \(3, 2\)"):
        free_energy(flow, lambda z: (z[:, 0], z[:, 0]), z0)
    with pytest.raises(NonFiniteLossError, match="non-finite U"):
        free_energy_and_backward(flow, lambda z: (np.full(3, np.inf), z), z0)
    with pytest.raises(NonFiniteLossError, match="non-finite U"):
        fit_vi(flow, lambda z: (np.full(len(z), np.nan), z), steps=2)
    with pytest.raises(ValueError, match="z0 has 3 columns"):
        free_energy(flow, u1, np.zeros((3, 3)))
    with pytest.raises(TypeError, match="z0 has dtype float32 but the parameters are float64"):
        free_energy(flow, u1, np.zeros((3, 2), np.float32))


def test_argument_errors() -> None:
    flow = make_vi_flow("planar", 2, 1)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        fit_vi(flow, u1, steps=0)
    with pytest.raises(ValueError, match="lr_schedule must be"):
        fit_vi(flow, u1, steps=1, lr_schedule="linear")
    with pytest.raises(ValueError, match="decay_start must lie in"):
        fit_vi(flow, u1, steps=10, decay_start=11)
    with pytest.raises(ValueError, match="unknown flow kind 'maf'"):
        make_vi_flow("maf", 2, 3)
    with pytest.raises(ValueError, match="coupling layers need dim >= 2"):
        make_vi_flow("affine", 1, 3)
    with pytest.raises(ValueError, match="samples must be at least 2"):
        estimate_kl(flow, u1, samples=1)
    assert set(FLOW_KINDS) == {"planar", "radial", "affine", "additive"}
    for kind in FLOW_KINDS:
        assert len(make_vi_flow(kind, 2, 3).flow) == 3


def test_base_is_the_standard_normal() -> None:
    z = np.array([[0.0, 0.0]])
    assert BASE.log_prob(z)[0] == pytest.approx(-np.log(2 * np.pi))


# --- the command line ----------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nflow")
    add_vi_subcommand(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_writes_summary_figure_and_parameters(tmp_path, capsys) -> None:
    argv = "vi --target U1 U4 --layers 1 3 --steps 40 --anneal-steps 20 --samples 300 --grid 40 --no-progress"
    args = parse([*argv.split(), "--out", str(tmp_path)])
    assert run_vi_command(args) == 0
    printed = capsys.readouterr().out
    assert "U1 / planar K=3: F " in printed and "KL(q||p)" in printed and "steps/s" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    runs = {(run["target"], run["layers"]): run for run in summary["results"]}
    assert set(runs) == {("U1", 1), ("U1", 3), ("U4", 1), ("U4", 3)}
    u1_run = runs[("U1", 3)]
    assert u1_run["kl"] == pytest.approx(u1_run["free_energy"] + u1_run["log_z"])
    assert u1_run["log_z"] == pytest.approx(1.8775, abs=1e-4) and u1_run["steps"] == 40
    assert (tmp_path / "figure3.png").stat().st_size > 10000
    state = np.load(tmp_path / "U4-planar-K3.npz")
    assert sorted(state.files) == sorted(f"{k}.{p}" for k in range(3) for p in ("u", "w", "b"))


def test_cli_user_target_and_errors(tmp_path, monkeypatch) -> None:
    module = tmp_path / "my_energies.py"
    module.write_text(
        "import numpy as np\n"
        "def tilted(z):\n"
        "    return 0.5 * np.sum(z**2, axis=1) + z[:, 0], z + np.eye(z.shape[1])[0]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = "vi --target my_energies:tilted --dim 3 --layers 2 --steps 20 --samples 100 --no-progress"
    args = parse([*argv.split(), "--out", str(tmp_path / "run")])
    assert run_vi_command(args) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["results"][0]["kl"] is None
    for bad, message in (("U9", "unknown target 'U9'"), ("my_energies:missing", "cannot load target")):
        with pytest.raises(ValueError, match=message):
            run_vi_command(parse(["vi", "--target", bad, "--out", str(tmp_path / "bad")]))
    with pytest.raises(SystemExit):
        parse(["vi", "--layers", "0"])


def test_standalone_main_exit_codes(tmp_path, capsys) -> None:
    assert main(["vi", "--target", "U7", "--out", str(tmp_path)]) == 2
    assert "unknown target 'U7'" in capsys.readouterr().err
    argv = ["vi", "--layers", "1", "--steps", "5", "--samples", "50", "--grid", "20", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path)]) == 0


# --- a base other than N(0, I) -------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(seed=seeds, n=st.integers(1, 6))
def test_free_energy_gradient_with_a_diagonal_base(seed: int, n: int) -> None:
    """The same central-difference check with q₀ = N(μ, diag σ²): log q₀ changes, its θ-gradient (zero) does not."""
    from nflow_np.distributions import DiagonalNormal

    rng = np.random.default_rng(seed)
    base = DiagonalNormal(rng.normal(size=2), rng.uniform(0.3, 2.0, size=2))
    flow = randomise(Sequential([Planar(2, rng=rng), Radial(2, rng=rng), Rescale(2)]), rng, std=0.3)
    z0 = base.sample(n, 2, rng)
    flow.zero_grad()
    value = free_energy_and_backward(flow, u1, z0, 0.7, base)
    assert value == pytest.approx(free_energy(flow, u1, z0, 0.7, base), rel=1e-14, abs=1e-14)
    assert value != pytest.approx(free_energy(flow, u1, z0, 0.7), rel=1e-6)  # the base enters log q₀
    analytic = {name: grad.copy() for name, _, grad in flow.named_parameters()}
    numeric = {
        name: numerical_gradient(lambda: free_energy(flow, u1, z0, 0.7, base), param)
        for name, param, _ in flow.named_parameters()
    }
    z_k, logdet = flow.forward(z0)
    size = 1.0 + float(np.mean(np.abs(base.log_prob(z0)) + np.abs(logdet) + 0.7 * np.abs(u1(z_k)[0])))
    assert_gradients_match(analytic, numeric, FD_FLOOR * size, "free energy with a diagonal base")


def test_a_base_equal_to_the_target_has_zero_kl_and_fit_vi_uses_it() -> None:
    """Target N(μ, diag σ²), base the same, flow the identity: every draw has log q + U = −log Z, so KL = 0."""
    from nflow_np.distributions import DiagonalNormal

    mean, std = np.array([1.5, -0.5]), np.array([0.4, 2.0])
    base = DiagonalNormal(mean, std)

    def gaussian(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = (z - mean) / std
        return 0.5 * np.sum(u * u, axis=1), u / std

    log_z = float(np.sum(np.log(std * np.sqrt(2 * np.pi))))
    flow = Sequential([Rescale(2)])
    estimate = estimate_kl(flow, gaussian, log_z, samples=500, base=base)
    assert estimate.kl == pytest.approx(0.0, abs=1e-12) and estimate.stderr == pytest.approx(0.0, abs=1e-12)
    assert estimate_kl(flow, gaussian, log_z, samples=500).kl > 0.5  # from N(0, I) it is far off
    z_k, log_q_k = sample(flow, 5, np.random.default_rng(3), base)
    np.testing.assert_allclose(log_q(flow, z_k, base), log_q_k, rtol=1e-12)
    # fit_vi draws from the base it is given: its free energy starts at the optimum, F = −log Z
    result = fit_vi(flow, gaussian, steps=3, batch_size=64, anneal_steps=None, log_every=1, base=base)
    assert result.history[0]["free_energy"] == pytest.approx(-log_z, abs=1e-12)
    assert all(entry["free_energy"] == pytest.approx(-log_z, abs=1e-2) for entry in result.history)
