"""`fedchain demo` end to end, small: it finishes, it is reproducible, and
gossip keeps delivering to every node that is up through crashes and loss."""

from __future__ import annotations

import json

from fedchain.sims.cli import main


def _demo(capsys) -> dict:
    assert main(["demo", "--nodes", "60", "--duration", "12", "--speed", "0", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    del summary["wall_s"]
    return summary


def test_demo_summary_is_reproducible_and_complete(capsys):
    first = _demo(capsys)
    assert first == _demo(capsys)
    assert first["nodes"] == 60
    assert first["messages"] >= 4
    assert first["mean_delivery_ratio"] >= 0.99
    assert any(m["up_nodes"] < 60 for m in first["per_message"])  # the crash happened


def test_demo_renders_its_live_view_and_summary(capsys):
    assert main(["demo", "--nodes", "30", "--duration", "8", "--speed", "0"]) == 0
    out = capsys.readouterr().out
    assert "messages over 30 nodes" in out
    assert "mean delivery" in out
