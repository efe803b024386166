"""Gossip over real TCP: the simulator's node code on loopback sockets.

Exactly the classes :mod:`fedchain.sims.gossipsim` composes (``Node``,
``PeerSampling``, ``Gossip``) run here on :class:`~fedchain.p2p.tcp.TcpTransport`
under the real clock, first as six nodes in this process (each with its own
transport and sockets), then with three of four nodes in separate OS
processes (``gossip_peer_process.py``). Checked, by the names of
``tests/p2p/test_gossip.py``: G1 (every node delivers, once), G2 (a payload
above the lazy threshold travels by announce-then-pull), G4 (a validator's
refusal stops the refuser from relaying).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import numpy as np
import trio

from fedchain.p2p.gossip import Gossip, GossipConfig
from fedchain.p2p.identity import Identity, PeerId
from fedchain.p2p.membership import CyclonConfig, PeerSampling
from fedchain.p2p.node import Node, open_node
from fedchain.p2p.randomness import RandomStream
from fedchain.p2p.tcp import TcpConfig, open_tcp_transport

PEER_SCRIPT = Path(__file__).with_name("gossip_peer_process.py")
CYCLON = CyclonConfig(view_size=5, shuffle_length=3, period=1.0)
TCP = TcpConfig(backoff_initial=0.02, backoff_max=0.2)
TOPIC = "t"
SMALL, LARGE = 1024, 100 * 1024
assert SMALL <= GossipConfig().lazy_threshold < LARGE  # eager push vs announce-then-pull
TIMEOUT = 20.0


def identity(index: int) -> Identity:
    """Node ``index``'s identity (the peer process derives the same one)."""
    return Identity(bytes([index + 1]) * 32)


class Deliveries:
    """What each node's subscriber saw, with an event per new delivery."""

    def __init__(self) -> None:
        self.by_node: dict[int, list[tuple[bytes, str, int, PeerId]]] = defaultdict(list)
        self._changed = trio.Event()

    def record(self, index: int, message_id: bytes, topic: str, size: int, origin: PeerId):
        self.by_node[index].append((message_id, topic, size, origin))
        self._changed.set()
        self._changed = trio.Event()

    def ids(self, index: int) -> Counter[bytes]:
        return Counter(entry[0] for entry in self.by_node[index])

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()


class GossipNode:
    """One node as the simulator builds it, on a TCP transport."""

    def __init__(self, index: int, node: Node, transport, deliveries: Deliveries, bootstrap):
        self.index = index
        self.node = node
        self.transport = transport
        stream = RandomStream.from_seed(index, 0x6055)
        self.sampling = PeerSampling(node, stream, CYCLON, bootstrap=bootstrap)
        self.gossip = Gossip(node, self.sampling, stream)
        self.deliveries = deliveries

    def subscribe(self, validator=None) -> None:
        def on_message(origin, topic, data, envelope):
            self.deliveries.record(self.index, envelope.message_id, topic, len(data), origin)

        self.gossip.subscribe(TOPIC, on_message, validator=validator)


async def _tcp_endpoint(me: Identity, keys, peers, seed: int, task_status) -> None:
    async with open_tcp_transport(
        me, allowed=set(keys), peers=peers, rng=np.random.default_rng(seed), config=TCP
    ) as transport:
        task_status.started(transport)
        await trio.sleep_forever()


@asynccontextmanager
async def gossip_mesh(n: int, validators: dict[int, Callable] | None = None):
    """``n`` gossip nodes in this process, each on its own TCP transport, each
    knowing all others (full-mesh bootstrap), every pair connected."""
    identities = [identity(i) for i in range(n)]
    keys = [i.public_key for i in identities]
    deliveries = Deliveries()
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        transports, addresses = [], {}
        for index, me in enumerate(identities):
            transport = await nursery.start(_tcp_endpoint, me, keys, dict(addresses), index)
            addresses[me.public_key] = transport.listen_address
            transports.append(transport)
        with trio.fail_after(TIMEOUT):
            for transport in transports:
                for key in keys:
                    if key != transport.local_id:
                        await transport.wait_connected(key)
        nodes = []
        for index, (me, transport) in enumerate(zip(identities, transports, strict=True)):
            node = await stack.enter_async_context(open_node(me, transport))
            # Services attach before the next await, so no frame finds them missing.
            member = GossipNode(index, node, transport, deliveries, keys)
            member.subscribe((validators or {}).get(index))
            nodes.append(member)
        yield nodes, deliveries
        nursery.cancel_scope.cancel()


