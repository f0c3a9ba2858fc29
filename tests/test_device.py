"""The array-module seam, proven on a fake device (``tests/fake_device.py``) without a GPU.

The ``fake_backend`` fixture registers a backend whose laws are the NumPy reference and whose array
module is ``fake_device``: arrays that refuse, as CuPy's do, to be converted to NumPy implicitly or to
meet a NumPy array. A model moved there with ``to_device()`` must train, sample, encode, decode, save
and load exactly as on the host, and every array it keeps must stay a device array.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext

import fake_device
import numpy as np
import pytest
from image_cases import small_realnvp

from nflow_np import backend, gemm
from nflow_np.architectures import build_model
from nflow_np.checkpoint import latest_checkpoint
from nflow_np.data.toy2d import make_two_moons
from nflow_np.flows import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    BatchNorm,
    Inverse,
    Permutation,
    Planar,
    Radial,
    Rescale,
    Reverse,
    Sequential,
    Standardize,
)
from nflow_np.flows.coupling_law import COUPLING_LAWS
from nflow_np.flows.normalization import recalibrate
from nflow_np.image_models import build_nice
from nflow_np.io import load_model, save_model
from nflow_np.model import FlowModel
from nflow_np.optim import SGD, Adam
from nflow_np.train import fit

Device = fake_device.ndarray


@pytest.fixture
def fake_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """The backend ``"fake-device"`` (reference laws on ``fake_device`` arrays), active for the test."""
    for registry in ("_loaded", "_ARRAY_MODULE_NAMES", "_DEVICE_MODULES"):
        monkeypatch.setattr(backend, registry, dict(getattr(backend, registry)))
    backend.register_backend("fake-device", COUPLING_LAWS, fake_device)
    # the fake device's products are NumPy's own (``a @ b`` on wrapped host arrays), so the host runs these tests
    # compare against bit for bit compute theirs with NumPy's OpenBLAS too, whatever engine "auto" chose
    host_engine = gemm.using_engine("openblas") if "openblas" in gemm.available_engines() else nullcontext()
    with backend.using("fake-device"), host_engine:
        yield fake_device


@pytest.fixture(scope="module")
def moons() -> np.ndarray:
    return make_two_moons(640, np.random.default_rng(0))


def assert_on_device(model: FlowModel, optimizer: Adam | None = None) -> None:
    """Every parameter, gradient, optimizer buffer and cached activation of ``model`` is a device array."""
    for name, param, grad in model.named_parameters():
        assert isinstance(param, Device) and isinstance(grad, Device), name
    if optimizer is not None:
        for buffer, arrays in optimizer.state.items():
            assert all(isinstance(value, Device) for value in arrays.values()), buffer
    cached = model.cached_arrays()
    assert all(isinstance(array, Device) for array in cached), [type(a).__name__ for a in cached]


# -- the fake is as strict as CuPy --------------------------------------------------------------------
def test_the_fake_device_refuses_what_cupy_refuses(fake_backend: object) -> None:
    a = fake_device.asarray(np.ones((2, 3)))
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    with pytest.raises(TypeError, match="host numpy.ndarray met"):
        a + np.ones((2, 3))
    with pytest.raises(TypeError, match="host numpy.ndarray met"):
        a[...] = np.zeros((2, 3))
    with pytest.raises(TypeError, match="host numpy.ndarray met"):
        np.einsum("nd,nd->n", a, np.ones((2, 3)))
    assert isinstance(np.exp(a).sum(), Device) and float(a.sum()) == 6.0
    assert isinstance(np.zeros_like(a, shape=2), Device) and isinstance(a[:, np.array([0, 2])], Device)


def test_array_module(fake_backend: object) -> None:
    assert backend.array_module() is fake_device
    assert backend.array_module(fake_device.zeros(3)) is fake_device
    assert backend.array_module(np.zeros(3)) is np and backend.array_module([1.0]) is np
    assert backend.is_array(fake_device.zeros(3)) and not backend.is_array([1.0])
    backend.set_backend("numpy")
    assert backend.array_module() is np
    assert backend.array_module(fake_device.zeros(3)) is fake_device  # an array's module, whatever is active


# -- training -------------------------------------------------------------------------------------------
def _fit(model: FlowModel, data: np.ndarray, **kwargs: object) -> tuple[np.ndarray, Adam]:
    optimizer = Adam(model, lr=3e-3)
    result = fit(model, data[:512], data[512:], optimizer=optimizer, epochs=2, batch_size=64, progress=False, **kwargs)
    return np.array([[h["train_nll"], h["val_nll"]] for h in result.history]), optimizer


@pytest.mark.parametrize("kind", ["realnvp", "nice"])
def test_training_on_the_device_matches_the_host(fake_backend: object, moons: np.ndarray, kind: str) -> None:
    host = build_model(kind, 2, layers=4, hidden=(16, 16), seed=0)
    want, _ = _fit(host, moons)
    model = build_model(kind, 2, layers=4, hidden=(16, 16), seed=0).to_device()
    got, optimizer = _fit(model, moons)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert_on_device(model, optimizer)
    for name, value in model.state_dict().items():
        assert type(value) is np.ndarray
        np.testing.assert_allclose(value, host.state_dict()[name], rtol=1e-12, atol=1e-14, err_msg=name)


def test_a_training_step_never_goes_through_the_host(fake_backend: object, moons: np.ndarray) -> None:
    model = build_model("realnvp", 2, layers=3, hidden=(8,), seed=0).to_device()
    optimizer = Adam(model)
    batch = moons[:64]
    before = dict(fake_device.transfers)
    model.zero_grad()
    loss = model.nll_and_backward(batch)
    optimizer.step()
    assert isinstance(loss, float)
    assert fake_device.transfers["to_host"] == before["to_host"]  # only the loss scalar comes back
    assert fake_device.transfers["to_device"] == before["to_device"] + 1  # the batch, once
    assert_on_device(model, optimizer)


def test_an_optimizer_built_before_the_move_is_refused(fake_backend: object, moons: np.ndarray) -> None:
    model = build_model("realnvp", 2, layers=2, hidden=(8,), seed=0)
    optimizer = Adam(model)
    model.to_device()
    with pytest.raises(ValueError, match="build the optimizer after moving the model"):
        fit(model, moons, optimizer=optimizer, epochs=1, progress=False)


@pytest.mark.parametrize("kind", ["realnvp", "nice"])
def test_image_models_train_on_the_device(fake_backend: object, kind: str) -> None:
    """Dequantisation noise, logit, checkerboard couplings, squeeze, factor-out and batch norm on the device."""

    def build() -> FlowModel:
        if kind == "realnvp":
            return small_realnvp(np.random.default_rng(1))
        return build_nice((1, 4, 4), 4, hidden=(8,), partition="checkerboard", dtype=np.float64)

    images = np.random.default_rng(3).integers(0, 4, size=(96, 1, 4, 4)).astype(np.float64)
    rows = images.reshape(96, -1)
    host = build()
    want = fit(host, rows[:64], rows[64:], optimizer=Adam(host), epochs=2, batch_size=16, progress=False).history
    model = build().to_device()
    optimizer = Adam(model)
    got = fit(model, rows[:64], rows[64:], optimizer=optimizer, epochs=2, batch_size=16, progress=False).history
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose([a["train_nll"], a["val_nll"]], [b["train_nll"], b["val_nll"]], rtol=1e-10)
    assert_on_device(model, optimizer)
    assert model.evaluate(images[:8]) == pytest.approx(host.evaluate(images[:8]), rel=1e-10)
    np.testing.assert_array_equal(model.sample(3, np.random.default_rng(0)), host.sample(3, np.random.default_rng(0)))
    decoded = model.decode(model.encode(images[:4]))
    assert type(decoded) is np.ndarray
    np.testing.assert_array_equal(decoded, host.decode(host.encode(images[:4])))


def _every_layer() -> FlowModel:
    rng = np.random.default_rng(0)
    flows = [
        Standardize([0.5, 0.25], [0.9, 0.5]),
        ActNorm(2),
        AffineCoupling(2, parity=0, hidden=(8,), rng=rng),
        Permutation.random(2, rng),
        Inverse(AdditiveCoupling(2, parity=1, hidden=(8,), rng=rng)),
        BatchNorm(2),
        Rescale(2),
        Reverse(2),
        Inverse(Sequential([Planar(2, rng=rng), Radial(2, rng=rng)])),
    ]
    return FlowModel(Sequential(flows))


def test_every_layer_and_training_option_on_the_device(fake_backend: object, moons: np.ndarray) -> None:
    """Standardize, ActNorm, permutations, Inverse, batch norm, planar and radial flows; SGD, clipping, a cosine
    schedule, ``memory="invert"`` with a measured anchor interval, batch-norm recalibration."""
    histories = {}
    for name in ("numpy", "fake-device"):
        backend.set_backend(name)
        model = _every_layer().to_device()
        optimizer = SGD(model, lr=1e-2)
        options = dict(optimizer=optimizer, batch_size=64, progress=False)
        first = fit(model, moons[:384], moons[384:], epochs=2, clip_norm=1.0, lr_schedule="cosine", **options)
        model.set_memory("invert", tolerance=1e-6)
        second = fit(model, moons[:384], moons[384:], epochs=1, **options)
        recalibrate(model.flow, model.log_prob, moons[:100])
        histories[name] = [h["val_nll"] for h in first.history + second.history] + list(model.log_prob(moons[:5]))
    assert_on_device(model, optimizer)
    np.testing.assert_allclose(histories["fake-device"], histories["numpy"], rtol=1e-12)


# -- inference ------------------------------------------------------------------------------------------
def test_inference_on_the_device_matches_the_host(fake_backend: object, moons: np.ndarray) -> None:
    host = build_model("realnvp", 2, layers=4, hidden=(16,), seed=0)
    fit(host, moons[:256], epochs=1, batch_size=64, progress=False)
    model = build_model("realnvp", 2, layers=4, hidden=(16,), seed=0).to_device()
    model.load_state_dict(host.state_dict())
    x = moons[:50]
    for method in ("log_prob", "encode"):
        got = getattr(model, method)(x)
        assert type(got) is np.ndarray  # host in, host out
        np.testing.assert_allclose(got, getattr(host, method)(x), rtol=1e-12, err_msg=method)
    on_device = model.log_prob(fake_device.asarray(x))
    assert isinstance(on_device, Device)  # device in, device out
    np.testing.assert_allclose(on_device.get(), host.log_prob(x), rtol=1e-12)
    z = host.encode(x)
    np.testing.assert_allclose(model.decode(z), host.decode(z), rtol=1e-12, atol=1e-12)
    assert model.nll(x) == pytest.approx(host.nll(x), rel=1e-12)
    # a NumPy generator draws on the host: the same samples as the host model's, returned on the host
    got = model.sample(20, np.random.default_rng(5), temperature=0.8)
    assert type(got) is np.ndarray
    np.testing.assert_allclose(got, host.sample(20, np.random.default_rng(5), temperature=0.8), rtol=1e-12)
    assert isinstance(model.sample(20), Device)  # default: the device's own generator
    assert isinstance(model.sample(20, fake_device.random.default_rng(0)), Device)


def test_flows_refuse_arrays_of_the_other_device(fake_backend: object, moons: np.ndarray) -> None:
    model = build_model("realnvp", 2, layers=2, hidden=(8,), seed=0).to_device()
    with pytest.raises(TypeError, match=r"a host array, but the parameters are on the device \(fake_device\)"):
        model.flow.forward(moons[:4])
    model.to_host()
    with pytest.raises(TypeError, match=r"parameters are on the host.*\.to_device\(\)"):
        model.log_prob(fake_device.asarray(moons[:4]))
    with pytest.raises(TypeError, match="x must be a numpy.ndarray, got list"):
        model.log_prob([[0.0, 1.0]])
    model.to_device()
    with pytest.raises(TypeError, match="expected float32 or float64"):
        model.log_prob(np.zeros((3, 2), dtype=np.int64))
    bad = moons[:4].copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"row 2, column 1"):
        model.log_prob(bad)


# -- moving and saving ---------------------------------------------------------------------------------------
def test_moving_round_trips_and_state_dict_is_host(fake_backend: object) -> None:
    model = build_model("nice", 3, layers=2, hidden=(8,), seed=0)
    state = model.state_dict()
    assert model.to_device() is model and model.array_module is fake_device
    assert all(type(value) is np.ndarray for value in model.state_dict().values())
    model.load_state_dict({name: value * 2 for name, value in state.items()})
    assert_on_device(model)
    model.to_host()
    assert model.array_module is np
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, 2 * state[name])


def test_a_model_of_standardised_rows_wrapped_on_the_device_works_in_the_raw_units(fake_backend: object,
                                                                                   moons: np.ndarray) -> None:
    """``with_standardization`` of a device model puts its Standardize layer on the device too (what a data-file
    run does before it saves and scores)."""
    from nflow_np.model import with_standardization

    host = build_model("realnvp", 2, layers=2, hidden=(8,), seed=0)
    model = build_model("realnvp", 2, layers=2, hidden=(8,), seed=0).to_device()
    mean, std = np.array([10.0, -3.0]), np.array([4.0, 0.25])
    wrapped, wrapped_host = with_standardization(model, mean, std), with_standardization(host, mean, std)
    assert all(isinstance(value, Device) for _, value in wrapped.named_buffers())
    x = mean + std * moons[:30]
    np.testing.assert_allclose(wrapped.log_prob(x), wrapped_host.log_prob(x), rtol=1e-12)
    np.testing.assert_allclose(wrapped.sample(10, np.random.default_rng(2)),
                               wrapped_host.sample(10, np.random.default_rng(2)), rtol=1e-12)


def test_save_and_load_from_the_device(fake_backend: object, moons: np.ndarray, tmp_path: object) -> None:
    model = build_model("realnvp", 2, layers=2, hidden=(8,), seed=0).to_device()
    fit(model, moons[:256], epochs=1, batch_size=64, progress=False)
    save_model(model, tmp_path / "run")
    loaded = load_model(tmp_path / "run")
    assert loaded.array_module is np
    np.testing.assert_allclose(loaded.log_prob(moons[:20]), model.log_prob(moons[:20]), rtol=1e-12)
    loaded.to_device()
    np.testing.assert_allclose(loaded.log_prob(moons[:20]), model.log_prob(moons[:20]), rtol=1e-12)


def test_checkpoints_resume_on_the_device(fake_backend: object, moons: np.ndarray, tmp_path: object) -> None:
    """A run interrupted after its first checkpoint and resumed on the device is the uninterrupted run."""

    def run(resume: bool = False, stop: int | None = None) -> tuple[FlowModel, list]:
        model = build_model("realnvp", 2, layers=2, hidden=(8,), seed=0).to_device()
        optimizer = Adam(model, lr=5e-3)
        if stop is not None:
            optimizer.step = _stop_after(optimizer.step, stop)
        result = fit(
            model, moons[:256], moons[256:320], optimizer=optimizer, epochs=3, batch_size=64, seed=2,
            progress=False, checkpoint_dir=tmp_path, checkpoint_every=3, resume=resume,
        )  # fmt: skip
        return model, [(h["train_nll"], h["val_nll"]) for h in result.history]

    with pytest.raises(KeyboardInterrupt):
        run(stop=7)  # checkpoints after steps 3 and 6
    assert latest_checkpoint(tmp_path)[0].state.steps == 6
    resumed, history = run(resume=True)
    assert_on_device(resumed)
    host = build_model("realnvp", 2, layers=2, hidden=(8,), seed=0)  # the uninterrupted run, on the host
    result = fit(
        host, moons[:256], moons[256:320], optimizer=Adam(host, lr=5e-3), epochs=3, batch_size=64, seed=2,
        progress=False,
    )  # fmt: skip
    assert history == [(h["train_nll"], h["val_nll"]) for h in result.history]
    for name, value in host.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[name], value, err_msg=name)


def _stop_after(step: object, count: int) -> object:
    """``step`` that raises ``KeyboardInterrupt`` (the process dying) at its ``count``-th call."""
    calls = [0]

    def step_or_stop() -> None:
        calls[0] += 1
        if calls[0] == count:
            raise KeyboardInterrupt
        step()

    return step_or_stop
