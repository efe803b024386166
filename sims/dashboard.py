"""Terminal views of a running network (rich renderables, no I/O here).

Views are pure functions of a simulation's state, so the demo, ``fedchain
sim --dashboard`` and tests render the same thing; the caller owns the
``rich.live.Live`` that shows them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fedchain.sims.gossipsim import Fault, GossipSimulation, percentile


def _fault_text(fault: Fault) -> str:
    if fault.kind in ("crash", "restart"):
        return f"{fault.kind} {len(fault.nodes)} nodes"
    if fault.kind == "loss":
        return f"loss -> {fault.value:.1%}"
    return fault.kind


def gossip_view(sim: GossipSimulation, faults: Sequence[Fault], now: float) -> Group:
    """Header, one row per message with its spread, and the fault timeline."""
    n = len(sim.ids)
    up = sum(sim.is_up(i) for i in range(n))
    frames = sum(t.stats().get("frames_sent", 0) for t in sim.transports)
    header = Text.assemble(
        ("fedchain demo  ", "bold cyan"),
        f"t = {now:6.2f} s network time   nodes up {up}/{n}   ",
        f"loss {sim.network.model.loss:.1%}   frames {frames:,}   ",
        f"sent {sim.network.bytes_sent() / 1e6:,.1f} MB",
    )
    table = Table(expand=True, show_edge=False)
    for column in ("msg", "origin", "bytes", "at s", "delivered", "", "p50 ms"):
        table.add_column(column, justify="left" if column in ("msg", "") else "right")
    published = [log for log in sim.logs if log.message_id is not None]
    for k, log in enumerate(published):
        got = log.delivered_to_up()
        total = max(len(log.up_at_publish), 1)
        latencies = [t - log.published_at for t in log.delivered.values()]
        table.add_row(
            f"#{k + 1} {log.message_id[:3].hex()}",
            str(log.publication.origin),
            f"{log.publication.size:,}",
            f"{log.published_at:.1f}",
            f"{got}/{total}",
            ProgressBar(total=total, completed=min(got, total), width=30),
            f"{percentile(latencies, 50) * 1000:.0f}",
        )
    events = Text()
    for fault in faults:
        done = fault.at <= now
        events.append(
            f"{'✔' if done else '·'} {fault.at:5.1f} s {_fault_text(fault)}   ",
            style="green" if done else "dim",
        )
    return Group(
        Panel(header),
        Panel(table, title="gossip: messages spreading"),
        Panel(events, title="faults"),
    )


def gossip_summary(sim: GossipSimulation) -> dict[str, Any]:
    """The figures of a finished run, one entry per message."""
    messages = []
    all_latencies: list[float] = []
    for log in sim.logs:
        if log.message_id is None:
            continue
        latencies = sorted(t - log.published_at for t in log.delivered.values())
        all_latencies += latencies
        messages.append(
            {
                "origin": log.publication.origin,
                "bytes": log.publication.size,
                "published_at_s": round(log.published_at, 3),
                "up_nodes": len(log.up_at_publish),
                "delivered": log.delivered_to_up(),
                "delivery_ratio": round(log.delivered_to_up() / len(log.up_at_publish), 6),
                "latency_p50_s": round(percentile(latencies, 50), 4),
                "latency_p99_s": round(percentile(latencies, 99), 4),
            }
        )
    ratios = [m["delivery_ratio"] for m in messages]
    return {
        "nodes": len(sim.ids),
        "messages": len(messages),
        "mean_delivery_ratio": round(sum(ratios) / max(len(ratios), 1), 6),
        "latency_p50_s": round(percentile(all_latencies, 50), 4),
        "latency_p99_s": round(percentile(all_latencies, 99), 4),
        "duplicates": sum(node.counters["gossip.duplicate"] for node in sim.nodes),
        "bytes_sent": sim.network.bytes_sent(),
        "wall_s": round(sim.wall_seconds, 3),
        "per_message": messages,
    }


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"{summary['messages']} messages over {summary['nodes']} nodes")
    for column in ("msg", "bytes", "at s", "up", "delivered", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right")
    for k, m in enumerate(summary["per_message"]):
        table.add_row(
            f"#{k + 1}",
            f"{m['bytes']:,}",
            f"{m['published_at_s']:.1f}",
            str(m["up_nodes"]),
            f"{m['delivery_ratio']:.1%}",
            f"{m['latency_p50_s'] * 1000:.0f}",
            f"{m['latency_p99_s'] * 1000:.0f}",
        )
    return table
