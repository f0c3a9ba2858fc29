"""Training: a short run learns, the best parameters are kept, runs are reproducible, bad input is refused."""

import numpy as np
import pytest

from nflow_np.architectures import build_model
from nflow_np.data import load_toy
from nflow_np.optim import Adam
from nflow_np.train import NonFiniteLossError, cosine_lr, evaluate_nll, fit


@pytest.fixture(scope="module")
def moons():
    return load_toy("two_moons", n_train=2048, n_val=1024, n_test=2048, seed=3)


def small_model(dtype=np.float64, seed=0):
    return build_model("realnvp", 2, layers=4, hidden=(32, 32), dtype=dtype, seed=seed)


def test_a_short_run_separates_trained_from_untrained(moons):
    untrained = small_model()
    trained = small_model()
    result = fit(trained, moons.train, moons.val, optimizer=Adam(trained, lr=3e-3), epochs=25,
                 batch_size=128, lr_schedule="cosine", progress=False)
    before, after = evaluate_nll(untrained, moons.test), evaluate_nll(trained, moons.test)
    # Untrained = identity flow: N(0, I) on the raw moons, about 2.4 nats; a full-covariance
    # Gaussian scores 1.88; a real fit goes well below it.
    assert before > 2.0
    assert after < 1.3
    assert result.best_val_nll == pytest.approx(evaluate_nll(trained, moons.val))
    assert len(result.history) == 25 and result.steps == 25 * (2048 // 128)


def test_same_seed_same_numbers(moons):
    runs = []
    for _ in range(2):
        model = small_model()
        fit(model, moons.train, moons.val, epochs=2, batch_size=256, seed=7, progress=False)
        runs.append(model.state_dict())
    for name in runs[0]:
        np.testing.assert_array_equal(runs[0][name], runs[1][name])


def test_float32_training_stays_float32(moons):
    model = small_model(np.float32)
    train, val = moons.train.astype(np.float32), moons.val.astype(np.float32)
    result = fit(model, train, val, epochs=3, batch_size=256, progress=False)
    assert all(value.dtype == np.float32 for _, value, _ in model.named_parameters())
    assert np.isfinite(result.best_val_nll)
    assert model.log_prob(val).dtype == np.float32


def test_best_parameters_are_kept_and_patience_stops(moons):
    model = small_model()
    # A learning rate this large makes the validation NLL worse after the first epochs.
    result = fit(model, moons.train, moons.val, optimizer=Adam(model, lr=0.3), epochs=40, batch_size=64,
                 patience=2, progress=False, clip_norm=1e3)
    best = min(entry["val_nll"] for entry in result.history)
    assert result.best_val_nll == best
    assert evaluate_nll(model, moons.val) == pytest.approx(best)
    assert result.stopped_early and len(result.history) < 40


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf · 0 on purpose
def test_non_finite_loss_stops_with_the_last_good_parameters(moons):
    model = small_model()
    initial = model.state_dict()
    model.flow[0].params["scale"][...] = np.inf  # poisons the very first loss
    with pytest.raises(NonFiniteLossError, match="learning rate"):
        fit(model, moons.train, moons.val, epochs=1, progress=False)
    for name, value in initial.items():
        expected = value if name != "flow.0.scale" else np.full_like(value, np.inf)
        np.testing.assert_array_equal(model.state_dict()[name], expected)


def test_bad_arguments_are_refused_before_training(moons):
    model = small_model()
    with pytest.raises(ValueError, match="batch_size"):
        fit(model, moons.train, epochs=1, batch_size=10**6, progress=False)
    with pytest.raises(TypeError, match="float32"):
        fit(model, moons.train.astype(np.float32), epochs=1, progress=False)
    bad = moons.train.copy()
    bad[5, 1] = np.nan
    with pytest.raises(ValueError, match=r"non-finite value nan at index \(5, 1\)"):
        fit(model, bad, epochs=1, progress=False)
    with pytest.raises(ValueError, match="lr_schedule"):
        fit(model, moons.train, epochs=1, lr_schedule="step", progress=False)


def test_cosine_schedule_endpoints():
    assert cosine_lr(1.0, 0, 100) == pytest.approx(1.0)
    assert cosine_lr(1.0, 50, 100) == pytest.approx(0.5)
    assert cosine_lr(1.0, 100, 100) == pytest.approx(0.0)


def test_shuffle_seed_gives_each_epoch_the_order_of_its_own_seed():
    """``shuffle_seed(epoch)``: one run of 3 epochs takes the steps of 3 one-epoch runs seeded 8, 9, 10
    (what the image trainer did before it made one ``fit`` call, and what its published runs used)."""
    rows = load_toy("two_moons", n_train=96, n_val=8, n_test=8, seed=1).train
    one_run, per_epoch = small_model(), small_model()
    optimizer = Adam(one_run, lr=1e-2)
    fit(one_run, rows, epochs=3, batch_size=32, optimizer=optimizer, lr_schedule="constant", patience=None,
        progress=False, shuffle_seed=lambda epoch: 7 + epoch)
    optimizer = Adam(per_epoch, lr=1e-2)
    for epoch in (1, 2, 3):
        fit(per_epoch, rows, epochs=1, batch_size=32, optimizer=optimizer, lr_schedule="constant", patience=None,
            progress=False, seed=7 + epoch)
    for name, value in one_run.state_dict().items():
        np.testing.assert_array_equal(value, per_epoch.state_dict()[name], err_msg=name)
    default = small_model()
    fit(default, rows, epochs=3, batch_size=32, optimizer=Adam(default, lr=1e-2), lr_schedule="constant",
        patience=None, progress=False, seed=8)
    assert any(not np.array_equal(v, default.state_dict()[k]) for k, v in one_run.state_dict().items())
