"""How many transactions a validator lets its clients queue: paced by commits.

A static mempool bound is either too small (blocks cannot fill) or, under
overload, a queue that clients wait through: with 12,000 transactions held
across four validators that commit 1,400 per second, a transaction admitted
past saturation waited ~9 s (measured, ``fedchain bench consensus``), and
the wait grows with the bound, not with the work. Little's law turns a
target queueing delay into a bound: hold what the chain commits in
``queue_seconds`` (each validator its share of it, see below). Past
saturation clients then hear "busy" at once and what is admitted commits
within about ``queue_seconds`` plus a block's round trip, which keeps the
latency flat instead of rising with the offered load (CometBFT bounds its mempool by count and
bytes only; Fabric's ordering service queues without a bound).

Only clients' submissions are paced. A transaction another validator has
admitted and forwarded keeps the mempool's static room (refusing it would
leave it at some validators only; see :meth:`Mempool.add`).

The rate is measured on the node's clock (virtual in a simulation, so runs
stay reproducible) from the commits themselves; ``floor`` keeps room for
full blocks after an idle spell, when there is no rate to go by.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["CommitPacedLimit"]


class CommitPacedLimit:
    """A validator's room for its own clients' transactions: its share of
    ``max(floor, committed tx/s over the window x queue_seconds)``.

    Each validator counts only what its own clients submitted and it still
    holds: the other validators' shares reach it late or never (a backup
    forwards its clients' transactions to the primary alone, see
    :mod:`.service`), so a limit on the whole pool would let each validator
    fill a full share of its own and the cluster queue n times the target.

    The share is this validator's own part of what committed over the
    window (its clients' transactions over all of them), but never below
    1/n of the n validators: one validator serving every client gets the
    whole limit, an even spread gives each 1/n and adds up to it, and one
    whose clients got crowded out climbs back to 1/n rather than shrinking
    with its own commits. With nothing committed in the window the share
    is 1/n (so the floor is not queued n times after an idle spell).
    ``floor`` (two full blocks, so a proposal can fill while one is in
    flight) holds while there is no rate to go by.

    (Before, the share was 1/k for this validator and those whose forwards
    arrived within the window; with forwards sent to the primary alone a
    backup sees none, and each backup took the whole limit: p50 latency
    past saturation rose from ~1.4 s to ~2 s, measured.)"""

    def __init__(self, *, floor: int, queue_seconds: float = 2.0, window: float = 4.0) -> None:
        if floor < 1 or not queue_seconds > 0 or not window > 0:
            raise ValueError("floor >= 1, queue_seconds > 0 and window > 0")
        self.floor = floor
        self.queue_seconds = queue_seconds
        self.window = window
        self._commits: deque[tuple[float, int, int]] = deque()
        self._in_window = 0
        self._own_in_window = 0

    def committed(self, now: float, count: int, own: int = 0, validators: int = 1) -> int:
        """Record ``count`` transactions committed at ``now``, ``own`` of them
        this validator's clients'; the new limit (of ``validators``)."""
        if not 0 <= own <= count:
            raise ValueError("own is between 0 and count")
        self._commits.append((now, count, own))
        self._in_window += count
        self._own_in_window += own
        horizon = now - self.window
        while self._commits[0][0] <= horizon:
            _, old, old_own = self._commits.popleft()
            self._in_window -= old
            self._own_in_window -= old_own
        return self.limit(validators)

    @property
    def rate(self) -> float:
        """Committed transactions per second over the window."""
        return self._in_window / self.window

    @property
    def own_fraction(self) -> float | None:
        """This validator's clients' part of the window's commits (None: none)."""
        return self._own_in_window / self._in_window if self._in_window else None

    def limit(self, validators: int = 1) -> int:
        """This validator's room, one of ``validators``."""
        fair = 1 / max(1, validators)
        own = self.own_fraction
        share = fair if own is None else max(fair, own)
        return math.ceil(max(self.floor, self.rate * self.queue_seconds) * share)
