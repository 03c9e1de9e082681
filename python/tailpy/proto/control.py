"""Sans-IO sealing of control messages (tailpy's own format, see DESIGN.md "Wire formats").

Every control request and response is a NaCl box (Curve25519 + XSalsa20-Poly1305, PyNaCl's ``Box``) between
the node's machine private key and the server's machine public key, so messages are authenticated and
confidential even over plain HTTP.

Request (HTTP body, UTF-8 JSON)::

    {"machine_key": "mkey:<64 hex>", "box": "<base64 of 24-byte nonce + ciphertext>"}

The boxed plaintext is a JSON object carrying the request fields plus

* ``ts``: the sender's clock, unix seconds (float);
* ``nonce_id``: 32 random hex characters, unique per request;
* ``path``: the HTTP path the request is meant for ("/machine/register"), so a request sealed for one
  endpoint cannot be replayed against another.

The server refuses a body whose ``ts`` is more than :data:`REPLAY_WINDOW` seconds from its clock, or whose
``nonce_id`` it has already seen from that machine key within the window (:class:`ReplayGuard`).

Response: a unary response is ``{"box": "<base64>"}`` (or ``{"error": "..."}`` in plain JSON when the
request could not be authenticated). A streamed response (a map stream) is a sequence of sealed messages in
one of two framings, chosen per stream (:class:`StreamSealer`, :class:`StreamOpener`, :class:`FrameReader`):

* lines (``Content-Type: application/x-ndjson``, the default): one base64 box (24-byte nonce + ciphertext)
  per line, ``\\n`` terminated, at most :data:`MAX_STREAM_LINE` bytes;
* frames (``Content-Type: application/x-tailpy-frames``, :data:`FRAMES_CONTENT_TYPE`, when the map request's
  ``accept`` names ``"frames"`` and the server grants it): each message is a 4-byte big-endian unsigned
  length N followed by N raw bytes, the 24-byte nonce + ciphertext, N at most :data:`MAX_STREAM_FRAME`. No
  base64 on either side (a first netmap is about a megabyte sealed). Keepalives are frames too.
Each boxed response body carries ``reply_to`` (the request's ``nonce_id``) so that a client never accepts a
response recorded from another exchange; stream messages also carry ``seq`` (0, 1, 2, ... per stream).

Nothing here does I/O or reads the clock: callers pass ``now``.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.utils

from tailpy.errors import ControlError, InvalidKeyError, ParseError
from tailpy.keys import MachinePrivate, MachinePublic, NodePrivate, NodePublic
from tailpy.proto import mapcodec

REPLAY_WINDOW = 120.0
"""Seconds a request's ``ts`` may differ from the receiver's clock; also how long nonce_ids are kept."""

MAX_MESSAGE = 1 << 20
"""Largest sealed message accepted, bytes (1 MiB)."""


class UnauthenticatedError(ParseError):
    """A box did not open: it was not sealed by the private key matching the claimed machine key, or it was
    sealed for another server key, or it was altered in transit. The server answers HTTP 401."""


class ReplayError(ControlError):
    """A request is stale (``ts`` outside the window) or its ``nonce_id`` was already seen (a replay)."""


def public_of(private: MachinePrivate) -> MachinePublic:
    """The machine public key of ``private`` (X25519 base-point multiplication, via PyNaCl)."""
    return MachinePublic(bytes(nacl.public.PrivateKey(private.raw).public_key))


def _box(private: MachinePrivate, peer: MachinePublic) -> nacl.public.Box:
    return nacl.public.Box(nacl.public.PrivateKey(private.raw), nacl.public.PublicKey(peer.raw))


def _seal(private: MachinePrivate, peer: MachinePublic, body: Mapping[str, Any]) -> str:
    plaintext = json.dumps(body, separators=(",", ":")).encode()
    return base64.b64encode(bytes(_box(private, peer).encrypt(plaintext))).decode()


def _unbox(box: nacl.public.Box, sealed: str | bytes, limit: int, what: str, peer: MachinePublic) -> bytes:
    """The plaintext of base64 ``sealed`` (24-byte nonce + NaCl box) at most ``limit`` characters long.
    Raises ParseError (too long, not base64) or UnauthenticatedError (too short, does not open)."""
    if len(sealed) > limit:
        raise ParseError(f"{what} is larger than {limit} bytes")
    try:
        raw = base64.b64decode(sealed, validate=True)
    except (binascii.Error, ValueError):
        raise ParseError(f"{what} is not valid base64") from None
    return _decrypt(box, raw, what, peer)


def _decrypt(box: nacl.public.Box, raw: bytes, what: str, peer: MachinePublic) -> bytes:
    """The plaintext of ``raw`` (24-byte nonce + NaCl box). Raises UnauthenticatedError (too short, does not
    open)."""
    if len(raw) < nacl.public.Box.NONCE_SIZE + 16:
        raise UnauthenticatedError(f"{what} is too short to be a NaCl box")
    try:
        return bytes(box.decrypt(raw))
    except nacl.exceptions.CryptoError:
        raise UnauthenticatedError(
            f"{what} does not open with machine key {peer.text()}: it was sealed with another key or altered"
        ) from None


def _open(private: MachinePrivate, peer: MachinePublic, sealed: object) -> dict[str, Any]:
    if not isinstance(sealed, str):
        raise ParseError("control message has no 'box' string")
    plaintext = _unbox(_box(private, peer), sealed, MAX_MESSAGE, "control message box", peer)
    return _json_object(plaintext, "sealed control message")


def _json_object(data: bytes | str, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise ParseError(f"{what} is not valid JSON") from None
    except RecursionError:  # "{"a": {"a": ...}}" a few thousand levels deep
        raise ParseError(f"{what} is nested too deeply") from None
    if not isinstance(obj, dict):
        raise ParseError(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def new_nonce_id() -> str:
    """32 random hex characters (128 bits)."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class SealedRequest:
    """A request ready to send: ``data`` is the HTTP body; ``nonce_id`` is what responses must echo."""

    data: bytes
    nonce_id: str


