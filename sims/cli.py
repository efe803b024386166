"""The ``fedchain`` command line."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedchain", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fedchain {version('fedchain')}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    del args
    return 0


if __name__ == "__main__":
    sys.exit(main())
