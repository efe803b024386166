"""Argument types for comma-separated lists on the command line.

argparse turns an ``ArgumentTypeError`` into a usage message and exit
status 2, so ``--rates abc`` says what it wants instead of a traceback
from deep inside a benchmark.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection

__all__ = ["names_from", "positive_ints"]


def positive_ints(count: int | None = None) -> Callable[[str], list[int]]:
    """``"250,500"`` -> ``[250, 500]``: positive integers, ``count`` of them if given."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected positive integers separated by commas"
            ) from None
        if not values or any(v <= 0 for v in values):
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
