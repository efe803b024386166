"""``fedchain chain``: inspect and verify a chain from its bytes alone.

A chain directory holds ``chain.sqlite``, a block store whose height 0 is the
genesis (its canonical bytes, hashed by their SHA-256) and whose heights
1..tip are encoded blocks with their commit certificates. ``verify`` trusts
nothing but the genesis: it re-checks every certificate against the
validator set in force at each height and re-executes every block, and says
where the chain breaks. ``sample`` writes a small certified chain (seeded
validators and clients), so the command can be tried before a testnet
exists.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .arguments import int_at_least

CHAIN_FILE = "chain.sqlite"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="chain_command", required=True, metavar="ACTION")
    verify = sub.add_parser(
        "verify", help="verify every block from the genesis; say where it breaks"
    )
    verify.add_argument("dir", type=Path, help=f"a chain directory (holds {CHAIN_FILE})")
    verify.add_argument("--json", action="store_true", help="print only the JSON line")
    sample = sub.add_parser("sample", help="write a small certified sample chain to DIR")
    sample.add_argument("dir", type=Path)
    sample.add_argument("--blocks", type=int_at_least(1), default=20)
    sample.add_argument("--txs", type=int_at_least(1), default=50, help="transactions per block")
    sample.add_argument("--seed", type=int_at_least(0), default=1)


def run(args: argparse.Namespace) -> int:
    if args.chain_command == "sample":
        tip = write_sample_chain(args.dir, blocks=args.blocks, txs=args.txs, seed=args.seed)
        print(f"wrote {args.blocks} blocks to {args.dir / CHAIN_FILE} (tip {tip.hex()[:16]})")
        return 0
    return verify_dir(args.dir, json_only=args.json)


def verify_dir(directory: Path, *, json_only: bool = False) -> int:
    """Verify the chain in ``directory``; exit status 0 if whole, 1 if broken."""
    import time

    from fedchain.consensus.block import decode_block
    from fedchain.consensus.chain import verify_chain
    from fedchain.consensus.errors import MalformedMessage, StoreError
    from fedchain.consensus.genesis import decode_genesis
    from fedchain.consensus.store import SqliteBlockStore
    from fedchain.sims.report import emit_json, print_table

    path = directory / CHAIN_FILE
    if not path.is_file():
        raise SystemExit(f"fedchain chain verify: no {CHAIN_FILE} in {directory}")
    started = time.perf_counter()
    broken: tuple[int, str] | None = None

    def unreadable(broken_at: int | None, error: str) -> int:
        """Nothing to verify against: say why, as the JSON line too."""
        figures = {"ok": False, "broken_at": broken_at, "error": error}
        print(json.dumps(figures) if json_only else f"chain store unreadable: {error}")
        return 1

    try:
        store = SqliteBlockStore(str(path))
    except StoreError as exc:  # damaged rows near the tip are caught on open
        return unreadable(None, f"{exc.reason}: {exc}")
    with store:
        # Everything rests on the genesis: a damaged one breaks the chain at 0.
        try:
            first = store.get(0)
            if first is None:
                return unreadable(0, f"{path} holds no genesis")
            genesis = decode_genesis(first.data)
        except (StoreError, MalformedMessage) as exc:
            return unreadable(0, f"{exc.reason}: the genesis: {exc}")
        if genesis.hash != first.block_hash:
            return unreadable(0, "the genesis does not match its hash")
        stored_tip = store.tip()

        def blocks():
            """Stored blocks in order, read one height at a time so a damaged
            row is named by its height; stops there, or at a block stored
            under another block's hash (verify_chain judges the rest,
            malformed bytes included)."""
            nonlocal broken
            for height in range(1, stored_tip + 1):
                try:
                    stored = store.get(height)
                except StoreError as exc:
                    broken = (height, f"{exc.reason}: {exc}")
                    return
                try:
                    misfiled = decode_block(stored.data).hash != stored.block_hash
                except MalformedMessage:
                    misfiled = False
                if misfiled:
                    broken = (height, "store: block stored under another hash")
                    return
                yield stored.data

        report = verify_chain(genesis, blocks())
    if not report.ok:
        broken = (report.height, report.error or "")
    figures = {
        "chain_id": genesis.chain_id,
        "ok": broken is None,
        "verified_height": report.tip.height,
        "stored_height": stored_tip,
        "broken_at": None if broken is None else broken[0],
        "error": None if broken is None else broken[1],
        "tip_hash": report.tip.block_hash.hex(),
        "state_root": report.tip.state.root.hex(),
        "validators": len(report.tip.validators),
        "wall_s": round(time.perf_counter() - started, 3),
    }
    if json_only:
        print(json.dumps(figures))
    else:
        print_table(
            f"chain {genesis.chain_id} in {directory}",
            ["figure", "value"],
            [(key, "-" if value is None else value) for key, value in figures.items()],
        )
        if broken is None:
            print(f"chain verified: heights 1..{report.tip.height}, every certificate and root")
        else:
            print(f"chain breaks at height {broken[0]}: {broken[1]}")
        emit_json("chain_verify", figures)
    return 0 if broken is None else 1


def write_sample_chain(directory: Path, *, blocks: int, txs: int, seed: int) -> bytes:
    """A certified chain of ``blocks`` blocks of ``txs`` kv transactions each,
    from 4 seeded validators and 10 clients; returns the tip's hash."""
    import numpy as np

    from fedchain.consensus.block import encode_block
    from fedchain.consensus.chain import ChainTip, Executor
    from fedchain.consensus.contracts import kv_set
    from fedchain.consensus.genesis import Genesis
    from fedchain.consensus.store import SqliteBlockStore, StoredBlock
    from fedchain.consensus.tx import sign_transaction
    from fedchain.consensus.votes import CommitCertificate, quorum, sign_commit_vote
    from fedchain.p2p.identity import Identity

    rng = np.random.default_rng(seed)
    validators = [Identity.from_rng(rng) for _ in range(4)]
    clients = [Identity.from_rng(rng) for _ in range(10)]
    chain_id = f"sample-{seed}"
    genesis = Genesis.create(chain_id, 1_700_000_000_000, [v.public_key for v in validators])
    executor = Executor(genesis)
    tip = ChainTip.of_genesis(genesis)
    nonces = [0] * len(clients)
    directory.mkdir(parents=True, exist_ok=True)
    with SqliteBlockStore(str(directory / CHAIN_FILE)) as store:
        store.append(StoredBlock(0, genesis.hash, genesis.encode()))
        for height in range(1, blocks + 1):
            batch = []
            for k in range(txs):
                who = (height * txs + k) % len(clients)
                content = kv_set(f"reading-{k % 7}", int(rng.integers(0, 1000)))
                batch.append(
                    sign_transaction(
                        clients[who],
                        chain_id,
                        type="kv",
                        content=content,
                        nonce=nonces[who],
                        timestamp=genesis.genesis_time + height,
                    )
                )
                nonces[who] += 1
            proposer = validators[height % 4]
            block, state = executor.build_block(
                tip,
                batch,
                timestamp=genesis.genesis_time + 1000 * height,
                view=0,
                proposer=proposer.public_key,
            )
            signers = validators[: quorum(len(validators))]
            votes = [
                (s.public_key, sign_commit_vote(s, chain_id, height, block.hash, view=0))
                for s in signers
            ]
            block = block.with_certificate(CommitCertificate.of(height, block.hash, votes, view=0))
            store.append(StoredBlock(height, block.hash, encode_block(block)))
            tip = ChainTip(height, block.hash, block.header.timestamp, state)
    return tip.block_hash
