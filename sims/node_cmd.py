"""``fedchain node --home DIR``: one real ledger node over encrypted TCP.

Runs until interrupted (Ctrl-C or SIGTERM), storing blocks in
``DIR/chain.sqlite``; restarted on the same home, it replays its store and
catches up from its peers. Prints one JSON line when it is listening, then
one status line every ``--status-every`` seconds on stderr (height, epoch and
role, mempool, how much of it came from clients and their limit, PBFT's view
and unexecuted slots, refusals, transport counters, live connections by
cipher suite).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .arguments import int_at_least, seconds

CIPHERS = ("auto", "xsalsa20-poly1305", "aes-256-gcm")
"""``--cipher`` choices: ``auto`` offers XSalsa20-Poly1305, and AES-256-GCM
where this CPU has AES-NI (two such ends pick AES-256-GCM); a named suite is
the only one offered, so a peer without it is refused (``no_common_suite``)."""


def add_cipher_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cipher",
        choices=CIPHERS,
        default="auto",
        help="records' cipher suite: auto (AES-256-GCM between AES-NI machines, else "
        "XSalsa20-Poly1305) or one suite to insist on",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, required=True, help="a folder fedchain testnet wrote")
    parser.add_argument("--status-every", type=seconds(), default=5.0)
    parser.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=1000,
        help="PBFT batch (transactions; at most what the genesis lets a block hold)",
    )
    parser.add_argument(
        "--batch-timeout",
        type=seconds(zero_ok=True),
        default=None,
        help="seconds a short batch waits (default: PbftConfig's)",
    )
    parser.add_argument(
        "--mempool", type=int_at_least(1), default=20_000, help="mempool bound (transactions)"
    )
    parser.add_argument(
        "--queue-seconds",
        type=seconds(zero_ok=True),
        default=2.0,
        help="clients hear busy once more is queued than commits in this many seconds "
        "(0: only the --mempool bound)",
    )
    parser.add_argument(
        "--journal-sync",
        choices=("full", "normal"),
        default="full",
        help="PBFT's journal: fsync each record before the message it binds (full), or "
        "leave it to the next block append (normal: safe against a process crash, "
        "not a power cut in between; lower latency)",
    )
    parser.add_argument(
        "--view-timeout",
        type=seconds(),
        default=5.0,
        help="seconds without progress before a view change (doubles per unproductive view); "
        "must exceed one full batch's validation on the slowest validator",
    )
    add_cipher_argument(parser)
    parser.add_argument(
        "--default-gc",
        action="store_true",
        help="keep CPython's default garbage-collector thresholds (for comparison; "
        "see fedchain.sims.collector)",
    )


def run(args: argparse.Namespace) -> int:
    import trio

    from fedchain.sims.collector import tune_for_throughput
    from fedchain.sims.home import HomeError, load_home

    try:
        home = load_home(args.home)
        tcp = tcp_config(args.cipher)
    except (HomeError, ValueError) as exc:
        raise SystemExit(f"fedchain node: {exc}") from exc
    from fedchain.consensus.errors import ConsensusError

    if not args.default_gc:
        tune_for_throughput()
    try:
        trio.run(serve, home, args, tcp)
    except* ConsensusError as group:  # a stored chain that does not replay, a store failing
        raise SystemExit(
            f"fedchain node: stopped on its chain in {home.store_path}: {_first_leaf(group)} "
            f"(`fedchain chain verify {args.home}` checks the stored chain block by block; "
            "a store written by another fedchain version does not decode)"
        ) from None
    return 0


def _first_leaf(group: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups."""
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


def tcp_config(cipher: str):
    """The transport settings ``--cipher`` asks for; ``ValueError`` when this
    CPU cannot keep the suite (AES-256-GCM without AES-NI)."""
    from fedchain.p2p.handshake import SUITE_NAMES, check_suites
    from fedchain.p2p.tcp import TcpConfig

    if cipher == "auto":
        return TcpConfig()
    if cipher not in CIPHERS:  # never plaintext: that is the benchmark's alone
        raise ValueError(f"unknown cipher suite {cipher!r}: choose from {', '.join(CIPHERS)}")
    suites = {name: code for code, name in SUITE_NAMES.items()}[cipher]
    check_suites(suites)
    return TcpConfig(suites=suites)


def pbft_status(replica) -> dict:
    """Where PBFT stands: executed, watermarks, and the phase of each
    unexecuted slot of the current view (what a stalled node waits for)."""
    slots = {
        str(seq): int(slot.phase)
        for (view, seq), slot in sorted(replica.log.items())
        if view == replica.view and seq > replica.executed
    }
    return {
        "view": replica.view,
        "executed": replica.executed,
        "low": replica.low,
        "next_seq": replica.next_seq,
        "mode": int(replica.mode),
        "slots": slots,
        "parked": sorted(replica.parked),
    }


async def serve(home, args: argparse.Namespace, tcp) -> None:
    import json
    import signal
    import sys
    from collections import Counter

    import trio

    from fedchain.consensus.ledger_node import open_ledger_node
    from fedchain.consensus.pbft import PbftConfig
    from fedchain.consensus.store import SqliteBlockStore

    store = SqliteBlockStore(home.store_path)
    batch_timeout = args.batch_timeout
    pbft = PbftConfig(
        # A batch is full at what a block may hold (the chain's genesis).
        batch_size=min(args.batch_size, home.genesis.params.max_block_txs),
        batch_timeout=PbftConfig.batch_timeout if batch_timeout is None else batch_timeout,
        view_change_timeout=args.view_timeout,
    )
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with open_ledger_node(
                home.identity,
                home.genesis,
                store,
                listen=home.accept_at,
                peers=home.peers,
                pbft=pbft,
                mempool_txs=args.mempool,
                queue_seconds=args.queue_seconds or None,
                journal_fsync=args.journal_sync == "full",
                seed=home.index,
                tcp=tcp,
            ) as running:
                host, port = running.transport.listen_address
                ready = {
                    "node": home.index,
                    "key": home.identity.public_key.hex(),
                    "listen": f"{host}:{port}",
                    "height": store.tip(),
                    "batch_size": pbft.batch_size,
                    "batch_timeout_s": pbft.batch_timeout,
                    "cipher": args.cipher,
                }
                print(json.dumps(ready), flush=True)
                async with trio.open_nursery() as nursery:

                    async def status() -> None:
                        while True:
                            await trio.sleep(args.status_every)
                            ledger = running.ledger
                            line = {
                                "height": store.tip(),
                                "epoch": ledger.epoch,
                                "role": "validator" if ledger.is_validator else "follower",
                                "mempool": len(ledger.mempool),
                                "from_clients": ledger.mempool.from_clients,
                                "pending": ledger.mempool.pending,
                                "client_limit": ledger.mempool.client_limit,
                                "in_flight": len(ledger.mempool.in_flight),
                                "held_frames": list(running.node.held),
                                "held_submissions": running.service.held_submissions,
                                "refused": dict(ledger.replica.refused) if ledger.replica else {},
                                "suspects": dict(ledger.suspects),
                                "pbft": pbft_status(ledger.replica) if ledger.replica else None,
                                "node": {
                                    k: v
                                    for k, v in running.node.counters.items()
                                    if not k.startswith("accepted")
                                },
                                "transport": running.transport.stats(),
                                "ciphers": Counter(
                                    c.suite for c in running.transport.connections().values()
                                ),
                            }
                            print(json.dumps(line), file=sys.stderr, flush=True)

                    nursery.start_soon(status)
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        break
    finally:
        store.close()
