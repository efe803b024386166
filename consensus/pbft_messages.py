"""PBFT wire messages, their signatures and their strict codecs.

Every message is a msgpack array ``[kind, field..., signature]`` carried in
the body of a ``MessageType.CONSENSUS`` envelope. The p2p layer
authenticates the envelope's sender hop by hop (its signature, or the
sealed link it came over: p2p SPEC W5), which is enough for a message used
only by its direct receiver; but PRE-PREPARE, PREPARE and CHECKPOINT messages are also
forwarded inside VIEW-CHANGE and NEW-VIEW proofs, where a third party must
check who said them. So each of those carries its author's own Ed25519
signature over a domain tag, the chain id and the packed fields before the
signature (never over the payload: a PRE-PREPARE signs the payload's
digest, so a 1 MiB batch is hashed once by the application, not by us).

COMMIT is the exception: its signature *is* the author's commit vote
``sign_commit_vote(chain_id, seq, digest, view=view)``, the very signature a
block's :class:`~fedchain.consensus.votes.CommitCertificate` collects. The
vote binds the view, and a certificate holds votes of one view only, since
PBFT's safety covers commit quorums of a single view. That saves one
signature per replica per sequence number on the hot path.

Decoding is strict: exact types, sizes and ranges, or ``MalformedMessage``.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

from fedchain.p2p.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Identity,
    PeerId,
    SignatureMemo,
    verify,
    verify_with,
)
from fedchain.p2p.wire import pack_body, unpack_body

from .errors import MalformedMessage
from .votes import commit_vote_bytes, sign_commit_vote

__all__ = [
    "NULL_DIGEST",
    "Checkpoint",
    "Commit",
    "Kind",
    "Message",
    "MessageCache",
    "NewView",
    "PrePrepare",
    "Prepare",
    "PreparedProof",
    "ViewChange",
    "checkpoint_from_wire",
    "decode_message",
    "encode_message",
    "new_view_from_wire",
    "pre_prepare_from_wire",
    "prepared_proof_from_wire",
]

DIGEST_BYTES = 32
NULL_DIGEST = bytes(DIGEST_BYTES)
"""The digest of the null request a NEW-VIEW puts in a sequence gap."""

MAX_U63 = 2**63 - 1
MAX_PROOF_ITEMS = 4096
_DOMAIN = b"fedchain/pbft/v1\x00"


class Kind(enum.IntEnum):
    """The first field of every PBFT message. Numbers are part of the protocol."""

    PRE_PREPARE = 1
    PREPARE = 2
    COMMIT = 3
    CHECKPOINT = 4
    VIEW_CHANGE = 5
    NEW_VIEW = 6


def _signed_bytes(chain_id: str, fields: list[object]) -> bytes:
    chain = chain_id.encode()
    return _DOMAIN + len(chain).to_bytes(2, "big") + chain + pack_body(fields)


class _Signed:
    """Shared signing and checking of messages that carry their own signature."""

    replica: PeerId
    signature: bytes

    def wire(self) -> list[object]:  # pragma: no cover - overridden
        raise NotImplementedError

    def signed_part(self, chain_id: str) -> bytes:
        return _signed_bytes(chain_id, self.wire()[:-1])

    _memo_by_value = False
    """Small messages: a memo may key them by ``(chain id, message)`` itself
    (equality covers every field and the signature), which skips
    re-encoding the signed part of a message object shared by recipients.
    Sound for messages with exact field types, as ``create`` and
    :func:`decode_message` build them (``True == 1``, but they pack apart)."""

    def verify(self, chain_id: str, *, memo: SignatureMemo | None = None) -> bool:
        """Whether the signature is ``replica``'s over this message's fields
        (through ``memo``, which remembers signatures that verified)."""
        if memo is None:
            return verify(self.replica, self.signed_part(chain_id), self.signature)
        by_value = self._memo_by_value
        if by_value and memo.known((chain_id, self)):
            return True
        if not memo.verify(self.replica, self.signed_part(chain_id), self.signature):
            return False
        if by_value:
            memo.remember((chain_id, self))
        return True


@dataclass(frozen=True, slots=True)
class PrePrepare(_Signed):
    """The primary of ``view`` assigns ``digest`` (carried in ``payload``) to ``seq``."""

    view: int
    seq: int
    digest: bytes
    payload: bytes
    replica: PeerId
    signature: bytes

    @classmethod
    def create(
        cls, identity: Identity, chain_id: str, view: int, seq: int, digest: bytes, payload: bytes
    ) -> PrePrepare:
        unsigned = cls(view, seq, digest, payload, identity.public_key, b"")
        return unsigned.resigned(identity, chain_id)

    def resigned(self, identity: Identity, chain_id: str) -> PrePrepare:
        return PrePrepare(
            self.view,
            self.seq,
            self.digest,
            self.payload,
            self.replica,
            identity.sign(self.signed_part(chain_id)),
        )

    def signed_part(self, chain_id: str) -> bytes:
        # The payload is bound through its digest only (the application checks it).
        return _signed_bytes(chain_id, [int(Kind.PRE_PREPARE), self.view, self.seq, self.digest])

    def wire(self) -> list[object]:
        return [
            int(Kind.PRE_PREPARE),
            self.view,
            self.seq,
            self.digest,
            self.payload,
            self.replica,
            self.signature,
        ]


@dataclass(frozen=True, slots=True)
class Prepare(_Signed):
    """A backup accepted the primary's assignment of ``digest`` to (``view``, ``seq``)."""

    view: int
    seq: int
    digest: bytes
    replica: PeerId
    signature: bytes
    _memo_by_value = True

    @classmethod
    def create(
        cls, identity: Identity, chain_id: str, view: int, seq: int, digest: bytes
    ) -> Prepare:
        unsigned = cls(view, seq, digest, identity.public_key, b"")
        return cls(
            view, seq, digest, identity.public_key, identity.sign(unsigned.signed_part(chain_id))
        )

    def wire(self) -> list[object]:
        return [int(Kind.PREPARE), self.view, self.seq, self.digest, self.replica, self.signature]


