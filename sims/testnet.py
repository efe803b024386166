"""``fedchain testnet``: per-node homes for a local or multi-machine network."""

from __future__ import annotations

import argparse
from pathlib import Path

from .arguments import int_at_least, int_between, port, power_of_two

MAX_BLOCK_TXS = 100_000
"""More than a block's 8 MiB can carry (~84,000 of the smallest
transactions, ~100 bytes each); the genesis format itself allows up to
2**40 - 1."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--validators", type=int_at_least(1), default=4)
    parser.add_argument("--out", type=Path, required=True, help="folder for the node homes")
    parser.add_argument("--chain-id", default="fedchain-testnet")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--host", default="127.0.0.1", help="address every node listens on")
    where.add_argument(
        "--hosts",
        help="one host per node, comma separated, for several machines: peers dial "
        "host:port and each node accepts on every interface",
    )
    parser.add_argument("--base-port", type=port, default=26656, help="node i listens on base+i")
    parser.add_argument(
        "--seed", type=int_at_least(0), default=None, help="derive keys from a seed (demos)"
    )
    parser.add_argument(
        "--state-buckets",
        type=power_of_two(2**20),
        default=16384,
        help="hash buckets of the provable state, fixed for the chain's life: about the "
        "keys you expect / 8 (a write costs more as buckets fill; see consensus/state.py)",
    )
    parser.add_argument(
        "--max-block-txs",
        type=int_between(1, MAX_BLOCK_TXS),
        default=2000,
        help="transactions a block may hold, fixed for the chain's life",
    )


def run(args: argparse.Namespace) -> int:
    import time

    from fedchain.consensus.genesis import ConsensusParams
    from fedchain.sims.home import write_testnet

    hosts = None if args.hosts is None else [h.strip() for h in args.hosts.split(",")]
    try:
        homes = write_testnet(
            args.out,
            args.validators,
            chain_id=args.chain_id,
            host=args.host,
            hosts=hosts,
            base_port=args.base_port,
            genesis_time_ms=time.time_ns() // 1_000_000,
            seed=args.seed,
            params=ConsensusParams(
                max_block_txs=args.max_block_txs, state_buckets=args.state_buckets
            ),
        )
    except (ValueError, FileExistsError) as exc:
        raise SystemExit(f"fedchain testnet: {exc}") from exc
    for home in homes:
        print(f"wrote {home}")
    if hosts is not None:
        print("copy each nodeN to its host, then run there: fedchain node --home nodeN")
    else:
        print(f"start each with: fedchain node --home {args.out}/nodeN")
    return 0
