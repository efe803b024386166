"""An honest TCP peer in its own OS process, driven by tests/p2p/test_tcp.py.

It opens a real :func:`open_tcp_transport`, prints one JSON line
(``{"key": hex, "port": int}``) once it listens, and then answers every
frame it receives from a peer:

* ``greet N``: send N frames ``greet <i>`` back (traffic this process starts);
* anything else: send it back prefixed with ``echo:``.

It stops when its stdin closes (or when the test kills it).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import trio

from fedchain.p2p.identity import Identity
from fedchain.p2p.tcp import TcpConfig, open_tcp_transport


async def _answer(transport) -> None:
    while True:
        peer, frame = await transport.receive()
        if frame.startswith(b"greet "):
            for i in range(int(frame[6:])):
                transport.send_nowait(peer, b"greet %d" % i)
        else:
            transport.send_nowait(peer, b"echo:" + frame)


async def _until_stdin_closes() -> None:
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    while await stdin.receive_some(1024):
        pass


async def main(args: argparse.Namespace) -> None:
    identity = Identity(bytes.fromhex(args.seed))
    allowed = [bytes.fromhex(k) for k in args.allow]
    config = TcpConfig(backoff_initial=0.05, backoff_max=0.2, handshake_timeout=5.0)
    async with open_tcp_transport(
        identity,
        allowed=allowed,
        rng=np.random.default_rng(0),
        listen=("127.0.0.1", args.port),
        config=config,
    ) as transport:
        for target in args.dial:
            key, port = target.split("@")
            transport.connect(bytes.fromhex(key), ("127.0.0.1", int(port)))
        ready = {"key": identity.public_key.hex(), "port": transport.listen_address[1]}
        print(json.dumps(ready), flush=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_answer, transport)
            await _until_stdin_closes()
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", required=True, help="32-byte Ed25519 seed, hex")
    parser.add_argument("--allow", nargs="*", default=[], help="allowed keys, hex")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dial", nargs="*", default=[], help="KEYHEX@PORT on 127.0.0.1")
    trio.run(main, parser.parse_args())
