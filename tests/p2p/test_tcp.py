"""The TCP transport on loopback, against a peer in a real OS process.

The honest peer is ``tcp_peer_process.py`` run by the interpreter as a
subprocess; hostile clients are raw sockets in this process speaking the
real protocol through :mod:`fedchain.p2p.handshake` (no mocked sockets, no
mocked crypto). Timeouts are generous ``trio.fail_after`` bounds; every
wait is on an event except where the property itself is about time (idle
links, a stalled handshake, backpressure).

Invariants of ``p2p/SPEC.md`` checked here, by name:
TCP-AUTH (only allowed, proven keys), TCP-SEAL (replays drop the link),
TCP-BOUND (oversize prefixes, stalled handshakes, idle links, full queues),
TCP-ONE-LINK (simultaneous dials), TCP-RECONNECT, TCP-NO-CRASH (every hostile
client ends only its own connection, with a counted reason).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trio

from fedchain.p2p.handshake import (
    AUTH_BYTES,
    HELLO_BYTES,
    LENGTH_BYTES,
    SUITE_AES256GCM,
    SUITE_SEALED,
    Handshake,
    SealedSession,
    aes256gcm_available,
    encode_length,
    parse_length,
    sealed_length,
)
from fedchain.p2p.identity import Identity
from fedchain.p2p.tcp import (
    TcpConfig,
    backoff_delay,
    keep_new_connection,
    open_tcp_transport,
)
from fedchain.p2p.transport import Transport

PEER_SCRIPT = Path(__file__).with_name("tcp_peer_process.py")
FAST = TcpConfig(backoff_initial=0.02, backoff_max=0.2, handshake_timeout=5.0)


def ident(n: int) -> Identity:
    return Identity(bytes([n]) * 32)


NODE, PEER, STRANGER = ident(1), ident(2), ident(4)
ROGUE, ROGUE_2, ROGUE_3 = ident(3), ident(5), ident(6)
"""Allowed keys that misbehave once connected: one each, because a second
link from the same dialer replaces the first (TCP-ONE-LINK)."""
ALLOWED = [k.public_key for k in (NODE, PEER, ROGUE, ROGUE_2, ROGUE_3)]


# --- helpers ---------------------------------------------------------------------------


class PeerProcess:
    def __init__(self, process: trio.Process, key: bytes, port: int) -> None:
        self.process, self.key, self.port = process, key, port

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)


async def _read_line(stream: trio.abc.ReceiveStream) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            raise RuntimeError(f"peer process exited before it was ready: {line!r}")
        line += chunk
    return line


@asynccontextmanager
async def peer_process(port: int = 0, dial: str | None = None):
    """The honest peer as a real OS process; yields once it listens."""
    args = [sys.executable, str(PEER_SCRIPT), "--seed", (bytes([2]) * 32).hex(), "--port"]
    args += [str(port), "--allow", *(k.hex() for k in ALLOWED)]
    if dial:
        args += ["--dial", dial]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = await trio.lowlevel.open_process(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        with trio.fail_after(20):
            ready = json.loads(await _read_line(process.stdout))
        yield PeerProcess(process, bytes.fromhex(ready["key"]), ready["port"])
    finally:
        with trio.CancelScope(shield=True):
            await process.stdin.aclose()
            with trio.move_on_after(5):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


class RawClient:
    """A hand-driven client: real TCP, real handshake, free to misbehave."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def read_exactly(self, n: int) -> bytearray:
        while len(self._buffer) < n:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError
            self._buffer += chunk
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    async def handshake(self, identity: Identity) -> SealedSession:
        """Run the real handshake as ``identity``; returns the session."""
        hs = Handshake(identity, lambda key: True)
        await self.stream.send_all(hs.hello_record)
        hello = await self.read_exactly(parse_length(await self.read_exactly(4), HELLO_BYTES))
        await self.stream.send_all(hs.receive_hello(hello))
        auth_limit = sealed_length(AUTH_BYTES)
        body = await self.read_exactly(parse_length(await self.read_exactly(4), auth_limit))
        return hs.receive_auth(body).session

    async def try_handshake(self, identity: Identity) -> None:
        """A handshake the node is expected to refuse (it may hang up first)."""
        with contextlib.suppress(EOFError, trio.BrokenResourceError):
            await self.handshake(identity)

    async def wait_closed(self) -> None:
        """Until the node closes the connection (EOF or reset)."""
        try:
            while await self.stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        await self.stream.aclose()


