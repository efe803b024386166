"""The client protocol: what a client asks a node and the proofs it gets back.

A client need not trust the node it asks. Every answer that claims
something about the chain carries the block header it is about, that
header's commit certificate, and a Merkle proof into one of the header's
roots; :meth:`CommitProof.verify` and :meth:`QueryAnswer.verify` check all
three against the validator set the client already trusts (the genesis set,
or one it followed on chain). A node that lies can only fail to answer.

Messages travel on the CLIENT channel as msgpack arrays whose first element
is an opcode; requests carry a client-chosen request id that the reply
echoes::

    [SUBMIT, id, [tx, ...]]          -> [SUBMITTED, id, [[status, detail], ...]]
    [WAIT, id, digest, timeout_ms]   -> [COMMIT, id, proof or nil (timed out)]
    [QUERY, id, key]                 -> [ANSWER, id, answer]
    [SUBSCRIBE, id]                  -> [BLOCK, id, height, [digest, ...]] per block
    [EPOCHS, id, epoch]              -> [EPOCH_PROOFS, id, [answer, ...]]
    [HEADERS, id, low, high]         -> [HEADER_CHAIN, id, [header, ...], votes or nil]
    [FORWARD, [tx, ...]]             (validator to validator, no reply)
    any malformed request            -> [ERROR, id, reason]

``SUBMITTED`` statuses are :class:`SubmitStatus`: accepted and duplicate
carry the digest, busy and refused a reason. Busy is the explicit
back-pressure answer of a full mempool: retry later. Decoding is strict
(:func:`decode_client_message` raises :class:`~.errors.MalformedMessage`
for anything else), like every decoder a peer can reach.

``EPOCH_PROOFS`` lets a client follow validator-set changes without
trusting the node: for each epoch after the one asked about (up to
``MAX_EPOCH_ANSWERS`` per reply), the query answer for ``sys/validators``
in the state after the block that changed the set, so it is certified by
the *previous* set, which the client already trusts
(:class:`~.client.TrustedValidators`).

``HEADER_CHAIN`` lets a client that trusts only a later set check a proof
from before that set's epoch, by walking back, as CometBFT's light client
verifies backwards: the headers of consecutive heights ending at ``high``
(the top ``MAX_HEADERS`` of ``low..high``) and the certificate of the one at
``high``. Each header's ``prev_hash`` names the one below, so one header
the client trusts vouches for every one under it (:class:`HeaderChain`).
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from fedchain.p2p.identity import PeerId
from fedchain.p2p.wire import pack_body, unpack_body

from . import merkle
from .block import (
    Block,
    BlockHeader,
    decode_certificate,
    decode_header,
    decode_result,
    encode_certificate,
)
from .contracts import TxResult
from .errors import MalformedMessage
from .state import (
    MAX_KEY_BYTES,
    MAX_TOP_LEVELS,
    MAX_TOP_SIBLINGS,
    ProofLeaf,
    StateProof,
    check_key,
    decode_value,
    verify_state_proof,
)
from .votes import CommitCertificate

__all__ = [
    "ClientOp",
    "CommitProof",
    "HeaderChain",
    "QueryAnswer",
    "SubmitStatus",
    "certifies_header",
    "decode_client_message",
    "encode_client_message",
]

MAX_CLIENT_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_PATH = 64
MAX_REASON_CHARS = 200
MAX_PROOF_BUCKET = 1 << 16
"""Leaf hashes in a state proof's bucket (2 MiB): a bucket holds ~8-12 keys
when its genesis sizes the buckets near keys / 8."""
MAX_EPOCH_ANSWERS = 64
MAX_HEADERS = 512
"""Headers per HEADER_CHAIN answer: about 90 KB, and a node reads them
without decoding the blocks' transactions."""


class ClientOp(enum.IntEnum):
    SUBMIT = 0
    SUBMITTED = 1
    WAIT = 2
    COMMIT = 3
    QUERY = 4
    ANSWER = 5
    SUBSCRIBE = 6
    BLOCK = 7
    FORWARD = 8
    ERROR = 9
    EPOCHS = 10
    EPOCH_PROOFS = 11
    HEADERS = 12
    HEADER_CHAIN = 13


class SubmitStatus(enum.IntEnum):
    ACCEPTED = 0
    DUPLICATE = 1
    BUSY = 2
    REFUSED = 3


_STATUS_PAYLOAD = {int(s): bytes if s <= SubmitStatus.DUPLICATE else str for s in SubmitStatus}
"""Status -> the type of what follows it (a digest, or a reason). A dict
lookup per status: iterating the enum for each one cost ~3 µs a status
(timeit; the whole decode is now ~0.5 µs a status), visible in py-spy on
the benchmark's load generator past saturation."""


