"""Sans-IO codec for DERP, Tailscale's relay protocol, version 2 (``derp/derp.go`` in tailscale/tailscale).

A DERP stream, after the HTTP upgrade (``GET /derp``, ``Upgrade: DERP`` → 101), is a sequence of frames::

    type: 1 byte | length: big-endian u32 | payload: <length> bytes

Login: the server sends :class:`ServerKey`; the client answers :class:`ClientInfo` (its 32-byte public key and
a NaCl box of JSON ``{"version": 2, ...}`` sealed to the server key); the server answers :class:`ServerInfo`
(a box of JSON sealed to the client key). Then the client sends :class:`SendPacket` and the server delivers
:class:`RecvPacket` to the destination; the server sends :class:`KeepAlive` about every
:data:`KEEPALIVE_INTERVAL` seconds and answers :class:`Ping` with :class:`Pong`.

Mesh (servers of one region, derper's ``--mesh-with``): a client whose ClientInfo JSON carries the region's
``meshKey`` (:func:`parse_mesh_key`) may send :class:`WatchConns` and is then sent :class:`PeerPresent` (key,
the client's IP:port, :class:`PeerPresentFlags`) for every client connected there and :class:`PeerGone` when
one leaves; it may send :class:`ForwardPacket` (source key, destination key, packet), which that server
delivers to its own client only (one hop), and :class:`ClosePeer`.

API
---
* Frames are frozen dataclasses, one per type (:data:`Frame` is their union); a frame type this module does
  not know parses as :class:`Unknown` (the protocol says to skip those).
* :func:`encode` turns any frame into bytes (header included); :func:`encode_header` gives the 5-byte header.
* :func:`parse_frame` parses one payload given its type; :func:`parse_header` parses a 5-byte header.
* :class:`FrameReader` is incremental: ``reader.feed(data)`` returns the complete frames so far. A header
  claiming more than ``max_frame_len`` bytes raises :class:`~tailpy.errors.ParseError` as soon as the 5
  header bytes are in, before any of the body is buffered.
* :func:`seal_client_info` / :func:`open_client_info` and :func:`seal_server_info` /
  :func:`open_server_info` do the login boxes (PyNaCl ``Box``: Curve25519, XSalsa20-Poly1305; the sealed
  bytes are the 24-byte nonce followed by the ciphertext, as Go's ``key.NodePrivate.SealTo`` writes).

Keys on the wire are raw 32-byte Curve25519 public keys; here they are :class:`~tailpy.keys.NodePublic`
(clients) and :class:`~tailpy.keys.MachinePublic` (the server's key in :class:`ServerKey`).

Every malformed input raises :class:`tailpy.errors.ParseError` and nothing else. No I/O, no clock.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final, TypeAlias

import nacl.exceptions
import nacl.public

from tailpy.errors import ParseError
from tailpy.keys import KEY_LEN, MachinePublic, NodePublic, PrivateKey, PublicKey

MAGIC: Final = "DERP🔑".encode()
"""8 bytes ``44 45 52 50 f0 9f 94 91`` at the start of a ServerKey payload (derp.go ``Magic``)."""

PROTOCOL_VERSION: Final = 2
"""DERP protocol version; v2 puts the 32-byte source key first in RecvPacket (derp.go ``ProtocolVersion``)."""

FRAME_HEADER_LEN: Final = 5
"""1-byte type + big-endian u32 length."""

NONCE_LEN: Final = 24
"""NaCl box nonce, bytes."""

BOX_OVERHEAD: Final = 16
"""Poly1305 tag added by a NaCl box, bytes."""

MAX_PACKET_SIZE: Final = 64 << 10
"""Largest packet carried in SendPacket/RecvPacket, bytes (64 KiB, derp.go ``MaxPacketSize``)."""

MAX_FRAME_LEN: Final = 2 * KEY_LEN + MAX_PACKET_SIZE
"""Default largest frame payload :class:`FrameReader` accepts, bytes: a ForwardPacket (two keys) carrying a
:data:`MAX_PACKET_SIZE` packet. Login frames and control frames are far smaller."""

KEEPALIVE_INTERVAL: Final = 60.0
"""Seconds between the server's KeepAlive frames (derp.go ``KeepAlive``); 2x this means one was missed."""

