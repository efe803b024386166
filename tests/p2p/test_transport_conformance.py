"""Every :class:`~fedchain.p2p.transport.Transport` keeps the same promises.

Each test is parametrized over every implementation, each built by a small
factory that yields ``n`` connected endpoints:

* ``sim``: :class:`~fedchain.p2p.simnet.SimTransport` on a
  :class:`~fedchain.p2p.simnet.SimNetwork`, in virtual time
  (``MockClock(autojump_threshold=0)``);
* ``tcp``: :class:`~fedchain.p2p.tcp.TcpTransport` on 127.0.0.1, real
  sockets, real handshakes, the real clock.

A new transport joins by adding a factory to ``FACTORIES``; it then has to
pass every property below. The properties are the ones ``p2p/transport.py``
states: frames reach the right peer under the authenticated key, byte-exact,
whatever their size; ``send_nowait`` never blocks and refuses (counting
``outbound_full``) when a peer's outbound queue is full; ``stats()`` counts
frames and bytes both ways; and a full :class:`~fedchain.p2p.node.Node` runs
on it unchanged, counting what it refuses.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import trio
import trio.testing

from fedchain.p2p import wire
from fedchain.p2p.handshake import SUITE_AES256GCM, SUITE_PLAINTEXT, SUITE_SEALED
from fedchain.p2p.identity import Identity, PeerId
from fedchain.p2p.node import open_node
from fedchain.p2p.simnet import Constant, LinkModel, SimNetwork
from fedchain.p2p.tcp import TcpConfig, open_tcp_transport
from fedchain.p2p.transport import Transport
from fedchain.p2p.wire import MessageType

MIB = 1024 * 1024
TIMEOUT = 20.0
"""Generous bound on every wait (virtual seconds for ``sim``, real for ``tcp``)."""


@dataclass
class Mesh:
    """``n`` endpoints that can all reach each other."""

    identities: list[Identity]
    transports: list[Transport]

    @property
    def keys(self) -> list[PeerId]:
        return [identity.public_key for identity in self.identities]


def _identities(n: int, seed: int) -> list[Identity]:
    rng = np.random.default_rng(seed)
    return [Identity.from_rng(rng) for _ in range(n)]


# --- factories: one per implementation ---------------------------------------------------


@asynccontextmanager
async def open_sim_mesh(n: int, *, seed: int = 3, tight: bool = False) -> AsyncIterator[Mesh]:
    """Simulated links; ``tight``: a 1 MB/s uplink holding at most 50 ms."""
    if tight:
        model = LinkModel(latency=Constant(0.01), bandwidth_bps=8e6, max_backlog=0.05)
    else:
        model = LinkModel(latency=Constant(0.01))
    network = SimNetwork(seed=seed, model=model)
    identities = _identities(n, seed)
    inbox = 2 if tight else 4096
    transports = [network.add_node(i.public_key, inbox=inbox) for i in identities]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(network.run)
        yield Mesh(identities, transports)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_tcp_mesh(
    n: int, *, seed: int = 3, tight: bool = False, suites: int = SUITE_SEALED
) -> AsyncIterator[Mesh]:
    """Loopback TCP; each endpoint dials those opened before it, then every
    pair is awaited connected. ``tight``: tiny queues and socket buffers, so
    a peer that stops reading fills its sender's queue quickly."""
    if tight:
        config = TcpConfig(
            suites=suites,
            outbound_queue_frames=4,
            outbound_queue_bytes=256 * 1024,
            inbound_queue_frames=2,
            socket_buffer_bytes=64 * 1024,
            read_buffer_bytes=256 * 1024,
            backoff_initial=0.02,
            backoff_max=0.2,
        )
    else:
        config = TcpConfig(suites=suites, backoff_initial=0.02, backoff_max=0.2)
    identities = _identities(n, seed)
    keys = [i.public_key for i in identities]
    async with trio.open_nursery() as nursery:
        transports = []
        addresses: dict[PeerId, tuple[str, int]] = {}
        for index, identity in enumerate(identities):
            transport = await nursery.start(
                _tcp_endpoint, identity, keys, dict(addresses), config, seed * 100 + index
            )
            addresses[identity.public_key] = transport.listen_address
            transports.append(transport)
        with trio.fail_after(TIMEOUT):
            for transport in transports:
                for key in keys:
                    if key != transport.local_id:
                        await transport.wait_connected(key)
        yield Mesh(identities, transports)
        nursery.cancel_scope.cancel()


