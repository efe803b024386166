"""Garbage-collector settings for long-running processes that hold a big heap.

CPython's cyclic collector runs a young-generation pass every 700 net
allocations and, now and then, a full pass over every tracked object. A
validator allocates a few dozen objects per transaction (decoded frames,
votes, state buckets) on top of a heap of hundreds of thousands (its state,
caches, the loaded modules), so under load those passes took about a third
of block execution (an ad-hoc timing of :meth:`fedchain.consensus.state.State.apply`,
a 1000-transaction block on 80k keys: 96 ms with the default thresholds, 61
ms with the collector off). ``fedchain bench consensus --default-gc``
compares whole validators: 343-409 against 290-382 µs of CPU per
transaction, measured on a busy machine.
Almost nothing a node allocates forms reference cycles, so collecting
rarely loses little memory and gains that time back. In one process
simulating many nodes the gain is smaller but real: 6-7% of wall time for
``bench gossip`` (10,000 nodes) and the virtual-time consensus run, with
identical results.

This is process-wide state, so only entry points of processes call it
(``fedchain node``, ``bench consensus``, ``bench gossip``'s workers), never library code.
"""

from __future__ import annotations

import gc

__all__ = ["tune_for_throughput"]

YOUNG_THRESHOLD = 50_000


def tune_for_throughput() -> None:
    """Freeze what exists now (modules, configuration: never garbage) out
    of every future pass, and collect the young generation every
    ``YOUNG_THRESHOLD`` allocations instead of 700."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
