"""The one interface every transport implements.

A transport moves opaque frames between authenticated peers; it knows
nothing of envelopes. Sending never blocks the caller: each peer has a
bounded outbound queue, and :meth:`Transport.send_nowait` returns ``False``
and counts the drop by reason: ``outbound_full`` when that queue is full,
``no_route`` when the peer is unknown, ``frame_refused`` for a frame outside
1..``MAX_FRAME_BYTES`` bytes (an empty TCP record is a keepalive).
Dropping the newest frame rather than blocking keeps one slow or dead peer
from stalling a node's single inbox loop; the protocols above are built to
tolerate loss (gossip repairs by IHAVE/IWANT, consensus retransmits on
timeouts), exactly as on a lossy link.

Receiving yields ``(peer, frame)`` where ``peer`` is the key the transport
authenticated (the simulated network knows it by construction; TCP proves
it in the handshake). Inbound is bounded too: when a node's inbox is full a
TCP reader stops reading, so TCP's own flow control pushes back on the peer.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .identity import PeerId

__all__ = ["Transport"]


@runtime_checkable
class Transport(Protocol):
    """What a node needs from a network."""

    @property
    def local_id(self) -> PeerId:
        """The key this endpoint speaks for."""
        ...

    @property
    def authenticated_links(self) -> bool:
        """Whether every frame :meth:`receive` yields was sent, byte for
        byte, by the peer it names: true of sealed TCP sessions (AEAD keys
        from a handshake that proved the peer's key) and of the simulated
        network (it knows the sender by construction); false where a
        session may be plaintext. When true, a node takes a direct frame's
        envelope signature as proven by the link (:mod:`.wire`)."""
        ...

    def send_nowait(self, peer: PeerId, frame: bytes) -> bool:
        """Queue ``frame`` for ``peer``; ``False`` if it was dropped."""
        ...

    async def receive(self) -> tuple[PeerId, bytes]:
        """The next inbound ``(peer, frame)``; raises ``trio.EndOfChannel``
        once the transport is closed."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters: frames and bytes sent and received, drops by reason."""
        ...
