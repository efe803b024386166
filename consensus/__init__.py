"""The ledger: transactions, blocks, RFC 6962 Merkle trees, state and
contracts, the mempool, block stores, commit certificates and PBFT.

The main types are re-exported here; each module's ``__all__`` holds the
rest (codecs, constants, helpers). ``consensus/SPEC.md`` names the
invariants and the tests that check them. ``consensus`` builds on
``fedchain.p2p`` (identities, the wire's strict msgpack) and never imports
``learning`` or ``sims``.
"""

from .block import Block, BlockHeader, decode_block, encode_block
from .chain import ChainReport, ChainTip, Executor, verify_chain
from .client import LedgerClient, TrustedValidators, UntrustedAnswer
from .client_api import CommitProof, HeaderChain, QueryAnswer, SubmitStatus
from .contracts import BlockContext, Contract, ContractRegistry, TxResult, default_registry
from .errors import (
    ChainBroken,
    ConsensusError,
    ContractRejected,
    DuplicateTransaction,
    InvalidBlock,
    InvalidCertificate,
    InvalidSignature,
    MalformedMessage,
    MempoolFull,
    StoreCorrupted,
    StoreError,
)
from .genesis import ConsensusParams, Genesis, decode_genesis
from .mempool import Mempool
from .pbft import Follower, PbftConfig, Replica
from .replica import LedgerReplica
from .service import LedgerService
from .state import State, verify_state_proof
from .store import BlockStore, MemoryBlockStore, SqliteBlockStore, StoredBlock, open_block_store
from .tx import Transaction, decode_transaction, sign_transaction
from .votes import CommitCertificate, quorum, sign_commit_vote

__all__ = [
    "Block",
    "BlockContext",
    "BlockHeader",
    "BlockStore",
    "ChainBroken",
    "ChainReport",
    "ChainTip",
    "CommitCertificate",
    "CommitProof",
    "ConsensusError",
    "ConsensusParams",
    "Contract",
    "ContractRegistry",
    "ContractRejected",
    "DuplicateTransaction",
    "Executor",
    "Follower",
    "Genesis",
    "HeaderChain",
    "InvalidBlock",
    "InvalidCertificate",
    "InvalidSignature",
    "LedgerClient",
    "LedgerReplica",
    "LedgerService",
    "MalformedMessage",
    "MemoryBlockStore",
    "Mempool",
    "MempoolFull",
    "PbftConfig",
    "QueryAnswer",
    "Replica",
    "SqliteBlockStore",
    "State",
    "StoreCorrupted",
    "StoreError",
    "StoredBlock",
    "SubmitStatus",
    "Transaction",
    "TrustedValidators",
    "TxResult",
    "UntrustedAnswer",
    "decode_block",
    "decode_genesis",
    "decode_transaction",
    "default_registry",
    "encode_block",
    "open_block_store",
    "quorum",
    "sign_commit_vote",
    "sign_transaction",
    "verify_chain",
    "verify_state_proof",
]
