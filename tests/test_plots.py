"""Plots of a 2-D model (nflow_np/plots.py): files are PNGs, bounds are honoured, other dimensions refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nflow_np.architectures import build_model
from nflow_np.plots import default_bounds, plot_density, plot_samples

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plots_are_pngs(tmp_path: Path, dtype: type) -> None:
    model = build_model("nice", 2, layers=2, hidden=(8,), dtype=dtype)
    data = np.random.default_rng(0).normal(size=(300, 2))
    assert plot_density(model, data, tmp_path / "d.png", grid=20) == tmp_path / "d.png"
    plot_density(model, data, tmp_path / "b.png", grid=20, bounds=((-5, 5), (-1, 1)))
    plot_samples(model, data, tmp_path / "s.png", n=100, temperature=0.5)
    for name in ("d.png", "b.png", "s.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)


def test_plots_in_a_data_files_units_name_its_columns_and_keep_each_axis_its_own(tmp_path: Path) -> None:
    """Columns in different units (cm and g): no equal aspect, which would squash one axis to a line."""
    from nflow_np.model import with_standardization

    model = with_standardization(build_model("realnvp", 2, layers=1, hidden=(4,)), [170.0, 0.003], [9.0, 0.001])
    data = np.random.default_rng(1).normal(size=(200, 2)) * [9.0, 0.001] + [170.0, 0.003]
    style = {"labels": ("height_cm", "dose_g"), "equal_aspect": False}
    plot_density(model, data, tmp_path / "d.png", grid=20, **style)
    plot_samples(model, data, tmp_path / "s.png", n=100, **style)
    for name in ("d.png", "s.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
    from PIL import Image

    for name in ("d.png", "s.png"):  # a readable square-ish figure, not the 2.5-inch strip equal aspect gives
        width, height = Image.open(tmp_path / name).size
        assert height >= 0.45 * width, (name, width, height)


def test_default_bounds_cover_the_data_with_a_margin() -> None:
    data = np.stack([np.linspace(0, 10, 1001), np.full(1001, 3.0)], axis=1)
    (x0, x1), (y0, y1) = default_bounds(data, margin=0.1)
    assert x0 < 0.05 < 9.95 < x1 and x0 > -1.1 and x1 < 11.1
    assert y0 < 3 < y1  # a constant coordinate still gets a non-empty range


def test_plots_refuse_bad_input(tmp_path: Path) -> None:
    data = np.zeros((10, 2))
    with pytest.raises(ValueError, match="only drawn for 2-D models"):
        plot_density(build_model("realnvp", 3, layers=1, hidden=(4,)), np.zeros((10, 3)), tmp_path / "x.png")
    model = build_model("realnvp", 2, layers=1, hidden=(4,))
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        plot_samples(model, np.zeros((10, 3)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="min < max"):
        plot_density(model, data, tmp_path / "x.png", bounds=((1, 0), (0, 1)))
    assert not any(tmp_path.iterdir())
