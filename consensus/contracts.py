"""Contracts and the deterministic execution of a block's transactions.

A contract is an object with ``apply(view, tx) -> None`` that reads and
writes the state through a :class:`StateView` and raises
:class:`ContractRejected` (a short reason) to refuse. The executor runs each
transaction in its own overlay and keeps its writes only if the contract
returns, so a refused transaction changes nothing; it is still recorded in
the block, with its reason. Contracts are looked up in a
:class:`ContractRegistry` that the caller builds and passes in (no global),
so the identity and learning layers add theirs with one ``register`` call.

Replay protection is the executor's, not each contract's: the state holds
each sender's next nonce, a transaction whose nonce is not that one is
rejected without effect, and one whose nonce matches consumes it whatever
its contract decides, so no recorded transaction can ever run twice.

A contract that raises anything else (a bug: a KeyError, a bad value) is
recorded as rejected with the exception's class name. That is as
deterministic as the contract itself, and one bad transaction cannot halt
every replica at once.

Built-ins: ``kv`` (set/delete under the sender's own namespace, for tests
and benchmarks) and ``validators`` (the validator set lives on chain; see
:class:`ValidatorsContract` for who may change it, and why).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import msgpack

from fedchain.p2p.identity import PUBLIC_KEY_BYTES, Identity, PeerId, verify

from .errors import ContractRejected, MalformedMessage
from .state import MAX_KEY_BYTES, State, check_key, decode_value, encode_value, packed_key
from .tx import Transaction, sign_transaction
from .votes import quorum

__all__ = [
    "NONCE_PREFIX",
    "OK_RESULT",
    "VALIDATORS_KEY",
    "BlockContext",
    "Contract",
    "ContractRegistry",
    "KvContract",
    "StateView",
    "TxResult",
    "ValidatorsContract",
    "default_registry",
    "epoch_chain_id",
    "execute_transactions",
    "kv_delete",
    "kv_key",
    "kv_set",
    "next_nonce",
    "nonce_key",
    "sign_validator_change",
    "validator_change_bytes",
    "validator_change_content",
    "validator_change_transaction",
    "validator_epoch",
    "validators_of",
]

NONCE_PREFIX = "sys/nonce/"
VALIDATORS_KEY = "sys/validators"
OK = 0
REJECTED = 1
MAX_REASON_CHARS = 200


class TxResult(NamedTuple):
    """What executing one transaction gave: status 0 (ok) or 1 (rejected)."""

    status: int
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK

    def encode(self) -> bytes:
        return msgpack.packb([self.status, self.reason], use_bin_type=True)


@dataclass(frozen=True, slots=True)
class BlockContext:
    """The block a transaction executes in: what contracts may read of it
    (a round's deadline is a height or a time)."""

    chain_id: str
    height: int
    timestamp: int
    proposer: PeerId


_Writes = dict[str, bytes | None]


class StateView:
    """A contract's window on the state: reads see earlier writes of this
    block and of this transaction; writes land in this transaction's
    overlay, kept only if the contract returns."""

    __slots__ = ("_base", "_block", "_tx", "context")

    def __init__(self, base: State, block: _Writes, context: BlockContext) -> None:
        self._base = base
        self._block = block
        self._tx: _Writes = {}
        self.context = context

    def _encoded(self, key: str) -> bytes | None:
        for layer in (self._tx, self._block):
            if key in layer:
                return layer[key]
        return self._base.get_encoded(key)

    def get(self, key: str, default: object = None) -> object:
        encoded = self._encoded(key)
        return default if encoded is None else msgpack.unpackb(encoded, raw=False)

    def __contains__(self, key: str) -> bool:
        return self._encoded(key) is not None

    # Keys are checked here, as the contract writes them: a key the state
    # cannot hold (say over MAX_KEY_BYTES in UTF-8) is then the one
    # transaction's error, recorded as rejected, not a ValueError from the
    # block's State.apply that failed the whole proposal (a kv key of 128
    # four-byte characters did that: any client could stall the primary).

    def set(self, key: str, value: object) -> None:
        check_key(key)
        if value is None:
            raise ValueError("set takes a non-None value")
        self._tx[key] = encode_value(value)

    def set_encoded(self, key: str, encoded: bytes) -> None:
        """Like :meth:`set` with the value's canonical encoding, which the
        caller vouches for (a slice of content :func:`decode_value` checked)."""
        check_key(key)
        if type(encoded) is not bytes or encoded == b"\xc0":
            raise ValueError("set_encoded takes a non-nil encoding")
        self._tx[key] = encoded

    def delete(self, key: str) -> None:
        check_key(key)
        self._tx[key] = None


class Contract(Protocol):
    def apply(self, view: StateView, tx: Transaction) -> None:
        """Change the state through ``view`` or raise ContractRejected(reason)."""


class ContractRegistry:
    """Transaction type -> contract. Build one per chain and pass it in."""

    def __init__(self, contracts: Mapping[str, Contract] | None = None) -> None:
        self._contracts: dict[str, Contract] = {}
        for tx_type, contract in (contracts or {}).items():
            self.register(tx_type, contract)

    def register(self, tx_type: str, contract: Contract) -> None:
        if tx_type in self._contracts:
            raise ValueError(f"a contract for {tx_type!r} is already registered")
        self._contracts[tx_type] = contract

    def get(self, tx_type: str) -> Contract | None:
        return self._contracts.get(tx_type)

    def __contains__(self, tx_type: str) -> bool:
        return tx_type in self._contracts

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._contracts))


