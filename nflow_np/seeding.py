"""One convention for randomness: every ``rng`` argument takes an integer seed or a ``Generator``.

``model.sample(1000, 0)`` and ``model.sample(1000, np.random.default_rng(0))`` draw the same
samples, as in SciPy and scikit-learn habits. Functions whose randomness must be reproduced across
several streams (``fit``, the data loaders) keep an integer ``seed``.
"""

from __future__ import annotations

import numbers

import numpy as np


def as_generator(rng: object, default_seed: int | None = None) -> object:
    """``rng`` as a random generator.

    Parameters
    ----------
    rng : int, numpy.random.Generator, a device Generator (e.g. CuPy's), or None
        A non-negative integer is a seed for ``np.random.default_rng``; a generator is used as it is.
    default_seed : int, optional
        The seed used when ``rng`` is ``None``; without it ``None`` gives a fresh unseeded generator.

    Returns
    -------
    numpy.random.Generator (or the device generator given)

    Raises
    ------
    TypeError
        Anything else (a float, a string, the legacy ``RandomState``), named.
    ValueError
        A negative seed.
    """
    if rng is None:
        return np.random.default_rng(default_seed)
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        if rng < 0:
            raise ValueError(f"a seed must be a non-negative integer, got {rng}")
        return np.random.default_rng(int(rng))
    duck = hasattr(rng, "standard_normal") or hasattr(rng, "random")  # CuPy's Generator, a test's stand-in
    if isinstance(rng, np.random.Generator) or (duck and not isinstance(rng, np.random.RandomState)):
        return rng
    raise TypeError(f"rng must be an integer seed or a numpy.random.Generator, got {type(rng).__name__} {rng!r}")
