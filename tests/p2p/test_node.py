"""The node actor: one ordered inbox, strict intake, timers, crash and restart."""

from __future__ import annotations

import msgpack
import pytest
import trio

from fedchain.p2p import wire
from fedchain.p2p.errors import MalformedBody, NodeClosedError
from fedchain.p2p.node import Node, open_node
from fedchain.p2p.simnet import Constant, LinkModel, SimNetwork
from fedchain.p2p.wire import MessageType


@pytest.fixture
def net():
    return SimNetwork(seed=1, model=LinkModel(latency=Constant(0.01)))


async def test_messages_reach_handlers_and_garbage_is_counted_not_fatal(
    autojump_clock, net, make_identities
):
    alice, bob = make_identities(2)
    ta, tb = net.add_node(alice.public_key), net.add_node(bob.public_key)
    got = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(net.run)
        async with open_node(bob, tb) as node_b, open_node(alice, ta) as node_a:
            node_b.register(MessageType.PING, lambda peer, env: got.append(env.body))

            def refuse(peer, env):
                raise MalformedBody("no")

            node_b.register(MessageType.PONG, refuse)
            assert not ta.send_nowait(bob.public_key, b"")  # not a frame at all
            for junk in (b"\xc1", b"\x92\x01", b"\x96" + b"\x00" * 40, msgpack.packb([1, 2])):
                assert ta.send_nowait(bob.public_key, junk)
            node_a.send(bob.public_key, MessageType.PING, b"one")
            node_a.send(bob.public_key, MessageType.PONG, b"bad body")
            node_a.send(bob.public_key, MessageType.IHAVE, b"nobody listens")
            node_a.send(bob.public_key, MessageType.PING, b"two")
            await trio.sleep(1)
            assert got == [b"one", b"two"]
            counters = node_b.counters
            assert counters["rejected.not_msgpack"] == 2
            assert counters["rejected.trailing_bytes"] == 1
            assert counters["rejected.malformed"] == 1
            assert counters["rejected.malformed_body"] == 1
            assert counters["unhandled_type"] == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("contain", [False, True])
async def test_a_handler_bug_ends_a_strict_node_and_is_counted_by_a_contained_one(
    autojump_clock, net, make_identities, contain, caplog
):
    """Strict (the default; simulations and tests): the bug's exception
    ends the node. Contained (a real node): that frame is dropped, counted
    and logged with its traceback, and the next frames are handled."""
    alice, bob = make_identities(2)
    ta, tb = net.add_node(alice.public_key), net.add_node(bob.public_key)
    got = []

    def buggy(peer, env):
        if env.body == b"boom":
            raise KeyError("a bug some input reached")
        got.append(env.body)

    async def exchange() -> Node:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(net.run)
            async with (
                open_node(bob, tb, contain_handler_errors=contain) as node_b,
                open_node(alice, ta) as node_a,
            ):
                node_b.register(MessageType.PING, buggy)
                for body in (b"one", b"boom", b"two"):
                    node_a.send(bob.public_key, MessageType.PING, body)
                await trio.sleep(1)
            nursery.cancel_scope.cancel()
        return node_b

    if not contain:
        with pytest.RaisesGroup(KeyError, flatten_subgroups=True):
            await exchange()
        assert got == [b"one"]
        return
    node_b = await exchange()
    assert got == [b"one", b"two"]
    assert node_b.counters["handler_error.KeyError"] == 1
    assert "a handler raised" in caplog.text and "a bug some input reached" in caplog.text


async def test_replays_and_third_party_relays_of_direct_messages_are_refused(
    autojump_clock, net, make_identities
):
    alice, bob, mallory = make_identities(3)
    transports = {i.public_key: net.add_node(i.public_key) for i in (alice, bob, mallory)}
    seen = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(net.run)
        async with open_node(bob, transports[bob.public_key]) as node_b:
            node_b.register(MessageType.PING, lambda peer, env: seen.append(env.seq))
            frame = wire.sign(alice, MessageType.PING, 5, b"x").frame
            transports[alice.public_key].send_nowait(bob.public_key, frame)
            transports[alice.public_key].send_nowait(bob.public_key, frame)  # replay
            transports[mallory.public_key].send_nowait(bob.public_key, frame)  # relay
            await trio.sleep(1)
            assert seen == [5]
            assert node_b.counters["rejected.replayed_sequence"] == 1
            assert node_b.counters["rejected.sender_mismatch"] == 1
        nursery.cancel_scope.cancel()


