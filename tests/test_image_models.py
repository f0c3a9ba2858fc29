"""Image models (nflow_np/image_models.py, image_training.py, image_plots.py) and ``nflow train --data digits``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import randomise
from image_cases import small_realnvp

from nflow_np.cli import main
from nflow_np.data import load_images
from nflow_np.distributions import StandardLogistic, StandardNormal
from nflow_np.flows import AdditiveCoupling, BatchNorm, Dequantize, Logit, Rescale, Scale, training_mode
from nflow_np.flows.image import checkerboard_mask
from nflow_np.flows.normalization import recalibrate
from nflow_np.image_models import build_nice, build_realnvp, initialize_rescale, load_image_model
from nflow_np.image_plots import tile
from nflow_np.image_training import IMAGE_RECIPES, train_image_model
from nflow_np.io import save_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_FILES = [
    "interpolations.png", "model.json", "model.safetensors", "reconstructions.png", "samples.png", "summary.json"
]


@pytest.fixture(scope="module")
def digits() -> object:
    return load_images("digits")


def test_nice_is_the_papers_architecture() -> None:
    model = build_nice((1, 28, 28), 256, hidden=(7, 7, 7, 7, 7), dtype=np.float64)
    layers = model.flow.flows
    assert [type(layer) for layer in layers] == [Dequantize, Scale, *[AdditiveCoupling] * 4, Rescale]
    assert [layer.net.sizes for layer in layers[2:6]] == [[392, 7, 7, 7, 7, 7, 392]] * 4
    assert all(layer.net.activation == "relu" for layer in layers[2:6])
    assert [bool(layer.mask[0]) for layer in layers[2:6]] == [True, False, True, False]  # odd/even alternate
    assert isinstance(model.base, StandardLogistic) and layers[1].factor == 1 / 256
    assert isinstance(build_nice((1, 8, 8), 17, hidden=(4,), alpha=0.05).flow.flows[2], Logit)


def test_nice_checkerboard_partition() -> None:
    layers = build_nice((1, 8, 8), 17, hidden=(4,), partition="checkerboard").flow.flows[2:6]
    for k, layer in enumerate(layers):
        assert np.array_equal(layer.mask, checkerboard_mask((1, 8, 8), k % 2))
    with pytest.raises(ValueError, match="partition"):
        build_nice((1, 8, 8), 17, partition="random")


def test_realnvp_digits_scales() -> None:
    model = build_realnvp((1, 8, 8), 17, hidden=(4,))
    assert isinstance(model.base, StandardNormal) and model.dim == 64
    scale = model.flow.flows[3]
    dims = []
    while True:  # follow the factor-outs down the scales
        dims.append(scale.dim)
        last = scale.flows[-1]
        if type(last).__name__ != "FactorOut":
            break
        scale = last.flow
    assert dims == [64, 32]  # (1, 8, 8) → squeeze (4, 4, 4) → keep (2, 4, 4) → final scale
    assert sum(isinstance(m, BatchNorm) for m in model.modules()) == 3 + 3 + 4


def test_image_model_boundary_round_trips_and_samples() -> None:
    rng = np.random.default_rng(1)
    model = small_realnvp(rng, levels=4)
    x = rng.integers(0, 4, size=(6, 1, 4, 4)).astype(np.float64)
    z = model.encode(x)
    assert z.shape == (6, 16)
    assert np.array_equal(model.decode(z), x)  # dequantise, flow, invert, quantise: x exactly
    model.dequantize.reseed(2)
    from_images = model.log_prob(x)
    model.dequantize.reseed(2)
    np.testing.assert_array_equal(from_images, model.log_prob(x.reshape(6, 16)))  # images or their rows
    samples = model.sample(5, np.random.default_rng(0), temperature=0.7)
    assert samples.shape == (5, 1, 4, 4) and set(np.unique(samples)) <= {0.0, 1.0, 2.0, 3.0}
    with pytest.raises(ValueError, match=r"x must hold levels 0 … 3"):
        model.log_prob(x + 4)
    with pytest.raises(ValueError, match=r"images of shape \(1, 2, 8\)"):
        model.log_prob(x.reshape(6, 1, 2, 8))


def test_training_step_uses_batch_statistics_and_evaluation_the_running_averages() -> None:
    rng = np.random.default_rng(2)
    model = small_realnvp(rng, levels=4)
    x = rng.integers(0, 4, size=(8, 16)).astype(np.float64)
    layers = [m for m in model.modules() if isinstance(m, BatchNorm)]
    before = [layer.buffers["running_mean"].copy() for layer in layers]
    model.log_prob(x)  # evaluation: running averages untouched
    assert all(np.array_equal(b, layer.buffers["running_mean"]) for b, layer in zip(before, layers, strict=True))
    model.zero_grad()
    model.nll_and_backward(x)
    assert not any(layer.training for layer in layers)  # restored
    assert all(not np.array_equal(b, layer.buffers["running_mean"]) for b, layer in zip(before, layers, strict=True))


def test_recalibration_makes_evaluation_match_the_batch_statistics() -> None:
    rng = np.random.default_rng(3)
    model = small_realnvp(rng, levels=4)
    x = rng.integers(0, 4, size=(64, 16)).astype(np.float64)
    model.dequantize.reseed(7)  # the same noise in all three passes
    recalibrate(model.flow, model.log_prob, x)
    model.dequantize.reseed(7)
    evaluation = model.log_prob(x)
    model.dequantize.reseed(7)
    with training_mode(model.flow):
        batch_statistics = model.log_prob(x)  # momentum 0.1 again: stats equal, updates harmless
    np.testing.assert_allclose(evaluation, batch_statistics, rtol=1e-10)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, BatchNorm))


def test_initialize_rescale_puts_z_at_the_prior_scale(digits: object) -> None:
    model = build_nice(digits.shape, digits.levels, hidden=(8,), dtype=np.float32)
    randomise(model.flow.flows[2], np.random.default_rng(0), std=0.1)
    initialize_rescale(model, digits.train[:500])
    z = model.encode(digits.train[:500])
    np.testing.assert_allclose(z.std(axis=0), np.pi / np.sqrt(3), rtol=0.15)
    with pytest.raises(ValueError, match="ending in a Rescale"):
        initialize_rescale(build_realnvp(digits.shape, digits.levels, hidden=(4,)), digits.train[:10])


def test_save_and_load_keep_the_density(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    model = small_realnvp(rng, levels=4)
    x = rng.integers(0, 4, size=(5, 1, 4, 4)).astype(np.float64)
    save_model(model, tmp_path / "m", {"image_shape": [1, 4, 4], "levels": 4})
    loaded = load_image_model(tmp_path / "m")
    assert loaded.shape == (1, 4, 4) and loaded.levels == 4
    assert loaded.evaluate(x, seed=3) == model.evaluate(x, seed=3)
    np.testing.assert_array_equal(loaded.decode(loaded.encode(x)), x)


def test_tile() -> None:
    images = np.arange(5 * 4, dtype=float).reshape(5, 1, 2, 2)
    canvas = tile(images, columns=3)
    assert canvas.shape == (2 * 3 - 1, 3 * 3 - 1)
    assert np.array_equal(canvas[3:5, 3:5], images[4, 0]) and np.isnan(canvas[2]).all()


def test_train_image_model_writes_everything(tmp_path: Path, digits: object) -> None:
    summary = train_image_model("digits", "realnvp", tmp_path, hidden=(16,), epochs=2, batch_size=128)
    assert sorted(p.name for p in tmp_path.iterdir()) == IMAGE_FILES
    for picture in ("samples.png", "reconstructions.png", "interpolations.png"):
        assert (tmp_path / picture).read_bytes().startswith(PNG_SIGNATURE)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["epochs_run"] == 2 and on_disk["splits"] == {"train": 1347, "val": 150, "test": 300}
    assert summary["test_bits_per_dim"] == pytest.approx(summary["test_nll"] / (64 * math.log(2)))
    assert summary["test_log_likelihood_01"] == pytest.approx(-summary["test_nll"] + 64 * math.log(17))
    assert load_image_model(tmp_path).evaluate(digits.test)["nll"] == pytest.approx(summary["test_nll"], rel=1e-6)
    with pytest.raises(ValueError, match="unknown settings"):
        train_image_model("digits", "nice", tmp_path, layers=3)


def test_time_limit_stops_between_epochs(tmp_path: Path) -> None:
    summary = train_image_model("digits", "nice", tmp_path, hidden=(8,), epochs=1000, time_limit=0.2)
    assert summary["stopped_by"] == "time_limit" and summary["epochs_run"] < 1000


def test_recipes_cover_both_data_sets_and_models() -> None:
    assert set(IMAGE_RECIPES) == {(d, m) for d in ("digits", "mnist") for m in ("nice", "realnvp", "realnvp_resnet")}


def test_cli_trains_an_image_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    argv = ["train", "--data", "digits", "--model", "nice", "--hidden", "8", "--epochs", "1", "--no-progress"]
    assert main([*argv, "--out", str(out), "--weight-decay", "1e-4"]) == 0
    printed = capsys.readouterr().out
    assert "digits / nice: test NLL" in printed and "bits/dim" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["hidden"] == [8] and summary["settings"]["weight_decay"] == 1e-4
    assert summary["settings"]["batch_size"] == IMAGE_RECIPES[("digits", "nice")]["batch_size"]  # from the recipe
    assert main(["eval", str(out)]) == 0  # the saved model, on its own test split, gives the same number
    assert f"test NLL {summary['test_nll']:.2f} nats per image" in capsys.readouterr().out
    assert main(["eval", str(out), "--n-test", "5"]) == 2
    assert "apply to toy models" in capsys.readouterr().err
    # nflow sample: images (N, C, H, W) of integer levels in .npy, flattened rows in .csv, a grid in .png
    argv = ["sample", str(out), "-n", "12", "--seed", "3", "--temperature", "0.7", "--out"]
    assert main([*argv, str(tmp_path / "s.npy")]) == 0 and main([*argv, str(tmp_path / "s.csv")]) == 0
    expected = load_image_model(out).sample(12, np.random.default_rng(3), temperature=0.7)
    assert expected.shape == (12, 1, 8, 8) and np.array_equal(expected, np.round(expected))
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), expected)
    csv = np.loadtxt(tmp_path / "s.csv", delimiter=",", skiprows=1)
    np.testing.assert_array_equal(csv, expected.reshape(12, 64))
    assert main([*argv, str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").read_bytes().startswith(PNG_SIGNATURE)
    assert main(["train", "--data", "digits", "--layers", "3", "--out", str(out)]) == 2
    assert "--layers does not apply to image data (digits)" in capsys.readouterr().err
    assert main(["train", "--data", "two_moons", "--model", "gmm", "--time-limit", "3", "--out", str(out)]) == 2
    assert "--time-limit does not apply to --model gmm" in capsys.readouterr().err  # toy flows honour it (fit)


def test_cli_image_training_with_memory_invert_matches_the_standard_run(tmp_path: Path) -> None:
    """--memory invert on image data: the same training (float32: equal to rounding), layer inputs recomputed."""
    argv = ["train", "--data", "digits", "--model", "realnvp", "--hidden", "16", "--epochs", "2", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "store")]) == 0
    assert main([*argv, "--out", str(tmp_path / "invert"), "--memory", "invert", "--anchor-every", "3"]) == 0
    store, invert = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("store", "invert"))
    assert invert["settings"]["memory"] == "invert" and invert["settings"]["anchor_every"] == 3
    assert invert["test_nll"] == pytest.approx(store["test_nll"], rel=1e-3)
    assert main([*argv, "--out", str(tmp_path / "x"), "--anchor-every", "3"]) == 2
    assert main([*argv, "--out", str(tmp_path / "x"), "--skip-nonfinite"]) == 2  # image runs stop on a non-finite loss


def test_every_image_layer_kind_round_trips_through_the_model_format() -> None:
    from nflow_np.flows import ActNorm, AffineCoupling, FactorOut, Sequential, Squeeze
    from nflow_np.io import ModelFileError, flow_from_spec, flow_to_spec

    rng = np.random.default_rng(6)
    actnorm = ActNorm(8)
    actnorm.forward(rng.standard_normal((5, 8)))
    flow = Sequential(
        [
            Dequantize(16, 4, seed=9),
            Scale(16, 0.25),
            Logit(16, 0.05),
            Squeeze((1, 4, 4)),
            BatchNorm(16, momentum=0.2, eps=1e-4),
            FactorOut(16, Sequential([actnorm, AffineCoupling(8, parity=1, hidden=(3,))])),
        ]
    )
    spec = flow_to_spec(flow)
    kinds = [layer["kind"] for layer in spec["flows"]]
    assert kinds == ["dequantize", "scale", "logit", "squeeze", "batch_norm", "factor_out"]
    assert spec["flows"][5]["flow"]["flows"][0] == {"kind": "actnorm", "dim": 8, "initialized": True}
    rebuilt = flow_from_spec(json.loads(json.dumps(spec)))
    assert flow_to_spec(rebuilt) == spec
    rebuilt.load_state_dict(flow.state_dict())
    x = rng.integers(0, 4, size=(3, 16)).astype(np.float64)
    np.testing.assert_array_equal(rebuilt.forward(x)[0], flow.forward(x)[0])  # same noise: same seed
    bad = json.loads(json.dumps(spec))
    bad["flows"][2]["alpha"] = "0.05"
    with pytest.raises(ModelFileError, match=r"flows\[2\]\.alpha: expected a number"):
        flow_from_spec(bad)
    bad["flows"][2]["alpha"] = 0.7
    with pytest.raises(ModelFileError, match=r"alpha must be in \[0, 0.5\)"):
        flow_from_spec(bad)


def test_evaluate_is_reproducible_and_leaves_the_training_noise_stream_alone() -> None:
    rng = np.random.default_rng(7)
    model = small_realnvp(rng, levels=4)
    x = rng.integers(0, 4, size=(5, 1, 4, 4)).astype(np.float64)
    first = model.evaluate(x, seed=1)
    assert model.evaluate(x, seed=1) == first and model.evaluate(x, seed=2) != first
    expected = np.random.default_rng(model.dequantize.seed).random((5, 16))
    np.testing.assert_allclose(model.dequantize.forward(x.reshape(5, 16))[0] - x.reshape(5, 16), expected, atol=1e-12)