def default_registry() -> ContractRegistry:
    """A fresh registry with the built-in ``kv`` and ``validators`` contracts."""
    return ContractRegistry({"kv": KvContract(), "validators": ValidatorsContract()})


def nonce_key(sender: PeerId) -> str:
    return NONCE_PREFIX + sender.hex()


def next_nonce(state: State, sender: PeerId) -> int:
    """The nonce ``sender``'s next transaction must carry."""
    encoded = state.get_encoded(nonce_key(sender))
    return 0 if encoded is None else _decode_count(encoded)


OK_RESULT = TxResult(OK)
"""The one "ok" result: executors and block decoding share it instead of
building one per transaction (a block's results are mostly this)."""
_FIXINTS = tuple(bytes((n,)) for n in range(128))
"""msgpack's one-byte encodings of 0..127 (positive fixint): every nonce
in practice, read and written once per transaction."""


def _encode_count(n: int) -> bytes:
    """``encode_value(n)`` for a non-negative int, without a Packer for small ones."""
    return _FIXINTS[n] if n < 128 else encode_value(n)


def _decode_count(encoded: bytes) -> int:
    """The int a nonce record holds (stored by :func:`_encode_count`)."""
    first = encoded[0]
    if len(encoded) == 1 and first < 128:
        return first
    return msgpack.unpackb(encoded)


def _reason(text: str) -> str:
    return text[:MAX_REASON_CHARS]


def execute_transactions(
    state: State,
    txs: Iterable[Transaction],
    registry: ContractRegistry,
    context: BlockContext,
) -> tuple[State, list[TxResult]]:
    """Run ``txs`` in order on ``state``: the new state and one result each.

    Signatures are not checked here (the caller did, once). Pure: the same
    inputs give the same outputs on every replica."""
    block: _Writes = {}
    results: list[TxResult] = []
    for tx in txs:
        key = nonce_key(tx.sender)
        encoded = block.get(key) if key in block else state.get_encoded(key)
        expected = 0 if encoded is None else _decode_count(encoded)
        if tx.nonce != expected:
            results.append(TxResult(REJECTED, f"bad nonce: expected {expected}"))
            continue
        block[key] = _encode_count(expected + 1)
        contract = registry.get(tx.type)
        if contract is None:
            results.append(TxResult(REJECTED, _reason(f"unknown type {tx.type!r}")))
            continue
        view = StateView(state, block, context)
        try:
            contract.apply(view, tx)
        except ContractRejected as exc:
            results.append(TxResult(REJECTED, _reason(str(exc) or "rejected")))
            continue
        except (MemoryError, RecursionError):
            raise
        except Exception as exc:
            results.append(TxResult(REJECTED, _reason(f"contract error: {type(exc).__name__}")))
            continue
        block.update(view._tx)
        results.append(OK_RESULT)
    return state.apply(block), results


