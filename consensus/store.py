"""Block stores: where a node keeps its committed blocks and a little state.

One interface (:class:`BlockStore`), two stores with identical semantics:
:class:`SqliteBlockStore` for nodes that must survive a crash, and
:class:`MemoryBlockStore` for simulations of thousands of nodes. Both share
one front (:class:`_Store`) that validates every argument and keeps the tip,
so a rule such as "heights are contiguous" or "a hash is stored once" is
written once and cannot differ between them; the conformance tests run
every property against both.

The store knows nothing of the block format: it keeps opaque encoded blocks
(:class:`StoredBlock`: height, 32-byte hash, bytes). Checking a block is the
ledger's job; keeping it is this module's.

Why a committed block survives SIGKILL at any moment, and why no block is
ever half-written:

* **One transaction per append.** A block is one row, written by one
  ``BEGIN IMMEDIATE ... COMMIT``; ``append`` returns only after ``COMMIT``
  did. There is no multi-step update that a crash could split.
* **WAL.** SQLite appends the transaction's pages to the write-ahead log,
  and the commit is the final frame, whose header marks the commit and
  whose cumulative checksum covers every frame before it. On reopen,
  SQLite replays frames only up to the last valid commit frame, so a
  transaction cut short by a kill is invisible, whole: it never happened.
* **synchronous=FULL.** The WAL is fsynced at every commit, so what
  ``append`` acknowledged is on stable storage, not only in the page cache.
  (SIGKILL alone leaves the page cache intact; the fsync is what covers a
  power cut, which the tests do not simulate.) SQLite also syncs the
  directory when it creates the WAL; this module syncs it when it creates
  the database file.
* **An exclusive lock for the store's lifetime.** Two processes writing one
  chain would break the tip bookkeeping; the second opener gets a
  :class:`StoreError` instead. The kernel drops the lock when its holder
  dies, so a restart after SIGKILL is never locked out.

Why a SHA-256 per row on top of SQLite's own checks: SQLite's WAL checksums
protect only frames not yet checkpointed, and ``PRAGMA quick_check`` checks
the b-tree structure, not what the cells hold. A flipped bit on disk inside
a block's bytes, or a row edited by hand, passes both. The row checksum
binds height, hash and data, so a read either returns exactly what was
appended or raises :class:`StoreCorrupted` naming the height; it costs one
SHA-256 per read (about 1 ms per MB). On open the newest rows are verified
and the heights checked contiguous; :meth:`BlockStore.verify` checks every
row.

What this cannot detect: a write-ahead log cut short by hand or by a broken
disk looks like an earlier crash, and the blocks in the lost frames are
gone without a trace. A clean :meth:`~BlockStore.close` checkpoints the log
into the database file to make that window small; the ledger refetches
missing blocks from peers (state transfer) in any case.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self, runtime_checkable

from .errors import StoreCorrupted, StoreError

__all__ = [
    "HASH_BYTES",
    "MAX_BLOCK_BYTES",
    "MAX_META_BYTES",
    "MAX_META_KEY_BYTES",
    "SCHEMA_VERSION",
    "BlockStore",
    "MemoryBlockStore",
    "SqliteBlockStore",
    "StoredBlock",
    "open_block_store",
]

HASH_BYTES = 32
MAX_BLOCK_BYTES = 64 * 1024 * 1024  # far above any block the ledger builds
MAX_META_BYTES = MAX_BLOCK_BYTES + 1024 * 1024
"""Meta holds small state (views, checkpoints) and PBFT's journal, whose
prepared certificates carry one proposal's payload (``pbft_journal``)."""
MAX_META_KEY_BYTES = 255
MAX_HEIGHT = 2**63 - 1  # SQLite's INTEGER; no chain gets there
SCHEMA_VERSION = 1
APPLICATION_ID = 0x46434253  # "FCBS": this file is a fedchain block store
TIP_ROWS_VERIFIED_ON_OPEN = 16
_BATCH = 64  # rows fetched per query while iterating


@dataclass(frozen=True, slots=True)
class StoredBlock:
    """One encoded block as the store keeps it; ``data`` is opaque here."""

    height: int
    block_hash: bytes
    data: bytes