async def test_timers_run_in_order_repeat_and_cancel(autojump_clock, net, make_identities):
    (alice,) = make_identities(1)
    log = []
    async with open_node(alice, net.add_node(alice.public_key)) as node:
        start = node.now()
        node.call_later(0.3, lambda: log.append(("b", node.now() - start)))
        node.call_later(0.1, lambda: log.append(("a", node.now() - start)))
        cancelled = node.call_later(0.2, lambda: log.append(("never", 0)))
        cancelled.cancel()
        ticks = node.call_every(1.0, lambda: log.append(("tick", node.now() - start)))
        await trio.sleep(3.5)
        ticks.cancel()
        await trio.sleep(3)
    assert [name for name, _ in log] == ["a", "b", "tick", "tick", "tick"]
    assert [round(t, 6) for _, t in log] == [0.1, 0.3, 1.0, 2.0, 3.0]


async def test_crash_cancels_jobs_and_a_restart_is_not_mistaken_for_a_replay(
    autojump_clock, make_identities
):
    net = SimNetwork(seed=2)
    alice, bob = make_identities(2)
    tb = net.add_node(bob.public_key)
    ta = net.add_node(alice.public_key)
    received = []
    finished = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(net.run)
        async with open_node(bob, tb) as node_b:
            node_b.register(MessageType.PING, lambda peer, env: received.append(env.body))
            async with trio.open_nursery() as life:
                node_a = Node(alice, ta, start_seq=int(trio.current_time() * 1e6) << 12)
                await life.start(node_a.run)

                async def job():
                    await trio.sleep(100)
                    finished.append(True)

                node_a.start_soon(job)
                node_a.send(bob.public_key, MessageType.PING, b"before")
                await trio.sleep(1)
                life.cancel_scope.cancel()  # crash: every task of node A dies
            assert finished == []
            with pytest.raises(NodeClosedError):
                node_a.send(bob.public_key, MessageType.PING, b"ghost")
            net.crash(alice.public_key)
            await trio.sleep(5)
            net.restore(alice.public_key)
            restarted = Node(
                alice,
                net.reattach(alice.public_key),
                start_seq=int(trio.current_time() * 1e6) << 12,
            )
            async with trio.open_nursery() as life:
                await life.start(restarted.run)
                restarted.send(bob.public_key, MessageType.PING, b"after")
                await trio.sleep(1)
                life.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    assert received == [b"before", b"after"]


async def test_register_twice_is_a_programming_error(net, make_identities):
    (alice,) = make_identities(1)
    node = Node(alice, net.add_node(alice.public_key))
    node.register(MessageType.PING, lambda p, e: None)
    with pytest.raises(ValueError):
        node.register(MessageType.PING, lambda p, e: None)


async def _queue_then_run(
    receiver: Node, alice, keys: list[bytes], config, frames: list[tuple[int, bytes]], done
) -> None:
    """Connect ``alice`` to ``receiver``'s TCP transport, send ``frames``
    ((type, body) each) and let them all arrive, so they queue on the
    receiver's side; then run the receiver until ``done`` is set."""
    import numpy as np

    from fedchain.p2p.tcp import open_tcp_transport

    address = receiver.transport.listen_address
    async with (
        open_tcp_transport(
            alice,
            allowed=keys,
            rng=np.random.default_rng(2),
            listen=None,
            peers={receiver.identity.public_key: address},
            config=config,
        ) as alice_transport,
        open_node(alice, alice_transport) as sender,
        trio.open_nursery() as nursery,
    ):
        await alice_transport.wait_connected(receiver.identity.public_key)
        for msg_type, body in frames:
            sender.send(receiver.identity.public_key, msg_type, body)
        await trio.sleep(0.05)  # everything is on the receiver's side
        nursery.start_soon(receiver.run)
        await done.wait()
        nursery.cancel_scope.cancel()


