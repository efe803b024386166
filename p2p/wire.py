"""The signed message envelope: the only thing nodes put on a link.

A frame is a msgpack array of six fields::

    [version, type, sender, seq, body, signature]

``sender`` is the signer's Ed25519 public key, ``seq`` a per-sender counter,
``body`` opaque bytes that the layer owning ``type`` decodes with its own
strict decoder, and ``signature`` an Ed25519 signature over a domain tag and
the canonical encoding of the first five fields, which is exactly the
frame's bytes between the array header and the signature. Signing the bytes
as sent (and refusing any non-canonical encoding) means a receiver never
re-encodes to verify, so a 1 MiB body costs no extra copy.

Why one envelope for every layer: consensus, gossip and client traffic all
need the same three checks (well-formed, from whom it claims, not a
replay), and doing them once, here, before any handler runs, means no layer
can forget one.

Who vouches for the sender. A relayed frame (``RELAYABLE``) is vouched for
by its signature alone. A direct frame from the very peer whose
authenticated link delivered it (``decode``'s ``link_peer``) is vouched for
by the link: a sealed session authenticates every byte with keys from a
handshake that proved the peer's key, and the simulated network knows the
sender by construction. Its signature is then not checked: the check would
repeat, at ~90 µs a frame, what the link already proved. This is PBFT's own
normal-case rule (Castro and Liskov, 2002: authenticated channels instead
of signatures); the layers that need third-party proof (PBFT certificates,
transactions) carry their own signatures inside the body and check them.

Message types are channel numbers in the CometBFT manner: ``p2p`` names
the channels of protocol version 1, the layer that owns a channel defines
what its body means.

Every failure raises a subclass of :class:`WireError` and nothing else.
"""

from __future__ import annotations

import enum
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import msgpack

from .errors import (
    BadSignature,
    FrameTooLarge,
    MalformedBody,
    MalformedEnvelope,
    NotMsgpack,
    ReplayedSequence,
    StaleSequence,
    TrailingBytes,
    UnknownMessageType,
    UnknownVersion,
    WireError,
)
from .identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, PeerId, verify

__all__ = [
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "RELAYABLE",
    "Envelope",
    "FrameCache",
    "MessageType",
    "SequenceWindow",
    "WireError",
    "decode",
    "encode",
    "pack_body",
    "peek",
    "sign",
    "unpack_body",
]

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 8 * 1024 * 1024
"""Default decoder limit. Model updates are top-k sparse and far smaller;
a peer that sends more is refused before any parsing."""

MAX_SEQ = 2**64 - 1
_DOMAIN = b"fedchain/envelope/v1\x00"
_SIG_TRAILER = b"\xc4\x40"  # msgpack bin8 header of a 64-byte signature
_ARRAY6 = b"\x96"


class MessageType(enum.IntEnum):
    """Channels of protocol version 1. Numbers are part of the protocol."""

    PING = 1
    PONG = 2
    PEER_SHUFFLE = 3
    PEER_SHUFFLE_REPLY = 4
    GOSSIP = 5
    IHAVE = 6
    IWANT = 7
    CONSENSUS = 16
    BLOCK_SYNC = 17
    CLIENT = 18
    LEARNING = 32


RELAYABLE = frozenset({MessageType.GOSSIP})
"""Types that third parties forward verbatim (signed by their origin, not by
the hop). All other types must arrive from their signer."""