@dataclass(frozen=True, slots=True)
class Commit:
    """``replica`` prepared (``view``, ``seq``, ``digest``); ``vote`` is its commit vote."""

    view: int
    seq: int
    digest: bytes
    replica: PeerId
    vote: bytes

    @classmethod
    def create(
        cls, identity: Identity, chain_id: str, view: int, seq: int, digest: bytes
    ) -> Commit:
        return cls(
            view,
            seq,
            digest,
            identity.public_key,
            sign_commit_vote(identity, chain_id, seq, digest, view=view),
        )

    def verify(self, chain_id: str, *, memo: SignatureMemo | None = None) -> bool:
        """Whether ``vote`` is ``replica``'s commit vote (through ``memo``:
        the same entry then serves the block certificate's check)."""
        if memo is not None and memo.known((chain_id, self)):
            return True
        message = commit_vote_bytes(chain_id, self.seq, self.digest, view=self.view)
        if not verify_with(memo, self.replica, message, self.vote):
            return False
        if memo is not None:
            memo.remember((chain_id, self))
        return True

    def wire(self) -> list[object]:
        return [int(Kind.COMMIT), self.view, self.seq, self.digest, self.replica, self.vote]


@dataclass(frozen=True, slots=True)
class Checkpoint(_Signed):
    """``replica`` executed up to ``seq`` and its chained state digest is ``state``."""

    seq: int
    state: bytes
    replica: PeerId
    signature: bytes
    _memo_by_value = True

    @classmethod
    def create(cls, identity: Identity, chain_id: str, seq: int, state: bytes) -> Checkpoint:
        unsigned = cls(seq, state, identity.public_key, b"")
        return cls(seq, state, identity.public_key, identity.sign(unsigned.signed_part(chain_id)))

    def wire(self) -> list[object]:
        return [int(Kind.CHECKPOINT), self.seq, self.state, self.replica, self.signature]


@dataclass(frozen=True, slots=True)
class PreparedProof:
    """A prepared certificate: a PRE-PREPARE and 2f matching PREPAREs of its view."""

    pre_prepare: PrePrepare
    prepares: tuple[Prepare, ...]

    def wire(self) -> list[object]:
        return [self.pre_prepare.wire(), [p.wire() for p in self.prepares]]


@dataclass(frozen=True, slots=True)
class ViewChange(_Signed):
    """``replica`` moves to ``new_view``, with its stable checkpoint proof and P set."""

    new_view: int
    stable_seq: int
    checkpoint_proof: tuple[Checkpoint, ...]
    prepared: tuple[PreparedProof, ...]
    replica: PeerId
    signature: bytes

    @classmethod
    def create(
        cls,
        identity: Identity,
        chain_id: str,
        new_view: int,
        stable_seq: int,
        checkpoint_proof: tuple[Checkpoint, ...],
        prepared: tuple[PreparedProof, ...],
    ) -> ViewChange:
        unsigned = cls(new_view, stable_seq, checkpoint_proof, prepared, identity.public_key, b"")
        signature = identity.sign(unsigned.signed_part(chain_id))
        return cls(new_view, stable_seq, checkpoint_proof, prepared, identity.public_key, signature)

    def wire(self) -> list[object]:
        return [
            int(Kind.VIEW_CHANGE),
            self.new_view,
            self.stable_seq,
            [c.wire() for c in self.checkpoint_proof],
            [p.wire() for p in self.prepared],
            self.replica,
            self.signature,
        ]


