"""Cyclon peer sampling: bounded, self-free views that stay connected and
forget crashed peers (SPEC M1-M2)."""

from __future__ import annotations

from collections import Counter, deque

import trio
import trio.testing

from fedchain.p2p.identity import Identity
from fedchain.p2p.membership import CyclonConfig, PeerSampling
from fedchain.p2p.node import Node
from fedchain.p2p.randomness import RandomStream
from fedchain.p2p.simnet import SimNetwork


def _overlay(n: int, crash_at: float | None = None, duration: float = 100.0):
    config = CyclonConfig(view_size=8, shuffle_length=4, period=2.0)

    async def scenario():
        net = SimNetwork(seed=9)
        identities = [Identity(i.to_bytes(32, "big")) for i in range(n)]
        samplings = []
        for index, identity in enumerate(identities):
            transport = net.add_node(identity.public_key)
            node = Node(
                identity, transport, start_seq=0, wakeup=net.wakeup_for(identity.public_key)
            )
            net.drive(node)
            ring = [identities[(index + k) % n].public_key for k in (1, 2)]  # a thin start
            stream = RandomStream.from_seed(9, index)
            samplings.append(PeerSampling(node, stream, config, bootstrap=ring))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(net.run)
            if crash_at is not None:
                await trio.sleep(crash_at)
                net.crash(identities[0].public_key)
                net.detach(identities[0].public_key)
                await trio.sleep(duration - crash_at)
            else:
                await trio.sleep(duration)
            nursery.cancel_scope.cancel()
        return identities, samplings

    return trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def _connected(ids, views) -> bool:
    reach = {ids[0]}
    todo = deque([ids[0]])
    while todo:
        for peer in views[todo.popleft()]:
            if peer not in reach:
                reach.add(peer)
                todo.append(peer)
    return len(reach) == len(ids)


def test_views_fill_up_stay_bounded_and_the_overlay_mixes():
    """M1: from a ring, shuffles grow bounded self-free views into a random,
    connected overlay with balanced in-degrees."""
    identities, samplings = _overlay(100)
    ids = [i.public_key for i in identities]
    views = {s.node.id: s.view() for s in samplings}
    for peer, view in views.items():
        assert peer not in view
        assert len(view) == len(set(view)) <= 8
        assert len(view) >= 6
    assert _connected(ids, views)
    indegree = Counter(p for view in views.values() for p in view)
    assert max(indegree.values()) <= 20
    ring_edges = sum(
        1 for index, s in enumerate(samplings) for p in s.view() if p == ids[(index + 1) % 100]
    )
    assert ring_edges < 30  # the starting ring has been shuffled away


def test_a_crashed_peer_disappears_from_every_view():
    """M2: no heartbeat needed; the dead stop answering and age out."""
    identities, samplings = _overlay(60, crash_at=20.0, duration=100.0)
    dead = identities[0].public_key
    assert all(dead not in s.view() for s in samplings[1:])
    ids = [i.public_key for i in identities[1:]]
    assert _connected(ids, {s.node.id: s.view() for s in samplings[1:]})
