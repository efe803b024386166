"""Many gossiping nodes on one simulated network, in one process.

The harness the gossip benchmark, the demo and the tests share: it builds
seeded identities, a :class:`~fedchain.p2p.simnet.SimNetwork`, and one
:class:`~fedchain.p2p.node.Node` with Cyclon peer sampling and gossip per
peer, starts a broadcast through the origin's own event loop, and measures
who got it, when, and at what cost.

Views start as a random graph drawn from the seed (as SimBlock starts from
a random topology); Cyclon keeps reshuffling them during the run. Starting
from a converged overlay instead of simulating 10,000 joins keeps the
benchmark about dissemination, which is what it measures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import trio
import trio.testing

from fedchain.p2p.gossip import Gossip, GossipConfig
from fedchain.p2p.identity import Identity, PeerId
from fedchain.p2p.membership import CyclonConfig, PeerSampling
from fedchain.p2p.node import Node
from fedchain.p2p.randomness import RandomStream
from fedchain.p2p.simnet import LinkModel, SimNetwork
from fedchain.p2p.wire import FrameCache

__all__ = ["BroadcastResult", "GossipSimConfig", "GossipSimulation", "percentile"]


@dataclass
class GossipSimConfig:
    nodes: int = 1000
    seed: int = 1
    model: LinkModel = field(default_factory=LinkModel)
    cyclon: CyclonConfig = field(default_factory=lambda: CyclonConfig(period=5.0))
    gossip: GossipConfig = field(default_factory=GossipConfig)
    trace: bool = False


@dataclass
class BroadcastResult:
    """What one broadcast achieved. Times are seconds of network time."""

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


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values), q))


class GossipSimulation:
    """A seeded network of gossiping nodes, ready to broadcast."""

    def __init__(self, config: GossipSimConfig) -> None:
        self.config = config
        n = config.nodes
        if n < 2:
            raise ValueError("a gossip network needs at least two nodes")
        seeds = np.random.SeedSequence([config.seed, 0x605])
        key_rng, view_rng = (np.random.Generator(np.random.PCG64(s)) for s in seeds.spawn(2))
        self.identities = [Identity(key_rng.bytes(32)) for _ in range(n)]
        self.ids: list[PeerId] = [i.public_key for i in self.identities]
        self.network = SimNetwork(config.seed, config.model, trace=config.trace)
        self.frames = FrameCache()
        self.transports = [self.network.add_node(peer) for peer in self.ids]
        self.views = _random_views(view_rng, n, min(config.cyclon.view_size, n - 1))
        self.nodes: list[Node] = []
        self.gossips: list[Gossip] = []

    def _build(self, index: int) -> None:
        peer = self.ids[index]
        node = Node(
            self.identities[index],
            self.transports[index],
            frame_cache=self.frames,
            start_seq=0,
            wakeup=self.network.wakeup_for(peer),
        )
        self.network.drive(node)
        stream = RandomStream.from_seed(self.config.seed, 0x40DE, index)
        sampling = PeerSampling(
            node, stream, self.config.cyclon, bootstrap=(self.ids[j] for j in self.views[index])
        )
        self.nodes.append(node)
        self.gossips.append(Gossip(node, sampling, stream, self.config.gossip))

    def broadcast(  # one per simulation: nodes are built inside its trio run
        self,
        payload_bytes: int,
        *,
        origin: int = 0,
        start: float = 1.0,
        timeout: float = 120.0,
        settle: float = 2.0,
        virtual: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> BroadcastResult:
        """Publish one payload from ``origin`` at network time ``start`` and
        run until every node has it (or ``timeout``), then ``settle`` more
        seconds so late duplicates and announces are counted."""
        n = len(self.ids)
        times: dict[int, float] = {}
        done = trio.Event()
        payload = np.random.default_rng(self.config.seed).bytes(payload_bytes)

        def recorder(index: int):
            def on_message(origin_id: PeerId, topic: str, data: bytes, envelope) -> None:
                times.setdefault(index, trio.current_time())
                if progress is not None:
                    progress(len(times), n)
                if len(times) == n:
                    done.set()

            return on_message

        async def main() -> float:
            for index in range(n):
                self._build(index)
                self.gossips[index].subscribe("bench", recorder(index))
            self.nodes[origin].call_at(
                start, lambda: self.gossips[origin].publish("bench", payload)
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.network.run)
                for node in self.nodes:
                    node.bind(nursery)
                with trio.move_on_at(start + timeout):
                    await done.wait()
                finished = trio.current_time()
                await trio.sleep(settle)
                nursery.cancel_scope.cancel()
            return finished

        wall = time.perf_counter()
        clock = trio.testing.MockClock(autojump_threshold=0) if virtual else None
        finished = trio.run(main, clock=clock)
        wall = time.perf_counter() - wall
        return BroadcastResult(
            nodes=n,
            payload_bytes=payload_bytes,
            delivered=len(times),
            latencies=sorted(t - start for t in times.values()),
            duplicates=sum(node.counters["gossip.duplicate"] for node in self.nodes),
            frames_sent=sum(t.stats().get("frames_sent", 0) for t in self.transports),
            bytes_sent=self.network.bytes_sent(),
            virtual_seconds=finished - start,
            wall_seconds=wall,
            trace_digest=self.network.trace_digest() if self.config.trace else None,
        )


def _random_views(rng: np.random.Generator, n: int, degree: int) -> list[list[int]]:
    """``degree`` distinct random neighbours per node, never itself."""
    views = []
    for index in range(n):
        picks = rng.choice(n - 1, size=degree, replace=False)
        views.append([int(p) + (p >= index) for p in picks])
    return views