async def test_priority_types_overtake_a_queue_of_others_over_tcp() -> None:
    """A busy node with ``priority={CONSENSUS}`` handles a CONSENSUS frame
    that arrived behind a queue of GOSSIP frames before most of them; without
    priority it waits its turn."""
    import time

    import numpy as np

    from fedchain.p2p.identity import Identity
    from fedchain.p2p.tcp import TcpConfig, open_tcp_transport

    async def order_seen(priority: tuple[int, ...]) -> tuple[int, tuple[int, int]]:
        alice, bob = Identity(b"p" * 32), Identity(b"q" * 32)
        seen: list[int] = []
        held: list[tuple[int, int]] = []
        done = trio.Event()

        def slow(peer, envelope) -> None:
            seen.append(envelope.type)
            end = time.perf_counter() + 0.002  # a busy handler: frames queue up
            while time.perf_counter() < end:
                pass

        def urgent(peer, envelope) -> None:
            seen.append(envelope.type)
            held.append(receiver.held)
            done.set()

        config = TcpConfig(backoff_initial=0.02)
        keys = [alice.public_key, bob.public_key]
        with trio.fail_after(20):
            async with open_tcp_transport(
                bob, allowed=keys, rng=np.random.default_rng(1), config=config
            ) as bob_transport:
                receiver = Node(bob, bob_transport, priority=priority)
                receiver.register(MessageType.GOSSIP, slow)
                receiver.register(MessageType.CONSENSUS, urgent)
                frames = [(MessageType.GOSSIP, msgpack.packb(n)) for n in range(300)]
                frames.append((MessageType.CONSENSUS, msgpack.packb("now")))
                await _queue_then_run(receiver, alice, keys, config, frames, done)
        return seen.index(MessageType.CONSENSUS), held[0]

    position, held = await order_seen((MessageType.CONSENSUS,))
    assert position < 10
    # What it overtook is held in the node (a status line shows it), not lost.
    assert held[0] == 0 and 250 < held[1] <= 300 - position
    position, held = await order_seen(())
    assert position == 300 and held == (0, 0)  # nothing drained without priority


async def test_a_hold_check_answers_frames_at_the_door_over_tcp() -> None:
    """A priority node asks ``hold_check`` of each other frame as it queues
    it: False drops it there, True queues it, and ``on_release`` hears of
    each queued frame as it goes to its handler. A hook that raises is
    counted and its frame still handled, never lost and never fatal."""
    import numpy as np

    from fedchain.p2p.identity import Identity
    from fedchain.p2p.tcp import TcpConfig, open_tcp_transport
    from fedchain.p2p.wire import decode

    alice, bob = Identity(b"r" * 32), Identity(b"s" * 32)
    keys = [alice.public_key, bob.public_key]
    handled: list[int] = []
    released: list[int] = []
    done = trio.Event()

    def number(peer, frame) -> int:
        return msgpack.unpackb(decode(frame, link_peer=peer).body)

    def check(peer, frame) -> bool:
        n = number(peer, frame)
        if n == 5:
            raise RuntimeError("a broken check")
        return n % 2 == 0

    def on_gossip(peer, envelope) -> None:
        handled.append(msgpack.unpackb(envelope.body))
        if handled[-1] == 18:
            done.set()

    config = TcpConfig(backoff_initial=0.02)
    with trio.fail_after(20):
        async with open_tcp_transport(
            bob, allowed=keys, rng=np.random.default_rng(3), config=config
        ) as bob_transport:
            receiver = Node(bob, bob_transport, priority=(MessageType.CONSENSUS,))
            receiver.register(MessageType.GOSSIP, on_gossip)
            receiver.hold_check = check

            def release(peer, frame) -> None:
                released.append(number(peer, frame))
                if released[-1] == 6:
                    raise RuntimeError("a broken release hook")

            receiver.on_release = release
            frames = [(MessageType.GOSSIP, msgpack.packb(n)) for n in range(20)]
            await _queue_then_run(receiver, alice, keys, config, frames, done)
    assert handled == released == [0, 2, 4, 5, 6, 8, 10, 12, 14, 16, 18]
    assert receiver.counters["hold_check_error"] == receiver.counters["on_release_error"] == 1
    assert receiver.held == (0, 0)
