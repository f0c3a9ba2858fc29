"""``build_realnvp_resnet``: RealNVP's multi-scale model with convolutional couplings, end to end.

Its architecture (the paper's scales and masks), the exact log-density of the whole model against the
Jacobian, training that lowers the NLL, ``memory="invert"`` giving the stored gradients, model files
(save, load, the hardened loader's refusals), and the strict fake device (``tests/fake_device.py``):
training, sampling, encoding and decoding there equal the host's, and nothing it keeps leaves the device.
"""

from __future__ import annotations

import json

import fake_device
import numpy as np
import pytest
from conv_cases import randomise_conv
from helpers import check_logdet
from image_cases import core_flow
from test_device import assert_on_device, fake_backend  # noqa: F401  (a fixture)

from nflow_np.flows import BatchNorm
from nflow_np.flows.conv_coupling import ConvAffineCoupling
from nflow_np.flows.image import FactorOut, Squeeze
from nflow_np.image_models import (
    ImageFlowModel,
    build_realnvp_resnet,
    load_image_model,
    realnvp_resnet_couplings,
    realnvp_resnet_footprint,
)
from nflow_np.io import ModelFileError, load_model, save_model
from nflow_np.optim import Adam
from nflow_np.train import fit

NET = {"channels": 3, "blocks": 1}


def small(seed: int = 0, shape: tuple = (1, 4, 4), levels: int = 4, **kwargs: object) -> ImageFlowModel:
    """A two-scale model in float64, every parameter random, batch norms in evaluation mode."""
    options = {"couplings": 2, "final_couplings": 2, "dtype": np.float64, "seed": seed} | NET | kwargs
    model = build_realnvp_resnet(shape, levels, **options)
    randomise_conv(model.flow, np.random.default_rng(seed), std=0.3)
    return model


def couplings_of(flow: object) -> list[ConvAffineCoupling]:
    """The convolutional couplings under ``flow``, in the order the data meets them."""
    if isinstance(flow, ConvAffineCoupling):
        return [flow]
    inner = getattr(flow, "flows", None) or ([flow.flow] if hasattr(flow, "flow") else [])
    return [c for f in inner for c in couplings_of(f)]


def images(n: int, shape: tuple = (1, 4, 4), levels: int = 4, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, levels, size=(n, *shape)).astype(np.float64)


def test_the_architecture_is_the_papers() -> None:
    """Per scale: 3 checkerboard couplings, squeeze, 3 channel-wise, factor out half; 4 checkerboard at the end;
    a batch norm after every coupling."""
    model = build_realnvp_resnet((1, 8, 8), 17, channels=4, blocks=1)
    top = model.flow.flows[-1]
    kinds = [(type(f).__name__, getattr(f, "mask_kind", None)) for f in top.flows]
    coupling = [("ConvAffineCoupling", "checkerboard"), ("BatchNorm", None)]
    channel = [("ConvAffineCoupling", "channel"), ("BatchNorm", None)]
    assert kinds == 3 * coupling + [("Squeeze", None)] + 3 * channel + [("FactorOut", None)]
    assert isinstance(top.flows[6], Squeeze) and top.flows[6].out_shape == (4, 4, 4)
    last = top.flows[-1]
    assert isinstance(last, FactorOut) and last.keep == 32
    assert [f.shape for f in last.flow.flows if isinstance(f, ConvAffineCoupling)] == [(2, 4, 4)] * 4
    assert all(f.channels == f.dim // 16 for f in last.flow.flows if isinstance(f, BatchNorm))


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 6, 6), (1, 5, 5), (2, 1, 1)])
@pytest.mark.parametrize("scales", [1, 2, 3])
def test_the_preflight_plan_is_the_built_architecture(shape: tuple, scales: int) -> None:
    """``realnvp_resnet_couplings`` walks the scales as the builder does; the footprint counts its parameters."""
    model = build_realnvp_resnet(shape, 4, channels=2, blocks=1, scales=scales)
    built = [(f.shape, f.mask_kind, f.parity) for f in couplings_of(model.flow)]
    assert built == realnvp_resnet_couplings(shape, scales=scales)
    if scales == 2:
        n_params, _ = realnvp_resnet_footprint(shape, 2, 1, batch_size=1, itemsize=4)
        # parameters and the batch norms' running statistics: what the model file stores of them
        assert n_params == sum(v.size for f in couplings_of(model.flow) for v in f.state_dict().values())


def test_the_models_log_density_is_exact() -> None:
    """The whole flow after dequantisation (logit, both scales, factor-out) against slogdet of its Jacobian."""
    model = small(1)
    x = np.random.default_rng(0).uniform(0.1, 3.9, size=(2, 16))
    check_logdet(core_flow(model), x, "forward", rows=2)
    check_logdet(core_flow(model), core_flow(model).forward(x)[0], "inverse", rows=2)


def test_training_lowers_the_nll_and_the_float32_model_keeps_its_dtype() -> None:
    model = build_realnvp_resnet((1, 4, 4), 4, couplings=1, final_couplings=2, channels=4, blocks=1, seed=0)
    data = images(96).astype(np.float32).reshape(96, -1)
    result = fit(model, data[:64], data[64:], epochs=6, batch_size=16, progress=False, optimizer=Adam(model, 3e-3))
    nll = [h["val_nll"] for h in result.history]
    assert nll[-1] < nll[0]
    assert model.dtype == np.float32 and model.log_prob(data[:3]).dtype == np.float32