def seal_request(
    machine_key: MachinePrivate,
    server_key: MachinePublic,
    path: str,
    body: Mapping[str, Any],
    *,
    now: float,
    nonce_id: str | None = None,
) -> SealedRequest:
    """Seal ``body`` (a JSON-able mapping) for ``path``, stamped with ``now`` (unix seconds)."""
    nid = nonce_id if nonce_id is not None else new_nonce_id()
    full = {**body, "ts": now, "nonce_id": nid, "path": path}
    envelope = {"machine_key": public_of(machine_key).text(), "box": _seal(machine_key, server_key, full)}
    return SealedRequest(json.dumps(envelope, separators=(",", ":")).encode(), nid)


@dataclass(frozen=True)
class OpenedRequest:
    """An authenticated request: who sent it (``machine_key``) and its body (with ts/nonce_id/path)."""

    machine_key: MachinePublic
    body: dict[str, Any]

    @property
    def nonce_id(self) -> str:
        return str(self.body["nonce_id"])


def open_request(server_key: MachinePrivate, data: bytes, *, path: str) -> OpenedRequest:
    """Open a request envelope sent to ``path``.

    Raises ParseError for a malformed envelope or body, UnauthenticatedError when the box does not open with
    the claimed machine key. Freshness is checked separately by :class:`ReplayGuard`.
    """
    if len(data) > MAX_MESSAGE + 200:
        raise ParseError(f"control request is larger than {MAX_MESSAGE} bytes")
    envelope = _json_object(data, "control request")
    mk = envelope.get("machine_key")
    if not isinstance(mk, str):
        raise ParseError("control request has no 'machine_key' string")
    try:
        machine_key = MachinePublic.from_text(mk)
    except InvalidKeyError as e:
        raise ParseError(f"control request machine_key: {e}") from None
    body = _open(server_key, machine_key, envelope.get("box"))
    ts, nid, p = body.get("ts"), body.get("nonce_id"), body.get("path")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        raise ParseError("sealed control request has no numeric 'ts'")
    if not isinstance(nid, str) or not 16 <= len(nid) <= 64:
        raise ParseError("sealed control request has no 'nonce_id' string of 16-64 characters")
    if p != path:
        raise UnauthenticatedError(f"sealed control request was made for {p!r}, not {path!r}")
    return OpenedRequest(machine_key, body)


@dataclass
class ReplayGuard:
    """Refuses stale and replayed requests: remembers (machine key, nonce_id) for ``window`` seconds.

    Memory is bounded by the request rate times the window; entries are pruned on every check.
    """

    window: float = REPLAY_WINDOW
    _seen: dict[tuple[bytes, str], float] = field(default_factory=dict)

    def check(self, request: OpenedRequest, now: float) -> None:
        """Accept ``request`` once. Raises ReplayError with a sentence saying why it is refused."""
        ts = float(request.body["ts"])
        if abs(ts - now) > self.window:
            raise ReplayError(
                f"request timestamp is {ts - now:+.0f} s from the control server's clock (more than "
                f"{self.window:.0f} s): fix the clock on this machine or the server"
            )
        self._prune(now)
        key = (request.machine_key.raw, request.nonce_id)
        if key in self._seen:
            raise ReplayError("request was already received (nonce_id seen before): refusing a replay")
        self._seen[key] = now + self.window

    def _prune(self, now: float) -> None:
        # Entries are inserted in time order, so expired ones are at the front.
        while self._seen:
            k, expires = next(iter(self._seen.items()))
            if expires >= now:
                break
            del self._seen[k]


