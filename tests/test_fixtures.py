"""Files written by an older nflow_np (format 1, tests/fixtures/make_fixtures.py) still load, with the same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nflow_np.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from nflow_np.image_models import load_image_model
from nflow_np.io import load_model

FIXTURES = Path(__file__).parent / "fixtures"
MODEL_FOLDERS = ["toy_every_kind_float32", "toy_every_kind_float64", "nice_image", "realnvp_image"]


@pytest.mark.parametrize("folder", [*MODEL_FOLDERS, "cli_realnvp_checkpointed"])
def test_old_model_folders_load_and_give_the_same_log_prob(folder: str) -> None:
    directory = FIXTURES / folder
    model = load_model(directory)
    points = np.load(directory / "points.npy")
    np.testing.assert_array_equal(model.log_prob(points), np.load(directory / "expected_log_prob.npy"))


@pytest.mark.parametrize("folder", ["nice_image", "realnvp_image"])
def test_old_image_models_load_as_image_models(folder: str) -> None:
    model = load_image_model(FIXTURES / folder)
    assert (model.shape, model.levels) == ((1, 4, 4), 17)


def test_old_checkpoints_load() -> None:
    directory = FIXTURES / "cli_realnvp_checkpointed" / "checkpoints"
    names = [path.name for path in list_checkpoints(directory)]
    assert names == ["checkpoint-000000004.npz", "checkpoint-000000003.npz"]
    newest, skipped = latest_checkpoint(directory)
    assert skipped == [] and newest.state.finished and newest.state.steps == 4
    older = load_checkpoint(directory / "checkpoint-000000003.npz")
    assert older.state.steps == 3 and not older.state.finished
    final = load_model(FIXTURES / "cli_realnvp_checkpointed")
    for name, value in final.state_dict().items():  # the saved model is the best parameters of the run
        np.testing.assert_array_equal(newest.state.best_params[name], value)


def test_old_gmm_folders_load() -> None:
    from nflow_np.gmm import GaussianMixture

    directory = FIXTURES / "cli_gmm"
    mixture, summary = GaussianMixture.load(directory)
    assert (mixture.n_components, summary["components"], summary["data"]) == (2, 2, "two_moons")
    points = np.load(directory / "points.npy")
    np.testing.assert_array_equal(mixture.log_prob(points), np.load(directory / "expected_log_prob.npy"))


def test_a_data_file_folder_with_its_standardisation_in_the_metadata_only_loads_in_its_units() -> None:
    """Written by the first ``nflow train --data FILE`` (main at 833bd37): the flow of the standardised rows, and
    ``metadata.standardization`` beside it. ``load_model`` puts the Standardize layer in front, so the model is
    one of the file's rows: the log-density that code's ``nflow eval`` computed by hand, its samples bit for bit."""
    from nflow_np.flows import Standardize
    from nflow_np.io import read_config

    directory = FIXTURES / "cli_data_file_metadata_only"
    config = read_config(directory)
    assert [flow["kind"] for flow in config["flow"]["flows"]] == ["affine_coupling", "affine_coupling"]
    model = load_model(directory)
    assert [type(flow) for flow in model.flow.flows][0] is Standardize and len(model.flow.flows) == 3
    record = config["metadata"]["standardization"]
    np.testing.assert_array_equal(model.flow[0].buffers["mean"], record["mean"])
    np.testing.assert_array_equal(model.flow[0].buffers["std"], record["std"])
    points = np.loadtxt(directory / "points.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(model.log_prob(points), np.load(directory / "expected_log_prob.npy"), rtol=1e-13)
    samples = model.sample(50, np.random.default_rng(3))
    np.testing.assert_array_equal(samples, np.load(directory / "expected_samples.npy"))


def test_an_old_conv_model_loads_and_gives_the_same_log_prob_on_either_formulation() -> None:
    """Written when every convolution was im2col (``make_conv_fixture.py``); the ResNets now run on frames by default.

    The im2col path computes exactly what it computed then; the shifted path the same to round-off.
    """
    from nflow_np import backend
    from nflow_np.nn.resnet import ResNet, set_formulation

    directory = FIXTURES / "realnvp_resnet_image"
    points, expected = np.load(directory / "points.npy"), np.load(directory / "expected_log_prob.npy")
    model = load_image_model(directory)  # loaded afresh for each: log_prob draws the dequantisation noise
    nets = [m for m in model.flow.modules() if isinstance(m, ResNet)]
    assert nets and all(net.formulation == "shifted" for net in nets)
    np.testing.assert_allclose(model.log_prob(points), expected, rtol=1e-12, atol=1e-10)
    model = load_image_model(directory)
    set_formulation(model.flow, "im2col")
    with backend.using("numpy"):  # the backend it was written on (the numba laws round differently in the last bit)
        np.testing.assert_array_equal(model.log_prob(points), expected)
