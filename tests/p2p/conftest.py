from __future__ import annotations

import numpy as np
import pytest

from fedchain.p2p.identity import Identity


@pytest.fixture
def make_identities():
    def make(n: int, seed: int = 7) -> list[Identity]:
        rng = np.random.default_rng(seed)
        return [Identity.from_rng(rng) for _ in range(n)]

    return make
