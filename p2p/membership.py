"""Peer sampling with partial views (Cyclon, Voulgaris et al. 2005).

Each node knows only ``view_size`` peers. Every ``period`` it ages its view,
swaps a few entries with its oldest neighbour, and drops that neighbour
until the neighbour answers with fresh entries. The result is a continuously
reshuffled random overlay whose in-degrees stay balanced, which is what
gossip needs for its random fan-out, and a failure detector for free: a
crashed peer stops answering shuffles, ages, and disappears from every view
within a few periods, with no heartbeat traffic at all.

Why not full membership: at 10,000 nodes a full view costs every node
10,000 entries and every join a broadcast; a partial view keeps per-node
state and traffic constant as the network grows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import MalformedBody
from .identity import PUBLIC_KEY_BYTES, PeerId
from .node import Node
from .randomness import RandomStream
from .wire import Envelope, MessageType, pack_body, unpack_body

__all__ = ["CyclonConfig", "PeerSampling"]


@dataclass(frozen=True)
class CyclonConfig:
    view_size: int = 12
    shuffle_length: int = 6
    period: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.shuffle_length <= self.view_size:
            raise ValueError("shuffle_length must be between 1 and view_size")


def _decode_entries(body: bytes, limit: int) -> list[tuple[PeerId, int]]:
    value = unpack_body(body, max_len=4 * limit + 64)
    if type(value) is not list or len(value) > limit:
        raise MalformedBody("a shuffle is a list of at most shuffle_length entries")
    entries = []
    for item in value:
        if (
            type(item) is not list
            or len(item) != 2
            or type(item[0]) is not bytes
            or len(item[0]) != PUBLIC_KEY_BYTES
            or type(item[1]) is not int
            or not 0 <= item[1] < 2**32
        ):
            raise MalformedBody("a shuffle entry is [32-byte key, age]")
        entries.append((item[0], item[1]))
    return entries


class PeerSampling:
    """A node's partial view, kept fresh by Cyclon shuffles."""

    def __init__(
        self,
        node: Node,
        stream: RandomStream,
        config: CyclonConfig | None = None,
        *,
        bootstrap: Iterable[PeerId] = (),
    ) -> None:
        self.node = node
        self.config = config or CyclonConfig()
        self._stream = stream
        self._view: dict[PeerId, int] = {}
        self._sent: dict[PeerId, list[PeerId]] = {}
        self.on_remove: list[Callable[[PeerId], None]] = []
        for peer in bootstrap:
            if peer != node.id and len(self._view) < self.config.view_size:
                self._view[peer] = 0
        node.register(MessageType.PEER_SHUFFLE, self._on_shuffle)
        node.register(MessageType.PEER_SHUFFLE_REPLY, self._on_reply)
        node.call_every(
            self.config.period, self.shuffle, phase=self.config.period * stream.uniform()
        )

    def view(self) -> list[PeerId]:
        """The current neighbours, in a deterministic order."""
        return list(self._view)

    def __len__(self) -> int:
        return len(self._view)

    # -- the protocol -----------------------------------------------------------
    def shuffle(self) -> None:
        """One Cyclon step: age, pick the oldest, offer it a sample."""
        if not self._view:
            return
        for peer in self._view:
            self._view[peer] += 1
        oldest = max(self._view, key=self._view.__getitem__)
        del self._view[oldest]
        for callback in self.on_remove:
            callback(oldest)
        others = self._stream.sample(list(self._view), self.config.shuffle_length - 1)
        offer = [[self.node.id, 0]] + [[p, self._view[p]] for p in others]
        self._sent[oldest] = others
        self.node.send(oldest, MessageType.PEER_SHUFFLE, pack_body(offer))

    def _on_shuffle(self, peer: PeerId, envelope: Envelope) -> None:
        received = _decode_entries(envelope.body, self.config.shuffle_length)
        reply_peers = self._stream.sample(list(self._view), self.config.shuffle_length)
        reply = [[p, self._view[p]] for p in reply_peers]
        self.node.send(peer, MessageType.PEER_SHUFFLE_REPLY, pack_body(reply))
        self._merge(received, reply_peers)

    def _on_reply(self, peer: PeerId, envelope: Envelope) -> None:
        sent = self._sent.pop(peer, None)
        if sent is None:
            self.node.counters["cyclon.unsolicited_reply"] += 1
            return
        self._merge(_decode_entries(envelope.body, self.config.shuffle_length), sent)

    def _merge(self, received: list[tuple[PeerId, int]], replaceable: list[PeerId]) -> None:
        """Cyclon's merge: fill free slots first, then replace what we sent."""
        me = self.node.id
        candidates = list(replaceable)
        for peer, age in received:
            if peer == me or peer in self._view:
                continue
            if len(self._view) < self.config.view_size:
                self._view[peer] = age
                continue
            while candidates:
                victim = candidates.pop()
                if victim in self._view:
                    del self._view[victim]
                    self._view[peer] = age
                    break
            else:
                return

    def add(self, peer: PeerId) -> None:
        """Learn a peer out of band (a join, a config file)."""
        if peer != self.node.id and len(self._view) < self.config.view_size:
            self._view.setdefault(peer, 0)
