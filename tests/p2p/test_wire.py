"""The wire envelope: round trips, strict refusal of anything else, replay
window. Invariants W1-W5 of p2p/SPEC.md."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedchain.p2p import wire
from fedchain.p2p.errors import (
    BadSignature,
    FrameTooLarge,
    MalformedBody,
    MalformedEnvelope,
    NotMsgpack,
    ReplayedSequence,
    StaleSequence,
    TrailingBytes,
    UnknownMessageType,
    UnknownVersion,
    WireError,
)
from fedchain.p2p.identity import Identity

ALICE = Identity(bytes(range(32)))
BOB = Identity(bytes(range(1, 33)))

identities = st.binary(min_size=32, max_size=32).map(Identity)
message_types = st.sampled_from(list(wire.MessageType))
seqs = st.integers(min_value=0, max_value=wire.MAX_SEQ)
bodies = st.binary(max_size=4096)


def raw_frame(fields: list, signer: Identity = ALICE) -> bytes:
    """A frame with arbitrary header fields, correctly signed over them."""
    signed = msgpack.packb(fields, use_bin_type=True)[1:]
    return b"\x96" + signed + b"\xc4\x40" + signer.sign(wire._DOMAIN + signed)


@given(identities, message_types, seqs, bodies)
@settings(max_examples=200, deadline=None)
def test_decode_inverts_encode(identity, msg_type, seq, body):
    """W1: decode(encode(x)) == x for every valid envelope."""
    envelope = wire.sign(identity, msg_type, seq, body)
    frame = wire.encode(envelope)
    assert wire.decode(frame) == envelope
    assert wire.decode(frame).frame == frame
    rebuilt = wire.Envelope(
        envelope.version, envelope.type, envelope.sender, seq, body, envelope.signature
    )
    assert wire.encode(rebuilt) == frame  # encoding from fields, not the cached frame


@given(identities, message_types, seqs, bodies)
@settings(max_examples=100, deadline=None)
def test_peek_reads_type_sender_and_body_of_a_frame(identity, msg_type, seq, body):
    frame = wire.sign(identity, msg_type, seq, body).frame
    assert wire.peek(frame) == (msg_type, identity.public_key, body)


@given(st.binary(max_size=512), st.integers(0, 600))
@settings(max_examples=1000, deadline=None)
def test_peek_never_raises(data, cut):
    """Any bytes, or a frame cut short: the three fields of the right types, or None."""
    frame = wire.sign(ALICE, wire.MessageType.CLIENT, 1, data).frame
    for candidate in (data, frame[:cut]):
        peeked = wire.peek(candidate)
        assert peeked is None or [type(x) for x in peeked] == [int, bytes, bytes]


@given(st.binary(max_size=512))
@settings(max_examples=2000, deadline=None)
def test_any_bytes_decode_or_wire_error(data):
    """W2: for any byte string, an envelope or a WireError, nothing else."""
    try:
        result = wire.decode(data)
    except WireError:
        return
    assert isinstance(result, wire.Envelope)


@given(message_types, seqs, bodies, st.data())
@settings(max_examples=300, deadline=None)
def test_any_mutation_of_a_valid_frame_is_refused(msg_type, seq, body, data):
    """W3: changing any byte of a signed frame makes it invalid."""
    frame = bytearray(wire.encode(wire.sign(ALICE, msg_type, seq, body)))
    index = data.draw(st.integers(0, len(frame) - 1))
    delta = data.draw(st.integers(1, 255))
    frame[index] = (frame[index] + delta) % 256
    with pytest.raises(WireError):
        wire.decode(bytes(frame))


def test_a_hundred_thousand_random_and_mutated_frames_never_escape():
    """W2 at volume: 100,000 frames, half random, half mutations of valid ones
    (flips, truncations, extensions, splices); only WireError may come out and
    nothing but the untouched originals may decode."""
    rng = np.random.default_rng(2026)
    valid = [
        wire.encode(wire.sign(ALICE, t, int(rng.integers(0, 2**40)), rng.bytes(int(n))))
        for t, n in zip(
            rng.choice(list(wire.MessageType), 64), rng.integers(0, 300, 64), strict=True
        )
    ]
    outcomes = {"refused": 0, "decoded": 0}
    for i in range(100_000):
        if i % 2:
            frame = rng.bytes(int(rng.integers(0, 200)))
            if i % 6 == 1:
                frame = b"\x96" + frame  # looks like an envelope for one byte
        else:
            base = bytearray(valid[int(rng.integers(0, len(valid)))])
            kind = i % 8
            if kind == 0:
                base[int(rng.integers(0, len(base)))] ^= 1 << int(rng.integers(0, 8))
            elif kind == 2:
                base = base[: int(rng.integers(0, len(base)))]
            elif kind == 4:
                base += rng.bytes(int(rng.integers(1, 10)))
            else:
                other = valid[int(rng.integers(0, len(valid)))]
                cut = int(rng.integers(1, min(len(base), len(other))))
                base = base[:cut] + other[cut:]
                if bytes(base) in valid:
                    continue
            frame = bytes(base)
        try:
            wire.decode(frame)
        except WireError:
            outcomes["refused"] += 1
        else:
            outcomes["decoded"] += 1
    assert outcomes["decoded"] == 0
    assert outcomes["refused"] > 99_000


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (b"\x96" + b"\x00" * (wire.MAX_FRAME_BYTES + 1), FrameTooLarge),
        (b"\xc1", NotMsgpack),
        (b"", NotMsgpack),
        (msgpack.packb([1, 2, 3]), MalformedEnvelope),
        (msgpack.packb({"a": 1}), MalformedEnvelope),
        (msgpack.packb([1, 1, b"x" * 32, 1, b"", b"s" * 63]), MalformedEnvelope),
        (msgpack.packb([1, 1, b"x" * 31, 1, b"", b"s" * 64]), MalformedEnvelope),
        (msgpack.packb([1, 1, b"x" * 32, -1, b"", b"s" * 64]), MalformedEnvelope),
        (msgpack.packb([1, 1, b"x" * 32, 1, "text", b"s" * 64]), MalformedEnvelope),
        (msgpack.packb([True, 1, b"x" * 32, 1, b"", b"s" * 64]), MalformedEnvelope),
        (raw_frame([2, 1, ALICE.public_key, 1, b""]), UnknownVersion),
        (raw_frame([1, 99, ALICE.public_key, 1, b""]), UnknownMessageType),
        (raw_frame([1, 1, ALICE.public_key, 1, b""], signer=BOB), BadSignature),
    ],
)
def test_each_failure_has_its_typed_error(frame, error):
    with pytest.raises(error) as caught:
        wire.decode(frame)
    assert isinstance(caught.value, WireError)


def test_trailing_bytes_and_non_canonical_encodings_are_refused():
    frame = wire.encode(wire.sign(ALICE, wire.MessageType.PING, 7, b"hi"))
    with pytest.raises(TrailingBytes):
        wire.decode(frame + b"\x00")
    # seq 7 written as a uint64 instead of a fixint: same value, other bytes.
    loose = frame.replace(b"\x07\xc4\x02hi", b"\xcf" + (7).to_bytes(8, "big") + b"\xc4\x02hi")
    assert msgpack.unpackb(loose)[3] == 7
    with pytest.raises(MalformedEnvelope, match="non-canonical"):
        wire.decode(loose)


def test_a_signature_from_another_key_is_refused():
    envelope = wire.sign(ALICE, wire.MessageType.GOSSIP, 1, b"payload")
    forged = wire.Envelope(1, envelope.type, BOB.public_key, 1, b"payload", envelope.signature)
    with pytest.raises(BadSignature):
        wire.decode(wire.encode(forged))


def _with_bad_signature(frame: bytes) -> bytes:
    return frame[:-1] + bytes([frame[-1] ^ 1])


@given(message_types, seqs, bodies, st.sampled_from([ALICE, BOB]), st.sampled_from([None, 0, 1]))
@settings(max_examples=300, deadline=None)
def test_a_link_vouches_only_for_direct_frames_from_its_own_peer(msg_type, seq, body, signer, link):
    """W5: a bad signature is refused unless the frame is a direct one and
    the authenticated link it came over is its sender's; every other check
    still runs either way."""
    link_peer = None if link is None else (ALICE, BOB)[link].public_key
    frame = _with_bad_signature(wire.encode(wire.sign(signer, msg_type, seq, body)))
    vouched = link_peer == signer.public_key and msg_type not in wire.RELAYABLE
    if vouched:
        envelope = wire.decode(frame, link_peer=link_peer)
        assert (envelope.sender, envelope.body, envelope.frame) == (signer.public_key, body, frame)
    else:
        with pytest.raises(BadSignature):
            wire.decode(frame, link_peer=link_peer)
    with pytest.raises(UnknownVersion):  # the link vouches for a sender, not for the bytes
        wire.decode(frame[:1] + b"\x02" + frame[2:], link_peer=link_peer)


def test_message_ids_are_distinct_per_content_and_stable():
    a = wire.sign(ALICE, wire.MessageType.GOSSIP, 1, b"a")
    b = wire.sign(ALICE, wire.MessageType.GOSSIP, 1, b"b")
    assert a.message_id != b.message_id
    assert wire.decode(wire.encode(a)).message_id == a.message_id
    assert len(a.message_id) == 20


def test_sign_refuses_what_decode_would_refuse():
    with pytest.raises(ValueError):
        wire.sign(ALICE, 99, 1, b"")
    with pytest.raises(ValueError):
        wire.sign(ALICE, wire.MessageType.PING, 2**64, b"")


class TestSequenceWindow:
    def test_replays_and_stale_numbers_are_refused_reordering_is_not(self):
        window = wire.SequenceWindow(size=8)
        window.check(ALICE.public_key, 10)
        window.check(ALICE.public_key, 12)
        window.check(ALICE.public_key, 11)
        window.check(ALICE.public_key, 5)
        with pytest.raises(ReplayedSequence):
            window.check(ALICE.public_key, 11)
        with pytest.raises(StaleSequence):
            window.check(ALICE.public_key, 4)
        window.check(BOB.public_key, 4)  # windows are per sender

    @given(st.lists(st.integers(0, 300), max_size=200), st.integers(1, 64))
    @settings(max_examples=200, deadline=None)
    def test_matches_a_reference_model(self, seqs, size):
        """W4: accepted exactly when unseen and within ``size`` of the highest."""
        window = wire.SequenceWindow(size=size)
        seen: set[int] = set()
        highest = None
        for seq in seqs:
            fresh = seq not in seen and (highest is None or seq > highest - size)
            try:
                window.check(ALICE.public_key, seq)
            except (ReplayedSequence, StaleSequence) as exc:
                assert not fresh
                assert isinstance(exc, ReplayedSequence) == (seq in seen and seq > highest - size)
            else:
                assert fresh
                seen.add(seq)
                highest = seq if highest is None else max(highest, seq)


class TestFrameCache:
    def test_identical_frames_are_verified_once_and_failures_never_cached(self):
        cache = wire.FrameCache(max_bytes=10_000)
        frame = wire.encode(wire.sign(ALICE, wire.MessageType.PING, 1, b"x"))
        assert cache.decode(frame) == cache.decode(bytes(frame))
        assert (cache.hits, cache.misses) == (1, 1)
        bad = frame[:-1] + bytes([frame[-1] ^ 1])
        for _ in range(2):
            with pytest.raises(BadSignature):
                cache.decode(bad)
        assert cache.misses == 3

    def test_an_entry_taken_on_a_links_word_is_verified_for_anyone_else(self):
        cache = wire.FrameCache(max_bytes=10_000)
        good = wire.encode(wire.sign(ALICE, wire.MessageType.CONSENSUS, 1, b"x"))
        bad = _with_bad_signature(
            wire.encode(wire.sign(ALICE, wire.MessageType.CONSENSUS, 2, b"y"))
        )
        for frame in (good, bad):
            assert cache.decode(frame, link_peer=ALICE.public_key).frame == frame
        assert cache.decode(good, link_peer=BOB.public_key).frame == good  # verified now
        for link_peer in (None, BOB.public_key):
            with pytest.raises(BadSignature):
                cache.decode(bad, link_peer=link_peer)
        assert cache.decode(bad, link_peer=ALICE.public_key).frame == bad
        assert (cache.hits, cache.misses) == (4, 2)

    def test_bounded_by_bytes(self):
        cache = wire.FrameCache(max_bytes=1000)
        frames = [wire.encode(wire.sign(ALICE, 1, i, bytes(300))) for i in range(10)]
        for frame in frames:
            cache.decode(frame)
        assert cache._bytes <= 1000
        cache.decode(frames[0])
        assert cache.hits == 0


@given(st.binary(max_size=256))
@settings(max_examples=500, deadline=None)
def test_unpack_body_returns_a_value_or_malformed_body(data):
    try:
        value = wire.unpack_body(data)
    except MalformedBody:
        return
    packed = wire.pack_body(value)  # bytes, not values: NaN != NaN
    assert wire.pack_body(wire.unpack_body(packed)) == packed
