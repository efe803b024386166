"""A block writer in its own OS process, killed by tests/consensus/test_store.py.

Usage: ``python store_writer_process.py DBPATH START``. It opens the SQLite
block store at DBPATH (whose tip must be START - 1), prints ``open``, then
appends the deterministic blocks of :func:`fedchain.sims.bench_recovery.block_for`
from START on as fast as it can, printing each height only after
``append`` returned (and ``m<height>`` after each meta write), until it is
killed. The loop is the one ``fedchain bench recovery`` kills hundreds of
times; this script only gives it a plain interpreter to run in.
"""

from __future__ import annotations

import sys

from fedchain.sims.bench_recovery import write_blocks


def main(argv: list[str]) -> int:
    store_path, start = argv[1], int(argv[2])
    return write_blocks(store_path, start, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main(sys.argv))
