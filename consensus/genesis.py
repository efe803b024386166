"""The genesis: everything a node must agree on before the first block.

Chain id, genesis time, the initial validators, the initial state and the
consensus parameters, in one canonical msgpack array whose SHA-256 is the
genesis hash (block 1's previous hash). Holding the genesis is all a
follower needs to verify a chain from block bytes alone.

The validators are written into the initial state (``sys/validators``):
from then on the set lives on chain and changes only by a committed
``validators`` transaction, so the genesis list is just the first entry.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import msgpack

from fedchain.p2p.identity import PUBLIC_KEY_BYTES, PeerId
from fedchain.p2p.wire import unpack_body

from .contracts import VALIDATORS_KEY
from .errors import MalformedMessage
from .state import DEFAULT_BUCKETS, State, check_key, decode_value, encode_value
from .tx import MAX_TX_BYTES

__all__ = ["ConsensusParams", "Genesis", "decode_genesis"]

MAX_GENESIS_BYTES = 64 * 1024 * 1024
MAX_CHAIN_ID_CHARS = 64


@dataclass(frozen=True, slots=True)
class ConsensusParams:
    """Limits every validator enforces the same way."""

    max_block_txs: int = 2000
    max_block_bytes: int = 8 * 1024 * 1024
    max_tx_bytes: int = MAX_TX_BYTES
    state_buckets: int = DEFAULT_BUCKETS

    def as_list(self) -> list[int]:
        return [self.max_block_txs, self.max_block_bytes, self.max_tx_bytes, self.state_buckets]


@dataclass(frozen=True, slots=True)
class Genesis:
    chain_id: str
    genesis_time: int
    """Milliseconds since the Unix epoch; block 1's timestamp is at least this."""
    validators: tuple[PeerId, ...]
    initial_state: tuple[tuple[str, bytes], ...] = ()
    """Sorted (key, canonical value encoding) pairs; build with :meth:`create`."""
    params: ConsensusParams = field(default_factory=ConsensusParams)

    @classmethod
    def create(
        cls,
        chain_id: str,
        genesis_time: int,
        validators: Sequence[PeerId],
        initial_state: Mapping[str, object] | None = None,
        params: ConsensusParams | None = None,
    ) -> Genesis:
        """Validate and canonicalize (sorted validators, encoded state)."""
        items = tuple(sorted((k, encode_value(v)) for k, v in (initial_state or {}).items()))
        params = params or ConsensusParams()
        genesis = cls(chain_id, genesis_time, tuple(sorted(validators)), items, params)
        _check(genesis)
        return genesis

    def encode(self) -> bytes:
        return msgpack.packb(
            [
                self.chain_id,
                self.genesis_time,
                list(self.validators),
                [[k, v] for k, v in self.initial_state],
                self.params.as_list(),
            ],
            use_bin_type=True,
        )

    @property
    def hash(self) -> bytes:
        return hashlib.sha256(self.encode()).digest()

    def state(self) -> State:
        """The state before block 1: the initial pairs and the validator set."""
        state = State(buckets=self.params.state_buckets)
        writes: dict[str, bytes | None] = dict(self.initial_state)
        writes[VALIDATORS_KEY] = encode_value([0, list(self.validators)])
        return state.apply(writes)


def _check(genesis: Genesis) -> None:
    g = genesis
    if type(g.chain_id) is not str or not 0 < len(g.chain_id) <= MAX_CHAIN_ID_CHARS:
        raise MalformedMessage("chain id is a string of 1..64 characters")
    if type(g.genesis_time) is not int or not 0 <= g.genesis_time < 2**63:
        raise MalformedMessage("genesis time is a non-negative 63-bit integer")
    keys = g.validators
    if not keys or any(type(k) is not bytes or len(k) != PUBLIC_KEY_BYTES for k in keys):
        raise MalformedMessage("validators are one or more 32-byte keys")
    if bytes(PUBLIC_KEY_BYTES) in keys:
        raise MalformedMessage("the zero key marks null blocks and is no validator")
    if any(a >= b for a, b in itertools.pairwise(keys)):
        raise MalformedMessage("validators are sorted and distinct")
    names = [k for k, _ in g.initial_state]
    # Types first: keys of mixed types cannot be compared for the order check.
    if any(type(key) is not str or key.startswith("sys/") for key in names):
        raise MalformedMessage("initial state keys are strings outside sys/")
    if any(a >= b for a, b in itertools.pairwise(names)):
        raise MalformedMessage("initial state keys are sorted and distinct")
    for key, value in g.initial_state:
        try:
            check_key(key)
        except ValueError as exc:
            raise MalformedMessage(str(exc)) from exc
        if type(value) is not bytes:
            raise MalformedMessage("initial state values are encoded")
        decode_value(value)
    p = g.params.as_list()
    if any(type(x) is not int or not 0 < x < 2**40 for x in p):
        raise MalformedMessage("consensus parameters are positive integers")
    buckets = g.params.state_buckets
    if buckets & (buckets - 1) or buckets > 2**20:
        raise MalformedMessage("state buckets is a power of two up to 2**20")


def decode_genesis(data: bytes) -> Genesis:
    """Strictly decode a genesis or raise MalformedMessage."""
    if len(data) > MAX_GENESIS_BYTES:
        raise MalformedMessage("genesis too large")
    try:
        fields = unpack_body(data, max_len=MAX_GENESIS_BYTES)
    except Exception as exc:
        raise MalformedMessage(f"not a genesis: {exc}") from exc
    if type(fields) is not list or len(fields) != 5:
        raise MalformedMessage("a genesis is an array of 5 fields")
    chain_id, time, validators, items, params = fields
    if type(validators) is not list or type(items) is not list:
        raise MalformedMessage("validators and initial state are arrays")
    if any(type(i) is not list or len(i) != 2 for i in items):
        raise MalformedMessage("initial state entries are [key, value] pairs")
    if type(params) is not list or len(params) != 4:
        raise MalformedMessage("consensus parameters are an array of 4")
    genesis = Genesis(
        chain_id,
        time,
        tuple(validators),
        tuple((k, v) for k, v in items),
        ConsensusParams(*params),
    )
    _check(genesis)
    if genesis.encode() != data:
        raise MalformedMessage("non-canonical genesis encoding")
    return genesis