PING_LEN: Final = 8
"""Ping/Pong payload, bytes."""

_HEADER = struct.Struct(">BI")
_U32X2 = struct.Struct(">II")


class FrameType(enum.IntEnum):
    """The 1-byte frame type (derp.go ``FrameType``)."""

    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


class PeerPresentFlags(enum.IntFlag):
    """The flags byte of a PeerPresent frame (derp.go ``PeerPresentFlags``); a server that sends none (or 0)
    predates them. derpserver's ``sclient.presentFlags`` sends REGULAR for a plain client, else the others."""

    REGULAR = 1 << 0
    MESH_PEER = 1 << 1
    """The connection logged in with the mesh key (another server of the region, or a trusted monitor)."""
    PROBER = 1 << 2
    """The client said ``IsProber`` in its ClientInfo."""
    NOT_IDEAL = 1 << 3
    """The client said this server is not its region's first (ideal) node (``Ideal-Node`` header)."""


MESH_KEY_LEN: Final = 32
"""A DERP mesh key, bytes: 64 lowercase hex digits in files and in ClientInfo's ``meshKey`` (Go
``key.DERPMesh``)."""


def parse_mesh_key(text: str) -> bytes:
    """The 32 bytes of a mesh key written as 64 hexadecimal digits, whitespace around them trimmed (Go
    ``key.ParseDERPMesh``; derper's ``--mesh-psk-file`` holds one). Raises ParseError otherwise."""
    t = text.strip()
    if len(t) != 2 * MESH_KEY_LEN:
        raise ParseError(
            f"a DERP mesh key must be {2 * MESH_KEY_LEN} hexadecimal digits, got {len(t)} characters"
        )
    try:
        return bytes.fromhex(t)
    except ValueError:
        raise ParseError("a DERP mesh key must be hexadecimal digits only") from None


class PeerGoneReason(enum.IntEnum):
    """Why the server has no path to a peer (derp.go ``PeerGoneReasonType``)."""

    DISCONNECTED = 0x00
    """The peer was connected here and has disconnected."""
    NOT_HERE = 0x01
    """The server does not know the peer (a packet was sent to an unknown destination)."""


# --- frames -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerKey:
    """0x01, server → client, first frame: :data:`MAGIC` + the server's 32-byte public key (+ bytes for future
    use, ignored)."""

    key: MachinePublic


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """0x02, client → server, second frame: the client's 32-byte public key + ``sealed`` (24-byte nonce + NaCl
    box of JSON, see :func:`seal_client_info`)."""

    key: NodePublic
    sealed: bytes


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """0x03, server → client, third frame: ``sealed`` (24-byte nonce + NaCl box of JSON
    ``{"version": 2}``, see :func:`seal_server_info`)."""

    sealed: bytes


@dataclass(frozen=True, slots=True)
class SendPacket:
    """0x04, client → server: 32-byte destination key + packet (at most :data:`MAX_PACKET_SIZE` bytes)."""

    dst: NodePublic
    data: bytes


@dataclass(frozen=True, slots=True)
class RecvPacket:
    """0x05, server → client: 32-byte source key + packet (v2 layout)."""

    src: NodePublic
    data: bytes


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """0x06, server → client: no payload (a payload, if any, is ignored)."""


@dataclass(frozen=True, slots=True)
class NotePreferred:
    """0x07, client → server: 1 byte, 0x01 if this server is the client's home DERP, else 0x00."""

    preferred: bool


@dataclass(frozen=True, slots=True)
class PeerGone:
    """0x08, server → client: 32-byte key of the peer + 1-byte :class:`PeerGoneReason` (a 32-byte payload,
    as old servers send, means DISCONNECTED; other reason bytes are kept as ints)."""

    key: NodePublic
    reason: int = PeerGoneReason.DISCONNECTED


