"""``fedchain client``: talk to a running ledger node from the shell.

A thin command over :class:`fedchain.consensus.LedgerClient`, so everything
it prints was checked the way any client checks it: commit proofs and query
answers against the validator set it trusts (the genesis set from the
node's home, followed through set changes by proof). The node is a
stranger: an answer that does not verify is an error, never output.

    fedchain client keygen alice.key
    fedchain client --home net/node0 --key alice.key put temperature 21
    fedchain client --home net/node0 --key alice.key get temperature
    fedchain client --home net/node0 query sys/validators

``--home`` names a node home (``fedchain testnet`` wrote it): its address,
its public key and the chain's genesis are what a client needs. ``put``
stores a value in the key's own namespace (the kv contract,
``kv/<public key hex>/NAME``), waits until it is final and prints the
checked proof's height (a put the node does not make final within
``--patience`` seconds goes to the other validators the home names too,
as PBFT clients retransmit: a primary that censors it or a node that
crashed is then bypassed); ``get`` reads ``kv/<owner>/NAME`` (the key's own
namespace, or ``--owner``); ``query`` reads any state key. Each prints one
JSON line; a refusal, a timeout or an answer that does not verify exits
non-zero with the reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .arguments import seconds
from .node_cmd import add_cipher_argument, tcp_config

EXIT_FAILED = 1
"""The node refused, timed out or could not be reached."""
EXIT_UNTRUSTED = 2
"""The node answered something that does not verify."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, help="the home of the node to ask")
    parser.add_argument("--key", type=Path, help="this client's key file (fedchain client keygen)")
    parser.add_argument("--timeout", type=seconds(), default=30.0, help="seconds per request")
    parser.add_argument(
        "--patience",
        type=seconds(),
        default=5.0,
        help="put: seconds before the transaction also goes to the other validators "
        "(then twice as long, and so on), as PBFT clients retransmit",
    )
    add_cipher_argument(parser)
    sub = parser.add_subparsers(dest="client_command", required=True, metavar="ACTION")
    keygen = sub.add_parser("keygen", help="write a new client key (hex seed, mode 0600)")
    keygen.add_argument("path", type=Path)
    put = sub.add_parser("put", help="store a value under NAME in this key's namespace")
    put.add_argument("name")
    put.add_argument("value", help='JSON (21, [1, 2], "text") or else taken as a string')
    get = sub.add_parser("get", help="read NAME from a key's namespace, with its proof checked")
    get.add_argument("name")
    get.add_argument("--owner", help="whose namespace (public key hex; default: --key's)")
    query = sub.add_parser("query", help="read any state key, with its proof checked")
    query.add_argument("state_key")


def run(args: argparse.Namespace) -> int:
    if args.client_command == "keygen":
        return _keygen(args.path)
    import trio

    if args.home is None:
        raise SystemExit("fedchain client: --home is required (the node to ask)")
    return trio.run(_serve, args)


def _keygen(path: Path) -> int:
    import os
    import secrets

    from fedchain.p2p.identity import Identity

    if path.exists():
        raise SystemExit(f"fedchain client keygen: {path} exists (not overwritten)")
    seed = secrets.token_bytes(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(seed.hex() + "\n")
    print(json.dumps({"key_file": str(path), "public_key": Identity(seed).public_key.hex()}))
    return 0


def _load_key(path: Path | None):
    from fedchain.p2p.identity import Identity

    if path is None:
        return None
    try:
        seed = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"fedchain client: cannot read key {path}: {exc}") from exc
    if len(seed) != 32:
        raise SystemExit(f"fedchain client: {path} does not hold a 32-byte seed in hex")
    return Identity(seed)


