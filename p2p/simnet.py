"""A simulated network for many nodes in one process, in trio's time.

Run it under ``trio.testing.MockClock(autojump_threshold=0)`` and time is
virtual: a 10,000-node broadcast that spans seconds of network time takes
only as long as the Python work it causes. Run it under the real clock and
the same nodes talk in real time. Node code cannot tell either from TCP.

The model follows SimBlock's: each node has an uplink of finite bandwidth
that serialises what it sends (a 1 MiB payload occupies it for 84 ms at
100 Mbit/s, and frames queue behind each other), then each frame travels
with a latency drawn from the link's distribution (constant, uniform,
lognormal; per region pair). Loss, duplication and extra reordering delay
are per frame. Partitions and crashes are set and healed at run time, and
apply both to frames being sent and to frames still in flight.

Determinism: every draw comes from the *sending* node's own stream, seeded
from (network seed, node index), and in-flight frames are ordered by
(arrival time, sender index, sender's frame counter). A node's sends happen
in an order fixed by its own inputs, so trio's scheduling order never
changes a delivery (a node's index, its order of joining, is part of the
seed). :meth:`trace_digest`
hashes every delivery (time, source, destination, bytes) to prove it.

Bounded queues: a node's uplink holds at most ``max_backlog`` seconds of
traffic; beyond that a send is refused (``send_nowait`` returns ``False``,
counted as ``outbound_full``), the simulated twin of a full TCP send queue.
Each inbox is bounded too; a frame arriving at a full inbox is dropped and
counted as ``inbox_full``.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import struct
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import trio
import trio.lowlevel
import trio.testing

from .identity import PeerId
from .node import Node
from .randomness import RandomStream
from .wire import MAX_FRAME_BYTES

__all__ = [
    "Constant",
    "LinkModel",
    "LogNormal",
    "SimNetwork",
    "SimTransport",
    "Uniform",
]

MIN_LATENCY = 1e-6
"""Every frame takes at least this long, so a frame sent at time t is never
due at t itself: deliveries at one instant form one batch, whatever order
the senders ran in."""


@dataclass(frozen=True)
class Constant:
    seconds: float

    def draw(self, stream: RandomStream) -> float:
        return self.seconds


@dataclass(frozen=True)
class Uniform:
    low: float
    high: float

    def draw(self, stream: RandomStream) -> float:
        return self.low + (self.high - self.low) * stream.uniform()


@dataclass(frozen=True)
class LogNormal:
    """Heavy-tailed latency, as measured on WANs: ``median`` and shape ``sigma``."""

    median: float
    sigma: float

    def draw(self, stream: RandomStream) -> float:
        return stream.lognormal(self.median, self.sigma)


Latency = Constant | Uniform | LogNormal


@dataclass
class LinkModel:
    """How frames travel. Mutable at run time (``network.model.loss = 0.1``)."""

    latency: Latency = field(default_factory=lambda: Constant(0.05))
    region_latency: Mapping[tuple[str, str], Latency] = field(default_factory=dict)
    bandwidth_bps: float = 100e6
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.05
    max_backlog: float = 30.0

    def latency_between(self, a: str, b: str) -> Latency:
        return self.region_latency.get((a, b)) or self.region_latency.get((b, a)) or self.latency


class _Endpoint:
    __slots__ = (
        "counter",
        "index",
        "node",
        "peer",
        "receive_channel",
        "region",
        "send_channel",
        "stats",
        "stream",
        "uplink_free",
    )

    def __init__(self, index: int, peer: PeerId, region: str, stream: RandomStream, inbox: int):
        self.index = index
        self.peer = peer
        self.region = region
        self.stream = stream
        self.send_channel, self.receive_channel = trio.open_memory_channel[tuple[PeerId, bytes]](
            inbox
        )
        self.uplink_free = 0.0
        self.node: Node | None = None
        self.counter = 0
        self.stats: Counter[str] = Counter()


class SimTransport:
    """A node's view of the simulated network (implements ``Transport``)."""

    __slots__ = ("_endpoint", "_network")

    def __init__(self, network: SimNetwork, endpoint: _Endpoint) -> None:
        self._network = network
        self._endpoint = endpoint

    @property
    def local_id(self) -> PeerId:
        return self._endpoint.peer

    @property
    def authenticated_links(self) -> bool:
        """The network delivers each frame with its true sender."""
        return True

    def send_nowait(self, peer: PeerId, frame: bytes) -> bool:
        return self._network._send(self._endpoint, peer, frame)

    async def receive(self) -> tuple[PeerId, bytes]:
        return await self._endpoint.receive_channel.receive()

    def stats(self) -> dict[str, int]:
        return dict(self._endpoint.stats)


