"""What a PBFT replica must remember across a crash, and its codec.

Castro and Liskov's safety argument counts a replica that forgets what it
signed as faulty: restarted with only its committed blocks, it could PREPARE
a second digest for a (view, seq) it already prepared, or leave out of its
VIEW-CHANGE a proposal it prepared, which a quorum may have committed. With
at most f such restarts at once the other replicas cover for it; with more,
a committed block can be lost. CometBFT closes the same hole with its
validator's last-sign state and consensus WAL. Here the replica emits a
:class:`~fedchain.consensus.pbft.Persist` action *before* each message that
binds it, and the reactor writes it durably before carrying out any later
action (write-ahead), so whatever a peer saw signed is on disk first:

* ``view``: the view entered, whether in its view change, and the window
  the records below are kept in (written at start, before a VIEW-CHANGE and
  on installing a NEW-VIEW). A restarted replica never goes back to a
  lower view, and resumes its view change or its normal case where it
  stopped.
* ``stable``: the last stable checkpoint and its 2f+1 CHECKPOINT proof, so
  a restarted replica's VIEW-CHANGE names the same starting point.
* one record per sequence number in the window: the (view, digest) it
  signed a PRE-PREPARE or PREPARE for, and its prepared certificate (the
  PRE-PREPARE with its payload and 2f PREPAREs) once it has one, written
  before its COMMIT. A primary's record also holds its own PRE-PREPARE
  (with the payload) until that is in the certificate, so a primary
  restarted mid-flight proposes those seqs again instead of leaving them
  to a view change. Records live in ``window`` slots keyed by ``seq %
  window``; a slot's record names its seq, and only those above the stable
  checkpoint count, so no record is ever deleted.
* ``new_view``: a new primary's own NEW-VIEW, written before it is sent
  (bounded by the frame limit, since it went out as one frame). Restarted
  in that view, the primary installs it again and sends it again, so the
  backups that missed it need not wait for their view timers to move
  everyone to the next view, and its re-issued PRE-PREPAREs are back in
  its log for the backups' PREPAREs and COMMITs to match.

Every record names the chain id it was signed under (a validator epoch has
its own), and a journal loaded for another chain id is empty. The store's
checksums guard the bytes; a record that fails to decode is a
:class:`~fedchain.consensus.errors.StoreCorrupted` naming its key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from fedchain.p2p.wire import pack_body, unpack_body

from .errors import MalformedMessage, StoreCorrupted
from .pbft_messages import (
    DIGEST_BYTES,
    MAX_U63,
    Checkpoint,
    NewView,
    PreparedProof,
    PrePrepare,
    checkpoint_from_wire,
    new_view_from_wire,
    pre_prepare_from_wire,
    prepared_proof_from_wire,
)
from .store import MAX_META_BYTES

__all__ = [
    "MAX_WINDOW",
    "NEW_VIEW_KEY",
    "STABLE_KEY",
    "VIEW_KEY",
    "Journal",
    "SeqRecord",
    "encode_new_view",
    "encode_seq_record",
    "encode_stable",
    "encode_view",
    "load_journal",
    "seq_key",
]

_T = TypeVar("_T")

VIEW_KEY = "pbft.view"
STABLE_KEY = "pbft.stable"
NEW_VIEW_KEY = "pbft.new_view"

MAX_WINDOW = 2**16
"""The most slots a journal keeps (``PbftConfig`` refuses a larger window).
A restart reads every slot, so a window read back from the disk must be
bounded too: a damaged one of 2**32 would hang it instead of failing."""


def seq_key(seq: int, window: int) -> str:
    return _slot_key(seq % window)


def _slot_key(slot: int) -> str:
    return f"pbft.seq.{slot}"


@dataclass(frozen=True, slots=True)
class SeqRecord:
    """What the replica signed for one sequence number."""

    seq: int
    view: int
    """The view of the last PRE-PREPARE or PREPARE it signed for ``seq``."""
    digest: bytes
    """...and the digest it named."""
    prepared: PreparedProof | None = None
    """Its prepared certificate for ``seq`` (of the highest view), if any."""
    proposal: PrePrepare | None = None
    """Its own PRE-PREPARE for ``seq`` as primary, until it is prepared."""


@dataclass(frozen=True, slots=True)
class Journal:
    """A replica's durable log as loaded at restart (empty for a new one)."""

    view: int = 0
    view_changing: bool = False
    stable_seq: int = 0
    stable_proof: tuple[Checkpoint, ...] = ()
    records: dict[int, SeqRecord] = field(default_factory=dict)
    """By seq: only records above ``stable_seq``."""
    new_view: NewView | None = None
    """The last NEW-VIEW this replica sent as a new primary (any view)."""


