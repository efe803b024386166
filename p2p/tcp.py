"""Authenticated, encrypted TCP: the transport for nodes in separate processes.

:func:`open_tcp_transport` gives a :class:`~fedchain.p2p.transport.Transport`
over real sockets. The protocol (handshake, sealed records) lives in
:mod:`fedchain.p2p.handshake` and is specified in ``p2p/SPEC.md``; this
module only runs it on trio streams. The trade-offs:

* **One task tree.** Every listener, dialer and connection task lives in the
  nursery the context manager owns, so leaving the ``async with`` block
  cancels them all and closes every socket. A connection is two tasks (a
  reader and a writer) under its own cancel scope; either one failing
  cancels both, and the reason is counted exactly once.
* **Never block the node, never trust the peer.** Each peer has a bounded
  outbound queue that outlives its connections (frames queued while a
  dialer reconnects go out once it succeeds); :meth:`TcpTransport.send_nowait`
  drops and counts ``outbound_full`` rather than wait. Inbound is one
  bounded channel for the whole transport: when the node reads slowly, the
  readers block on it and stop reading their sockets, so TCP's window pushes
  back on the senders instead of this process buffering without limit.
  Everything a peer can send is checked before it costs much (a length
  prefix before its body, a handshake under a deadline and a cap on
  concurrent handshakes) and ends in a counted disconnect, never a crash.
* **Liveness.** A connection that receives nothing for ``idle_timeout`` is
  dropped (``idle``); writers send an empty sealed record (a keepalive, never
  delivered) after ``idle_timeout / 3`` of silence, so a quiet but healthy
  link survives and a dead one is found. Dialers reconnect with capped
  exponential backoff and "equal jitter" (half the delay fixed, half drawn
  from the numpy Generator the caller passes in), so peers that lost a
  common link do not all redial in lockstep, and runs with a seeded
  Generator back off identically.
* **One link per pair.** When two peers dial each other at once, both keep
  the connection dialled by the lower key (:func:`keep_new_connection`),
  a rule each side evaluates alone and both agree on; a later connection
  from the same dialer replaces the old one, which is how a restarted peer
  takes over from its stale link at once.
* **Throughput.** A writer drains its queue into one ``send_all`` (many
  small frames per system call); a reader ``recv_into``'s one reusable
  buffer and opens sealed records in place in it, so a 1 MiB frame is copied
  once after decryption and never reallocated on the way.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
import trio
from nacl._sodium import ffi

from .errors import HandshakeError, P2PError
from .handshake import (
    AUTH_BYTES,
    HELLO_BYTES,
    LENGTH_BYTES,
    SUITE_NAMES,
    SUITE_PLAINTEXT,
    Handshake,
    HandshakeResult,
    Session,
    check_suites,
    parse_length,
    sealed_length,
)
from .identity import Identity, PeerId, short_id
from .wire import MAX_FRAME_BYTES

__all__ = [
    "ConnectionInfo",
    "TcpConfig",
    "TcpTransport",
    "backoff_delay",
    "keep_new_connection",
    "open_tcp_transport",
]

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class TcpConfig:
    """Limits and timers of one TCP endpoint (seconds, bytes, frames)."""

    max_frame_bytes: int = MAX_FRAME_BYTES
    outbound_queue_frames: int = 1024
    outbound_queue_bytes: int = 64 * 1024 * 1024
    """A peer's queue is full at either bound: many small frames or a few big ones."""
    inbound_queue_frames: int = 1024
    handshake_timeout: float = 5.0
    max_pending_handshakes: int = 64
    idle_timeout: float = 60.0
    connect_timeout: float = 5.0
    backoff_initial: float = 0.1
    backoff_max: float = 10.0
    backoff_factor: float = 2.0
    write_batch_bytes: int = 256 * 1024
    read_buffer_bytes: int = 4 * 1024 * 1024
    socket_buffer_bytes: int | None = None
    """``SO_SNDBUF``/``SO_RCVBUF``; ``None`` keeps the kernel's autotuning."""
    suites: int | None = None
    """The cipher suites offered (``handshake.choose_suite`` picks from both
    ends' offers): ``None`` for :func:`~.handshake.default_suites`
    (XSalsa20-Poly1305, and AES-256-GCM where the CPU has AES-NI), one
    suite to insist on it, ``SUITE_PLAINTEXT`` only for the benchmark's
    baseline (both ends must ask for it)."""

    @property
    def keepalive_interval(self) -> float:
        return self.idle_timeout / 3


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """A live, authenticated connection as :meth:`TcpTransport.connections` sees it."""

    peer: PeerId
    dialer: PeerId
    remote_address: Address | None
    suite: str
    """The cipher suite the handshake chose (``handshake.SUITE_NAMES``)."""


