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