def seal_response(
    server_key: MachinePrivate,
    machine_key: MachinePublic,
    reply_to: str,
    body: Mapping[str, Any],
    *,
    seq: int | None = None,
) -> str:
    """Seal a response body for ``machine_key``; returns the base64 box (a unary response wraps it as
    ``{"box": ...}``, a stream writes it as one line)."""
    full: dict[str, Any] = {**body, "reply_to": reply_to}
    if seq is not None:
        full["seq"] = seq
    return _seal(server_key, machine_key, full)


def open_response(
    machine_key: MachinePrivate,
    server_key: MachinePublic,
    sealed: object,
    *,
    reply_to: str,
    seq: int | None = None,
) -> dict[str, Any]:
    """Open a response box; check it answers ``reply_to`` (and, for streams, is message number ``seq``).

    Raises ParseError / UnauthenticatedError.
    """
    body = _open(machine_key, server_key, sealed)
    if body.get("reply_to") != reply_to:
        raise UnauthenticatedError("control response answers another request (reply_to mismatch)")
    if seq is not None and body.get("seq") != seq:
        raise UnauthenticatedError(f"control stream message out of order: expected seq {seq}")
    return body


def unary_envelope(sealed: str) -> bytes:
    """The HTTP body of a unary sealed response."""
    return json.dumps({"box": sealed}).encode()


def parse_unary(data: bytes) -> dict[str, Any]:
    """Parse a unary response body: ``{"box": ...}`` or ``{"error": "..."}``. Raises ParseError."""
    return _json_object(data, "control response")


MAX_STREAM_LINE = 256 << 20
"""Largest map stream line accepted, bytes (256 MiB: a full netmap of 10,000 peers is about 6 MiB)."""

MAX_STREAM_FRAME = MAX_STREAM_LINE // 4 * 3
"""Largest map stream frame accepted (its length prefix), bytes: the sealed size a line of
:data:`MAX_STREAM_LINE` base64 characters holds (192 MiB)."""

FRAME_HEADER = 4
"""Bytes of a frame's length prefix (big-endian unsigned)."""

LINES_CONTENT_TYPE = "application/x-ndjson"
"""Content-Type of a map stream of base64 lines (the default)."""

FRAMES_CONTENT_TYPE = "application/x-tailpy-frames"
"""Content-Type of a map stream of length-prefixed binary frames (the client's ``accept`` names
``"frames"``)."""

MAX_STREAM_PLAINTEXT = 512 << 20
"""Largest map stream message accepted once inflated (a zstd-compressed one), bytes (512 MiB)."""

KEEPALIVE_HEADER = "Tailpy-Keepalive"
"""Response header of a map stream: seconds of silence after which the server writes a keepalive line. The
client counts the stream dead after :data:`SILENCE_KEEPALIVES` of them (at most its own silence limit)."""
SILENCE_KEEPALIVES = 3.0
"""Keepalive intervals of silence after which a client counts a map stream dead (see
:data:`KEEPALIVE_HEADER`; one second more for the way there)."""


