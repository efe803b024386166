"""The TCP transport's secure handshake and record sealing, without sockets.

Everything a peer sends before and after the handshake goes through the
functions here, and none of them touches a socket: :mod:`fedchain.p2p.tcp`
only moves bytes in and out. That keeps the security-relevant code pure, so
the unit and property tests drive it byte by byte, and a hostile test
client can speak the real protocol with a few lines of glue.

Design, after CometBFT's SecretConnection (the spec is ``p2p/SPEC.md``):

* **Symmetric handshake.** Both sides send a *hello* at once (protocol
  version, the cipher suites it offers, ephemeral X25519 key), so there are
  no roles and no extra round trip. The side whose ephemeral key sorts
  lower is "lo".
* **Suites negotiated, as TLS does.** Every side offers XSalsa20-Poly1305;
  one whose CPU has AES-NI and CLMUL also offers AES-256-GCM, and two sides
  that both offer it use it (about three times XSalsa20's speed there;
  elsewhere AES is slow or not constant-time, so it is never offered). Both
  hellos are in the signed transcript, so no one in the middle can strip an
  offer to force the slower suite.
* **Keys from the X25519 secret.** BLAKE2b, keyed by the shared secret,
  derives one key per direction and an authentication challenge, all bound
  to the transcript hash of both hellos. Distinct keys per direction mean
  the two counter nonces can never collide on one key.
* **Identities sent sealed.** Each side then sends, sealed under its new
  send key, its long-term Ed25519 key and a signature over a domain tag, its
  role, the transcript hash and the challenge. An eavesdropper learns no
  identity; a man in the middle has two different transcripts and cannot
  forward a signature; a reflected hello (equal ephemeral keys) and a
  reflected signature (the role byte) are refused.
* **Records.** A record is a 4-byte big-endian length and a body. A sealed
  body is the frame cut into 64 KiB chunks, each sealed with
  XSalsa20-Poly1305 (``crypto_secretbox``) or AES-256-GCM. Chunking bounds
  what one libsodium call reads and writes; ``fedchain bench transport``
  times the chunked sealing and opening of 1 MiB alone
  (``*_seal_alone_ms_per_MiB``). The nonce (24 bytes, 12 for GCM) is never
  sent: it is a per-direction counter plus the record's length, so a replayed,
  reordered, dropped, re-split or truncated record fails authentication,
  and the length prefix itself is authenticated without any extra bytes.
* **Zero-copy crypto.** PyNaCl's Python wrappers accept only ``bytes`` and
  return fresh copies, a chunk at a time. So the records are sealed and
  opened by the same libsodium functions through PyNaCl's own cffi handle,
  straight from and into the socket buffers (in place when opening, which
  libsodium supports). The tests check the result against PyNaCl's public
  ``crypto_secretbox_easy``.

The plaintext suite (``SUITE_PLAINTEXT``) exists only so the benchmark can
measure the same code path without encryption. It still authenticates both
identities, it is part of the signed transcript (so it cannot be forced by a
third party), and a transport accepts it only when configured to.

Every parser here raises a typed :class:`~fedchain.p2p.errors.P2PError`
subclass on hostile input, and nothing else.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

from nacl import bindings
from nacl._sodium import ffi, lib

from .errors import BadFrame, DecryptFailed, FrameTooLarge, HandshakeError
from .identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, PeerId, verify

__all__ = [
    "AUTH_BYTES",
    "CHUNK_BYTES",
    "HELLO_BYTES",
    "LENGTH_BYTES",
    "PROTOCOL_VERSION",
    "SUITE_AES256GCM",
    "SUITE_NAMES",
    "SUITE_PLAINTEXT",
    "SUITE_SEALED",
    "TAG_BYTES",
    "AesGcmSession",
    "Auth",
    "Handshake",
    "HandshakeResult",
    "Hello",
    "PlainSession",
    "SealedSession",
    "Session",
    "aes256gcm_available",
    "auth_message",
    "check_suites",
    "choose_suite",
    "default_suites",
    "encode_length",
    "max_body_bytes",
    "parse_auth",
    "parse_hello",
    "parse_length",
    "plain_length",
    "sealed_length",
]

PROTOCOL_VERSION = 2
"""2: the hello carries the suites offered (a bit set), not one suite."""
MAGIC = b"FCT"
SUITE_PLAINTEXT = 0
"""No sealing, offered alone and only by the benchmark's baseline."""
SUITE_SEALED = 1
"""XSalsa20-Poly1305 records: offered by everyone, constant-time everywhere."""
SUITE_AES256GCM = 2
"""AES-256-GCM records: offered only where the CPU has AES-NI and CLMUL."""
_OFFERS = frozenset(
    {SUITE_PLAINTEXT, SUITE_SEALED, SUITE_AES256GCM, SUITE_SEALED | SUITE_AES256GCM}
)
SUITE_NAMES = MappingProxyType(
    {
        SUITE_PLAINTEXT: "plaintext",
        SUITE_SEALED: "xsalsa20-poly1305",
        SUITE_AES256GCM: "aes-256-gcm",
    }
)
"""What operators and status lines call each suite (read-only)."""

