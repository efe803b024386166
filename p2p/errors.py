"""The p2p error vocabulary.

Few and typed, in the trio manner: each class says when it is raised. Every
class carries a short ``reason`` string; nodes count rejections by it, so a
dashboard can say *why* frames were refused without parsing messages.
"""

from __future__ import annotations


class P2PError(Exception):
    """Base of every error raised by ``fedchain.p2p``."""

    reason = "p2p"


class WireError(P2PError):
    """A frame was refused by the wire decoder or the replay guard.

    Raised for anything a peer can send: it never means a bug in this node,
    and a node catches it, counts it under ``reason`` and goes on.
    """

    reason = "wire"


class FrameTooLarge(WireError):
    """The frame is longer than the decoder's limit (checked before parsing)."""

    reason = "oversize"


class NotMsgpack(WireError):
    """The bytes are not one well-formed msgpack value."""

    reason = "not_msgpack"


class TrailingBytes(WireError):
    """A well-formed envelope is followed by extra bytes."""

    reason = "trailing_bytes"


class MalformedEnvelope(WireError):
    """Msgpack parsed, but not as an envelope: wrong arity, a field of the
    wrong type or size, or a non-canonical encoding."""

    reason = "malformed"


class UnknownVersion(WireError):
    """The envelope names a protocol version this node does not speak."""

    reason = "unknown_version"


class UnknownMessageType(WireError):
    """The envelope's message type is not one the protocol defines."""

    reason = "unknown_type"


class BadSignature(WireError):
    """The Ed25519 signature does not verify under the sender's key."""

    reason = "bad_signature"


class ReplayedSequence(WireError):
    """This sender's sequence number was already accepted (a replay)."""

    reason = "replayed_sequence"


class StaleSequence(WireError):
    """The sequence number is older than the replay window still remembers."""

    reason = "stale_sequence"


class SenderMismatch(WireError):
    """A point-to-point message arrived from a peer other than its signer.

    Only relayable messages (gossip payloads) may be forwarded by a third
    party; everything else must come straight from the node that signed it.
    """

    reason = "sender_mismatch"


class MalformedBody(WireError):
    """A verified envelope whose body its layer cannot decode.

    Raised by the body decoders of gossip, consensus and the other layers;
    the node counts it like any other refused frame.
    """

    reason = "malformed_body"


class TransportError(P2PError):
    """A transport could not carry a frame or hold a connection."""

    reason = "transport"


class HandshakeError(TransportError):
    """The secure handshake with a peer failed; the connection is dropped.

    ``reason`` distinguishes a refused key (``not_allowed``), a bad proof
    (``bad_proof``), a timeout (``handshake_timeout``), offers with no
    cipher suite in common (``no_common_suite``) and a malformed handshake
    message (``handshake_malformed``).
    """

    def __init__(self, message: str, reason: str = "handshake") -> None:
        super().__init__(message)
        self.reason = reason


class NodeClosedError(P2PError):
    """The node was stopped or crashed; the call cannot proceed."""

    reason = "closed"


class BadFrame(TransportError):
    """A TCP record cannot come from an honest peer: a length prefix whose
    sealed layout is impossible, or a handshake record of the wrong size.

    Raised only for what a peer sent; the connection is dropped and counted
    under ``bad_frame``. An oversize prefix raises :class:`FrameTooLarge`.
    """

    reason = "bad_frame"


class DecryptFailed(TransportError):
    """A sealed TCP record failed authentication: tampered, truncated,
    replayed, reordered, or sealed under another key.

    The per-direction nonce counters are then out of step, so nothing after
    it can be trusted either: the connection is dropped, never resynced.
    """

    reason = "decrypt_failed"
