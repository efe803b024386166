"""One gossip node over TCP in its own OS process, driven by tests/p2p/test_gossip_tcp.py.

The same classes the simulator composes (``Node``, ``PeerSampling``,
``Gossip``) on a real :func:`open_tcp_transport`. The conversation, one JSON
line each way at a time:

1. argv names the node (``--index``: its seed is ``bytes([index + 1]) * 32``)
   and every allowed key, in index order; the process listens on a port the OS picks and
   prints ``{"key": hex, "port": int}``.
2. stdin brings ``{"peers": {keyhex: port}}`` (every other node); the process
   dials the peers whose index is lower than its own, waits until it is
   connected to all of them, subscribes to ``--topic`` and prints
   ``{"ready": true}``.
3. Every delivered message is one line
   ``{"delivered": idhex, "topic": str, "size": int, "origin": keyhex}``.

It stops when its stdin closes (or when the test kills it).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import trio

from fedchain.p2p.gossip import Gossip
from fedchain.p2p.identity import Identity
from fedchain.p2p.membership import CyclonConfig, PeerSampling
from fedchain.p2p.node import open_node
from fedchain.p2p.randomness import RandomStream
from fedchain.p2p.tcp import TcpConfig, open_tcp_transport


def seed_of(index: int) -> bytes:
    return bytes([index + 1]) * 32


class _Lines:
    """Lines from a trio receive stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def next(self) -> bytes | None:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line


def _say(record: dict) -> None:
    print(json.dumps(record), flush=True)


async def main(args: argparse.Namespace) -> None:
    identity = Identity(seed_of(args.index))
    keys = [bytes.fromhex(k) for k in args.allow]
    config = TcpConfig(backoff_initial=0.02, backoff_max=0.2)
    stdin = _Lines(trio.lowlevel.FdStream(sys.stdin.fileno()))
    async with open_tcp_transport(
        identity, allowed=keys, rng=np.random.default_rng(args.index), config=config
    ) as transport:
        _say({"key": identity.public_key.hex(), "port": transport.listen_address[1]})
        line = await stdin.next()
        if line is None:
            return
        peers = {bytes.fromhex(k): port for k, port in json.loads(line)["peers"].items()}
        for key, port in peers.items():
            if keys.index(key) < args.index:  # the lower index dials
                transport.connect(key, ("127.0.0.1", port))
        with trio.fail_after(30):
            for key in peers:
                await transport.wait_connected(key)
        async with open_node(identity, transport) as node:
            stream = RandomStream.from_seed(args.index, 0x6055)
            cyclon = CyclonConfig(view_size=5, shuffle_length=3, period=1.0)
            sampling = PeerSampling(node, stream, cyclon, bootstrap=list(peers))
            gossip = Gossip(node, sampling, stream)

            def on_message(origin, topic, data, envelope):
                _say(
                    {
                        "delivered": envelope.message_id.hex(),
                        "topic": topic,
                        "size": len(data),
                        "origin": origin.hex(),
                    }
                )

            gossip.subscribe(args.topic, on_message)
            _say({"ready": True})
            while await stdin.next() is not None:
                pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", type=int, required=True, help="node index (fixes its seed)")
    parser.add_argument("--allow", nargs="+", required=True, help="allowed keys, hex")
    parser.add_argument("--topic", default="t")
    trio.run(main, parser.parse_args())