class SimNetwork:
    """The links between every pair of nodes. ``await network.run()`` in a
    nursery delivers frames; cancel it to stop the network."""

    def __init__(
        self,
        seed: int,
        model: LinkModel | None = None,
        *,
        trace: bool = False,
        advance_clock: bool = False,
    ) -> None:
        self.seed = seed
        self.advance_clock = advance_clock
        self.model = model or LinkModel()
        self._endpoints: dict[PeerId, _Endpoint] = {}
        self._queue: list[tuple] = []
        self._control_order = 0
        self._down: set[PeerId] = set()
        self._group: dict[PeerId, int] = {}
        self._wake: trio.CancelScope | None = None
        self._trace = hashlib.sha256() if trace else None
        self.deliveries = 0
        self.stats: Counter[str] = Counter()

    # -- membership -------------------------------------------------------------
    def add_node(self, peer: PeerId, *, region: str = "default", inbox: int = 4096) -> SimTransport:
        """Attach a node; its random stream is fixed by (seed, join order)."""
        if peer in self._endpoints:
            raise ValueError("peer already attached")
        index = len(self._endpoints)
        stream = RandomStream.from_seed(self.seed, 0x51A, index)
        endpoint = _Endpoint(index, peer, region, stream, inbox)
        self._endpoints[peer] = endpoint
        return SimTransport(self, endpoint)

    def reattach(self, peer: PeerId, *, inbox: int = 4096) -> SimTransport:
        """A fresh transport for a restarted node: its inbox starts empty."""
        old = self._endpoints[peer]
        endpoint = _Endpoint(old.index, peer, old.region, old.stream, inbox)
        endpoint.uplink_free, endpoint.counter = old.uplink_free, old.counter
        endpoint.stats = old.stats
        old.send_channel.close()
        self._endpoints[peer] = endpoint
        return SimTransport(self, endpoint)

    def drive(self, node: Node) -> None:
        """Deliver to ``node`` by calling it and fire its timers from this
        network's loop, instead of through an inbox the node must read.

        The node must have been built with ``wakeup=network.wakeup_for(peer)``.
        Driving replaces any node driven before for the same peer (a restart).
        """
        self._endpoints[node.id].node = node

    def wakeup_for(self, peer: PeerId) -> Callable[[float], None]:
        """The ``wakeup`` hook a driven node needs: its timers join the one
        event order, after control events and before frames at an instant."""
        endpoint = self._endpoints[peer]

        def wakeup(at: float) -> None:
            endpoint.counter += 1
            self._push((at, 1, endpoint.index, endpoint.counter, endpoint))

        return wakeup

    def detach(self, peer: PeerId) -> None:
        """Stop driving whatever node served ``peer`` (it crashed)."""
        self._endpoints[peer].node = None

    @property
    def peers(self) -> list[PeerId]:
        return list(self._endpoints)

    # -- faults -----------------------------------------------------------------
    def crash(self, peer: PeerId) -> None:
        """Frames to and from ``peer`` vanish until :meth:`restore`."""
        self._down.add(peer)

    def restore(self, peer: PeerId) -> None:
        self._down.discard(peer)

    def is_up(self, peer: PeerId) -> bool:
        return peer not in self._down

    def partition(self, groups: Collection[Collection[PeerId]]) -> None:
        """Split the network: frames cross no group boundary. Nodes in no
        group form one more group together."""
        self._group = {peer: i + 1 for i, members in enumerate(groups) for peer in members}

    def heal(self) -> None:
        self._group = {}

    def _connected(self, a: PeerId, b: PeerId) -> bool:
        if a in self._down or b in self._down:
            return False
        return self._group.get(a, 0) == self._group.get(b, 0)

    def schedule(self, at: float, action: Callable[[], None]) -> None:
        """Run ``action`` (a fault, a heal) in the delivery loop at ``at``,
        before any frame due at the same instant."""
        self._control_order += 1
        self._push((at, 0, self._control_order, 0, action))

    # -- sending ----------------------------------------------------------------
    def _send(self, src: _Endpoint, dst_peer: PeerId, frame: bytes) -> bool:
        dst = self._endpoints.get(dst_peer)
        stats = src.stats
        if dst is None:
            stats["no_route"] += 1
            return False
        if not frame or len(frame) > MAX_FRAME_BYTES:
            stats["frame_refused"] += 1
            return False
        now = trio.current_time()
        model = self.model
        start = max(now, src.uplink_free)
        if start - now > model.max_backlog:
            stats["outbound_full"] += 1
            return False
        size = len(frame)
        src.uplink_free = start + size * 8 / model.bandwidth_bps
        stats["frames_sent"] += 1
        stats["bytes_sent"] += size
        if not self._connected(src.peer, dst_peer):
            self.stats["dropped_unreachable"] += 1
            return True  # the sender cannot know; the frame is lost on the way
        stream = src.stream
        copies = 2 if model.duplicate and stream.uniform() < model.duplicate else 1
        latency = model.latency_between(src.region, dst.region)
        for _ in range(copies):
            if model.loss and stream.uniform() < model.loss:
                self.stats["dropped_loss"] += 1
                continue
            delay = max(latency.draw(stream), MIN_LATENCY)
            if model.reorder and stream.uniform() < model.reorder:
                delay += model.reorder_delay * stream.uniform()
            src.counter += 1
            self._push((src.uplink_free + delay, 2, src.index, src.counter, (src.peer, dst, frame)))
        return True

    def _push(self, item: tuple) -> None:
        heapq.heappush(self._queue, item)
        if self._wake is not None and item[0] < self._wake.deadline:
            self._wake.deadline = item[0]

    # -- delivering -------------------------------------------------------------
    async def run(self) -> None:
        """Deliver frames as their time comes, until cancelled.

        With ``advance_clock`` under an autojumping ``MockClock``, when no
        task is runnable and no deadline comes first, the loop moves the
        clock itself instead of sleeping: the jump trio would make, without
        a trip through the scheduler per event. That is only sound when this
        loop is the sole actor (every node driven, no node jobs, other tasks
        only waiting): trio cannot tell us about a task that woke at the
        same instant and has not run yet, and it would then act at a later
        time than it should. Simulations built that way (``sims.gossipsim``)
        turn it on; the default is the plain, always-exact sleep.
        """
        queue = self._queue
        clock = trio.lowlevel.current_clock()
        can_jump = (
            self.advance_clock
            and isinstance(clock, trio.testing.MockClock)
            and clock.autojump_threshold == 0
        )
        jumps = 0
        woke_with_others = False
        while True:
            if can_jump and queue and woke_with_others:
                # Tasks whose deadline woke them with us may not have run yet;
                # trio counts them nowhere, so let them run before any jump.
                await trio.lowlevel.checkpoint()
                woke_with_others = False
            if can_jump and queue and self._jump_to(clock, queue[0][0]):
                jumps += 1
                if jumps % 32 == 0:  # stay cancellable
                    await trio.lowlevel.checkpoint()
            else:
                with trio.CancelScope(deadline=queue[0][0] if queue else math.inf) as scope:
                    self._wake = scope
                    await trio.sleep_forever()
                self._wake = None
                woke_with_others = True
            now = trio.current_time()
            while queue and queue[0][0] <= now:
                at, kind, _, _, payload = heapq.heappop(queue)
                if kind == 2:
                    self._deliver(at, *payload)
                elif kind == 1:
                    if payload.node is not None:
                        payload.node.fire_timers()
                else:
                    payload()

    @staticmethod
    def _jump_to(clock: trio.testing.MockClock, at: float) -> bool:
        statistics = trio.lowlevel.current_statistics()
        if statistics.tasks_runnable:
            return False
        now = clock.current_time()
        if at <= now:
            return True
        if now + statistics.seconds_to_next_deadline <= at:  # ties: sleep, exactly
            return False
        clock.jump(at - now)
        return clock.current_time() >= at

    def _deliver(self, at: float, src: PeerId, dst: _Endpoint, frame: bytes) -> None:
        if not self._connected(src, dst.peer) or self._endpoints.get(dst.peer) is not dst:
            self.stats["dropped_in_flight"] += 1
            return
        if dst.node is not None:
            dst.node.handle_frame(src, frame)
        else:
            try:
                dst.send_channel.send_nowait((src, frame))
            except trio.WouldBlock:
                dst.stats["inbox_full"] += 1
                return
            except trio.ClosedResourceError:
                self.stats["dropped_in_flight"] += 1
                return
        dst.stats["frames_received"] += 1
        dst.stats["bytes_received"] += len(frame)
        self.deliveries += 1
        if self._trace is not None:
            src_index = self._endpoints[src].index
            self._trace.update(struct.pack(">dIII", at, src_index, dst.index, len(frame)))
            self._trace.update(frame)

    def trace_digest(self) -> str:
        """SHA-256 over every delivery so far, in delivery order."""
        if self._trace is None:
            raise RuntimeError("create the network with trace=True")
        return self._trace.hexdigest()

    def bytes_sent(self) -> int:
        return sum(e.stats["bytes_sent"] for e in self._endpoints.values())