@dataclass(frozen=True, slots=True)
class PeerPresent:
    """0x09, server → mesh watcher: 32-byte key, then optionally 16-byte IP + big-endian u16 port, then
    optionally 1 flags byte (derp.go ``PeerPresentFlags``)."""

    key: NodePublic
    endpoint: tuple[IPv4Address | IPv6Address, int] | None = None
    flags: int | None = None


@dataclass(frozen=True, slots=True)
class ForwardPacket:
    """0x0a, mesh peer → server: 32-byte source key + 32-byte destination key + packet."""

    src: NodePublic
    dst: NodePublic
    data: bytes


@dataclass(frozen=True, slots=True)
class WatchConns:
    """0x10, mesh peer → server: no payload."""


@dataclass(frozen=True, slots=True)
class ClosePeer:
    """0x11, mesh peer → server: 32-byte key of the peer to disconnect."""

    key: NodePublic


@dataclass(frozen=True, slots=True)
class Ping:
    """0x12, either way: 8 bytes to echo in a Pong (extra bytes, as the Go server allows, are ignored)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """0x13, either way: the 8 bytes of the Ping being answered."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Health:
    """0x14, server → client: UTF-8 text of a problem with this connection; empty clears it."""

    problem: str


@dataclass(frozen=True, slots=True)
class Restarting:
    """0x15, server → client: two big-endian u32, milliseconds: when to reconnect, how long to keep trying."""

    reconnect_in_ms: int
    try_for_ms: int


@dataclass(frozen=True, slots=True)
class Unknown:
    """A frame type this module does not know; receivers skip it (derp_client.go ``Recv``)."""

    type: int
    payload: bytes


Frame: TypeAlias = (
    ServerKey
    | ClientInfo
    | ServerInfo
    | SendPacket
    | RecvPacket
    | KeepAlive
    | NotePreferred
    | PeerGone
    | PeerPresent
    | ForwardPacket
    | WatchConns
    | ClosePeer
    | Ping
    | Pong
    | Health
    | Restarting
    | Unknown
)


# --- encoding -----------------------------------------------------------------------------------------------


def encode_header(frame_type: int, length: int) -> bytes:
    """The 5-byte frame header: ``frame_type`` (0-255) and ``length`` (payload bytes, big-endian u32)."""
    return _HEADER.pack(frame_type, length)


def _frame(t: int, payload: bytes) -> bytes:
    return _HEADER.pack(t, len(payload)) + payload


def _u8(v: int, what: str) -> int:
    if not 0 <= v <= 0xFF:
        raise ValueError(f"{what} must fit in one byte, got {v}")
    return v


def _eight(data: bytes, what: str) -> bytes:
    if len(data) != PING_LEN:
        raise ValueError(f"{what} data must be {PING_LEN} bytes, got {len(data)}")
    return bytes(data)


def _packet(data: bytes) -> bytes:
    if len(data) > MAX_PACKET_SIZE:
        raise ValueError(f"packet of {len(data)} bytes exceeds the DERP maximum of {MAX_PACKET_SIZE}")
    return bytes(data)


def encode_recv_packet(src: NodePublic, data: bytes) -> bytes:
    """RecvPacket frame bytes; the server's per-packet fast path (no dataclass). ValueError if too big."""
    return _frame(FrameType.RECV_PACKET, src.raw + _packet(data))


def encode_send_packet(dst: NodePublic, data: bytes) -> bytes:
    """SendPacket frame bytes; the client's per-packet fast path. ValueError if too big."""
    return _frame(FrameType.SEND_PACKET, dst.raw + _packet(data))


def encode_forward_packet(src: NodePublic, dst: NodePublic, data: bytes) -> bytes:
    """ForwardPacket frame bytes; a mesh forwarder's per-packet path. ValueError if too big."""
    return _frame(FrameType.FORWARD_PACKET, src.raw + dst.raw + _packet(data))


