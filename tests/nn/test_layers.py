"""``nflow_np.nn`` (Linear, activations, MLP) and the ``Module`` parameter protocol they share.

Gradients against central differences (via ``helpers.check_layer_gradients``), accumulation of
gradients, the zero-initialised last layer, and named parameters / zero_grad / state_dict /
load_state_dict / astype.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import check_layer_gradients, randomise
from hypothesis import given, settings
from hypothesis import strategies as st

from nflow_np import AffineCoupling, Inverse, Rescale, Reverse, Sequential
from nflow_np.module import as_float_dtype
from nflow_np.nn import ACTIVATIONS, MLP, Dense, LeakyReLU, Linear, ReLU, Tanh

FAST = settings(max_examples=25, deadline=None)

rows = st.integers(1, 5)
widths = st.integers(1, 6)
seeds = st.integers(0, 2**32 - 1)


def away_from_zero(rng: np.random.Generator, shape: tuple[int, ...], margin: float = 1e-3) -> np.ndarray:
    """Normal draws pushed at least ``margin`` away from 0, where ReLU-type layers have their kink."""
    x = rng.standard_normal(shape)
    return np.where(x >= 0, x + margin, x - margin)


# --- gradients --------------------------------------------------------------------------------


@FAST
@given(n=rows, d_in=widths, d_out=widths, seed=seeds)
def test_linear_gradients(n: int, d_in: int, d_out: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    layer = randomise(Linear(d_in, d_out, rng), rng)
    check_layer_gradients(layer, rng.standard_normal((n, d_in)), rng)


@pytest.mark.parametrize(
    "make", [ReLU, LeakyReLU, lambda: LeakyReLU(0.3), Tanh], ids=["relu", "leaky", "leaky0.3", "tanh"]
)
@FAST
@given(n=rows, d=widths, seed=seeds)
def test_activation_gradients(make: object, n: int, d: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    check_layer_gradients(make(), 2 * away_from_zero(rng, (n, d)), rng)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@FAST
@given(n=rows, sizes=st.lists(widths, min_size=2, max_size=4), seed=seeds)
def test_mlp_gradients(activation: str, n: int, sizes: list[int], seed: int) -> None:
    """ReLU kinks: hidden pre-activations are continuous random values, so one within eps = 1e-6 of 0
    (where central differences straddle the kink) has probability ~1e-6 per unit; this check passed on
    10⁴ random ReLU / leaky-ReLU MLPs without a miss."""
    rng = np.random.default_rng(seed)
    mlp = randomise(MLP(sizes, rng, activation=activation, zero_last=False), rng)
    check_layer_gradients(mlp, rng.standard_normal((n, sizes[0])), rng)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@FAST
@given(n=rows, d_in=widths, d_out=widths, seed=seeds)
def test_dense_gradients(activation: str, n: int, d_in: int, d_out: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    layer = randomise(Dense(d_in, d_out, rng, activation=activation), rng)
    check_layer_gradients(layer, rng.standard_normal((n, d_in)), rng)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_is_linear_then_activation(activation: str, dtype: type, reference_backend: None) -> None:
    """The hidden layer computes exactly what the two layers it replaces compute (the reference;
    the numba kernels are held to the reference in ``tests/kernels/bias_activation/test_numba_cpu.py``)."""
    rng = np.random.default_rng(5)
    dense = randomise(Dense(6, 7, rng, dtype=dtype, activation=activation), rng)
    linear = Linear(6, 7, rng, dtype=dtype)
    linear.load_state_dict(dense.state_dict())
    act = ACTIVATIONS[activation]()
    x = rng.standard_normal((9, 6)).astype(dtype)
    d_y = rng.standard_normal((9, 7)).astype(dtype)
    y = dense.forward(x)
    np.testing.assert_array_equal(y, act.forward(linear.forward(x)))
    d_x = dense.backward(d_y)
    np.testing.assert_allclose(d_x, linear.backward(act.backward(d_y)), rtol=0, atol=8 * np.finfo(dtype).eps)
    for name in ("W", "b"):
        np.testing.assert_allclose(dense.grads[name], linear.grads[name], rtol=0, atol=8 * np.finfo(dtype).eps * 9)
    assert y.dtype == d_x.dtype == dtype


def test_dense_refuses_unknown_activation_and_slope() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        Dense(2, 2, rng, activation="gelu")
    with pytest.raises(ValueError, match=r"slope must be in \[0, 1\)"):
        Dense(2, 2, rng, activation="leaky_relu", slope=1.5)


def test_activation_values() -> None:
    x = np.array([[-2.0, -0.5, 0.0, 0.5, 2.0]])
    np.testing.assert_array_equal(ReLU().forward(x), [[0.0, 0.0, 0.0, 0.5, 2.0]])
    np.testing.assert_allclose(LeakyReLU(0.1).forward(x), [[-0.2, -0.05, 0.0, 0.5, 2.0]])
    np.testing.assert_allclose(Tanh().forward(x), np.tanh(x))
    relu = ReLU()
    relu.forward(x)
    np.testing.assert_array_equal(relu.backward(np.ones_like(x)), [[0.0, 0.0, 0.0, 1.0, 1.0]])


@pytest.mark.parametrize("make", [Linear, MLP], ids=["linear", "mlp"])
def test_gradients_accumulate(make: type) -> None:
    """Two backward passes add their parameter gradients; zero_grad clears them."""
    rng = np.random.default_rng(0)
    layer = Linear(3, 2, rng) if make is Linear else MLP([3, 4, 2], rng, zero_last=False)
    randomise(layer, rng)
    x1, x2 = rng.standard_normal((2, 5, 3))
    d1, d2 = rng.standard_normal((2, 5, 2))
    single = []
    for x, d in ((x1, d1), (x2, d2)):
        layer.zero_grad()
        layer.forward(x)
        layer.backward(d)
        single.append({name: grad.copy() for name, _, grad in layer.named_parameters()})
    layer.zero_grad()
    layer.forward(x1)
    layer.backward(d1)
    layer.forward(x2)
    layer.backward(d2)
    for name, _, grad in layer.named_parameters():
        expected = single[0][name] + single[1][name]
        np.testing.assert_allclose(grad, expected, rtol=1e-14, atol=1e-15, err_msg=name)
        assert np.any(grad != 0)
    layer.zero_grad()
    for name, _, grad in layer.named_parameters():
        np.testing.assert_array_equal(grad, 0.0, err_msg=name)


class _WrongBiasGradient(Linear):
    """Linear whose bias gradient is the mean over rows instead of the sum (a classic slip)."""

    def backward(self, d_y: np.ndarray) -> np.ndarray:
        d_x = super().backward(d_y)
        self.grads["b"] -= d_y.sum(axis=0) - d_y.mean(axis=0)
        return d_x


class _WrongTanh(Tanh):
    """Tanh differentiated as 1 − x² (the input) instead of 1 − y² (the output)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._x = x
        return super().forward(x)

    def backward(self, d_y: np.ndarray) -> np.ndarray:
        return d_y * (1 - self._x * self._x)


