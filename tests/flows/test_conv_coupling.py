"""``nflow_np.flows.conv_coupling``: RealNVP's convolutional affine couplings.

The registry's checks (``helpers.check_flow_gradients``, ``helpers.check_logdet``, round trips in both
precisions, dtypes) on :data:`conv_cases.CONV_FLOW_CASES`; the same checks on hypothesis-drawn images
(batch from 1, odd heights and widths, one or several channels, kernel sizes 1, 3 and 5, both masks and
parities); the log-det against ``slogdet`` of the numerical Jacobian; gradients with the nets' batch
norms in training mode; what the net sees; the identity start; errors.
"""

from __future__ import annotations

import numpy as np
import pytest
from conv_cases import CONV_FLOW_CASES, NET, randomise_conv
from helpers import check_flow_gradients, check_logdet
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nflow_np.flows import Sequential
from nflow_np.flows.conv_coupling import ConvAffineCoupling, MaskedResNet, image_mask
from nflow_np.flows.normalization import batch_norms, training_mode

FAST = settings(max_examples=15, deadline=None)
FEW = settings(max_examples=6, deadline=None)

cases = pytest.mark.parametrize(("name", "factory"), CONV_FLOW_CASES, ids=[name for name, _ in CONV_FLOW_CASES])
dims = st.integers(2, 7)
batches = st.integers(1, 3)
seeds = st.integers(0, 2**32 - 1)
directions = st.sampled_from(["forward", "inverse"])
odd = st.sampled_from([1, 3, 5])
kernels = st.sampled_from([1, 3, 5])


def call(flow: object, direction: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return flow.forward(x) if direction == "forward" else flow.inverse(x)


@st.composite
def couplings(draw: st.DrawFn) -> tuple[ConvAffineCoupling, np.random.Generator]:
    """A random coupling on a small image: checkerboard on C ∈ {1, 2, 3}, or channel-wise on C ∈ {2, 4}."""
    mask = draw(st.sampled_from(["checkerboard", "channel"]))
    c = draw(st.sampled_from([1, 2, 3])) if mask == "checkerboard" else draw(st.sampled_from([2, 4]))
    h, w = draw(odd), draw(odd)
    assume(mask == "channel" or h * w > 1)
    assume(c * h * w <= 18)  # the Jacobian check costs 2·D calls per row
    rng = np.random.default_rng(draw(seeds))
    flow = ConvAffineCoupling((c, h, w), mask, draw(st.integers(0, 1)), features=2, blocks=draw(st.integers(0, 1)),
                              kernel_size=draw(kernels), rng=rng)  # fmt: skip
    return randomise_conv(flow, rng), rng


# -- the registry cases -----------------------------------------------------------------------------------
@cases
@FAST
@given(dim=dims, n=batches, seed=seeds, direction=directions)
def test_registry_gradients(name: str, factory: object, dim: int, n: int, seed: int, direction: str) -> None:
    rng = np.random.default_rng(seed)
    flow = factory(dim, rng, np.float64)
    check_flow_gradients(flow, rng.standard_normal((n, dim)), direction, rng)


@cases
@FAST
@given(dim=dims, n=batches, seed=seeds, direction=directions)
def test_registry_logdet(name: str, factory: object, dim: int, n: int, seed: int, direction: str) -> None:
    rng = np.random.default_rng(seed)
    check_logdet(factory(dim, rng, np.float64), rng.standard_normal((n, dim)), direction)


@cases
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@FEW
@given(dim=dims, n=batches, seed=seeds, direction=directions)
def test_registry_round_trip_and_dtype(name: str, factory: object, dtype: object, dim: int, n: int, seed: int,
                                       direction: str) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    flow = factory(dim, rng, dtype)
    x = rng.standard_normal((n, dim)).astype(dtype)
    out, logdet = call(flow, direction, x)
    back, back_logdet = call(flow, "inverse" if direction == "forward" else "forward", out)
    assert out.dtype == logdet.dtype == back.dtype == dtype
    assert flow.backward(np.ones_like(out), np.ones_like(logdet)).dtype == dtype
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(back, x, rtol=0, atol=tol * max(1.0, float(np.abs(out).max())))
    np.testing.assert_allclose(back_logdet, -logdet, rtol=0, atol=tol * max(1.0, float(np.abs(logdet).max())))


# -- drawn images -------------------------------------------------------------------------------------------
@FAST
@given(case=couplings(), n=batches, direction=directions)
def test_gradients_on_drawn_images(case: tuple, n: int, direction: str) -> None:
    flow, rng = case
    check_flow_gradients(flow, rng.standard_normal((n, flow.dim)), direction, rng)


@FAST
@given(case=couplings(), n=batches, direction=directions)
def test_logdet_matches_the_jacobian_on_drawn_images(case: tuple, n: int, direction: str) -> None:
    flow, rng = case
    check_logdet(flow, rng.standard_normal((n, flow.dim)), direction, rows=2)


@FAST
@given(case=couplings(), n=batches)
def test_round_trip_on_drawn_images(case: tuple, n: int) -> None:
    flow, rng = case
    x = 10 * rng.standard_normal((n, flow.dim))
    z, logdet = flow.forward(x)
    back, back_logdet = flow.inverse(z)
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-10 * max(1.0, float(np.abs(z).max())))
    np.testing.assert_allclose(back_logdet, -logdet, rtol=0, atol=1e-12 * max(1.0, float(np.abs(logdet).max())))