def encode(frame: Frame) -> bytes:
    """The bytes of ``frame``, header included.

    Raises ValueError for a frame that cannot be valid on the wire (a packet over :data:`MAX_PACKET_SIZE`,
    Ping/Pong data not 8 bytes, a reason or flags byte out of range, a u32 out of range).
    """
    match frame:
        case ServerKey(key):
            return _frame(FrameType.SERVER_KEY, MAGIC + key.raw)
        case ClientInfo(key, sealed):
            return _frame(FrameType.CLIENT_INFO, key.raw + bytes(sealed))
        case ServerInfo(sealed):
            return _frame(FrameType.SERVER_INFO, bytes(sealed))
        case SendPacket(dst, data):
            return encode_send_packet(dst, data)
        case RecvPacket(src, data):
            return encode_recv_packet(src, data)
        case KeepAlive():
            return _frame(FrameType.KEEP_ALIVE, b"")
        case NotePreferred(preferred):
            return _frame(FrameType.NOTE_PREFERRED, b"\x01" if preferred else b"\x00")
        case PeerGone(key, reason):
            return _frame(FrameType.PEER_GONE, key.raw + bytes([_u8(reason, "PeerGone reason")]))
        case PeerPresent(key, endpoint, flags):
            body = key.raw
            if endpoint is not None:
                ip, port = endpoint
                if not 0 <= port <= 0xFFFF:
                    raise ValueError(f"port must be 0-65535, got {port}")
                ip16 = ip.packed if ip.version == 6 else b"\x00" * 10 + b"\xff\xff" + ip.packed
                body += ip16 + port.to_bytes(2, "big")
                if flags is not None:
                    body += bytes([_u8(flags, "PeerPresent flags")])
            elif flags is not None:
                raise ValueError("PeerPresent flags need an endpoint before them")
            return _frame(FrameType.PEER_PRESENT, body)
        case ForwardPacket(src, dst, data):
            return encode_forward_packet(src, dst, data)
        case WatchConns():
            return _frame(FrameType.WATCH_CONNS, b"")
        case ClosePeer(key):
            return _frame(FrameType.CLOSE_PEER, key.raw)
        case Ping(data):
            return _frame(FrameType.PING, _eight(data, "Ping"))
        case Pong(data):
            return _frame(FrameType.PONG, _eight(data, "Pong"))
        case Health(problem):
            return _frame(FrameType.HEALTH, problem.encode())
        case Restarting(reconnect_in_ms, try_for_ms):
            try:
                return _frame(FrameType.RESTARTING, _U32X2.pack(reconnect_in_ms, try_for_ms))
            except struct.error:
                raise ValueError("Restarting durations must be 0 to 2**32-1 milliseconds") from None
        case Unknown(t, payload):
            return _frame(_u8(t, "frame type"), bytes(payload))
    raise TypeError(f"not a DERP frame: {type(frame).__name__}")  # pragma: no cover


# --- parsing ------------------------------------------------------------------------------------------------


def parse_header(header: bytes) -> tuple[int, int]:
    """(frame type, payload length) from a 5-byte header. Raises ParseError if not 5 bytes."""
    if len(header) != FRAME_HEADER_LEN:
        raise ParseError(f"DERP frame header must be {FRAME_HEADER_LEN} bytes, got {len(header)}")
    t, n = _HEADER.unpack(header)
    return int(t), int(n)


def _need(payload: bytes, n: int, what: str) -> None:
    if len(payload) < n:
        raise ParseError(f"DERP {what} frame too short: {len(payload)} bytes, need at least {n}")


def _key(b: bytes) -> NodePublic:
    return NodePublic(bytes(b))