@runtime_checkable
class BlockStore(Protocol):
    """What the ledger needs from a block store.

    Every method raises only :class:`StoreError` subclasses: a bad argument
    or a closed store is a :class:`StoreError` and changes nothing; damage
    found on disk is :class:`StoreCorrupted`.
    """

    def append(self, block: StoredBlock) -> None:
        """Store the block at ``tip() + 1``; durable when it returns."""

    def append_many(self, blocks: Iterable[StoredBlock]) -> None:
        """Store consecutive blocks all at once, or none (state transfer)."""

    def get(self, height: int) -> StoredBlock | None:
        """The block at ``height``, or None when there is none."""

    def get_by_hash(self, block_hash: bytes) -> StoredBlock | None:
        """The block with this hash, or None."""

    def tip(self) -> int:
        """Height of the newest block; -1 for an empty store."""

    def blocks(self, start: int = 0) -> Iterator[StoredBlock]:
        """Blocks from ``start`` up to the tip, in order."""

    def put_meta(self, key: str, value: bytes, *, durable: bool = True) -> None:
        """Atomically set a named value; on stable storage when it returns.

        ``durable=False`` skips the fsync: the value survives a crash of
        the process at once (it is in the kernel's page cache) and a power
        cut from the store's next durable write on."""

    def get_meta(self, key: str) -> bytes | None:
        """The value set for ``key``, or None."""

    def verify(self) -> int:
        """Check every stored row; return how many blocks were checked."""

    def close(self) -> None:
        """Release the store; later calls raise :class:`StoreError`."""

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc_info: object) -> None: ...


def open_block_store(path: str | os.PathLike[str] | None) -> BlockStore:
    """A SQLite store at ``path``, or an in-memory one for ``None``."""
    return MemoryBlockStore() if path is None else SqliteBlockStore(path)


# --- argument checks (shared, so both stores refuse the same things) --------------------


def _check_height(height: object) -> int:
    if isinstance(height, bool) or not isinstance(height, int):
        raise StoreError(f"a height is an int, not {type(height).__name__}")
    return height


def _check_bytes(value: object, what: str, limit: int) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise StoreError(f"{what} must be bytes, not {type(value).__name__}")
    value = bytes(value)
    if len(value) > limit:
        raise StoreError(f"{what} is {len(value)} bytes, over the limit of {limit}")
    return value


def _check_hash(block_hash: object) -> bytes:
    block_hash = _check_bytes(block_hash, "a block hash", HASH_BYTES)
    if len(block_hash) != HASH_BYTES:
        raise StoreError(f"a block hash is {HASH_BYTES} bytes, not {len(block_hash)}")
    return block_hash


def _check_block(block: object) -> StoredBlock:
    if not isinstance(block, StoredBlock):
        raise StoreError(f"append takes a StoredBlock, not {type(block).__name__}")
    return StoredBlock(
        _check_height(block.height),
        _check_hash(block.block_hash),
        _check_bytes(block.data, "block data", MAX_BLOCK_BYTES),
    )


def _check_key(key: object) -> bytes:
    if not isinstance(key, str):
        raise StoreError(f"a meta key is a str, not {type(key).__name__}")
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise StoreError("a meta key must be encodable as UTF-8") from exc
    if not 0 < len(encoded) <= MAX_META_KEY_BYTES:
        raise StoreError(f"a meta key is 1 to {MAX_META_KEY_BYTES} UTF-8 bytes")
    return encoded


def _block_checksum(height: int, block_hash: bytes, data: bytes) -> bytes:
    return hashlib.sha256(height.to_bytes(8, "big") + block_hash + data).digest()


def _meta_checksum(key: bytes, value: bytes) -> bytes:
    return hashlib.sha256(len(key).to_bytes(2, "big") + key + value).digest()


# --- the shared front --------------------------------------------------------------------


