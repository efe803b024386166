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

YOUNG_THRESHOLD = 1_000_000
"""Why a million and not 50,000 (until 2026-11-27): at 50,000 a saturated
validator still spent 0.5-0.8 s of wall time in young passes during a
30-second point (``gc.callbacks`` timing), against ~0.02 s at 500,000.
At a million, three alternating pairs of ``bench consensus --rates 8000
--seconds 20`` committed 6,433-6,587 against 6,058-6,370 tx/s
(validator CPU 72-74 against 74-78 µs a transaction; end RSS ~3% higher),
and three of ``--rates 8000,16000 --seconds 10`` reached 0.516-0.545 of
the verification bound against 0.499-0.518.
Those passes had collected ~900 objects in a whole run: what waits longer
for collection is next to nothing."""


def tune_for_throughput() -> None:
    """Freeze what exists now (modules, configuration: never garbage) out
    of every future pass, and collect the young generation every
    ``YOUNG_THRESHOLD`` allocations instead of 700."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