def backoff_delay(attempt: int, rng: np.random.Generator, config: TcpConfig) -> float:
    """Delay before redial number ``attempt`` (0 for the first retry).

    Capped exponential with equal jitter: between half and all of
    ``min(backoff_max, backoff_initial * backoff_factor ** attempt)``.
    """
    exponent = min(attempt, 64)
    base = min(config.backoff_max, config.backoff_initial * config.backoff_factor**exponent)
    return base / 2 + float(rng.random()) * base / 2


def keep_new_connection(
    local: PeerId, remote: PeerId, existing_dialer: PeerId, new_dialer: PeerId
) -> bool:
    """Whether a new connection to ``remote`` replaces the live one.

    Both ends compute the same answer: of two links dialled from opposite
    sides, the one dialled by the lower key wins; a second link from the same
    dialer means the first is stale (the dialer restarted or lost it), so it
    wins.
    """
    if new_dialer == existing_dialer:
        return True
    return new_dialer == min(local, remote)


class _PeerClosed(Exception):
    """The peer closed its side (EOF)."""


_PEER_FAILURES = (
    P2PError,
    OSError,
    _PeerClosed,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


def _reason_of(exc: BaseException) -> str:
    if isinstance(exc, P2PError):
        return exc.reason
    if isinstance(exc, _PeerClosed):
        return "eof"
    return "reset"


class _RecordReader:
    """Reads exact byte counts from a socket through one reusable buffer.

    :meth:`read_exactly` returns a writable view into the buffer, valid
    until the next call; that is what lets sealed records open in place.
    The buffer starts small (a handshake needs 200 bytes) and grows towards
    ``cap`` only on a link that keeps it full.

    :attr:`waiting_since` is when the wait on the socket now in progress
    began (``None`` while none is): the connection's idle watchdog reads
    it, so a wait that outlasts ``idle_timeout`` ends the connection, and a
    reader blocked on a full inbox waits on no socket, so backpressure
    never counts as idleness. One watchdog per connection costs less than
    a cancel scope per ``recv_into`` (about 0.05 ms of receiver CPU per
    MiB here, measured with ``fedchain bench transport``).
    """

    _INITIAL = 64 * 1024

    def __init__(self, sock: trio.socket.SocketType, cap: int) -> None:
        self._sock = sock
        self._cap = cap
        self._buf = bytearray(min(cap, self._INITIAL))
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self.waiting_since: float | None = None

    async def read_exactly(self, n: int) -> memoryview:
        if self._end - self._start < n:
            await self._fill(n)
        start = self._start
        self._start = start + n
        return self._view[start : start + n]

    def _make_room(self, n: int) -> None:
        keep = self._end - self._start
        if n > len(self._buf) or len(self._buf) < self._cap:
            size = max(n, min(self._cap, 4 * len(self._buf)))
            bigger = bytearray(size)
            bigger[:keep] = self._view[self._start : self._end]
            self._buf, self._view = bigger, memoryview(bigger)
        elif keep:
            base = ffi.from_buffer(self._buf)
            ffi.memmove(base, base + self._start, keep)  # overlapping: memmove
        self._start, self._end = 0, keep

    async def _fill(self, n: int) -> None:
        if self._start + n > len(self._buf):
            self._make_room(n)
        while self._end - self._start < n:
            self.waiting_since = trio.current_time()
            got = await self._sock.recv_into(self._view[self._end :])
            self.waiting_since = None
            if not got:
                raise _PeerClosed
            self._end += got


async def _watch_idle(conn: _Connection, reader: _RecordReader, idle: float) -> None:
    """End ``conn`` as ``idle`` once one wait on its socket lasts ``idle``
    seconds. Wakes about four times per ``idle`` while the reader is busy
    or held back, and once per wait otherwise."""
    while True:
        since = reader.waiting_since
        if since is None:
            await trio.sleep(idle / 4)
            continue
        left = since + idle - trio.current_time()
        if left <= 0:
            conn.fail("idle")
            return
        await trio.sleep(left)


class _Peer:
    """What the transport knows of one peer across its connections."""

    def __init__(self, peer: PeerId, queue: int) -> None:
        self.id = peer
        self.address: Address | None = None
        self.outbound_send, self.outbound_recv = trio.open_memory_channel[bytes](queue)
        self.conn: _Connection | None = None
        self.dialing = False
        self.queued_bytes = 0
        self._changed = trio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()


class _Connection:
    """One adopted, authenticated link to a peer."""

    def __init__(
        self, peer: _Peer, dialer: PeerId, stream: trio.SocketStream, session: Session
    ) -> None:
        self.peer = peer
        self.dialer = dialer
        self.stream = stream
        self.session = session
        self.scope = trio.CancelScope()
        self.reason: str | None = None

    def fail(self, reason: str) -> None:
        """Close this connection for ``reason`` (the first reason wins)."""
        if self.reason is None:
            self.reason = reason
        self.scope.cancel()


class TcpTransport:
    """A TCP endpoint: listens, dials, authenticates and moves frames.

    Build it with :func:`open_tcp_transport`, which owns its tasks.
    """

    def __init__(
        self,
        identity: Identity,
        allowed: Callable[[PeerId], bool],
        rng: np.random.Generator,
        config: TcpConfig,
    ) -> None:
        self._identity = identity
        self._allowed = allowed
        self._rng = rng
        self.config = config
        self._nursery: trio.Nursery | None = None
        self._peers: dict[PeerId, _Peer] = {}
        self._stats: Counter[str] = Counter()
        self._inbound_send, self._inbound_recv = trio.open_memory_channel[tuple[PeerId, bytes]](
            config.inbound_queue_frames
        )
        self._handshake_slots = trio.Semaphore(config.max_pending_handshakes)
        self._listeners: list[trio.SocketListener] = []
        self._closed = False

    # --- the Transport interface ----------------------------------------------------

    @property
    def local_id(self) -> PeerId:
        return self._identity.public_key

    @property
    def authenticated_links(self) -> bool:
        """Every session is sealed unless this end asked for plaintext
        (``choose_suite`` never picks plaintext for one end alone)."""
        return self.config.suites != SUITE_PLAINTEXT

    def send_nowait(self, peer: PeerId, frame: bytes) -> bool:
        """Queue ``frame`` for ``peer``; ``False`` (and a counted reason) if dropped.

        Frames to a peer that is known but not connected wait in its queue
        for the next connection. Empty frames are refused: an empty record
        is the keepalive.
        """
        state = self._peers.get(peer)
        if self._closed or state is None:
            self._stats["no_route"] += 1
            return False
        if not frame or len(frame) > self.config.max_frame_bytes:
            self._stats["frame_refused"] += 1
            return False
        if state.queued_bytes + len(frame) > self.config.outbound_queue_bytes:
            self._stats["outbound_full"] += 1
            return False
        try:
            state.outbound_send.send_nowait(frame)
        except trio.WouldBlock:
            self._stats["outbound_full"] += 1
            return False
        state.queued_bytes += len(frame)
        return True

    def receive_nowait(self) -> tuple[PeerId, bytes]:
        """The next inbound ``(peer, frame)`` if one is queued, else
        ``trio.WouldBlock`` (a node draining for priority uses it)."""
        return self._inbound_recv.receive_nowait()

    async def receive(self) -> tuple[PeerId, bytes]:
        """The next inbound ``(peer, frame)``; ``trio.EndOfChannel`` once closed."""
        return await self._inbound_recv.receive()

    def stats(self) -> dict[str, int]:
        """Counters (``disconnect_<reason>`` for every drop) and three gauges:
        ``connections``, ``peers`` and ``inbound_queued`` (frames read but
        not yet taken by the node: how far behind its loop is)."""
        out = dict(self._stats)
        out["connections"] = sum(1 for p in self._peers.values() if p.conn is not None)
        out["peers"] = len(self._peers)
        out["inbound_queued"] = self._inbound_recv.statistics().current_buffer_used
        return out

    # --- beyond the interface -------------------------------------------------------

    @property
    def listen_address(self) -> Address | None:
        """Where this endpoint accepts connections (the real port if 0 was asked)."""
        if not self._listeners:
            return None
        host, port = self._listeners[0].socket.getsockname()[:2]
        return host, port

    def connect(self, peer: PeerId, address: Address) -> None:
        """Keep a connection to ``peer`` at ``address``: dial now, redial with
        backoff whenever it drops, until the transport closes."""
        if not self._allowed(peer):
            raise ValueError(f"peer {short_id(peer)} is not in the allow-list")
        state = self._peer(peer)
        state.address = (str(address[0]), int(address[1]))
        if not state.dialing:
            state.dialing = True
            assert self._nursery is not None, "connect() inside open_tcp_transport only"
            self._nursery.start_soon(self._dial_loop, state)

    async def wait_connected(self, peer: PeerId) -> None:
        """Return once an authenticated connection to ``peer`` is up."""
        state = self._peer(peer)
        await state.wait_until(lambda: state.conn is not None)

    async def wait_disconnected(self, peer: PeerId) -> None:
        """Return once no connection to ``peer`` is up."""
        state = self._peer(peer)
        await state.wait_until(lambda: state.conn is None)

    def connections(self) -> dict[PeerId, ConnectionInfo]:
        """The live connections, by peer."""
        out = {}
        for peer, state in self._peers.items():
            conn = state.conn
            if conn is not None:
                address = _remote_address(conn.stream)
                suite = SUITE_NAMES[conn.session.suite]
                out[peer] = ConnectionInfo(peer, conn.dialer, address, suite)
        return out

    # --- tasks ----------------------------------------------------------------------

    def _peer(self, peer: PeerId) -> _Peer:
        state = self._peers.get(peer)
        if state is None:
            state = self._peers[peer] = _Peer(peer, self.config.outbound_queue_frames)
        return state

    async def _listen(self, address: Address, task_status=trio.TASK_STATUS_IGNORED) -> None:
        host, port = address
        listeners = await trio.open_tcp_listeners(port, host=host)
        self._listeners.extend(listeners)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener)
            task_status.started()

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError:  # e.g. out of file descriptors: wait, retry
                    self._stats["accept_failed"] += 1
                    await trio.sleep(0.1)
                    continue
                self._stats["accepted"] += 1
                assert self._nursery is not None
                self._nursery.start_soon(self._serve, stream, False, None)

    async def _dial_loop(self, state: _Peer) -> None:
        attempt = 0
        while True:
            await state.wait_until(lambda: state.conn is None)
            assert state.address is not None
            stream = await self._dial(state.address)
            if stream is not None and await self._serve(stream, True, state.id):
                attempt = 0  # the link was up: start again from the shortest delay
            await trio.sleep(backoff_delay(attempt, self._rng, self.config))
            attempt += 1

    async def _dial(self, address: Address) -> trio.SocketStream | None:
        self._stats["dials"] += 1
        try:
            with trio.fail_after(self.config.connect_timeout):
                return await trio.open_tcp_stream(*address)
        except (OSError, trio.TooSlowError):
            self._stats["dial_failed"] += 1
            return None

    async def _serve(
        self, stream: trio.SocketStream, dialed: bool, expected: PeerId | None
    ) -> bool:
        """Handshake, adopt and run one connection; count why it ended.

        Returns whether the handshake succeeded. Only what the peer or the
        network can cause is caught; cancellation and bugs propagate.
        """
        reason = "closed"
        established = False
        try:
            self._tune(stream)
            reader = _RecordReader(stream.socket, self.config.read_buffer_bytes)
            result = await self._handshake(stream, reader, limited=not dialed)
            if expected is not None and result.peer != expected:
                raise HandshakeError("dialled one key, reached another", "wrong_peer")
            established = True
            self._stats["handshakes_ok"] += 1
            conn = self._adopt(result, stream, self.local_id if dialed else result.peer)
            reason = "duplicate" if conn is None else await self._run(conn, reader)
        except _PEER_FAILURES as exc:
            reason = _reason_of(exc)
        finally:
            self._stats["disconnect_" + reason] += 1
            await trio.aclose_forcefully(stream)
        return established

    def _tune(self, stream: trio.SocketStream) -> None:
        size = self.config.socket_buffer_bytes
        if size is not None:
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    async def _handshake(
        self, stream: trio.SocketStream, reader: _RecordReader, *, limited: bool
    ) -> HandshakeResult:
        if limited:
            try:
                self._handshake_slots.acquire_nowait()
            except trio.WouldBlock:
                raise HandshakeError("too many pending handshakes", "handshake_busy") from None
        try:
            with trio.fail_after(self.config.handshake_timeout):
                return await self._handshake_steps(stream, reader)
        except trio.TooSlowError:
            raise HandshakeError("handshake timed out", "handshake_timeout") from None
        finally:
            if limited:
                self._handshake_slots.release()

    async def _handshake_steps(
        self, stream: trio.SocketStream, reader: _RecordReader
    ) -> HandshakeResult:
        handshake = Handshake(self._identity, self._allowed, suites=self.config.suites)
        await stream.send_all(handshake.hello_record)
        length = parse_length(await reader.read_exactly(LENGTH_BYTES), HELLO_BYTES)
        auth_record = handshake.receive_hello(await reader.read_exactly(length))
        await stream.send_all(auth_record)
        length = parse_length(await reader.read_exactly(LENGTH_BYTES), sealed_length(AUTH_BYTES))
        return handshake.receive_auth(await reader.read_exactly(length))

    def _adopt(
        self, result: HandshakeResult, stream: trio.SocketStream, dialer: PeerId
    ) -> _Connection | None:
        state = self._peer(result.peer)
        existing = state.conn
        if existing is not None:
            if not keep_new_connection(self.local_id, state.id, existing.dialer, dialer):
                return None
            existing.fail("replaced")
        conn = _Connection(state, dialer, stream, result.session)
        state.conn = conn
        state.notify()
        return conn

    async def _run(self, conn: _Connection, reader: _RecordReader) -> str:
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, conn, self._read_loop, reader)
                    nursery.start_soon(self._guard, conn, self._write_loop)
                    nursery.start_soon(_watch_idle, conn, reader, self.config.idle_timeout)
        finally:
            if conn.peer.conn is conn:
                conn.peer.conn = None
                conn.peer.notify()
        return conn.reason or "closed"

    async def _guard(self, conn: _Connection, loop: Callable, *args: object) -> None:
        try:
            await loop(conn, *args)
        except _PEER_FAILURES as exc:
            conn.fail(_reason_of(exc))
        else:
            conn.fail("closed")

    async def _read_loop(self, conn: _Connection, reader: _RecordReader) -> None:
        session = conn.session
        max_body = session.max_body(self.config.max_frame_bytes)
        inbound = self._inbound_send
        stats = self._stats
        while True:
            length = parse_length(await reader.read_exactly(LENGTH_BYTES), max_body)
            session.check_body_length(length)
            frame = session.open_body(await reader.read_exactly(length))
            stats["wire_bytes_received"] += LENGTH_BYTES + length
            if not frame:
                stats["keepalives_received"] += 1
                continue
            stats["frames_received"] += 1
            stats["bytes_received"] += len(frame)
            item = (conn.peer.id, frame)
            try:
                inbound.send_nowait(item)
            except trio.WouldBlock:
                await inbound.send(item)  # backpressure: stop reading this socket

    async def _write_loop(self, conn: _Connection) -> None:
        peer = conn.peer
        queue = peer.outbound_recv
        session = conn.session
        stream = conn.stream
        stats = self._stats
        batch_limit = self.config.write_batch_bytes
        interval = self.config.keepalive_interval
        while True:
            # A writer whose link was just replaced must not take a frame from
            # the queue the new link shares: taking one is not a checkpoint.
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                frame = queue.receive_nowait()
            except trio.WouldBlock:
                frame = None
                with trio.move_on_after(interval):
                    frame = await queue.receive()
            if frame is None:
                await stream.send_all(session.seal_record(b""))
                stats["keepalives_sent"] += 1
                continue
            records = [session.seal_record(frame)]
            size = len(records[0])
            payload = len(frame)
            while size < batch_limit:
                try:
                    frame = queue.receive_nowait()
                except trio.WouldBlock:
                    break
                records.append(session.seal_record(frame))
                size += len(records[-1])
                payload += len(frame)
            peer.queued_bytes -= payload
            await stream.send_all(records[0] if len(records) == 1 else b"".join(records))
            stats["frames_sent"] += len(records)
            stats["bytes_sent"] += payload
            stats["wire_bytes_sent"] += size