@FEW
@given(case=couplings(), n=st.integers(2, 3), direction=directions)
def test_gradients_with_batch_statistics(case: tuple, n: int, direction: str) -> None:
    """Training mode: the nets' batch norms use the batch's statistics (running averages frozen, momentum 0),
    so every output row depends on every input row, and the backward pass must follow those paths too."""
    flow, rng = case
    for layer in batch_norms(flow):
        layer.training, layer.momentum = True, 0.0
    assert not flow.invertible_in_backward  # memory="invert" stores its input instead
    check_flow_gradients(flow, rng.standard_normal((n, flow.dim)), direction, rng)


# -- what the net sees -------------------------------------------------------------------------------------
MASK_CASES = [((1, 5, 3), "checkerboard", 0), ((3, 4, 4), "checkerboard", 1), ((4, 3, 3), "channel", 0),
              ((4, 3, 3), "channel", 1)]  # fmt: skip


@pytest.mark.parametrize(("shape", "mask", "parity"), MASK_CASES)
def test_the_net_reads_only_the_pass_through_pixels(shape: tuple, mask: str, parity: int) -> None:
    rng = np.random.default_rng(0)
    flow = randomise_conv(ConvAffineCoupling(shape, mask, parity, rng=rng, **NET), rng)
    row_mask = image_mask(shape, mask, parity)
    np.testing.assert_array_equal(flow.mask, row_mask)
    x = rng.standard_normal((2, flow.dim))
    z, _ = flow.forward(x)
    np.testing.assert_array_equal(z[:, row_mask], x[:, row_mask])
    changed = x.copy()
    changed[:, ~row_mask] += 1.0  # x₂ moves: h = c(x₁) must not
    h = flow.net.forward(x[:, row_mask])
    np.testing.assert_array_equal(flow.net.forward(changed[:, row_mask]), h)
    assert not np.array_equal(flow.forward(changed)[0][:, ~row_mask], z[:, ~row_mask])


def test_the_checkerboard_net_gets_the_masked_image_and_the_mask() -> None:
    """RealNVP feeds ``[x ⊙ b, b]``: record the ResNet's input."""
    rng = np.random.default_rng(1)
    net = MaskedResNet((2, 3, 3), "checkerboard", 0, features=2, blocks=0, rng=rng)
    seen = []
    forward = net.resnet.forward
    net.resnet.forward = lambda image: seen.append(image.copy()) or forward(image)
    board = image_mask((1, 3, 3), "checkerboard", 0).reshape(3, 3)
    x = rng.standard_normal((2, 18))
    net.forward(x[:, image_mask((2, 3, 3), "checkerboard", 0)])
    (image,) = seen
    assert image.shape == (2, 3, 3, 3)
    np.testing.assert_array_equal(image[:, :2], x.reshape(2, 2, 3, 3) * board)
    np.testing.assert_array_equal(image[:, 2], np.broadcast_to(board, (2, 3, 3)))


def test_a_new_coupling_is_the_identity() -> None:
    rng = np.random.default_rng(0)
    flow = ConvAffineCoupling((2, 5, 5), "checkerboard", 1, rng=rng, features=4, blocks=2)
    x = rng.standard_normal((3, 50))
    with training_mode(flow):
        z, logdet = flow.forward(x)
    np.testing.assert_array_equal(z, x)
    np.testing.assert_array_equal(logdet, 0.0)


def test_memory_invert_gives_the_stored_gradients() -> None:
    """In evaluation mode a Sequential of conv couplings may recompute inputs by inversion."""
    rng = np.random.default_rng(0)
    layers = [randomise_conv(ConvAffineCoupling((2, 3, 3), "checkerboard", k % 2, rng=rng, **NET), rng)
              for k in range(3)]  # fmt: skip
    flow = Sequential(layers)
    x, d_z, d_logdet = rng.standard_normal((4, 18)), rng.standard_normal((4, 18)), rng.standard_normal(4)
    results = {}
    for memory in ("store", "invert"):
        flow.set_memory(memory)
        flow.zero_grad()
        flow.forward(x)
        results[memory] = [flow.backward(d_z, d_logdet)] + [grad.copy() for _, _, grad in flow.named_parameters()]
    for stored, inverted in zip(results["store"], results["invert"], strict=True):
        np.testing.assert_allclose(inverted, stored, rtol=1e-9, atol=1e-10)


def test_construction_errors() -> None:
    with pytest.raises(ValueError, match="mask must be one of"):
        ConvAffineCoupling((2, 3, 3), "stripes")
    with pytest.raises(ValueError, match="even number of channels"):
        ConvAffineCoupling((3, 3, 3), "channel")
    with pytest.raises(ValueError, match="at least two pixels"):
        ConvAffineCoupling((2, 1, 1), "checkerboard")
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ConvAffineCoupling((1, 3, 3), kernel_size=4)
    with pytest.raises(ValueError, match="three positive integers"):
        ConvAffineCoupling((3, 3))
