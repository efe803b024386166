"""``fedchain testnet`` + ``fedchain node``: four validators as real OS
processes over TCP; a client that trusts none of them submits and waits for
verified commit proofs; a validator killed with SIGKILL and restarted on its
home replays its store and catches up; every home's chain verifies."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import numpy as np
import pytest
import trio

from fedchain.consensus.client import LedgerClient
from fedchain.consensus.client_api import ClientOp, encode_client_message
from fedchain.consensus.contracts import kv_key, kv_set
from fedchain.consensus.genesis import ConsensusParams
from fedchain.consensus.pbft import PbftConfig
from fedchain.consensus.tx import sign_transaction
from fedchain.p2p.identity import Identity
from fedchain.p2p.node import open_node
from fedchain.p2p.tcp import TcpConfig, open_tcp_transport
from fedchain.p2p.wire import MessageType
from fedchain.sims.bench_consensus import _free_ports
from fedchain.sims.chain_cmd import verify_dir
from fedchain.sims.home import HomeError, load_home, write_testnet

TCP = TcpConfig(backoff_initial=0.05, backoff_max=0.5)


async def _start(home: Path, expect_batch: int = 50) -> trio.Process:
    command = [sys.executable, "-m", "fedchain.sims.cli", "node", "--home", str(home)]
    command += ["--batch-size", "50", "--status-every", "3600"]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    line = b""
    while not line.endswith(b"\n"):
        chunk = await process.stdout.receive_some(1)
        assert chunk, "the node exited before it listened"
        line += chunk
    ready = json.loads(line)
    assert ready["listen"]
    # What it runs with: the batch asked for (at most a block's worth),
    # PBFT's default timeout.
    assert (ready["batch_size"], ready["batch_timeout_s"]) == (
        expect_batch,
        PbftConfig.batch_timeout,
    )
    return process


async def _stop(processes: list[trio.Process]) -> None:
    """SIGTERM every node process, then wait for each to exit."""
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        await process.wait()


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
        await _stop(processes)
    for home in homes:
        assert verify_dir(home, json_only=True) == 0


async def test_a_node_batches_no_more_than_its_genesis_lets_a_block_hold(tmp_path) -> None:
    params = ConsensusParams(max_block_txs=20, state_buckets=64)
    (home,) = write_testnet(tmp_path, 1, seed=2, ports=_free_ports(1), params=params)
    assert load_home(home).genesis.params == params
    process = await _start(home, expect_batch=20)  # asked for 50
    await _stop([process])


def test_a_broken_home_is_a_clear_error(tmp_path) -> None:
    (home,) = write_testnet(tmp_path, 1, seed=1)
    (home / "node_key").write_text("zz\n")
    with pytest.raises(HomeError, match=r"non-hexadecimal"):
        load_home(home)
    (home / "node.json").unlink()
    with pytest.raises(HomeError, match=r"node\.json is missing"):
        load_home(home)


async def test_launch_runs_a_testnet_and_stops_it(tmp_path) -> None:
    """``fedchain launch DIR`` starts every home as a process (a client's
    transaction commits through them) and SIGTERM stops them all."""
    homes = write_testnet(tmp_path, 4, chain_id="launch", seed=5, ports=_free_ports(4))
    loaded = [load_home(h) for h in homes]
    keys = [h.identity.public_key for h in loaded]
    command = [sys.executable, "-m", "fedchain.sims.cli", "launch", str(tmp_path)]
    command += ["--status-every", "3600", "--batch-size", "10", "--cipher", "xsalsa20-poly1305"]
    launcher = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    bob = Identity(b"b" * 32)
    tx = sign_transaction(bob, "launch", type="kv", content=kv_set("k", 1), nonce=0, timestamp=0)
    try:
        with trio.fail_after(60):
            seen, buffer = set(), b""
            while len(seen) < 4:
                chunk = await launcher.stdout.receive_some(4096)
                assert chunk, "the launcher exited early"
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if b'"listen"' in line:
                        name, ready = line.split(b" ", 1)
                        assert json.loads(ready)["cipher"] == "xsalsa20-poly1305"
                        seen.add(name)
            assert seen == {b"node0", b"node1", b"node2", b"node3"}
            async with (
                open_tcp_transport(
                    bob,
                    allowed=keys,
                    rng=np.random.default_rng(2),
                    listen=None,
                    peers={keys[2]: loaded[2].listen},
                    config=TCP,
                ) as transport,
                open_node(bob, transport) as node,
            ):
                client = LedgerClient(node, keys[2], "launch", loaded[0].genesis.validators)
                await transport.wait_connected(keys[2])
                # The node insists on XSalsa20-Poly1305, so an AES-NI client uses it too.
                assert transport.connections()[keys[2]].suite == "xsalsa20-poly1305"
                await client.submit(tx.encoded)
                proof = await client.wait_committed(tx.encoded)
                assert proof.height >= 1
            await _use_the_client_command(tmp_path, homes)
    finally:
        launcher.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await launcher.wait() == 0
    for home in homes:
        assert verify_dir(home, json_only=True) == 0


async def _fedchain_client(*arguments: object) -> tuple[int, dict | None, str]:
    """Run ``fedchain client ARGUMENTS``: exit status, JSON line, stderr."""
    command = [sys.executable, "-m", "fedchain.sims.cli", "client", *map(str, arguments)]
    done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
    out = done.stdout.decode().strip()
    return done.returncode, json.loads(out) if out else None, done.stderr.decode()


async def _use_the_client_command(tmp_path: Path, homes: list[Path]) -> None:
    """``fedchain client`` against the running testnet: a value put through
    one node is read, proved, through another; a missing key is proved
    absent; a float, an unreachable node, a cipher suite the node does not
    accept and a genesis the node's chain does not follow are clear errors."""
    key = tmp_path / "carol.key"
    status, made, _ = await _fedchain_client("keygen", key)
    assert status == 0 and key.stat().st_mode & 0o777 == 0o600
    owner = made["public_key"]
    status, put, _ = await _fedchain_client("--home", homes[1], "--key", key, "put", "t", "[1, 2]")
    assert status == 0 and put["verified"] and put["height"] >= 1
    assert put["key"] == f"kv/{owner}/t"
    status, got, _ = await _fedchain_client("--home", homes[3], "get", "t", "--owner", owner)
    assert status == 0 and got["value"] == [1, 2] and got["height"] >= put["height"]
    status, missing, _ = await _fedchain_client("--home", homes[0], "--key", key, "get", "u")
    assert status == 0 and missing["value"] is None and missing["verified"]
    status, _, why = await _fedchain_client("--home", homes[0], "--key", key, "put", "f", "1.5")
    assert status == 1 and "float" in why
    # A home whose node is not running, and one whose genesis is another chain's.
    (elsewhere,) = write_testnet(tmp_path / "other", 1, chain_id="launch", seed=9, ports=[1])
    status, _, why = await _fedchain_client("--home", elsewhere, "--timeout", "1", "query", "k")
    assert status == 1 and "no connection" in why and "dial_failed" in why
    # The nodes insist on XSalsa20-Poly1305: a client that insists on AES-256-GCM
    # is told why it cannot connect; one that asks for XSalsa20-Poly1305 reads.
    aes = ("--cipher", "aes-256-gcm", "--timeout", "1")
    status, _, why = await _fedchain_client("--home", homes[2], *aes, "query", "sys/validators")
    assert status == 1 and "no_common_suite" in why
    xsalsa = ("--cipher", "xsalsa20-poly1305")
    status, got, _ = await _fedchain_client(
        "--home", homes[2], *xsalsa, "get", "t", "--owner", owner
    )
    assert status == 0 and got["value"] == [1, 2]
    impostor = tmp_path / "impostor"
    shutil.copytree(homes[0], impostor, ignore=shutil.ignore_patterns("chain.sqlite*"))
    shutil.copy(elsewhere / "genesis.bin", impostor / "genesis.bin")
    status, _, why = await _fedchain_client("--home", impostor, "query", "sys/validators")
    assert status == 2 and "does not verify" in why


