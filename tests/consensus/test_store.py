"""Block stores: one conformance suite run over every store, the SQLite
store's checks against damaged files, and SIGKILL of real writer processes.

* Conformance (parametrized over ``memory`` and ``sqlite``): contiguous
  heights, lookups by hash, all-or-nothing ``append_many``, meta, a closed
  store, and bad input refused with :class:`StoreError` leaving the store
  as it was.
* Equivalence (Hypothesis): any sequence of operations, valid or not, gives
  the same answers from both stores (the SQLite one reopened at random
  points) and raises nothing but :class:`StoreError` subclasses.
* Damage: a file that is not SQLite, another application's database, a
  newer schema version, a truncated file, flipped bytes in a block, a meta
  value or anywhere at all: :class:`StoreCorrupted` (or a clear
  :class:`StoreError` for the version), never a ``sqlite3`` error and never
  wrong bytes returned.
* Crash: a writer process (``store_writer_process.py``) appends blocks of
  random sizes and is SIGKILLed at random moments; after each kill every
  acknowledged block is present with exactly its bytes, heights are
  contiguous and no row is torn.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedchain.consensus.errors import StoreCorrupted, StoreError
from fedchain.consensus.store import (
    HASH_BYTES,
    MAX_META_BYTES,
    MAX_META_KEY_BYTES,
    SCHEMA_VERSION,
    BlockStore,
    MemoryBlockStore,
    SqliteBlockStore,
    StoredBlock,
    open_block_store,
)
from fedchain.sims.bench_recovery import ScriptWriter, block_for, kill_writer, parse_acks

WRITER_SCRIPT = Path(__file__).with_name("store_writer_process.py")
KINDS = ["memory", "sqlite"]


def make_block(height: int, size: int = 64, tag: bytes = b"") -> StoredBlock:
    data = hashlib.sha256(tag + b"%d" % height).digest() * (size // 32 + 1)
    data = data[:size]
    return StoredBlock(height, hashlib.sha256(b"hash" + tag + data).digest(), data)


def chain(n: int, tag: bytes = b"") -> list[StoredBlock]:
    return [make_block(h, 64 + 37 * h, tag) for h in range(n)]


@pytest.fixture(params=KINDS)
def store(request, tmp_path) -> Iterator[BlockStore]:
    opened = (
        MemoryBlockStore() if request.param == "memory" else SqliteBlockStore(tmp_path / "s.db")
    )
    with opened:
        yield opened


def contents(store: BlockStore) -> list[StoredBlock]:
    return list(store.blocks())


# --- conformance: every store ---------------------------------------------------------


def test_an_empty_store(store):
    assert isinstance(store, BlockStore)
    assert store.tip() == -1
    assert store.get(0) is None
    assert store.get_by_hash(b"\x00" * HASH_BYTES) is None
    assert contents(store) == []
    assert store.get_meta("view") is None
    assert store.verify() == 0


def test_appended_blocks_read_back_by_height_hash_and_range(store):
    blocks = chain(10)
    for block in blocks:
        store.append(block)
    assert store.tip() == 9
    assert [store.get(h) for h in range(10)] == blocks
    assert [store.get_by_hash(b.block_hash) for b in blocks] == blocks
    assert contents(store) == blocks
    assert list(store.blocks(7)) == blocks[7:]
    assert list(store.blocks(10)) == []
    assert list(store.blocks(10**30)) == []
    assert store.get(10) is None and store.get(-1) is None and store.get(2**80) is None
    assert store.verify() == 10


def test_bytes_like_input_is_stored_as_bytes(store):
    block = make_block(0)
    store.append(StoredBlock(0, bytearray(block.block_hash), memoryview(block.data)))
    assert store.get(0) == block
    assert type(store.get(0).data) is bytes


def test_empty_data_is_a_block(store):
    store.append(StoredBlock(0, b"\x01" * 32, b""))
    assert store.get(0) == StoredBlock(0, b"\x01" * 32, b"")


@pytest.mark.parametrize("height", [0, 2, 5, -1, 2**70])
def test_a_height_other_than_tip_plus_one_is_refused(store, height):
    store.append(make_block(0))
    with pytest.raises(StoreError, match="next height is 1"):
        store.append(make_block(height))
    with pytest.raises(StoreError):
        store.append(make_block(0, tag=b"again"))
    assert contents(store) == [make_block(0)]


@pytest.mark.parametrize(
    "block",
    [
        StoredBlock(0, b"\x00" * 31, b"x"),
        StoredBlock(0, b"\x00" * 33, b"x"),
        StoredBlock(0, b"", b"x"),
        StoredBlock(0, "a" * 32, b"x"),
        StoredBlock(0, None, b"x"),
        StoredBlock(0, b"\x00" * 32, "text"),
        StoredBlock(0, b"\x00" * 32, None),
        StoredBlock(True, b"\x00" * 32, b"x"),
        StoredBlock(0.0, b"\x00" * 32, b"x"),
        StoredBlock("0", b"\x00" * 32, b"x"),
    ],
    ids=repr,
)
def test_malformed_blocks_are_refused(store, block):
    with pytest.raises(StoreError):
        store.append(block)
    assert store.tip() == -1 and contents(store) == []


@pytest.mark.parametrize("thing", [None, b"block", (0, b"\x00" * 32, b"x")], ids=repr)
def test_append_takes_only_stored_blocks(store, thing):
    with pytest.raises(StoreError):
        store.append(thing)
    with pytest.raises(StoreError):
        store.append_many(thing)
    assert store.tip() == -1


@pytest.mark.parametrize("bad", [b"\x00" * 31, "a" * 32, None, 7])
def test_lookups_refuse_malformed_arguments(store, bad):
    with pytest.raises(StoreError):
        store.get_by_hash(bad)
    with pytest.raises(StoreError):
        store.get(str(bad))
    with pytest.raises(StoreError):
        store.blocks(-1)


def test_a_hash_is_stored_once(store):
    first = make_block(0)
    store.append(first)
    with pytest.raises(StoreError, match="already stored"):
        store.append(StoredBlock(1, first.block_hash, b"other bytes"))
    assert store.tip() == 0 and store.get_by_hash(first.block_hash) == first


def test_append_many_stores_all_or_nothing(store):
    blocks = chain(8)
    store.append_many(blocks[:3])
    assert store.tip() == 2
    broken = [*blocks[3:6], make_block(7), blocks[7]]  # height 6 is missing
    with pytest.raises(StoreError, match="next height is 6"):
        store.append_many(broken)
    duplicate = [blocks[3], StoredBlock(4, blocks[3].block_hash, b"x")]
    with pytest.raises(StoreError, match="already stored"):
        store.append_many(duplicate)
    assert contents(store) == blocks[:3]
    store.append_many(iter(blocks[3:]))
    store.append_many([])
    assert contents(store) == blocks


def test_meta_is_set_overwritten_and_kept_apart_from_blocks(store):
    store.put_meta("view", b"\x00\x01")
    store.put_meta("checkpoint", b"")
    store.put_meta("view", b"\x00\x02")
    store.put_meta("δ\x00key", bytearray(b"unicode and NUL"))
    assert store.get_meta("view") == b"\x00\x02"
    assert store.get_meta("checkpoint") == b""
    assert store.get_meta("δ\x00key") == b"unicode and NUL"
    assert store.get_meta("δ") is None
    assert store.tip() == -1


BAD_KEYS = ["", "k" * (MAX_META_KEY_BYTES + 1), "\ud800", b"key", None]
BAD_VALUES = ["value", None, b"v" * (MAX_META_BYTES + 1)]


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda x: repr(x)[:20])
def test_malformed_meta_keys_are_refused(store, key):
    store.put_meta("key", b"before")
    with pytest.raises(StoreError):
        store.put_meta(key, b"v")
    with pytest.raises(StoreError):
        store.get_meta(key)
    assert store.get_meta("key") == b"before"


@pytest.mark.parametrize("value", BAD_VALUES, ids=lambda x: repr(x)[:20])
def test_malformed_meta_values_are_refused(store, value):
    store.put_meta("key", b"before")
    with pytest.raises(StoreError):
        store.put_meta("key", value)
    assert store.get_meta("key") == b"before"


def test_a_closed_store_refuses_everything(store):
    store.append(make_block(0))
    store.append(make_block(1))
    walking = store.blocks()
    assert next(walking) == make_block(0)
    store.close()
    store.close()  # closing twice is fine
    calls = [
        lambda: store.append(make_block(2)),
        lambda: store.append_many([make_block(2)]),
        lambda: store.get(0),
        lambda: store.get_by_hash(make_block(0).block_hash),
        store.tip,
        lambda: list(store.blocks()),
        lambda: next(walking),
        lambda: store.put_meta("k", b"v"),
        lambda: store.get_meta("k"),
        store.verify,
    ]
    for call in calls:
        with pytest.raises(StoreError, match="closed"):
            call()


@pytest.mark.parametrize("kind", KINDS)
def test_a_store_is_a_context_manager_that_closes(kind, tmp_path):
    path = None if kind == "memory" else tmp_path / "s.db"
    with open_block_store(path) as store:
        assert isinstance(store, MemoryBlockStore if kind == "memory" else SqliteBlockStore)
        store.append(make_block(0))
    with pytest.raises(StoreError, match="closed"):
        store.tip()


# --- both stores answer alike (Hypothesis) ---------------------------------------------

_hashes = st.sampled_from([bytes([i]) * 32 for i in range(6)])
_ops = st.one_of(
    st.tuples(
        st.just("append"),
        st.integers(-2, 2),
        st.one_of(_hashes, st.binary(max_size=40)),
        st.binary(max_size=300),
    ),
    st.tuples(st.just("append_many"), st.integers(-1, 1), st.lists(_hashes, max_size=4)),
    st.tuples(st.just("get"), st.integers(-3, 12)),
    st.tuples(st.just("get_by_hash"), st.one_of(_hashes, st.binary(max_size=33))),
    st.tuples(st.just("blocks"), st.integers(-2, 12)),
    st.tuples(
        st.just("put_meta"),
        st.sampled_from(["a", "b", "", "\ud800", "é" * 200]),
        st.binary(max_size=20),
    ),
    st.tuples(st.just("get_meta"), st.sampled_from(["a", "b", "c", ""])),
    st.tuples(st.just("tip")),
    st.tuples(st.just("reopen")),
)


def _apply(store: BlockStore, op: tuple) -> object:
    name, *arguments = op
    if name == "append":
        offset, block_hash, data = arguments
        return store.append(StoredBlock(store.tip() + 1 + offset, block_hash, data))
    if name == "append_many":
        offset, hashes = arguments
        first = store.tip() + 1 + offset
        return store.append_many(StoredBlock(first + i, h, b"%d" % i) for i, h in enumerate(hashes))
    if name == "blocks":
        return list(store.blocks(arguments[0]))
    if name in ("reopen", "tip"):
        return store.tip()
    return getattr(store, name)(*arguments)


def _outcome(store: BlockStore, op: tuple) -> object:
    try:
        return ("ok", _apply(store, op))
    except StoreError as exc:
        return ("error", type(exc).__name__)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(_ops, max_size=25))
def test_both_stores_answer_every_sequence_alike(ops, tmp_path_factory):
    path = tmp_path_factory.mktemp("eq") / "s.db"
    memory, sqlite = MemoryBlockStore(), SqliteBlockStore(path)
    try:
        for op in ops:
            if op[0] == "reopen":
                sqlite.close()
                sqlite = SqliteBlockStore(path)
            assert _outcome(memory, op) == _outcome(sqlite, op), op
        assert contents(memory) == contents(sqlite)
        assert memory.verify() == sqlite.verify() == memory.tip() + 1
    finally:
        sqlite.close()


# --- the SQLite store: durability settings and reopening ---------------------------------


def test_blocks_and_meta_survive_reopening(tmp_path):
    blocks = chain(20)
    with SqliteBlockStore(tmp_path / "s.db") as store:
        store.append_many(blocks[:10])
        for block in blocks[10:]:
            store.append(block)
        store.put_meta("view", b"3")
    with SqliteBlockStore(tmp_path / "s.db") as store:
        assert store.tip() == 19
        assert contents(store) == blocks
        assert store.get_meta("view") == b"3"
        assert store.verify() == 20


def test_a_meta_write_without_fsync_survives_its_process_being_killed(tmp_path):
    """``durable=False`` (PBFT's journal under ``--journal-sync normal``)
    skips the fsync, not the write: a SIGKILL right after it returns loses
    nothing, and the connection is back at FULL for the next block."""
    path = tmp_path / "s.db"
    code = (
        "import os, signal, sys\n"
        "from fedchain.consensus.store import SqliteBlockStore\n"
        "store = SqliteBlockStore(sys.argv[1])\n"
        "store.put_meta('pbft.view', b'fast', durable=False)\n"
        "assert store._conn.execute('PRAGMA synchronous').fetchone()[0] == 2\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    with SqliteBlockStore(path) as store:
        assert store.get_meta("pbft.view") == b"fast"


def test_the_store_runs_wal_with_full_sync_and_locks_out_a_second_opener(tmp_path):
    with SqliteBlockStore(tmp_path / "s.db") as store:
        conn = store._conn  # the durability settings are the point of this test
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        store.append(make_block(0))
        with pytest.raises(StoreError, match="in use") as refused:
            SqliteBlockStore(tmp_path / "s.db", timeout_s=0.05)
        assert not isinstance(refused.value, StoreCorrupted)
        store.append(make_block(1))  # the first opener is unaffected
    with SqliteBlockStore(tmp_path / "s.db") as store:
        assert store.tip() == 1


def test_an_unopenable_path_is_a_store_error(tmp_path):
    with pytest.raises(StoreError):
        SqliteBlockStore(tmp_path / "no-such-dir" / "s.db")
    with pytest.raises(StoreError):
        SqliteBlockStore(tmp_path)  # a directory


def test_an_empty_file_becomes_an_empty_store(tmp_path):
    """SQLite reads a zero-length file as an empty database; so does the store."""
    (tmp_path / "s.db").write_bytes(b"")
    with SqliteBlockStore(tmp_path / "s.db") as store:
        assert store.tip() == -1


# --- the SQLite store: damaged files ---------------------------------------------------


@pytest.fixture
def written(tmp_path) -> Path:
    """A cleanly closed store of 40 blocks (so everything is in the main file)."""
    path = tmp_path / "s.db"
    with SqliteBlockStore(path) as store:
        store.append_many(chain(40))
        store.put_meta("view", b"meta value 0123456789")
    return path


def test_a_file_that_is_not_sqlite_is_corrupted(tmp_path):
    path = tmp_path / "s.db"
    path.write_bytes(b"these are not the bytes you are looking for\n" * 100)
    with pytest.raises(StoreCorrupted):
        SqliteBlockStore(path)
    assert path.read_bytes().startswith(b"these are not")  # left as it was


def test_another_applications_database_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    with pytest.raises(StoreCorrupted, match="not a fedchain block store"):
        SqliteBlockStore(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]
    conn.close()


def _raw(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for sql in statements:
            conn.execute(sql)
    finally:
        conn.close()


def test_another_schema_version_is_a_clear_store_error(written):
    _raw(written, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="schema version 2") as refused:
        SqliteBlockStore(written)
    assert not isinstance(refused.value, StoreCorrupted)


def test_a_changed_schema_is_corrupted(written):
    _raw(written, "ALTER TABLE blocks ADD COLUMN extra")
    with pytest.raises(StoreCorrupted, match="schema"):
        SqliteBlockStore(written)


def test_a_missing_height_is_found_on_open(written):
    _raw(written, "DELETE FROM blocks WHERE height = 17")
    with pytest.raises(StoreCorrupted, match="contiguous"):
        SqliteBlockStore(written)


@pytest.mark.parametrize("keep", ["100", "4096", "1/2", "9/10", "-1"])
def test_a_truncated_file_is_corrupted(written, keep):
    data = written.read_bytes()
    cut = {"100": 100, "4096": 4096, "1/2": len(data) // 2, "9/10": len(data) * 9 // 10}
    written.write_bytes(data[: cut.get(keep, len(data) - 1)])
    with pytest.raises(StoreCorrupted):
        SqliteBlockStore(written)


def _flip_inside(path: Path, needle: bytes) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0
    data[at + len(needle) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_block_is_found_on_read(written):
    _flip_inside(written, make_block(5, 64 + 37 * 5).data)
    with SqliteBlockStore(written) as store:  # not a tip row: found when read
        with pytest.raises(StoreCorrupted, match="height 5"):
            store.get(5)
        with pytest.raises(StoreCorrupted, match="height 5"):
            store.get_by_hash(make_block(5, 64 + 37 * 5).block_hash)
        with pytest.raises(StoreCorrupted, match="height 5"):
            store.verify()
        assert store.get(6) == make_block(6, 64 + 37 * 6)  # the rest reads fine


def test_a_flipped_byte_in_a_tip_row_is_found_on_open(written):
    _flip_inside(written, make_block(39, 64 + 37 * 39).data)
    with pytest.raises(StoreCorrupted, match="height 39"):
        SqliteBlockStore(written)


def test_a_flipped_byte_in_a_meta_value_is_found(written):
    _flip_inside(written, b"meta value 0123456789")
    with SqliteBlockStore(written) as store:
        with pytest.raises(StoreCorrupted, match="view"):
            store.get_meta("view")
        with pytest.raises(StoreCorrupted):
            store.verify()


def test_random_damage_never_returns_wrong_bytes_or_a_sqlite_error(written, tmp_path):
    """Flip bytes anywhere in the file: either the store reads back exactly
    what was written or it raises a StoreError subclass."""
    rng = np.random.default_rng(3)
    clean, blocks = written.read_bytes(), chain(40)
    damaged = tmp_path / "damaged.db"
    outcomes = {"intact": 0, "refused": 0}
    for _ in range(60):
        data = bytearray(clean)
        for at in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
            data[at] ^= 1 << int(rng.integers(0, 8))
        damaged.write_bytes(bytes(data))
        try:
            with SqliteBlockStore(damaged) as store:
                assert contents(store) == blocks[: store.tip() + 1]
                assert store.tip() == 39
                assert store.get_meta("view") == b"meta value 0123456789"
            outcomes["intact"] += 1
        except StoreError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0  # the damage was noticed at least sometimes


# --- SIGKILL of a real writer process ----------------------------------------------------


def _check_after_kill(path: Path, previous_tip: int, acked: list[int]) -> int:
    """Reopen and check the promise; return the new tip."""
    with SqliteBlockStore(path) as store:
        tip = store.tip()
        assert acked == list(range(previous_tip + 1, previous_tip + 1 + len(acked)))
        assert all(h <= tip for h in acked), "an acknowledged block is missing"
        assert tip - (previous_tip + len(acked)) in (0, 1)  # at most one commit unacked
        for height in range(previous_tip + 1, tip + 1):
            assert store.get(height) == block_for(height), f"height {height} is torn"
        assert [b.height for b in store.blocks()] == list(range(tip + 1))
        meta = store.get_meta("writer/last")
        assert meta is None or int(meta) <= tip
    return tip


def test_sigkilled_writers_never_lose_or_tear_an_acknowledged_block(tmp_path):
    rng = np.random.default_rng(7)  # six kills after the writer opened, one before
    path, ack_path = tmp_path / "chain.db", tmp_path / "acks"
    tip, kills_after_writing = -1, 0
    for _ in range(7):
        start = tip + 1

        def writer(acks: Path, start: int = start) -> ScriptWriter:
            return ScriptWriter(WRITER_SCRIPT, path, start, acks)

        acks, code, _ = kill_writer(
            writer, ack_path, rng, max_delay=0.4, early_window=1.0, early_share=0.15
        )
        assert code == -9, "the writer ended before its kill"
        tip = _check_after_kill(path, tip, acks.heights)
        kills_after_writing += bool(acks.heights)
    assert kills_after_writing >= 4  # most kills landed while blocks were being written
    assert tip >= 20
    with SqliteBlockStore(path) as store:
        assert store.verify() == tip + 1


def test_a_writer_refuses_to_start_anywhere_but_the_tip(tmp_path):
    path = tmp_path / "chain.db"
    with SqliteBlockStore(path) as store:
        store.append(block_for(0))
    done = subprocess.run(
        [sys.executable, str(WRITER_SCRIPT), str(path), "5"], capture_output=True, timeout=60
    )
    assert done.returncode == 2 and b"store tip is 0" in done.stderr
    assert parse_acks(done.stdout).heights == []


def test_acks_cut_short_by_the_kill_are_not_counted():
    acks = parse_acks(b"open\n0\n1\nm0\n2\n3")
    assert acks.opened and acks.heights == [0, 1, 2] and acks.meta == [0]


def test_bench_recovery_at_tiny_scale(tmp_path):
    done = subprocess.run(
        [
            *(sys.executable, "-m", "fedchain.sims.cli", "bench", "recovery", "--kills", "4"),
            *("--kills-per-store", "2", "--rate-seconds", "0.1", "--dir", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "recovery"
    assert figures["kills"] == figures["kills_survived"] == 4
    assert figures["blocks_lost"] == figures["torn_rows"] == figures["meta_errors"] == 0
    assert figures["reopen_failures"] == figures["writer_failures"] == 0
    assert figures["blocks_written"] >= figures["blocks_acknowledged"]
    assert figures["append_2KB_blocks_per_s"] > 0
    assert 0 <= figures["reopen_p50_ms"] <= figures["reopen_p99_ms"]
    assert figures["peak_rss_bytes"] > 0
    assert list(tmp_path.iterdir()) == []  # the stores were removed


def test_a_live_store_copied_with_its_log_opens_elsewhere(tmp_path):
    """What a crash leaves (the database file and an unmerged log) opens."""
    path = tmp_path / "s.db"
    store = SqliteBlockStore(path)
    store.append_many(chain(5))
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (path.name, path.name + "-wal"):
        if (tmp_path / name).exists():
            shutil.copy(tmp_path / name, copy / name)
    store.close()
    with SqliteBlockStore(copy / path.name) as reopened:
        assert contents(reopened) == chain(5)