LENGTH_BYTES = 4
MAX_LENGTH = 2**32 - 1
X25519_BYTES = 32
HELLO_BYTES = len(MAGIC) + 1 + 1 + X25519_BYTES
AUTH_BYTES = PUBLIC_KEY_BYTES + SIGNATURE_BYTES
CHUNK_BYTES = 64 * 1024
"""Plaintext bytes per sealed chunk: a protocol constant, not a setting."""
TAG_BYTES = 16
NONCE_BYTES = 24
KEY_BYTES = 32

_PERSON = b"fedchain-tcp-v1"
_AUTH_DOMAIN = b"fedchain/tcp-auth/v1\x00"
_ROLE_LO = b"L"
_ROLE_HI = b"H"
_SEALED_CHUNK = CHUNK_BYTES + TAG_BYTES


# --- length prefix -------------------------------------------------------------------


def encode_length(length: int) -> bytes:
    """The 4-byte big-endian prefix of a record body of ``length`` bytes."""
    return length.to_bytes(LENGTH_BYTES, "big")


def parse_length(header: bytes | bytearray | memoryview, max_body: int) -> int:
    """The body length a 4-byte prefix announces.

    Raises :class:`BadFrame` if ``header`` is not exactly 4 bytes and
    :class:`FrameTooLarge` if the length exceeds ``max_body``, so an
    oversize record is refused before a byte of its body is read.
    """
    if len(header) != LENGTH_BYTES:
        raise BadFrame(f"a length prefix is {LENGTH_BYTES} bytes, not {len(header)}")
    length = int.from_bytes(header, "big")
    if length > max_body:
        raise FrameTooLarge(f"record of {length} bytes exceeds {max_body}")
    return length


