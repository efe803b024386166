"""``fedchain bench recovery``: SIGKILL a block writer hundreds of times.

A writer process appends blocks of random sizes (100 B to 200 KB,
log-uniform, so both tiny and large blocks are common) to a
:class:`~fedchain.consensus.store.SqliteBlockStore` as fast as it can, and
acknowledges each height on its output only after ``append`` returned, as a
node acknowledges a commit. This process kills it with SIGKILL at a random
moment, reopens the store and checks the promise of the module docstring of
``fedchain.consensus.store``: every acknowledged block is there with exactly
its bytes (a block's bytes are a function of its height, so they can be
recomputed here), heights run 0..tip with none missing, and no row is torn.
Then it starts a writer from ``tip + 1`` and kills it again.

About one kill in ten comes within 50 ms of the writer's start, often before
it has opened the store, so some kills land in SQLite's log recovery or in
the creation of a fresh database file.

Writers start from a fork server that has already imported the store, so a
kill costs milliseconds of start-up rather than a whole interpreter's; the
test suite starts its writers as plain ``python script`` processes
(``tests/consensus/store_writer_process.py``), which run the same
:func:`write_blocks` loop. Each store takes ``--kills-per-store`` kills, then
is checked row by row and replaced, so the reopen times stay comparable.

Figures: kills survived, blocks written and acknowledged, blocks lost
(acknowledged, then missing or different: must be 0), torn rows (rows whose
bytes or checksum are wrong: must be 0), reopen time p50/p99, the append
rate seen by the writers (synchronous=FULL, one fsync per block), and the
steady append rate of ~2 KB blocks measured in this process.

Top-level imports stay light: ``fedchain --help`` imports this module.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .arguments import int_at_least, seconds

MIN_BLOCK_BYTES = 100
MAX_BLOCK_BYTES = 200_000
META_KEY = "writer/last"
META_EVERY = 8  # the writer records its height in the store's meta this often
WRITER_LIFETIME_S = 60.0  # a writer whose parent died stops by itself
READY_TIMEOUT_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kills", type=int_at_least(0), default=300, help="SIGKILLs to survive (default 300)"
    )
    parser.add_argument(
        "--seed", type=int_at_least(0), default=0, help="seed for kill moments (default 0)"
    )
    parser.add_argument(
        "--max-delay",
        type=seconds(zero_ok=True),
        default=0.2,
        help="longest a writer runs before its kill, in seconds (default 0.2)",
    )
    parser.add_argument(
        "--kills-per-store",
        type=int_at_least(1),
        default=50,
        help="kills before the store is checked in full and replaced (default 50)",
    )
    parser.add_argument(
        "--rate-seconds",
        type=seconds(),
        default=1.0,
        help="seconds spent measuring the steady ~2 KB append rate (default 1)",
    )
    parser.add_argument("--dir", default=None, help="where to put the stores (default: a temp dir)")
    parser.add_argument(
        "--json-only", action="store_true", help="print only the JSON line, no table"
    )


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="fedchain-recovery-", dir=args.dir) as workdir:
        figures = _measure(args, Path(workdir))
    _report(figures, json_only=args.json_only)
    return 0 if figures["blocks_lost"] == 0 and figures["torn_rows"] == 0 else 1


# --- the writer (runs in the killed process) ---------------------------------------------


def block_for(height: int):
    """The block the writers store at ``height``: its size and bytes are a
    function of the height alone, so a checker can recompute them."""
    from fedchain.consensus.store import StoredBlock

    rng = random.Random(height)
    data = rng.randbytes(_size(rng))
    return StoredBlock(height, hashlib.sha256(height.to_bytes(8, "big") + data).digest(), data)


def block_size(height: int) -> int:
    """``len(block_for(height).data)``, without making the bytes."""
    return _size(random.Random(height))


def _size(rng: random.Random) -> int:
    return int(math.exp(rng.uniform(math.log(MIN_BLOCK_BYTES), math.log(MAX_BLOCK_BYTES))))


def write_blocks(store_path: str, start: int, ack_fd: int) -> int:
    """Append blocks from ``start`` until killed, acknowledging each.

    Writes ``open`` to ``ack_fd`` once the store is open, then ``<height>``
    after each ``append`` returned and ``m<height>`` after each meta write.
    Each line is one ``os.write``: no buffer can hold an acknowledgement
    back. Returns 2 when the store's tip is not ``start - 1`` (the parent
    and the store disagree), 0 after ``WRITER_LIFETIME_S`` as a safety net.
    """
    from fedchain.consensus.store import SqliteBlockStore

    with SqliteBlockStore(store_path) as store:
        if store.tip() != start - 1:
            os.write(2, f"store tip is {store.tip()}, asked to start at {start}\n".encode())
            return 2
        os.write(ack_fd, b"open\n")
        deadline = time.monotonic() + WRITER_LIFETIME_S
        height = start
        while time.monotonic() < deadline:
            store.append(block_for(height))
            os.write(ack_fd, b"%d\n" % height)
            if height % META_EVERY == 0:
                store.put_meta(META_KEY, b"%d" % height)
                os.write(ack_fd, b"m%d\n" % height)
            height += 1
    return 0


def _forked_writer(store_path: str, start: int, ack_path: str) -> None:
    fd = os.open(ack_path, os.O_WRONLY | os.O_APPEND)
    sys.exit(write_blocks(store_path, start, fd))


# --- acknowledgements and the check after a kill -----------------------------------------


@dataclass
class Acks:
    """What a killed writer acknowledged (complete lines only)."""

    opened: bool = False
    heights: list[int] = field(default_factory=list)
    meta: list[int] = field(default_factory=list)


def parse_acks(text: bytes) -> Acks:
    """A writer's output; a line cut short by the kill is not an ack."""
    acks = Acks()
    for line in text.split(b"\n")[:-1]:
        if line == b"open":
            acks.opened = True
        elif line.startswith(b"m"):
            acks.meta.append(int(line[1:]))
        else:
            acks.heights.append(int(line))
    return acks


