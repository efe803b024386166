"""The ``fedchain`` command line: every command answers ``--help``, and the
benchmarks run end to end at a tiny scale and end with their JSON line.

The command table is walked, not copied, so a command added to
``COMMANDS`` is covered here at once. Commands whose module is not built yet
(or would load JAX) are only asked for ``--help``, which the CLI serves
without importing anything heavy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from importlib.metadata import version

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedchain.consensus.block import decode_block
from fedchain.consensus.pbft_journal import VIEW_KEY, load_journal
from fedchain.consensus.store import SqliteBlockStore
from fedchain.sims import cli
from fedchain.sims.arguments import positive_ints
from fedchain.sims.home import load_home


def _commands() -> list[tuple[list[str], list[str]]]:
    """Every ``(argv prefix, texts its help must show)`` in the table: a
    command shows its own help line, a group lists its commands'."""
    out = []
    for name, entry in cli.COMMANDS.items():
        if isinstance(entry, dict):
            out.append(([name], [*entry, *(help_ for _, help_ in entry.values())]))
            out += [([name, sub], [help_]) for sub, (_, help_) in entry.items()]
        else:
            out.append(([name], [entry[1]]))
    return out


COMMANDS = _commands()


def _flat(text: str) -> str:
    """Help text with argparse's line wrapping undone."""
    return " ".join(text.split())


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code


def test_version_names_the_installed_package(capsys):
    assert _exit_code(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fedchain {version('fedchain')}"


def test_top_level_help_lists_every_command(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fedchain")
    for name in cli.COMMANDS:
        assert name in out


def test_no_command_prints_the_help_and_succeeds(capsys):
    assert cli.main([]) == 0
    assert "usage: fedchain" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "texts"), COMMANDS, ids=[" ".join(a) for a, _ in COMMANDS])