async def _tcp_endpoint(identity, keys, peers, config, seed, task_status) -> None:
    async with open_tcp_transport(
        identity,
        allowed=set(keys),
        peers=peers,
        rng=np.random.default_rng(seed),
        config=config,
    ) as transport:
        task_status.started(transport)
        await trio.sleep_forever()


FACTORIES: dict[str, Callable[..., object]] = {
    "sim": open_sim_mesh,
    "tcp": open_tcp_mesh,
    "tcp-aes256gcm": functools.partial(open_tcp_mesh, suites=SUITE_AES256GCM),
}
VIRTUAL_TIME = {"sim"}
"""Implementations whose tests run under ``MockClock(autojump_threshold=0)``."""


@pytest.fixture(params=sorted(FACTORIES))
def kind(request) -> str:
    return request.param


@pytest.fixture
def clock(kind):
    """The clock pytest-trio runs the test under: virtual where it suits."""
    return trio.testing.MockClock(autojump_threshold=0) if kind in VIRTUAL_TIME else None


@pytest.fixture
def open_mesh(kind, clock):
    return FACTORIES[kind]


# --- helpers -----------------------------------------------------------------------------


async def collect(transport: Transport, count: int) -> list[tuple[PeerId, bytes]]:
    """The next ``count`` inbound frames of ``transport``."""
    return [await transport.receive() for _ in range(count)]


async def until(condition: Callable[[], bool]) -> None:
    """Wait for a condition that no event announces (a counter): check it
    after every short pause, under the caller's ``fail_after``."""
    while not condition():
        await trio.sleep(0.005)


def digest(frame: bytes) -> str:
    return hashlib.sha256(frame).hexdigest()


# --- the properties ----------------------------------------------------------------------


async def test_every_implementation_satisfies_the_protocol(open_mesh):
    async with open_mesh(2) as mesh:
        for identity, transport in zip(mesh.identities, mesh.transports, strict=True):
            assert isinstance(transport, Transport)
            assert transport.local_id == identity.public_key
            assert isinstance(transport.stats(), dict)


async def test_a_frame_reaches_the_right_peer_under_the_senders_key(open_mesh):
    """(a) Each of 3 endpoints sends one frame to each other; every receiver
    gets exactly the frames addressed to it, each from the key that sent it."""
    n = 3
    async with open_mesh(n) as mesh:
        keys = mesh.keys
        for i, transport in enumerate(mesh.transports):
            for j in range(n):
                if j != i:
                    assert transport.send_nowait(keys[j], b"from %d to %d" % (i, j))
        got: dict[int, list[tuple[PeerId, bytes]]] = {}
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for j, transport in enumerate(mesh.transports):

                    async def receive_all(j=j, transport=transport):
                        got[j] = await collect(transport, n - 1)

                    nursery.start_soon(receive_all)
        for j in range(n):
            expected = {(keys[i], b"from %d to %d" % (i, j)) for i in range(n) if i != j}
            assert sorted(got[j]) == sorted(expected)


async def test_many_frames_of_every_size_arrive_byte_exact(open_mesh):
    """(b) Two senders interleave frames of 1 B to 1 MiB to one receiver; the
    receiver gets each exactly once, byte for byte, in whatever order."""
    rng = np.random.default_rng(11)
    sizes = [1, 2, 31, 1000, 4095, 4096, 65535, 65536, 65537, 300_000, MIB - 1, MIB]
    sizes += [int(s) for s in rng.integers(1, 200_000, size=20)]
    async with open_mesh(3) as mesh:
        receiver, senders = mesh.transports[0], mesh.transports[1:]
        expected: Counter[tuple[PeerId, str]] = Counter()
        frames: dict[str, bytes] = {}
        for size in sizes:
            for sender in senders:
                frame = rng.bytes(size)
                assert sender.send_nowait(receiver.local_id, frame)
                expected[(sender.local_id, digest(frame))] += 1
                frames[digest(frame)] = frame
        with trio.fail_after(TIMEOUT):
            got = await collect(receiver, len(sizes) * len(senders))
        assert Counter((peer, digest(frame)) for peer, frame in got) == expected
        assert all(frame == frames[digest(frame)] for _, frame in got)


async def test_an_empty_frame_is_delivered_if_and_only_if_it_is_accepted(open_mesh):
    """(b, 0 B) The interface does not require empty frames (TCP reserves the
    empty record for keepalives); a transport either refuses one, counting
    why, or delivers it like any other."""
    async with open_mesh(2) as mesh:
        a, b = mesh.transports
        before = sum(a.stats().values())
        accepted = a.send_nowait(b.local_id, b"")
        assert a.send_nowait(b.local_id, b"after")
        with trio.fail_after(TIMEOUT):
            got = await collect(b, 2 if accepted else 1)
        if accepted:
            assert sorted(got) == sorted([(a.local_id, b""), (a.local_id, b"after")])
        else:
            assert got == [(a.local_id, b"after")]
            assert sum(a.stats().values()) > before  # the refusal was counted