def parse_frame(frame_type: int, payload: bytes) -> Frame:
    """Parse one frame's payload (the bytes after the header) of type ``frame_type``.

    Lenient where Tailscale's own readers are (extra trailing bytes in ServerKey, Ping, Pong, KeepAlive and
    Restarting are ignored; a 32-byte PeerGone means DISCONNECTED); strict elsewhere. Raises ParseError.
    """
    p = bytes(payload)
    match frame_type:
        case FrameType.SERVER_KEY:
            _need(p, len(MAGIC) + KEY_LEN, "ServerKey")
            if p[: len(MAGIC)] != MAGIC:
                raise ParseError("DERP ServerKey frame does not start with the magic 'DERP🔑'")
            return ServerKey(MachinePublic(p[len(MAGIC) : len(MAGIC) + KEY_LEN]))
        case FrameType.CLIENT_INFO:
            _need(p, KEY_LEN + NONCE_LEN + BOX_OVERHEAD, "ClientInfo")
            return ClientInfo(_key(p[:KEY_LEN]), p[KEY_LEN:])
        case FrameType.SERVER_INFO:
            _need(p, NONCE_LEN + BOX_OVERHEAD, "ServerInfo")
            return ServerInfo(p)
        case FrameType.SEND_PACKET | FrameType.RECV_PACKET:
            _need(p, KEY_LEN, FrameType(frame_type).name)
            if len(p) - KEY_LEN > MAX_PACKET_SIZE:
                raise ParseError(f"DERP packet of {len(p) - KEY_LEN} bytes exceeds {MAX_PACKET_SIZE}")
            if frame_type == FrameType.SEND_PACKET:
                return SendPacket(_key(p[:KEY_LEN]), p[KEY_LEN:])
            return RecvPacket(_key(p[:KEY_LEN]), p[KEY_LEN:])
        case FrameType.KEEP_ALIVE:
            return KeepAlive()
        case FrameType.NOTE_PREFERRED:
            if len(p) != 1:
                raise ParseError(f"DERP NotePreferred frame must be 1 byte, got {len(p)}")
            return NotePreferred(p[0] != 0)
        case FrameType.PEER_GONE:
            _need(p, KEY_LEN, "PeerGone")
            return PeerGone(_key(p[:KEY_LEN]), p[KEY_LEN] if len(p) > KEY_LEN else 0)
        case FrameType.PEER_PRESENT:
            _need(p, KEY_LEN, "PeerPresent")
            endpoint: tuple[IPv4Address | IPv6Address, int] | None = None
            flags: int | None = None
            if len(p) >= KEY_LEN + 18:
                ip6 = IPv6Address(p[KEY_LEN : KEY_LEN + 16])
                ip: IPv4Address | IPv6Address = ip6.ipv4_mapped or ip6
                endpoint = (ip, int.from_bytes(p[KEY_LEN + 16 : KEY_LEN + 18], "big"))
                if len(p) > KEY_LEN + 18:
                    flags = p[KEY_LEN + 18]
            return PeerPresent(_key(p[:KEY_LEN]), endpoint, flags)
        case FrameType.FORWARD_PACKET:
            _need(p, 2 * KEY_LEN, "ForwardPacket")
            if len(p) - 2 * KEY_LEN > MAX_PACKET_SIZE:
                raise ParseError(f"DERP packet of {len(p) - 2 * KEY_LEN} bytes exceeds {MAX_PACKET_SIZE}")
            return ForwardPacket(_key(p[:KEY_LEN]), _key(p[KEY_LEN : 2 * KEY_LEN]), p[2 * KEY_LEN :])
        case FrameType.WATCH_CONNS:
            if p:
                raise ParseError(f"DERP WatchConns frame must be empty, got {len(p)} bytes")
            return WatchConns()
        case FrameType.CLOSE_PEER:
            if len(p) != KEY_LEN:
                raise ParseError(f"DERP ClosePeer frame must be {KEY_LEN} bytes, got {len(p)}")
            return ClosePeer(_key(p))
        case FrameType.PING:
            _need(p, PING_LEN, "Ping")
            return Ping(p[:PING_LEN])
        case FrameType.PONG:
            _need(p, PING_LEN, "Pong")
            return Pong(p[:PING_LEN])
        case FrameType.HEALTH:
            try:
                return Health(p.decode())
            except UnicodeDecodeError:
                raise ParseError("DERP Health frame is not UTF-8 text") from None
        case FrameType.RESTARTING:
            _need(p, 8, "Restarting")
            a, b = _U32X2.unpack(p[:8])
            return Restarting(a, b)
    if not 0 <= frame_type <= 0xFF:
        raise ParseError(f"DERP frame type must be one byte, got {frame_type}")
    return Unknown(frame_type, p)