class Impostor(Identity):
    """Claims one key but signs with another's secret."""

    def __init__(self, claimed: Identity, signer: Identity) -> None:
        super().__init__(signer.seed())
        self._claimed = claimed.public_key

    @property
    def public_key(self) -> bytes:
        return self._claimed


@asynccontextmanager
async def node(config: TcpConfig = FAST, **kwargs):
    async with open_tcp_transport(
        NODE, allowed=ALLOWED, rng=np.random.default_rng(7), config=config, **kwargs
    ) as transport:
        yield transport


async def exchange(transport, peer: bytes, frames: list[bytes]) -> None:
    """Send ``frames`` to the peer process and check each comes back echoed."""
    for frame in frames:
        assert transport.send_nowait(peer, frame)
    for frame in frames:
        sender, got = await transport.receive()
        assert sender == peer
        assert got == b"echo:" + frame


# --- honest traffic --------------------------------------------------------------------


async def test_transport_conforms_to_the_interface():
    async with node() as transport:
        assert isinstance(transport, Transport)
        assert transport.local_id == NODE.public_key
    with pytest.raises(trio.EndOfChannel):
        await transport.receive()


async def test_honest_exchange_both_directions_with_a_peer_process():
    async with node() as transport, peer_process() as peer:
        transport.connect(peer.key, ("127.0.0.1", peer.port))
        with trio.fail_after(20):
            await transport.wait_connected(peer.key)
            sizes = [1, 1000, 65536, 65537, 3 * 65536 + 5, 1 << 20]
            await exchange(transport, peer.key, [os.urandom(n) for n in sizes])
            assert transport.send_nowait(peer.key, b"greet 5")
            got = [await transport.receive() for _ in range(5)]
        assert got == [(peer.key, b"greet %d" % i) for i in range(5)]
        stats = transport.stats()
        assert stats["handshakes_ok"] == 1 and stats["connections"] == 1
        assert stats["frames_sent"] == 7 and stats["frames_received"] == 11
        assert transport.connections()[peer.key].dialer == NODE.public_key


# --- TCP-SUITE -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs", "chosen"),
    [
        (None, None, "aes-256-gcm"),  # the default offers, on AES-NI machines (CI's too)
        (None, SUITE_SEALED, "xsalsa20-poly1305"),  # an operator pinned the other suite
        (SUITE_AES256GCM, None, "aes-256-gcm"),
    ],
)
async def test_each_connection_reports_the_suite_the_offers_chose(ours, theirs, chosen):
    assert aes256gcm_available()  # the development and CI machines have AES-NI
    async with (
        node(replace(FAST, suites=ours)) as a,
        open_tcp_transport(
            PEER, allowed=ALLOWED, rng=np.random.default_rng(1), config=replace(FAST, suites=theirs)
        ) as b,
    ):
        b.connect(NODE.public_key, a.listen_address)
        with trio.fail_after(10):
            await b.wait_connected(NODE.public_key)
            await a.wait_connected(PEER.public_key)
            assert b.send_nowait(NODE.public_key, b"x" * 70_000)  # two chunks
            assert await a.receive() == (PEER.public_key, b"x" * 70_000)
        assert a.connections()[PEER.public_key].suite == chosen
        assert b.connections()[NODE.public_key].suite == chosen


async def test_pinned_suites_with_nothing_in_common_are_refused_and_counted():
    async with (
        node(replace(FAST, suites=SUITE_AES256GCM, backoff_initial=10.0)) as a,
        open_tcp_transport(
            PEER,
            allowed=ALLOWED,
            rng=np.random.default_rng(1),
            config=replace(FAST, suites=SUITE_SEALED, backoff_initial=10.0),
        ) as b,
    ):
        b.connect(NODE.public_key, a.listen_address)
        with trio.fail_after(10):
            while not (
                a.stats().get("disconnect_no_common_suite")
                and b.stats().get("disconnect_no_common_suite")
            ):
                await trio.sleep(0.01)
        assert a.connections() == {} and b.connections() == {}
        assert a.stats().get("handshakes_ok", 0) == b.stats().get("handshakes_ok", 0) == 0


# --- TCP-AUTH, TCP-SEAL, TCP-BOUND: hostile clients ------------------------------------


