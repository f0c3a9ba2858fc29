"""Data for the examples: seeded samplers of the 2-D benchmark densities and their splits."""

from nflow_np.data.toy2d import (
    TOY_DATASETS,
    Splits,
    load_toy,
    make_checkerboard,
    make_circles,
    make_eight_gaussians,
    make_pinwheel,
    make_two_moons,
    make_two_spirals,
)

__all__ = [
    "TOY_DATASETS",
    "Splits",
    "load_toy",
    "make_checkerboard",
    "make_circles",
    "make_eight_gaussians",
    "make_pinwheel",
    "make_two_moons",
    "make_two_spirals",
]