def _remote_address(stream: trio.SocketStream) -> Address | None:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return None
    return host, port


def _allow_policy(allowed: Collection[PeerId] | Callable[[PeerId], bool]) -> Callable:
    if callable(allowed):
        return allowed
    keys = frozenset(allowed)
    return keys.__contains__


@asynccontextmanager
async def open_tcp_transport(
    identity: Identity,
    *,
    allowed: Collection[PeerId] | Callable[[PeerId], bool],
    rng: np.random.Generator,
    listen: Address | None = ("127.0.0.1", 0),
    peers: Mapping[PeerId, Address] | None = None,
    config: TcpConfig | None = None,
) -> AsyncIterator[TcpTransport]:
    """An encrypted TCP endpoint for ``identity``, open for the ``async with`` block.

    ``allowed`` is the allow-list (keys, or a predicate such as "is a
    validator on chain"): a peer whose proven key it refuses is dropped with
    ``not_allowed``. ``listen`` is where to accept (``None``: dial only; port
    0: any free port, see :attr:`TcpTransport.listen_address`). ``peers``
    are dialled and kept connected, like :meth:`TcpTransport.connect`.
    ``rng`` draws the backoff jitter. Leaving the block cancels every task
    and closes every socket; :meth:`TcpTransport.receive` then raises
    ``trio.EndOfChannel``.
    """
    config = config or TcpConfig()
    if config.suites is not None:
        check_suites(config.suites)
    transport = TcpTransport(identity, _allow_policy(allowed), rng, config)
    try:
        async with trio.open_nursery() as nursery:
            transport._nursery = nursery
            if listen is not None:
                await nursery.start(transport._listen, listen)
            for peer, address in (peers or {}).items():
                transport.connect(peer, address)
            try:
                yield transport
            finally:
                transport._closed = True
                nursery.cancel_scope.cancel()
    finally:
        transport._inbound_send.close()
