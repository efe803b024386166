"""The pure handshake and record sealing of p2p/handshake.py.

No sockets: two :class:`Handshake` objects are wired back to back, so every
byte each side would put on a link is here to inspect, tamper with, replay
or reorder. The property tests feed every parser arbitrary bytes and accept
only a value or the parser's typed error.

Invariants of ``p2p/SPEC.md`` checked here, by name: TCP-AUTH (a proof
binds both ephemeral keys and the role; only allowed keys pass), TCP-SEAL
(nonces never repeat; replayed, reordered, re-split or tampered records
fail), TCP-BOUND (length prefixes are checked before any body is read).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl import bindings

from fedchain.p2p.errors import BadFrame, DecryptFailed, FrameTooLarge, HandshakeError
from fedchain.p2p.handshake import (
    AUTH_BYTES,
    CHUNK_BYTES,
    HELLO_BYTES,
    LENGTH_BYTES,
    PROTOCOL_VERSION,
    SUITE_AES256GCM,
    SUITE_PLAINTEXT,
    SUITE_SEALED,
    TAG_BYTES,
    AesGcmSession,
    Auth,
    Handshake,
    Hello,
    PlainSession,
    SealedSession,
    aes256gcm_available,
    choose_suite,
    default_suites,
    encode_length,
    max_body_bytes,
    parse_auth,
    parse_hello,
    parse_length,
    plain_length,
    sealed_length,
)
from fedchain.p2p.identity import Identity

A, B, C = (Identity(bytes([n]) * 32) for n in (1, 2, 3))


def allow_all(key: bytes) -> bool:
    return True


def body(record: bytes | bytearray) -> bytes:
    """A record without its length prefix, checking that the prefix is right."""
    assert parse_length(record[:LENGTH_BYTES], 1 << 30) == len(record) - LENGTH_BYTES
    return bytes(record[LENGTH_BYTES:])


def run(a: Handshake, b: Handshake):
    """Both sides of a handshake, back to back; returns both results."""
    auth_a = a.receive_hello(body(b.hello_record))
    auth_b = b.receive_hello(body(a.hello_record))
    return a.receive_auth(body(auth_b)), b.receive_auth(body(auth_a))


def pair(suite: int = SUITE_SEALED):
    """Both sessions of a handshake in which both sides offer only ``suite``."""
    ra, rb = run(Handshake(A, allow_all, suites=suite), Handshake(B, allow_all, suites=suite))
    return ra.session, rb.session


# --- the handshake ---------------------------------------------------------------------


def test_each_side_learns_the_others_key_and_they_share_a_channel():
    ra, rb = run(Handshake(A, allow_all), Handshake(B, allow_all))
    assert ra.peer == B.public_key and rb.peer == A.public_key
    for size in (0, 1, 1000, CHUNK_BYTES, CHUNK_BYTES + 1, 5 * CHUNK_BYTES + 7):
        frame = os.urandom(size)
        assert rb.session.open_body(bytearray(body(ra.session.seal_record(frame)))) == frame
        assert ra.session.open_body(bytearray(body(rb.session.seal_record(frame)))) == frame


def test_identities_never_appear_in_the_clear():
    a, b = Handshake(A, allow_all), Handshake(B, allow_all)
    auth_a = a.receive_hello(body(b.hello_record))
    wire = a.hello_record + auth_a
    assert A.public_key not in wire
    assert len(auth_a) == LENGTH_BYTES + AUTH_BYTES + TAG_BYTES


def test_fixed_ephemeral_secrets_make_the_handshake_reproducible():
    def transcript():
        a = Handshake(A, allow_all, ephemeral_secret=bytes([9]) * 32)
        b = Handshake(B, allow_all, ephemeral_secret=bytes([8]) * 32)
        return a.hello_record, a.receive_hello(body(b.hello_record))

    assert transcript() == transcript()


def test_a_key_outside_the_allow_list_is_refused_after_its_proof_checks():
    a = Handshake(A, lambda key: key == C.public_key)
    b = Handshake(B, allow_all)
    auth_b = b.receive_hello(body(a.hello_record))
    a.receive_hello(body(b.hello_record))
    with pytest.raises(HandshakeError) as caught:
        a.receive_auth(body(auth_b))
    assert caught.value.reason == "not_allowed"


class Impostor(Identity):
    """Claims one key but signs with another's secret."""

    def __init__(self, claimed: Identity, signer: Identity) -> None:
        super().__init__(signer.seed())
        self._claimed = claimed.public_key

    @property
    def public_key(self) -> bytes:
        return self._claimed