# --- kv: a namespace per sender --------------------------------------------

MAX_KV_KEY_CHARS = 128


def kv_key(sender: PeerId, key: str) -> str:
    return f"kv/{sender.hex()}/{key}"


def kv_set(key: str, value: object) -> bytes:
    """Content of a kv transaction that stores ``value`` under ``key``."""
    return encode_value(["set", key, value])


def kv_delete(key: str) -> bytes:
    return encode_value(["del", key])


_SET_PREFIX = len(b"\x93\xa3set")
"""A set's content starts with a fixarray of 3 and the fixstr "set"."""


class KvContract:
    """``["set", key, value]`` or ``["del", key]`` in the sender's namespace
    ``kv/<sender hex>/``: nobody can touch another's keys."""

    def apply(self, view: StateView, tx: Transaction) -> None:
        try:
            op = decode_value(tx.content)
        except MalformedMessage as exc:
            raise ContractRejected("malformed kv content") from exc
        if type(op) is not list or not op or op[0] not in ("set", "del"):
            raise ContractRejected("kv content is [set, key, value] or [del, key]")
        if len(op) != (3 if op[0] == "set" else 2):
            raise ContractRejected("kv content is [set, key, value] or [del, key]")
        key = op[1]
        if type(key) is not str or not 0 < len(key) <= MAX_KV_KEY_CHARS:
            raise ContractRejected("kv key is a string of 1..128 characters")
        full = kv_key(tx.sender, key)
        if len(full.encode()) > MAX_KEY_BYTES:
            raise ContractRejected(
                f"kv key too long: over {MAX_KEY_BYTES} bytes with its namespace"
            )
        if op[0] == "set":
            if op[2] is None:
                raise ContractRejected("kv value is not nil")
            # The content is canonical (decode_value checked), so the value's
            # encoding is its tail after the array header, "set" and the
            # key: no second encoding of the value per transaction.
            view.set_encoded(full, tx.content[_SET_PREFIX + len(packed_key(key)) :])
        elif full not in view:
            raise ContractRejected("no such key")
        else:
            view.delete(full)


# --- validators: the validator set on chain ---------------------------------

_CHANGE_DOMAIN = b"fedchain/validator-change/v1\x00"


def validators_of(state: State) -> list[PeerId]:
    """The validator set in force after ``state`` (sorted keys)."""
    record = state.get(VALIDATORS_KEY)
    if record is None:
        return []
    return list(record[1])  # type: ignore[index]


def validator_epoch(state: State) -> int:
    """How many changes the set has had: what approvals of the next one sign."""
    record = state.get(VALIDATORS_KEY)
    return 0 if record is None else record[0]  # type: ignore[index]


def epoch_chain_id(chain_id: str, epoch: int) -> str:
    """The chain id that consensus votes and PBFT messages of validator
    ``epoch`` sign: ``chain_id`` itself for the genesis set (epoch 0, so
    chains and votes from before epochs existed stay valid), else
    ``"<chain_id>#<epoch>"``. Votes of two epochs then never verify for
    each other, so a certificate can never pool them, and a message a
    retired set signs means nothing to its successor. Transactions, and the
    approvals of a change (:func:`validator_change_bytes`), keep signing the
    plain chain id."""
    if type(epoch) is not int or epoch < 0:
        raise ValueError("an epoch is a non-negative integer")
    return chain_id if epoch == 0 else f"{chain_id}#{epoch}"


