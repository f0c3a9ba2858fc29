"""Pictures of a 2-D model: its density beside a histogram of the data, its samples beside the data.

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), without
``pyplot``: nothing here switches the process-wide backend or registers figures globally, so it
runs headless and leaves an interactive session (a notebook) as it was.
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

from nflow_np.model import FlowModel

Bounds = tuple[tuple[float, float], tuple[float, float]]


def default_bounds(data: np.ndarray, margin: float = 0.1) -> Bounds:
    """``((x_min, x_max), (y_min, y_max))``: the 0.5–99.5 percentile box of ``data: (N, 2)``, widened by ``margin``."""
    low, high = np.percentile(data, [0.5, 99.5], axis=0)
    span = np.where(high > low, high - low, 1.0)
    low, high = low - margin * span, high + margin * span
    return (float(low[0]), float(high[0])), (float(low[1]), float(high[1]))


def _check_2d(model: FlowModel, data: np.ndarray) -> np.ndarray:
    if model.dim != 2:
        raise ValueError(f"plots are only drawn for 2-D models, this one has dimension {model.dim}")
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != 2 or data.shape[0] == 0:
        raise ValueError(f"data must have shape (N, 2) with N >= 1, got {data.shape}")
    return data


def _resolve_bounds(data: np.ndarray, bounds: Bounds | None) -> Bounds:
    if bounds is None:
        return default_bounds(data)
    (x0, x1), (y0, y1) = bounds = tuple((float(low), float(high)) for low, high in bounds)
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"bounds must be ((x_min, x_max), (y_min, y_max)) with min < max, got {bounds}")
    return bounds


def _new_figure(bounds: Bounds, equal_aspect: bool = True) -> tuple[Figure, list]:
    """Two side-by-side panels of width 5 in, as high as the equal-aspect ``bounds`` need (square otherwise)."""
    (x0, x1), (y0, y1) = bounds
    height = (min(max(5 * (y1 - y0) / (x1 - x0), 2.5), 8.0) if equal_aspect else 4.4) + 0.6
    figure = Figure(figsize=(10, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, list(figure.subplots(1, 2))


def _frame(axes: object, bounds: Bounds, title: str, labels: tuple[str, str] | None, equal_aspect: bool) -> None:
    axes.set_xlim(bounds[0])
    axes.set_ylim(bounds[1])
    axes.set_aspect("equal" if equal_aspect else "auto")
    axes.set_title(title)
    x_label, y_label = ("x₁", "x₂") if labels is None else labels
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)


def plot_density(
    model: FlowModel,
    data: np.ndarray,
    path: str | os.PathLike,
    *,
    bounds: Bounds | None = None,
    grid: int = 200,
    labels: tuple[str, str] | None = None,
    equal_aspect: bool = True,
) -> Path:
    """Save the data as a 2-D histogram (left) beside the model density ``exp(log p(x))`` (right).

    Parameters
    ----------
    model : FlowModel
        A 2-D model.
    data : numpy.ndarray, shape (N, 2)
    path : str or os.PathLike
        Image file; the format follows the suffix (``.png``).
    bounds : ((x_min, x_max), (y_min, y_max)), optional
        Region shown in both panels; default :func:`default_bounds` of ``data``.
    grid : int
        The density is evaluated on a ``grid × grid`` lattice.
    labels : (str, str), optional
        The axes' names (default ``x₁``, ``x₂``): a data file's column names.
    equal_aspect : bool
        One unit the same length on both axes; ``False`` for coordinates in different units.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    data = _check_2d(model, data)
    if grid < 2:
        raise ValueError(f"grid must be at least 2, got {grid}")
    (x0, x1), (y0, y1) = bounds = _resolve_bounds(data, bounds)
    xs, ys = np.meshgrid(np.linspace(x0, x1, grid), np.linspace(y0, y1, grid))
    points = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(model.dtype or np.float64)
    density = np.exp(model.log_prob(points)).reshape(grid, grid)

    figure, (left, right) = _new_figure(bounds, equal_aspect)
    bins = max(grid // 2, 2)
    *_, counts = left.hist2d(data[:, 0], data[:, 1], bins=bins, range=bounds, cmap="viridis")
    _frame(left, bounds, f"data ({data.shape[0]} points)", labels, equal_aspect)
    figure.colorbar(counts, ax=left, label="points per bin", shrink=0.8)
    shown = right.imshow(density, origin="lower", extent=(x0, x1, y0, y1), cmap="viridis", interpolation="nearest")
    _frame(right, bounds, "model density p(x)", labels, equal_aspect)
    figure.colorbar(shown, ax=right, label="p(x)", shrink=0.8)
    figure.savefig(path, dpi=100)
    return Path(path)


def plot_samples(
    model: FlowModel,
    data: np.ndarray,
    path: str | os.PathLike,
    *,
    n: int = 2000,
    seed: int = 0,
    temperature: float = 1.0,
    bounds: Bounds | None = None,
    labels: tuple[str, str] | None = None,
    equal_aspect: bool = True,
) -> Path:
    """Save up to ``n`` data points (left) beside ``n`` model samples (right), on the same axes.

    Parameters
    ----------
    model : FlowModel
        A 2-D model.
    data : numpy.ndarray, shape (N, 2)
    path : str or os.PathLike
        Image file; the format follows the suffix (``.png``).
    n : int
        Number of samples (and at most this many data points).
    seed : int
        Seeds the sampling.
    temperature : float
        Passed to :meth:`FlowModel.sample`.
    bounds : ((x_min, x_max), (y_min, y_max)), optional
        Region shown in both panels; default :func:`default_bounds` of ``data``.
    labels, equal_aspect
        As for :func:`plot_density`.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    data = _check_2d(model, data)
    samples = model.sample(n, np.random.default_rng(seed), temperature=temperature)
    bounds = _resolve_bounds(data, bounds)

    figure, (left, right) = _new_figure(bounds, equal_aspect)
    shown = data[:n]
    left.scatter(shown[:, 0], shown[:, 1], s=2, alpha=0.5)
    _frame(left, bounds, f"data ({shown.shape[0]} points)", labels, equal_aspect)
    right.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5, color="tab:orange")
    _frame(right, bounds, f"model samples ({n}, T = {temperature:g})", labels, equal_aspect)
    figure.savefig(path, dpi=100)
    return Path(path)
