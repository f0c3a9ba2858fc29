"""Figure 3 of Rezende & Mohamed 2015: each 2-D target's density beside the fitted ``q_K``.

Both densities are exact, evaluated on a grid: the target as ``exp(−U(z) − log Z)``, the flow as
``exp(log q_K(z))`` through its inverse (:func:`nflow_np.vi.log_q`), no histogram of samples.
Figures are drawn on matplotlib's Agg canvas directly, without ``pyplot``, as in
:mod:`nflow_np.plots`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError as error:  # matplotlib is the optional extra "plots"
    raise ImportError(f"drawing pictures needs matplotlib ({error}): pip install 'nflow_np[plots]'") from error

from nflow_np.flows.base import Flow
from nflow_np.targets import Target, grid_points
from nflow_np.vi import log_q


def target_density(target: Target, log_z: float, points: int = 200) -> np.ndarray:
    """``p(z) = exp(−U(z) − log Z)`` on :func:`grid_points` of the target's plot box, shape (points, points)."""
    value, _ = target.energy(grid_points(target.plot_bounds, points))
    return np.exp(-value - log_z).reshape(points, points)


def flow_density(flow: Flow, bounds: tuple[float, float], points: int = 200) -> np.ndarray:
    """``q_K(z)`` on :func:`grid_points` of ``bounds``, shape (points, points)."""
    grid = grid_points(bounds, points).astype(flow.dtype or np.float64)
    return np.exp(log_q(flow, grid).astype(np.float64)).reshape(points, points)


@dataclass
class FigureRow:
    """One target of the figure: its ``log Z`` and the fitted flows by number of layers ``K``.

    ``kl`` maps ``K`` to the measured ``KL(q_K‖p)`` shown in the panel title (optional).
    """

    target: Target
    log_z: float
    flows: dict[int, Flow]
    kl: dict[int, float] | None = None


def plot_figure3(
    rows: Sequence[FigureRow], path: str | os.PathLike, *, points: int = 200, flow_name: str = "planar"
) -> Path:
    """Save a grid: one row per target, its true density first, then ``q_K`` for each ``K``.

    All panels of a row share one colour scale (the largest density of the row) so they compare.

    Returns
    -------
    pathlib.Path
    """
    if not rows:
        raise ValueError("plot_figure3 needs at least one row")
    columns = 1 + max(len(row.flows) for row in rows)
    figure = Figure(figsize=(2.6 * columns, 2.7 * len(rows)), layout="constrained")
    FigureCanvasAgg(figure)
    grid = np.atleast_2d(figure.subplots(len(rows), columns, squeeze=False))
    for i, row in enumerate(rows):
        panels = [(f"{row.target.name}: exp(−U)/Z", target_density(row.target, row.log_z, points))]
        for k, flow in sorted(row.flows.items()):
            title = f"{flow_name} K = {k}"
            if row.kl and k in row.kl:
                title += f"\nKL = {row.kl[k]:.3f} nats"
            panels.append((title, flow_density(flow, row.target.plot_bounds, points)))
        top = max(float(density.max()) for _, density in panels)
        low, high = row.target.plot_bounds
        for j in range(columns):
            axes = grid[i, j]
            axes.set_xticks([])
            axes.set_yticks([])
            if j >= len(panels):
                axes.set_axis_off()
                continue
            title, density = panels[j]
            axes.imshow(density, origin="lower", extent=(low, high, low, high), cmap="inferno", vmin=0, vmax=top)
            axes.set_title(title, fontsize=9)
            axes.set_aspect("equal")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
