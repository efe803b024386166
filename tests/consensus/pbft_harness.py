"""A deterministic simulated PBFT cluster for the tests.

Discrete events on a virtual-time heap, all randomness from one seeded numpy
Generator: per-message latency, loss, partitions, crashes, restarts from the
committed log, and Byzantine behaviours injected on a replica's outbound
messages. Every message goes through the real codec (encode at the sender,
strict decode at the receiver), so the tests exercise the wire form too.

The application is deliberately simple: a request is an 8-byte id, a payload
is the concatenation of ids, its digest is SHA-256 of the payload, and the
app keeps its committed log (that log is the replica's "store").
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedchain.consensus.errors import MalformedMessage
from fedchain.consensus.pbft import (
    GENESIS_STATE,
    Action,
    BlocksFetched,
    CancelTimer,
    Committed,
    FetchBlocks,
    PbftConfig,
    Persist,
    Receive,
    Replica,
    RequestsPending,
    Send,
    SetTimer,
    Suspect,
    TimerFired,
    advance_state,
)
from fedchain.consensus.pbft_journal import load_journal
from fedchain.consensus.pbft_messages import (
    NULL_DIGEST,
    Checkpoint,
    Commit,
    Message,
    Prepare,
    PrePrepare,
    ViewChange,
    decode_message,
    encode_message,
)
from fedchain.consensus.votes import max_faulty
from fedchain.p2p.identity import Identity

ID_BYTES = 8
CHAIN_ID = "pbft-test"


def payload_ids(payload: bytes) -> list[int]:
    return list(np.frombuffer(payload, dtype=">u8").tolist())


class LogApp:
    """The per-replica application: pending requests, live batches, committed log."""

    def __init__(self, batch_size: int, log: list[Committed] | None = None) -> None:
        self.batch_size = batch_size
        self.waiting: dict[int, None] = {}
        self.flight: dict[int, tuple[int, ...]] = {}
        self.flying: set[int] = set()
        self.log: list[Committed] = list(log or [])
        self.committed_ids: set[int] = {i for c in self.log for i in payload_ids(c.payload)}

    def submit(self, request: int) -> None:
        if request not in self.committed_ids and request not in self.flying:
            self.waiting[request] = None

    def pending(self) -> int:
        return len(self.waiting)

    def oldest_pending(self) -> int | None:
        return next(iter(self.waiting), None)

    def is_pending(self, request: object) -> bool:
        return request in self.waiting

    def propose(self, seq: int) -> tuple[bytes, bytes] | None:
        if not self.waiting:
            return None
        ids = tuple(list(self.waiting)[: self.batch_size])
        for request in ids:
            del self.waiting[request]
        self._release(seq)
        self.flight[seq] = ids
        self.flying.update(ids)
        payload = b"".join(i.to_bytes(ID_BYTES, "big") for i in ids)
        return payload, hashlib.sha256(payload).digest()

    def validate(self, seq: int, payload: bytes) -> bytes | None:
        if not payload or len(payload) % ID_BYTES:
            return None
        ids = payload_ids(payload)
        if len(set(ids)) != len(ids):
            return None
        self._release(seq)
        self.flight[seq] = tuple(ids)
        self.flying.update(ids)
        for request in ids:
            self.waiting.pop(request, None)
        return hashlib.sha256(payload).digest()

    def _release(self, seq: int) -> None:
        for request in self.flight.pop(seq, ()):
            self.flying.discard(request)
            if request not in self.committed_ids:
                self.waiting[request] = None

    def abandon(self) -> None:
        for seq in list(self.flight):
            self._release(seq)

    def commit(self, done: Committed) -> None:
        self.log.append(done)
        ids = payload_ids(done.payload)
        self.committed_ids.update(ids)
        for request in ids:
            self.waiting.pop(request, None)
        self._release(done.seq)


@dataclass
class Network:
    latency: float = 0.005
    jitter: float = 0.003
    loss: float = 0.0


@dataclass
class Node:
    replica: Replica
    app: LogApp
    epoch: int = 0
    crashed: bool = False
    suspects: Counter[str] = field(default_factory=Counter)
    journal: dict[str, bytes] = field(default_factory=dict)
    """What the replica persisted (``Persist`` actions): its disk, with the log."""


class Cluster:
    """n replicas on a simulated network, driven in virtual time.

    ``byzantine`` maps a replica index to a behaviour: ``"silent"``,
    ``"equivocate"``, ``"bad_signature"``, ``"wrong_digest"``, ``"future_view"``.
    ``durable``: replicas journal (``pbft_journal``) and a restart resumes
    from the journal as well as the committed log; False restarts them from
    the committed log alone.
    """

    def __init__(
        self,
        n: int = 4,
        *,
        seed: int = 0,
        config: PbftConfig | None = None,
        network: Network | None = None,
        byzantine: dict[int, str] | None = None,
        durable: bool = True,
    ) -> None:
        self.durable = durable
        self.rng = np.random.default_rng(seed)
        self.config = config or PbftConfig(checkpoint_interval=8, batch_size=16)
        self.network = network or Network()
        self.byzantine = dict(byzantine or {})
        self.identities = [Identity.from_rng(self.rng) for _ in range(n)]
        self.validators = [i.public_key for i in self.identities]
        self.index = {key: i for i, key in enumerate(self.validators)}
        self.f = max_faulty(n)
        self.now = 0.0
        self._heap: list[tuple[float, int, str, int, int, object]] = []
        self._counter = 0
        self.groups: list[set[int]] | None = None
        self.drop: Callable[[int, int, Message], bool] | None = None
        """A link filter: ``drop(sender, receiver, message)`` True loses it."""
        self.delivered = 0
        self.dropped: Counter[str] = Counter()
        self.submitted: list[int] = []
        self.acks: dict[int, set[int]] = {}
        self.fetches: Counter[int] = Counter()
        self._acked: set[int] = set()
        self.nodes = [self._make_node(i, [], {}) for i in range(n)]
        for i in range(n):
            self._apply(i, self.nodes[i].replica.start())

    # -- construction -----------------------------------------------------

    def _make_app(self, log: list[Committed]) -> LogApp:
        """The application of one replica (a subclass may use another)."""
        return LogApp(self.config.batch_size, log)

    def _make_node(self, i: int, log: list[Committed], journal: dict[str, bytes]) -> Node:
        app = self._make_app(log)
        state = GENESIS_STATE
        for done in log:
            state = advance_state(state, done.seq, done.digest)
        replica = Replica(
            self.identities[i],
            self.validators,
            CHAIN_ID,
            app,
            self.config,
            executed=len(log),
            state=state,
            journal=load_journal(journal.get, CHAIN_ID, self.config.window)
            if self.durable
            else None,
        )
        return Node(replica, app, journal=journal)

    @property
    def honest(self) -> list[int]:
        """Replicas that follow the protocol (crashed ones included: what they
        committed before crashing must still agree)."""
        return [i for i in range(len(self.nodes)) if i not in self.byzantine]

    @property
    def live_honest(self) -> list[int]:
        return [i for i in self.honest if not self.nodes[i].crashed]

    # -- scheduling -------------------------------------------------------

    def _push(self, at: float, kind: str, target: int, epoch: int, data: object) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (at, self._counter, kind, target, epoch, data))

    def submit(self, requests: list[int], at: float | None = None) -> None:
        """Clients send ``requests`` to every replica at time ``at``."""
        self.submitted.extend(requests)
        self._push(self.now if at is None else at, "submit", -1, 0, tuple(requests))

    def submit_stream(self, count: int, rate: float, start: float = 0.0, first: int = 1) -> None:
        """``count`` requests at ``rate`` per second, in groups of 8."""
        for k in range(0, count, 8):
            ids = list(range(first + k, first + min(count, k + 8)))
            self.submit(ids, at=start + k / rate)

    def at(self, when: float, fn) -> None:  # type: ignore[no-untyped-def]
        """Run ``fn(cluster)`` at virtual time ``when`` (fault schedule)."""
        self._push(when, "call", -1, 0, fn)

    def run(self, until: float) -> None:
        while self._heap and self._heap[0][0] <= until:
            at, _, kind, target, epoch, data = heapq.heappop(self._heap)
            self.now = at
            self._dispatch(kind, target, epoch, data)
        self.now = until

    def run_until(self, predicate, limit: float) -> bool:  # type: ignore[no-untyped-def]
        """Run until ``predicate(self)`` holds (checked every 50 ms) or ``limit``."""
        while self.now < limit:
            self.run(min(limit, self.now + 0.05))
            if predicate(self):
                return True
        return predicate(self)

    def _dispatch(self, kind: str, target: int, epoch: int, data: object) -> None:
        if kind == "submit":
            for i, node in enumerate(self.nodes):
                if not node.crashed:
                    for request in data:  # type: ignore[attr-defined]
                        node.app.submit(request)
                    self._step(i, RequestsPending(node.app.pending()))
        elif kind == "call":
            data(self)  # type: ignore[operator]
        else:
            node = self.nodes[target]
            if node.crashed or node.epoch != epoch:
                self.dropped["crashed"] += 1
                return
            if kind in ("timer", "blocks"):
                self._step(target, data)  # type: ignore[arg-type]
            elif kind == "msg":
                sender, body = data  # type: ignore[misc]
                try:
                    message = decode_message(body)
                except MalformedMessage:
                    self.dropped["malformed"] += 1
                    return
                self.delivered += 1
                self._step(target, Receive(self.validators[sender], message))

    def _step(self, i: int, event: object) -> None:
        self._apply(i, self.nodes[i].replica.step(event))  # type: ignore[arg-type]

    # -- actions ----------------------------------------------------------

    def _apply(self, i: int, actions: list[Action]) -> None:
        node = self.nodes[i]
        for action in actions:
            if isinstance(action, Send):
                self._send(i, action)
            elif isinstance(action, SetTimer):
                event = TimerFired(action.name, action.token)
                self._push(self.now + action.delay, "timer", i, node.epoch, event)
            elif isinstance(action, CancelTimer):
                pass  # stale tokens are ignored by the replica
            elif isinstance(action, Committed):
                node.app.commit(action)
                for request in payload_ids(action.payload):
                    by = self.acks.setdefault(request, set())
                    by.add(i)
                    if len(by) > self.f:
                        self._acked.add(request)
            elif isinstance(action, FetchBlocks):
                self._serve_fetch(i, action)
            elif isinstance(action, Suspect):
                node.suspects[action.reason] += 1
            elif isinstance(action, Persist):
                node.journal[action.key] = action.value

    def _reachable(self, a: int, b: int) -> bool:
        if self.nodes[b].crashed:
            return False
        if self.groups is None:
            return True
        return any(a in g and b in g for g in self.groups)

    def _send(self, i: int, action: Send) -> None:
        targets = (
            [self.index[action.to]]
            if action.to is not None
            else [j for j in range(len(self.nodes)) if j != i]
        )
        behaviour = self.byzantine.get(i)
        for j in targets:
            for message in self._corrupt(i, j, behaviour, action.message):
                if self.drop is not None and self.drop(i, j, message):
                    self.dropped["filter"] += 1
                    continue
                self._transmit(i, j, encode_message(message))

    def _transmit(self, i: int, j: int, body: bytes) -> None:
        if not self._reachable(i, j):
            self.dropped["partition"] += 1
            return
        if self.network.loss and self.rng.random() < self.network.loss:
            self.dropped["loss"] += 1
            return
        delay = self.network.latency + self.rng.exponential(self.network.jitter)
        self._push(self.now + delay, "msg", j, self.nodes[j].epoch, (i, body))

    def _serve_fetch(self, i: int, action: FetchBlocks) -> None:
        """State transfer: the first reachable peer answers from its store."""
        self.fetches[i] += 1
        for peer in action.peers:
            j = self.index[peer]
            if not self._reachable(i, j) or not self._reachable(j, i):
                continue
            log = self.nodes[j].app.log[action.from_seq - 1 : action.to_seq]
            blocks = tuple((c.seq, c.digest, c.payload, c.certificate) for c in log)
            if j in self.byzantine:
                blocks = tuple((s, d, p + b"\0" * ID_BYTES, c) for s, d, p, c in blocks)
            at = self.now + 4 * self.network.latency
            self._push(at, "blocks", i, self.nodes[i].epoch, BlocksFetched(blocks))
            return

    # -- Byzantine behaviours ---------------------------------------------

    def _corrupt(self, i: int, j: int, behaviour: str | None, message: Message) -> list[Message]:
        identity = self.identities[i]
        if behaviour is None:
            return [message]
        if behaviour == "silent":
            return []
        if behaviour == "bad_signature":
            if isinstance(message, Commit):
                return [dataclasses.replace(message, vote=_flip(message.vote))]
            return [dataclasses.replace(message, signature=_flip(message.signature))]
        if behaviour == "wrong_digest":
            return [_wrong_digest(identity, message, self.rng.bytes(32))]
        if (
            behaviour == "equivocate"
            and isinstance(message, PrePrepare)
            and j >= len(self.nodes) // 2
        ):
            extra = (2**62 + message.seq).to_bytes(ID_BYTES, "big")
            payload = message.payload + extra
            digest = hashlib.sha256(payload).digest()
            return [
                PrePrepare.create(identity, CHAIN_ID, message.view, message.seq, digest, payload)
            ]
        if behaviour == "future_view":
            spam_view = self.nodes[i].replica.view + 1000
            spam = Prepare.create(identity, CHAIN_ID, spam_view, 1, bytes(32))
            vc = ViewChange.create(identity, CHAIN_ID, spam_view, 0, (), ())
            return [message, spam, vc]
        return [message]

    # -- faults -----------------------------------------------------------

    def crash(self, i: int) -> None:
        node = self.nodes[i]
        node.crashed = True
        node.epoch += 1

    def restart(self, i: int) -> None:
        """A fresh replica from the crashed one's committed log and journal
        (its store); all its memory else is gone."""
        old = self.nodes[i]
        node = self._make_node(i, old.app.log, dict(old.journal))
        node.epoch = old.epoch + 1
        self.nodes[i] = node
        self._apply(i, node.replica.start())

    def partition(self, *groups: set[int]) -> None:
        self.groups = [set(g) for g in groups]

    def heal(self) -> None:
        self.groups = None

    # -- observations and invariant checks (consensus/SPEC.md, PBFT) -------

    def refused(self, reason: str) -> int:
        """How often honest replicas refused a message for ``reason``."""
        return sum(self.nodes[i].replica.refused[reason] for i in self.honest)

    def views(self) -> list[int]:
        return [self.nodes[i].replica.view for i in self.live_honest]

    def log_of(self, i: int) -> list[Committed]:
        return self.nodes[i].app.log

    def acknowledged(self) -> set[int]:
        """Requests a client saw committed by f+1 replicas (so by an honest one)."""
        return self._acked

    def check_agreement(self) -> None:
        """P-AGREEMENT: no two honest replicas hold different digests at a seq."""
        seen: dict[int, bytes] = {}
        for i in self.honest:
            for done in self.log_of(i):
                assert seen.setdefault(done.seq, done.digest) == done.digest, (i, done.seq)

    def check_order(self) -> None:
        """P-ORDER: each replica delivers seqs 1, 2, 3, ... without gaps."""
        for i in self.honest:
            assert [c.seq for c in self.log_of(i)] == list(range(1, len(self.log_of(i)) + 1))

    def check_certified(self) -> None:
        """P-CERTIFIED: every delivered proposal carries a valid commit certificate."""
        for i in self.honest:
            for done in self.log_of(i)[-8:]:
                assert done.certificate.height == done.seq
                assert done.certificate.block_hash == done.digest
                assert done.certificate.is_valid(CHAIN_ID, self.validators)

    def check_durability(self) -> None:
        """P-DURABILITY: every acknowledged request is in every honest log."""
        acked = self.acknowledged()
        for i in self.live_honest:
            held = self.nodes[i].app.committed_ids
            assert acked <= held, (i, sorted(acked - held)[:5])

    def check_liveness(self, requests: list[int] | None = None) -> None:
        """P-LIVENESS: after faults stop, every submitted request commits everywhere."""
        wanted = set(self.submitted if requests is None else requests)
        for i in self.live_honest:
            held = self.nodes[i].app.committed_ids
            assert wanted <= held, (i, len(wanted - held))

    def check_null_only_in_gaps(self) -> None:
        for i in self.honest:
            for done in self.log_of(i):
                assert (done.digest == NULL_DIGEST) == (done.payload == b"")

    def check_all(self, *, live: bool = True) -> None:
        self.check_agreement()
        self.check_order()
        self.check_certified()
        self.check_durability()
        self.check_null_only_in_gaps()
        if live:
            self.check_liveness()

    def all_committed(self, requests: list[int] | None = None) -> bool:
        """Every submitted (or given) and every acknowledged request is held
        by every live honest replica."""
        wanted = set(self.submitted if requests is None else requests) | self.acknowledged()
        return all(wanted <= self.nodes[i].app.committed_ids for i in self.live_honest)


def _flip(signature: bytes) -> bytes:
    return bytes([signature[0] ^ 1]) + signature[1:]


def _wrong_digest(identity: Identity, message: Message, digest: bytes) -> Message:
    """The same message for a wrong digest, properly signed (so only the digest is wrong)."""
    if isinstance(message, PrePrepare):
        return PrePrepare.create(
            identity, CHAIN_ID, message.view, message.seq, digest, message.payload
        )
    if isinstance(message, Prepare):
        return Prepare.create(identity, CHAIN_ID, message.view, message.seq, digest)
    if isinstance(message, Commit):
        return Commit.create(identity, CHAIN_ID, message.view, message.seq, digest)
    if isinstance(message, Checkpoint):
        return Checkpoint.create(identity, CHAIN_ID, message.seq, digest)
    return message


BEHAVIOURS = ("silent", "equivocate", "bad_signature", "wrong_digest", "future_view", None)


def random_scenario(seed: int) -> tuple[Cluster, list[tuple[object, ...]]]:
    """A seeded mix of faults within the model: n = 4 or 7, at most f faulty
    at once counting Byzantine and crashed replicas, loss 0-10%, one
    partition that heals, crashes that may restart. Returns the cluster,
    loaded and scheduled, and the fault list (for failure messages)."""
    rng = np.random.default_rng(seed + 1000)
    n = 7 if rng.random() < 0.25 else 4
    f = max_faulty(n)
    behaviour = BEHAVIOURS[int(rng.integers(len(BEHAVIOURS)))]
    byzantine = {int(rng.integers(n)): behaviour} if behaviour else {}
    network = Network(loss=float(rng.choice([0.0, 0.05, 0.1])))
    interval = int(rng.choice([2, 4, 8]))
    config = PbftConfig(checkpoint_interval=interval, batch_size=int(rng.choice([4, 16, 64])))
    cluster = Cluster(n, seed=seed, config=config, network=network, byzantine=byzantine)
    cluster.submit_stream(int(rng.integers(100, 600)), rate=float(rng.choice([100, 300, 1000])))
    faults: list[tuple[object, ...]] = [("n", n), ("byzantine", byzantine), ("loss", network.loss)]
    if rng.random() < 0.5:
        start = float(rng.uniform(0.2, 1.5))
        end = start + float(rng.uniform(0.5, 3))
        order = [int(i) for i in rng.permutation(n)]
        cut = int(rng.integers(1, n))
        left, right = set(order[:cut]), set(order[cut:])
        cluster.at(start, lambda c: c.partition(left, right))
        cluster.at(end, lambda c: c.heal())
        faults.append(("partition", start, end, left, right))
    honest = [i for i in range(n) if i not in byzantine]
    budget = f - len(byzantine)
    victims = [int(v) for v in rng.permutation(honest)][:budget] if budget > 0 else []
    for victim in victims:
        at = float(rng.uniform(0.1, 2))
        cluster.at(at, lambda c, v=victim: c.crash(v))
        faults.append(("crash", victim, at))
        if rng.random() < 0.7:
            back = at + float(rng.uniform(0.3, 3))
            cluster.at(back, lambda c, v=victim: c.restart(v))
            faults.append(("restart", victim, back))
    return cluster, faults