async def test_send_nowait_never_blocks_and_refuses_when_the_outbound_queue_is_full(open_mesh):
    """(c) With small limits and a receiver that reads nothing, sending soon
    returns ``False`` and counts ``outbound_full``; no call ever waits. Once
    the receiver reads again, the link carries frames again."""
    frame = bytes(1000) * 64  # 64 kB
    async with open_mesh(2, tight=True) as mesh:
        a, b = mesh.transports
        accepted = 0
        slowest = 0.0
        with trio.fail_after(TIMEOUT):
            for _ in range(10_000):
                start = time.perf_counter()
                sent = a.send_nowait(b.local_id, frame)
                slowest = max(slowest, time.perf_counter() - start)
                if not sent:
                    break
                accepted += 1
                await trio.sleep(0)  # let the transport move what it can
            else:
                pytest.fail("10,000 frames to a peer that reads nothing were all accepted")
        assert accepted >= 1
        assert a.stats()["outbound_full"] >= 1
        assert slowest < 0.1
        refused = a.stats()["outbound_full"]
        assert not a.send_nowait(b.local_id, frame)  # still full: refused again, counted
        assert a.stats()["outbound_full"] == refused + 1

        # The receiver reads again: the backlog drains and a new frame gets through.
        marker = b"marker"
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                arrived = trio.Event()

                async def read_until_marker():
                    while (await b.receive())[1] != marker:
                        pass
                    arrived.set()

                nursery.start_soon(read_until_marker)
                while not a.send_nowait(b.local_id, marker):
                    await trio.sleep(0.05)  # retry pace, not synchronisation
                await arrived.wait()


async def test_a_frame_for_an_unknown_peer_is_refused_and_counted(open_mesh):
    """(c) A peer the transport cannot reach is a refusal, never an exception
    and never a wait; the reason is counted (its name is the transport's)."""
    stranger = Identity(b"\x99" * 32).public_key
    async with open_mesh(2) as mesh:
        a = mesh.transports[0]
        before = sum(a.stats().values())
        assert not a.send_nowait(stranger, b"hello?")
        assert sum(a.stats().values()) == before + 1


async def test_stats_count_frames_and_bytes_both_ways(open_mesh):
    """(d) Sender and receiver agree on the frames and payload bytes moved."""
    sizes = [1, 100, 10_000, 200_000, 5, 70_000]
    async with open_mesh(2) as mesh:
        a, b = mesh.transports
        before_a, before_b = a.stats(), b.stats()
        for size in sizes:
            assert a.send_nowait(b.local_id, bytes(size))
        assert b.send_nowait(a.local_id, b"back")
        with trio.fail_after(TIMEOUT):
            await collect(b, len(sizes))
            await collect(a, 1)

            def moved(stats, before, key):
                return stats.get(key, 0) - before.get(key, 0)

            # Received frames may overtake the sender's own bookkeeping by a
            # scheduling step; wait for the counters, not for time.
            await until(lambda: moved(a.stats(), before_a, "frames_sent") == len(sizes))
            await until(lambda: moved(b.stats(), before_b, "frames_sent") == 1)
        sa, sb = a.stats(), b.stats()
        assert moved(sa, before_a, "frames_sent") == len(sizes)
        assert moved(sa, before_a, "bytes_sent") == sum(sizes)
        assert moved(sb, before_b, "frames_received") == len(sizes)
        assert moved(sb, before_b, "bytes_received") == sum(sizes)
        assert moved(sb, before_b, "frames_sent") == 1
        assert moved(sb, before_b, "bytes_sent") == 4
        assert moved(sa, before_a, "frames_received") == 1
        assert moved(sa, before_a, "bytes_received") == 4
        assert all(type(v) is int and v >= 0 for v in (*sa.values(), *sb.values()))