async def _garbage(port: int) -> None:
    client = await RawClient.connect(port)
    await client.stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await client.wait_closed()


async def _malformed_hello(port: int) -> None:
    client = await RawClient.connect(port)
    await client.stream.send_all(encode_length(HELLO_BYTES) + bytes(HELLO_BYTES))
    await client.wait_closed()


async def _stalled(port: int) -> None:
    client = await RawClient.connect(port)
    await client.stream.send_all(encode_length(HELLO_BYTES) + b"FCT")  # then silence
    await client.wait_closed()


async def _stranger(port: int) -> None:
    client = await RawClient.connect(port)
    await client.try_handshake(STRANGER)
    await client.wait_closed()


async def _forged_proof(port: int) -> None:
    client = await RawClient.connect(port)
    await client.try_handshake(Impostor(ROGUE, signer=STRANGER))
    await client.wait_closed()


async def _replay(port: int) -> None:
    client = await RawClient.connect(port)
    session = await client.handshake(ROGUE)
    record = bytes(session.seal_record(b"first and only"))
    await client.stream.send_all(record)
    await client.stream.send_all(record)  # the same sealed bytes again
    await client.wait_closed()


async def _oversize(port: int) -> None:
    client = await RawClient.connect(port)
    await client.handshake(ROGUE_2)
    await client.stream.send_all(encode_length(2**31))
    await client.wait_closed()


async def _bad_layout(port: int) -> None:
    client = await RawClient.connect(port)
    await client.handshake(ROGUE_3)
    await client.stream.send_all(encode_length(5) + bytes(5))
    await client.wait_closed()


HOSTILE = {
    _garbage: "oversize",
    _malformed_hello: "handshake_malformed",
    _stalled: "handshake_timeout",
    _stranger: "not_allowed",
    _forged_proof: "bad_proof",
    _replay: "decrypt_failed",
    _oversize: "oversize",
    _bad_layout: "bad_frame",
}


async def test_hostile_clients_are_dropped_while_an_honest_peer_keeps_exchanging():
    config = TcpConfig(handshake_timeout=1.0, backoff_initial=0.02, backoff_max=0.2)
    async with node(config) as transport, peer_process() as peer:
        transport.connect(peer.key, ("127.0.0.1", peer.port))
        port = transport.listen_address[1]
        round_trips = 0
        progress = trio.Event()
        delivered = []

        async def honest() -> None:
            nonlocal round_trips, progress
            await transport.wait_connected(peer.key)
            while True:
                payload = b"ping %d" % round_trips
                assert transport.send_nowait(peer.key, payload)
                sender, frame = await transport.receive()
                while sender == ROGUE.public_key:  # the replay client's one frame
                    delivered.append(frame)
                    sender, frame = await transport.receive()
                assert frame == b"echo:" + payload
                round_trips += 1
                progress.set()
                progress = trio.Event()

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(honest)
                await transport.wait_connected(peer.key)
                async with trio.open_nursery() as attacks:
                    for attack in HOSTILE:
                        attacks.start_soon(attack, port)
                target = round_trips + 10  # and it still exchanges afterwards
                while round_trips < target:
                    await progress.wait()
                nursery.cancel_scope.cancel()

        stats = transport.stats()
        expected: dict[str, int] = {}
        for reason in HOSTILE.values():
            expected[reason] = expected.get(reason, 0) + 1
        for reason, count in expected.items():
            assert stats.get("disconnect_" + reason, 0) == count, reason
        assert delivered == [b"first and only"]
        # The stalled handshake took a whole second; the honest link never paused.
        assert round_trips > 50, round_trips
        assert stats["connections"] == 1
        assert transport.connections()[peer.key].dialer == NODE.public_key


async def test_random_bytes_before_or_after_a_handshake_end_only_that_connection():
    rng = np.random.default_rng(11)
    async with node() as transport, peer_process() as peer:
        transport.connect(peer.key, ("127.0.0.1", peer.port))
        port = transport.listen_address[1]
        with trio.fail_after(20):
            await transport.wait_connected(peer.key)
            for trial in range(20):
                client = await RawClient.connect(port)
                if trial % 2:
                    await client.handshake(ROGUE)
                junk = rng.bytes(int(rng.integers(1, 3000)))
                with contextlib.suppress(trio.BrokenResourceError):
                    await client.stream.send_all(junk)
                    await client.stream.send_eof()
                await client.wait_closed()
            await exchange(transport, peer.key, [b"still here"])
        stats = transport.stats()
        dropped = sum(v for k, v in stats.items() if k.startswith("disconnect_"))
        assert dropped == 20
        assert stats["connections"] == 1


