"""Gossip: complete delivery, duplicate suppression, announce-then-pull,
validation before relay, strict body decoders (SPEC G1-G5)."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from structure_mutations import mutated_msgpack

from fedchain.p2p import gossip as gossip_module
from fedchain.p2p import membership
from fedchain.p2p.errors import MalformedBody
from fedchain.p2p.gossip import Gossip, GossipConfig
from fedchain.p2p.identity import Identity
from fedchain.p2p.membership import CyclonConfig, PeerSampling
from fedchain.p2p.node import Node
from fedchain.p2p.randomness import RandomStream
from fedchain.p2p.simnet import LinkModel, LogNormal, SimNetwork
from fedchain.p2p.wire import MessageType, pack_body
from fedchain.sims.gossipsim import GossipSimConfig, GossipSimulation


@pytest.mark.parametrize("payload", [1024, 64 * 1024])
def test_every_node_gets_the_message_once_without_loss(payload):
    """G1 + G2: full delivery; large payloads are pulled about once per node."""
    sim = GossipSimulation(GossipSimConfig(nodes=200, seed=5))
    result = sim.broadcast(payload)
    assert result.delivery_ratio == 1.0
    received = sum(t.stats()["bytes_received"] for t in sim.transports)
    if payload > GossipConfig().lazy_threshold:
        assert result.duplicates / result.nodes < 0.2
        assert received < 1.3 * payload * result.nodes
    else:
        assert result.duplicates > 0  # eager push overlaps, and is suppressed
    assert sum(node.counters["gossip.delivered"] for node in sim.nodes) == 200


def test_lossy_links_still_deliver_through_announces():
    """G3: with 10% loss, IHAVE/IWANT repairs what eager push lost."""
    model = LinkModel(latency=LogNormal(0.05, 0.5), loss=0.10)
    sim = GossipSimulation(GossipSimConfig(nodes=300, seed=8, model=model))
    result = sim.broadcast(2048)
    assert result.delivery_ratio >= 0.999
    assert sum(node.counters["gossip.delivered"] for node in sim.nodes) >= 300


def _small_network(n: int, config: GossipConfig, views: dict[int, list[int]] | None = None):
    """``n`` driven nodes; each knows everyone unless ``views`` says otherwise."""
    net = SimNetwork(seed=1)
    identities = [Identity(bytes([i + 1]) * 32) for i in range(n)]
    ids = [i.public_key for i in identities]
    cyclon = CyclonConfig(view_size=n - 1, shuffle_length=1, period=1000.0)
    parts = []
    for index, identity in enumerate(identities):
        transport = net.add_node(identity.public_key)
        node = Node(identity, transport, start_seq=0, wakeup=net.wakeup_for(identity.public_key))
        net.drive(node)
        stream = RandomStream.from_seed(1, index)
        known = [ids[j] for j in (views or {}).get(index, range(n)) if j != index]
        sampling = PeerSampling(node, stream, cyclon, bootstrap=known)
        parts.append((node, Gossip(node, sampling, stream, config), transport))
    return net, parts


def test_a_validator_refuses_before_relay():
    """G4: a refused message is neither delivered nor relayed by the refuser."""

    async def scenario():
        net, parts = _small_network(4, GossipConfig(fanout=3))
        delivered = {i: [] for i in range(4)}
        for index, (_, g, _) in enumerate(parts):
            validator = (lambda origin, topic, data: data != b"evil") if index == 1 else None
            g.subscribe(
                "t", lambda o, t, d, e, index=index: delivered[index].append(d), validator=validator
            )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(net.run)
            parts[0][1].publish("t", b"evil")
            parts[0][1].publish("t", b"good")
            await trio.sleep(5)
            nursery.cancel_scope.cancel()
        return delivered, parts

    delivered, parts = trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert delivered[1] == [b"good"]
    assert all(delivered[i] == [b"evil", b"good"] for i in (0, 2, 3))
    assert parts[1][0].counters["gossip.refused"] == 1
    # node 1 relayed the good message (3 eager pushes) but not the evil one.
    assert parts[1][2].stats()["frames_sent"] == 2


def test_malformed_announces_are_counted_and_the_node_goes_on():
    async def scenario():
        net, parts = _small_network(3, GossipConfig())
        got = []
        parts[2][1].subscribe("t", lambda o, t, d, e: got.append(d))
        attacker, _, _ = parts[0]
        victim = parts[2][0]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(net.run)
            attacker.send(victim.id, MessageType.IHAVE, pack_body([b"short"]))
            attacker.send(victim.id, MessageType.IWANT, pack_body("not a list"))
            attacker.send(victim.id, MessageType.GOSSIP, pack_body([1, 2, 3]))
            attacker.send(victim.id, MessageType.PEER_SHUFFLE, pack_body([[b"k", 1]]))
            await trio.sleep(1)
            parts[1][1].publish("t", b"still works")
            await trio.sleep(2)
            nursery.cancel_scope.cancel()
        return got, victim.counters

    got, counters = trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert got == [b"still works"]
    assert counters["rejected.malformed_body"] == 4


def test_pull_asks_the_next_announcer_when_one_stays_silent():
    """G5: an IWANT that goes unanswered moves on to another announcer."""

    async def scenario():
        config = GossipConfig(lazy_threshold=0, iwant_timeout=0.5)  # announce only
        # 0 reaches 3 only through 1 and 2; 1's announce reaches 3 first (tie on
        # time, 1 is the lower index), then 1 goes silent.
        views = {0: [1, 2], 1: [0, 3], 2: [0, 3], 3: [1, 2]}
        net, parts = _small_network(4, config, views)
        got = []
        parts[3][1].subscribe("t", lambda o, t, d, e: got.append(trio.current_time()))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(net.run)
            message_id = parts[0][1].publish("t", b"payload")
            await trio.sleep(0.21)  # 3 has both announces and asked 1
            net.crash(parts[1][0].id)
            await trio.sleep(5)
            nursery.cancel_scope.cancel()
        return got, message_id, parts

    got, message_id, parts = trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(got) == 1
    assert got[0] == pytest.approx(0.2 + 0.5 + 0.1, abs=0.01)  # one timeout, then node 2
    assert parts[3][1].has_seen(message_id)


@given(st.binary(max_size=300))
@settings(max_examples=500, deadline=None)
def test_body_decoders_return_values_or_malformed_body(data):
    for decode in (
        lambda b: gossip_module._decode_ids(b, 64),
        gossip_module._decode_message,
        lambda b: membership._decode_entries(b, 6),
    ):
        try:
            decode(data)
        except MalformedBody:
            continue


_VALID_BODIES = [
    (lambda b: gossip_module._decode_ids(b, 64), [bytes(range(20)), b"\x01" * 20]),
    (gossip_module._decode_message, ["topic", b"data"]),
    (lambda b: membership._decode_entries(b, 6), [[b"\x02" * 32, 3], [b"\x03" * 32, 0]]),
]


@given(case=st.sampled_from(_VALID_BODIES), data=st.data())
@settings(max_examples=300, deadline=None)
def test_mutated_bodies_decode_canonically_or_raise_malformed_body(case, data):
    """Valid bodies with their structure changed (a field of another type or
    size, an element dropped or repeated): MalformedBody, or a value that
    packs back to exactly the bytes given."""
    decode, valid = case
    body = data.draw(mutated_msgpack(valid))
    try:
        value = decode(body)
    except MalformedBody:
        return
    shape = [list(v) for v in value] if decode is _VALID_BODIES[2][0] else value
    assert pack_body(list(shape)) == body


_HOSTILE_SAMPLES = st.sampled_from(
    [
        (MessageType.IHAVE, [bytes(range(20))]),
        (MessageType.IWANT, [bytes(range(20))]),
        (MessageType.GOSSIP, ["t", b"data"]),
        (MessageType.PEER_SHUFFLE, [[bytes([9]) * 32, 1], [bytes([1]) * 32, 0]]),
        (MessageType.PEER_SHUFFLE_REPLY, [[bytes([2]) * 32, 3]]),
    ]
)


@given(
    st.lists(
        _HOSTILE_SAMPLES.flatmap(lambda s: mutated_msgpack(s[1]).map(lambda b: (s[0], b))),
        min_size=1,
        max_size=6,
    )
)
@settings(max_examples=100, deadline=None)
def test_a_peer_sending_any_gossip_or_shuffle_leaves_the_node_working(frames):
    """Mutated announces, pulls, messages and shuffles (one naming the
    victim itself, unknown ids, keys of no peer) from a peer: refused or
    handled, never raised (an exception would end the run), and a message
    published afterwards still reaches the victim."""

    async def scenario():
        net, parts = _small_network(3, GossipConfig())
        got = []
        parts[2][1].subscribe("t", lambda o, t, d, e: got.append(d))
        attacker, victim = parts[0][0], parts[2][0]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(net.run)
            for msg_type, body in frames:
                attacker.send(victim.id, msg_type, body)
            await trio.sleep(1)
            parts[1][1].publish("t", b"still works")
            await trio.sleep(2)
            nursery.cancel_scope.cancel()
        return got

    got = trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert b"still works" in got
