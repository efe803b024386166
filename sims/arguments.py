"""Argument types for comma-separated lists on the command line.

argparse turns an ``ArgumentTypeError`` into a usage message and exit
status 2, so ``--rates abc`` says what it wants instead of a traceback
from deep inside a benchmark.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Collection

__all__ = [
    "fraction",
    "int_at_least",
    "int_between",
    "names_from",
    "non_negative",
    "port",
    "positive_ints",
    "power_of_two",
    "seconds",
]


def positive_ints(count: int | None = None) -> Callable[[str], list[int]]:
    """``"250,500"`` -> ``[250, 500]``: positive integers, ``count`` of them if given."""

    def parse(text: str) -> list[int]:
        values = [int_at_least(1)(part) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
        if count is not None and len(values) != count:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {count} integers")
        return values

    return parse


def names_from(allowed: Collection[str]) -> Callable[[str], list[str]]:
    """``"a,b"`` -> ``["a", "b"]``, each one of ``allowed``."""

    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [n for n in names if n not in allowed]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(sorted(allowed))}")
        return names

    return parse


def power_of_two(high: int) -> Callable[[str], int]:
    """A power of two from 1 to ``high`` (hash bucket counts)."""

    def parse(text: str) -> int:
        value = int_between(1, high)(text)
        if value & (value - 1):
            raise argparse.ArgumentTypeError(f"{value} is not a power of two from 1 to {high}")
        return value

    return parse


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= ``low`` (counts, sizes, seeds)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def int_between(low: int, high: int) -> Callable[[str], int]:
    """An integer from ``low`` to ``high`` (limits a genesis fixes)."""

    def parse(text: str) -> int:
        value = int_at_least(low)(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer <= {high:,}")
        return value

    parse.__name__ = f"integer in {low}..{high}"
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def seconds(*, zero_ok: bool = False) -> Callable[[str], float]:
    """A finite duration in seconds, > 0 (or >= 0 where 0 means "off")."""

    def parse(text: str) -> float:
        value = _number(text)
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            bound = ">= 0" if zero_ok else "> 0"
            raise argparse.ArgumentTypeError(f"{text!r}: expected seconds {bound}")
        return value

    parse.__name__ = "seconds"
    return parse


def non_negative(text: str) -> float:
    """A finite number >= 0 (a speed, where 0 means "as fast as possible")."""
    value = _number(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number >= 0")
    return value


def fraction(text: str) -> float:
    """A probability in [0, 1] (a loss rate)."""
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a fraction in [0, 1]")
    return value


port = int_between(1, 65535)
"""A TCP port, 1..65535."""
