"""A ledger client that trusts no node: every answer is checked.

:class:`LedgerClient` talks to one node on the CLIENT channel, its server
(over TCP in practice: any :class:`~fedchain.p2p.node.Node` transport
works), or to another named per request, and checks each commit proof and
query answer against the validator set it trusts (:class:`TrustedValidators`),
so a lying node can only fail to answer, never make the client believe
something false (:class:`UntrustedAnswer`). :meth:`LedgerClient.commit`
is PBFT's client: a transaction not final in time goes to the other
validators too, so neither a primary that censors it nor a crashed server
keeps it out.

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

import contextlib
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
    """Requests to ``server`` (or, per request, ``to`` another node) from
    ``node``, each answered only by the node asked; answers verified
    against the ``validators`` of ``chain_id`` in validator ``epoch`` it
    starts from (0: the genesis set), following set changes on chain by
    proof (see the module docstring). Build it before the node's first
    ``await`` (it registers the CLIENT handler)."""

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
        self._pending: dict[int, tuple[PeerId, trio.Event, list]] = {}
        self._streams: dict[int, trio.MemorySendChannel] = {}
        node.register(MessageType.CLIENT, self._on_reply)

    def _on_reply(self, peer: PeerId, envelope: Envelope) -> None:
        fields = decode_client_message(envelope.body)
        op = fields[0]
        if op not in _REPLIES:  # a request sent to a client: nothing to answer
            self.node.counters["client.unexpected"] += 1
            return
        request = fields[1]
        if op == ClientOp.BLOCK and request in self._streams:
            if peer != self.server:
                self.node.counters["client.not_from_server"] += 1
                return
            try:
                self._streams[request].send_nowait((fields[2], fields[3]))
            except trio.WouldBlock:
                self.node.counters["client.notice_dropped"] += 1
            return
        waiting = self._pending.get(request)
        if waiting is None:
            self.node.counters["client.unexpected"] += 1
            return
        asked, event, slot = waiting
        if peer != asked:  # only the node asked answers a request
            self.node.counters["client.not_from_server"] += 1
            return
        del self._pending[request]
        slot.append(fields)
        event.set()

    async def _request(
        self, timeout: float, op: ClientOp, *fields: object, to: PeerId | None = None
    ) -> list:
        """Send one request to ``to`` (default: the server) and await its
        reply; trio.TooSlowError after ``timeout``, NodeError on ERROR."""
        peer = self.server if to is None else to
        request = next(self._ids)
        event, slot = trio.Event(), []
        self._pending[request] = (peer, event, slot)
        try:
            self.node.send(peer, MessageType.CLIENT, encode_client_message(op, request, *fields))
            with trio.fail_after(timeout):
                await event.wait()
        finally:
            self._pending.pop(request, None)
        reply = slot[0]
        if reply[0] == ClientOp.ERROR:
            raise NodeError(reply[2])
        return reply

    async def submit_many(
        self, txs: Sequence[bytes], *, timeout: float = 10.0, to: PeerId | None = None
    ) -> list[tuple[SubmitStatus, bytes | str]]:
        """Per transaction: ACCEPTED/DUPLICATE with the digest, BUSY/REFUSED
        with why. ``to``: another validator than the server."""
        reply = await self._request(timeout, ClientOp.SUBMIT, list(txs), to=to)
        if reply[0] != ClientOp.SUBMITTED or len(reply[2]) != len(txs):
            raise MalformedMessage("the node answered a submission with something else")
        return [(SubmitStatus(status), detail) for status, detail in reply[2]]

    async def submit(self, tx: bytes, *, timeout: float = 10.0, to: PeerId | None = None) -> bytes:
        """The transaction's digest once the node admitted it. MempoolFull
        when the node is busy (retry later), SubmitRefused otherwise."""
        ((status, detail),) = await self.submit_many([tx], timeout=timeout, to=to)
        if status == SubmitStatus.BUSY:
            raise MempoolFull(str(detail))
        if status == SubmitStatus.REFUSED:
            raise SubmitRefused(str(detail))
        return detail  # type: ignore[return-value]

    async def wait_committed(
        self, tx: bytes, *, timeout: float = 30.0, to: PeerId | None = None
    ) -> CommitProof:
        """Wait until ``tx`` is final; its checked commit proof.
        trio.TooSlowError if it is not final within ``timeout``.
        ``to``: ask another validator than the server."""
        digest = decode_transaction(tx).digest
        server_ms = int(timeout * 1000) if math.isfinite(timeout) else 2**62
        reply = await self._request(timeout + 5.0, ClientOp.WAIT, digest, server_ms, to=to)
        if reply[0] != ClientOp.COMMIT:
            raise MalformedMessage("the node answered a wait with something else")
        if reply[2] is None:
            raise trio.TooSlowError
        proof = CommitProof.from_list(reply[2])
        if not self.trusted.verifies_commit(proof, tx):
            await self.follow_validator_changes(timeout=timeout, to=to)
            if not self.trusted.verifies_commit(proof, tx) and not (
                proof.includes(tx)
                and await self.is_trusted_ancestor(proof.header, timeout=timeout, to=to)
            ):
                raise UntrustedAnswer("the commit proof does not verify")
        return proof

    async def commit(
        self,
        tx: bytes,
        *,
        timeout: float = 30.0,
        patience: float = 5.0,
        fallbacks: Sequence[PeerId] = (),
    ) -> CommitProof:
        """Submit ``tx`` to the server and wait until it is final: its
        checked commit proof, as :meth:`submit` then :meth:`wait_committed`,
        but with PBFT's client retransmission. Where it is not final after
        ``patience`` seconds (or the server answers busy, or stops
        answering), the transaction also goes to every validator in
        ``fallbacks``, again after twice as long, and so on, and each is
        asked for the proof: the first that verifies is the answer.

        Why: a transaction only the primary holds can be censored by it
        for good (no backup's request timer watches what no backup holds,
        P-CENSORSHIP in the consensus SPEC); once the backups hold it their
        timers replace such a primary, and a server that crashed is simply
        bypassed. Validators drop the copies (by digest), and the commit
        proof is checked whoever sends it.

        SubmitRefused if the server refuses the transaction itself (a bad
        signature, a used nonce); trio.TooSlowError if nothing final comes
        within ``timeout``, or the UntrustedAnswer that some node gave;
        MalformedMessage at once for bytes that are not a transaction."""
        if not (timeout > 0 and patience > 0):
            raise ValueError("timeout and patience are positive seconds")
        decode_transaction(tx)  # malformed bytes fail here, not at each node
        others = [peer for peer in dict.fromkeys(fallbacks) if peer != self.server]
        found: list[CommitProof] = []
        lies: list[Exception] = []
        waiting: set[PeerId] = set()
        deadline = trio.current_time() + timeout
        try:  # here, not in the nursery: a refusal raises as itself
            await self.submit(tx, timeout=min(patience, timeout) if others else timeout)
            submitted = True
        except (MempoolFull, trio.TooSlowError):
            if not others:
                raise
            submitted = False
        async with trio.open_nursery() as nursery:
            nursery.cancel_scope.deadline = deadline

            async def wait_at(peer: PeerId) -> None:
                waiting.add(peer)
                try:
                    proof = await self.wait_committed(
                        tx, timeout=max(0.0, deadline - trio.current_time()), to=peer
                    )
                except (UntrustedAnswer, MalformedMessage) as exc:
                    lies.append(exc)
                    return
                except (trio.TooSlowError, NodeError):
                    return  # another may still answer
                found.append(proof)
                nursery.cancel_scope.cancel()

            async def hand_over(peer: PeerId) -> None:
                # Whatever the answer (busy, refused as already committed,
                # or nonsense), the peer may still prove the commit.
                with contextlib.suppress(ConsensusError, MalformedMessage, trio.TooSlowError):
                    await self.submit(tx, timeout=min(patience, 10.0), to=peer)
                if peer not in waiting:
                    await wait_at(peer)

            async def retransmit(wait: float) -> None:
                while True:
                    await trio.sleep(wait)
                    for peer in others:
                        nursery.start_soon(hand_over, peer)
                    wait = max(2 * wait, patience)

            if submitted:
                nursery.start_soon(wait_at, self.server)
                if others:
                    nursery.start_soon(retransmit, patience)
            else:  # busy or silent: the others at once
                nursery.start_soon(retransmit, 0.0)
        if found:
            return found[0]
        if lies:
            raise lies[0]
        raise trio.TooSlowError

    async def is_trusted_ancestor(
        self, header: BlockHeader, *, timeout: float = 10.0, to: PeerId | None = None
    ) -> bool:
        """Whether ``header`` is on the chain below the first block the
        oldest trusted set certifies (the module docstring's backward walk).
        False where there is nothing to walk back from (a client that
        started from the genesis set checks every height directly) or the
        node knows no such block; UntrustedAnswer if the node's headers do
        not link or are not certified."""
        anchor = await self._first_height_of_oldest_epoch(timeout, to)
        if anchor is None or header.height >= anchor:
            return False
        high, expected = anchor, None
        while True:
            reply = await self._request(timeout, ClientOp.HEADERS, header.height, high, to=to)
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

    async def _first_height_of_oldest_epoch(
        self, timeout: float, to: PeerId | None = None
    ) -> int | None:
        """Where the oldest trusted epoch begins, by the node's word (the
        change block to it, plus one); None for epoch 0 or if the node does
        not say. Only a hint: the walk checks the certificate it leads to."""
        epoch = self.trusted.oldest_epoch
        if epoch == 0:
            return None
        reply = await self._request(timeout, ClientOp.EPOCHS, epoch - 1, to=to)
        if reply[0] != ClientOp.EPOCH_PROOFS:
            raise MalformedMessage("the node answered epochs with something else")
        if not reply[2]:
            return None
        return QueryAnswer.from_list(reply[2][0]).height + 1

    async def query(
        self, key: str, *, timeout: float = 10.0, to: PeerId | None = None
    ) -> QueryAnswer:
        """``key``'s value in the node's last committed state, checked.
        ValueError at once for a key no state holds (the node would drop it).
        ``to``: ask another validator than the server."""
        check_key(key)
        reply = await self._request(timeout, ClientOp.QUERY, key, to=to)
        if reply[0] != ClientOp.ANSWER:
            raise MalformedMessage("the node answered a query with something else")
        answer = QueryAnswer.from_list(reply[2])
        if answer.key != key:
            raise UntrustedAnswer("the query answer is about another key")
        if not self.trusted.verifies_answer(answer):
            await self.follow_validator_changes(timeout=timeout, to=to)
            if not self.trusted.verifies_answer(answer):
                raise UntrustedAnswer("the query answer does not verify")
        return answer

    async def follow_validator_changes(
        self, *, timeout: float = 10.0, to: PeerId | None = None
    ) -> int:
        """Move the trusted set forward through every change the node
        proves (checked one epoch at a time); the epoch trusted now.
        UntrustedAnswer if a proof fails (the epochs before it stay)."""
        while True:
            reply = await self._request(timeout, ClientOp.EPOCHS, self.trusted.epoch, to=to)
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