def sealed_length(plain: int) -> int:
    """Body bytes of a sealed record carrying a ``plain``-byte frame."""
    chunks = max(1, -(-plain // CHUNK_BYTES))
    return plain + chunks * TAG_BYTES


def plain_length(body: int) -> int:
    """The frame length a sealed body of ``body`` bytes carries.

    Raises :class:`BadFrame` for a length no honest sealer produces: empty,
    a last chunk shorter than a tag, or an empty last chunk after full ones.
    """
    full, rest = divmod(body, _SEALED_CHUNK)
    if rest == 0 and full > 0:
        return full * CHUNK_BYTES
    if rest < TAG_BYTES or (rest == TAG_BYTES and full > 0):
        raise BadFrame(f"{body} bytes is not the length of a sealed record")
    return full * CHUNK_BYTES + rest - TAG_BYTES


def max_body_bytes(max_frame_bytes: int, suite: int) -> int:
    """The largest record body to accept for frames up to ``max_frame_bytes``."""
    if suite == SUITE_PLAINTEXT:
        return max_frame_bytes
    return sealed_length(max_frame_bytes)


# --- sessions ------------------------------------------------------------------------


_NONCE = struct.Struct(">QI12x")
"""counter (8 bytes) || body length (4 bytes) || 12 zero bytes."""
_PREFIX = struct.Struct(">I")


def _nonce(counter: int, body_length: int) -> bytes:
    return _NONCE.pack(counter, body_length)


class SealedSession:
    """Seals outbound and opens inbound records for one connection.

    Each direction has its own key and counter; the counter is the nonce's
    first 8 bytes and advances once per chunk, so a nonce never repeats
    under a key. A session is single-writer and single-reader: the
    transport's writer task alone seals and its reader task alone opens.
    """

    suite = SUITE_SEALED
    _NONCE = _NONCE

    __slots__ = ("_recv_counter", "_recv_key", "_send_counter", "_send_key")

    @staticmethod
    def _seal(dst: object, src: object, size: int, nonce: bytes, key: bytes) -> None:
        """Seal ``size`` bytes at ``src`` into ``size + TAG_BYTES`` at ``dst``."""
        _check(lib.crypto_secretbox_easy(dst, src, size, nonce, key))

    @staticmethod
    def _open(buf: object, size: int, nonce: bytes, key: bytes) -> bool:
        """Open a sealed chunk in place: its plaintext starts at ``buf``."""
        return lib.crypto_secretbox_open_easy(buf, buf, size, nonce, key) == 0

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        if len(send_key) != KEY_BYTES or len(recv_key) != KEY_BYTES:
            raise ValueError("session keys are 32 bytes")
        self._send_key = send_key
        self._recv_key = recv_key
        self._send_counter = 0
        self._recv_counter = 0

    def max_body(self, max_frame_bytes: int) -> int:
        return sealed_length(max_frame_bytes)

    def check_body_length(self, length: int) -> None:
        """Raise :class:`BadFrame` before reading a body no sealer makes."""
        plain_length(length)

    def seal_record(self, frame: bytes | bytearray | memoryview) -> bytearray:
        """Length prefix and sealed body of ``frame``, ready to send."""
        plain = len(frame)
        body = sealed_length(plain)
        out = bytearray(LENGTH_BYTES + body)
        _PREFIX.pack_into(out, 0, body)
        dst = ffi.from_buffer(out) + LENGTH_BYTES
        src = frame if type(frame) is bytes else ffi.from_buffer(frame)
        counter = self._send_counter
        key = self._send_key
        seal = self._seal
        if plain <= CHUNK_BYTES:  # the common case: one chunk, no loop
            seal(dst, src, plain, self._NONCE.pack(counter, body), key)
            self._send_counter = counter + 1
            return out
        src = ffi.from_buffer(frame)
        for start in range(0, plain, CHUNK_BYTES):
            size = min(CHUNK_BYTES, plain - start)
            seal(dst, src + start, size, self._NONCE.pack(counter, body), key)
            counter += 1
            dst += size + TAG_BYTES
        self._send_counter = counter
        return out

    def open_body(self, body: bytearray | memoryview) -> bytes:
        """The frame a sealed record body carries; raises :class:`DecryptFailed`.

        ``body`` must be writable: chunks are opened in place (libsodium
        writes each plaintext over its own tag and ciphertext). A record
        that fails leaves the counter where it was.
        """
        length = len(body)
        if not TAG_BYTES <= length <= _SEALED_CHUNK:
            return self._open_chunks(body, length)
        buf = ffi.from_buffer(body, require_writable=True)
        counter = self._recv_counter
        nonce = self._NONCE.pack(counter, length)
        if not self._open(buf, length, nonce, self._recv_key):
            raise DecryptFailed("a sealed record failed authentication")
        self._recv_counter = counter + 1
        return bytes(memoryview(body)[: length - TAG_BYTES])

    def _open_chunks(self, body: bytearray | memoryview, length: int) -> bytes:
        try:
            plain_length(length)
        except BadFrame as exc:
            raise DecryptFailed(str(exc)) from exc
        buf = ffi.from_buffer(body, require_writable=True)
        view = memoryview(body)
        counter = self._recv_counter
        pieces = []
        for o in range(0, length, _SEALED_CHUNK):
            size = min(_SEALED_CHUNK, length - o)
            nonce = self._NONCE.pack(counter, length)
            if not self._open(buf + o, size, nonce, self._recv_key):
                raise DecryptFailed("a sealed chunk failed authentication")
            counter += 1
            pieces.append(view[o : o + size - TAG_BYTES])
        self._recv_counter = counter
        return b"".join(pieces)


def _check(rc: int) -> None:
    if rc != 0:  # pragma: no cover - libsodium never fails to seal
        raise RuntimeError("libsodium failed to seal")


def aes256gcm_available() -> bool:
    """Whether this CPU runs libsodium's AES-256-GCM (AES-NI and CLMUL)."""
    return bool(lib.crypto_aead_aes256gcm_is_available())


class AesGcmSession(SealedSession):
    """The same records with AES-256-GCM instead of XSalsa20-Poly1305.

    Why offer it: on CPUs with AES-NI it seals about three times faster
    (0.3 against 0.85 ms/MiB here), which is what keeps encrypted throughput
    near the plain socket's when two processes share two cores. Why only
    there: without AES-NI it is slow or not constant-time, so a side
    without it offers XSalsa20-Poly1305 alone (:func:`default_suites`).
    Records, chunking, counters and the bound length are identical; only
    the per-chunk primitive and its 12-byte nonce (counter || record
    length) differ. GCM writes ciphertext then tag, secretbox tag then
    ciphertext, but both open in place to a plaintext at the chunk's start,
    so the framing code is shared.
    """

    suite = SUITE_AES256GCM
    _NONCE = struct.Struct(">QI")

    __slots__ = ()

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        if not aes256gcm_available():
            raise ValueError("AES-256-GCM needs a CPU with AES-NI and CLMUL")
        super().__init__(send_key, recv_key)

    @staticmethod
    def _seal(dst: object, src: object, size: int, nonce: bytes, key: bytes) -> None:
        _check(
            lib.crypto_aead_aes256gcm_encrypt(
                dst, ffi.NULL, src, size, ffi.NULL, 0, ffi.NULL, nonce, key
            )
        )

    @staticmethod
    def _open(buf: object, size: int, nonce: bytes, key: bytes) -> bool:
        return (
            lib.crypto_aead_aes256gcm_decrypt(
                buf, ffi.NULL, ffi.NULL, buf, size, ffi.NULL, 0, nonce, key
            )
            == 0
        )


class PlainSession:
    """The benchmark-only twin of :class:`SealedSession`: same records, no
    sealing. A transport uses it only when built with the plaintext suite."""

    suite = SUITE_PLAINTEXT

    __slots__ = ()

    def max_body(self, max_frame_bytes: int) -> int:
        return max_frame_bytes

    def check_body_length(self, length: int) -> None:
        pass

    def seal_record(self, frame: bytes | bytearray | memoryview) -> bytearray:
        out = bytearray(encode_length(len(frame)))
        out += frame
        return out

    def open_body(self, body: bytearray | memoryview) -> bytes:
        return bytes(body)


Session = SealedSession | AesGcmSession | PlainSession


# --- handshake messages --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """The first, plaintext handshake message of each side."""

    version: int
    suites: int
    """The suites offered: SUITE_SEALED | SUITE_AES256GCM bits, or SUITE_PLAINTEXT."""
    ephemeral: bytes

    def encode(self) -> bytes:
        return MAGIC + bytes((self.version, self.suites)) + self.ephemeral


def parse_hello(payload: bytes | bytearray | memoryview) -> Hello:
    """Decode a hello body; raises :class:`HandshakeError` (``handshake_malformed``)
    for anything but exactly :data:`HELLO_BYTES` with the magic, a known
    version and a known set of suites."""
    payload = bytes(payload)
    if len(payload) != HELLO_BYTES:
        raise HandshakeError(f"a hello is {HELLO_BYTES} bytes", "handshake_malformed")
    if payload[: len(MAGIC)] != MAGIC:
        raise HandshakeError("not a fedchain hello", "handshake_malformed")
    version, suites = payload[len(MAGIC)], payload[len(MAGIC) + 1]
    if version != PROTOCOL_VERSION:
        raise HandshakeError(f"handshake version {version}", "handshake_malformed")
    if suites not in _OFFERS:
        raise HandshakeError(f"unknown cipher suites {suites:#04x}", "handshake_malformed")
    return Hello(version, suites, payload[len(MAGIC) + 2 :])


def check_suites(suites: int) -> None:
    """Raise ValueError unless ``suites`` is an offer this machine can keep."""
    if suites not in _OFFERS:
        raise ValueError(f"unknown cipher suites {suites!r}")
    if suites & SUITE_AES256GCM and not aes256gcm_available():
        raise ValueError("AES-256-GCM needs a CPU with AES-NI and CLMUL")


def default_suites() -> int:
    """What a side offers unless told otherwise: XSalsa20-Poly1305, and
    AES-256-GCM too where this CPU runs it in hardware."""
    return SUITE_SEALED | (SUITE_AES256GCM if aes256gcm_available() else 0)


def choose_suite(ours: int, theirs: int) -> int:
    """The suite two offers agree on: AES-256-GCM if both offer it, else
    XSalsa20-Poly1305; plaintext only if both offer exactly that (the
    benchmark's baseline). Raises :class:`HandshakeError`
    (``no_common_suite``) when none is common, or one side wants plaintext
    and the other does not: two operators who pinned different suites see
    that reason, not a malformed handshake."""
    if ours == SUITE_PLAINTEXT or theirs == SUITE_PLAINTEXT:
        if ours == theirs:
            return SUITE_PLAINTEXT
        raise HandshakeError("one side offers only plaintext", "no_common_suite")
    common = ours & theirs
    for suite in (SUITE_AES256GCM, SUITE_SEALED):
        if common & suite:
            return suite
    raise HandshakeError("no cipher suite in common", "no_common_suite")


@dataclass(frozen=True, slots=True)
class Auth:
    """The second handshake message, sent sealed: who I am, and my proof."""

    public_key: PeerId
    signature: bytes

    def encode(self) -> bytes:
        return self.public_key + self.signature


def parse_auth(payload: bytes | bytearray | memoryview) -> Auth:
    """Decode an opened auth body; raises :class:`HandshakeError`
    (``handshake_malformed``) unless it is exactly :data:`AUTH_BYTES`."""
    payload = bytes(payload)
    if len(payload) != AUTH_BYTES:
        raise HandshakeError(f"an auth message is {AUTH_BYTES} bytes", "handshake_malformed")
    return Auth(payload[:PUBLIC_KEY_BYTES], payload[PUBLIC_KEY_BYTES:])


# --- the handshake state machine -----------------------------------------------------


def _kdf(shared: bytes, label: bytes, transcript: bytes) -> bytes:
    h = hashlib.blake2b(label + transcript, key=shared, person=_PERSON, digest_size=32)
    return h.digest()


def auth_message(role: bytes, transcript: bytes, challenge: bytes) -> bytes:
    """The exact bytes a side signs: domain tag, its role, both hashes."""
    return _AUTH_DOMAIN + role + transcript + challenge


@dataclass(frozen=True, slots=True)
class HandshakeResult:
    """An authenticated peer and the session for the rest of the connection."""

    peer: PeerId
    session: Session


class Handshake:
    """One side of one handshake, as a sans-IO state machine.

    Use: send :attr:`hello_record`; feed the peer's hello body to
    :meth:`receive_hello` and send the record it returns; feed the peer's
    auth body to :meth:`receive_auth`, which returns the authenticated peer
    and its session. Every method raises :class:`HandshakeError` (with a
    ``reason``) on anything a peer can get wrong, and nothing else.

    ``allowed`` decides, after the proof verifies, whether the proven key
    may connect (``not_allowed`` otherwise). ``suites`` is what this side
    offers (:func:`default_suites` unless given); :func:`choose_suite`
    picks from both offers, which are in the signed transcript, so no one in
    the middle can downgrade the choice.
    """

    def __init__(
        self,
        identity: Identity,
        allowed: Callable[[PeerId], bool],
        *,
        suites: int | None = None,
        ephemeral_secret: bytes | None = None,
    ) -> None:
        suites = default_suites() if suites is None else suites
        check_suites(suites)
        self._identity = identity
        self._allowed = allowed
        self._secret = ephemeral_secret if ephemeral_secret is not None else os.urandom(32)
        self._ephemeral = bindings.crypto_scalarmult_base(self._secret)
        self._hello = Hello(PROTOCOL_VERSION, suites, self._ephemeral)
        self._session: Session | None = None
        self._auth_sealer: SealedSession | None = None
        self._expected_proof: bytes | None = None

    @property
    def hello_record(self) -> bytes:
        payload = self._hello.encode()
        return encode_length(len(payload)) + payload

    def receive_hello(self, payload: bytes | bytearray | memoryview) -> bytes:
        """Process the peer's hello; returns the auth record to send."""
        if self._session is not None:
            raise HandshakeError("a second hello", "handshake_malformed")
        theirs = parse_hello(payload)
        suite = choose_suite(self._hello.suites, theirs.suites)
        if theirs.ephemeral == self._ephemeral:
            raise HandshakeError("reflected hello", "handshake_malformed")
        shared = self._shared_secret(theirs.ephemeral)
        lo_first = self._ephemeral < theirs.ephemeral
        ours_b, theirs_b = self._hello.encode(), theirs.encode()
        pair = ours_b + theirs_b if lo_first else theirs_b + ours_b
        transcript = hashlib.blake2b(pair, person=_PERSON, digest_size=32).digest()
        key_lo = _kdf(shared, b"key lo->hi", transcript)
        key_hi = _kdf(shared, b"key hi->lo", transcript)
        challenge = _kdf(shared, b"challenge", transcript)
        my_role, their_role = (_ROLE_LO, _ROLE_HI) if lo_first else (_ROLE_HI, _ROLE_LO)
        send_key, recv_key = (key_lo, key_hi) if lo_first else (key_hi, key_lo)
        if suite == SUITE_SEALED:
            self._session = SealedSession(send_key, recv_key)
            self._auth_sealer = self._session
        elif suite == SUITE_AES256GCM:
            self._session = AesGcmSession(send_key, recv_key)
            self._auth_sealer = self._session
        else:
            # The auth message is sealed even in the plaintext suite, so the
            # identity exchange is the same code either way.
            self._session = PlainSession()
            self._auth_sealer = SealedSession(send_key, recv_key)
        self._expected_proof = auth_message(their_role, transcript, challenge)
        signature = self._identity.sign(auth_message(my_role, transcript, challenge))
        return bytes(self._auth_sealer.seal_record(self._identity.public_key + signature))

    def receive_auth(self, body: bytes | bytearray | memoryview) -> HandshakeResult:
        """Open and check the peer's auth record body; returns who it is."""
        if self._auth_sealer is None or self._expected_proof is None:
            raise HandshakeError("auth before hello", "handshake_malformed")
        try:
            opened = self._auth_sealer.open_body(bytearray(body))
        except DecryptFailed as exc:
            raise HandshakeError("auth message failed to open", "auth_failed") from exc
        auth = parse_auth(opened)
        if not verify(auth.public_key, self._expected_proof, auth.signature):
            raise HandshakeError("the peer's proof does not verify", "bad_proof")
        if auth.public_key == self._identity.public_key:
            raise HandshakeError("connected to myself", "self_connection")
        if not self._allowed(auth.public_key):
            raise HandshakeError("key not in the allow-list", "not_allowed")
        session, self._auth_sealer, self._expected_proof = self._session, None, None
        assert session is not None
        return HandshakeResult(auth.public_key, session)

    def _shared_secret(self, theirs: bytes) -> bytes:
        out = ffi.new("unsigned char[]", X25519_BYTES)
        if lib.crypto_scalarmult(out, self._secret, theirs) != 0:
            # libsodium refuses low-order points (an all-zero secret).
            raise HandshakeError("weak ephemeral key", "handshake_malformed")
        return bytes(ffi.buffer(out, X25519_BYTES))
