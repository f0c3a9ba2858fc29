"""train_step: the one training step; fit's time limit and end-of-epoch hooks; every loop goes through the step."""

import ast
from pathlib import Path

import numpy as np
import pytest

import nflow_np
from nflow_np import image_training, train
from nflow_np.architectures import build_model
from nflow_np.data import load_toy
from nflow_np.optim import SGD, Adam, global_grad_norm
from nflow_np.train import NonFiniteLossError, fit, train_step

ROOT = Path(nflow_np.__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def moons():
    return load_toy("two_moons", n_train=512, n_val=256, n_test=256, seed=3)


def small_model(seed: int = 0):
    return build_model("realnvp", 2, layers=2, hidden=(8,), seed=seed)


def test_train_step_is_zero_grad_backward_step(moons):
    """Against the step written out: same loss, same parameters, and stale gradients do not leak in."""
    model, reference = small_model(), small_model()
    optimizer, reference_optimizer = SGD(model, lr=0.1, momentum=0.0), SGD(reference, lr=0.1, momentum=0.0)
    for _, _, grad in model.named_parameters():
        grad[...] = 1e3  # left over from elsewhere: train_step zeroes it first
    batch = moons.train[:64]
    loss = train_step(model, optimizer, batch)
    reference.zero_grad()
    assert loss == reference.nll_and_backward(batch)
    reference_optimizer.step()
    for (name, value, _), (_, expected, _) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        np.testing.assert_array_equal(value, expected, err_msg=name)


def test_reduce_gradients_runs_between_backward_and_clipping(moons):
    """The seam for a data-parallel all-reduce: it sees the batch's gradients, and clipping sees what it leaves."""
    model = small_model()
    seen = []

    def reduce(module):
        seen.append(global_grad_norm(module))
        for _, _, grad in module.named_parameters():
            grad *= 100.0  # as if summed over 100 workers
    optimizer = SGD(model, lr=1.0, momentum=0.0)
    before = {name: value.copy() for name, value, _ in model.named_parameters()}
    train_step(model, optimizer, moons.train[:64], clip=1e-3, reduce_gradients=reduce)
    assert len(seen) == 1 and seen[0] > 0
    moved = np.sqrt(sum(np.sum((value - before[name]) ** 2) for name, value, _ in model.named_parameters()))
    assert moved == pytest.approx(1e-3)  # the clipped global norm times lr = 1


def test_the_whole_step_runs_in_one_compute_block(moons, monkeypatch):
    """Backward, the gradient norm and the update share one thread plan and flush mode: no call between them
    runs outside library compute, where an idle BLAS pool at its default count would wake and spin."""
    plans = []
    norm = train.global_grad_norm

    def watched_norm(module):
        plans.append(nflow_np.threads._state.plan)
        return norm(module)

    monkeypatch.setattr(train, "global_grad_norm", watched_norm)
    model = small_model()
    train_step(model, Adam(model, lr=1e-3), moons.train[:64])
    assert len(plans) == 1 and plans[0] is not None and plans[0].operation == "train"


def test_a_non_finite_loss_raises_before_the_update(moons):
    model = small_model()
    model.flow[0].params["scale"][...] = np.inf
    before = model.state_dict()
    optimizer = Adam(model, lr=1e-2)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \((nan|inf)\) or gradient norm") as caught:
        train_step(model, optimizer, moons.train[:64])
    assert caught.value.norm is not None and optimizer.step_count == 0
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


def test_train_step_takes_another_loss():
    """Any module and loss: ``½‖θ‖²`` by hand."""
    model = small_model()
    optimizer = SGD(model, lr=0.5, momentum=0.0)

    def half_square(_batch):
        total = 0.0
        for _, value, grad in model.named_parameters():
            grad += value
            total += 0.5 * float(np.sum(value**2))
        return total
    loss = train_step(model, optimizer, np.zeros((1, 2)), loss_and_backward=half_square)
    assert loss > 0 and half_square(None) == pytest.approx(loss / 4)  # θ ← θ/2 quarters the loss


def test_fit_stops_after_the_epoch_that_crosses_the_time_limit(moons, monkeypatch):
    clock = iter(np.arange(0.0, 1e4, 1.0))  # every reading of the clock advances it by one second
    monkeypatch.setattr(train.time, "perf_counter", lambda: float(next(clock)))
    model = small_model()
    result = fit(model, moons.train, moons.val, epochs=50, batch_size=128, patience=None, progress=False,
                 time_limit=5.0)
    assert result.stopped_by == "time_limit" and result.history[-1]["stopped_by"] == "time_limit"
    crossed = [entry["seconds"] >= 5.0 for entry in result.history]
    assert crossed[-1] and not any(crossed[:-1]) and len(result.history) < 50
    with pytest.raises(ValueError, match="time_limit must be a positive number"):
        fit(model, moons.train, epochs=1, progress=False, time_limit=0)


def test_on_epoch_end_sees_every_epoch_after_validation_and_can_stop(moons):
    model = small_model()
    calls = []

    def before_validation(epoch):
        calls.append(("before_validation", epoch))

    def on_epoch_end(epoch, record):
        calls.append(("end", epoch, record["val_nll"] is not None))
        record["note"] = epoch * 10
        return epoch == 3
    result = fit(model, moons.train, moons.val, epochs=10, batch_size=128, patience=None, progress=False,
                 on_epoch_end=on_epoch_end, before_validation=before_validation)
    assert calls == [c for e in (1, 2, 3) for c in (("before_validation", e), ("end", e, True))]
    assert result.stopped_by == "on_epoch_end" and [entry["note"] for entry in result.history] == [10, 20, 30]
    assert not result.stopped_early


def test_stopped_by_names_patience_and_epochs(moons):
    model = small_model()
    assert fit(model, moons.train, moons.val, epochs=2, batch_size=128, progress=False).stopped_by == "epochs"
    result = fit(model, moons.train, moons.val, optimizer=Adam(model, lr=0.5), epochs=60, batch_size=32, patience=1,
                 clip_norm=1e3, progress=False)
    assert result.stopped_early and result.stopped_by == "patience"


def test_the_image_trainer_makes_one_fit_call(monkeypatch, tmp_path):
    calls = []
    real = image_training.fit
    monkeypatch.setattr(image_training, "fit", lambda *args, **kwargs: calls.append(kwargs) or real(*args, **kwargs))
    summary = image_training.train_image_model("digits", "nice", tmp_path, hidden=(8,), epochs=3, patience=None)
    assert len(calls) == 1 and calls[0]["epochs"] == 3
    assert summary["epochs_run"] == 3 and summary["stopped_by"] == "epochs"
    lrs = [entry["lr"] for entry in summary["history"]]
    assert lrs[0] == pytest.approx(2e-4) and lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]


def _own_calls(function: ast.FunctionDef) -> set[str]:
    """Names of the methods ``function`` calls itself (not inside the functions it defines)."""
    names, pending = set(), list(function.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            names.add(node.func.attr)
        pending.extend(ast.iter_child_nodes(node))
    return names


def _step_written_out(path: Path) -> list[int]:
    """Lines of the functions of ``path`` that compute a gradient and call ``.step()`` themselves."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef):
            called = _own_calls(node)
            if "step" in called and called & {"zero_grad", "nll_and_backward", "backward"}:
                found.append(node.lineno)
    return found


def test_the_training_step_is_written_out_only_in_train_step():
    """fit, VI, the image trainer and the benchmarks call train_step; PyTorch's own step (the benchmarks'
    reference) is the only other one."""
    allowed = {"nflow_np/train.py": 1, "benchmarks/torch_reference.py": 2, "benchmarks/gpu_check.py": 1}
    files = [*sorted((ROOT / "nflow_np").rglob("*.py")), *sorted((ROOT / "benchmarks").rglob("*.py"))]
    counts = {str(path.relative_to(ROOT)): len(_step_written_out(path)) for path in files}
    assert {name: n for name, n in counts.items() if n} == allowed
