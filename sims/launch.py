"""``fedchain launch DIR``: every node home under DIR as a local process.

Starts ``fedchain node --home`` for each ``node*`` folder ``fedchain
testnet`` wrote, prints where each listens, forwards their status lines
(prefixed with the node's name) and stops them all on Ctrl-C or SIGTERM.
A node that exits on its own is reported and not restarted (restart it
with ``fedchain node --home``: it resumes from its store).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .arguments import int_at_least, seconds
from .node_cmd import add_cipher_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="a folder fedchain testnet wrote")
    parser.add_argument("--status-every", type=seconds(), default=5.0)
    parser.add_argument("--batch-size", type=int_at_least(1), default=1000)
    parser.add_argument("--view-timeout", type=seconds(), default=5.0)
    add_cipher_argument(parser)


def homes_in(directory: Path) -> list[Path]:
    """The node homes under ``directory`` in index order (node0, node1, ...)."""
    homes = [p for p in directory.glob("node*") if (p / "node.json").is_file()]
    return sorted(homes, key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else 1 << 30)


def run(args: argparse.Namespace) -> int:
    import trio

    homes = homes_in(args.dir)
    if not homes:
        raise SystemExit(f"fedchain launch: no node homes (node*/node.json) in {args.dir}")
    return trio.run(_launch, homes, args)


async def _launch(homes: list[Path], args: argparse.Namespace) -> int:
    import signal
    import subprocess
    import sys

    import trio

    async def pump(name: str, stream) -> None:
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                print(f"{name} {line.decode(errors='replace')}", flush=True)

    async def one(home: Path, nursery: trio.Nursery) -> None:
        command = [sys.executable, "-m", "fedchain.sims.cli", "node", "--home", str(home)]
        command += ["--status-every", str(args.status_every), "--batch-size", str(args.batch_size)]
        command += ["--view-timeout", str(args.view_timeout), "--cipher", args.cipher]
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            await pump(home.name, process.stdout)
            code = await process.wait()
            print(f"{home.name} exited with status {code}", flush=True)
        finally:
            if process.returncode is None:
                process.terminate()
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await process.wait()

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            for home in homes:
                nursery.start_soon(one, home, nursery)
            async for _ in signals:
                print("stopping every node", flush=True)
                nursery.cancel_scope.cancel()
                break
    return 0
