"""The public surface of fedchain.consensus, and its place in the layering."""

from __future__ import annotations

import inspect
import sys

import fedchain.consensus as consensus


def test_every_exported_name_exists_and_is_all_there_is():
    for name in consensus.__all__:
        assert hasattr(consensus, name), name
    public = {
        n for n, v in vars(consensus).items() if not n.startswith("_") and not inspect.ismodule(v)
    }
    assert public == set(consensus.__all__)


def test_consensus_never_imports_learning_or_sims():
    for name, module in list(sys.modules.items()):
        if name.startswith("fedchain.consensus") and module is not None:
            source = inspect.getsource(module)
            assert "fedchain.learning" not in source, name
            assert "fedchain.sims" not in source, name