async def test_six_tcp_nodes_deliver_small_and_large_messages_exactly_once():
    """G1 + G2 over TCP: a 1 KiB message (pushed) and a 100 KiB one (announced,
    then pulled) reach all six nodes, each delivered once per node."""
    n = 6
    async with gossip_mesh(n) as (nodes, deliveries):
        publisher = nodes[0]
        small = publisher.gossip.publish(TOPIC, os.urandom(SMALL))
        large = publisher.gossip.publish(TOPIC, os.urandom(LARGE))
        with trio.fail_after(TIMEOUT):
            await deliveries.wait_until(
                lambda: all({small, large} <= set(deliveries.ids(i)) for i in range(n))
            )
            # A later message from another node, awaited everywhere: anything
            # still in flight for the first two has had its chance to repeat.
            barrier = nodes[-1].gossip.publish(TOPIC, b"barrier")
            await deliveries.wait_until(lambda: all(barrier in deliveries.ids(i) for i in range(n)))
        for member in nodes:
            ids = deliveries.ids(member.index)
            assert ids == Counter({small: 1, large: 1, barrier: 1}), member.index
            assert member.node.counters["gossip.delivered"] == 3
            sizes = {m: size for m, _, size, _ in deliveries.by_node[member.index]}
            assert sizes[small] == SMALL and sizes[large] == LARGE
            assert member.node.counters.get("rejected.bad_signature", 0) == 0
        # The large message travelled by announce-then-pull: somebody asked
        # for it (IWANT) and each node received it about once, not fanout times.
        received = sum(m.transport.stats()["bytes_received"] for m in nodes)
        assert received < 2 * LARGE * (n - 1)


async def test_a_node_whose_validator_refuses_does_not_relay_over_tcp():
    """G4 over TCP: the refusing node neither delivers nor forwards nor
    announces the message; every other node still delivers it."""
    n = 6
    refuser = 2
    evil = b"evil" + os.urandom(12 * 1024)  # below the lazy threshold: eagerly pushed

    def validator(origin, topic, data):
        return not data.startswith(b"evil")

    async with gossip_mesh(n, {refuser: validator}) as (nodes, deliveries):
        refusing = nodes[refuser]
        sent_before = refusing.transport.stats().get("bytes_sent", 0)
        message = nodes[0].gossip.publish(TOPIC, evil)
        others = [i for i in range(n) if i != refuser]
        with trio.fail_after(TIMEOUT):
            await deliveries.wait_until(lambda: all(message in deliveries.ids(i) for i in others))
            await deliveries.wait_until(lambda: refusing.gossip.has_seen(message))
            # A message everyone accepts, awaited everywhere, as a barrier.
            barrier = nodes[1].gossip.publish(TOPIC, b"fine")
            await deliveries.wait_until(lambda: all(barrier in deliveries.ids(i) for i in range(n)))
        assert message not in deliveries.ids(refuser)
        assert refusing.node.counters["gossip.refused"] == 1
        assert refusing.node.counters["gossip.delivered"] == 1  # the barrier only
        # It relayed nothing of the refused message: in the whole window it sent
        # less than one copy of it (shuffles, the barrier and its announces only).
        sent = refusing.transport.stats().get("bytes_sent", 0) - sent_before
        assert sent < len(evil)
        for i in others:
            assert deliveries.ids(i)[message] == 1


# --- peers in separate OS processes ---------------------------------------------------