class FrameReader:
    """Incremental DERP frame parser: ``feed(data)`` buffers bytes and returns the frames now complete.

    ``max_frame_len`` (payload bytes, default :data:`MAX_FRAME_LEN`) bounds what one frame may claim: a header
    over it raises ParseError when its 5 bytes arrive, before the body is read or any room made for it.
    After a ParseError the stream is unusable (framing is lost) and every later ``feed`` raises again.
    At most one incomplete frame (≤ ``max_frame_len`` + 5 bytes) is ever buffered.
    """

    __slots__ = ("_buf", "_error", "max_frame_len")

    def __init__(self, max_frame_len: int = MAX_FRAME_LEN) -> None:
        self.max_frame_len = max_frame_len
        self._buf = bytearray()
        self._error: ParseError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buf)

    def pending_header(self) -> tuple[int, int] | None:
        """(type, length) of the incomplete frame at the front of the buffer, if its header is in."""
        if len(self._buf) < FRAME_HEADER_LEN:
            return None
        return parse_header(bytes(self._buf[:FRAME_HEADER_LEN]))

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data``; return every complete frame, in order. Raises ParseError (then always)."""
        if self._error is not None:
            raise self._error
        self._buf += data
        frames: list[Frame] = []
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= FRAME_HEADER_LEN:
                t, n = _HEADER.unpack_from(buf, pos)
                if n > self.max_frame_len:
                    raise ParseError(
                        f"DERP frame header claims {n} bytes, more than the limit of {self.max_frame_len}"
                    )
                end = pos + FRAME_HEADER_LEN + n
                if len(buf) < end:
                    break
                frames.append(parse_frame(t, bytes(buf[pos + FRAME_HEADER_LEN : end])))
                pos = end
        except ParseError as e:
            self._error = e
            self._buf = bytearray()
            raise
        del buf[:pos]
        return frames

    def feed_raw(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add ``data``; return every complete frame as (type, payload bytes), unparsed (the server's
        per-packet fast path parses SendPacket itself; :func:`parse_frame` does the rest). The header limit
        is checked as in :meth:`feed`. Raises ParseError (then always)."""
        if self._error is not None:
            raise self._error
        self._buf += data
        frames: list[tuple[int, bytes]] = []
        buf = self._buf
        pos = 0
        size = len(buf)
        unpack = _HEADER.unpack_from
        limit = self.max_frame_len
        while size - pos >= FRAME_HEADER_LEN:
            t, n = unpack(buf, pos)
            if n > limit:
                self._error = ParseError(f"DERP frame header claims {n} bytes, more than the limit {limit}")
                self._buf = bytearray()
                raise self._error
            end = pos + FRAME_HEADER_LEN + n
            if size < end:
                break
            frames.append((t, bytes(buf[pos + FRAME_HEADER_LEN : end])))
            pos = end
        del buf[:pos]
        return frames


# --- login boxes --------------------------------------------------------------------------------------------


def _box(private: PrivateKey, public: PublicKey) -> nacl.public.Box:
    try:
        return nacl.public.Box(nacl.public.PrivateKey(private.raw), nacl.public.PublicKey(public.raw))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise ParseError(f"cannot make a NaCl box with peer key {public.text()}") from None


def _seal(private: PrivateKey, public: PublicKey, info: Mapping[str, Any]) -> bytes:
    msg = json.dumps(dict(info), separators=(",", ":")).encode()
    return bytes(_box(private, public).encrypt(msg))


