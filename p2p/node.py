"""The node actor: one inbox, one loop, services that register handlers.

A node owns an identity and a transport. Everything that happens to it,
whether a frame from a peer, a timer, or a request its owner scheduled,
passes through one loop in one task, in a defined order (due timers first,
then the inbox). That single inbox is what makes a seeded simulation
reproducible regardless of how trio interleaves the nodes' tasks, and it
means services never need locks: a handler runs to completion before the
next event is looked at.

Handlers are plain functions; work that must wait is given to the node's
nursery with :meth:`Node.start_soon`, so it is cancelled with the node.

Two ways to drive a node, same node code:

* as a task: ``await node.run()`` (or :func:`open_node`) reads the
  transport's inbox and sleeps until the next timer. TCP nodes run so, one
  task tree each.
* driven: a simulator calls :meth:`Node.handle_frame` when a frame arrives
  and :meth:`Node.fire_timers` when the node asked to be woken (through the
  ``wakeup`` hook). A 10,000-node simulation then costs one trio task, not
  10,000 task switches per broadcast, and every event of every node sits in
  one deterministic order.

Before any handler sees a frame the node has decoded it (strictly, see
:mod:`.wire`), checked its signature, and, for point-to-point types,
checked that the signer is the peer the transport authenticated and that
the sequence number is fresh. Every refusal is counted by reason in
:attr:`Node.counters` and never reaches a handler; nothing a peer sends can
raise out of the loop.

A handler that raises anything else has a bug some input reached. By
default that exception ends the node (and a simulation with it), so tests
find the bug. A node on a real network is built with
``contain_handler_errors``: the frame is dropped, counted as
``handler_error.<exception class>`` and logged with its traceback, and the
node goes on, as CometBFT's connections recover from a reactor's panic and
drop the peer's message. One crafted message then cannot stop every
validator at once; the count and the log still say a bug is there.

Crash and restart: cancelling a node's scope drops every piece of its
in-memory state; a restart is a new :class:`Node` over the same identity
(and, in later layers, the same block store). Sequence numbers start from
the clock, so a restarted node is not mistaken for a replay.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from typing import Any

import trio

from .errors import NodeClosedError, SenderMismatch, WireError
from .identity import Identity, PeerId, short_id
from .transport import Transport
from .wire import RELAYABLE, Envelope, FrameCache, SequenceWindow, sign

_log = logging.getLogger(__name__)

_DRAIN_LIMIT = 4096
"""Frames a priority node holds taken off its transport (the transport's own
queue keeps pushing back beyond it)."""

__all__ = ["Handler", "Node", "Timer", "open_node"]

Handler = Callable[[PeerId, Envelope], None]
"""``handler(peer, envelope)``: ``peer`` is the authenticated link peer,
which differs from ``envelope.sender`` only for relayed (gossip) frames."""


class Timer:
    """A scheduled callback, repeating if it has a ``period``;
    :meth:`cancel` stops it from running again."""

    __slots__ = ("callback", "cancelled", "deadline", "period")

    def __init__(
        self, deadline: float, callback: Callable[[], None], period: float | None = None
    ) -> None:
        self.deadline = deadline
        self.callback = callback
        self.period = period
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Node:
    """One peer. Construct it, attach services, then ``await node.run()``
    inside a nursery (or use :func:`open_node`)."""

    def __init__(
        self,
        identity: Identity,
        transport: Transport,
        *,
        frame_cache: FrameCache | None = None,
        replay_window: int = 1024,
        start_seq: int | None = None,
        wakeup: Callable[[float], None] | None = None,
        priority: Collection[int] = (),
        contain_handler_errors: bool = False,
    ) -> None:
        """``priority``: message types handled ahead of the rest when frames
        queue up (task mode, on transports with ``receive_nowait``). A ledger
        node puts consensus first: under a flood of client traffic a PBFT
        message otherwise waits behind seconds of queued submissions, and
        the view changes it would have prevented follow."""
        self.identity = identity
        self.priority = frozenset(priority)
        self.contain_handler_errors = contain_handler_errors
        self.transport = transport
        self.counters: Counter[str] = Counter()
        self.hold_check: Callable[[PeerId, bytes], bool] | None = None
        """Asked of each frame outside ``priority`` as it is queued: False
        drops it there (the application answered it, say a client told
        busy at once instead of after the queue ahead of it)."""
        self.on_release: Callable[[PeerId, bytes], None] | None = None
        """Told of each such queued frame as it is taken to be handled."""
        self._urgent: deque[tuple[PeerId, bytes]] = deque()
        self._normal: deque[tuple[PeerId, bytes]] = deque()
        self._frames = frame_cache or FrameCache(max_bytes=64 * 1024 * 1024)
        self._links_vouch = transport.authenticated_links
        """Direct frames from their link peer skip the envelope signature
        check (:mod:`.wire`, "Who vouches for the sender")."""
        self._window = SequenceWindow(replay_window)
        self._handlers: dict[int, Handler] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._timer_order = itertools.count()
        if start_seq is None:
            start_seq = time.time_ns() // 1000 << 12
        self._seq = start_seq
        self._wakeup = wakeup
        self._wakeup_at = math.inf
        self._nursery: trio.Nursery | None = None
        self._job_scopes: set[trio.CancelScope] = set()
        self._wait_scope: trio.CancelScope | None = None
        self._closed = False

    # -- identity -----------------------------------------------------------
    @property
    def id(self) -> PeerId:
        return self.identity.public_key

    def __repr__(self) -> str:
        return f"Node({short_id(self.id)})"

    # -- services -----------------------------------------------------------
    def register(self, msg_type: int, handler: Handler) -> None:
        """Route every accepted frame of ``msg_type`` to ``handler``."""
        if int(msg_type) in self._handlers:
            raise ValueError(f"a handler for message type {msg_type} is already registered")
        self._handlers[int(msg_type)] = handler

    def sign(self, msg_type: int, body: bytes) -> Envelope:
        """Sign a message with the next sequence number (its ``frame`` is
        ready to send to as many peers as needed)."""
        self._seq += 1
        return sign(self.identity, msg_type, self._seq, body)

    def send(self, peer: PeerId, msg_type: int, body: bytes) -> bool:
        """Sign and queue a point-to-point message; ``False`` if it was dropped."""
        return self.send_frame(peer, self.sign(msg_type, body).frame)

    def send_frame(self, peer: PeerId, frame: bytes) -> bool:
        """Queue already-encoded bytes (a relayed frame, or one signed once
        for many peers)."""
        if self._closed:
            raise NodeClosedError("node is stopped")
        sent = self.transport.send_nowait(peer, frame)
        if not sent:
            self.counters["send_dropped"] += 1
        return sent

    # -- time -----------------------------------------------------------------
    def now(self) -> float:
        return trio.current_time()

    def call_at(self, deadline: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` in this node's loop at ``deadline`` (trio clock).

        Owners outside the node (a benchmark, a fault schedule) use this too,
        so their actions take their place in the node's single event order.
        """
        return self._push(Timer(deadline, callback))

    def _push(self, timer: Timer) -> Timer:
        heapq.heappush(self._timers, (timer.deadline, next(self._timer_order), timer))
        waiting = self._wait_scope
        if waiting is not None and timer.deadline < waiting.deadline:
            waiting.deadline = timer.deadline
        if self._wakeup is not None and timer.deadline < self._wakeup_at:
            self._wakeup_at = timer.deadline
            self._wakeup(timer.deadline)
        return timer

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(self.now() + delay, callback)

    def call_every(
        self, period: float, callback: Callable[[], None], *, phase: float | None = None
    ) -> Timer:
        """Run ``callback`` every ``period`` seconds, first after ``phase``
        (default: one period). Seeded simulations draw ``phase`` from their
        RNG so that periodic work of many nodes never ties exactly."""
        if period <= 0:
            raise ValueError("period must be positive")
        first = self.now() + (period if phase is None else phase)
        return self._push(Timer(first, callback, period))

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run an async job in the node's nursery; it dies with the node."""
        if self._nursery is None or self._closed:
            raise NodeClosedError("node is not running")
        self._nursery.start_soon(self._job, fn, args)

    async def _job(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        with trio.CancelScope() as scope:
            self._job_scopes.add(scope)
            try:
                await fn(*args)
            finally:
                self._job_scopes.discard(scope)

    def bind(self, nursery: trio.Nursery) -> None:
        """Driven mode: run this node's jobs in ``nursery`` (they still die
        with the node, see :meth:`crash`)."""
        self._nursery = nursery

    def crash(self) -> None:
        """Stop at once and forget everything: jobs cancelled, timers gone.
        The object is dead; a restart builds a new node."""
        self._closed = True
        for scope in list(self._job_scopes):
            scope.cancel()
        self._timers.clear()
        self._handlers.clear()

    # -- the loop ---------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The node's life. Returns when the transport closes; cancel the
        enclosing scope to stop (or crash) it."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._loop()
                nursery.cancel_scope.cancel()
        finally:
            self._closed = True
            self._nursery = None

    async def _loop(self) -> None:
        receive = self.transport.receive
        drain = getattr(self.transport, "receive_nowait", None) if self.priority else None
        urgent, normal = self._urgent, self._normal
        while True:
            if urgent or normal:
                await trio.lowlevel.checkpoint()
            else:
                deadline = self._timers[0][0] if self._timers else math.inf
                with trio.move_on_at(deadline) as self._wait_scope:
                    try:
                        self._sort_in(await receive(), urgent, normal)
                    except (trio.EndOfChannel, trio.ClosedResourceError):
                        return
                self._wait_scope = None
            if drain is not None:
                # Take what has queued up (bounded), so a priority frame
                # behind it is handled next.
                try:
                    while len(urgent) + len(normal) < _DRAIN_LIMIT:
                        self._sort_in(drain(), urgent, normal)
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    pass
            self._run_due_timers()
            if urgent:
                self._handle(*urgent.popleft())
            elif normal:
                peer, frame = normal.popleft()
                if self.on_release is not None:
                    try:
                        self.on_release(peer, frame)
                    except Exception:  # bookkeeping only: the frame is still handled
                        self.counters["on_release_error"] += 1
                        _log.exception("release hook failed")
                self._handle(peer, frame)

    def _sort_in(
        self,
        item: tuple[PeerId, bytes],
        urgent: deque[tuple[PeerId, bytes]],
        normal: deque[tuple[PeerId, bytes]],
    ) -> None:
        frame = item[1]
        # An envelope is a msgpack fixarray of 6: 0x96, version, type, ...
        # (both small ints); anything else is decoded, and refused, in turn.
        first = len(frame) > 2 and frame[0] == 0x96 and frame[1] < 0x80
        if first and frame[2] in self.priority:
            urgent.append(item)
        elif self.hold_check is None or self._check_hold(item):
            normal.append(item)

    def _check_hold(self, item: tuple[PeerId, bytes]) -> bool:
        assert self.hold_check is not None
        try:
            return self.hold_check(*item)
        except Exception:  # the frame's own handling will judge it
            self.counters["hold_check_error"] += 1
            _log.exception("hold check failed")
            return True

    @property
    def held(self) -> tuple[int, int]:
        """Frames taken off the transport and not yet handled: (priority,
        the rest). Where a busy node's backlog waits (a priority node
        drains its transport's queue into these), so its status shows it."""
        return len(self._urgent), len(self._normal)

    def fire_timers(self) -> None:
        """Run every timer that is due (the driver calls this when woken)."""
        if self._closed:
            return
        self._wakeup_at = math.inf
        self._run_due_timers()
        if self._wakeup is not None and self._timers and not self._closed:
            self._wakeup_at = self._timers[0][0]
            self._wakeup(self._wakeup_at)

    def _run_due_timers(self) -> None:
        now = trio.current_time()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, timer = heapq.heappop(timers)
            if timer.cancelled:
                continue
            if timer.period is not None:
                timer.deadline += timer.period
                self._push(timer)
            timer.callback()

    def _handle(self, peer: PeerId, frame: bytes) -> None:
        try:
            envelope = self._frames.decode(frame, link_peer=peer if self._links_vouch else None)
            if envelope.type not in RELAYABLE:
                if envelope.sender != peer:
                    raise SenderMismatch("point-to-point frame relayed by a third party")
                self._window.check(envelope.sender, envelope.seq)
            handler = self._handlers.get(envelope.type)
            if handler is None:
                self.counters["unhandled_type"] += 1
                return
            handler(peer, envelope)
        except WireError as exc:
            self.counters[f"rejected.{exc.reason}"] += 1
            return
        except Exception as exc:
            if not self.contain_handler_errors:
                raise
            self.counters[f"handler_error.{type(exc).__name__}"] += 1
            _log.error("a handler raised on a frame from %s", short_id(peer), exc_info=exc)
            return
        self.counters["accepted"] += 1

    def handle_frame(self, peer: PeerId, frame: bytes) -> None:
        """Process one inbound frame now, as the loop would (driven mode)."""
        if not self._closed:
            self._handle(peer, frame)


@asynccontextmanager
async def open_node(identity: Identity, transport: Transport, **kwargs: Any):
    """``async with open_node(...) as node:`` runs a node for the block's life.

    Attach services before the first ``await`` inside the block; on exit the
    node and everything it started are cancelled.
    """
    node = Node(identity, transport, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        try:
            yield node
        finally:
            nursery.cancel_scope.cancel()