def encode_view(chain_id: str, view: int, view_changing: bool, window: int) -> bytes:
    return pack_body([chain_id, view, view_changing, window])


def encode_stable(chain_id: str, seq: int, proof: tuple[Checkpoint, ...]) -> bytes:
    return pack_body([chain_id, seq, [c.wire() for c in proof]])


def encode_new_view(chain_id: str, new_view: NewView) -> bytes:
    return pack_body([chain_id, new_view.wire()])


def encode_seq_record(chain_id: str, record: SeqRecord) -> bytes:
    prepared = None if record.prepared is None else record.prepared.wire()
    proposal = None if record.proposal is None else record.proposal.wire()
    return pack_body([chain_id, record.seq, record.view, record.digest, prepared, proposal])


def load_journal(get: Callable[[str], bytes | None], chain_id: str, window: int) -> Journal:
    """Read a journal back through ``get`` (a store's ``get_meta``).

    Slots are read up to the larger of ``window`` and the window the
    journal was written with, so a restart with another checkpoint interval
    still finds every record."""
    view, changing, written_window = 0, False, window
    fields = _ours(get, VIEW_KEY, 4, chain_id)
    if fields is not None:
        view = _uint(VIEW_KEY, fields[1])
        changing = _bool(VIEW_KEY, fields[2])
        written_window = _uint(VIEW_KEY, fields[3])
        if not 0 < written_window <= MAX_WINDOW:
            raise StoreCorrupted(f"journal record {VIEW_KEY!r}: a window of {written_window}")
    stable_seq, proof = 0, ()
    fields = _ours(get, STABLE_KEY, 3, chain_id)
    if fields is not None:
        stable_seq = _uint(STABLE_KEY, fields[1])
        items = _list(STABLE_KEY, fields[2])
        proof = tuple(_decode(STABLE_KEY, checkpoint_from_wire, c) for c in items)
    records: dict[int, SeqRecord] = {}
    for slot in range(max(window, written_window)):
        key = _slot_key(slot)
        fields = _ours(get, key, 6, chain_id)
        if fields is None:
            continue
        seq = _uint(key, fields[1])
        digest = fields[3]
        if type(digest) is not bytes or len(digest) != DIGEST_BYTES:
            raise StoreCorrupted(f"journal record {key!r}: the digest is not 32 bytes")
        prepared = None if fields[4] is None else _decode(key, prepared_proof_from_wire, fields[4])
        proposal = None if fields[5] is None else _decode(key, pre_prepare_from_wire, fields[5])
        if seq > stable_seq:
            records[seq] = SeqRecord(seq, _uint(key, fields[2]), digest, prepared, proposal)
    new_view = None
    fields = _ours(get, NEW_VIEW_KEY, 2, chain_id)
    if fields is not None:
        new_view = _decode(NEW_VIEW_KEY, new_view_from_wire, fields[1])
    return Journal(view, changing, stable_seq, proof, records, new_view)


def _ours(
    get: Callable[[str], bytes | None], key: str, length: int, chain_id: str
) -> list[object] | None:
    """The record's fields if it is there and of ``chain_id`` (checked shape)."""
    raw = get(key)
    if raw is None:
        return None
    fields = _fields(key, raw, length)
    return fields if fields[0] == chain_id else None


def _fields(key: str, raw: bytes, length: int) -> list[object]:
    try:
        fields = unpack_body(raw, max_len=MAX_META_BYTES, error=MalformedMessage)
    except MalformedMessage as exc:
        raise StoreCorrupted(f"journal record {key!r} does not decode: {exc}") from exc
    if type(fields) is not list or len(fields) != length or type(fields[0]) is not str:
        raise StoreCorrupted(f"journal record {key!r} has the wrong shape")
    return fields


def _uint(key: str, value: object) -> int:
    """Views, sequence numbers and windows within the wire's range (a
    replica restarted at view 2**64 - 1 could not sign its next VIEW-CHANGE:
    msgpack has no integer for 2**64)."""
    if type(value) is not int or not 0 <= value <= MAX_U63:
        raise StoreCorrupted(f"journal record {key!r}: expected an integer in 0..2**63 - 1")
    return value


def _bool(key: str, value: object) -> bool:
    if type(value) is not bool:
        raise StoreCorrupted(f"journal record {key!r}: expected a boolean")
    return value


def _list(key: str, value: object) -> list[object]:
    if type(value) is not list:
        raise StoreCorrupted(f"journal record {key!r}: expected an array")
    return value


def _decode(key: str, decoder: Callable[[object], _T], fields: object) -> _T:
    try:
        return decoder(fields)
    except MalformedMessage as exc:
        raise StoreCorrupted(f"journal record {key!r}: {exc}") from exc