_KNOWN_TYPES = frozenset(int(t) for t in MessageType)


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded frame whose sender is authenticated: by its signature, or
    (direct channels) by the link that delivered it from that sender."""

    version: int
    type: int
    sender: PeerId
    seq: int
    body: bytes
    signature: bytes
    frame: bytes = field(default=b"", compare=False, repr=False)
    """The exact bytes this envelope was decoded from (or encoded to), so a
    relay can forward them verbatim without re-encoding."""

    @property
    def message_id(self) -> bytes:
        """20 bytes naming this exact message.

        Derived from the signature, which Ed25519 makes unique per
        (key, content), so computing it never hashes the body.
        """
        return hashlib.sha256(self.sender + self.signature).digest()[:20]


def _header(version: int, msg_type: int, sender: bytes, seq: int) -> bytes:
    return msgpack.packb([version, msg_type, sender, seq])[1:]  # drop array header


def _bin_header(length: int) -> bytes:
    if length < 1 << 8:
        return b"\xc4" + length.to_bytes(1, "big")
    if length < 1 << 16:
        return b"\xc5" + length.to_bytes(2, "big")
    return b"\xc6" + length.to_bytes(4, "big")


def sign(identity: Identity, msg_type: int, seq: int, body: bytes) -> Envelope:
    """Build and sign an envelope from ``identity``."""
    if int(msg_type) not in _KNOWN_TYPES:
        raise ValueError(f"unknown message type {msg_type}")
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError("seq must fit in 64 bits")
    signed = _header(PROTOCOL_VERSION, int(msg_type), identity.public_key, seq)
    signed += _bin_header(len(body)) + body
    signature = identity.sign(_DOMAIN + signed)
    frame = b"".join((_ARRAY6, signed, _SIG_TRAILER, signature))
    return Envelope(
        PROTOCOL_VERSION, int(msg_type), identity.public_key, seq, bytes(body), signature, frame
    )


def encode(envelope: Envelope) -> bytes:
    """The frame bytes of an already signed envelope."""
    if envelope.frame:
        return envelope.frame
    head = _header(envelope.version, envelope.type, envelope.sender, envelope.seq)
    return b"".join(
        (
            _ARRAY6,
            head,
            _bin_header(len(envelope.body)),
            envelope.body,
            _SIG_TRAILER,
            envelope.signature,
        )
    )


def _is_int(value: object) -> bool:
    return type(value) is int


def decode(
    frame: bytes, *, max_frame_bytes: int = MAX_FRAME_BYTES, link_peer: PeerId | None = None
) -> Envelope:
    """Parse and verify one frame, or raise a :class:`WireError` subclass.

    The order of checks is cheapest first, so garbage costs little: size,
    msgpack, shape, version and type, canonical form, and only then the
    signature.

    ``link_peer``: the peer whose *authenticated* link delivered ``frame``
    (a transport with ``authenticated_links``), or None. A direct-channel
    frame whose sender is that peer skips the signature check (see the
    module docstring); every other check still runs. Pass None for bytes
    of unknown origin.
    """
    envelope = _parse(frame, max_frame_bytes)
    if not _link_vouches(envelope, link_peer):
        _check_signature(envelope)
    return envelope


def _link_vouches(envelope: Envelope, link_peer: PeerId | None) -> bool:
    """Whether an authenticated link from ``link_peer`` proves ``envelope``'s sender."""
    return envelope.sender == link_peer and envelope.type not in RELAYABLE


def _check_signature(envelope: Envelope) -> None:
    frame = envelope.frame
    if not verify(envelope.sender, _DOMAIN + frame[1 : -SIGNATURE_BYTES - 2], envelope.signature):
        raise BadSignature("signature does not verify under the sender's key")


def _parse(frame: bytes, max_frame_bytes: int) -> Envelope:
    """Every check but the signature."""
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise MalformedEnvelope(f"a frame is bytes, not {type(frame).__name__}")
    frame = bytes(frame)
    if len(frame) > max_frame_bytes:
        raise FrameTooLarge(f"frame of {len(frame)} bytes exceeds {max_frame_bytes}")
    try:
        fields = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=max_frame_bytes,
            max_str_len=max_frame_bytes,
            max_array_len=64,
            max_map_len=64,
            max_ext_len=0,
        )
    except msgpack.ExtraData as exc:
        raise TrailingBytes("bytes follow the envelope") from exc
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise NotMsgpack(f"not msgpack: {exc.__class__.__name__}") from exc
    if type(fields) is not list or len(fields) != 6:
        raise MalformedEnvelope("an envelope is an array of 6 fields")
    version, msg_type, sender, seq, body, signature = fields
    if not _is_int(version) or not _is_int(msg_type) or not _is_int(seq):
        raise MalformedEnvelope("version, type and seq are integers")
    if type(sender) is not bytes or len(sender) != PUBLIC_KEY_BYTES:
        raise MalformedEnvelope("sender is a 32-byte public key")
    if type(body) is not bytes:
        raise MalformedEnvelope("body is bytes")
    if type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
        raise MalformedEnvelope("signature is 64 bytes")
    if version != PROTOCOL_VERSION:
        raise UnknownVersion(f"protocol version {version} is not {PROTOCOL_VERSION}")
    if msg_type not in _KNOWN_TYPES:
        raise UnknownMessageType(f"message type {msg_type} is not defined")
    if not 0 <= seq <= MAX_SEQ:
        raise MalformedEnvelope("seq out of range")
    head = _header(version, msg_type, sender, seq)
    body_start = 1 + len(head)
    bin_head = _bin_header(len(body))
    if (
        frame[0:1] != _ARRAY6
        or frame[1:body_start] != head
        or frame[body_start : body_start + len(bin_head)] != bin_head
        or frame[-SIGNATURE_BYTES - 2 : -SIGNATURE_BYTES] != _SIG_TRAILER
    ):
        raise MalformedEnvelope("non-canonical encoding")
    return Envelope(version, msg_type, sender, seq, body, signature, frame)


