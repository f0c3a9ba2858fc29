"""Data for the examples: seeded samplers of the 2-D benchmark densities, real digit images; their splits."""

from nflow_np.data.images import IMAGE_DATASETS, ImageSplits, load_images
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
    "IMAGE_DATASETS",
    "TOY_DATASETS",
    "ImageSplits",
    "Splits",
    "load_images",
    "load_toy",
    "make_checkerboard",
    "make_circles",
    "make_eight_gaussians",
    "make_pinwheel",
    "make_two_moons",
    "make_two_spirals",
]
