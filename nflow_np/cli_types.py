"""Argument types shared by the ``nflow`` subcommands (``cli.py``, ``vi_cli.py``): one message style."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def number(convert: type, minimum: float, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: ``convert(text)``, finite, at least (or, if ``strict``, above) ``minimum``."""
    kind = "an integer" if convert is int else "a number"

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {kind} {'>' if strict else '>='} {minimum}, got {text!r}")
        return value

    return parse


def positive_ints(example: str, noun: str = "integers") -> Callable[[str], tuple[int, ...]]:
    """An argparse type: comma-separated positive integers, ``"64,64"`` → ``(64, 64)``; ``noun`` names them."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.split(","))
        except ValueError:
            values = ()
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive {noun} like {example}, got {text!r}")
        return values

    return parse


def fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1 (a share of rows, ``--val-fraction``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 (both excluded), got {text!r}")
    return value