def test_every_command_answers_help(argv, texts, capsys):
    assert _exit_code([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fedchain " + " ".join(argv))
    for text in texts:
        assert _flat(text) in _flat(out)


def test_an_unknown_command_is_a_usage_error(capsys):
    assert _exit_code(["no-such-command"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_help_from_a_fresh_interpreter():
    done = subprocess.run(
        [sys.executable, "-m", "fedchain.sims.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: fedchain")
    assert all(name in done.stdout for name in cli.COMMANDS)
    # --help must stay light: neither JAX nor the learning stack is needed for it.
    probe = (
        "import sys, contextlib, io\n"
        "from fedchain.sims import cli\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    cli.main(['--help'])\n"
        "print('jax' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def _last_json_line(argv: list[str]) -> dict:
    """Run ``fedchain ARGV`` in its own process; its last stdout line, parsed."""
    done = subprocess.run(
        [sys.executable, "-m", "fedchain.sims.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_bench_gossip_at_tiny_scale():
    payloads, losses = [1024, 20000], [0.0, 0.01]
    argv = ["bench", "gossip", "--nodes", "200", "--payloads", *map(str, payloads)]
    figures = _last_json_line([*argv, "--loss", *map(str, losses)])
    assert figures["benchmark"] == "gossip"
    assert figures["targets_met"] is True
    assert figures["peak_rss_bytes"] > 0
    runs = figures["runs"]
    assert sorted((r["payload_bytes"], r["loss"]) for r in runs) == sorted(
        (p, loss) for p in payloads for loss in losses
    )
    for run in runs:
        assert run["nodes"] == 200
        if run["loss"] == 0:
            assert run["delivery_ratio"] == 1.0
        else:
            assert run["delivery_ratio"] >= 0.999
        assert 0 < run["latency_p50_s"] <= run["latency_p90_s"] <= run["latency_p99_s"]
        assert run["latency_p99_s"] <= run["latency_max_s"] <= run["virtual_s"]
        assert run["frames_sent"] > 0
        assert run["bytes_sent"] >= 199 * run["payload_bytes"]  # everyone got it once
        assert run["duplicates_per_node"] >= 0
        assert 0 < run["wall_s"] < 60
        assert run["peak_rss_bytes"] > 0


def test_bench_transport_at_tiny_scale():
    argv = ["bench", "transport", "--seconds", "0.3", "--rounds", "1", "--window-mib", "4"]
    figures = _last_json_line([*argv, "--handshake-concurrency", "2"])
    assert figures["benchmark"] == "transport"
    assert figures["rounds"] == 1 and figures["seconds_per_case"] == 0.3
    for size in ("1KiB", "1MiB"):
        ratio = figures[f"ratio_sealed_plain_{size}"]
        assert math.isfinite(ratio) and ratio > 0
        for suite in ("plain", "sealed"):
            assert figures[f"{suite}_{size}_MBps"] > 0
            assert figures[f"{suite}_{size}_msgs_per_s"] > 0
            assert figures[f"{suite}_{size}_sender_cpu_ms_per_MiB"] >= 0
            assert figures[f"{suite}_{size}_receiver_cpu_ms_per_MiB"] >= 0
    assert figures["ratio_target_1MiB"] == 0.5
    assert figures["default_suite"] == "aesgcm"  # these machines have AES-NI
    assert figures["ratio_default_plain_1MiB"] == figures["ratio_aesgcm_plain_1MiB"]
    assert figures["handshakes_per_s"] > 0
    assert figures["peak_rss_bytes"] > 0
    # The raw-socket reference ran (every byte it sent arrived, or the bench
    # raises) and each suite is also set against it.
    assert figures["raw_1MiB_MBps"] > 0 and figures["raw_1MiB_sender_cpu_ms_per_MiB"] > 0
    for suite in ("plain", "sealed", "aesgcm"):
        ratio = figures[f"{suite}_1MiB_MBps"] / figures["raw_1MiB_MBps"]
        assert abs(figures[f"ratio_{suite}_raw_1MiB"] - ratio) < 0.002
    # Each cipher timed alone, and the bound that cost and the raw socket's set.
    send, receive = (
        figures["raw_1MiB_sender_cpu_ms_per_MiB"],
        figures["raw_1MiB_receiver_cpu_ms_per_MiB"],
    )
    for suite in ("sealed", "aesgcm"):
        seal = figures[f"{suite}_seal_alone_ms_per_MiB"]
        opening = figures[f"{suite}_open_alone_ms_per_MiB"]
        assert seal > 0 and opening > 0
        cores = min(2, os.cpu_count() or 1)  # a sender and a receiver thread
        per_ms = min(
            1 / (seal + send), 1 / (opening + receive), cores / (seal + send + opening + receive)
        )
        bound = per_ms * 1024 * 1024 * 1e3 / 1e6 / figures["plain_1MiB_MBps"]
        assert abs(figures[f"ratio_bound_{suite}_plain_1MiB"] - bound) < 0.01 * bound + 0.002


def test_bench_transport_measures_the_raw_reference_only_at_1_mib():
    argv = ["bench", "transport", "--seconds", "0.2", "--rounds", "1", "--sizes", "1KiB"]
    figures = _last_json_line([*argv, "--window-mib", "1", "--handshake-concurrency", "1"])
    assert "raw_1MiB_MBps" not in figures and "ratio_plain_raw_1MiB" not in figures
    assert figures["plain_1KiB_MBps"] > 0


def test_bench_consensus_sizes_the_state_to_its_sweep():
    """keys / 8 to the nearest power of two, two keys per transaction, never
    under the testnet default nor over the genesis limit."""
    from fedchain.sims.bench_consensus import DEFAULT_RATES, state_buckets_for

    default_sweep = [int(r) for r in DEFAULT_RATES.split(",")]
    assert state_buckets_for(default_sweep, 5.0) == 32768  # 317,500 keys
    assert state_buckets_for([100], 1.0) == 16384
    assert state_buckets_for([65536], 1.0) == 16384  # 131,072 keys / 8
    assert state_buckets_for([65536], 3.0) == 65536  # 393,216 / 8 = 49,152: nearer 2**16
    assert state_buckets_for([10**7], 100.0) == 2**20


def test_bench_consensus_real_clock_at_tiny_scale(tmp_path):
    """Four real validator processes, a small write and query load: every
    accepted transaction commits, CPU per transaction and the verification
    bound are reported, the sample of query answers verifies, the PNG is
    written."""
    figures = _last_json_line(
        ["bench", "consensus", "--skip-virtual", "--rates", "100", "--seconds", "1",
         "--query-rates", "200", "--out", str(tmp_path), "--journal-sync", "normal",
         "--batch-timeout", "0.03", "--state-buckets", "64", "--cipher", "xsalsa20-poly1305",
         "--keep", str(tmp_path / "homes")]
    )  # fmt: skip
    assert figures["benchmark"] == "consensus" and figures["queue_seconds"] == 2.0
    # Validators that insist on XSalsa20-Poly1305 use it with every peer, AES-NI or not:
    # each other validator at least, and the load generator's clients.
    assert figures["cipher"] == "xsalsa20-poly1305"
    by_cipher = figures["validator_connections_by_cipher"]
    assert by_cipher.keys() == {"xsalsa20-poly1305"} and by_cipher["xsalsa20-poly1305"] >= 12
    assert figures["state_buckets"] == 64
    assert figures["journal_sync"] == "normal"
    assert figures["batch_timeout_s"] == 0.03  # as each validator reported it
    assert figures["validator_handler_errors"] == 0  # read from their status lines
    assert figures["validator_suspicions"] == {} and figures["validator_views"] == [0, 0, 0, 0]
    # Each validator's PBFT journal is in its SQLite store, at the view it ran in.
    homes = sorted(p.parent for p in (tmp_path / "homes").glob("*/chain.sqlite"))
    assert len(homes) == 4
    from fedchain.sims.bench_consensus import _last_statuses

    statuses = _last_statuses(tmp_path / "homes")
    assert len(statuses) == 4
    for status in statuses:  # frames held, by priority
        held = status["held_frames"]
        assert len(held) == 2 and all(type(n) is int and n >= 0 for n in held)
    for path in homes:
        home = load_home(path)
        assert home.genesis.params.state_buckets == 64  # the chain the validators ran
        with SqliteBlockStore(home.store_path) as store:
            assert store.tip() > 0 and store.get_meta(VIEW_KEY) is not None
            journal = load_journal(store.get_meta, home.genesis.chain_id, 32)
            assert journal.view == 0
    bound = figures["cores"] * figures["verify_per_s_per_core"] / 4  # one check per validator
    assert abs(figures["verification_bound_tx_s"] - bound) <= 1
    # The rate is measured before the sweep, before each point and after it.
    samples = figures["verify_per_s_per_core_samples"]
    assert len(samples) == 3 and min(samples) > 0
    assert abs(figures["verify_per_s_per_core"] - sorted(samples)[1]) <= 1  # the median
    (point,) = figures["points"]
    assert point["verify_per_s_per_core"] == samples[1]
    point_bound = figures["cores"] * samples[1] / 4
    assert abs(point["ratio_to_bound"] - point["committed_tx_s"] / point_bound) <= 0.002
    assert figures["best_point_ratio_to_bound"] == point["ratio_to_bound"]
    assert point["offered_tx_s"] == 100 and point["busy"] == 0
    assert point["committed"] == point["accepted"] == 100
    # Submissions go round the four validators; none was refused at any.
    assert point["accepted_share_by_entry"] == [1.0, 1.0, 1.0, 1.0]
    by_entry = point["p50_ms_by_entry"]
    assert len(by_entry) == 4 and all(0 < p50 <= point["p99_ms"] for p50 in by_entry)
    assert point["validator_cpu_us_per_tx"] > 0
    # The blocks the feed announced with this point's transactions are the
    # chain's non-empty blocks (the point wrote nothing else).
    with SqliteBlockStore(load_home(homes[0]).store_path) as store:
        carrying = sum(1 for stored in store.blocks(1) if decode_block(stored.data).txs)
    assert point["blocks"] == carrying > 0
    assert point["txs_per_block"] == round(100 / carrying, 1)
    assert 0 < point["load_generator_cores"] <= 2  # one process, measured over the point
    assert 0 < point["p50_ms"] <= point["p99_ms"]
    (query,) = figures["queries_tcp"]
    assert query["answered"] > 0 and query["sample_verified"] is True
    assert figures["query_answers_s_in_process"] > 0
    assert (tmp_path / "consensus_fig2.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "consensus", "--rates", "abc"],
        ["bench", "consensus", "--query-rates", "10,-1"],
        ["bench", "transport", "--sizes", "2KiB"],
        ["train", "--widths", "8,16"],
        ["bench", "consensus", "--seconds", "-1"],
        ["bench", "gossip", "--nodes", "1"],
        ["bench", "gossip", "--loss", "2"],
        ["testnet", "--base-port", "70000"],
        ["testnet", "--state-buckets", "1000"],
        ["testnet", "--max-block-txs", "2000000000000"],
        ["node", "--home", ".", "--batch-timeout", "-1"],
        ["node", "--home", ".", "--cipher", "rc4"],
        ["launch", ".", "--cipher", "none"],
        ["client", "--timeout", "nan"],
        ["chain", "sample", ".", "--blocks", "0"],
        ["demo", "--seed", "-3"],
    ],
)
def test_a_bad_argument_is_a_usage_error_not_a_traceback(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert f"argument {argv[-2]}" in capsys.readouterr().err


@given(st.text(max_size=20))
def test_any_text_is_positive_integers_or_an_argument_error(text):
    try:
        values = positive_ints()(text)
    except argparse.ArgumentTypeError:
        return
    assert values and all(type(v) is int and v > 0 for v in values)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--density", "2"], r"fedchain train: density must be in \(0, 1\]"),
        (["--noise", "1", "--budget", "loss-adaptive"], r"exclude each other"),
    ],
)
def test_a_learning_setting_out_of_range_is_named_before_any_data_loads(argv, message, recwarn):
    """Named at once, not after the data (seconds) and its features (minutes):
    no DataWarning, so nothing was loaded."""
    with pytest.raises(SystemExit, match=message):
        cli.main(["train", *argv, "--rounds", "1"])
    assert not [w for w in recwarn if "MNIST" in str(w.message)]


def test_a_testnet_past_the_last_port_is_refused_before_writing(tmp_path):
    out = tmp_path / "t"
    with pytest.raises(SystemExit, match=r"4 nodes need 4 ports in 1\.\.65535"):
        cli.main(["testnet", "--validators", "4", "--base-port", "65534", "--out", str(out)])
    assert not out.exists()


def test_a_testnet_sizes_its_state_and_blocks_as_asked(tmp_path):
    out = tmp_path / "t"
    argv = ["testnet", "--validators", "2", "--out", str(out), "--seed", "1"]
    assert cli.main([*argv, "--state-buckets", "65536", "--max-block-txs", "3000"]) == 0
    for node in ("node0", "node1"):
        params = load_home(out / node).genesis.params
        assert (params.state_buckets, params.max_block_txs) == (65536, 3000)


def test_contained_handler_errors_are_read_from_the_last_status_lines(tmp_path):
    from fedchain.sims.bench_consensus import _handler_errors, _last_statuses

    for index, counters in enumerate(({"handler_error.KeyError": 2}, {"sync.polls": 1})):
        (tmp_path / f"node{index}").mkdir()
        older = json.dumps({"node": {"handler_error.KeyError": 1}})
        last = json.dumps({"node": {**counters, "handler_error.ValueError": 1}})
        (tmp_path / f"node{index}" / "node.log").write_text(f"{older}\nnot json\n{last}\n")
    assert _handler_errors(_last_statuses(tmp_path)) == 4  # 2 + 1, then 1: the last line of each


def test_suspicions_and_views_are_read_from_the_last_status_lines(tmp_path):
    from fedchain.sims.bench_consensus import _last_statuses, _suspicions

    lines = (
        [
            {"suspects": {"request timeout": 5}, "pbft": {"view": 0}},
            {"suspects": {}, "pbft": {"view": 2}},
        ],
        [{"suspects": {"request timeout": 1, "equivocation": 1}, "pbft": {"view": 1}}],
        [{"node": {}}],  # a status line without them (a follower, an older node)
    )
    for index, statuses in enumerate(lines):
        (tmp_path / f"node{index}").mkdir()
        text = "\n".join(json.dumps(status) for status in statuses)
        (tmp_path / f"node{index}" / "node.log").write_text(text + "\n{torn")
    assert _suspicions(_last_statuses(tmp_path)) == (
        {"request timeout": 1, "equivocation": 1},
        [2, 1, None],
    )


def test_cipher_choices_map_to_the_suites_a_transport_offers():
    from fedchain.p2p.handshake import SUITE_AES256GCM, SUITE_SEALED
    from fedchain.sims.node_cmd import tcp_config

    assert tcp_config("auto").suites is None  # handshake.default_suites()
    assert tcp_config("xsalsa20-poly1305").suites == SUITE_SEALED
    assert tcp_config("aes-256-gcm").suites == SUITE_AES256GCM  # CI's CPUs have AES-NI
    with pytest.raises(ValueError, match="unknown cipher suite"):
        tcp_config("plaintext")  # the benchmark's baseline, never a node's