async def test_nodes_exchange_signed_messages_and_count_garbage(open_mesh):
    """(e) Two full nodes run on the transport: a signed PING is answered by a
    signed PONG, each seen under its signer's key, and garbage pushed through
    the raw transport is refused and counted by the receiving node."""
    async with open_mesh(2) as mesh:
        alice_id, bob_id = mesh.identities
        ta, tb = mesh.transports
        pings: list[tuple[PeerId, PeerId, bytes]] = []
        pongs: list[tuple[PeerId, PeerId, bytes]] = []
        pong_arrived = trio.Event()
        async with open_node(bob_id, tb) as bob, open_node(alice_id, ta) as alice:

            def on_ping(peer, envelope):
                pings.append((peer, envelope.sender, envelope.body))
                bob.send(peer, MessageType.PONG, b"re:" + envelope.body)

            def on_pong(peer, envelope):
                pongs.append((peer, envelope.sender, envelope.body))
                pong_arrived.set()

            bob.register(MessageType.PING, on_ping)
            alice.register(MessageType.PONG, on_pong)
            assert alice.send(bob.id, MessageType.PING, b"hello")
            with trio.fail_after(TIMEOUT):
                await pong_arrived.wait()
            assert pings == [(alice.id, alice.id, b"hello")]
            assert pongs == [(bob.id, bob.id, b"re:hello")]

            # Garbage through the raw transport, under alice's authenticated key.
            for junk in (b"\xc1", b"\xc1\xc1\xc1"):
                assert ta.send_nowait(bob.id, junk)
            probes = 0
            with trio.fail_after(TIMEOUT):
                # A transport need not keep order, so probe with signed pings
                # (each an event) until bob has counted both frames.
                while bob.counters["rejected.not_msgpack"] < 2:
                    probes += 1
                    pong_arrived = trio.Event()
                    assert alice.send(bob.id, MessageType.PING, b"probe %d" % probes)
                    await pong_arrived.wait()
            assert bob.counters["rejected.not_msgpack"] == 2
            assert bob.counters["accepted"] == 1 + probes
            assert alice.counters["accepted"] == 1 + probes
            assert len(pongs) == 1 + probes


def _badly_signed(identity: Identity, msg_type: int, seq: int, body: bytes) -> bytes:
    frame = wire.sign(identity, msg_type, seq, body).frame
    return frame[:-1] + bytes([frame[-1] ^ 1])


async def _bob_hears(mesh: Mesh, frames: list[bytes]) -> tuple[list[bytes], Counter[str]]:
    """Push ``frames`` from alice's raw transport to a node on bob's, then a
    well-signed PING from alice as an end marker (order is not promised, so
    wait for the marker and for every frame to be counted one way or the
    other); the bodies bob's PING handler saw and bob's counters."""
    alice_id, bob_id = mesh.identities
    ta, tb = mesh.transports
    seen: list[bytes] = []
    async with open_node(bob_id, tb) as bob:
        bob.register(MessageType.PING, lambda peer, envelope: seen.append(envelope.body))
        for frame in [*frames, wire.sign(alice_id, MessageType.PING, 1_000, b"end").frame]:
            assert ta.send_nowait(bob_id.public_key, frame)
        with trio.fail_after(TIMEOUT):
            await until(
                lambda: (
                    b"end" in seen
                    and bob.counters["accepted"] + bob.counters["rejected.bad_signature"]
                    == len(frames) + 1
                )
            )
        return seen, bob.counters


async def test_a_link_vouches_for_its_own_peers_direct_frames_only(open_mesh):
    """W5 end to end: on an authenticated link a direct frame from the link's
    peer needs no valid envelope signature (the link proved every byte),
    while a relayable one, or one signed by a third party, is still checked."""
    carol_id = Identity(b"\x07" * 32)  # not on the mesh: alice passes her frame on
    async with open_mesh(2) as mesh:
        alice_id, _ = mesh.identities
        assert all(transport.authenticated_links for transport in mesh.transports)
        seen, counters = await _bob_hears(
            mesh,
            [
                _badly_signed(alice_id, MessageType.PING, 1, b"direct"),
                _badly_signed(alice_id, MessageType.GOSSIP, 2, b"relayable"),
                _badly_signed(carol_id, MessageType.PING, 3, b"third party"),
            ],
        )
    assert sorted(seen) == [b"direct", b"end"]
    assert counters["rejected.bad_signature"] == 2


async def test_a_plaintext_link_vouches_for_nothing():
    """The benchmark's plaintext suite authenticates the handshake only: any
    bytes after it could be injected, so every envelope signature is checked."""
    async with open_tcp_mesh(2, suites=SUITE_PLAINTEXT) as mesh:
        alice_id, _ = mesh.identities
        assert not any(transport.authenticated_links for transport in mesh.transports)
        seen, counters = await _bob_hears(
            mesh, [_badly_signed(alice_id, MessageType.PING, 1, b"direct")]
        )
    assert seen == [b"end"]
    assert counters["rejected.bad_signature"] == 1
