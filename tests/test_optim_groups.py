"""Parameter groups (own lr / weight decay, schedules through lr_scale) and RMSprop against its formula."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nflow_np import backend
from nflow_np.architectures import build_model
from nflow_np.checkpoint import list_checkpoints, load_checkpoint, optimizer_config
from nflow_np.data import load_toy
from nflow_np.module import Module
from nflow_np.optim import SGD, Adam, RMSprop
from nflow_np.targets import TARGETS
from nflow_np.train import evaluate_nll, fit
from nflow_np.vi import estimate_kl, fit_vi, make_vi_flow

vectors = st.lists(st.floats(-3, 3), min_size=1, max_size=5).map(np.array)


def two_parameters(a: np.ndarray, b: np.ndarray) -> Module:
    inner = Module()
    inner.add_param("b", b.copy())
    module = Module()
    module.add_param("a", a.copy())
    module.children["inner"] = inner
    return module


def set_grads(module: Module, rng: np.random.Generator) -> dict[str, np.ndarray]:
    grads = {}
    for name, _, grad in module.named_parameters():
        grad[...] = rng.normal(size=grad.shape)
        grads[name] = grad.copy()
    return grads


# -- RMSprop -----------------------------------------------------------------------------------------------------
@given(values=vectors, lr=st.floats(1e-4, 0.5), alpha=st.floats(0.5, 0.999), momentum=st.sampled_from([0.0, 0.9]),
       weight_decay=st.sampled_from([0.0, 0.05]), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_rmsprop_matches_a_transcription_of_the_formula(values, lr, alpha, momentum, weight_decay, seed):
    rng = np.random.default_rng(seed)
    module = Module()
    module.add_param("theta", values.copy())
    optimizer = RMSprop(module, lr=lr, alpha=alpha, eps=1e-7, momentum=momentum, weight_decay=weight_decay)
    theta, s, b = values.copy(), np.zeros_like(values), np.zeros_like(values)
    for _ in range(4):
        g = rng.normal(size=theta.shape)
        module.grads["theta"][...] = g
        optimizer.step()
        g = g + weight_decay * theta                      # L2 weight decay
        s = alpha * s + (1 - alpha) * g**2                # running mean of g²
        b = momentum * b + g / (np.sqrt(s) + 1e-7)        # momentum on the rescaled gradient
        theta = theta - lr * b
        np.testing.assert_allclose(module.params["theta"], theta, rtol=1e-12, atol=1e-14)


def test_rmsprop_solves_an_ill_conditioned_quadratic():
    """``½ Σ cᵢ θᵢ²`` with curvatures over four decades: RMSprop's per-coordinate scaling moves every coordinate."""
    c = np.array([1e-2, 1e-1, 1.0, 1e1, 1e2])
    module = Module()
    module.add_param("theta", np.ones(5))
    optimizer = RMSprop(module, lr=1e-2, momentum=0.9)
    for _ in range(2000):
        module.grads["theta"][...] = c * module.params["theta"]
        optimizer.step()
    assert np.abs(module.params["theta"]).max() < 1e-2


def test_rmsprop_trains_a_flow_and_checkpoints_resume_it(tmp_path: Path):
    data = load_toy("two_moons", n_train=512, n_val=256, n_test=256, seed=1)
    model = build_model("realnvp", 2, layers=2, hidden=(16,), seed=0)
    before = evaluate_nll(model, data.val)
    common = dict(batch_size=64, patience=None, progress=False, checkpoint_dir=tmp_path, seed=2)
    fit(model, data.train, data.val, optimizer=RMSprop(model, lr=3e-3, momentum=0.5), epochs=3, **common)
    assert evaluate_nll(model, data.val) < before - 0.1
    checkpoint = load_checkpoint(list_checkpoints(tmp_path)[0])
    assert checkpoint.optimizer == {"kind": "rmsprop", "lr": 3e-3, "alpha": 0.99, "eps": 1e-8, "momentum": 0.5,
                                    "weight_decay": 0.0}
    resumed = build_model("realnvp", 2, layers=2, hidden=(16,), seed=0)
    result = fit(resumed, data.train, data.val, optimizer=RMSprop(resumed, lr=3e-3, momentum=0.5), epochs=4,
                 resume=True, **common)
    assert result.steps == 4 * 8 and len(result.history) == 4


def test_rmsprop_drives_variational_inference():
    flow = make_vi_flow("planar", 2, 4, rng=0)
    target = TARGETS["U1"]
    before = estimate_kl(flow, target, samples=2000).free_energy
    fit_vi(flow, target, steps=300, batch_size=100, optimizer=RMSprop(flow, lr=1e-2, momentum=0.9), anneal_steps=100)
    assert estimate_kl(flow, target, samples=2000).free_energy < before - 0.5