def test_launch_finds_homes_in_index_order(tmp_path) -> None:
    from fedchain.sims.launch import homes_in

    write_testnet(tmp_path, 12, seed=2)
    (tmp_path / "notes").mkdir()
    assert [h.name for h in homes_in(tmp_path)] == [f"node{i}" for i in range(12)]


def test_per_node_hosts_are_dialled_and_each_node_binds_every_interface(tmp_path) -> None:
    """``fedchain testnet --hosts``: what a network over several machines
    needs; each home names its own host for its peers and binds 0.0.0.0."""
    ports = _free_ports(3)
    hosts = ["127.0.0.1", "localhost", "127.0.0.2"]
    homes = write_testnet(tmp_path, 3, hosts=hosts, ports=ports, seed=4)
    loaded = [load_home(h) for h in homes]
    for index, home in enumerate(loaded):
        assert home.listen == (hosts[index], ports[index])
        assert home.accept_at == ("0.0.0.0", ports[index])
        assert set(home.peers.values()) == {(hosts[j], ports[j]) for j in range(3) if j != index}
    with pytest.raises(ValueError, match="one per node"):
        write_testnet(tmp_path / "few", 3, hosts=["a", "b"])
    with pytest.raises(ValueError, match="without ports"):
        write_testnet(tmp_path / "port", 2, hosts=["a:1", "b"])
    plain = load_home(write_testnet(tmp_path / "local", 1, seed=4)[0])
    assert plain.bind is None and plain.accept_at == plain.listen