def test_layer_gradient_check_catches_wrong_gradients() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(AssertionError, match="'b'"):
        check_layer_gradients(randomise(_WrongBiasGradient(3, 2, rng), rng), rng.standard_normal((4, 3)), rng)
    with pytest.raises(AssertionError, match="'input'"):
        check_layer_gradients(_WrongTanh(), rng.standard_normal((4, 3)), rng)
    mlp = MLP([3, 2, 2], rng, zero_last=False)
    mlp.layers[-1] = mlp.children["2"] = _WrongBiasGradient(2, 2, rng)  # the last Linear, inside the MLP
    with pytest.raises(AssertionError, match=r"'2\.b'"):
        check_layer_gradients(randomise(mlp, rng), rng.standard_normal((4, 3)), rng)


# --- initialisation and construction ----------------------------------------------------------


@FAST
@given(n=rows, sizes=st.lists(widths, min_size=2, max_size=4), seed=seeds)
def test_zero_last_mlp_outputs_zeros(n: int, sizes: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    mlp = MLP(sizes, rng, zero_last=True)
    y = mlp.forward(rng.standard_normal((n, sizes[0])) * 10)
    np.testing.assert_array_equal(y, np.zeros((n, sizes[-1])))
    last = mlp.layers[-1]
    np.testing.assert_array_equal(last.params["W"], 0.0)
    np.testing.assert_array_equal(last.params["b"], 0.0)


def test_linear_initialisation() -> None:
    rng = np.random.default_rng(0)
    layer = Linear(30, 20, rng)
    bound = np.sqrt(6.0 / 50)
    weight = layer.params["W"]
    assert weight.shape == (30, 20) and np.all(np.abs(weight) <= bound)
    assert weight.std() == pytest.approx(bound / np.sqrt(3), rel=0.1)  # U(-a, a) has std a/√3
    np.testing.assert_array_equal(layer.params["b"], np.zeros(20))
    np.testing.assert_array_equal(Linear(3, 2, rng, zero_init=True).params["W"], np.zeros((3, 2)))


def test_construction_errors() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="Linear needs positive sizes, got 0 -> 3"):
        Linear(0, 3, rng)
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got int32"):
        Linear(2, 3, rng, dtype=np.int32)
    with pytest.raises(ValueError, match=r"LeakyReLU slope must be in \[0, 1\), got 1.0"):
        LeakyReLU(1.0)
    with pytest.raises(ValueError, match="LeakyReLU slope must be in"):
        LeakyReLU(-0.1)
    with pytest.raises(ValueError, match=r"MLP needs at least input and output sizes, got \[3\]"):
        MLP([3], rng)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        MLP([3, 2], rng, activation="gelu")


