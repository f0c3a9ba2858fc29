"""Pictures of an image model: sample grids, data beside reconstructions, latent interpolations.

Drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``, no ``pyplot``), like
:mod:`nflow_np.plots`. Images are ``(N, C, H, W)`` integer levels; one-channel images are drawn in
grey (0 black, ``levels − 1`` white), tiled into a grid with a one-pixel gap.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError as error:  # matplotlib is the optional extra "plots"
    raise ImportError(f"drawing pictures needs matplotlib ({error}): pip install 'nflow_np[plots]'") from error

from nflow_np.image_models import ImageFlowModel


def tile(images: np.ndarray, columns: int, pad: int = 1) -> np.ndarray:
    """Tile ``(N, 1, H, W)`` images row by row into one ``(rows·(H+pad)−pad, columns·(W+pad)−pad)`` array.

    Empty cells and the gaps are NaN (drawn as the background).
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected one-channel images (N, 1, H, W), got shape {images.shape}")
    n, _, h, w = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + pad) - pad, columns * (w + pad) - pad), np.nan)
    for k in range(n):
        r, c = divmod(k, columns)
        canvas[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = images[k, 0]
    return canvas


def _save(panels: list[tuple[str, np.ndarray]], levels: int, path: str | os.PathLike) -> Path:
    """One figure with the tiled ``panels`` side by side, each titled."""
    height = max(canvas.shape[0] for _, canvas in panels)
    width = sum(canvas.shape[1] for _, canvas in panels)
    scale = 8.0 / max(width, height)
    figure = Figure(figsize=(max(width * scale, 3.0) + 0.4 * len(panels), height * scale + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, canvas) in zip(axes, panels, strict=True):
        ax.imshow(canvas, cmap="gray", vmin=0, vmax=levels - 1, interpolation="nearest")
        ax.set_facecolor("#3060a0")  # the gaps (NaN) between images
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.savefig(path, dpi=100)
    return Path(path)


def save_grid(images: np.ndarray, levels: int, path: str | os.PathLike, title: str) -> Path:
    """Save ``images: (N, 1, H, W)`` (integer levels ``0 … levels−1``) as one titled grid, about square."""
    return _save([(title, tile(images, int(np.ceil(np.sqrt(images.shape[0])))))], levels, path)


def plot_samples(
    model: ImageFlowModel,
    path: str | os.PathLike,
    *,
    temperatures: tuple[float, ...] = (1.0, 0.7),
    n: int = 64,
    seed: int = 0,
) -> Path:
    """Save ``n`` samples per temperature ``T`` (``x = f⁻¹(T z)``), one grid per ``T``, side by side.

    Every grid uses the same draws ``z`` (the same ``seed``), so cell ``k`` shows one latent point at
    each temperature.
    """
    columns = int(np.ceil(np.sqrt(n)))
    panels = []
    for temperature in temperatures:
        images = model.sample(n, np.random.default_rng(seed), temperature=temperature)
        panels.append((f"samples, T = {temperature:g}", tile(images, columns)))
    return _save(panels, model.levels, path)


def plot_reconstructions(model: ImageFlowModel, data: np.ndarray, path: str | os.PathLike, *, n: int = 32) -> Path:
    """Save ``n`` data images beside their reconstructions ``decode(encode(x))``.

    ``encode`` dequantises (``x + u``) and ``decode`` quantises (``⌊·⌋``), so a faithful inverse
    gives back ``x`` exactly; the title reports how many pixels differ.
    """
    x = data[:n]
    reconstruction = model.decode(model.encode(x))
    wrong = int(np.count_nonzero(reconstruction != x))
    columns = int(np.ceil(np.sqrt(len(x))))
    panels = [("data", tile(x, columns)), (f"decode(encode(x)): {wrong} pixels differ", tile(reconstruction, columns))]
    return _save(panels, model.levels, path)


def plot_interpolations(
    model: ImageFlowModel, data: np.ndarray, path: str | os.PathLike, *, pairs: int = 6, steps: int = 9
) -> Path:
    """Save latent interpolations between pairs of data images, one pair per row.

    Row ``k`` goes from ``x_a = data[2k]`` to ``x_b = data[2k+1]``: ``decode((1 − t) z_a + t z_b)``
    for ``t = 0, 1/(steps−1), …, 1`` with ``z = encode(x)``.
    """
    if data.shape[0] < 2 * pairs:
        raise ValueError(f"need {2 * pairs} images for {pairs} interpolations, got {data.shape[0]}")
    z = model.encode(data[: 2 * pairs])
    t = np.linspace(0.0, 1.0, steps, dtype=z.dtype)[None, :, None]
    path_z = (1 - t) * z[0::2, None, :] + t * z[1::2, None, :]  # (pairs, steps, D)
    images = model.decode(path_z.reshape(pairs * steps, -1))
    return _save([("latent interpolations", tile(images, steps))], model.levels, path)