@dataclass(frozen=True, slots=True)
class NewView(_Signed):
    """The primary of ``view`` starts it: 2f+1 VIEW-CHANGEs and the re-issued PRE-PREPAREs."""

    view: int
    view_changes: tuple[ViewChange, ...]
    pre_prepares: tuple[PrePrepare, ...]
    replica: PeerId
    signature: bytes

    @classmethod
    def create(
        cls,
        identity: Identity,
        chain_id: str,
        view: int,
        view_changes: tuple[ViewChange, ...],
        pre_prepares: tuple[PrePrepare, ...],
    ) -> NewView:
        unsigned = cls(view, view_changes, pre_prepares, identity.public_key, b"")
        signature = identity.sign(unsigned.signed_part(chain_id))
        return cls(view, view_changes, pre_prepares, identity.public_key, signature)

    def wire(self) -> list[object]:
        return [
            int(Kind.NEW_VIEW),
            self.view,
            [v.wire() for v in self.view_changes],
            [p.wire() for p in self.pre_prepares],
            self.replica,
            self.signature,
        ]


Message = PrePrepare | Prepare | Commit | Checkpoint | ViewChange | NewView


def encode_message(message: Message) -> bytes:
    """The canonical body bytes of ``message``."""
    return pack_body(message.wire())


# -- strict decoding ---------------------------------------------------------