def test_a_claimed_key_without_its_secret_fails_the_proof():
    with pytest.raises(HandshakeError) as caught:
        run(Handshake(A, allow_all), Handshake(Impostor(C, signer=B), allow_all))
    assert caught.value.reason == "bad_proof"


def test_a_man_in_the_middle_cannot_forward_a_proof():
    """M runs one handshake with A and another with B and relays A's auth to B.

    The two transcripts differ (M's ephemeral keys), so the relayed record does
    not even open under the keys B shares with M.
    """
    a, m_to_a = Handshake(A, allow_all), Handshake(C, allow_all)
    m_to_b, b = Handshake(C, allow_all), Handshake(B, allow_all)
    auth_a = a.receive_hello(body(m_to_a.hello_record))
    m_to_b.receive_hello(body(b.hello_record))
    b.receive_hello(body(m_to_b.hello_record))
    with pytest.raises(HandshakeError) as caught:
        b.receive_auth(body(auth_a))
    assert caught.value.reason == "auth_failed"


def test_a_reflected_hello_is_refused():
    a = Handshake(A, allow_all)
    with pytest.raises(HandshakeError) as caught:
        a.receive_hello(body(a.hello_record))
    assert caught.value.reason == "handshake_malformed"


def test_a_reflected_auth_is_refused_by_the_role_byte():
    """Replaying my own auth back to me: same keys, but the role differs."""
    a, b = Handshake(A, allow_all), Handshake(B, allow_all)
    b.receive_hello(body(a.hello_record))
    auth_a = a.receive_hello(body(b.hello_record))
    # Re-seal A's own proof in B's direction so that only the role can catch it.
    suite = type(a._auth_sealer)
    signed = suite(bytes(32), a._auth_sealer._send_key).open_body(bytearray(body(auth_a)))
    reflected = suite(b._auth_sealer._send_key, bytes(32)).seal_record(signed)
    with pytest.raises(HandshakeError) as caught:
        a.receive_auth(body(reflected))
    assert caught.value.reason == "bad_proof"


def test_a_low_order_ephemeral_key_is_refused():
    weak = Hello(PROTOCOL_VERSION, SUITE_SEALED, bytes(32)).encode()
    with pytest.raises(HandshakeError) as caught:
        Handshake(A, allow_all).receive_hello(weak)
    assert caught.value.reason == "handshake_malformed"


def test_messages_out_of_order_are_refused():
    a = Handshake(A, allow_all)
    with pytest.raises(HandshakeError):
        a.receive_auth(bytes(AUTH_BYTES + TAG_BYTES))
    b = Handshake(B, allow_all)
    a.receive_hello(body(b.hello_record))
    with pytest.raises(HandshakeError):
        a.receive_hello(body(b.hello_record))


def test_the_plaintext_suite_still_authenticates_but_does_not_seal():
    sa, sb = pair(SUITE_PLAINTEXT)
    assert isinstance(sa, PlainSession) and isinstance(sb, PlainSession)
    record = sa.seal_record(b"visible")
    assert record == encode_length(7) + b"visible"
    assert sb.open_body(bytearray(record[LENGTH_BYTES:])) == b"visible"


# --- sealed records --------------------------------------------------------------------