def test_as_float_dtype() -> None:
    assert as_float_dtype("float32") == np.float32 and as_float_dtype(np.float64) == np.float64
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        as_float_dtype(np.float16)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        as_float_dtype("not a dtype")


# --- the Module protocol ----------------------------------------------------------------------


def make_mlp(dtype: object = np.float64) -> MLP:
    rng = np.random.default_rng(1)
    return randomise(MLP([3, 4, 2], rng, activation="tanh", dtype=dtype), rng)


def test_named_parameters() -> None:
    mlp = make_mlp()
    named = list(mlp.named_parameters())
    assert [name for name, _, _ in named] == ["0.W", "0.b", "2.W", "2.b"]
    assert [param.shape for _, param, _ in named] == [(3, 4), (4,), (4, 2), (2,)]
    for name, param, grad in named:
        assert grad.shape == param.shape and grad.dtype == param.dtype
        assert param is mlp.children[name.split(".")[0]].params[name.split(".")[1]]
    assert mlp.num_parameters() == 3 * 4 + 4 + 4 * 2 + 2
    prefixed = [name for name, _, _ in mlp.named_parameters("net.")]
    assert prefixed == ["net.0.W", "net.0.b", "net.2.W", "net.2.b"]
    assert ReLU().num_parameters() == 0 and ReLU().dtype is None


def test_named_parameters_of_composed_flows() -> None:
    rng = np.random.default_rng(0)
    flow = Sequential([Rescale(2), Reverse(2), Inverse(AffineCoupling(2, hidden=(), rng=rng))])
    assert [name for name, _, _ in flow.named_parameters()] == [
        "0.log_scale",
        "2.flow.scale",
        "2.flow.net.0.W",
        "2.flow.net.0.b",
    ]


def test_zero_grad() -> None:
    mlp = make_mlp()
    mlp.forward(np.ones((2, 3)))
    mlp.backward(np.ones((2, 2)))
    assert any(np.any(grad != 0) for _, _, grad in mlp.named_parameters())
    grads_before = [grad for _, _, grad in mlp.named_parameters()]
    mlp.zero_grad()
    for (name, _, grad), same in zip(mlp.named_parameters(), grads_before, strict=True):
        assert grad is same, f"zero_grad must clear {name} in place (an optimizer may hold it)"
        np.testing.assert_array_equal(grad, 0.0)


