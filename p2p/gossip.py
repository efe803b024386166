"""Epidemic broadcast: eager push to a few, lazy announce to the rest.

A message is pushed whole to ``fanout`` random neighbours and announced by
id (IHAVE) to every other neighbour, who pull it (IWANT) only if nothing
else brought it first. That is the gossipsub / Plumtree split: eager push
gives latency, lazy announce gives reliability at the cost of a 20-byte id
per link instead of a whole payload. A node that missed every push (loss, a
crash, a bad overlay) still hears IHAVEs from all of its neighbours and
pulls from them in turn until one answers.

Large payloads (above ``lazy_threshold``, e.g. model updates) are only ever
announced: each node then downloads each payload once, instead of ``fanout``
times, which is what bandwidth, not latency, limits.

Payloads are forwarded verbatim, signed by their origin: a relay never
re-signs, so a message's id and validity are the same at every hop, and a
process simulating many nodes verifies each payload once (see
:class:`~fedchain.p2p.wire.FrameCache`). Each node refuses duplicates by id
from a bounded, expiring cache, and lets higher layers refuse a message
before it is relayed (``validator``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .errors import MalformedBody
from .identity import PeerId
from .membership import PeerSampling
from .node import Node, Timer
from .randomness import RandomStream
from .wire import Envelope, MessageType, pack_body, unpack_body

__all__ = ["Gossip", "GossipConfig", "MessageHandler", "Validator"]

MESSAGE_ID_BYTES = 20
MAX_TOPIC_CHARS = 128

MessageHandler = Callable[[PeerId, str, bytes, Envelope], None]
"""``handler(origin, topic, data, envelope)`` for each message delivered."""

Validator = Callable[[PeerId, str, bytes], bool]
"""``validator(origin, topic, data)``: ``False`` refuses the message here and
stops it from being relayed by this node."""


@dataclass(frozen=True)
class GossipConfig:
    fanout: int = 4
    lazy_threshold: int = 16 * 1024
    iwant_timeout: float = 1.0
    max_pull_attempts: int = 8
    max_ids_per_announce: int = 64
    cache_ttl: float = 120.0
    max_cached: int = 1024
    seen_ttl: float = 600.0
    max_seen: int = 100_000


class _Want:
    __slots__ = ("announcers", "attempts", "next", "timer")

    def __init__(self) -> None:
        self.announcers: list[PeerId] = []
        self.next = 0
        self.attempts = 0
        self.timer: Timer | None = None


def _decode_ids(body: bytes, limit: int) -> list[bytes]:
    value = unpack_body(body, max_len=(MESSAGE_ID_BYTES + 2) * limit + 8)
    if type(value) is not list or not 0 < len(value) <= limit:
        raise MalformedBody(f"an announce is a list of 1 to {limit} message ids")
    for item in value:
        if type(item) is not bytes or len(item) != MESSAGE_ID_BYTES:
            raise MalformedBody("a message id is 20 bytes")
    return value


def _decode_message(body: bytes) -> tuple[str, bytes]:
    value = unpack_body(body)
    if (
        type(value) is not list
        or len(value) != 2
        or type(value[0]) is not str
        or len(value[0]) > MAX_TOPIC_CHARS
        or type(value[1]) is not bytes
    ):
        raise MalformedBody("a gossip message is [topic, data]")
    return value[0], value[1]


class Gossip:
    """Dissemination for one node over its :class:`PeerSampling` view."""

    def __init__(
        self,
        node: Node,
        sampling: PeerSampling,
        stream: RandomStream,
        config: GossipConfig | None = None,
    ) -> None:
        self.node = node
        self.sampling = sampling
        self.config = config or GossipConfig()
        self._stream = stream
        self._handlers: dict[str, list[MessageHandler]] = {}
        self._validators: dict[str, Validator] = {}
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._cache: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        self._wants: dict[bytes, _Want] = {}
        node.register(MessageType.GOSSIP, self._on_message)
        node.register(MessageType.IHAVE, self._on_ihave)
        node.register(MessageType.IWANT, self._on_iwant)

    # -- API --------------------------------------------------------------------
    def subscribe(
        self, topic: str, handler: MessageHandler, *, validator: Validator | None = None
    ) -> None:
        """Deliver ``topic``'s messages to ``handler``; a ``validator`` may
        refuse them first (refused messages are neither delivered nor relayed)."""
        self._handlers.setdefault(topic, []).append(handler)
        if validator is not None:
            self._validators[topic] = validator

    def publish(self, topic: str, data: bytes) -> bytes:
        """Sign and spread ``data``; returns the message id."""
        if len(topic) > MAX_TOPIC_CHARS:
            raise ValueError("topic too long")
        envelope = self.node.sign(MessageType.GOSSIP, pack_body([topic, data]))
        self._accept(self.node.id, envelope, topic, data)
        return envelope.message_id

    def has_seen(self, message_id: bytes) -> bool:
        return message_id in self._seen

    # -- receiving ----------------------------------------------------------------
    def _on_message(self, peer: PeerId, envelope: Envelope) -> None:
        message_id = envelope.message_id
        if message_id in self._seen:
            self.node.counters["gossip.duplicate"] += 1
            return
        topic, data = _decode_message(envelope.body)
        validator = self._validators.get(topic)
        if validator is not None and not validator(envelope.sender, topic, data):
            self._remember(message_id)
            self._drop_want(message_id)
            self.node.counters["gossip.refused"] += 1
            return
        self._accept(peer, envelope, topic, data)

    def _accept(self, peer: PeerId, envelope: Envelope, topic: str, data: bytes) -> None:
        message_id = envelope.message_id
        now = self.node.now()
        self._remember(message_id)
        self._drop_want(message_id)
        self._cache[message_id] = (now + self.config.cache_ttl, envelope.frame)
        self._expire(now)
        self.node.counters["gossip.delivered"] += 1
        for handler in self._handlers.get(topic, ()):
            handler(envelope.sender, topic, data, envelope)
        self._relay(message_id, envelope.frame, exclude=(peer, envelope.sender))

    def _relay(self, message_id: bytes, frame: bytes, exclude: tuple[PeerId, ...]) -> None:
        targets = [p for p in self.sampling.view() if p not in exclude]
        if len(frame) <= self.config.lazy_threshold:
            eager = self._stream.sample(targets, self.config.fanout)
        else:
            eager = []
        for peer in eager:
            self.node.send_frame(peer, frame)
        if len(eager) < len(targets):
            # One signed announce serves every lazy peer: replay protection is
            # per receiver, and no receiver can pass it on as ours.
            announce = self.node.sign(MessageType.IHAVE, pack_body([message_id])).frame
            chosen = set(eager)
            for peer in targets:
                if peer not in chosen:
                    self.node.send_frame(peer, announce)

    def _on_ihave(self, peer: PeerId, envelope: Envelope) -> None:
        for message_id in _decode_ids(envelope.body, self.config.max_ids_per_announce):
            if message_id in self._seen:
                continue
            want = self._wants.get(message_id)
            if want is None:
                want = self._wants[message_id] = _Want()
                want.announcers.append(peer)
                self._pull(message_id, want)
            elif peer not in want.announcers:
                want.announcers.append(peer)

    def _pull(self, message_id: bytes, want: _Want) -> None:
        """Ask the next announcer; on timeout, the one after (round robin)."""
        if want.attempts >= self.config.max_pull_attempts:
            self._drop_want(message_id)
            self.node.counters["gossip.pull_gave_up"] += 1
            return
        peer = want.announcers[want.next % len(want.announcers)]
        want.next += 1
        want.attempts += 1
        self.node.send(peer, MessageType.IWANT, pack_body([message_id]))
        want.timer = self.node.call_later(
            self.config.iwant_timeout, lambda: self._pull(message_id, want)
        )

    def _on_iwant(self, peer: PeerId, envelope: Envelope) -> None:
        for message_id in _decode_ids(envelope.body, self.config.max_ids_per_announce):
            cached = self._cache.get(message_id)
            if cached is None:
                self.node.counters["gossip.iwant_miss"] += 1
                continue
            self.node.send_frame(peer, cached[1])

    # -- bounded state ------------------------------------------------------------
    def _drop_want(self, message_id: bytes) -> None:
        want = self._wants.pop(message_id, None)
        if want is not None and want.timer is not None:
            want.timer.cancel()

    def _remember(self, message_id: bytes) -> None:
        self._seen[message_id] = self.node.now() + self.config.seen_ttl
        if len(self._seen) > self.config.max_seen:
            self._seen.popitem(last=False)

    def _expire(self, now: float) -> None:
        """Forget what is past its time; both tables are in expiry order."""
        seen, cache = self._seen, self._cache
        while seen and next(iter(seen.values())) <= now:
            seen.popitem(last=False)
        while cache and next(iter(cache.values()))[0] <= now:
            cache.popitem(last=False)
        while len(cache) > self.config.max_cached:
            cache.popitem(last=False)