async def test_stalled_handshakes_beyond_the_cap_are_refused_at_once():
    config = TcpConfig(max_pending_handshakes=2, handshake_timeout=10.0)
    async with node(config) as transport:
        port = transport.listen_address[1]
        stalled = [await RawClient.connect(port) for _ in range(2)]
        for client in stalled:  # make sure the node holds both slots
            await client.read_exactly(LENGTH_BYTES + HELLO_BYTES)
        extra = await RawClient.connect(port)
        with trio.fail_after(5):
            await extra.wait_closed()
        assert transport.stats()["disconnect_handshake_busy"] == 1
        for client in stalled:
            await client.stream.aclose()


async def test_an_allowed_peer_that_goes_silent_is_dropped_as_idle():
    config = TcpConfig(idle_timeout=0.3)
    async with node(config) as transport:
        client = await RawClient.connect(transport.listen_address[1])
        await client.handshake(ROGUE)
        with trio.fail_after(5):
            await client.wait_closed()
        assert transport.stats()["disconnect_idle"] == 1


async def test_keepalives_hold_a_quiet_link_open():
    config = TcpConfig(idle_timeout=0.5)
    other = PEER
    async with (
        node(config) as a,
        open_tcp_transport(
            other, allowed=ALLOWED, rng=np.random.default_rng(1), config=config
        ) as b,
    ):
        b.connect(NODE.public_key, a.listen_address)
        with trio.fail_after(5):
            await a.wait_connected(other.public_key)
        await trio.sleep(1.5)  # the property is about time: three idle periods
        assert a.stats().get("disconnect_idle", 0) == 0
        assert b.stats().get("disconnect_idle", 0) == 0
        assert a.stats()["keepalives_received"] >= 3
        assert a.connections().keys() == {other.public_key}


# --- TCP-BOUND: queues -----------------------------------------------------------------


async def test_outbound_queue_is_bounded_and_never_blocks():
    config = TcpConfig(outbound_queue_frames=4, backoff_initial=1.0)
    async with node(config, listen=None) as transport:
        assert not transport.send_nowait(PEER.public_key, b"x")  # unknown peer
        with trio.socket.socket() as unused:  # a port nobody listens on
            await unused.bind(("127.0.0.1", 0))
            transport.connect(PEER.public_key, unused.getsockname())
            accepted = [transport.send_nowait(PEER.public_key, b"x") for _ in range(6)]
        assert accepted == [True] * 4 + [False] * 2
        stats = transport.stats()
        assert stats["outbound_full"] == 2 and stats["no_route"] == 1
        assert not transport.send_nowait(PEER.public_key, b"")  # empty: the keepalive
        with pytest.raises(ValueError):
            transport.connect(STRANGER.public_key, ("127.0.0.1", 1))


async def test_a_slow_reader_pushes_back_through_tcp():
    """Also: a reader held back by its full inbox waits on no socket, so
    being held back for three idle periods is not idleness."""
    inbound = 2
    config = TcpConfig(inbound_queue_frames=inbound, read_buffer_bytes=1 << 20, idle_timeout=0.3)
    frame = os.urandom(256 * 1024)
    sender = TcpConfig(outbound_queue_bytes=4 * len(frame))
    async with (
        node(config) as slow,
        open_tcp_transport(
            PEER, allowed=ALLOWED, rng=np.random.default_rng(1), config=sender
        ) as fast,
    ):
        fast.connect(NODE.public_key, slow.listen_address)
        with trio.fail_after(5):
            await fast.wait_connected(NODE.public_key)
        accepted = 0
        with trio.move_on_after(1.0):  # offer load for a second; the node reads nothing
            while True:
                if fast.send_nowait(NODE.public_key, frame):
                    accepted += 1
                else:
                    await trio.sleep(0.005)
        stats = slow.stats()
        # The reader holds at most the inbox plus the frame it is blocked on, and the
        # sender was refused: the rest waits in kernel buffers, not in this process.
        assert stats["frames_received"] <= inbound + 1
        assert stats["inbound_queued"] == inbound  # the gauge: read, not yet taken
        assert fast.stats()["outbound_full"] > 0
        # Bounded by the sender's queue, the node's read buffer and the kernel's
        # socket buffers (at most 32 + 4 MiB here), however long the load lasts.
        assert accepted * len(frame) < 40 * 1024 * 1024
        with trio.fail_after(20):
            for _ in range(accepted):
                sender, got = await slow.receive()
                assert sender == PEER.public_key and got == frame
        assert slow.stats()["inbound_queued"] == 0
        assert slow.stats().get("disconnect_idle", 0) == 0
        assert slow.connections().keys() == {PEER.public_key}