class StreamSealer:
    """Seals the messages of one map stream for ``machine_key``, numbering them ``seq`` 0, 1, 2, ...

    The NaCl box (one Curve25519 agreement) is computed once per stream. :meth:`seal` takes a body already
    encoded as a compact JSON object (``b'{"type":...}'``, encoded once and shared by every stream that gets
    it) and appends ``,"reply_to":"<nonce_id>","seq":<n>}`` to it, so the plaintext is the same JSON object
    :func:`seal_response` would make. Returns one message as written on the stream: with ``framed`` False a
    line, base64 of (24-byte nonce + ciphertext) and ``\n``; with ``framed`` True a frame, the 4-byte
    big-endian length of (24-byte nonce + ciphertext) and those bytes (:data:`FRAMES_CONTENT_TYPE`).
    """

    def __init__(
        self, server_key: MachinePrivate, machine_key: MachinePublic, reply_to: str, *, framed: bool = False
    ) -> None:
        self._box = _box(server_key, machine_key)
        self._shared = self._box.shared_key()
        self._suffix = b',"reply_to":' + json.dumps(reply_to).encode() + b',"seq":'
        self.seq = 0
        self.framed = framed

    def seal(self, body_json: bytes, *, zstd: bool = False) -> bytes:
        """``zstd``: compress the plaintext into one zstd frame when it is at least
        :data:`tailpy.proto.mapcodec.MIN_COMPRESS` bytes (the stream's client accepts zstd)."""
        if not body_json.startswith(b"{") or not body_json.endswith(b"}") or body_json == b"{}":
            raise ValueError("stream message body must be a non-empty JSON object")
        plaintext = b"".join((body_json[:-1], self._suffix, str(self.seq).encode(), b"}"))
        if zstd and len(plaintext) >= mapcodec.MIN_COMPRESS:
            plaintext = mapcodec.compress(plaintext)
        self.seq += 1
        return self._line(plaintext)

    def seal_frames(self, frames: Sequence[bytes], tail_json: bytes) -> bytes:
        """Seal a message made of zstd ``frames`` (already compressed, possibly shared with other streams)
        followed by ``tail_json``, the rest of the JSON object (ending with ``}``), which is compressed here
        with ``reply_to`` and ``seq`` appended. For a client that accepts zstd only."""
        if not tail_json.endswith(b"}"):
            raise ValueError("the tail of a stream message must end its JSON object")
        tail = mapcodec.compress(b"".join((tail_json[:-1], self._suffix, str(self.seq).encode(), b"}")))
        self.seq += 1
        return self._line(b"".join((*frames, tail)))

    def _line(self, plaintext: bytes) -> bytes:
        if not self.framed:
            return binascii.b2a_base64(bytes(self._box.encrypt(plaintext)))
        # Straight from libsodium's output into the frame: one copy, no base64.
        nonce = nacl.utils.random(nacl.public.Box.NONCE_SIZE)
        ciphertext = nacl.bindings.crypto_box_easy_afternm(plaintext, nonce, self._shared)
        size = len(nonce) + len(ciphertext)
        return b"".join((size.to_bytes(FRAME_HEADER, "big"), nonce, ciphertext))


class StreamOpener:
    """Opens the messages of one map stream (the client's side of :class:`StreamSealer`).

    :meth:`open` (a line: base64) and :meth:`open_frame` (a frame's payload: 24-byte nonce + ciphertext,
    from :class:`FrameReader`) return the plaintext JSON object as bytes (not parsed: a full netmap of many
    peers is megabytes, and a caller may only need its ``type``), after checking that it answers
    ``reply_to`` and is message number ``seq`` (0, 1, 2, ... counted here). Raises ParseError /
    UnauthenticatedError.
    """

    def __init__(self, machine_key: MachinePrivate, server_key: MachinePublic, reply_to: str) -> None:
        self._box = _box(machine_key, server_key)
        self._server_key = server_key
        self._reply_to = reply_to
        self._suffix = b',"reply_to":' + json.dumps(reply_to).encode() + b',"seq":'
        self.seq = 0

    def open(self, line: bytes) -> bytes:
        plaintext = _unbox(self._box, line.strip(), MAX_STREAM_LINE, "map stream message", self._server_key)
        return self._check(plaintext)

    def open_frame(self, sealed: bytes) -> bytes:
        if len(sealed) > MAX_STREAM_FRAME:
            raise ParseError(f"map stream message is larger than {MAX_STREAM_FRAME} bytes")
        return self._check(_decrypt(self._box, sealed, "map stream message", self._server_key))

    def _check(self, plaintext: bytes) -> bytes:
        if mapcodec.is_compressed(plaintext):
            plaintext = mapcodec.decompress(plaintext, MAX_STREAM_PLAINTEXT)
        # Fast path: the server appends reply_to and seq last (StreamSealer); else parse and check.
        if not plaintext.endswith(self._suffix + str(self.seq).encode() + b"}"):
            body = _json_object(plaintext, "sealed map stream message")
            if body.get("reply_to") != self._reply_to:
                raise UnauthenticatedError("control response answers another request (reply_to mismatch)")
            if body.get("seq") != self.seq:
                raise UnauthenticatedError(f"control stream message out of order: expected seq {self.seq}")
        self.seq += 1
        return plaintext