def test_rmsprop_refuses_bad_settings():
    module = two_parameters(np.zeros(1), np.zeros(1))
    for bad in ({"alpha": 1.0}, {"eps": 0.0}, {"momentum": -0.1}, {"lr": 0.0}, {"weight_decay": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad)).replace("lr", "learning rate")):
            RMSprop(module, **bad)


# -- parameter groups --------------------------------------------------------------------------------------------
@given(a=vectors, b=vectors, lr_b=st.floats(1e-4, 1.0), decay_b=st.floats(0, 0.5), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["adam", "sgd", "rmsprop"]))
@settings(max_examples=40, deadline=None)
def test_a_group_is_the_optimizer_it_would_be_on_its_own(a, b, lr_b, decay_b, seed, kind):
    """One optimizer with a group for ``inner.*`` = two optimizers, one per parameter, with each one's settings."""
    make = {"adam": Adam, "sgd": SGD, "rmsprop": RMSprop}[kind]
    grouped = two_parameters(a, b)
    optimizer = make(grouped, lr=0.01, weight_decay=0.1, groups=[{"params": "inner.*", "lr": lr_b,
                                                                  "weight_decay": decay_b}])
    alone_a, alone_b = two_parameters(a, b), two_parameters(a, b)
    alone_a.freeze("inner.b")
    alone_b.freeze("a")
    separate = [make(alone_a, lr=0.01, weight_decay=0.1), make(alone_b, lr=lr_b, weight_decay=decay_b)]
    for step in range(3):
        rng = np.random.default_rng(seed + step)
        grads = set_grads(grouped, rng)
        for module, separate_optimizer in zip((alone_a, alone_b), separate, strict=True):
            for name, _, grad in module.named_parameters():
                grad[...] = grads[name]
            separate_optimizer.step()
        optimizer.step()
    np.testing.assert_array_equal(grouped.params["a"], alone_a.params["a"])
    np.testing.assert_array_equal(grouped.children["inner"].params["b"], alone_b.children["inner"].params["b"])


def test_lr_scale_multiplies_every_group():
    module = two_parameters(np.zeros(2), np.zeros(3))
    optimizer = SGD(module, lr=0.5, momentum=0.0, groups=[{"params": ["inner.b"], "lr": 0.125}])
    for _, _, grad in module.named_parameters():
        grad[...] = 1.0
    optimizer.lr_scale = 0.5
    optimizer.step()
    np.testing.assert_array_equal(module.params["a"], -0.25)
    np.testing.assert_array_equal(module.children["inner"].params["b"], -0.0625)
    assert optimizer.lr == 0.5 and optimizer.groups[1]["lr"] == 0.125


def test_fit_schedules_every_group_and_restores_the_rates():
    data = load_toy("two_moons", n_train=256, n_val=128, n_test=128, seed=1)
    model = build_model("realnvp", 2, layers=2, hidden=(8,), seed=0)
    optimizer = Adam(model, lr=1e-3, groups=[{"params": "flow.1.*", "lr": 1e-4}])
    scales = []
    fit(model, data.train, data.val, optimizer=optimizer, epochs=4, batch_size=64, lr_schedule="cosine",
        progress=False, on_epoch_end=lambda epoch, record: scales.append(optimizer.lr_scale))
    assert scales == sorted(scales, reverse=True) and scales[0] < 1 and scales[-1] < 0.2
    assert (optimizer.lr, optimizer.groups[1]["lr"], optimizer.lr_scale) == (1e-3, 1e-4, 1.0)


def test_the_fused_adam_kernel_is_still_asked_for_with_groups(monkeypatch):
    asked, real = [], backend.fused
    monkeypatch.setattr(backend, "fused", lambda name, reference: asked.append(name) or real(name, reference))
    model = build_model("realnvp", 2, layers=2, hidden=(8,), seed=0)
    model.freeze("flow.0.*")
    optimizer = Adam(model, lr=1e-3, groups=[{"params": "flow.1.net.*", "lr": 1e-4}])
    optimizer.step()
    assert asked.count("adam_update") == sum(1 for _ in model.trainable_parameters())