class FrameCache:
    """Memoized :func:`decode` for frames seen more than once in a process.

    Decoding is a pure function of the frame's bytes, so a verified result can
    be reused for an identical frame. In a simulation one cache is shared by
    every node: a gossip payload forwarded verbatim to 10,000 nodes is
    verified once and its body held once, instead of 10,000 times. Each
    frame is still checked before anyone uses it. Failures are not cached.
    The cache is bounded by total frame bytes (least recently used goes).

    An entry remembers whether its signature was checked: one accepted on a
    link's word (``link_peer``) is parsed, not verified, so a later lookup
    that the link does not vouch for (another receiver, a relay) verifies
    it then, once, and a bad signature still raises there.
    """

    def __init__(
        self, max_bytes: int = 256 * 1024 * 1024, *, max_frame_bytes: int = MAX_FRAME_BYTES
    ) -> None:
        self.max_bytes = max_bytes
        self.max_frame_bytes = max_frame_bytes
        self._entries: OrderedDict[bytes, tuple[Envelope, bool]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def decode(self, frame: bytes, *, link_peer: PeerId | None = None) -> Envelope:
        """:func:`decode`, memoized; ``link_peer`` as there."""
        entry = self._entries.get(frame)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(frame)
            envelope, verified = entry
            if not verified and not _link_vouches(envelope, link_peer):
                _check_signature(envelope)
                self._entries[frame] = (envelope, True)
            return envelope
        self.misses += 1
        envelope = _parse(frame, self.max_frame_bytes)
        verified = not _link_vouches(envelope, link_peer)
        if verified:
            _check_signature(envelope)
        if len(frame) <= self.max_bytes:
            self._entries[frame] = (envelope, verified)
            self._bytes += len(frame)
            while self._bytes > self.max_bytes:
                old, _ = self._entries.popitem(last=False)
                self._bytes -= len(old)
        return envelope


class SequenceWindow:
    """Per-sender anti-replay window (the IPsec/DTLS sliding bitmap).

    A link may reorder, so a strictly increasing check would drop honest
    traffic; instead the last ``size`` sequence numbers below the highest
    seen are remembered in a bitmap. A number seen before raises
    :class:`ReplayedSequence`; one older than the window raises
    :class:`StaleSequence`. Memory is one int and one bitmap per sender.
    """

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._state: dict[PeerId, tuple[int, int]] = {}

    def check(self, sender: PeerId, seq: int) -> None:
        """Accept ``seq`` from ``sender`` or raise; accepting records it."""
        state = self._state.get(sender)
        if state is None:
            self._state[sender] = (seq, 1)
            return
        highest, bitmap = state
        if seq > highest:
            shift = seq - highest
            bitmap = ((bitmap << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self._state[sender] = (seq, bitmap)
            return
        offset = highest - seq
        if offset >= self.size:
            raise StaleSequence(f"seq {seq} is older than the replay window")
        if bitmap >> offset & 1:
            raise ReplayedSequence(f"seq {seq} was already accepted")
        self._state[sender] = (highest, bitmap | 1 << offset)

    def forget(self, sender: PeerId) -> None:
        self._state.pop(sender, None)


def peek(frame: bytes) -> tuple[int, bytes, bytes] | None:
    """``(type, sender, body)`` of a frame, read without any check: no
    signature, no canonical form, no limits beyond the frame's own size.
    For a node's bookkeeping before it handles the frame (sizing a queue,
    answering busy), never for trusting what the frame says, which
    :func:`decode` checks when it is handled. None if it is not shaped like
    an envelope."""
    try:
        unpacker = msgpack.Unpacker(max_buffer_size=max(1, len(frame)))
        unpacker.feed(frame)
        if unpacker.read_array_header() != 6:
            return None
        unpacker.skip()  # version
        msg_type, sender = unpacker.unpack(), unpacker.unpack()
        unpacker.skip()  # seq
        body = unpacker.unpack()
    except (ValueError, msgpack.UnpackException):
        return None
    if type(msg_type) is not int or type(sender) is not bytes or type(body) is not bytes:
        return None
    return msg_type, sender, body


def unpack_body(
    body: bytes,
    *,
    max_len: int = MAX_FRAME_BYTES,
    max_array_len: int | None = None,
    max_map_len: int | None = None,
    error: type[MalformedBody] = MalformedBody,
    what: str = "body",
) -> object:
    """Strictly unpack exactly one msgpack value for a layer's own decoder.

    Every decoder of peer bytes (bodies, transactions, blocks) comes through
    here, so the limits that keep a hostile input from costing memory are
    set in one place. Raises ``error`` (a :class:`MalformedBody`, so a node
    counts it) for anything else; the caller then checks the value's shape.
    """
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=max_len,
            max_str_len=max_len,
            max_array_len=max_len if max_array_len is None else max_array_len,
            max_map_len=max_len if max_map_len is None else max_map_len,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise error(f"{what} is not one msgpack value: {exc.__class__.__name__}") from exc


def pack_body(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)
