"""``fedchain testnet`` + ``fedchain node``: four validators as real OS
processes over TCP; a client that trusts none of them submits and waits for
verified commit proofs; a validator killed with SIGKILL and restarted on its
home replays its store and catches up; every home's chain verifies."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import numpy as np
import pytest
import trio

from fedchain.consensus.client import LedgerClient
from fedchain.consensus.contracts import kv_key, kv_set
from fedchain.consensus.tx import sign_transaction
from fedchain.p2p.identity import Identity
from fedchain.p2p.node import open_node
from fedchain.p2p.tcp import TcpConfig, open_tcp_transport
from fedchain.sims.bench_consensus import _free_ports
from fedchain.sims.chain_cmd import verify_dir
from fedchain.sims.home import HomeError, load_home, write_testnet

TCP = TcpConfig(backoff_initial=0.05, backoff_max=0.5)


async def _start(home: Path) -> trio.Process:
    command = [sys.executable, "-m", "fedchain.sims.cli", "node", "--home", str(home)]
    command += ["--batch-size", "50", "--status-every", "3600"]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    line = b""
    while not line.endswith(b"\n"):
        chunk = await process.stdout.receive_some(1)
        assert chunk, "the node exited before it listened"
        line += chunk
    assert json.loads(line)["listen"]
    return process


async def test_four_node_processes_commit_restart_and_verify(tmp_path) -> None:
    homes = write_testnet(tmp_path, 4, chain_id="procs", seed=3, ports=_free_ports(4))
    loaded = [load_home(h) for h in homes]
    keys = [h.identity.public_key for h in loaded]
    genesis = loaded[0].genesis
    alice = Identity(b"a" * 32)
    txs = [
        sign_transaction(
            alice, "procs", type="kv", content=kv_set(f"k{n}", n), nonce=n, timestamp=0
        )
        for n in range(60)
    ]
    processes = [await _start(h) for h in homes]
    try:
        with trio.fail_after(90):
            async with AsyncExitStack() as stack:

                async def client_of(index: int, who: Identity) -> LedgerClient:
                    server = loaded[index]
                    transport = await stack.enter_async_context(
                        open_tcp_transport(
                            who,
                            allowed=keys,
                            rng=np.random.default_rng(index),
                            listen=None,
                            peers={server.identity.public_key: server.listen},
                            config=TCP,
                        )
                    )
                    node = await stack.enter_async_context(open_node(who, transport))
                    client = LedgerClient(node, keys[index], "procs", genesis.validators)
                    await transport.wait_connected(keys[index])
                    return client

                client = await client_of(1, alice)
                await client.submit_many([t.encoded for t in txs[:30]])
                first = [await client.wait_committed(t.encoded) for t in txs[:30]]
                # Validator 3 dies mid-run (SIGKILL) and comes back on its home.
                processes[3].send_signal(signal.SIGKILL)
                await processes[3].wait()
                await client.submit_many([t.encoded for t in txs[30:]])
                last = await client.wait_committed(txs[-1].encoded)
                assert last.height > max(p.height for p in first)
                processes[3] = await _start(homes[3])
                # It replays its store, fetches what it missed, and proves it.
                late = await client_of(3, Identity(b"c" * 32))
                again = await late.wait_committed(txs[-1].encoded)
                assert again.header == last.header
                answer = await late.query(kv_key(alice.public_key, "k59"))
                assert answer.value == 59
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            await process.wait()
    for home in homes:
        assert verify_dir(home, json_only=True) == 0


def test_a_broken_home_is_a_clear_error(tmp_path) -> None:
    (home,) = write_testnet(tmp_path, 1, seed=1)
    (home / "node_key").write_text("zz\n")
    with pytest.raises(HomeError, match=r"non-hexadecimal"):
        load_home(home)
    (home / "node.json").unlink()
    with pytest.raises(HomeError, match=r"node\.json is missing"):
        load_home(home)