def test_memory_invert_gives_the_stored_gradients() -> None:
    rows = images(8).reshape(8, -1)
    grads = {}
    for memory in ("store", "invert"):
        model = small(2)
        model.set_memory(memory)
        model.dequantize.reseed(0)
        model.zero_grad()
        model.nll_and_backward(rows)
        grads[memory] = {name: grad.copy() for name, _, grad in model.named_parameters()}
    for name, grad in grads["store"].items():
        np.testing.assert_allclose(grads["invert"][name], grad, rtol=1e-8, atol=1e-10, err_msg=name)


def test_save_and_load(tmp_path: object) -> None:
    model = small(4)
    x = images(6)
    save_model(model, tmp_path / "run", {"image_shape": [1, 4, 4], "levels": 4})
    loaded = load_image_model(tmp_path / "run")
    assert loaded.evaluate(x) == model.evaluate(x)
    np.testing.assert_array_equal(loaded.sample(3, np.random.default_rng(0)), model.sample(3, np.random.default_rng(0)))
    spec = json.loads((tmp_path / "run" / "model.json").read_text())["flow"]["flows"][-1]["flows"][0]
    assert spec == {"kind": "conv_affine_coupling", "shape": [1, 4, 4], "mask": "checkerboard", "parity": 0,
                    "features": 3, "blocks": 1, "kernel_size": 3, "momentum": 0.1}  # fmt: skip


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("mask", "stripes", "unknown 'stripes'"), ("kernel_size", 4, "kernel_size must be odd"),
     ("blocks", 10**6, "above the largest"), ("features", 10**6, "more than the weights file can hold"),
     ("parity", 2, "above the largest"), ("shape", [1, 4], "three positive integers")],
)  # fmt: skip
def test_the_loader_refuses_bad_conv_specs(tmp_path: object, key: str, value: object, message: str) -> None:
    save_model(small(5), tmp_path)
    config = json.loads((tmp_path / "model.json").read_text())
    config["flow"]["flows"][-1]["flows"][0][key] = value
    (tmp_path / "model.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=message):
        load_model(tmp_path)


def test_the_cli_trains_the_conv_model(tmp_path: object, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    """``nflow train --net resnet``: the recipe of ``realnvp_resnet`` with the typed sizes, written to
    runs/digits-realnvp_resnet; eval reads it back; a missing folder of that name suggests the command."""
    from nflow_np.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["train", "--data", "digits", "--model", "realnvp", "--net", "resnet", "--channels", "4", "--blocks", "1"]
    assert main([*argv, "--epochs", "1", "--time-limit", "600", "--no-progress"]) == 0
    assert "digits / realnvp_resnet: test NLL" in capsys.readouterr().out
    out = tmp_path / "runs" / "digits-realnvp_resnet"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["channels"] == 4 and summary["settings"]["blocks"] == 1
    assert summary["settings"]["epochs"] == 1 and summary["settings"]["time_limit"] == 600
    assert "hidden" not in summary["settings"]
    config = json.loads((out / "model.json").read_text())
    assert config["metadata"]["model"] == "realnvp_resnet"
    assert {"features": 4, "blocks": 1}.items() <= config["flow"]["flows"][-1]["flows"][0].items()
    assert main(["eval", str(out)]) == 0
    assert f"test NLL {summary['test_nll']:.2f} nats per image" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "runs" / "mnist-realnvp_resnet")]) == 2
    assert "nflow train --data mnist --model realnvp --net resnet" in capsys.readouterr().err


# -- the strict fake device -------------------------------------------------------------------------------------
def test_the_conv_model_trains_on_the_device(fake_backend: object) -> None:  # noqa: F811
    """Conv2d (im2col, GEMM, col2im), weight norm, the nets' batch norms, masks, squeeze and factor-out."""
    x = images(64)
    rows = x.reshape(64, -1)
    host = small(6)
    want = fit(host, rows[:48], rows[48:], optimizer=Adam(host), epochs=2, batch_size=16, progress=False).history
    model = small(6).to_device()
    optimizer = Adam(model)
    got = fit(model, rows[:48], rows[48:], optimizer=optimizer, epochs=2, batch_size=16, progress=False).history
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose([a["train_nll"], a["val_nll"]], [b["train_nll"], b["val_nll"]], rtol=1e-10)
    assert_on_device(model, optimizer)
    assert model.evaluate(x[:8]) == pytest.approx(host.evaluate(x[:8]), rel=1e-10)
    np.testing.assert_array_equal(model.sample(3, np.random.default_rng(0)), host.sample(3, np.random.default_rng(0)))
    np.testing.assert_array_equal(model.decode(model.encode(x[:4])), host.decode(host.encode(x[:4])))
    assert isinstance(model.log_prob(fake_device.asarray(rows[:4])), fake_device.ndarray)


def test_a_device_step_never_goes_through_the_host(fake_backend: object) -> None:  # noqa: F811
    model = small(7).to_device()
    optimizer = Adam(model)
    before = dict(fake_device.transfers)
    model.zero_grad()
    model.nll_and_backward(images(16).reshape(16, -1))
    optimizer.step()
    assert fake_device.transfers["to_host"] == before["to_host"]
    assert_on_device(model, optimizer)
