"""Many gossiping nodes on one simulated network, in one process.

The harness the gossip benchmark, the demo and the tests share: it builds
seeded identities, a :class:`~fedchain.p2p.simnet.SimNetwork`, and one
:class:`~fedchain.p2p.node.Node` with Cyclon peer sampling and gossip per
peer; publishes payloads through their origins' own event loops; applies
faults (crash, restart, partition, heal, loss) at fixed network times; and
measures who got each message, when, and at what cost.

Nodes are driven by the network (see :mod:`fedchain.p2p.node`), so a
10,000-node network is one trio task and every event of every node has one
deterministic place in time.

Views start as a random graph drawn from the seed (as SimBlock starts from
a random topology); Cyclon keeps reshuffling them during the run. Starting
from a converged overlay instead of simulating 10,000 joins keeps the
benchmark about dissemination, which is what it measures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import trio
import trio.testing

from fedchain.p2p.gossip import Gossip, GossipConfig
from fedchain.p2p.identity import Identity, PeerId
from fedchain.p2p.membership import CyclonConfig, PeerSampling
from fedchain.p2p.node import Node
from fedchain.p2p.randomness import RandomStream
from fedchain.p2p.simnet import LinkModel, SimNetwork
from fedchain.p2p.wire import Envelope, FrameCache

__all__ = [
    "BroadcastResult",
    "Fault",
    "GossipSimConfig",
    "GossipSimulation",
    "Publication",
    "percentile",
]


@dataclass
class GossipSimConfig:
    nodes: int = 1000
    seed: int = 1
    model: LinkModel = field(default_factory=LinkModel)
    cyclon: CyclonConfig = field(default_factory=lambda: CyclonConfig(period=5.0))
    gossip: GossipConfig = field(default_factory=GossipConfig)
    trace: bool = False


@dataclass(frozen=True)
class Publication:
    """``origin`` publishes ``size`` random bytes at network time ``at``."""

    at: float
    origin: int
    size: int
    topic: str = "sim"


@dataclass(frozen=True)
class Fault:
    """A change to the network at time ``at``: ``crash``/``restart`` the
    listed nodes, ``partition`` them from the rest, ``heal``, or set ``loss``."""

    at: float
    kind: Literal["crash", "restart", "partition", "heal", "loss"]
    nodes: tuple[int, ...] = ()
    value: float = 0.0


@dataclass
class BroadcastResult:
    """What one message achieved. Times are seconds of network time."""

    nodes: int
    payload_bytes: int
    delivered: int
    latencies: list[float]
    duplicates: int
    frames_sent: int
    bytes_sent: int
    virtual_seconds: float
    wall_seconds: float
    trace_digest: str | None = None

    @property
    def delivery_ratio(self) -> float:
        return self.delivered / self.nodes

    def figures(self) -> dict[str, float | int]:
        lat = self.latencies
        return {
            "nodes": self.nodes,
            "payload_bytes": self.payload_bytes,
            "delivery_ratio": round(self.delivery_ratio, 6),
            "latency_p50_s": round(percentile(lat, 50), 4),
            "latency_p90_s": round(percentile(lat, 90), 4),
            "latency_p99_s": round(percentile(lat, 99), 4),
            "latency_max_s": round(max(lat, default=math.nan), 4),
            "duplicates_per_node": round(self.duplicates / self.nodes, 3),
            "frames_sent": self.frames_sent,
            "bytes_sent": self.bytes_sent,
            "virtual_s": round(self.virtual_seconds, 3),
            "wall_s": round(self.wall_seconds, 3),
        }


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values), q))


@dataclass
class MessageLog:
    """Deliveries of one publication, filled in as the run goes."""

    publication: Publication
    message_id: bytes | None = None
    published_at: float = math.nan
    up_at_publish: frozenset[int] = frozenset()
    delivered: dict[int, float] = field(default_factory=dict)

    def delivered_to_up(self) -> int:
        """How many of the nodes that were up at publication got it (nodes
        restarted later may get it too, but are not counted)."""
        return sum(1 for index in self.delivered if index in self.up_at_publish)


class GossipSimulation:
    """A seeded network of gossiping nodes. One :meth:`run` per instance:
    nodes are built inside its trio run."""

    def __init__(self, config: GossipSimConfig) -> None:
        self.config = config
        n = config.nodes
        if n < 2:
            raise ValueError("a gossip network needs at least two nodes")
        seeds = np.random.SeedSequence([config.seed, 0x605])
        key_rng, view_rng = (np.random.Generator(np.random.PCG64(s)) for s in seeds.spawn(2))
        self.identities = [Identity(key_rng.bytes(32)) for _ in range(n)]
        self.ids: list[PeerId] = [i.public_key for i in self.identities]
        # Every node is driven and the harness only waits: the network is the
        # sole actor, so it may advance the virtual clock itself.
        self.network = SimNetwork(config.seed, config.model, trace=config.trace, advance_clock=True)
        self.frames = FrameCache()
        self.transports = [self.network.add_node(peer) for peer in self.ids]
        self.views = _random_views(view_rng, n, min(config.cyclon.view_size, n - 1))
        self.nodes: list[Node] = []
        self.gossips: list[Gossip] = []
        self.logs: list[MessageLog] = []
        self.restarts = [0] * n
        self._deliveries: dict[bytes, dict[int, float]] = {}
        self.wall_seconds = math.nan
        self._t0 = 0.0
        self._ran = False

    # -- building and faults ----------------------------------------------------
    def _build(self, index: int, nursery: trio.Nursery) -> None:
        peer = self.ids[index]
        node = Node(
            self.identities[index],
            self.transports[index],
            frame_cache=self.frames,
            start_seq=int(trio.current_time() * 1e6) << 12,
            wakeup=self.network.wakeup_for(peer),
        )
        node.bind(nursery)
        self.network.drive(node)
        stream = RandomStream.from_seed(self.config.seed, 0x40DE, index, self.restarts[index])
        if self.restarts[index]:  # a restarted node rejoins through a few random peers
            bootstrap = [self.ids[j] for j in stream.sample(range(len(self.ids)), 4) if j != index]
        else:
            bootstrap = [self.ids[j] for j in self.views[index]]
        sampling = PeerSampling(node, stream, self.config.cyclon, bootstrap=bootstrap)
        gossip = Gossip(node, sampling, stream, self.config.gossip)
        gossip.subscribe("sim", self._recorder(index))
        if len(self.nodes) > index:
            self.nodes[index], self.gossips[index] = node, gossip
        else:
            self.nodes.append(node)
            self.gossips.append(gossip)

    def _recorder(self, index: int) -> Callable[[PeerId, str, bytes, Envelope], None]:
        deliveries = self._deliveries

        def on_message(origin: PeerId, topic: str, data: bytes, envelope: Envelope) -> None:
            deliveries.setdefault(envelope.message_id, {}).setdefault(index, self.network_time())

        return on_message

    def _apply(self, fault: Fault, nursery: trio.Nursery) -> None:
        net = self.network
        if fault.kind == "crash":
            for index in fault.nodes:
                net.crash(self.ids[index])
                net.detach(self.ids[index])
                self.nodes[index].crash()
        elif fault.kind == "restart":
            for index in fault.nodes:
                self.restarts[index] += 1
                net.restore(self.ids[index])
                self._build(index, nursery)
        elif fault.kind == "partition":
            net.partition([[self.ids[i] for i in fault.nodes]])
        elif fault.kind == "heal":
            net.heal()
        elif fault.kind == "loss":
            net.model.loss = fault.value
        else:
            raise ValueError(f"unknown fault {fault.kind!r}")

    def network_time(self) -> float:
        """Seconds since the run started (call from inside :meth:`run`)."""
        return trio.current_time() - self._t0

    def is_up(self, index: int) -> bool:
        return self.network.is_up(self.ids[index])

    # -- running ------------------------------------------------------------------
    def run(
        self,
        publications: Sequence[Publication],
        *,
        duration: float,
        faults: Sequence[Fault] = (),
        virtual: bool = True,
        on_tick: Callable[[GossipSimulation], None] | None = None,
        tick: float = 0.1,
        until_delivered: bool = False,
        settle: float = 2.0,
    ) -> float:
        """Run for ``duration`` seconds of network time (or, with
        ``until_delivered``, until every publication reached every node, then
        ``settle`` more seconds for late duplicates). Returns the wall seconds
        spent."""
        if self._ran:
            raise RuntimeError("a simulation runs once; build another")
        self._ran = True
        self.logs = [MessageLog(p) for p in publications]
        payloads = np.random.default_rng([self.config.seed, 0xDA7A])
        everyone = trio.Event()

        async def main() -> None:
            t0 = self._t0 = trio.current_time()  # 0 under MockClock, not on the real clock
            async with trio.open_nursery() as nursery:
                for index in range(len(self.ids)):
                    self._build(index, nursery)
                for log in self.logs:
                    data = payloads.bytes(log.publication.size)
                    self.network.schedule(t0 + log.publication.at, self._publisher(log, data))
                for fault in faults:
                    self.network.schedule(t0 + fault.at, lambda f=fault: self._apply(f, nursery))
                for k in range(1, int(duration / tick) + 1):
                    self.network.schedule(t0 + k * tick, lambda: self._tick(on_tick, everyone))
                nursery.start_soon(self.network.run)
                with trio.move_on_at(t0 + duration):
                    if until_delivered:
                        await everyone.wait()
                        await trio.sleep(settle)
                    else:
                        await trio.sleep_forever()
                nursery.cancel_scope.cancel()

        wall = time.perf_counter()
        clock = trio.testing.MockClock(autojump_threshold=0) if virtual else None
        trio.run(main, clock=clock)
        self.wall_seconds = time.perf_counter() - wall
        return self.wall_seconds

    def _publisher(self, log: MessageLog, data: bytes) -> Callable[[], None]:
        def publish() -> None:
            origin = log.publication.origin
            if self.is_up(origin):
                log.published_at = self.network_time()
                log.up_at_publish = frozenset(i for i in range(len(self.ids)) if self.is_up(i))
                log.message_id = self.gossips[origin].publish(log.publication.topic, data)
                log.delivered = self._deliveries.setdefault(log.message_id, {})

        return publish

    def _tick(self, on_tick: Callable[[GossipSimulation], None] | None, everyone: trio.Event):
        if on_tick is not None:
            on_tick(self)
        n = len(self.ids)
        if all(log.message_id is not None and len(log.delivered) == n for log in self.logs):
            everyone.set()

    # -- results ------------------------------------------------------------------
    def result(self, log: MessageLog, *, wall_seconds: float = math.nan) -> BroadcastResult:
        """Figures for one publication (network-wide counters are for the run)."""
        times = log.delivered
        last = max(times.values(), default=log.published_at)
        return BroadcastResult(
            nodes=len(self.ids),
            payload_bytes=log.publication.size,
            delivered=len(times),
            latencies=sorted(t - log.published_at for t in times.values()),
            duplicates=sum(node.counters["gossip.duplicate"] for node in self.nodes),
            frames_sent=sum(t.stats().get("frames_sent", 0) for t in self.transports),
            bytes_sent=self.network.bytes_sent(),
            virtual_seconds=last - log.published_at,
            wall_seconds=wall_seconds,
            trace_digest=self.network.trace_digest() if self.config.trace else None,
        )

    def broadcast(
        self,
        payload_bytes: int,
        *,
        origin: int = 0,
        start: float = 1.0,
        timeout: float = 120.0,
        settle: float = 2.0,
        virtual: bool = True,
    ) -> BroadcastResult:
        """One payload from ``origin`` at ``start``, run until every node has
        it (or ``timeout``) plus ``settle`` seconds for late duplicates."""
        publication = Publication(start, origin, payload_bytes)
        wall = self.run(
            [publication],
            duration=start + timeout,
            virtual=virtual,
            until_delivered=True,
            tick=0.05,
            settle=settle,
        )
        return self.result(self.logs[0], wall_seconds=wall)


def _random_views(rng: np.random.Generator, n: int, degree: int) -> list[list[int]]:
    """``degree`` distinct random neighbours per node, never itself."""
    views = []
    for index in range(n):
        picks = rng.choice(n - 1, size=degree, replace=False)
        views.append([int(p) + (p >= index) for p in picks])
    return views