async def test_nodes_at_different_host_names_commit_together(tmp_path) -> None:
    """Four node processes whose peers reach them at different names
    (127.0.0.1 and localhost, each node bound to every interface) commit a
    client's value and prove it from any of them; with the primary's
    process killed, ``fedchain client put`` through its home still commits."""
    hosts = ["127.0.0.1", "localhost", "127.0.0.1", "localhost"]
    homes = write_testnet(tmp_path, 4, chain_id="hosts", hosts=hosts, ports=_free_ports(4))
    keys = load_home(homes[0]).genesis.validators  # keys[0]: view 0's primary
    processes = [await _start(h) for h in homes]
    try:
        with trio.fail_after(90):
            key = tmp_path / "dave.key"
            assert (await _fedchain_client("keygen", key))[0] == 0
            status, put, why = await _fedchain_client(
                "--home", homes[1], "--key", key, "put", "n", "7"
            )
            assert status == 0, why
            status, got, why = await _fedchain_client("--home", homes[2], "--key", key, "get", "n")
            assert status == 0 and got["value"] == 7 and got["height"] >= put["height"], why
            # Node 3 accepts on every interface: reached at an address its
            # home never named (127.0.0.3 is loopback too), it still answers.
            other = tmp_path / "node3-elsewhere"
            shutil.copytree(homes[3], other, ignore=shutil.ignore_patterns("chain.sqlite*"))
            config = json.loads((other / "node.json").read_text())
            config["listen"] = "127.0.0.3:" + config["listen"].split(":")[1]
            (other / "node.json").write_text(json.dumps(config))
            status, got, why = await _fedchain_client("--home", other, "--key", key, "get", "n")
            assert status == 0 and got["value"] == 7, why
            # The primary's process dies; a put through its home goes to
            # the other validators (LedgerClient.commit), whose view change
            # replaces it, and commits.
            primary = next(
                i for i, h in enumerate(homes) if load_home(h).identity.public_key == keys[0]
            )
            processes[primary].kill()
            await processes[primary].wait()
            status, put, why = await _fedchain_client(
                "--home", homes[primary], "--key", key, "--patience", "1", "put", "n", "8"
            )
            assert status == 0 and put["verified"], why
            survivor = homes[(primary + 1) % 4]
            status, got, why = await _fedchain_client("--home", survivor, "--key", key, "get", "n")
            assert status == 0 and got["value"] == 8 and got["height"] >= put["height"], why
    finally:
        await _stop(processes)
    for home in homes:
        assert verify_dir(home, json_only=True) == 0


async def test_a_node_process_outlives_hostile_client_messages(tmp_path) -> None:
    """A stranger's malformed client messages, the empty-key query among
    them (which once ended the process), over encrypted TCP to a real
    ``fedchain node``: the process keeps running and keeps serving."""
    (home,) = write_testnet(tmp_path, 1, chain_id="hostile", seed=5, ports=_free_ports(1))
    server = load_home(home)
    key = server.identity.public_key
    alice = Identity(b"a" * 32)
    hostile = [
        [ClientOp.QUERY, 1, ""],
        [ClientOp.QUERY, 2, "é" * 300],
        [ClientOp.WAIT, 3, b"\x00" * 32, 2**62],
        [ClientOp.HEADERS, 4, 1, 2**62],
        [ClientOp.SUBMIT, 5, [b"not a transaction"]],
        [ClientOp.FORWARD, [b"\xc1"]],
    ]
    process = await _start(home)
    try:
        with trio.fail_after(60):
            async with AsyncExitStack() as stack:
                transport = await stack.enter_async_context(
                    open_tcp_transport(
                        alice,
                        allowed=[key],
                        rng=np.random.default_rng(0),
                        listen=None,
                        peers={key: server.listen},
                        config=TCP,
                    )
                )
                node = await stack.enter_async_context(open_node(alice, transport))
                client = LedgerClient(node, key, "hostile", server.genesis.validators)
                await transport.wait_connected(key)
                for fields in hostile:
                    node.send(key, MessageType.CLIENT, encode_client_message(*fields))
                tx = sign_transaction(
                    alice, "hostile", type="kv", content=kv_set("k", 1), nonce=0, timestamp=0
                )
                await client.submit(tx.encoded)
                await client.wait_committed(tx.encoded)
                answer = await client.query(kv_key(alice.public_key, "k"))
                assert answer.value == 1
                assert process.returncode is None
    finally:
        await _stop([process])


def test_a_store_that_does_not_replay_stops_the_node_with_a_clear_message(tmp_path) -> None:
    """A chain.sqlite holding bytes that are no block (damage, or a store a
    fedchain with another block format wrote): the node says which height and
    how to look, and exits non-zero, with no traceback."""
    from fedchain.consensus.store import SqliteBlockStore, StoredBlock

    (home,) = write_testnet(tmp_path, 1, chain_id="old", seed=3, ports=_free_ports(1))
    loaded = load_home(home)
    with SqliteBlockStore(loaded.store_path) as store:
        genesis = loaded.genesis
        store.append(StoredBlock(0, genesis.hash, genesis.encode()))
        store.append(StoredBlock(1, b"\x07" * 32, b"\x98not a block of this version"))
    command = [sys.executable, "-m", "fedchain.sims.cli", "node", "--home", str(home)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "stopped on its chain" in done.stderr
    assert "stored block 1 does not decode" in done.stderr
    assert "fedchain chain verify" in done.stderr and "Traceback" not in done.stderr