@dataclass
class KillCheck:
    """One kill's outcome, as the reopened store shows it."""

    reopen_s: float
    tip: int
    acked: int
    written: int  # rows new since the previous tip
    lost: int  # acknowledged, then missing or different
    torn: int  # new rows whose bytes are not the block's
    meta_ok: bool
    error: str | None = None


def check_after_kill(path: Path, previous_tip: int, acks: Acks, last_meta: int) -> KillCheck:
    """Reopen the store and compare it with what the writer acknowledged."""
    from fedchain.consensus.errors import StoreCorrupted, StoreError
    from fedchain.consensus.store import SqliteBlockStore

    began = time.perf_counter()
    try:
        store = SqliteBlockStore(path)
    except StoreError as exc:  # every acknowledged block is out of reach: all lost
        acked, torn = len(acks.heights), int(isinstance(exc, StoreCorrupted))
        return KillCheck(0.0, previous_tip, acked, 0, acked, torn, False, str(exc))
    with store:
        reopen_s = time.perf_counter() - began
        tip = store.tip()
        torn = sum(not _row_is_intact(store, h) for h in range(previous_tip + 1, tip + 1))
        lost = sum(h > tip or not _row_is_intact(store, h) for h in acks.heights)
        meta = store.get_meta(META_KEY)
    expected_meta = max([last_meta, *acks.meta])
    meta_ok = (meta is None and expected_meta < 0) or (
        meta is not None and expected_meta <= int(meta) <= tip
    )
    written = tip - previous_tip
    return KillCheck(reopen_s, tip, len(acks.heights), written, lost, torn, meta_ok)


def _row_is_intact(store: Any, height: int) -> bool:
    from fedchain.consensus.errors import StoreError

    try:
        return store.get(height) == block_for(height)
    except StoreError:
        return False


# --- starting and killing writers ---------------------------------------------------------


class Writer(Protocol):
    def kill(self) -> None: ...

    def wait(self) -> int | None: ...


class ForkedWriter:
    """A writer forked from a server that has the store imported already."""

    def __init__(self, context: Any, store_path: Path, start: int, ack_path: Path) -> None:
        self._process = context.Process(
            target=_forked_writer, args=(str(store_path), start, str(ack_path)), daemon=True
        )
        self._process.start()

    def kill(self) -> None:
        if self._process.pid is not None:
            os.kill(self._process.pid, signal.SIGKILL)

    def wait(self) -> int | None:
        self._process.join()
        return self._process.exitcode


