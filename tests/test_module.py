"""Module state: buffers (saved, moved, never optimized) and frozen parameters (skipped by optimizers)."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nflow_np.checkpoint import latest_checkpoint
from nflow_np.distributions import StandardNormal
from nflow_np.flows.base import Sequential
from nflow_np.flows.coupling import AffineCoupling
from nflow_np.flows.normalization import BatchNorm
from nflow_np.io import load_model
from nflow_np.model import FlowModel
from nflow_np.module import Module
from nflow_np.optim import SGD, Adam, RMSprop, clip_grad_norm, global_grad_norm
from nflow_np.train import fit

FIXTURE = Path(__file__).parent / "fixtures" / "batch_norm_main"
"""A model folder and checkpoints written by main at cb74fc5, where running averages were parameters (make.py)."""


def coupling_and_batch_norm(dtype: object = np.float64) -> FlowModel:
    rng = np.random.default_rng(0)
    flows = [AffineCoupling(2, parity=0, hidden=(4,), rng=rng, dtype=dtype), BatchNorm(2, momentum=0.5, dtype=dtype)]
    return FlowModel(Sequential(flows), StandardNormal())


def test_running_averages_are_buffers_saved_under_their_old_names() -> None:
    model = coupling_and_batch_norm()
    names = [name for name, _, _ in model.named_parameters()]
    assert "flow.1.running_mean" not in names and "flow.1.log_gamma" in names
    assert [name for name, _ in model.named_buffers()] == ["flow.1.running_mean", "flow.1.running_var"]
    assert list(model.state_dict())[-4:] == ["flow.1.log_gamma", "flow.1.beta", "flow.1.running_mean",
                                            "flow.1.running_var"]
    assert model.num_parameters() == sum(value.size for _, value, _ in model.named_parameters())


@pytest.mark.parametrize("make", [
    lambda m: Adam(m, lr=0.1, weight_decay=0.5),
    lambda m: SGD(m, lr=0.1, weight_decay=0.5),
    lambda m: RMSprop(m, lr=0.1, weight_decay=0.5),
])
def test_weight_decay_never_touches_the_running_averages(make) -> None:
    """The bug of main at cb74fc5: AdamW's decoupled decay multiplied the running averages by 1 − ηλ every step.

    Written with ``state_dict`` alone, so that it runs (and fails) on that commit too.
    """
    model = coupling_and_batch_norm()
    stats = {"flow.1.running_mean": np.array([1.0, -2.0]), "flow.1.running_var": np.array([3.0, 0.5])}
    model.load_state_dict(model.state_dict() | stats)
    optimizer = make(model)
    for _ in range(3):
        model.zero_grad()
        model.nll_and_backward(np.random.default_rng(1).normal(size=(16, 2)))  # evaluation mode: stats fixed
        optimizer.step()
    for name, value in stats.items():
        np.testing.assert_array_equal(model.state_dict()[name], value, err_msg=name)


def test_buffers_follow_astype_and_load_state_dict() -> None:
    model = coupling_and_batch_norm().astype(np.float32)
    assert all(value.dtype == np.float32 for _, value in model.named_buffers())
    other = coupling_and_batch_norm(np.float32)
    state = model.state_dict() | {"flow.1.running_var": np.array([4.0, 5.0], dtype=np.float32)}
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.flow[1].buffers["running_var"], [4.0, 5.0])
    with pytest.raises(ValueError, match="missing.*running_mean"):
        other.load_state_dict({k: v for k, v in state.items() if k != "flow.1.running_mean"})
    with pytest.raises(ValueError, match="already a parameter"):
        other.flow[1].register_buffer("beta", np.zeros(2))


def test_a_model_file_of_main_loads_its_running_averages_into_buffers() -> None:
    model = load_model(FIXTURE / "model")
    stored = np.load(FIXTURE / "model" / "model.npz")
    for name in ("flow.1.running_mean", "flow.1.running_var"):
        np.testing.assert_array_equal(dict(model.named_buffers())[name], stored[name])
    assert model.flow[1].params.keys() == {"log_gamma", "beta"}


def test_a_checkpoint_of_main_loads_and_resumes(tmp_path: Path) -> None:
    """Its Adam moments for the running averages are dropped; the run continues from where it was."""
    checkpoint, skipped = latest_checkpoint(FIXTURE / "checkpoints")
    assert not skipped and checkpoint.state.finished
    assert not any("running" in key for key in checkpoint.optimizer_state)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for path in (FIXTURE / "checkpoints").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    model = coupling_and_batch_norm()
    x = np.load(FIXTURE / "x.npy")
    result = fit(model, x, None, optimizer=Adam(model, lr=1e-2, weight_decay=0.1), epochs=3, batch_size=16,
                 patience=None, progress=False, checkpoint_dir=folder, checkpoint_every=3, seed=1, resume=True,
                 lr_schedule="constant")  # the fixture's run (fit's default then)
    assert result.resumed_from is not None and result.steps == 12 and len(result.history) == 3


# -- frozen parameters -----------------------------------------------------------------------------------------
def two_parameter_module(a: np.ndarray, b: np.ndarray) -> Module:
    inner = Module()
    inner.add_param("b", b.copy())
    module = Module()
    module.add_param("a", a.copy())
    module.children["inner"] = inner
    return module


vectors = st.lists(st.floats(-3, 3), min_size=1, max_size=5).map(np.array)


@given(a=vectors, b=vectors, which=st.sampled_from(["a", "inner.b", "inner.*"]),
       kind=st.sampled_from(["adam", "sgd", "rmsprop"]))
@settings(max_examples=30, deadline=None)
def test_optimizers_skip_frozen_parameters_and_update_the_rest(a, b, which, kind) -> None:
    module = two_parameter_module(a, b)
    assert module.freeze(which) == (["a"] if which == "a" else ["inner.b"])
    optimizer = {"adam": Adam, "sgd": SGD, "rmsprop": RMSprop}[kind](module, lr=0.1, weight_decay=0.3)
    for _, _, grad in module.named_parameters():
        grad[...] = 1.0
    optimizer.step()
    frozen, trained = ("a", "inner.b") if which == "a" else ("inner.b", "a")
    values = {name: value for name, value, _ in module.named_parameters()}
    np.testing.assert_array_equal(values[frozen], a if frozen == "a" else b)
    assert not np.array_equal(values[trained], a if trained == "a" else b)
    assert module.is_frozen(frozen) and not module.is_frozen(trained)
    assert [name for name, _, _ in module.trainable_parameters()] == [trained]


def test_clipping_and_the_norm_leave_frozen_gradients_out() -> None:
    module = two_parameter_module(np.zeros(1), np.zeros(1))
    module.grads["a"][...] = 3.0
    module.children["inner"].grads["b"][...] = 4.0
    assert global_grad_norm(module) == pytest.approx(5.0)
    module.freeze("inner.b")
    assert global_grad_norm(module) == pytest.approx(3.0)
    clip_grad_norm(module, 1.0)
    assert module.grads["a"][0] == pytest.approx(1.0) and module.children["inner"].grads["b"][0] == 4.0


def test_freeze_and_unfreeze_everything_and_refuse_unknown_names() -> None:
    module = two_parameter_module(np.zeros(1), np.zeros(2))
    assert module.freeze() == ["a", "inner.b"]
    assert list(module.trainable_parameters()) == []
    assert module.unfreeze("inner.b") == ["inner.b"] and not module.is_frozen("inner.b")
    with pytest.raises(ValueError, match=r"no parameter matches \['nope\*'\]"):
        module.freeze("nope*")
    with pytest.raises(KeyError, match="no parameter named"):
        module.is_frozen("inner.c")