def _is_hash(value: object) -> bool:
    return type(value) is bytes and len(value) == 32


def _is_u63(value: object) -> bool:
    return type(value) is int and 0 <= value < 2**63  # type: ignore[operator]


def _is_key(value: object) -> bool:
    """A state key as the state itself takes one: a non-empty string of at
    most MAX_KEY_BYTES in UTF-8 (bytes, not characters: 300 'é' are 600)."""
    try:
        check_key(value)
    except ValueError:
        return False
    return True


def _path(value: object) -> tuple[bytes, ...]:
    if type(value) is not list or len(value) > MAX_PATH or not all(map(_is_hash, value)):
        raise MalformedMessage("a Merkle path is a list of up to 64 hashes")
    return tuple(value)


def _top_path(value: object) -> tuple[bytes, ...]:
    """A state proof's top path: per level, up to MAX_TOP_SIBLINGS hashes end
    to end (:func:`~.state.verify_state_proof` checks the exact shape)."""
    longest = 32 * MAX_TOP_SIBLINGS
    if (
        type(value) is not list
        or len(value) > MAX_TOP_LEVELS
        or not all(type(v) is bytes and len(v) % 32 == 0 and len(v) <= longest for v in value)
    ):
        raise MalformedMessage(
            f"a top path is a list of up to {MAX_TOP_LEVELS} strings"
            f" of up to {MAX_TOP_SIBLINGS} hashes"
        )
    return tuple(value)


def certifies_header(
    header: BlockHeader, cert: CommitCertificate, chain_id: str, validators: Sequence[PeerId]
) -> bool:
    """Whether ``cert`` makes ``header`` final under a quorum of ``validators``.

    Never for a null block's header: its votes sign NULL_DIGEST, which names
    the height but no header, so any header with the null marker would pass
    with them (a forged transaction root or state root included). A null
    block proves nothing to a client; its parent's header (same state root)
    or a later block does."""
    return (
        not header.is_null
        and cert.height == header.height
        and cert.block_hash == header.hash
        and cert.is_valid(chain_id, validators)
    )


@dataclass(frozen=True, slots=True)
class CommitProof:
    """Transaction ``index`` of the block with ``header`` is final, with
    ``result``: RFC 6962 paths into the header's transaction and result
    roots, and the header's commit certificate."""

    header: BlockHeader
    certificate: CommitCertificate
    index: int
    size: int
    tx_path: tuple[bytes, ...]
    result: TxResult
    result_path: tuple[bytes, ...]

    @property
    def height(self) -> int:
        return self.header.height

    @classmethod
    def of_block(cls, block: Block, index: int) -> CommitProof:
        """The proof for ``block.txs[index]`` (the block must be certified)."""
        if block.certificate is None:
            raise ValueError("only a certified block proves a commit")
        leaves = [tx.encoded for tx in block.txs]
        results = [r.encode() for r in block.results]
        return cls(
            block.header,
            block.certificate,
            index,
            len(leaves),
            tuple(merkle.inclusion_proof(leaves, index)),
            block.results[index],
            tuple(merkle.inclusion_proof(results, index)),
        )

    def verify(self, tx_bytes: bytes, chain_id: str, validators: Sequence[PeerId]) -> bool:
        """Whether this proves ``tx_bytes`` final under a quorum of ``validators``."""
        return certifies_header(
            self.header, self.certificate, chain_id, validators
        ) and self.includes(tx_bytes)

    def includes(self, tx_bytes: bytes) -> bool:
        """Whether ``tx_bytes`` and the result are in this header's roots
        (the header itself is vouched for by its certificate, or by a later
        trusted header it is an ancestor of: :class:`HeaderChain`)."""
        header = self.header
        # The size must be the header's count: RFC 6962 paths alone verify for
        # several (index, size) pairs, and a prover could otherwise misplace
        # the transaction (block module docstring).
        return (
            self.size == header.tx_count
            and merkle.verify_inclusion(
                tx_bytes, self.index, self.size, self.tx_path, header.tx_root
            )
            and merkle.verify_inclusion(
                self.result.encode(), self.index, self.size, self.result_path, header.results_root
            )
        )

    def as_list(self) -> list[object]:
        return [
            self.header.as_list(),
            encode_certificate(self.certificate),
            self.index,
            self.size,
            list(self.tx_path),
            [self.result.status, self.result.reason],
            list(self.result_path),
        ]

    @classmethod
    def from_list(cls, value: object) -> CommitProof:
        if type(value) is not list or len(value) != 7:
            raise MalformedMessage("a commit proof is an array of 7 fields")
        raw_header, raw_cert, index, size, tx_path, raw_result, result_path = value
        header = decode_header(raw_header)
        if not (_is_u63(index) and _is_u63(size)) or index >= size:
            raise MalformedMessage("index and size are integers with index < size")
        return cls(
            header,
            decode_certificate(raw_cert, header.height, header.certified_digest),
            index,
            size,
            _path(tx_path),
            decode_result(raw_result),
            _path(result_path),
        )


