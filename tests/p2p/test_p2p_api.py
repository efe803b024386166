"""The public surface of fedchain.p2p is what we mean it to be."""

from __future__ import annotations

import inspect

import fedchain.p2p as p2p
from fedchain.p2p import errors, wire
from fedchain.p2p.transport import Transport


def test_every_exported_name_exists_and_nothing_private_leaks():
    for name in p2p.__all__:
        assert hasattr(p2p, name), name
        assert not name.startswith("_")
    public = {
        n for n in vars(p2p) if not n.startswith("_") and not inspect.ismodule(getattr(p2p, n))
    }
    assert public == set(p2p.__all__)


def test_the_wire_api_other_packages_rely_on():
    assert p2p.decode is wire.decode
    assert set(inspect.signature(wire.decode).parameters) == {
        "frame",
        "max_frame_bytes",
        "link_peer",
    }
    wire_errors = [
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.WireError)
    ]
    assert len(wire_errors) >= 12
    assert len({c.reason for c in wire_errors}) == len(wire_errors)  # counted apart


def test_both_transports_implement_the_interface():
    for transport in (p2p.SimTransport, p2p.TcpTransport):
        for member in ("local_id", "authenticated_links", "send_nowait", "receive", "stats"):
            assert hasattr(transport, member), (transport, member)
    assert isinstance(p2p.SimNetwork(seed=0).add_node(b"k" * 32), Transport)


def test_p2p_imports_nothing_from_the_layers_above():
    import sys

    for module in list(sys.modules):
        if module.startswith("fedchain.p2p"):
            source = inspect.getsource(sys.modules[module])
            for layer in ("consensus", "oid", "learning", "sims"):
                assert f"fedchain.{layer}" not in source, (module, layer)
