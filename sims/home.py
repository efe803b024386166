"""Node homes: what ``fedchain testnet`` writes and ``fedchain node`` reads.

Like ``cometbft testnet``, one folder per node under a testnet folder::

    OUT/node0/node.json     index, listen address (what peers dial), bind
                            address (where it accepts), peers (keys, addresses)
    OUT/node0/node_key      the node's Ed25519 seed (hex, mode 0600)
    OUT/node0/genesis.bin   the chain's genesis (the same in every home)
    OUT/node0/chain.sqlite  the block store, created by the node

so ``fedchain chain verify OUT/node0`` checks what a node stored. Keys are
drawn from a seeded generator only when ``--seed`` is given (reproducible
demos); otherwise from the operating system.

For several machines, each node gets its own host (``hosts``): peers dial
``host:port`` and the node accepts on every interface (``0.0.0.0:port``),
since a machine behind NAT or in a container often cannot bind the address
others reach it at. Copy each home to its machine and run ``fedchain node``
there.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedchain.consensus.errors import MalformedMessage
from fedchain.consensus.genesis import ConsensusParams, Genesis, decode_genesis
from fedchain.p2p.identity import Identity, PeerId

__all__ = ["HomeError", "NodeHome", "load_home", "write_testnet"]

CONFIG_FILE = "node.json"
KEY_FILE = "node_key"
GENESIS_FILE = "genesis.bin"
CHAIN_FILE = "chain.sqlite"


class HomeError(ValueError):
    """A node home is missing a file or holds one that does not parse."""


@dataclass(frozen=True, slots=True)
class NodeHome:
    path: Path
    index: int
    identity: Identity
    genesis: Genesis
    listen: tuple[str, int]
    """Where peers and clients dial this node."""
    peers: dict[PeerId, tuple[str, int]]
    bind: tuple[str, int] | None = None
    """Where the node accepts, if not at ``listen`` (``0.0.0.0:port``)."""

    @property
    def accept_at(self) -> tuple[str, int]:
        return self.bind if self.bind is not None else self.listen

    @property
    def store_path(self) -> Path:
        return self.path / CHAIN_FILE


def _address(text: object, where: Path) -> tuple[str, int]:
    if type(text) is not str or text.count(":") != 1:
        raise HomeError(f"{where}: an address is 'host:port', not {text!r}")
    host, port = text.split(":")
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise HomeError(f"{where}: bad port in {text!r}")
    return host, int(port)


def write_testnet(
    out: Path,
    validators: int,
    *,
    chain_id: str = "fedchain-testnet",
    host: str = "127.0.0.1",
    hosts: list[str] | None = None,
    base_port: int = 26656,
    genesis_time_ms: int = 0,
    seed: int | None = None,
    ports: list[int] | None = None,
    params: ConsensusParams | None = None,
) -> list[Path]:
    """Write ``validators`` node homes under ``out``; their paths.

    ``hosts``: one per node, for a network over several machines (each node
    then binds every interface); otherwise every node is at ``host``."""
    if validators < 1:
        raise ValueError("a testnet has at least one validator")
    if hosts is not None and len(hosts) != validators:
        raise ValueError(f"{len(hosts)} hosts for {validators} validators: give one per node")
    if hosts is not None and any(not h or ":" in h or "," in h for h in hosts):
        raise ValueError(f"hosts are names or IPv4 addresses without ports: {hosts}")
    rng = np.random.Generator(np.random.PCG64(seed)) if seed is not None else None
    seeds = [
        rng.bytes(32) if rng is not None else secrets.token_bytes(32) for _ in range(validators)
    ]
    identities = [Identity(s) for s in seeds]
    genesis = Genesis.create(
        chain_id, genesis_time_ms, [i.public_key for i in identities], params=params
    )
    ports = ports or [base_port + i for i in range(validators)]
    if len(ports) != validators or not all(0 < p < 65536 for p in ports):
        raise ValueError(f"{validators} nodes need {validators} ports in 1..65535: {ports}")
    node_hosts = hosts if hosts is not None else [host] * validators
    addresses = [f"{h}:{port}" for h, port in zip(node_hosts, ports, strict=True)]
    homes = []
    for index in range(validators):
        home = out / f"node{index}"
        home.mkdir(parents=True, exist_ok=False)
        key_path = home / KEY_FILE
        key_path.write_text(seeds[index].hex() + "\n")
        os.chmod(key_path, 0o600)
        (home / GENESIS_FILE).write_bytes(genesis.encode())
        peers = [
            {"key": other.public_key.hex(), "address": addresses[j]}
            for j, other in enumerate(identities)
            if j != index
        ]
        config = {"index": index, "listen": addresses[index], "peers": peers}
        if hosts is not None:
            config["bind"] = f"0.0.0.0:{ports[index]}"
        (home / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        homes.append(home)
    return homes


def load_home(path: Path) -> NodeHome:
    """Read a node home; HomeError names the file and what is wrong."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        seed = bytes.fromhex((path / KEY_FILE).read_text().strip())
        genesis = decode_genesis((path / GENESIS_FILE).read_bytes())
    except FileNotFoundError as exc:
        raise HomeError(f"{path} is not a node home: {exc.filename} is missing") from exc
    except (OSError, ValueError, MalformedMessage) as exc:  # unreadable, or does not parse
        raise HomeError(f"{path}: {exc}") from exc
    if len(seed) != 32:
        raise HomeError(f"{path / KEY_FILE}: a key is 32 bytes (64 hex digits)")
    if type(config) is not dict or type(config.get("peers")) is not list:
        raise HomeError(f"{path / CONFIG_FILE}: expected an object with 'listen' and 'peers'")
    index = config.get("index", 0)
    if type(index) is not int or index < 0:
        raise HomeError(f"{path / CONFIG_FILE}: index is a whole number, not {index!r}")
    peers = {}
    for peer in config["peers"]:
        try:
            key = bytes.fromhex(peer["key"])
        except (TypeError, KeyError, ValueError) as exc:
            raise HomeError(f"{path / CONFIG_FILE}: a peer is {{key, address}}") from exc
        if len(key) != 32:
            raise HomeError(f"{path / CONFIG_FILE}: a peer key is 32 bytes")
        peers[key] = _address(peer.get("address"), path / CONFIG_FILE)
    return NodeHome(
        path,
        index,
        Identity(seed),
        genesis,
        _address(config.get("listen"), path / CONFIG_FILE),
        peers,
        None if config.get("bind") is None else _address(config["bind"], path / CONFIG_FILE),
    )