class _Store:
    """The public methods, written once over a backend's few primitives.

    A backend implements ``_read(height)``, ``_read_range(start, stop)``,
    ``_height_of(block_hash)``, ``_write(blocks)``, ``_read_meta(key)``,
    ``_write_meta(key, value, durable)``, ``_meta_keys()``, ``_read_tip()`` and
    ``_release()``. The front holds a lock (a node may call it from a
    worker thread so that fsyncs do not stall its event loop) and the tip.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._closed = False
        self._tip = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the block store is closed")

    def append(self, block: StoredBlock) -> None:
        self.append_many([block])

    def append_many(self, blocks: Iterable[StoredBlock]) -> None:
        with self._lock:
            self._check_open()
            checked = self._check_batch(blocks)
            if not checked:
                return
            try:
                self._write(checked)
            except BaseException:
                with contextlib.suppress(StoreError):  # keep the first error
                    self._tip = self._read_tip()
                raise
            self._tip = checked[-1].height

    def _check_batch(self, blocks: Iterable[StoredBlock]) -> list[StoredBlock]:
        if isinstance(blocks, StoredBlock) or not isinstance(blocks, Iterable):
            raise StoreError("append_many takes an iterable of StoredBlock")
        checked = [_check_block(block) for block in blocks]
        seen: set[bytes] = set()
        for expected, block in enumerate(checked, start=self._tip + 1):
            if block.height != expected:
                raise StoreError(f"next height is {expected}, not {block.height}")
            if block.block_hash in seen or self._height_of(block.block_hash) is not None:
                raise StoreError(f"block hash {block.block_hash.hex()} is already stored")
            seen.add(block.block_hash)
        return checked

    def get(self, height: int) -> StoredBlock | None:
        height = _check_height(height)
        with self._lock:
            self._check_open()
            if not 0 <= height <= self._tip:
                return None
            block = self._read(height)
            if block is None:
                raise StoreCorrupted(f"block at height {height} is missing below the tip")
            return block

    def get_by_hash(self, block_hash: bytes) -> StoredBlock | None:
        block_hash = _check_hash(block_hash)
        with self._lock:
            self._check_open()
            height = self._height_of(block_hash)
            if height is None:
                return None
            block = self._read(height)
            if block is None or block.block_hash != block_hash:
                raise StoreCorrupted(f"hash index disagrees with the block at height {height}")
            return block

    def tip(self) -> int:
        with self._lock:
            self._check_open()
            return self._tip

    def blocks(self, start: int = 0) -> Iterator[StoredBlock]:
        start = _check_height(start)
        if start < 0:
            raise StoreError(f"blocks start at height 0 or above, not {start}")
        return self._iterate(start)

    def _iterate(self, height: int) -> Iterator[StoredBlock]:
        while True:
            with self._lock:
                self._check_open()
                stop = min(height + _BATCH, self._tip + 1)
                batch = self._read_range(height, stop) if height < stop else []
            if len(batch) != max(0, stop - height):
                raise StoreCorrupted(f"heights {height}..{stop - 1} are not all stored")
            if not batch:
                return
            for block in batch:
                self._check_open()
                yield block
            height = stop

    def put_meta(self, key: str, value: bytes, *, durable: bool = True) -> None:
        encoded = _check_key(key)
        value = _check_bytes(value, "a meta value", MAX_META_BYTES)
        with self._lock:
            self._check_open()
            self._write_meta(encoded, value, durable)

    def get_meta(self, key: str) -> bytes | None:
        encoded = _check_key(key)
        with self._lock:
            self._check_open()
            return self._read_meta(encoded)

    def verify(self) -> int:
        checked = sum(1 for _ in self.blocks(0))
        with self._lock:
            self._check_open()
            for key in self._meta_keys():
                self._read_meta(key)
        return checked

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._release()

    # Backend primitives (called with the lock held, on an open store).

    def _read(self, height: int) -> StoredBlock | None:
        raise NotImplementedError

    def _read_range(self, start: int, stop: int) -> list[StoredBlock]:
        raise NotImplementedError

    def _height_of(self, block_hash: bytes) -> int | None:
        raise NotImplementedError

    def _write(self, blocks: list[StoredBlock]) -> None:
        raise NotImplementedError

    def _read_meta(self, key: bytes) -> bytes | None:
        raise NotImplementedError

    def _write_meta(self, key: bytes, value: bytes, durable: bool) -> None:
        raise NotImplementedError

    def _meta_keys(self) -> list[bytes]:
        raise NotImplementedError

    def _read_tip(self) -> int:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError


# --- in memory ---------------------------------------------------------------------------


class MemoryBlockStore(_Store):
    """Blocks in a list: the same rules, nothing durable, no I/O.

    For simulations of many nodes, where a process crash ends the whole
    simulation anyway.
    """

    def __init__(self) -> None:
        super().__init__()
        self._blocks: list[StoredBlock] = []
        self._by_hash: dict[bytes, int] = {}
        self._meta: dict[bytes, bytes] = {}

    def __repr__(self) -> str:
        return f"MemoryBlockStore(tip={self._tip})"

    def _read(self, height: int) -> StoredBlock | None:
        return self._blocks[height] if height < len(self._blocks) else None

    def _read_range(self, start: int, stop: int) -> list[StoredBlock]:
        return self._blocks[start:stop]

    def _height_of(self, block_hash: bytes) -> int | None:
        return self._by_hash.get(block_hash)

    def _write(self, blocks: list[StoredBlock]) -> None:
        for block in blocks:
            self._by_hash[block.block_hash] = block.height
        self._blocks.extend(blocks)

    def _read_meta(self, key: bytes) -> bytes | None:
        return self._meta.get(key)

    def _write_meta(self, key: bytes, value: bytes, durable: bool) -> None:
        self._meta[key] = value

    def _meta_keys(self) -> list[bytes]:
        return list(self._meta)

    def _read_tip(self) -> int:
        return len(self._blocks) - 1

    def _release(self) -> None:
        self._blocks, self._by_hash, self._meta = [], {}, {}


# --- SQLite ------------------------------------------------------------------------------

_SCHEMA = {
    "blocks": "CREATE TABLE blocks ("
    "height INTEGER PRIMARY KEY, hash BLOB NOT NULL UNIQUE, "
    "checksum BLOB NOT NULL, data BLOB NOT NULL)",
    "meta": "CREATE TABLE meta ("
    "key BLOB PRIMARY KEY, checksum BLOB NOT NULL, value BLOB NOT NULL) WITHOUT ROWID",
}
# SQLite's result codes (the low byte of an extended code) that mean damage.
_CORRUPTION_CODES = {
    getattr(sqlite3, name, code)
    for name, code in (("SQLITE_CORRUPT", 11), ("SQLITE_NOTADB", 26), ("SQLITE_FORMAT", 24))
}
_BUSY_CODES = {getattr(sqlite3, "SQLITE_BUSY", 5), getattr(sqlite3, "SQLITE_LOCKED", 6)}


def _translate_error(exc: sqlite3.Error, doing: str) -> StoreError:
    """A sqlite3 error as this module's vocabulary, so none escapes it."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code in _CORRUPTION_CODES:
        return StoreCorrupted(f"{doing}: the database is damaged ({exc})")
    if code in _BUSY_CODES:
        return StoreError(f"{doing}: the store is in use by another process ({exc})")
    return StoreError(f"{doing}: {exc}")