class ScriptWriter:
    """A writer as a plain ``python SCRIPT DBPATH START`` process."""

    def __init__(self, script: Path, store_path: Path, start: int, ack_path: Path) -> None:
        with open(ack_path, "ab") as out:
            self._process = subprocess.Popen(
                [sys.executable, str(script), str(store_path), str(start)], stdout=out
            )

    def kill(self) -> None:
        self._process.send_signal(signal.SIGKILL)

    def wait(self) -> int | None:
        return self._process.wait()


def kill_writer(
    start_writer: Callable[[Path], Writer],
    ack_path: Path,
    rng: Any,
    *,
    max_delay: float,
    early_window: float,
    early_share: float = 0.1,
) -> tuple[Acks, int | None, float | None]:
    """Start a writer, SIGKILL it at a random moment, return what it acked,
    its exit code (-9 when the kill landed) and how long it was writing
    (None for an early kill, whose writing time is unknown).

    With probability ``early_share`` the kill comes within ``early_window``
    of the start, whether or not the writer opened the store yet; otherwise
    it comes ``uniform(0, max_delay)`` after the writer said ``open``.
    """
    ack_path.write_bytes(b"")
    writer = start_writer(ack_path)
    began = time.monotonic()
    writing_s = None
    try:
        if rng.random() < early_share:
            time.sleep(rng.uniform(0.0, early_window))
        else:
            ready = _wait_for_open(ack_path, began + READY_TIMEOUT_S)
            delay = rng.uniform(0.0, max_delay)
            time.sleep(delay)
            writing_s = delay if ready else None
    finally:
        writer.kill()
        code = writer.wait()
    return parse_acks(ack_path.read_bytes()), code, writing_s


def _wait_for_open(ack_path: Path, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if ack_path.stat().st_size >= len(b"open\n"):
            return True
        time.sleep(0.001)
    return False


# --- the benchmark -------------------------------------------------------------------------


@dataclass
class Tally:
    kills: int = 0
    survived: int = 0
    killed_before_open: int = 0
    writer_failures: int = 0
    reopen_failures: int = 0
    acked: int = 0
    written: int = 0
    committed_unacked: int = 0
    lost: int = 0
    torn: int = 0
    meta_errors: int = 0
    rate_s: float = 0.0
    rate_blocks: int = 0
    rate_bytes: int = 0
    stores: int = 0
    reopen_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import multiprocessing

    import numpy as np

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["fedchain.consensus.store", __name__])
    rng = np.random.default_rng(args.seed)
    tally = Tally()
    rate = _steady_rate(workdir / "rate.db", args.rate_seconds)  # before the disk is busy
    began = time.perf_counter()
    _run_kills(args, workdir, context, rng, tally)
    kills_s = time.perf_counter() - began
    return _figures(args, tally, kills_s, rate)


def _run_kills(args, workdir: Path, context: Any, rng: Any, tally: Tally) -> None:
    from fedchain.sims.report import progress

    ack_path = workdir / "acks"
    with progress() as bar:
        task = bar.add_task("SIGKILL the writer", total=args.kills)
        store_path, tip, last_meta = _fresh_store(workdir, tally)
        for kill in range(args.kills):
            if kill and kill % args.kills_per_store == 0:
                _check_whole_store(store_path, tally)
                store_path, tip, last_meta = _fresh_store(workdir, tally)
            store_path, tip, last_meta = _one_kill(
                args, context, rng, (store_path, tip, last_meta), ack_path, tally
            )
            bar.advance(task)
        _check_whole_store(store_path, tally)


def _fresh_store(workdir: Path, tally: Tally) -> tuple[Path, int, int]:
    tally.stores += 1
    return workdir / f"store-{tally.stores}.db", -1, -1


def _one_kill(args, context, rng, current, ack_path, tally) -> tuple[Path, int, int]:
    store_path, tip, last_meta = current

    def start(acks: Path) -> Writer:
        return ForkedWriter(context, store_path, tip + 1, acks)

    acks, code, writing_s = kill_writer(
        start, ack_path, rng, max_delay=args.max_delay, early_window=0.05
    )
    check = check_after_kill(store_path, tip, acks, last_meta)
    _count(tally, acks, code, writing_s, check)
    if check.error is not None:  # the store is unusable: count it and start another
        return _fresh_store(store_path.parent, tally)
    return store_path, check.tip, max([last_meta, *acks.meta])