# --- TCP-ONE-LINK ----------------------------------------------------------------------


def test_both_ends_agree_on_which_of_two_links_to_keep():
    low, high = sorted([NODE.public_key, PEER.public_key])
    for existing, new in [(low, high), (high, low)]:
        at_low = keep_new_connection(low, high, existing, new)
        at_high = keep_new_connection(high, low, existing, new)
        assert at_low == at_high == (new == low)
    assert keep_new_connection(low, high, high, high)  # a redial replaces a stale link


async def test_simultaneous_dials_leave_exactly_one_connection():
    async with (
        node() as a,
        open_tcp_transport(PEER, allowed=ALLOWED, rng=np.random.default_rng(1), config=FAST) as b,
    ):
        a.connect(PEER.public_key, b.listen_address)
        b.connect(NODE.public_key, a.listen_address)
        low = min(NODE.public_key, PEER.public_key)
        with trio.fail_after(10):
            await a.wait_connected(PEER.public_key)
            await b.wait_connected(NODE.public_key)
            while not (
                a.connections().get(PEER.public_key, None) is not None
                and b.connections().get(NODE.public_key, None) is not None
                and a.connections()[PEER.public_key].dialer == low
                and b.connections()[NODE.public_key].dialer == low
            ):
                await trio.sleep(0.01)
            assert a.send_nowait(PEER.public_key, b"to b")
            assert b.send_nowait(NODE.public_key, b"to a")
            assert await b.receive() == (NODE.public_key, b"to b")
            assert await a.receive() == (PEER.public_key, b"to a")
        assert a.stats()["connections"] == b.stats()["connections"] == 1


# --- TCP-RECONNECT ---------------------------------------------------------------------


async def test_reconnects_after_the_peer_process_is_killed_and_restarted():
    async with node() as transport:
        async with peer_process() as peer:
            transport.connect(peer.key, ("127.0.0.1", peer.port))
            with trio.fail_after(20):
                await transport.wait_connected(peer.key)
                await exchange(transport, peer.key, [b"before"])
            peer.kill()
            with trio.fail_after(10):
                await transport.wait_disconnected(peer.key)
        # Frames queued while the link is down wait for the next connection.
        assert transport.send_nowait(peer.key, b"queued while down")
        async with peer_process(port=peer.port) as again:
            assert again.key == peer.key
            with trio.fail_after(20):
                await transport.wait_connected(peer.key)
                sender, frame = await transport.receive()
                assert (sender, frame) == (peer.key, b"echo:queued while down")
                await exchange(transport, peer.key, [b"after"])
        stats = transport.stats()
        assert stats["handshakes_ok"] == 2
        assert stats["disconnect_eof"] + stats.get("disconnect_reset", 0) >= 1


async def test_the_peer_process_can_dial_the_node():
    async with node() as transport:
        dial = f"{NODE.public_key.hex()}@{transport.listen_address[1]}"
        async with peer_process(dial=dial) as peer:
            with trio.fail_after(20):
                await transport.wait_connected(peer.key)
                await exchange(transport, peer.key, [b"hello"])
            assert transport.connections()[peer.key].dialer == peer.key


# --- pure helpers ----------------------------------------------------------------------


def test_backoff_is_capped_jittered_and_reproducible():
    config = TcpConfig(backoff_initial=0.1, backoff_max=2.0, backoff_factor=2.0)
    delays = [backoff_delay(a, np.random.default_rng(3), config) for a in range(10)]
    again = [backoff_delay(a, np.random.default_rng(3), config) for a in range(10)]
    assert delays == again
    for attempt, delay in enumerate(delays):
        base = min(2.0, 0.1 * 2**attempt)
        assert base / 2 <= delay <= base
    assert backoff_delay(10_000, np.random.default_rng(0), config) <= 2.0