def test_chunks_are_plain_secretbox_with_the_counter_and_length_nonce():
    """The zero-copy sealer agrees with PyNaCl's public secretbox, chunk by chunk."""
    key = bytes(range(32))
    frame = os.urandom(2 * CHUNK_BYTES + 100)
    sealer = SealedSession(key, bytes(32))
    sealer.seal_record(b"one record first")  # uses counter 0
    record = sealer.seal_record(frame)
    size = sealed_length(len(frame))
    expected = b"".join(
        bindings.crypto_secretbox_easy(
            frame[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES],
            (1 + i).to_bytes(8, "big") + size.to_bytes(4, "big") + bytes(12),
            key,
        )
        for i in range(3)
    )
    assert bytes(record) == encode_length(size) + expected


def test_a_replayed_record_fails():
    sa, sb = pair()
    record = body(sa.seal_record(b"pay 10"))
    assert sb.open_body(bytearray(record)) == b"pay 10"
    with pytest.raises(DecryptFailed):
        sb.open_body(bytearray(record))


def test_reordered_records_fail():
    sa, sb = pair()
    first, second = body(sa.seal_record(b"first")), body(sa.seal_record(b"second"))
    with pytest.raises(DecryptFailed):
        sb.open_body(bytearray(second))
    # The failed record consumed no counter: the honest order still opens.
    assert sb.open_body(bytearray(first)) == b"first"


def test_a_record_sent_back_to_its_sender_fails():
    sa, _ = pair()
    with pytest.raises(DecryptFailed):
        sa.open_body(bytearray(body(sa.seal_record(b"echo"))))


def test_resplitting_a_record_into_two_fails():
    """Two honest chunks re-framed as two records: the length in the nonce differs."""
    sa, sb = pair()
    record = body(sa.seal_record(os.urandom(CHUNK_BYTES + 10)))
    with pytest.raises(DecryptFailed):
        sb.open_body(bytearray(record[: CHUNK_BYTES + TAG_BYTES]))