def _parse_value(text: str) -> object:
    """JSON when it parses (numbers, lists, quoted strings, maps), else the
    text itself: ``put name 21`` stores an integer, ``put name hello`` a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _fail(code: int, message: str) -> int:
    print(f"fedchain client: {message}", file=sys.stderr)
    return code


async def _serve(args: argparse.Namespace) -> int:
    import secrets

    import numpy as np
    import trio

    from fedchain.consensus.client import LedgerClient, NodeError, SubmitRefused, UntrustedAnswer
    from fedchain.consensus.errors import ConsensusError, MalformedMessage, MempoolFull
    from fedchain.p2p.identity import Identity
    from fedchain.p2p.node import open_node
    from fedchain.p2p.tcp import open_tcp_transport
    from fedchain.sims.home import HomeError, load_home

    try:
        home = load_home(args.home)
        tcp = tcp_config(args.cipher)
    except (HomeError, ValueError) as exc:
        raise SystemExit(f"fedchain client: {exc}") from exc
    me = _load_key(args.key)
    if args.client_command == "put" and me is None:
        raise SystemExit("fedchain client put: --key is required (whose value it is)")
    if args.client_command == "get" and me is None and args.owner is None:
        raise SystemExit("fedchain client get: --key or --owner names the namespace")
    identity = me if me is not None else Identity(secrets.token_bytes(32))
    server = home.identity.public_key
    genesis = home.genesis
    # A put also goes to the other validators the home knows where the
    # server does not make it final in time (LedgerClient.commit), or is
    # down; a read needs the node itself.
    others = {
        peer: address
        for peer, address in home.peers.items()
        if peer in genesis.validators and args.client_command == "put"
    }
    async with (
        open_tcp_transport(
            identity,
            allowed=[server, *others],
            rng=np.random.default_rng(),
            listen=None,
            peers={**others, server: home.listen},
            config=tcp,
        ) as transport,
        open_node(identity, transport) as node,
    ):
        client = LedgerClient(node, server, genesis.chain_id, genesis.validators)
        host, port = home.listen
        limit = min(args.timeout, 10.0, args.patience if others else 10.0)
        with trio.move_on_after(limit):
            await transport.wait_connected(server)
        reader = server
        if server not in transport.connections():
            if not others:
                why = _why_not_connected(transport)
                return _fail(EXIT_FAILED, f"no connection to the node at {host}:{port}{why}")
            reader = await _first_connected(transport, list(others), min(args.timeout, 10.0))
            if reader is None:
                why = _why_not_connected(transport)
                return _fail(EXIT_FAILED, f"no connection to any validator the home names{why}")
        try:
            line = await _act(args, client, identity, genesis.chain_id, list(others), reader)
        except UntrustedAnswer as exc:
            return _fail(EXIT_UNTRUSTED, f"the node's answer does not verify: {exc}")
        except MalformedMessage as exc:
            return _fail(EXIT_UNTRUSTED, f"the node's answer is malformed: {exc}")
        except trio.TooSlowError:
            return _fail(EXIT_FAILED, f"no answer within {args.timeout} s")
        except MempoolFull as exc:
            return _fail(EXIT_FAILED, f"the node is busy, retry later: {exc}")
        except (SubmitRefused, NodeError, ConsensusError, ValueError) as exc:
            return _fail(EXIT_FAILED, str(exc))
    print(json.dumps(line))
    return 0


def _why_not_connected(transport) -> str:
    """What the transport counted while it failed to connect: dials that
    found nobody, or the handshake's reason (``no_common_suite`` for a node
    that insists on a suite this client does not offer, say)."""
    stats = transport.stats()
    reasons = {
        k.removeprefix("disconnect_"): n
        for k, n in stats.items()
        if k.startswith("disconnect_") and n
    }
    if stats.get("dial_failed"):
        reasons["dial_failed"] = stats["dial_failed"]
    return f" ({', '.join(f'{k} x{n}' for k, n in sorted(reasons.items()))})" if reasons else ""


async def _first_connected(transport, peers: list, limit: float):
    """The first of ``peers`` the transport connects to within ``limit``
    seconds, or None."""
    import trio

    first = []
    async with trio.open_nursery() as nursery:
        nursery.cancel_scope.deadline = trio.current_time() + limit

        async def wait(peer) -> None:
            await transport.wait_connected(peer)
            first.append(peer)
            nursery.cancel_scope.cancel()

        for peer in peers:
            nursery.start_soon(wait, peer)
    return first[0] if first else None


async def _act(
    args: argparse.Namespace, client, identity, chain_id: str, others: list, reader
) -> dict:
    """Do the command; its JSON line. ``reader``: the validator to read
    from (the server, or for a put whose server is down, another)."""
    import time

    from fedchain.consensus.client import NodeError
    from fedchain.consensus.contracts import kv_key, kv_set, nonce_key
    from fedchain.consensus.tx import sign_transaction

    timeout = args.timeout
    if args.client_command == "query":
        answer = await client.query(args.state_key, timeout=timeout)
        return _answer_line(answer, client)
    if args.client_command == "get":
        owner = bytes.fromhex(args.owner) if args.owner else identity.public_key
        answer = await client.query(kv_key(owner, args.name), timeout=timeout)
        return _answer_line(answer, client)
    # put: the next nonce is itself read with a proof (on a chain with no
    # block yet it is 0: a wrong guess only gets the transaction rejected),
    # then the transaction is submitted and its commit proof checked.
    try:
        answer = await client.query(nonce_key(identity.public_key), timeout=timeout, to=reader)
        nonce = answer.value or 0
    except NodeError:
        nonce = 0
    try:
        content = kv_set(args.name, _parse_value(args.value))
    except ValueError as exc:
        hint = "(integers, strings, lists, maps)"
        raise ValueError(f"cannot store {args.value!r}: {exc} {hint}") from exc
    tx = sign_transaction(
        identity,
        chain_id,
        type="kv",
        content=content,
        nonce=nonce,
        timestamp=int(time.time() * 1000),
    )
    proof = await client.commit(
        tx.encoded, timeout=timeout, patience=args.patience, fallbacks=others
    )
    if not proof.result.ok:
        raise ValueError(f"the chain rejected it: {proof.result.reason}")
    return {
        "key": kv_key(identity.public_key, args.name),
        "digest": tx.digest.hex(),
        "height": proof.height,
        "index": proof.index,
        "verified": True,
        "epoch": client.trusted.epoch,
    }


def _jsonable(value: object) -> object:
    """State values as JSON: bytes (keys, digests) as hex, maps and lists kept."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _answer_line(answer, client) -> dict:
    return {
        "key": answer.key,
        "value": _jsonable(answer.value),
        "height": answer.height,
        "verified": True,
        "epoch": client.trusted.epoch,
    }
