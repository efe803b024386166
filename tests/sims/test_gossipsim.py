"""Whole-network determinism (SPEC S3): the same seed gives the same
byte-identical trace of delivered messages and the same figures."""

from __future__ import annotations

from fedchain.p2p.simnet import LinkModel, LogNormal
from fedchain.sims.gossipsim import GossipSimConfig, GossipSimulation


def _run(seed: int):
    model = LinkModel(latency=LogNormal(0.05, 0.6), loss=0.02, duplicate=0.01, reorder=0.05)
    sim = GossipSimulation(GossipSimConfig(nodes=150, seed=seed, model=model, trace=True))
    result = sim.broadcast(4096, settle=12.0)  # long enough for Cyclon rounds too
    figures = result.figures()
    del figures["wall_s"]
    return result.trace_digest, figures


def test_a_seed_fixes_the_trace_and_the_figures():
    first, second = _run(21), _run(21)
    assert first == second
    assert first[1]["delivery_ratio"] == 1.0


def test_another_seed_gives_another_trace():
    assert _run(21)[0] != _run(22)[0]


def test_the_same_nodes_run_on_the_real_clock():
    """The simulator's nodes and network, unchanged, in real time."""
    model = LinkModel(latency=LogNormal(0.01, 0.3))
    sim = GossipSimulation(GossipSimConfig(nodes=40, seed=3, model=model))
    result = sim.broadcast(2048, start=0.2, timeout=10.0, settle=0.2, virtual=False)
    assert result.delivery_ratio == 1.0
    assert 0.005 < result.latencies[len(result.latencies) // 2] < 1.0
    assert result.wall_seconds >= 0.2  # it really waited for the network


def test_crashed_nodes_miss_messages_and_rejoin_after_restart():
    from fedchain.sims.gossipsim import Fault, Publication

    sim = GossipSimulation(GossipSimConfig(nodes=80, seed=4))
    victims = tuple(range(10, 20))
    sim.run(
        [Publication(2.0, 0, 1024), Publication(8.0, 1, 1024)],
        duration=14.0,
        faults=[Fault(1.0, "crash", victims), Fault(5.0, "restart", victims)],
    )
    during, after = sim.logs
    assert during.up_at_publish == frozenset(range(80)) - set(victims)
    assert during.delivered_to_up() == 70
    assert not set(during.delivered) & set(victims)
    assert len(after.delivered) == 80  # the restarted nodes found their way back in