def _encode_state_proof(proof: StateProof) -> list[object]:
    return [
        proof.buckets,
        proof.top_root,
        list(proof.top_path),
        list(proof.bucket_hashes),
        [[leaf.index, leaf.key, leaf.value] for leaf in proof.leaves],
    ]


def _decode_state_proof(value: object) -> StateProof:
    if type(value) is not list or len(value) != 5:
        raise MalformedMessage("a state proof is an array of 5 fields")
    buckets, top_root, top_path, bucket_hashes, raw_leaves = value
    if not (_is_u63(buckets) and _is_hash(top_root)):
        raise MalformedMessage("a state proof's bucket count is an integer and its root 32 bytes")
    if (
        type(bucket_hashes) is not list
        or len(bucket_hashes) > MAX_PROOF_BUCKET
        or not all(map(_is_hash, bucket_hashes))
    ):
        raise MalformedMessage(f"a bucket is a list of up to {MAX_PROOF_BUCKET} hashes")
    if type(raw_leaves) is not list or len(raw_leaves) > 2:
        raise MalformedMessage("a state proof has at most two leaves")
    leaves = []
    for leaf in raw_leaves:
        if (
            type(leaf) is not list
            or len(leaf) != 3
            or not _is_u63(leaf[0])
            or not _is_key(leaf[1])
            or type(leaf[2]) is not bytes
        ):
            raise MalformedMessage("a proof leaf is [index, key, value]")
        leaves.append(ProofLeaf(leaf[0], leaf[1], leaf[2]))
    return StateProof(buckets, top_root, _top_path(top_path), tuple(bucket_hashes), tuple(leaves))


class QueryAnswer(NamedTuple):
    """``key`` holds ``value`` (None: absent) in the state after the block
    with ``header``, proved against its state root."""

    key: str
    value: object
    header: BlockHeader
    certificate: CommitCertificate
    proof: StateProof

    @property
    def height(self) -> int:
        return self.header.height

    def verify(self, chain_id: str, validators: Sequence[PeerId]) -> bool:
        return certifies_header(
            self.header, self.certificate, chain_id, validators
        ) and verify_state_proof(self.key, self.value, self.proof, self.header.state_root)

    def as_list(self, encoded_value: bytes | None) -> list[object]:
        """``encoded_value`` is the state's own encoding of the value (nil if absent)."""
        return [
            self.key,
            encoded_value,
            self.header.as_list(),
            encode_certificate(self.certificate),
            _encode_state_proof(self.proof),
        ]

    @classmethod
    def from_list(cls, value: object) -> QueryAnswer:
        if type(value) is not list or len(value) != 5:
            raise MalformedMessage("a query answer is an array of 5 fields")
        key, encoded, raw_header, raw_cert, raw_proof = value
        if not _is_key(key):
            raise MalformedMessage(f"a key is a non-empty string of up to {MAX_KEY_BYTES} bytes")
        if encoded is not None and type(encoded) is not bytes:
            raise MalformedMessage("a value is its encoding or nil")
        header = decode_header(raw_header)
        return cls(
            key,
            None if encoded is None else decode_value(encoded),
            header,
            decode_certificate(raw_cert, header.height, header.certified_digest),
            _decode_state_proof(raw_proof),
        )


class HeaderChain(NamedTuple):
    """The headers of consecutive heights, lowest first, and the commit
    certificate of the last one (None if the node sent none)."""

    headers: tuple[BlockHeader, ...]
    certificate: CommitCertificate | None

    @property
    def top(self) -> BlockHeader:
        return self.headers[-1]

    def linked(self) -> bool:
        """Whether each header's ``prev_hash`` is the hash of the one below."""
        return all(
            upper.prev_hash == lower.hash for lower, upper in itertools.pairwise(self.headers)
        )

    def as_fields(self) -> list[object]:
        """``[[header, ...], votes or nil]``, the reply's last two fields."""
        votes = None if self.certificate is None else encode_certificate(self.certificate)
        return [[h.as_list() for h in self.headers], votes]

    @classmethod
    def from_fields(cls, raw_headers: object, raw_votes: object) -> HeaderChain:
        """Strictly decode a HEADER_CHAIN reply's fields (shape, types and
        consecutive heights); whether they link and are certified is for
        :meth:`linked` and the client's trusted set."""
        if type(raw_headers) is not list or not 1 <= len(raw_headers) <= MAX_HEADERS:
            raise MalformedMessage(f"a header chain has 1 to {MAX_HEADERS} headers")
        headers = tuple(decode_header(h) for h in raw_headers)
        if any(b.height != a.height + 1 for a, b in itertools.pairwise(headers)):
            raise MalformedMessage("a header chain's heights are consecutive")
        top = headers[-1]
        certificate = (
            None
            if raw_votes is None
            else decode_certificate(raw_votes, top.height, top.certified_digest)
        )
        return cls(headers, certificate)


