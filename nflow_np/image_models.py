"""Image models: NICE and multi-scale RealNVP on integer-valued images, and their bits per dimension.

An :class:`ImageFlowModel` is a :class:`~nflow_np.model.FlowModel` whose flow starts with the
preprocessing flows (dequantise, scale to [0, 1], optionally logit; :mod:`nflow_np.flows.preprocessing`),
so ``log_prob(x)`` of integer images ``x`` is ``log p(x + u)`` on the scale of the integer levels
with every Jacobian included. At its boundary images are ``(N, C, H, W)``; inside, rows
``(N, C·H·W)`` in C order (``docs/images.md#images-and-rows``). It also manages the batch-norm
modes: training statistics inside :meth:`ImageFlowModel.nll_and_backward`, running averages
everywhere else, so :func:`nflow_np.train.fit` trains it unchanged.

Builders: :func:`build_nice` (Dinh et al. 2014) and :func:`build_realnvp` (Dinh et al. 2016).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nflow_np.distributions import BASE_DISTRIBUTIONS, StandardLogistic, StandardNormal
from nflow_np.flows import AdditiveCoupling, AffineCoupling, Flow, Rescale, Sequential
from nflow_np.flows.conv_coupling import ConvAffineCoupling
from nflow_np.flows.image import FactorOut, Shape, Squeeze, channel_mask, check_shape, checkerboard_mask
from nflow_np.flows.normalization import BatchNorm, training_mode
from nflow_np.flows.preprocessing import Dequantize, Logit, Scale
from nflow_np.model import FlowModel
from nflow_np.module import as_float_dtype
from nflow_np.validation import check_batch

IMAGE_MODELS = ("nice", "realnvp")


class ImageFlowModel(FlowModel):
    """A flow model of ``levels``-valued images of shape ``(C, H, W)``.

    Every method accepts images ``(N, C, H, W)`` or their rows ``(N, C·H·W)`` (what ``fit`` passes),
    holding integer levels ``0 … levels−1`` as floats in the model's dtype. ``decode`` and ``sample``
    return images; ``encode`` returns the latent rows ``z: (N, D)``.

    Parameters
    ----------
    flow : Flow
        Data → noise, starting with a :class:`~nflow_np.flows.preprocessing.Dequantize`.
    base : StandardNormal or StandardLogistic
    shape : (C, H, W)
    levels : int
        Number of integer levels of a pixel (17 for the digits, 256 for MNIST).
    """

    def __init__(self, flow: Flow, base: StandardNormal | StandardLogistic | None, shape: Shape, levels: int) -> None:
        super().__init__(flow, base)
        self.shape = check_shape(shape)
        if self.dim != math.prod(self.shape):
            raise ValueError(f"the flow works in dimension {self.dim}, but {self.shape} images have {math.prod(shape)}")
        self.levels = int(levels)
        found = [m for m in flow.modules() if isinstance(m, Dequantize)]
        if len(found) != 1:
            raise ValueError(f"an image model's flow needs exactly one Dequantize layer, found {len(found)}")
        self.dequantize = found[0]

    def _check(self, x: np.ndarray, name: str) -> np.ndarray:
        """Rows ``(N, D)`` of ``x`` (a view of an ``(N, C, H, W)`` batch), on the parameters' device, checked."""
        x = self._to_model(x)
        if getattr(x, "ndim", None) == 4:
            if x.shape[1:] != self.shape:
                raise ValueError(f"{name} has images of shape {x.shape[1:]}; this model's are {self.shape}")
            x = x.reshape(x.shape[0], -1)
        x = check_batch(x, name, self.dim, self.dtype, self.array_module)
        if name == "x" and (x.min() < 0 or x.max() > self.levels - 1):
            raise ValueError(f"x must hold levels 0 … {self.levels - 1}, got values in [{x.min()}, {x.max()}]")
        return x

    def to_images(self, rows: np.ndarray) -> np.ndarray:
        """``(N, D)`` rows as ``(N, C, H, W)`` images (a view)."""
        return rows.reshape(rows.shape[0], *self.shape)

    def nll_and_backward(self, x: np.ndarray) -> float:
        """Mean NLL and its gradient (see :meth:`FlowModel.nll_and_backward`), batch norms in training mode."""
        with training_mode(self.flow):
            return super().nll_and_backward(x)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Images ``x = f⁻¹(z)``, ``(N, C, H, W)``: integer levels (the dequantiser's inverse quantises)."""
        return self.to_images(super().decode(z))

    def sample(self, n: int, rng: np.random.Generator | None = None, temperature: float = 1.0) -> np.ndarray:
        """``n`` images ``f⁻¹(T · z)``, ``z ~ p_Z``: ``(n, C, H, W)`` integer levels."""
        return self.to_images(super().sample(n, rng, temperature))

    def evaluate(self, x: np.ndarray, seed: int = 0, batch_size: int = 1000, comm: object = None) -> dict[str, float]:
        """Test metrics of images ``x`` with the dequantisation noise reseeded (reproducible).

        With ``comm`` (:mod:`nflow_np.distributed`) every batch is sharded over the ranks, each row
        given the noise one process gives it.

        Returns
        -------
        dict
            ``nll`` (nats per image, ``−log p(x + u)`` on the level scale), ``bits_per_dim``
            (``nll / (D ln 2)``), ``log_likelihood_01`` (nats per image of the data scaled to
            [0, 1], NICE's convention: ``log p(x + u) + D log L``).
        """
        rows = self._check(x, "x")
        stream = self.dequantize.rng.bit_generator.state  # training's noise stream resumes afterwards
        self.dequantize.reseed(seed)
        with self._inference("log_prob"):  # one thread plan and flush for all batches, no caches kept
            if comm is None:
                total = 0.0
                for start in range(0, rows.shape[0], batch_size):
                    total -= float(self.log_prob(rows[start : start + batch_size]).sum())
                nll = total / rows.shape[0]
            else:
                from nflow_np.distributed import evaluate_nll

                nll = evaluate_nll(comm, self, rows, batch_size)
        self.dequantize.rng.bit_generator.state = stream
        return {
            "nll": nll,
            "bits_per_dim": bits_per_dim(nll, self.dim),
            "log_likelihood_01": -nll + self.dim * math.log(self.levels),
        }


def bits_per_dim(nll: float, dim: int) -> float:
    """``nll / (D ln 2)``: nats per image on the level scale → bits per dimension."""
    return nll / (dim * math.log(2))


def preprocessing(dim: int, levels: int, alpha: float | None, seed: int = 0) -> list[Flow]:
    """``[Dequantize, Scale(1/L), Logit(α)]`` (no logit when ``alpha`` is None)."""
    flows: list[Flow] = [Dequantize(dim, levels, seed=seed), Scale(dim, 1.0 / levels)]
    if alpha is not None:
        flows.append(Logit(dim, alpha))
    return flows


def build_nice(
    shape: Shape,
    levels: int,
    *,
    couplings: int = 4,
    hidden: Sequence[int] = (1000,) * 5,
    alpha: float | None = None,
    base: str = "logistic",
    partition: str = "parity",
    dtype: object = np.float32,
    seed: int = 0,
) -> ImageFlowModel:
    """NICE (Dinh et al. 2014, §5.1): additive couplings with ReLU MLPs, a diagonal rescaling.

    Flow: preprocessing (dequantise, ``/L``, logit only if ``alpha`` is given: NICE itself models
    the [0, 1] data), then ``couplings`` additive couplings, alternating which half of the
    partition is transformed, then :class:`~nflow_np.flows.Rescale`; logistic prior. The partition
    is the paper's odd/even one of the flattened image (``partition="parity"``; on an image of even
    width that is alternate columns) or RealNVP's checkerboard (``"checkerboard"``: every pixel is
    conditioned on its four neighbours). The paper's MNIST nets are 5 hidden layers of 1000 units
    (the default).
    """
    shape = check_shape(shape)
    if partition not in ("parity", "checkerboard"):
        raise ValueError(f"partition must be 'parity' or 'checkerboard', got {partition!r}")
    dim = math.prod(shape)
    dtype = as_float_dtype(dtype)
    rng = np.random.default_rng(seed)
    flows = preprocessing(dim, levels, alpha, seed)
    for k in range(couplings):
        mask = checkerboard_mask(shape, k % 2) if partition == "checkerboard" else None
        flows.append(AdditiveCoupling(dim, mask=mask, parity=k % 2, hidden=hidden, rng=rng, dtype=dtype))
    flows.append(Rescale(dim, dtype=dtype))
    return ImageFlowModel(Sequential(flows), BASE_DISTRIBUTIONS[base](), shape, levels)


def build_realnvp(
    shape: Shape,
    levels: int,
    *,
    scales: int = 2,
    couplings: int = 3,
    final_couplings: int = 4,
    hidden: Sequence[int] = (256, 256),
    alpha: float = 0.05,
    batch_norm: str | None = "channel",
    momentum: float = 0.1,
    activation: str = "relu",
    dtype: object = np.float32,
    seed: int = 0,
) -> ImageFlowModel:
    """Multi-scale RealNVP (Dinh et al. 2016, §3.6): affine couplings with MLP nets, standard normal prior.

    Flow: preprocessing (dequantise, ``/L``, logit with ``α``), then per scale on an image of shape
    ``(C, H, W)``: ``couplings`` checkerboard couplings (alternating parity), a :class:`Squeeze` to
    ``(4C, H/2, W/2)``, ``couplings`` channel-wise couplings (alternating halves), and a
    :class:`FactorOut` that sends the last ``2C`` channels to the prior and passes the first ``2C``
    on to the next scale. The last scale (after ``scales − 1`` factor-outs, or earlier if ``H`` or
    ``W`` is odd) is ``final_couplings`` checkerboard couplings. A :class:`BatchNorm` follows every
    coupling: with statistics per channel of the image at that point (``batch_norm="channel"``, as in
    RealNVP), per coordinate (``"coordinate"``), or none (``None``).
    """
    shape = check_shape(shape)
    if batch_norm not in ("channel", "coordinate", None):
        raise ValueError(f"batch_norm must be 'channel', 'coordinate' or None, got {batch_norm!r}")
    if scales < 1:
        raise ValueError(f"scales must be at least 1, got {scales}")
    dtype = as_float_dtype(dtype)
    rng = np.random.default_rng(seed)

    def coupling(mask: np.ndarray, shape: Shape) -> list[Flow]:
        layer = AffineCoupling(len(mask), mask=mask, hidden=hidden, activation=activation, rng=rng, dtype=dtype)
        if batch_norm is None:
            return [layer]
        channels = shape[0] if batch_norm == "channel" else None
        return [layer, BatchNorm(len(mask), momentum=momentum, dtype=dtype, channels=channels)]

    def scale(shape: Shape, left: int) -> Flow:
        c, h, w = shape
        flows: list[Flow] = []
        if left == 1 or h % 2 or w % 2:
            for k in range(final_couplings):
                flows += coupling(checkerboard_mask(shape, k % 2) if h * w > 1 else channel_mask(shape, k % 2), shape)
            return Sequential(flows)
        for k in range(couplings):
            flows += coupling(checkerboard_mask(shape, k % 2), shape)
        squeeze = Squeeze(shape)
        flows.append(squeeze)
        c, h, w = squeeze.out_shape
        for k in range(couplings):
            flows += coupling(channel_mask(squeeze.out_shape, k % 2), squeeze.out_shape)
        flows.append(FactorOut(c * h * w, scale((c // 2, h, w), left - 1)))
        return Sequential(flows)

    dim = math.prod(shape)
    flow = Sequential([*preprocessing(dim, levels, alpha, seed), scale(shape, scales)])
    return ImageFlowModel(flow, StandardNormal(), shape, levels)


def initialize_rescale(model: ImageFlowModel, x: np.ndarray) -> None:
    """Data-dependent start for NICE's final :class:`~nflow_np.flows.Rescale` (as Glow's ActNorm).

    Sets ``σ_j = log(s_base) − log(std_n h_j)``, where ``h`` is the output of the layers before the
    rescaling for the images ``x`` and ``s_base`` the base distribution's standard deviation
    (``π/√3`` for the logistic, 1 for the normal), so training starts with every coordinate of ``z``
    at the prior's scale. Without it the log-scales start at 0 and, moving at Adam's ~``lr`` per
    step, need thousands of steps to reach the ~5 nats a pixel of [0, 1]-scaled data needs.
    """
    layers = model.flow.flows if isinstance(model.flow, Sequential) else []
    if not layers or not isinstance(layers[-1], Rescale):
        raise ValueError("initialize_rescale needs a flow that is a Sequential ending in a Rescale (build_nice)")
    h = model._check(x, "x")
    for layer in layers[:-1]:
        h, _ = layer._forward(h)
    base_std = np.pi / np.sqrt(3) if isinstance(model.base, StandardLogistic) else 1.0
    layers[-1].params["log_scale"][...] = np.log(base_std) - np.log(h.std(axis=0) + 1e-6)


def load_image_model(directory: str | os.PathLike) -> ImageFlowModel:
    """Load an image model saved by ``nflow train --data digits|mnist`` (its metadata gives shape and levels)."""
    from nflow_np.io import ModelFileError, load_model, read_config

    metadata = read_config(directory)["metadata"]
    if "image_shape" not in metadata or "levels" not in metadata:
        raise ModelFileError(f"{Path(directory)} holds no image model (no image_shape/levels in its metadata)")
    model = load_model(directory)
    return ImageFlowModel(model.flow, model.base, tuple(metadata["image_shape"]), metadata["levels"])


def build_realnvp_resnet(
    shape: Shape,
    levels: int,
    *,
    scales: int = 2,
    couplings: int = 3,
    final_couplings: int = 4,
    channels: int = 64,
    blocks: int = 4,
    kernel_size: int = 3,
    alpha: float = 0.05,
    batch_norm: str | None = "channel",
    momentum: float = 0.1,
    dtype: object = np.float32,
    seed: int = 0,
) -> ImageFlowModel:
    """Multi-scale RealNVP as the paper built it (Dinh et al. 2016, §3.3–3.6, §4.1): convolutional couplings.

    The architecture of :func:`build_realnvp` with every coupling a
    :class:`~nflow_np.flows.conv_coupling.ConvAffineCoupling`, whose ``s`` and ``t`` come from a ResNet of
    ``blocks`` residual blocks with ``channels`` feature maps, ``kernel_size`` convolutions, weight and
    batch normalisation (:mod:`nflow_np.nn.resnet`). Per scale on a ``(C, H, W)`` image: ``couplings``
    checkerboard couplings (the net sees the masked image and the mask), a :class:`Squeeze`,
    ``couplings`` channel-wise couplings, and a :class:`FactorOut` of half the channels; the last scale
    is ``final_couplings`` checkerboard couplings. A :class:`BatchNorm` follows every coupling
    (``batch_norm`` as in :func:`build_realnvp`). Preprocessing: dequantise, ``/L``, logit with ``α``.
    """
    shape = check_shape(shape)
    if batch_norm not in ("channel", "coordinate", None):
        raise ValueError(f"batch_norm must be 'channel', 'coordinate' or None, got {batch_norm!r}")
    if scales < 1:
        raise ValueError(f"scales must be at least 1, got {scales}")
    dtype = as_float_dtype(dtype)
    rng = np.random.default_rng(seed)
    net = {"features": channels, "blocks": blocks, "kernel_size": kernel_size, "momentum": momentum}

    def coupling(shape: Shape, mask: str, parity: int) -> list[Flow]:
        layer = ConvAffineCoupling(shape, mask, parity, rng=rng, dtype=dtype, **net)
        if batch_norm is None:
            return [layer]
        groups = shape[0] if batch_norm == "channel" else None
        return [layer, BatchNorm(layer.dim, momentum=momentum, dtype=dtype, channels=groups)]

    def scale(shape: Shape, left: int) -> Flow:
        c, h, w = shape
        flows: list[Flow] = []
        if left == 1 or h % 2 or w % 2:
            mask = "checkerboard" if h * w > 1 else "channel"
            for k in range(final_couplings):
                flows += coupling(shape, mask, k % 2)
            return Sequential(flows)
        for k in range(couplings):
            flows += coupling(shape, "checkerboard", k % 2)
        squeeze = Squeeze(shape)
        flows.append(squeeze)
        for k in range(couplings):
            flows += coupling(squeeze.out_shape, "channel", k % 2)
        c, h, w = squeeze.out_shape
        flows.append(FactorOut(c * h * w, scale((c // 2, h, w), left - 1)))
        return Sequential(flows)

    dim = math.prod(shape)
    flow = Sequential([*preprocessing(dim, levels, alpha, seed), scale(shape, scales)])
    return ImageFlowModel(flow, StandardNormal(), shape, levels)


def realnvp_resnet_couplings(
    shape: Shape, *, scales: int = 2, couplings: int = 3, final_couplings: int = 4
) -> list[tuple[Shape, str, int]]:
    """``(shape, mask, parity)`` of every coupling :func:`build_realnvp_resnet` builds, in order, without building it.

    The same walk over the scales as the builder (a test holds the two together): what the command line's
    preflight sizes before it allocates a model (:func:`realnvp_resnet_footprint`).
    """
    plan: list[tuple[Shape, str, int]] = []
    shape, left = check_shape(shape), scales
    while True:
        c, h, w = shape
        if left == 1 or h % 2 or w % 2:
            mask = "checkerboard" if h * w > 1 else "channel"
            return plan + [(shape, mask, k % 2) for k in range(final_couplings)]
        plan += [(shape, "checkerboard", k % 2) for k in range(couplings)]
        squeezed = (4 * c, h // 2, w // 2)
        plan += [(squeezed, "channel", k % 2) for k in range(couplings)]
        shape, left = (2 * c, h // 2, w // 2), left - 1


def realnvp_resnet_footprint(
    shape: Shape, channels: int, blocks: int, batch_size: int, itemsize: int, kernel_size: int = 3
) -> tuple[int, int]:
    """Parameters of :func:`build_realnvp_resnet`'s default architecture, and the bytes one training step holds.

    Bytes: the parameters five times (value, gradient, Adam's two moments, the best copy), per coupling
    and image the ``4·blocks + 3`` feature maps of ``channels × H × W`` its ResNet keeps for the backward pass
    (each block: the two convolutions' inputs, the batch norm's normalised input, the ReLU's output; the
    last batch norm, ReLU and convolution), and one convolution's ``im2col`` columns and their gradient
    (``2·k²`` maps, transient). An estimate for the preflight check, not an accounting.
    """
    from nflow_np.flows.conv_coupling import conv_coupling_parameters

    plan = realnvp_resnet_couplings(shape)
    n_params = sum(conv_coupling_parameters(s, mask, parity, channels, blocks, kernel_size) for s, mask, parity in plan)
    pixels = [h * w for (_, h, w), _, _ in plan]
    maps = channels * (sum(pixels) * (4 * blocks + 3) + max(pixels) * 2 * kernel_size**2)
    return n_params, itemsize * (5 * n_params + batch_size * maps)
