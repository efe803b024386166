"""`fedchain chain verify`: a chain is checked from its bytes and the genesis
alone, and a break is reported at its height with its reason."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import msgpack

from fedchain.consensus.block import decode_block, encode_block
from fedchain.consensus.store import SqliteBlockStore, StoredBlock
from fedchain.consensus.votes import CommitCertificate
from fedchain.sims.chain_cmd import CHAIN_FILE, write_sample_chain
from fedchain.sims.cli import main


def _verify(tmp_path, capsys) -> tuple[int, dict]:
    code = main(["chain", "verify", str(tmp_path), "--json"])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _edit_row_behind_the_stores_back(directory, *, height: int) -> None:
    """Change a block's last byte with plain SQL, leaving its checksum stale."""
    db = sqlite3.connect(directory / CHAIN_FILE)
    (data,) = db.execute("SELECT data FROM blocks WHERE height = ?", (height,)).fetchone()
    with db:
        db.execute("UPDATE blocks SET data = ? WHERE height = ?", (data[:-1] + b"\x00", height))
    db.close()


def test_a_sample_chain_verifies(tmp_path, capsys):
    assert main(["chain", "sample", str(tmp_path), "--blocks", "6", "--txs", "5"]) == 0
    capsys.readouterr()
    code, report = _verify(tmp_path, capsys)
    assert code == 0
    assert report["ok"] is True
    assert report["verified_height"] == report["stored_height"] == 6
    assert report["validators"] == 4


def test_a_row_edited_behind_the_stores_back_is_found(tmp_path, capsys):
    write_sample_chain(tmp_path, blocks=5, txs=3, seed=2)
    _edit_row_behind_the_stores_back(tmp_path, height=3)
    code, report = _verify(tmp_path, capsys)
    assert code == 1
    assert "height 3" in report["error"]  # the store's checksum names the row


def test_a_block_without_a_quorum_is_where_the_chain_breaks(tmp_path, capsys):
    """Rewrite block 4 through the store API with one vote too few: every
    row checks out, only the certificate does not."""
    write_sample_chain(tmp_path, blocks=6, txs=3, seed=3)
    path = str(tmp_path / CHAIN_FILE)
    with SqliteBlockStore(path) as store:
        kept = [store.get(h) for h in range(store.tip() + 1)]
    (tmp_path / CHAIN_FILE).unlink()
    with SqliteBlockStore(path) as store:
        for stored in kept:
            if stored.height == 4:
                block = decode_block(stored.data)
                cert = block.certificate
                weak = CommitCertificate(cert.height, cert.block_hash, cert.votes[:2], cert.view)
                stored = StoredBlock(4, block.hash, encode_block(block.with_certificate(weak)))
            store.append(stored)
    code, report = _verify(tmp_path, capsys)
    assert code == 1
    assert report["broken_at"] == 4
    assert "certificate" in report["error"]
    assert report["verified_height"] == 3


def test_the_human_report_says_where_it_breaks(tmp_path, capsys):
    write_sample_chain(tmp_path, blocks=2, txs=2, seed=4)
    assert main(["chain", "verify", str(tmp_path)]) == 0
    assert "chain verified: heights 1..2" in capsys.readouterr().out


def test_a_damaged_old_row_breaks_the_chain_at_its_height(tmp_path, capsys):
    """Rows far below the tip are checked as they are read, not on open."""
    write_sample_chain(tmp_path, blocks=25, txs=1, seed=5)
    _edit_row_behind_the_stores_back(tmp_path, height=3)
    code, report = _verify(tmp_path, capsys)
    assert code == 1
    assert report["broken_at"] == 3
    assert report["verified_height"] == 2
    assert "store_corrupted" in report["error"]


def test_a_damaged_genesis_row_breaks_the_chain_at_zero(tmp_path, capsys):
    """Far below the tip, so only the read finds it; a report, not a traceback."""
    write_sample_chain(tmp_path, blocks=25, txs=1, seed=6)
    db = sqlite3.connect(tmp_path / CHAIN_FILE)
    (data,) = db.execute("SELECT data FROM blocks WHERE height = 0").fetchone()
    with db:  # flip a bit of the last byte (the genesis's ends in 0x00 already)
        db.execute("UPDATE blocks SET data = ? WHERE height = 0", (data[:-1] + b"\x01",))
    db.close()
    code, report = _verify(tmp_path, capsys)
    assert code == 1
    assert report == {"ok": False, "broken_at": 0, "error": report["error"]}
    assert "store_corrupted" in report["error"] and "genesis" in report["error"]


def test_a_store_whose_genesis_is_no_genesis_breaks_at_zero(tmp_path, capsys):
    """Written through the store API, so every checksum holds."""
    junk = msgpack.packb(["sample", 0, [], [[1, b""], ["a", b""]], [1, 2, 3, 4]])
    with SqliteBlockStore(str(tmp_path / CHAIN_FILE)) as store:
        store.append(StoredBlock(0, hashlib.sha256(junk).digest(), junk))
    code, report = _verify(tmp_path, capsys)
    assert code == 1
    assert report["broken_at"] == 0 and "malformed" in report["error"]
    assert main(["chain", "verify", str(tmp_path)]) == 1
    assert "chain store unreadable" in capsys.readouterr().out
