"""Hypothesis strategies that mutate a decoded structure (msgpack or JSON).

Random bytes rarely get past a strict decoder's first check: they are not
msgpack, or not an array of the right length. Bugs hide deeper, where a
well-formed structure holds a value of the wrong type or size in one place
(a genesis whose state keys mix strings and integers could not even be
compared for its order check). So these strategies start from a valid
value, decoded, and change it a little: replace, drop, duplicate or swap
an element somewhere, or nudge a leaf (an integer by one, a flipped bit,
a shortened string).
"""

from __future__ import annotations

import msgpack
from hypothesis import strategies as st

ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, 1, -1, 2**31, 2**32, 2**40, 2**63 - 1, 2**63, 2**64 - 1]),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.sampled_from(["", "a", "sys/x", "kv", "\u00e9"]),
    st.binary(max_size=40),
    st.sampled_from([b"", bytes(24), bytes(32), b"\x01" * 32, b"\xff" * 64]),
    st.lists(st.integers(0, 3) | st.binary(max_size=4) | st.text(max_size=2), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(0, 3), max_size=2),
)
"""Values of every msgpack type, with the sizes strict decoders care about."""

JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(["", "127.0.0.1:0", "host:99999", "a:b:c", "00" * 32, "zz"]),
    st.lists(st.integers(0, 3) | st.text(max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(0, 3) | st.text(max_size=3), max_size=2),
)
"""Values JSON can hold, for configuration files."""


@st.composite
def _nudged(draw, value: object, leaves: st.SearchStrategy) -> object:
    """A leaf changed a little, keeping its type where it can."""
    if isinstance(value, bool) or value is None:
        return draw(leaves)
    if isinstance(value, int):
        return value + draw(st.sampled_from([-1, 1, 2**32, -(2**32)]))
    if isinstance(value, bytes | str) and value:
        if draw(st.booleans()):
            return value[: draw(st.integers(0, len(value) - 1))]
        if isinstance(value, bytes):
            flipped = bytearray(value)
            flipped[draw(st.integers(0, len(value) - 1))] ^= draw(st.integers(1, 255))
            return bytes(flipped)
    return draw(leaves)


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every place in ``value``: the root, then each element, depth first."""
    out = [prefix]
    if isinstance(value, list):
        for i, item in enumerate(value):
            out.extend(_paths(item, (*prefix, i)))
    elif isinstance(value, dict):
        for key, item in value.items():
            out.extend(_paths(item, (*prefix, key)))
    return out


def _replaced(value: object, path: tuple, new: object) -> object:
    """A copy of ``value`` with the node at ``path`` replaced by ``new``."""
    if not path:
        return new
    copy = list(value) if isinstance(value, list) else dict(value)
    copy[path[0]] = _replaced(copy[path[0]], path[1:], new)
    return copy


@st.composite
def mutated_once(draw, value: object, leaves: st.SearchStrategy = ODD_VALUES) -> object:
    """``value`` with one change at a place drawn uniformly (so a deep
    field is as likely a target as the root); new values from ``leaves``."""
    path = draw(st.sampled_from(_paths(value)))
    node = value
    for step in path:
        node = node[step]
    if isinstance(node, list) and node and draw(st.booleans()):
        out = list(node)
        i = draw(st.integers(0, len(out) - 1))
        op = draw(st.sampled_from(["drop", "duplicate", "swap", "append"]))
        if op == "drop":
            del out[i]
        elif op == "duplicate":
            out.insert(i, out[i])
        elif op == "swap":
            j = draw(st.integers(0, len(out) - 1))
            out[i], out[j] = out[j], out[i]
        else:
            out.append(draw(leaves))
    elif isinstance(node, dict) and node and draw(st.booleans()):
        out = dict(node)
        del out[draw(st.sampled_from(sorted(out, key=repr)))]
    elif draw(st.booleans()):
        out = draw(_nudged(node, leaves))
    else:
        out = draw(leaves)
    return _replaced(value, path, out)


@st.composite
def mutated(
    draw, value: object, leaves: st.SearchStrategy = ODD_VALUES, max_changes: int = 3
) -> object:
    """``value`` with one to ``max_changes`` changes."""
    for _ in range(draw(st.integers(1, max_changes))):
        value = draw(mutated_once(value, leaves))
    return value


def _packed(value: object) -> bytes | None:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):  # an integer past 64 bits
        return None


def mutated_msgpack(value: object) -> st.SearchStrategy[bytes]:
    """The msgpack bytes of ``mutated(value)``, for the values that pack."""
    return mutated(value).map(_packed).filter(lambda packed: packed is not None)