def _uint(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_U63:
        raise MalformedMessage(f"{what} is an unsigned 63-bit integer")
    return value


def _bytes(value: object, what: str, size: int | None = None) -> bytes:
    if type(value) is not bytes or (size is not None and len(value) != size):
        raise MalformedMessage(f"{what} is {size if size is not None else 'some'} bytes")
    return value


def _array(value: object, what: str, length: int | None = None) -> list[object]:
    if type(value) is not list or (length is not None and len(value) != length):
        raise MalformedMessage(f"{what} is an array of {length if length else 'some'} fields")
    if len(value) > MAX_PROOF_ITEMS:
        raise MalformedMessage(f"{what} has too many items")
    return value


def _head(fields: object, kind: Kind, length: int) -> list[object]:
    items = _array(fields, kind.name, length)
    if items[0] != int(kind) or type(items[0]) is not int:
        raise MalformedMessage(f"expected a {kind.name}")
    return items


def _pre_prepare(fields: object) -> PrePrepare:
    _, view, seq, digest, payload, replica, sig = _head(fields, Kind.PRE_PREPARE, 7)
    return PrePrepare(
        _uint(view, "view"),
        _uint(seq, "seq"),
        _bytes(digest, "digest", DIGEST_BYTES),
        _bytes(payload, "payload"),
        _bytes(replica, "replica", PUBLIC_KEY_BYTES),
        _bytes(sig, "signature", SIGNATURE_BYTES),
    )


def _prepare(fields: object) -> Prepare:
    _, view, seq, digest, replica, sig = _head(fields, Kind.PREPARE, 6)
    return Prepare(
        _uint(view, "view"),
        _uint(seq, "seq"),
        _bytes(digest, "digest", DIGEST_BYTES),
        _bytes(replica, "replica", PUBLIC_KEY_BYTES),
        _bytes(sig, "signature", SIGNATURE_BYTES),
    )


def _commit(fields: object) -> Commit:
    _, view, seq, digest, replica, vote = _head(fields, Kind.COMMIT, 6)
    return Commit(
        _uint(view, "view"),
        _uint(seq, "seq"),
        _bytes(digest, "digest", DIGEST_BYTES),
        _bytes(replica, "replica", PUBLIC_KEY_BYTES),
        _bytes(vote, "vote", SIGNATURE_BYTES),
    )


def _checkpoint(fields: object) -> Checkpoint:
    _, seq, state, replica, sig = _head(fields, Kind.CHECKPOINT, 5)
    return Checkpoint(
        _uint(seq, "seq"),
        _bytes(state, "state", DIGEST_BYTES),
        _bytes(replica, "replica", PUBLIC_KEY_BYTES),
        _bytes(sig, "signature", SIGNATURE_BYTES),
    )


def _prepared_proof(fields: object) -> PreparedProof:
    pre_prepare, prepares = _array(fields, "prepared proof", 2)
    return PreparedProof(
        _pre_prepare(pre_prepare),
        tuple(_prepare(p) for p in _array(prepares, "prepares")),
    )


def _view_change(fields: object) -> ViewChange:
    _, new_view, stable_seq, proof, prepared, replica, sig = _head(fields, Kind.VIEW_CHANGE, 7)
    return ViewChange(
        _uint(new_view, "new view"),
        _uint(stable_seq, "stable seq"),
        tuple(_checkpoint(c) for c in _array(proof, "checkpoint proof")),
        tuple(_prepared_proof(p) for p in _array(prepared, "prepared set")),
        _bytes(replica, "replica", PUBLIC_KEY_BYTES),
        _bytes(sig, "signature", SIGNATURE_BYTES),
    )


def _new_view(fields: object) -> NewView:
    _, view, changes, pre_prepares, replica, sig = _head(fields, Kind.NEW_VIEW, 6)
    return NewView(
        _uint(view, "view"),
        tuple(_view_change(v) for v in _array(changes, "view changes")),
        tuple(_pre_prepare(p) for p in _array(pre_prepares, "pre-prepares")),
        _bytes(replica, "replica", PUBLIC_KEY_BYTES),
        _bytes(sig, "signature", SIGNATURE_BYTES),
    )


def checkpoint_from_wire(fields: object) -> Checkpoint:
    """A CHECKPOINT from its unpacked ``wire()`` form (the journal keeps proofs so)."""
    return _checkpoint(fields)


def pre_prepare_from_wire(fields: object) -> PrePrepare:
    """A PRE-PREPARE from its unpacked ``wire()`` form."""
    return _pre_prepare(fields)


def prepared_proof_from_wire(fields: object) -> PreparedProof:
    """A prepared certificate from its unpacked ``wire()`` form."""
    return _prepared_proof(fields)


def new_view_from_wire(fields: object) -> NewView:
    """A NEW-VIEW from its unpacked ``wire()`` form (a new primary journals its own)."""
    return _new_view(fields)


_DECODERS = {
    Kind.PRE_PREPARE: _pre_prepare,
    Kind.PREPARE: _prepare,
    Kind.COMMIT: _commit,
    Kind.CHECKPOINT: _checkpoint,
    Kind.VIEW_CHANGE: _view_change,
    Kind.NEW_VIEW: _new_view,
}


def decode_message(body: bytes, *, cache: MessageCache | None = None) -> Message:
    """Parse one PBFT message, or raise :class:`MalformedMessage`.

    Signatures are not checked here: the replica checks them once, after its
    cheap view and watermark guards, so stale traffic costs no crypto.
    ``cache`` (a :class:`MessageCache`) returns the message decoded earlier
    from the same bytes.
    """
    if cache is not None:
        return cache.decode(body)
    return _decode(body)


def _decode(body: bytes) -> Message:
    try:
        fields = unpack_body(body)
    except MalformedMessage:
        raise
    except Exception as exc:
        raise MalformedMessage(str(exc)) from exc
    if type(fields) is not list or not fields or type(fields[0]) is not int:
        raise MalformedMessage("a PBFT message is an array starting with its kind")
    try:
        decoder = _DECODERS[Kind(fields[0])]
    except ValueError as exc:
        raise MalformedMessage(f"unknown PBFT message kind {fields[0]}") from exc
    message = decoder(fields)
    if encode_message(message) != body:
        raise MalformedMessage("non-canonical encoding")
    return message


class MessageCache:
    """Memoized :func:`decode_message` for bodies seen more than once.

    Decoding is a pure function of the body's bytes and messages are
    immutable, so the message decoded from some bytes serves every later
    copy of them: in a simulation one cache shared by all validators decodes
    a broadcast once, not once per recipient (what
    :class:`~fedchain.p2p.wire.FrameCache` does for envelopes). Keyed by the
    bytes themselves (Python caches a bytes object's hash, and the frame
    cache hands every recipient the same body object). Malformed bodies are
    not remembered. Bounded by total body bytes and by entries; the least
    recently used goes first.
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, max_entries: int = 100_000) -> None:
        if max_bytes < 1 or max_entries < 1:
            raise ValueError("a message cache holds at least one entry")
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, Message] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def decode(self, body: bytes) -> Message:
        entries = self._entries
        message = entries.get(body)
        if message is not None:
            self.hits += 1
            entries.move_to_end(body)
            return message
        self.misses += 1
        message = _decode(body)
        size = len(body)
        if size <= self.max_bytes:
            entries[body] = message
            self._bytes += size
            while self._bytes > self.max_bytes or len(entries) > self.max_entries:
                old, _ = entries.popitem(last=False)
                self._bytes -= len(old)
        return message

    def __len__(self) -> int:
        return len(self._entries)
