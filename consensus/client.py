"""A ledger client that trusts no node: every answer is checked.

:class:`LedgerClient` talks to one node on the CLIENT channel (over TCP in
practice: any :class:`~fedchain.p2p.node.Node` transport works) and checks
each commit proof and query answer against the validator set it trusts
(:class:`TrustedValidators`), so a lying node can only fail to answer,
never make the client believe something false (:class:`UntrustedAnswer`).

The trusted set starts as the one the client was given (the genesis set)
and moves forward only by proof, as CometBFT's light client verifies
sequentially: a change of set is a committed transaction, so the state
after its block holds the new ``sys/validators`` and that block is
certified by the old set. The node hands out those proofs (``EPOCHS``);
the client checks each against the set it trusts, then trusts the next.
An answer that does not verify makes the client follow first and check
again, so a client built with the genesis set keeps working across any
number of changes.

A client built with a later set (``epoch=e``) can still check a commit
proof from before epoch ``e``, whose certificate is by a set it never
trusted: it walks back, as CometBFT's light client verifies backwards. The
first block of epoch ``e`` is certified by the set it trusts; each header's
``prev_hash`` names its parent, so the headers from the proof's height up
to that block (``HEADERS``, a page at a time from the top down) make the
proof's header an ancestor of a trusted one. Where epoch ``e`` starts is
only a hint from the node (its ``EPOCHS`` answer); a wrong hint fails the
certificate check like any other lie.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Sequence

import trio

from fedchain.p2p.identity import PeerId
from fedchain.p2p.node import Node
from fedchain.p2p.wire import Envelope, MessageType

from .block import BlockHeader
from .client_api import (
    MAX_EPOCH_ANSWERS,
    ClientOp,
    CommitProof,
    HeaderChain,
    QueryAnswer,
    SubmitStatus,
    certifies_header,
    decode_client_message,
    encode_client_message,
)
from .contracts import VALIDATORS_KEY, epoch_chain_id
from .errors import ConsensusError, MalformedMessage, MempoolFull
from .state import check_key
from .tx import decode_transaction

__all__ = ["LedgerClient", "NodeError", "SubmitRefused", "TrustedValidators", "UntrustedAnswer"]


_REPLIES = frozenset(
    {
        ClientOp.SUBMITTED,
        ClientOp.COMMIT,
        ClientOp.ANSWER,
        ClientOp.BLOCK,
        ClientOp.ERROR,
        ClientOp.EPOCH_PROOFS,
        ClientOp.HEADER_CHAIN,
    }
)
MAX_NULL_ANCHORS = 16
"""How many null blocks in a row a backward walk steps over to find a
certified header (a null block's certificate binds no header)."""


class UntrustedAnswer(ConsensusError):
    """A node's answer does not verify against the trusted validator set."""

    reason = "untrusted_answer"


class SubmitRefused(ConsensusError):
    """The node refused the transaction (``detail`` says why)."""

    reason = "refused"


class NodeError(ConsensusError):
    """The node answered ERROR (busy waiters, nothing committed yet, ...)."""

    reason = "node_error"


class TrustedValidators:
    """The validator sets a client trusts: ``validators`` of ``chain_id`` in
    validator ``epoch`` (0: the genesis set) from the start, and each later
    epoch's set from the height it began, added only by :meth:`advance`
    with a proof certified by the set trusted before it.

    A proof is checked against the set of the epoch its height falls in,
    so a proof from before a change still verifies after the client moved
    on, and the retired set's keys certify nothing above its last height
    (they could otherwise be used, leaked or sold, to forge later blocks)."""

    def __init__(self, chain_id: str, validators: Sequence[PeerId], epoch: int = 0) -> None:
        self.chain = chain_id
        self._epochs: list[tuple[int, int, tuple[PeerId, ...]]] = [(epoch, 0, tuple(validators))]
        """(epoch, first height it certifies, set), oldest first."""

    @property
    def epoch(self) -> int:
        """The newest epoch trusted."""
        return self._epochs[-1][0]

    @property
    def validators(self) -> tuple[PeerId, ...]:
        """The newest set trusted."""
        return self._epochs[-1][2]

    @property
    def chain_id(self) -> str:
        """What the newest set's commit votes sign (its epoch's chain id)."""
        return epoch_chain_id(self.chain, self.epoch)

    def _set_at(self, height: int) -> tuple[str, tuple[PeerId, ...]]:
        for epoch, first, validators in reversed(self._epochs):
            if height >= first:
                return epoch_chain_id(self.chain, epoch), validators
        raise AssertionError("the first epoch starts at height 0")

    def verifies_commit(self, proof: CommitProof, tx: bytes) -> bool:
        return proof.verify(tx, *self._set_at(proof.height))

    def verifies_answer(self, answer: QueryAnswer) -> bool:
        return answer.verify(*self._set_at(answer.height))

    def certifies(self, chain: HeaderChain) -> bool:
        """Whether the trusted set of its height's epoch certifies ``chain``'s
        top header (never a null block's: ``client_api.certifies_header``)."""
        top = chain.top
        return chain.certificate is not None and certifies_header(
            top, chain.certificate, *self._set_at(top.height)
        )

    @property
    def oldest_epoch(self) -> int:
        """The epoch the client started from: below its first height, only a
        backward walk vouches for a header."""
        return self._epochs[0][0]

    def advance(self, answer: QueryAnswer) -> None:
        """Trust the next epoch's set, proved by ``answer``: ``sys/validators``
        = [epoch + 1, sorted keys] after a block the newest set certified
        (at or above the height it began). UntrustedAnswer, and nothing
        changed, if any of that fails."""
        value = answer.value
        epoch, first, validators = self._epochs[-1]
        if (
            answer.key != VALIDATORS_KEY
            or answer.height < first
            or not answer.verify(epoch_chain_id(self.chain, epoch), validators)
        ):
            raise UntrustedAnswer("the validator-change proof does not verify")
        if (
            type(value) is not list
            or len(value) != 2
            or value[0] != epoch + 1
            or type(value[1]) is not list
            or not value[1]
            or any(type(k) is not bytes or len(k) != 32 for k in value[1])
            or value[1] != sorted(set(value[1]))
        ):
            raise UntrustedAnswer(f"the proof is not a change to epoch {epoch + 1}")
        # The change block is the old set's last; the new set certifies the next.
        self._epochs.append((epoch + 1, answer.height + 1, tuple(value[1])))


class LedgerClient:
    """Requests to ``server`` from ``node``; answers verified against the
    ``validators`` of ``chain_id`` in validator ``epoch`` it starts from
    (0: the genesis set), following set changes on chain by proof (see the
    module docstring). Build it before the node's first ``await`` (it
    registers the CLIENT handler)."""

    def __init__(
        self,
        node: Node,
        server: PeerId,
        chain_id: str,
        validators: Sequence[PeerId],
        *,
        epoch: int = 0,
    ) -> None:
        self.node = node
        self.server = server
        self.trusted = TrustedValidators(chain_id, validators, epoch)
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[trio.Event, list]] = {}
        self._streams: dict[int, trio.MemorySendChannel] = {}
        node.register(MessageType.CLIENT, self._on_reply)

    def _on_reply(self, peer: PeerId, envelope: Envelope) -> None:
        if peer != self.server:
            self.node.counters["client.not_from_server"] += 1
            return
        fields = decode_client_message(envelope.body)
        op = fields[0]
        if op not in _REPLIES:  # a request sent to a client: nothing to answer
            self.node.counters["client.unexpected"] += 1
            return
        request = fields[1]
        if op == ClientOp.BLOCK and request in self._streams:
            try:
                self._streams[request].send_nowait((fields[2], fields[3]))
            except trio.WouldBlock:
                self.node.counters["client.notice_dropped"] += 1
            return
        waiting = self._pending.pop(request, None)
        if waiting is None:
            self.node.counters["client.unexpected"] += 1
            return
        event, slot = waiting
        slot.append(fields)
        event.set()

    async def _request(self, timeout: float, op: ClientOp, *fields: object) -> list:
        request = next(self._ids)
        event, slot = trio.Event(), []
        self._pending[request] = (event, slot)
        try:
            self.node.send(
                self.server, MessageType.CLIENT, encode_client_message(op, request, *fields)
            )
            with trio.fail_after(timeout):
                await event.wait()
        finally:
            self._pending.pop(request, None)
        reply = slot[0]
        if reply[0] == ClientOp.ERROR:
            raise NodeError(reply[2])
        return reply

    async def submit_many(
        self, txs: Sequence[bytes], *, timeout: float = 10.0
    ) -> list[tuple[SubmitStatus, bytes | str]]:
        """Per transaction: ACCEPTED/DUPLICATE with the digest, BUSY/REFUSED with why."""
        reply = await self._request(timeout, ClientOp.SUBMIT, list(txs))
        if reply[0] != ClientOp.SUBMITTED or len(reply[2]) != len(txs):
            raise MalformedMessage("the node answered a submission with something else")
        return [(SubmitStatus(status), detail) for status, detail in reply[2]]

    async def submit(self, tx: bytes, *, timeout: float = 10.0) -> bytes:
        """The transaction's digest once the node admitted it. MempoolFull
        when the node is busy (retry later), SubmitRefused otherwise."""
        ((status, detail),) = await self.submit_many([tx], timeout=timeout)
        if status == SubmitStatus.BUSY:
            raise MempoolFull(str(detail))
        if status == SubmitStatus.REFUSED:
            raise SubmitRefused(str(detail))
        return detail  # type: ignore[return-value]

    async def wait_committed(self, tx: bytes, *, timeout: float = 30.0) -> CommitProof:
        """Wait until ``tx`` is final; its checked commit proof.
        trio.TooSlowError if it is not final within ``timeout``."""
        digest = decode_transaction(tx).digest
        server_ms = int(timeout * 1000) if math.isfinite(timeout) else 2**62
        reply = await self._request(timeout + 5.0, ClientOp.WAIT, digest, server_ms)
        if reply[0] != ClientOp.COMMIT:
            raise MalformedMessage("the node answered a wait with something else")
        if reply[2] is None:
            raise trio.TooSlowError
        proof = CommitProof.from_list(reply[2])
        if not self.trusted.verifies_commit(proof, tx):
            await self.follow_validator_changes(timeout=timeout)
            if not self.trusted.verifies_commit(proof, tx) and not (
                proof.includes(tx) and await self.is_trusted_ancestor(proof.header, timeout=timeout)
            ):
                raise UntrustedAnswer("the commit proof does not verify")
        return proof

    async def is_trusted_ancestor(self, header: BlockHeader, *, timeout: float = 10.0) -> bool:
        """Whether ``header`` is on the chain below the first block the
        oldest trusted set certifies (the module docstring's backward walk).
        False where there is nothing to walk back from (a client that
        started from the genesis set checks every height directly) or the
        node knows no such block; UntrustedAnswer if the node's headers do
        not link or are not certified."""
        anchor = await self._first_height_of_oldest_epoch(timeout)
        if anchor is None or header.height >= anchor:
            return False
        high, expected = anchor, None
        while True:
            reply = await self._request(timeout, ClientOp.HEADERS, header.height, high)
            if reply[0] != ClientOp.HEADER_CHAIN:
                raise MalformedMessage("the node answered headers with something else")
            chain = HeaderChain.from_fields(reply[2], reply[3])
            lowest, top = chain.headers[0], chain.top
            if top.height != high or lowest.height < header.height or not chain.linked():
                raise UntrustedAnswer("the node's headers do not link")
            if expected is None:
                if top.is_null and high < anchor + MAX_NULL_ANCHORS:
                    high += 1  # a null block anchors nothing: try the block above it
                    continue
                if not self.trusted.certifies(chain):
                    raise UntrustedAnswer("the trusted set does not certify the walk's start")
            elif top.hash != expected:
                raise UntrustedAnswer("the node's headers do not link")
            if lowest.height == header.height:
                return lowest == header
            expected, high = lowest.prev_hash, lowest.height - 1

    async def _first_height_of_oldest_epoch(self, timeout: float) -> int | None:
        """Where the oldest trusted epoch begins, by the node's word (the
        change block to it, plus one); None for epoch 0 or if the node does
        not say. Only a hint: the walk checks the certificate it leads to."""
        epoch = self.trusted.oldest_epoch
        if epoch == 0:
            return None
        reply = await self._request(timeout, ClientOp.EPOCHS, epoch - 1)
        if reply[0] != ClientOp.EPOCH_PROOFS:
            raise MalformedMessage("the node answered epochs with something else")
        if not reply[2]:
            return None
        return QueryAnswer.from_list(reply[2][0]).height + 1

    async def query(self, key: str, *, timeout: float = 10.0) -> QueryAnswer:
        """``key``'s value in the node's last committed state, checked.
        ValueError at once for a key no state holds (the node would drop it)."""
        check_key(key)
        reply = await self._request(timeout, ClientOp.QUERY, key)
        if reply[0] != ClientOp.ANSWER:
            raise MalformedMessage("the node answered a query with something else")
        answer = QueryAnswer.from_list(reply[2])
        if answer.key != key:
            raise UntrustedAnswer("the query answer is about another key")
        if not self.trusted.verifies_answer(answer):
            await self.follow_validator_changes(timeout=timeout)
            if not self.trusted.verifies_answer(answer):
                raise UntrustedAnswer("the query answer does not verify")
        return answer

    async def follow_validator_changes(self, *, timeout: float = 10.0) -> int:
        """Move the trusted set forward through every change the node
        proves (checked one epoch at a time); the epoch trusted now.
        UntrustedAnswer if a proof fails (the epochs before it stay)."""
        while True:
            reply = await self._request(timeout, ClientOp.EPOCHS, self.trusted.epoch)
            if reply[0] != ClientOp.EPOCH_PROOFS:
                raise MalformedMessage("the node answered epochs with something else")
            for raw in reply[2]:
                self.trusted.advance(QueryAnswer.from_list(raw))
            if len(reply[2]) < MAX_EPOCH_ANSWERS:
                return self.trusted.epoch

    async def blocks(self, *, buffer: int = 1024) -> AsyncIterator[tuple[int, list[bytes]]]:
        """(height, transaction digests) of each block the node commits from
        now on. Notices past ``buffer`` unread ones are dropped (counted):
        this is a feed for watching, not a proof (use wait_committed)."""
        request = next(self._ids)
        send, receive = trio.open_memory_channel(buffer)
        self._streams[request] = send
        try:
            self.node.send(
                self.server, MessageType.CLIENT, encode_client_message(ClientOp.SUBSCRIBE, request)
            )
            async with receive:
                async for notice in receive:
                    yield notice
        finally:
            del self._streams[request]