@contextlib.contextmanager
def _sqlite_errors(doing: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise _translate_error(exc, doing) from exc


class SqliteBlockStore(_Store):
    """Blocks in one SQLite file, durable at every append (see the module
    docstring for why a SIGKILL cannot lose or tear a block).

    Opening checks, in order: SQLite's own structure (``quick_check``), that
    the file is a fedchain block store of this schema version, that heights
    run 0..tip with none missing, and the checksums of the newest rows.
    Damage raises :class:`StoreCorrupted`; a store written by a different
    schema version raises :class:`StoreError` (it needs a migration, not a
    repair). The store is locked to this process until :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout_s: float = 2.0) -> None:
        super().__init__()
        self.path = Path(path)
        created = not self.path.exists()
        try:
            self._conn = sqlite3.connect(
                self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise _translate_error(exc, f"opening {self.path}") from exc
        try:
            with _sqlite_errors(f"opening {self.path}"):
                self._configure()
                self._check_structure()
                self._prepare_schema()
                self._tip = self._read_tip()
                self._check_contiguous()
                self._verify_newest()
            if created:
                _sync_directory(self.path.parent)
        except OSError as exc:
            self._conn.close()
            raise StoreError(f"opening {self.path}: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise

    def __repr__(self) -> str:
        return f"SqliteBlockStore({str(self.path)!r}, tip={self._tip})"

    # Opening.

    def _configure(self) -> None:
        conn = self._conn
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.path}: SQLite refused WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA cell_size_check = ON")  # find damaged pages on read
        conn.execute("PRAGMA trusted_schema = OFF")
        conn.execute("PRAGMA journal_size_limit = 67108864")

    def _check_structure(self) -> None:
        problems = [row[0] for row in self._conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise StoreCorrupted(f"{self.path} fails SQLite's quick_check: {problems[:3]}")

    def _prepare_schema(self) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")  # takes the lock this store keeps until close
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = dict(conn.execute("SELECT name, sql FROM sqlite_master"))
            if app_id == 0 and version == 0 and not tables:
                self._create_schema()
            else:
                self._check_schema(app_id, version, tables)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _create_schema(self) -> None:
        for sql in _SCHEMA.values():
            self._conn.execute(sql)
        self._conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _check_schema(self, app_id: int, version: int, tables: dict[str, str]) -> None:
        if app_id != APPLICATION_ID:
            raise StoreCorrupted(f"{self.path} is a SQLite file but not a fedchain block store")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has block store schema version {version}; "
                f"this build reads version {SCHEMA_VERSION}"
            )
        ours = {name: sql for name, sql in tables.items() if not name.startswith("sqlite_")}
        if ours != _SCHEMA:
            raise StoreCorrupted(f"{self.path}: the tables are not the block store's schema")

    def _check_contiguous(self) -> None:
        low, high, count = self._conn.execute(
            "SELECT MIN(height), MAX(height), COUNT(*) FROM blocks"
        ).fetchone()
        if count and (low != 0 or high != count - 1):
            raise StoreCorrupted(
                f"{self.path}: heights are not contiguous from 0 "
                f"({count} rows, heights {low}..{high})"
            )

    def _verify_newest(self) -> None:
        start = max(0, self._tip - TIP_ROWS_VERIFIED_ON_OPEN + 1)
        if len(self._read_range(start, self._tip + 1)) != self._tip + 1 - start:
            raise StoreCorrupted(f"{self.path}: rows below the tip are missing")

    # Backend primitives.

    def _row_to_block(self, row: tuple[int, bytes, bytes, bytes]) -> StoredBlock:
        height, block_hash, checksum, data = row
        if (
            not isinstance(block_hash, bytes)
            or not isinstance(data, bytes)
            or checksum != _block_checksum(height, block_hash, data)
        ):
            raise StoreCorrupted(f"{self.path}: block at height {height} fails its checksum")
        return StoredBlock(height, block_hash, data)

    def _read(self, height: int) -> StoredBlock | None:
        with _sqlite_errors(f"reading height {height}"):
            row = self._conn.execute(
                "SELECT height, hash, checksum, data FROM blocks WHERE height = ?", (height,)
            ).fetchone()
        return None if row is None else self._row_to_block(row)

    def _read_range(self, start: int, stop: int) -> list[StoredBlock]:
        with _sqlite_errors(f"reading heights {start}..{stop - 1}"):
            rows = self._conn.execute(
                "SELECT height, hash, checksum, data FROM blocks "
                "WHERE height >= ? AND height < ? ORDER BY height",
                (start, stop),
            ).fetchall()
        blocks = [self._row_to_block(row) for row in rows]
        for expected, block in enumerate(blocks, start=start):
            if block.height != expected:
                raise StoreCorrupted(f"{self.path}: block at height {expected} is missing")
        return blocks

    def _height_of(self, block_hash: bytes) -> int | None:
        with _sqlite_errors("looking up a block hash"):
            row = self._conn.execute(
                "SELECT height FROM blocks WHERE hash = ?", (block_hash,)
            ).fetchone()
        return None if row is None else row[0]

    def _write(self, blocks: list[StoredBlock]) -> None:
        rows = [
            (b.height, b.block_hash, _block_checksum(b.height, b.block_hash, b.data), b.data)
            for b in blocks
        ]
        self._transaction(
            f"appending heights {blocks[0].height}..{blocks[-1].height}",
            "INSERT INTO blocks (height, hash, checksum, data) VALUES (?, ?, ?, ?)",
            rows,
        )

    def _read_meta(self, key: bytes) -> bytes | None:
        with _sqlite_errors("reading meta"):
            row = self._conn.execute(
                "SELECT checksum, value FROM meta WHERE key = ?", (key,)
            ).fetchone()
        if row is None:
            return None
        checksum, value = row
        if not isinstance(value, bytes) or checksum != _meta_checksum(key, value):
            name = key.decode("utf-8", "replace")
            raise StoreCorrupted(f"{self.path}: meta {name!r} fails its checksum")
        return value

    def _write_meta(self, key: bytes, value: bytes, durable: bool) -> None:
        # In WAL mode synchronous=NORMAL commits without syncing the log;
        # the next FULL commit (any block append) syncs these frames too.
        if not durable:
            self._conn.execute("PRAGMA synchronous = NORMAL")
        try:
            self._transaction(
                "writing meta",
                "INSERT OR REPLACE INTO meta (key, checksum, value) VALUES (?, ?, ?)",
                [(key, _meta_checksum(key, value), value)],
            )
        finally:
            if not durable:
                self._conn.execute("PRAGMA synchronous = FULL")

    def _meta_keys(self) -> list[bytes]:
        with _sqlite_errors("listing meta"):
            return [row[0] for row in self._conn.execute("SELECT key FROM meta")]

    def _read_tip(self) -> int:
        with _sqlite_errors("reading the tip"):
            high = self._conn.execute("SELECT MAX(height) FROM blocks").fetchone()[0]
        return -1 if high is None else high

    def _transaction(self, doing: str, sql: str, rows: list[tuple]) -> None:
        """Run ``sql`` over ``rows`` in one transaction: all of it or none."""
        conn = self._conn
        with _sqlite_errors(doing):
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(sql, rows)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _release(self) -> None:
        """Checkpoint the log into the database file, then close. A failed
        checkpoint loses nothing: the log stays and is replayed on open."""
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with _sqlite_errors("closing"):
            self._conn.close()


def _sync_directory(directory: Path) -> None:
    """Make a newly created file's directory entry durable (POSIX only)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