def _open(private: PrivateKey, public: PublicKey, sealed: bytes, what: str) -> dict[str, Any]:
    if len(sealed) < NONCE_LEN + BOX_OVERHEAD:
        raise ParseError(f"DERP {what} box too short: {len(sealed)} bytes")
    try:
        msg = _box(private, public).decrypt(bytes(sealed))
    except nacl.exceptions.CryptoError:
        raise ParseError(f"DERP {what} box does not open with key {public.text()}") from None
    try:
        info = json.loads(msg)
    except (ValueError, RecursionError):
        raise ParseError(f"DERP {what} is not valid JSON") from None
    if not isinstance(info, dict):
        raise ParseError(f"DERP {what} must be a JSON object")
    return info


def seal_client_info(
    client: PrivateKey, server: PublicKey, info: Mapping[str, Any] | None = None
) -> ClientInfo:
    """A ClientInfo frame from ``client`` (its node private key) to ``server`` (the key from ServerKey).

    ``info`` is the JSON object to seal; default ``{"version": 2}``. Tailscale's fields: ``version`` (int),
    ``CanAckPings`` (bool), ``IsProber`` (bool), ``AppName`` (str), ``meshKey`` (hex str) (derp_client.go
    ``ClientInfo``). Raises ParseError if ``server`` cannot be used as a box key.
    """
    body = {"version": PROTOCOL_VERSION} if info is None else info
    return ClientInfo(NodePublic(client.public.raw), _seal(client, server, body))


def open_client_info(server: PrivateKey, frame: ClientInfo) -> dict[str, Any]:
    """The JSON object inside ``frame``, opened with the server's private key and the client's public key.

    Raises ParseError if the box does not open (wrong key, altered bytes) or holds anything but a JSON object.
    """
    return _open(server, frame.key, frame.sealed, "ClientInfo")


def seal_server_info(
    server: PrivateKey, client: NodePublic, info: Mapping[str, Any] | None = None
) -> ServerInfo:
    """A ServerInfo frame sealed by the server's private key to ``client``; default JSON ``{"version": 2}``
    (Tailscale also knows ``TokenBucketBytesPerSecond`` and ``TokenBucketBytesBurst``, ints)."""
    body = {"version": PROTOCOL_VERSION} if info is None else info
    return ServerInfo(_seal(server, client, body))


def open_server_info(client: PrivateKey, server: PublicKey, frame: ServerInfo) -> dict[str, Any]:
    """The JSON object inside ``frame``, opened with the client's private key and the server's public key.

    Raises ParseError as :func:`open_client_info` does.
    """
    return _open(client, server, frame.sealed, "ServerInfo")


__all__ = [
    "BOX_OVERHEAD",
    "FRAME_HEADER_LEN",
    "KEEPALIVE_INTERVAL",
    "KEY_LEN",
    "MAGIC",
    "MAX_FRAME_LEN",
    "MAX_PACKET_SIZE",
    "MESH_KEY_LEN",
    "NONCE_LEN",
    "PING_LEN",
    "PROTOCOL_VERSION",
    "ClientInfo",
    "ClosePeer",
    "ForwardPacket",
    "Frame",
    "FrameReader",
    "FrameType",
    "Health",
    "KeepAlive",
    "NotePreferred",
    "PeerGone",
    "PeerGoneReason",
    "PeerPresent",
    "PeerPresentFlags",
    "Ping",
    "Pong",
    "RecvPacket",
    "Restarting",
    "SendPacket",
    "ServerInfo",
    "ServerKey",
    "Unknown",
    "WatchConns",
    "encode",
    "encode_forward_packet",
    "encode_header",
    "encode_recv_packet",
    "encode_send_packet",
    "open_client_info",
    "open_server_info",
    "parse_frame",
    "parse_header",
    "parse_mesh_key",
    "seal_client_info",
    "seal_server_info",
]