class Lines:
    """JSON lines from a trio receive stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def next(self) -> dict:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                raise RuntimeError(f"peer process closed its output: {bytes(self._buffer)!r}")
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return json.loads(line)


class PeerProcess:
    def __init__(self, index: int, process: trio.Process) -> None:
        self.index = index
        self.process = process
        self.lines = Lines(process.stdout)
        self.delivered: Counter[str] = Counter()
        self.records: list[dict] = []

    async def read_until(self, predicate: Callable[[dict], bool]) -> dict:
        while True:
            record = await self.lines.next()
            if "delivered" in record:
                self.delivered[record["delivered"]] += 1
                self.records.append(record)
            if predicate(record):
                return record

    async def wait_delivered(self, *message_ids: bytes) -> None:
        wanted = {m.hex() for m in message_ids}
        if not wanted <= set(self.delivered):
            await self.read_until(lambda _: wanted <= set(self.delivered))


@asynccontextmanager
async def peer_processes(indices: list[int], keys: list[PeerId]):
    """One ``gossip_peer_process.py`` per index; killed on the way out, whatever happens."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    processes: list[PeerProcess] = []
    try:
        for index in indices:
            args = [sys.executable, str(PEER_SCRIPT), "--index", str(index), "--topic", TOPIC]
            args += ["--allow", *(k.hex() for k in keys)]
            process = await trio.lowlevel.open_process(
                args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
            )
            processes.append(PeerProcess(index, process))
        yield processes
    finally:
        with trio.CancelScope(shield=True):
            for peer in processes:
                await peer.process.stdin.aclose()
            for peer in processes:
                with trio.move_on_after(5):
                    await peer.process.wait()
                if peer.process.returncode is None:
                    peer.process.kill()
                    await peer.process.wait()


async def test_gossip_reaches_nodes_in_separate_processes():
    """G1 + G2 across OS processes: one node here, three in their own
    processes, all over TCP; both messages are delivered once by each."""
    n = 4
    keys = [identity(i).public_key for i in range(n)]
    deliveries = Deliveries()
    async with (
        trio.open_nursery() as nursery,
        peer_processes(list(range(1, n)), keys) as processes,
    ):
        here = await nursery.start(_tcp_endpoint, identity(0), keys, {}, 0)
        with trio.fail_after(TIMEOUT):
            ports = {keys[0]: here.listen_address[1]}
            for peer in processes:  # each prints the port the OS gave it
                ready = await peer.lines.next()
                ports[bytes.fromhex(ready["key"])] = ready["port"]
            assert set(ports) == set(keys)
        async with open_node(identity(0), here) as node:
            member = GossipNode(0, node, here, deliveries, keys[1:])
            member.subscribe()
            with trio.fail_after(TIMEOUT):
                for peer in processes:
                    others = {k.hex(): p for k, p in ports.items() if k != keys[peer.index]}
                    await peer.process.stdin.send_all(
                        json.dumps({"peers": others}).encode() + b"\n"
                    )
                for peer in processes:  # connected to every other node, subscribed
                    await peer.read_until(lambda record: record.get("ready") is True)
                for key in keys[1:]:
                    await here.wait_connected(key)

                small = member.gossip.publish(TOPIC, os.urandom(SMALL))
                large = member.gossip.publish(TOPIC, os.urandom(LARGE))
                for peer in processes:
                    await peer.wait_delivered(small, large)
                barrier = member.gossip.publish(TOPIC, b"barrier")
                for peer in processes:
                    await peer.wait_delivered(barrier)
            for peer in processes:
                expected = {small.hex(): 1, large.hex(): 1, barrier.hex(): 1}
                assert peer.delivered == Counter(expected), peer.index
                sizes = {r["delivered"]: r["size"] for r in peer.records}
                assert sizes[small.hex()] == SMALL and sizes[large.hex()] == LARGE
                assert all(r["topic"] == TOPIC for r in peer.records)
                assert all(r["origin"] == keys[0].hex() for r in peer.records)
            assert deliveries.ids(0) == Counter({small: 1, large: 1, barrier: 1})
        nursery.cancel_scope.cancel()