def _count(
    tally: Tally, acks: Acks, code: int | None, writing_s: float | None, check: KillCheck
) -> None:
    tally.kills += 1
    tally.killed_before_open += not acks.opened
    tally.writer_failures += code != -signal.SIGKILL
    tally.reopen_failures += check.error is not None
    tally.acked += check.acked
    tally.written += check.written
    tally.committed_unacked += check.written - check.acked
    tally.lost += check.lost
    tally.torn += check.torn
    tally.meta_errors += not check.meta_ok
    if writing_s is not None:
        tally.rate_s += writing_s
        tally.rate_blocks += len(acks.heights)
        tally.rate_bytes += sum(block_size(h) for h in acks.heights)
    if check.error is None:
        tally.reopen_s.append(check.reopen_s)
    else:
        tally.errors.append(check.error)
    intact = check.error is None and check.lost == 0 and check.torn == 0 and check.meta_ok
    tally.survived += intact and code == -signal.SIGKILL


def _check_whole_store(store_path: Path, tally: Tally) -> None:
    """Every row of a store that took its kills: checksums and content."""
    from fedchain.consensus.errors import StoreError
    from fedchain.consensus.store import SqliteBlockStore

    if not store_path.exists():
        return
    try:
        with SqliteBlockStore(store_path) as store:
            store.verify()
            tally.torn += sum(block != block_for(block.height) for block in store.blocks())
    except StoreError as exc:
        tally.torn += 1
        tally.errors.append(f"full check: {exc}")
    for leftover in store_path.parent.glob(store_path.name + "*"):
        leftover.unlink()


def _steady_rate(path: Path, seconds: float) -> float:
    """Blocks/s for ~2 KB blocks appended one per transaction in this process."""
    from fedchain.consensus.store import SqliteBlockStore, StoredBlock

    data = random.Random(0).randbytes(2048)
    with SqliteBlockStore(path) as store:
        began = time.perf_counter()
        height = 0
        while (elapsed := time.perf_counter() - began) < seconds or height < 10:
            digest = hashlib.sha256(height.to_bytes(8, "big")).digest()
            store.append(StoredBlock(height, digest, data))
            height += 1
    return height / elapsed


def _figures(args, tally: Tally, kills_s: float, rate_2k: float) -> dict[str, Any]:
    import numpy as np

    reopen = np.array(tally.reopen_s or [0.0])
    rate_s = max(tally.rate_s, 1e-9)
    return {
        "kills": tally.kills,
        "kills_survived": tally.survived,
        "killed_before_open": tally.killed_before_open,
        "writer_failures": tally.writer_failures,
        "reopen_failures": tally.reopen_failures,
        "stores": tally.stores,
        "blocks_written": tally.written,
        "blocks_acknowledged": tally.acked,
        "committed_unacknowledged": tally.committed_unacked,
        "blocks_lost": tally.lost,
        "torn_rows": tally.torn,
        "meta_errors": tally.meta_errors,
        "append_blocks_per_s": round(tally.rate_blocks / rate_s, 1),
        "append_MBps": round(tally.rate_bytes / rate_s / 1e6, 2),
        "append_2KB_blocks_per_s": round(rate_2k, 1),
        "reopen_p50_ms": round(float(np.percentile(reopen, 50)) * 1e3, 2),
        "reopen_p99_ms": round(float(np.percentile(reopen, 99)) * 1e3, 2),
        "seed": args.seed,
        "max_delay_s": args.max_delay,
        "wall_s": round(kills_s, 1),
        "errors": tally.errors[:5],
    }


def _report(figures: dict[str, Any], *, json_only: bool) -> None:
    from fedchain.sims.report import emit_json, print_table

    if not json_only:
        rows = [
            (name, figures[name])
            for name in (
                "kills",
                "kills_survived",
                "killed_before_open",
                "blocks_written",
                "blocks_acknowledged",
                "committed_unacknowledged",
                "blocks_lost",
                "torn_rows",
                "append_blocks_per_s",
                "append_MBps",
                "append_2KB_blocks_per_s",
                "reopen_p50_ms",
                "reopen_p99_ms",
                "wall_s",
            )
        ]
        print_table("SIGKILL recovery of the SQLite block store", ("figure", "value"), rows)
    emit_json("recovery", figures)