def test_groups_are_checked_and_recorded_in_checkpoints():
    module = two_parameters(np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match=r"group 1: no parameter matches \['c\*'\]"):
        Adam(module, groups=[{"params": "c*"}])
    with pytest.raises(ValueError, match="'inner.b' is in groups 1 and 2"):
        Adam(module, groups=[{"params": "inner.*"}, {"params": "*.b"}])
    with pytest.raises(ValueError, match="group 1 must have 'params'"):
        Adam(module, groups=[{"params": "a", "momentum": 0.5}])
    with pytest.raises(ValueError, match="learning rate must be positive"):
        Adam(module, groups=[{"params": "a", "lr": -1.0}])
    model = build_model("realnvp", 2, layers=2, hidden=(8,), seed=0)
    grouped = Adam(model, lr=1e-3, groups=[{"params": "flow.1.*", "weight_decay": 0.01}])
    assert optimizer_config(grouped, 1e-3)["groups"] == [{"params": ["flow.1.*"], "lr": 1e-3, "weight_decay": 0.01}]
    assert "groups" not in optimizer_config(Adam(model, lr=1e-3), 1e-3)  # as in checkpoints written before groups


def test_a_resume_with_other_groups_is_refused(tmp_path: Path):
    data = load_toy("two_moons", n_train=256, n_val=128, n_test=128, seed=1)

    def run(group_lr: float, **extra):
        model = build_model("realnvp", 2, layers=2, hidden=(8,), seed=0)
        optimizer = Adam(model, lr=1e-3, groups=[{"params": "flow.1.*", "lr": group_lr}])
        return fit(model, data.train, data.val, optimizer=optimizer, batch_size=64, progress=False,
                   checkpoint_dir=tmp_path, **extra)

    run(1e-4, epochs=2)
    assert run(1e-4, resume=True, epochs=3).steps == 3 * 4
    with pytest.raises(ValueError, match="cannot resume .* its optimizer is"):
        run(2e-4, resume=True, epochs=4)


class _Part:
    """A :attr:`~nflow_np.optim.Optimizer.partition`: the columns ``[start, stop)`` of the flattened parameters."""

    def __init__(self, module: Module, start: int, stop: int) -> None:
        self.slices, self.calls, offset = {}, 0, 0
        for name, value, _ in module.named_parameters():
            low, high = max(start, offset), min(stop, offset + value.size)
            if low < high:
                self.slices[name] = slice(low - offset, high - offset)
            offset += value.size

    def done(self) -> None:
        self.calls += 1


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["sgd", "adam", "rmsprop"]),
    dtype=st.sampled_from([np.float32, np.float64]),
    cuts=st.lists(st.floats(0, 1), min_size=0, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_an_update_divided_into_column_ranges_is_the_whole_update_bit_for_bit(kind, dtype, cuts, seed):
    """The divided (ZeRO 1) step of ``nflow_np.distributed_reduce``: each part updates its columns only, and
    together the parts give the bits of the whole step, with groups, weight decay and a frozen parameter."""
    whole, divided = (build_model("realnvp", 3, layers=2, hidden=(5,), seed=1, dtype=dtype) for _ in range(2))
    groups = [{"params": "flow.1.*", "lr": 3e-2, "weight_decay": 0.1}]
    make = {"sgd": lambda m: SGD(m, lr=1e-2, momentum=0.5, weight_decay=1e-3, groups=groups),
            "adam": lambda m: Adam(m, lr=1e-2, weight_decay=1e-3, groups=groups),
            "rmsprop": lambda m: RMSprop(m, lr=1e-2, momentum=0.5, groups=groups)}[kind]
    for model in (whole, divided):
        model.freeze("flow.0.net.0.W")
    optimizers = [make(whole), make(divided)]
    total = whole.num_parameters()
    bounds = [0, *sorted(int(c * total) for c in cuts), total]
    rng = np.random.default_rng(seed)
    for _ in range(3):
        for _, _, grad in whole.named_parameters():
            grad[...] = rng.standard_normal(grad.shape)
        for (_, _, mine), (_, _, theirs) in zip(divided.named_parameters(), whole.named_parameters(), strict=True):
            mine[...] = theirs
        optimizers[0].step()
        steps = optimizers[1].step_count
        for start, stop in zip(bounds, bounds[1:], strict=False):  # one rank after the other, each at the same step
            optimizers[1].step_count, optimizers[1].partition = steps, _Part(divided, start, stop)
            optimizers[1].step()
            assert optimizers[1].partition.calls == 1
        optimizers[1].partition = None
    for (name, want, _), (_, got, _) in zip(whole.named_parameters(), divided.named_parameters(), strict=True):
        np.testing.assert_array_equal(got, want, err_msg=name, strict=True)
    for key, value in optimizers[0].state_dict().items():
        np.testing.assert_array_equal(optimizers[1].state_dict()[key], value, err_msg=key, strict=True)
