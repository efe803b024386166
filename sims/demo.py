"""``fedchain demo``: a live look at a serverless network.

200 nodes gossip in virtual time over lossy, heavy-tailed links: small
telemetry messages and large model-update-sized payloads from random
origins, while 10% of the nodes crash and come back and the loss rate
spikes. The live view shows each message spreading; the summary says how
many of the nodes that were up got each one, and how fast.

(The full demo, a federated-learning round agreed on by consensus, replaces
this one as the round and consensus layers land.)
"""

from __future__ import annotations

import argparse
import json
import time

from .arguments import int_at_least, non_negative, seconds

TELEMETRY_BYTES = 512
UPDATE_BYTES = 200 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int_at_least(2), default=200)
    parser.add_argument("--seed", type=int_at_least(0), default=7)
    parser.add_argument("--duration", type=seconds(), default=24.0, help="network seconds")
    parser.add_argument(
        "--speed",
        type=non_negative,
        default=4.0,
        help="network seconds shown per wall second (0: as fast as possible)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON only")


def build(args: argparse.Namespace):
    from fedchain.p2p.simnet import LinkModel, LogNormal
    from fedchain.sims.gossipsim import Fault, GossipSimConfig, GossipSimulation, Publication

    n = args.nodes
    model = LinkModel(latency=LogNormal(0.05, 0.5), bandwidth_bps=50e6, loss=0.005)
    sim = GossipSimulation(GossipSimConfig(nodes=n, seed=args.seed, model=model))
    import numpy as np

    rng = np.random.default_rng(args.seed)
    victims = tuple(
        int(i) for i in rng.choice(np.arange(1, n), size=max(1, n // 10), replace=False)
    )
    publications = [
        Publication(
            at=1.0 + 1.5 * k,
            origin=int(rng.integers(0, n)),
            size=UPDATE_BYTES if k % 3 == 2 else TELEMETRY_BYTES,
            topic="sim",
        )
        for k in range(int((args.duration - 4) / 1.5))
    ]
    third = args.duration / 4
    faults = [
        Fault(at=third, kind="crash", nodes=victims),
        Fault(at=third * 1.6, kind="loss", value=0.05),
        Fault(at=third * 2.2, kind="restart", nodes=victims),
        Fault(at=third * 2.6, kind="loss", value=0.005),
    ]
    return sim, publications, faults


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from fedchain.sims import dashboard

    sim, publications, faults = build(args)
    console = Console()
    started = time.perf_counter()
    live = None
    if not args.json:
        live = Live(console=console, refresh_per_second=8, transient=False)
        live.start()

    def on_tick(simulation) -> None:
        now = simulation.network_time()
        if live is not None:
            live.update(dashboard.gossip_view(simulation, faults, now))
        if args.speed > 0:
            ahead = now / args.speed - (time.perf_counter() - started)
            if ahead > 0:
                time.sleep(ahead)

    try:
        sim.run(publications, duration=args.duration, faults=faults, on_tick=on_tick, tick=0.1)
    finally:
        if live is not None:
            live.stop()
    summary = dashboard.gossip_summary(sim)
    if args.json:
        print(json.dumps(summary))
    else:
        console.print()
        console.print(dashboard.summary_table(summary))
        console.print(
            f"[bold]{summary['messages']} messages, {summary['nodes']} nodes: "
            f"{summary['mean_delivery_ratio']:.2%} mean delivery to nodes that were up, "
            f"p50 latency {summary['latency_p50_s'] * 1000:.0f} ms, "
            f"{summary['wall_s']:.1f} s wall[/bold]"
        )
    return 0
