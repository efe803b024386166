"""Byzantine validators' parts: a transport that sends honest traffic plus
signed garbage, and a primary's mempool that censors one client.

``HostileTransport`` wraps a node's transport. Everything the node sends goes
out re-signed under the wrapper's own sequence numbers (so receivers accept
the honest frames and the extra ones alike), and after each PBFT message it
sends the same peer a few mutants of what it has seen: fields changed one
at a time (views and sequence numbers off by one or far ahead, digests and
payloads from other messages, a mangled block, proofs dropped, repeated or
borrowed), then signed with the validator's real key. A byzantine
validator can sign anything, so these pass every signature check and reach
the logic behind it; they test what a node does with well-signed nonsense.
"""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict
from collections.abc import Callable

import msgpack

from fedchain.consensus import pbft_messages as pm
from fedchain.consensus.mempool import Mempool
from fedchain.p2p.identity import Identity
from fedchain.p2p.transport import Transport
from fedchain.p2p.wire import MessageType, decode, sign


class CensoringMempool(Mempool):
    """A primary's pool that never proposes one client's transactions (it
    admits and holds them, and proposes everyone else's)."""

    def __init__(self, *args, censored: bytes, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.censored = censored

    def reap(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return [tx for tx in super().reap(*args, **kwargs) if tx.sender != self.censored]


_SIGNED = (pm.PrePrepare, pm.Prepare, pm.Checkpoint, pm.ViewChange, pm.NewView)


class HostileTransport:
    def __init__(
        self,
        inner: Transport,
        identity: Identity,
        chain_id: str | Callable[[], str],
        rng: random.Random,
    ) -> None:
        """``chain_id``: what PBFT messages are signed under, or a function
        giving it now (a validator epoch has its own)."""
        self.inner = inner
        self.identity = identity
        self._chain_id = chain_id
        self.rng = rng
        self.seq = 0
        self.sent = 0
        """Mutants sent."""
        self.seen: dict[str, list] = defaultdict(list)
        """Parts of messages seen, to borrow from: digests, payloads, proofs."""

    @property
    def chain_id(self) -> str:
        chain_id = self._chain_id
        return chain_id if isinstance(chain_id, str) else chain_id()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def send_nowait(self, peer: bytes, frame: bytes) -> bool:
        envelope = decode(frame)
        ok = self._send(peer, envelope.type, envelope.body)
        if envelope.type == MessageType.CONSENSUS:
            message = pm.decode_message(envelope.body)
            self._remember(message)
            for _ in range(self.rng.randint(1, 3)):
                mutant = self._mutate(message, depth=0)
                self._send(peer, MessageType.CONSENSUS, pm.encode_message(mutant))
                self.sent += 1
        return ok

    def _send(self, peer: bytes, msg_type: int, body: bytes) -> bool:
        self.seq += 1
        return self.inner.send_nowait(peer, sign(self.identity, msg_type, self.seq, body).frame)

    def _remember(self, message: pm.Message) -> None:
        seen = self.seen
        if isinstance(message, pm.PrePrepare):
            seen["payload"].append(message.payload)
            seen["digest"].append(message.digest)
            seen["pre_prepares"].append(message)
        elif isinstance(message, pm.ViewChange):
            seen["view_changes"].append(message)
            seen["checkpoint_proof"].extend(message.checkpoint_proof)
            seen["prepared"].extend(message.prepared)
        elif isinstance(message, pm.Checkpoint):
            seen["checkpoint_proof"].append(message)
            seen["digest"].append(message.state)
        for parts in seen.values():
            del parts[:-100]

    def _mutate(self, message, depth: int):
        rng = self.rng
        names = [
            f.name
            for f in dataclasses.fields(message)
            if f.name not in ("replica", "signature", "vote")
        ]
        changes = {}
        for name in rng.sample(names, k=rng.randint(1, len(names))):
            value = getattr(message, name)
            if isinstance(value, int):
                changes[name] = rng.choice(
                    [value + 1, max(0, value - 1), 0, value + 32, value + 33, 2**63 - 1]
                )
            elif name == "payload":
                changes[name] = self._mangled(value)
            elif isinstance(value, bytes):
                changes[name] = rng.choice([*self.seen["digest"], bytes(32), rng.randbytes(32)])
            elif isinstance(value, tuple):
                changes[name] = self._mutated_items(list(value), name, depth)
        mutant = dataclasses.replace(message, **changes)
        if isinstance(mutant, pm.Commit):
            return pm.Commit.create(
                self.identity, self.chain_id, mutant.view, mutant.seq, mutant.digest
            )
        if depth > 0 and rng.random() < 0.5:
            return mutant  # a nested message keeps its signer (and so a bad signature)
        mutant = dataclasses.replace(mutant, replica=self.identity.public_key)
        return dataclasses.replace(
            mutant, signature=self.identity.sign(mutant.signed_part(self.chain_id))
        )

    def _mangled(self, payload: bytes) -> bytes:
        """Another payload, or this block with one field of its structure
        replaced by a value of another type or size."""
        rng = self.rng
        if rng.random() < 0.3 and self.seen["payload"]:
            return rng.choice(self.seen["payload"])
        try:
            tree = msgpack.unpackb(payload, raw=False)
        except ValueError:
            return payload[: rng.randrange(len(payload) + 1)]
        node = tree
        while isinstance(node, list) and node:
            index = rng.randrange(len(node))
            if not isinstance(node[index], list) or rng.random() < 0.3:
                node[index] = rng.choice([None, -1, 2**63, "", b"", bytes(32), [], [0]])
                break
            node = node[index]
        return msgpack.packb(tree, use_bin_type=True)

    def _mutated_items(self, items: list, name: str, depth: int) -> tuple:
        rng = self.rng
        borrowed = self.seen.get(name, [])
        choice = rng.random()
        if choice < 0.25 and items:
            items.pop(rng.randrange(len(items)))
        elif choice < 0.5 and items:
            items.append(rng.choice(items))
        elif choice < 0.75 and borrowed:
            items.append(rng.choice(borrowed))
        elif items and depth < 2:
            index = rng.randrange(len(items))
            item = items[index]
            if isinstance(item, pm.PreparedProof):
                pre_prepare = self._mutate(item.pre_prepare, depth + 1)
                items[index] = pm.PreparedProof(pre_prepare, item.prepares)
            elif isinstance(item, _SIGNED):
                items[index] = self._mutate(item, depth + 1)
        return tuple(items)