@given(st.data())
@settings(max_examples=50, deadline=None)
def test_any_single_bit_flip_fails(data):
    sa, sb = pair()
    record = bytearray(body(sa.seal_record(b"x" * 300)))
    bit = data.draw(st.integers(0, 8 * len(record) - 1))
    record[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(DecryptFailed):
        sb.open_body(record)


def test_lengths_round_trip_at_chunk_boundaries():
    for plain in (0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 3 * CHUNK_BYTES):
        assert plain_length(sealed_length(plain)) == plain
    assert max_body_bytes(1000, SUITE_PLAINTEXT) == 1000
    assert max_body_bytes(1000, SUITE_SEALED) == 1000 + TAG_BYTES


# --- every parser: a value or its typed error ------------------------------------------


@given(st.binary(max_size=8), st.integers(0, 2**33))
def test_parse_length_returns_a_bounded_length_or_a_typed_error(header, limit):
    try:
        length = parse_length(header, limit)
    except (BadFrame, FrameTooLarge):
        assert len(header) != LENGTH_BYTES or int.from_bytes(header, "big") > limit
    else:
        assert len(header) == LENGTH_BYTES and 0 <= length <= limit


@given(st.integers(0, 2**32 - 1))
def test_plain_length_inverts_sealed_length_or_refuses(size):
    try:
        plain = plain_length(size)
    except BadFrame:
        return
    assert sealed_length(plain) == size


@given(st.binary(max_size=80))
def test_parse_hello_returns_a_hello_or_a_typed_error(payload):
    try:
        hello = parse_hello(payload)
    except HandshakeError as exc:
        assert exc.reason == "handshake_malformed"
    else:
        assert hello.encode() == payload and len(payload) == HELLO_BYTES


OFFERS = st.sampled_from(
    [SUITE_PLAINTEXT, SUITE_SEALED, SUITE_AES256GCM, SUITE_SEALED | SUITE_AES256GCM]
)


@given(OFFERS, st.binary(min_size=32, max_size=32))
def test_parse_hello_accepts_every_well_formed_hello(suites, key):
    hello = Hello(PROTOCOL_VERSION, suites, key)
    assert parse_hello(hello.encode()) == hello


@given(st.binary(max_size=200))
def test_parse_auth_returns_an_auth_or_a_typed_error(payload):
    try:
        auth = parse_auth(payload)
    except HandshakeError as exc:
        assert exc.reason == "handshake_malformed"
    else:
        assert isinstance(auth, Auth) and auth.encode() == payload


WELL_FORMED_HELLOS = st.builds(
    lambda suites, key: Hello(PROTOCOL_VERSION, suites, key).encode(),
    OFFERS,
    st.one_of(st.binary(min_size=32, max_size=32), st.sampled_from([bytes(32), b"\1" + bytes(31)])),
)


@given(st.one_of(st.binary(max_size=HELLO_BYTES + 8), WELL_FORMED_HELLOS))
@settings(max_examples=200)
def test_receive_hello_on_any_bytes_is_an_auth_record_or_a_typed_error(payload):
    try:
        record = Handshake(A, allow_all).receive_hello(payload)
    except HandshakeError:
        return
    assert len(record) == LENGTH_BYTES + AUTH_BYTES + TAG_BYTES


@given(st.binary(max_size=300))
@settings(max_examples=200)
def test_receive_auth_on_any_bytes_raises_a_typed_error(payload):
    a, b = Handshake(A, allow_all), Handshake(B, allow_all)
    a.receive_hello(body(b.hello_record))
    with pytest.raises(HandshakeError):
        a.receive_auth(payload)


@given(st.binary(max_size=2 * CHUNK_BYTES + 64))
@settings(max_examples=100, deadline=None)
def test_open_body_on_any_bytes_is_a_typed_error(payload):
    _, sb = pair()
    with pytest.raises(DecryptFailed):
        sb.open_body(bytearray(payload))


# --- the AES-256-GCM suite -------------------------------------------------------------

SEALING_SUITES = [SUITE_SEALED, SUITE_AES256GCM]


def test_aes_gcm_chunks_are_plain_aead_with_the_counter_and_length_nonce():
    """The zero-copy GCM sealer agrees with PyNaCl's public AEAD, chunk by chunk."""
    assert aes256gcm_available()  # the development and CI machines have AES-NI
    key = bytes(range(32))
    frame = os.urandom(2 * CHUNK_BYTES + 100)
    sealer = AesGcmSession(key, bytes(32))
    sealer.seal_record(b"one record first")  # uses counter 0
    record = sealer.seal_record(frame)
    size = sealed_length(len(frame))
    expected = b"".join(
        bindings.crypto_aead_aes256gcm_encrypt(
            frame[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES],
            None,
            (1 + i).to_bytes(8, "big") + size.to_bytes(4, "big"),
            key,
        )
        for i in range(3)
    )
    assert bytes(record) == encode_length(size) + expected


@pytest.mark.parametrize("suite", SEALING_SUITES)
@pytest.mark.parametrize("size", [1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 1 << 20])
def test_every_sealing_suite_round_trips_and_refuses_replays(suite, size):
    sa, sb = pair(suite)
    assert type(sa).suite == suite
    frame = os.urandom(size)
    record = body(sa.seal_record(frame))
    assert len(record) == sealed_length(size)
    assert sb.open_body(bytearray(record)) == frame
    with pytest.raises(DecryptFailed):
        sb.open_body(bytearray(record))


@pytest.mark.parametrize("suite", SEALING_SUITES)
def test_every_sealing_suite_refuses_reordering_resplitting_and_flips(suite):
    sa, sb = pair(suite)
    first, second = body(sa.seal_record(b"first")), body(sa.seal_record(b"second"))
    with pytest.raises(DecryptFailed):
        sb.open_body(bytearray(second))
    assert sb.open_body(bytearray(first)) == b"first"
    big = body(sa.seal_record(os.urandom(CHUNK_BYTES + 10)))
    with pytest.raises(DecryptFailed):
        sb.open_body(bytearray(big[: CHUNK_BYTES + TAG_BYTES]))
    for bit in range(0, 8 * len(second), 37):
        flipped = bytearray(second)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(DecryptFailed):
            sb.open_body(flipped)
    assert sb.open_body(bytearray(second)) == b"second"


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (SUITE_SEALED, SUITE_AES256GCM),
        (SUITE_PLAINTEXT, SUITE_SEALED | SUITE_AES256GCM),
        (SUITE_SEALED, SUITE_PLAINTEXT),
    ],
)
def test_offers_with_no_suite_in_common_do_not_connect(ours, theirs):
    """Plaintext too takes both sides asking for it, and nothing else."""
    with pytest.raises(HandshakeError) as caught:
        run(Handshake(A, allow_all, suites=ours), Handshake(B, allow_all, suites=theirs))
    assert caught.value.reason == "no_common_suite"


