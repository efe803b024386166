"""Node homes: whatever a user's editor left in a home's files, loading it
gives a NodeHome or a HomeError that names the file, never a traceback."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structure_mutations import JSON_VALUES, mutated

from fedchain.sims.home import (
    CONFIG_FILE,
    GENESIS_FILE,
    KEY_FILE,
    HomeError,
    load_home,
    write_testnet,
)

_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def home(tmp_path):
    (path,) = write_testnet(tmp_path, 1, seed=3)
    return path


@pytest.fixture
def fresh(home):
    """``home``, put back as written before each example edits it."""
    files = {name: (home / name).read_bytes() for name in (CONFIG_FILE, KEY_FILE, GENESIS_FILE)}

    def restore():
        for name, data in files.items():
            (home / name).write_bytes(data)
        return home

    return restore


def _load_or_home_error(path) -> None:
    try:
        loaded = load_home(path)
    except HomeError:
        return
    assert 0 < loaded.listen[1] < 65536 and len(loaded.identity.public_key) == 32


@_SETTINGS
@given(data=st.data())
def test_any_edit_of_the_config_loads_or_is_a_home_error(fresh, data) -> None:
    home = fresh()
    good = json.loads((home / CONFIG_FILE).read_text())
    (home / CONFIG_FILE).write_text(json.dumps(data.draw(mutated(good, JSON_VALUES))))
    _load_or_home_error(home)


@_SETTINGS
@given(name=st.sampled_from([CONFIG_FILE, KEY_FILE, GENESIS_FILE]), junk=st.binary(max_size=80))
def test_any_bytes_in_any_file_load_or_are_a_home_error(fresh, name, junk) -> None:
    home = fresh()
    (home / name).write_bytes(junk)
    _load_or_home_error(home)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"index": "0"}, r"index is a whole number"),
        ({"index": -1}, r"index is a whole number"),
        ({"listen": "127.0.0.1:\u00b2"}, r"bad port"),
        ({"listen": "127.0.0.1:0"}, r"bad port"),
        ({"peers": [["key"]]}, r"a peer is \{key, address\}"),
    ],
)
def test_config_mistakes_are_named(home, edit, message) -> None:
    config = json.loads((home / CONFIG_FILE).read_text())
    (home / CONFIG_FILE).write_text(json.dumps({**config, **edit}))
    with pytest.raises(HomeError, match=message):
        load_home(home)


def test_a_folder_where_a_file_should_be_is_a_home_error(home) -> None:
    (home / KEY_FILE).unlink()
    (home / KEY_FILE).mkdir()
    with pytest.raises(HomeError, match=KEY_FILE):
        load_home(home)
