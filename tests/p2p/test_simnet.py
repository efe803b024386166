"""The simulated network's link model and its determinism (SPEC S1-S4)."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from fedchain.p2p.identity import PeerId
from fedchain.p2p.simnet import Constant, LinkModel, LogNormal, SimNetwork, Uniform


async def _collect(transport, out: list, limit: int) -> None:
    while len(out) < limit:
        peer, frame = await transport.receive()
        out.append((trio.current_time(), peer, frame))


def _run(scenario, *args):
    return trio.run(scenario, *args, clock=trio.testing.MockClock(autojump_threshold=0))


def test_latency_and_bandwidth_set_arrival_times():
    """S1: arrival = uplink free + size / bandwidth + latency."""

    async def scenario():
        net = SimNetwork(seed=1, model=LinkModel(latency=Constant(0.1), bandwidth_bps=8e6))
        a = net.add_node(b"a" * 32)
        b = net.add_node(b"b" * 32)
        got: list = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(net.run)
            assert a.send_nowait(b.local_id, bytes(1_000_000))  # 1 s on an 8 Mbit/s uplink
            assert a.send_nowait(b.local_id, bytes(10))  # queued behind it
            await _collect(b, got, 2)
            nursery.cancel_scope.cancel()
        return [(round(t, 6), len(f)) for t, _, f in got]

    assert _run(scenario) == [(1.1, 1_000_000), (1.10001, 10)]


@pytest.mark.parametrize(
    "latency", [Constant(0.02), Uniform(0.01, 0.03), LogNormal(0.02, 0.5)], ids=repr
)
def test_latency_distributions_have_their_centre(latency):
    async def scenario():
        net = SimNetwork(seed=3, model=LinkModel(latency=latency, bandwidth_bps=1e12))
        a, b = net.add_node(b"a" * 32), net.add_node(b"b" * 32)
        got: list = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(net.run)
            for _ in range(2000):
                a.send_nowait(b.local_id, b"x")
            await _collect(b, got, 2000)
            nursery.cancel_scope.cancel()
        return sorted(t for t, _, _ in got)

    times = _run(scenario)
    median = times[len(times) // 2]
    assert median == pytest.approx(0.02, rel=0.05)
    assert min(times) > 0


def test_loss_duplication_and_reordering_happen_at_their_rates():
    async def scenario():
        model = LinkModel(
            latency=Constant(0.01), loss=0.1, duplicate=0.05, reorder=0.2, bandwidth_bps=1e12
        )
        net = SimNetwork(seed=4, model=model)
        a, b = net.add_node(b"a" * 32), net.add_node(b"b" * 32)
        got: list = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(net.run)
            for i in range(5000):
                a.send_nowait(b.local_id, i.to_bytes(4, "big"))
            with trio.move_on_after(10):
                await _collect(b, got, 10**9)
            nursery.cancel_scope.cancel()
        return [int.from_bytes(f, "big") for _, _, f in got]

    order = _run(scenario)
    distinct = set(order)
    assert 0.88 < len(distinct) / 5000 < 0.92  # 10% loss
    assert 0.03 < (len(order) - len(distinct)) / len(distinct) < 0.07  # 5% duplicated
    inversions = sum(1 for x, y in itertools.pairwise(order) if y < x)
    assert inversions > 100


def test_partitions_and_crashes_cut_links_both_ways_and_heal():
    """S2: nothing crosses a partition or reaches a crashed node, in flight or not."""

    async def scenario():
        net = SimNetwork(seed=5, model=LinkModel(latency=Constant(1.0)))
        a, b, c = (net.add_node(bytes([i]) * 32) for i in range(3))
        got: dict[PeerId, list] = {t.local_id: [] for t in (a, b, c)}

        async def sink(t):
            while True:
                _, frame = await t.receive()
                got[t.local_id].append(frame)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(net.run)
            for t in (a, b, c):
                nursery.start_soon(sink, t)
            a.send_nowait(b.local_id, b"in flight")
            await trio.sleep(0.5)
            net.partition([[a.local_id], [b.local_id, c.local_id]])
            a.send_nowait(b.local_id, b"across")
            b.send_nowait(c.local_id, b"inside")
            await trio.sleep(2)
            net.heal()
            net.crash(c.local_id)
            a.send_nowait(b.local_id, b"healed")
            a.send_nowait(c.local_id, b"to the dead")
            await trio.sleep(2)
            net.restore(c.local_id)
            net.schedule(trio.current_time() + 1, lambda: net.crash(b.local_id))
            a.send_nowait(b.local_id, b"too late")  # arrives after the scheduled crash
            await trio.sleep(3)
            nursery.cancel_scope.cancel()
        return got, net.stats

    got, stats = _run(scenario)
    assert got[bytes([1]) * 32] == [b"healed"]
    assert got[bytes([2]) * 32] == [b"inside"]
    assert stats["dropped_in_flight"] == 2
    assert stats["dropped_unreachable"] == 2


def test_a_full_uplink_refuses_sends_and_counts_them():
    async def scenario():
        net = SimNetwork(seed=6, model=LinkModel(bandwidth_bps=8e3, max_backlog=1.0))
        a, b = net.add_node(b"a" * 32), net.add_node(b"b" * 32)
        results = [a.send_nowait(b.local_id, bytes(500)) for _ in range(4)]
        return results, a.stats()

    results, stats = _run(scenario)
    assert results == [True, True, True, False]  # 0.5 s each on a 1 s backlog
    assert stats["outbound_full"] == 1


def test_same_seed_same_trace_other_seed_other_trace():
    """S3: a seed fixes every delivery, byte for byte."""

    async def scenario(seed):
        model = LinkModel(latency=LogNormal(0.05, 0.7), loss=0.05, duplicate=0.02, reorder=0.1)
        net = SimNetwork(seed=seed, model=model, trace=True)
        ts = [net.add_node(bytes([i]) * 32) for i in range(6)]

        async def chatter(i, t):
            for k in range(50):
                t.send_nowait(ts[(i + 1 + k) % 6].local_id, bytes([i, k]) * (k + 1))
                await trio.sleep(0.01 * (i + 1))

        async def sink(t):
            while True:
                await t.receive()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(net.run)
            for i, t in enumerate(ts):
                nursery.start_soon(chatter, i, t)
                nursery.start_soon(sink, t)
            await trio.sleep(10)
            nursery.cancel_scope.cancel()
        return net.trace_digest(), net.deliveries

    first, second, other = _run(scenario, 11), _run(scenario, 11), _run(scenario, 12)
    assert first == second
    assert first[1] > 200
    assert other[0] != first[0]


def test_region_pairs_have_their_own_latency():
    async def scenario():
        model = LinkModel(
            latency=Constant(0.01),
            region_latency={("eu", "asia"): Constant(0.2)},
            bandwidth_bps=1e12,
        )
        net = SimNetwork(seed=7, model=model)
        eu = net.add_node(b"e" * 32, region="eu")
        eu2 = net.add_node(b"f" * 32, region="eu")
        asia = net.add_node(b"a" * 32, region="asia")
        got: list = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(net.run)
            asia.send_nowait(eu.local_id, b"far")  # the pair is looked up both ways
            eu2.send_nowait(eu.local_id, b"near")
            await _collect(eu, got, 2)
            nursery.cancel_scope.cancel()
        return [(round(t, 6), f) for t, _, f in got]

    assert _run(scenario) == [(0.01, b"near"), (0.2, b"far")]