def test_state_dict_round_trip() -> None:
    mlp = make_mlp()
    state = mlp.state_dict()
    assert list(state) == ["0.W", "0.b", "2.W", "2.b"]
    for name, param, _ in mlp.named_parameters():
        np.testing.assert_array_equal(state[name], param)
        assert not np.shares_memory(state[name], param), "state_dict must copy"
    x = np.random.default_rng(2).standard_normal((4, 3))
    y = mlp.forward(x)
    state["0.W"][...] = 0.0  # editing the copy leaves the module alone
    np.testing.assert_array_equal(mlp.forward(x), y)

    other = MLP([3, 4, 2], np.random.default_rng(99), activation="tanh")
    params_before = [param for _, param, _ in other.named_parameters()]
    other.load_state_dict(mlp.state_dict())
    np.testing.assert_array_equal(other.forward(x), y)
    for (_, param, _), same in zip(other.named_parameters(), params_before, strict=True):
        assert param is same, "load_state_dict must write in place"


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda s: s.pop("2.b"), ValueError, r"missing \['2.b'\], unexpected \[\]"),
        (lambda s: s.update({"3.W": np.zeros(1)}), ValueError, r"missing \[\], unexpected \['3.W'\]"),
        (lambda s: s.update({"2.W": np.zeros((2, 4))}), ValueError, r"'2.W': shape \(2, 4\) in state"),
        (lambda s: s.update({"2.b": np.zeros(3)}), ValueError, r"'2.b': shape \(3,\) in state, \(2,\)"),
        (lambda s: s.update({"2.b": np.zeros(2, dtype=np.int64)}), TypeError, "dtype int64 in state"),
    ],
    ids=["missing", "unexpected", "wrong_shape", "wrong_shape_last", "int_dtype"],
)
def test_load_state_dict_errors_leave_parameters_untouched(edit: object, error: type, message: str) -> None:
    """Every entry is checked before any is written: the valid entries before a bad one are not loaded."""
    mlp = make_mlp()
    before = mlp.state_dict()
    state = {name: np.full_like(value, 7.0) for name, value in before.items()}
    edit(state)
    with pytest.raises(error, match=message):
        mlp.load_state_dict(state)
    for name, param, _ in mlp.named_parameters():
        np.testing.assert_array_equal(param, before[name], err_msg=name)


@pytest.mark.parametrize(("start", "target"), [(np.float64, np.float32), (np.float32, np.float64)])
def test_astype(start: object, target: object) -> None:
    mlp = make_mlp(start)
    values = mlp.state_dict()
    assert mlp.astype(target) is mlp
    assert mlp.dtype == target
    for name, param, grad in mlp.named_parameters():
        assert param.dtype == target and grad.dtype == target, name
        np.testing.assert_allclose(param, values[name], rtol=1e-6)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(target)
    y = mlp.forward(x)
    assert y.dtype == target
    assert mlp.backward(np.ones_like(y)).dtype == target
    for name, param, grad in mlp.named_parameters():
        assert param.dtype == target and grad.dtype == target, f"{name} after backward"
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got int64"):
        mlp.astype(np.int64)


def test_astype_reaches_nested_flows() -> None:
    rng = np.random.default_rng(0)
    flow = randomise(Sequential([Rescale(3), Inverse(AffineCoupling(3, hidden=(4,), rng=rng))]), rng)
    x = rng.standard_normal((5, 3))
    z64, logdet64 = flow.forward(x)
    flow.astype(np.float32)
    assert {param.dtype for _, param, _ in flow.named_parameters()} == {np.dtype(np.float32)}
    z32, logdet32 = flow.forward(x.astype(np.float32))
    assert z32.dtype == np.float32 and logdet32.dtype == np.float32
    np.testing.assert_allclose(z32, z64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logdet32, logdet64, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="the parameters are float32"):
        flow.forward(x)
