"""The ``fedchain`` command line: one entry point, a subcommand per job.

Each command lives in its own module with ``add_arguments(parser)`` and
``run(args) -> int``. Every command module is imported to build the parser
(``--help`` included), so command modules keep their top-level imports
light and import JAX and other heavy libraries inside ``run``; a test checks
that ``fedchain --help`` never loads JAX.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import version

# command -> (module, help). Nested tables are command groups.
COMMANDS: dict[str, tuple[str, str] | dict[str, tuple[str, str]]] = {
    "demo": ("fedchain.sims.demo", "the main demo on a simulated network, with a live view"),
    "train": (
        "fedchain.sims.train",
        "federated training of many devices with the learning library alone (no network)",
    ),
    "chain": (
        "fedchain.sims.chain_cmd",
        "verify a chain directory from its bytes alone (or write a sample chain)",
    ),
    "testnet": (
        "fedchain.sims.testnet",
        "write per-node homes (keys, genesis, peers) for a local or multi-machine network",
    ),
    "node": ("fedchain.sims.node_cmd", "run one real ledger node over encrypted TCP"),
    "launch": ("fedchain.sims.launch", "run every node home of a testnet as local processes"),
    "client": (
        "fedchain.sims.client_cmd",
        "put, get and query on a running node, every answer's proof checked",
    ),
    "bench": {
        "gossip": ("fedchain.sims.bench_gossip", "gossip dissemination at 1,000 and 10,000 nodes"),
        "transport": (
            "fedchain.sims.bench_transport",
            "encrypted TCP throughput against a plain-socket baseline",
        ),
        "learning": (
            "fedchain.sims.bench_learning",
            "one federated round of 40 and 400 devices against centralized DP training",
        ),
        "consensus": (
            "fedchain.sims.bench_consensus",
            "PBFT throughput and latency against offered load (Fig. 2), queries, 100 validators",
        ),
        "recovery": (
            "fedchain.sims.bench_recovery",
            "SIGKILL a block-writing process hundreds of times; count blocks lost",
        ),
    },
}


def _add_command(subparsers: argparse._SubParsersAction, name: str, module: str, help_: str):
    parser = subparsers.add_parser(name, help=help_, description=help_)
    parser.set_defaults(_module=module)
    try:
        importlib.import_module(module).add_arguments(parser)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        parser.set_defaults(_missing=True)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedchain",
        description="Peer-to-peer simulator for Industrial-Internet device identity "
        "and serverless federated learning.",
    )
    parser.add_argument("--version", action="version", version=f"fedchain {version('fedchain')}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, entry in COMMANDS.items():
        if isinstance(entry, dict):
            group = commands.add_parser(name, help=f"{name}: " + ", ".join(entry))
            sub = group.add_subparsers(title=f"{name} commands", metavar="WHAT", required=True)
            for sub_name, (module, help_) in entry.items():
                _add_command(sub, sub_name, module, help_)
        else:
            _add_command(commands, name, *entry)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module = getattr(args, "_module", None)
    if module is None:
        parser.print_help()
        return 0
    if getattr(args, "_missing", False):
        parser.error(f"this build has no {module}")
    try:
        return int(importlib.import_module(module).run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