class FrameReader:
    """Splits a map stream of frames (:data:`FRAMES_CONTENT_TYPE`) into their payloads, whatever the chunk
    boundaries (sans-IO: the caller feeds what it read).

    :meth:`feed` appends a chunk to one buffer and returns the payloads it completes (bytes: 24-byte nonce +
    ciphertext, for :meth:`StreamOpener.open_frame`); each payload is copied out once and the consumed prefix
    is dropped once per chunk, so a message arriving in many chunks costs no copy per chunk. Raises
    ParseError as soon as a length prefix exceeds ``limit`` bytes (before buffering that frame).
    :attr:`pending` is what a stream that ends now would leave unread (non-zero: truncated).
    """

    def __init__(self, limit: int = MAX_STREAM_FRAME) -> None:
        self.limit = limit
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes buffered towards a frame not yet complete."""
        return len(self._buf)

    def expected(self) -> int | None:
        """The full size (prefix included) of the frame being buffered, None while its prefix is
        incomplete or nothing is buffered."""
        if len(self._buf) < FRAME_HEADER:
            return None
        return FRAME_HEADER + int.from_bytes(self._buf[:FRAME_HEADER], "big")

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf
        buf += chunk
        out: list[bytes] = []
        pos, end_of_data, limit = 0, len(buf), self.limit
        with memoryview(buf) as view:
            while end_of_data - pos >= FRAME_HEADER:
                size = int.from_bytes(view[pos : pos + FRAME_HEADER], "big")
                if size > limit:
                    raise ParseError(f"map stream frame of {size} bytes is larger than {limit} bytes")
                end = pos + FRAME_HEADER + size
                if end > end_of_data:
                    break
                out.append(bytes(view[pos + FRAME_HEADER : end]))
                pos = end
        if pos:
            del buf[:pos]
        return out


ROTATION_PROOF_AGE = REPLAY_WINDOW
"""Seconds a node key rotation proof's ``ts`` may differ from the server's clock."""


def seal_rotation_proof(
    old_node_private: NodePrivate, server_public: MachinePublic, new_node_key: NodePublic, now: float
) -> str:
    """Proof that the holder of the current node key agrees to replace it by ``new_node_key``: base64 of a
    NaCl box (24-byte nonce + ciphertext) from ``old_node_private`` (Curve25519) to the server's machine
    public key, sealing ``{"new_node_key": "nodekey:<hex>", "ts": now}`` (unix seconds). Sent in a register
    request as ``old_node_proof`` next to ``old_node_key``."""
    body = {"new_node_key": new_node_key.text(), "ts": now}
    box = nacl.public.Box(
        nacl.public.PrivateKey(old_node_private.raw), nacl.public.PublicKey(server_public.raw)
    )
    return base64.b64encode(bytes(box.encrypt(json.dumps(body, separators=(",", ":")).encode()))).decode()


def open_rotation_proof(
    server_private: MachinePrivate,
    old_node_key: NodePublic,
    proof: object,
    *,
    new_node_key: NodePublic,
    now: float,
) -> None:
    """Check a :func:`seal_rotation_proof` proof: sealed by ``old_node_key``'s private key for this server,
    naming ``new_node_key``, made within :data:`ROTATION_PROOF_AGE` seconds of ``now``.

    Raises ParseError (malformed), UnauthenticatedError (does not open, or names another key), ReplayError
    (stale)."""
    box = nacl.public.Box(nacl.public.PrivateKey(server_private.raw), nacl.public.PublicKey(old_node_key.raw))
    if not isinstance(proof, str) or len(proof) > 1024:
        raise ParseError("old_node_proof must be a base64 string")
    try:
        raw = base64.b64decode(proof, validate=True)
        body = _json_object(box.decrypt(raw), "node key rotation proof")
    except (binascii.Error, ValueError):
        raise ParseError("old_node_proof is not valid base64") from None
    except nacl.exceptions.CryptoError:
        raise UnauthenticatedError(
            f"node key rotation proof does not open with node key {old_node_key.short()}"
        ) from None
    if body.get("new_node_key") != new_node_key.text():
        raise UnauthenticatedError("node key rotation proof names another new node key")
    ts = body.get("ts")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or abs(ts - now) > ROTATION_PROOF_AGE:
        raise ReplayError(
            f"node key rotation proof is stale (more than {ROTATION_PROOF_AGE:.0f} s from the server's clock)"
        )


__all__ = [
    "FRAMES_CONTENT_TYPE",
    "FRAME_HEADER",
    "KEEPALIVE_HEADER",
    "LINES_CONTENT_TYPE",
    "MAX_MESSAGE",
    "MAX_STREAM_FRAME",
    "MAX_STREAM_LINE",
    "REPLAY_WINDOW",
    "SILENCE_KEEPALIVES",
    "FrameReader",
    "OpenedRequest",
    "ReplayError",
    "ReplayGuard",
    "SealedRequest",
    "StreamOpener",
    "StreamSealer",
    "UnauthenticatedError",
    "new_nonce_id",
    "open_request",
    "open_response",
    "open_rotation_proof",
    "parse_unary",
    "public_of",
    "seal_request",
    "seal_response",
    "seal_rotation_proof",
    "unary_envelope",
]