@pytest.mark.parametrize(
    ("ours", "theirs", "chosen"),
    [
        (SUITE_SEALED | SUITE_AES256GCM, SUITE_SEALED | SUITE_AES256GCM, SUITE_AES256GCM),
        (SUITE_SEALED | SUITE_AES256GCM, SUITE_SEALED, SUITE_SEALED),  # one side lacks AES-NI
        (SUITE_SEALED, SUITE_SEALED, SUITE_SEALED),
        (SUITE_AES256GCM, SUITE_SEALED | SUITE_AES256GCM, SUITE_AES256GCM),
        (SUITE_PLAINTEXT, SUITE_PLAINTEXT, SUITE_PLAINTEXT),
    ],
)
def test_both_ends_choose_the_same_suite_from_their_offers(ours, theirs, chosen):
    assert choose_suite(ours, theirs) == choose_suite(theirs, ours) == chosen
    ra, rb = run(Handshake(A, allow_all, suites=ours), Handshake(B, allow_all, suites=theirs))
    assert type(ra.session).suite == type(rb.session).suite == chosen
    frame = os.urandom(1000)
    record = ra.session.seal_record(frame)
    assert rb.session.open_body(bytearray(record[LENGTH_BYTES:])) == frame


def test_the_default_offer_prefers_aes_gcm_where_the_cpu_has_it():
    assert aes256gcm_available()  # the development and CI machines have AES-NI
    assert default_suites() == SUITE_SEALED | SUITE_AES256GCM
    ra, _ = run(Handshake(A, allow_all), Handshake(B, allow_all))
    assert isinstance(ra.session, AesGcmSession)


@pytest.mark.parametrize("both", [False, True])
def test_an_offer_stripped_in_transit_fails_the_proof(both):
    """A man in the middle who rewrites hellos to drop AES-256-GCM (to force
    the slower suite) changes the transcript the sides derive keys from
    and sign: even with both rewritten, so both pick XSalsa20, nothing
    authenticates."""

    def stripped(record: bytes) -> bytes:
        hello = bytearray(body(record))
        hello[len(b"FCT") + 1] = SUITE_SEALED
        return bytes(hello)

    a, b = Handshake(A, allow_all), Handshake(B, allow_all)
    auth_a = a.receive_hello(stripped(b.hello_record))
    auth_b = b.receive_hello(stripped(a.hello_record) if both else body(a.hello_record))
    assert type(a._auth_sealer).suite == SUITE_SEALED
    assert type(b._auth_sealer).suite == (SUITE_SEALED if both else SUITE_AES256GCM)
    for side, auth in ((a, auth_b), (b, auth_a)):
        with pytest.raises(HandshakeError) as caught:
            side.receive_auth(body(auth))
        assert caught.value.reason in {"auth_failed", "bad_proof"}