def validator_change_bytes(chain_id: str, epoch: int, validators: Sequence[PeerId]) -> bytes:
    """What a validator signs to approve replacing the set of ``epoch``."""
    return _CHANGE_DOMAIN + encode_value([chain_id, epoch, sorted(validators)])


def sign_validator_change(
    identity: Identity, chain_id: str, epoch: int, validators: Sequence[PeerId]
) -> bytes:
    return identity.sign(validator_change_bytes(chain_id, epoch, validators))


def validator_change_content(
    validators: Sequence[PeerId], approvals: Iterable[tuple[PeerId, bytes]]
) -> bytes:
    """Content of a ``validators`` transaction: the new set and approvals."""
    return encode_value([sorted(validators), [list(a) for a in sorted(dict(approvals).items())]])


def validator_change_transaction(
    sender: Identity,
    chain_id: str,
    validators: Sequence[PeerId],
    approvers: Iterable[Identity],
    *,
    epoch: int,
    nonce: int,
    timestamp: int = 0,
) -> Transaction:
    """A signed ``validators`` transaction from ``sender`` that replaces the
    set of ``epoch`` with ``validators``, approved by each of ``approvers``
    (members of the current set; the contract wants a quorum of them)."""
    approvals = [
        (a.public_key, sign_validator_change(a, chain_id, epoch, validators)) for a in approvers
    ]
    return sign_transaction(
        sender,
        chain_id,
        type="validators",
        content=validator_change_content(validators, approvals),
        nonce=nonce,
        timestamp=timestamp,
    )


class ValidatorsContract:
    """Replace the validator set, with approvals from a quorum of the current one.

    Content: ``[new validators (sorted, distinct 32-byte keys), [[key,
    signature], ...]]`` where each signature is a current validator's over
    :func:`validator_change_bytes` (chain id, current epoch, new set). Why a
    quorum and not a governance key from genesis: the same 2f + 1 that make
    blocks final decide who makes them final, so the chain needs no trust
    beyond what consensus already assumes and no single lost or stolen key
    can take it over. The epoch in the signed bytes makes approvals single
    use. Anyone may submit the transaction. The new set applies from the
    next height: the certificate of block h is checked against the set in
    the state after block h - 1, and its votes sign the chain id of that
    set's epoch (:func:`epoch_chain_id`).
    """

    max_validators = 1024

    def apply(self, view: StateView, tx: Transaction) -> None:
        try:
            content = decode_value(tx.content)
        except MalformedMessage as exc:
            raise ContractRejected("malformed validators content") from exc
        if type(content) is not list or len(content) != 2:
            raise ContractRejected("content is [validators, approvals]")
        new_set, approvals = content
        if (
            type(new_set) is not list
            or not 0 < len(new_set) <= self.max_validators
            or any(type(k) is not bytes or len(k) != PUBLIC_KEY_BYTES for k in new_set)
            or any(a >= b for a, b in itertools.pairwise(new_set))
        ):
            raise ContractRejected("validators are sorted distinct 32-byte keys")
        if bytes(PUBLIC_KEY_BYTES) in new_set:
            raise ContractRejected("the zero key marks null blocks and is no validator")
        if type(approvals) is not list or any(
            type(a) is not list or len(a) != 2 or type(a[0]) is not bytes or type(a[1]) is not bytes
            for a in approvals
        ):
            raise ContractRejected("approvals are [key, signature] pairs")
        epoch, current = view.get(VALIDATORS_KEY, [0, []])  # type: ignore[misc]
        if not current:
            raise ContractRejected("no validator set to approve a change")
        members = set(current)
        message = validator_change_bytes(view.context.chain_id, epoch, new_set)
        signers = {key for key, sig in approvals if key in members and verify(key, message, sig)}
        if len(signers) < quorum(len(current)):
            raise ContractRejected(f"{len(signers)} approvals, {quorum(len(current))} needed")
        view.set(VALIDATORS_KEY, [epoch + 1, new_set])