def encode_client_message(*fields: object) -> bytes:
    return pack_body(list(fields))


def _request_id(fields: list) -> int:
    if len(fields) < 2 or not _is_u63(fields[1]):
        raise MalformedMessage("a client request carries a request id")
    return fields[1]


def _tx_list(value: object, max_txs: int) -> list[bytes]:
    if type(value) is not list or len(value) > max_txs or any(type(t) is not bytes for t in value):
        raise MalformedMessage(f"transactions are a list of up to {max_txs} byte strings")
    return value


_SHAPES: dict[int, int] = {
    ClientOp.SUBMIT: 3,
    ClientOp.SUBMITTED: 3,
    ClientOp.WAIT: 4,
    ClientOp.COMMIT: 3,
    ClientOp.QUERY: 3,
    ClientOp.ANSWER: 3,
    ClientOp.SUBSCRIBE: 2,
    ClientOp.BLOCK: 4,
    ClientOp.FORWARD: 2,
    ClientOp.ERROR: 3,
    ClientOp.EPOCHS: 3,
    ClientOp.EPOCH_PROOFS: 3,
    ClientOp.HEADERS: 4,
    ClientOp.HEADER_CHAIN: 4,
}


def decode_client_message(body: bytes, *, max_txs: int = 10_000) -> list:
    """``[op, ...]`` with every field type-checked (nested answers are decoded
    by :meth:`CommitProof.from_list` / :meth:`QueryAnswer.from_list` when the
    client reads them); MalformedMessage otherwise."""
    fields = unpack_body(
        body, max_len=MAX_CLIENT_MESSAGE_BYTES, error=MalformedMessage, what="a client message"
    )
    if type(fields) is not list or not fields or type(fields[0]) is not int:
        raise MalformedMessage("a client message is [op, ...]")
    op = fields[0]
    if op not in _SHAPES or len(fields) != _SHAPES[op]:
        raise MalformedMessage(f"unknown client message or wrong arity (op {op})")
    if op == ClientOp.FORWARD:
        _tx_list(fields[1], max_txs)
        return fields
    _request_id(fields)
    if op == ClientOp.SUBMIT:
        _tx_list(fields[2], max_txs)
    elif op == ClientOp.WAIT:
        if not _is_hash(fields[2]) or not _is_u63(fields[3]):
            raise MalformedMessage("wait is [op, id, 32-byte digest, timeout ms]")
    elif op == ClientOp.QUERY:
        if not _is_key(fields[2]):
            raise MalformedMessage(
                f"query is [op, id, key]: a non-empty key of up to {MAX_KEY_BYTES} bytes"
            )
    elif op == ClientOp.SUBMITTED:
        statuses = fields[2]
        if type(statuses) is not list or any(
            type(s) is not list
            or len(s) != 2
            or type(s[0]) is not int
            or type(s[1]) is not _STATUS_PAYLOAD.get(s[0])
            for s in statuses
        ):
            raise MalformedMessage("submit statuses are [status, digest or reason]")
    elif op == ClientOp.BLOCK:
        if (
            not _is_u63(fields[2])
            or type(fields[3]) is not list
            or not all(map(_is_hash, fields[3]))
        ):
            raise MalformedMessage("a block notice is [op, id, height, [digest, ...]]")
    elif op == ClientOp.ERROR and type(fields[2]) is not str:
        raise MalformedMessage("an error carries a reason")
    elif op == ClientOp.EPOCHS and not _is_u63(fields[2]):
        raise MalformedMessage("epochs is [op, id, epoch]")
    elif op == ClientOp.EPOCH_PROOFS and (
        type(fields[2]) is not list
        or len(fields[2]) > MAX_EPOCH_ANSWERS
        or any(type(a) is not list for a in fields[2])
    ):
        raise MalformedMessage(f"epoch proofs are a list of up to {MAX_EPOCH_ANSWERS} answers")
    elif op == ClientOp.HEADERS and not (
        _is_u63(fields[2]) and _is_u63(fields[3]) and 1 <= fields[2] <= fields[3]
    ):
        raise MalformedMessage("headers is [op, id, low, high] with 1 <= low <= high")
    elif op == ClientOp.HEADER_CHAIN and (
        type(fields[2]) is not list
        or len(fields[2]) > MAX_HEADERS
        or (fields[3] is not None and type(fields[3]) is not list)
    ):
        raise MalformedMessage("a header chain is [op, id, [header, ...], votes or nil]")
    return fields
