"""Sans-IO codec for disco, Tailscale's path-discovery messages (``disco/disco.go`` in tailscale/tailscale).

A disco datagram, sent on the node's one UDP socket (so it shares the NAT mapping WireGuard uses) or inside a
DERP SendPacket/RecvPacket, is::

    magic "TS💬" (6 bytes: 54 53 f0 9f 92 ac) | sender's disco public key (32) | nonce (24) | box

``box`` is a NaCl box (Curve25519 + XSalsa20-Poly1305, PyNaCl ``Box``) from the sender's disco private key to
the receiver's disco public key, over the nonce, of the plaintext::

    type (1 byte) | version (1 byte, 0) | payload

Messages (disco.go ``MessageType``):

* :class:`Ping` 0x01: 12-byte txid, then the sender's 32-byte node (WireGuard) key, then ``padding`` zero
  bytes (used to probe the path MTU). Old senders omit the node key.
* :class:`Pong` 0x02: the txid of the Ping answered + the source the Ping came from, as the receiver saw it:
  16-byte IPv6 address (IPv4 as ``::ffff:a.b.c.d``) + big-endian u16 port. A Pong is a STUN answer too.
* :class:`CallMeMaybe` 0x03: the sender's endpoints, N x (16-byte IP + 2-byte port); sent only over DERP,
  asks the receiver to ping them all at once (the sender has just pinged the receiver, opening its own NAT).

Like disco.go, parsing is lax where Go's is: bytes after a known message are ignored (a Ping's tail is
padding), the version byte of Ping and Pong is ignored, and a CallMeMaybe whose version is not 0 or whose
length is not a multiple of 18 reads as having no endpoints. Other message types (0x04-0x09, UDP relay
servers) and unknown ones raise :class:`UnknownMessageError`.

API
---
* :func:`looks_like_disco` / :func:`sender` read the clear header; :func:`encode` / :func:`parse` the
  plaintext.
* :func:`seal` / :func:`open_datagram` build and open whole datagrams with a node's
  :class:`~tailpy.keys.DiscoPrivate`; :func:`box_for` + :func:`seal_with` / :func:`open_with` do the same with
  a precomputed :class:`nacl.public.Box` (the X25519 agreement done once per peer, as magicsock keeps it).
* Endpoints are :class:`tailpy.endpoint.Endpoint` (re-exported here), whose 18-byte form
  (:meth:`~tailpy.endpoint.Endpoint.disco_bytes`) is the one of Pong and CallMeMaybe.

Every malformed input raises :class:`DiscoParseError` (a :class:`tailpy.errors.ParseError`), or one of its
subclasses :class:`DecryptError` and :class:`UnknownMessageError`, and nothing else. No I/O, no clock.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Final, TypeAlias

import nacl.exceptions
import nacl.public
import nacl.utils

from tailpy.endpoint import DISCO_LEN, Endpoint, IPAddress
from tailpy.errors import ParseError
from tailpy.keys import KEY_LEN, DiscoPrivate, DiscoPublic, NodePublic

MAGIC: Final = "TS💬".encode()
"""6 bytes ``54 53 f0 9f 92 ac`` at the start of every disco datagram (disco.go ``Magic``)."""

NONCE_LEN: Final = 24
"""NaCl box nonce, bytes."""

BOX_OVERHEAD: Final = 16
"""Poly1305 tag added by a NaCl box, bytes."""

HEADER_LEN: Final = len(MAGIC) + KEY_LEN + NONCE_LEN
"""Clear header of a disco datagram: magic + sender disco key + nonce = 62 bytes."""

MESSAGE_HEADER_LEN: Final = 2
"""Type byte + version byte at the start of the plaintext."""

TXID_LEN: Final = 12
"""Ping/Pong transaction id, bytes."""

ENDPOINT_LEN: Final = DISCO_LEN
"""An endpoint on the wire: 16-byte IPv6 (IPv4-mapped for IPv4) + big-endian u16 port."""

PING_LEN: Final = TXID_LEN + KEY_LEN
"""Ping payload without padding, bytes (disco.go ``PingLen``)."""

PONG_LEN: Final = TXID_LEN + ENDPOINT_LEN
"""Pong payload, bytes (disco.go ``pongLen``)."""

MIN_DATAGRAM_LEN: Final = HEADER_LEN + BOX_OVERHEAD + MESSAGE_HEADER_LEN
"""Shortest datagram that can hold any message: 80 bytes."""

PING_DATAGRAM_LEN: Final = HEADER_LEN + BOX_OVERHEAD + MESSAGE_HEADER_LEN + PING_LEN
"""A whole unpadded Ping datagram: 124 bytes (magicsock ``discoPingSize``)."""

MAX_PADDING: Final = 65_535
"""Largest Ping padding :func:`encode` writes, bytes (a UDP datagram is at most 64 KiB anyway)."""

VERSION: Final = 0
"""The only message version there is (disco.go ``v0``)."""


class DiscoParseError(ParseError):
    """A disco datagram or message is malformed (too short, wrong magic, bad field)."""


class DecryptError(DiscoParseError):
    """The NaCl box does not open: wrong receiver, a sender key that is not the sealer's, or altered bytes."""


class UnknownMessageError(DiscoParseError):
    """The message type is not one this codec handles (``type`` holds the byte)."""

    def __init__(self, message_type: int) -> None:
        super().__init__(f"disco message type 0x{message_type:02x} is not Ping, Pong or CallMeMaybe")
        self.type = message_type


class MessageType(enum.IntEnum):
    """The plaintext's first byte (disco.go ``MessageType``)."""

    PING = 0x01
    PONG = 0x02
    CALL_ME_MAYBE = 0x03


# --- messages -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    """0x01: ``txid`` (12 random bytes), the sender's node key (None: an old sender, or 32 zero bytes),
    ``padding`` bytes after it (0 to :data:`MAX_PADDING`; zeros when sent, never checked when read). The node
    key is only a claim: trust it only together with the netmap (the disco key must belong to that node).
    As in disco.go, a Ping without a key and with 32 or more padding bytes reads back as a zero key (None)
    with 32 bytes less padding; tailpy always sends its key."""

    txid: bytes
    node_key: NodePublic | None = None
    padding: int = 0


@dataclass(frozen=True, slots=True)
class Pong:
    """0x02: the answered Ping's ``txid`` and ``src``, the endpoint that Ping came from as the answerer saw
    it (the sender's public endpoint when it is behind NAT)."""

    txid: bytes
    src: Endpoint


@dataclass(frozen=True, slots=True)
class CallMeMaybe:
    """0x03: the sender's endpoints, to be pinged all at once (sent only over DERP)."""

    endpoints: tuple[Endpoint, ...] = ()


Message: TypeAlias = Ping | Pong | CallMeMaybe


def new_txid() -> bytes:
    """12 random bytes for a Ping."""
    return os.urandom(TXID_LEN)


def _txid(txid: bytes) -> bytes:
    if len(txid) != TXID_LEN:
        raise ValueError(f"disco txid must be {TXID_LEN} bytes, got {len(txid)}")
    return bytes(txid)


def encode(msg: Message) -> bytes:
    """The plaintext of ``msg``: type, version 0, payload. ValueError for a txid not 12 bytes, a port out of
    range or padding outside 0..:data:`MAX_PADDING`."""
    match msg:
        case Ping(txid, node_key, padding):
            if not 0 <= padding <= MAX_PADDING:
                raise ValueError(f"Ping padding must be 0-{MAX_PADDING} bytes, got {padding}")
            key = node_key.raw if node_key is not None else b""
            return bytes([MessageType.PING, VERSION]) + _txid(txid) + key + bytes(padding)
        case Pong(txid, src):
            return bytes([MessageType.PONG, VERSION]) + _txid(txid) + src.disco_bytes()
        case CallMeMaybe(endpoints):
            return bytes([MessageType.CALL_ME_MAYBE, VERSION]) + b"".join(e.disco_bytes() for e in endpoints)
    raise TypeError(f"not a disco message: {type(msg).__name__}")  # pragma: no cover


def parse(plain: bytes) -> Message:
    """Parse a decrypted plaintext (type, version, payload). Raises DiscoParseError / UnknownMessageError."""
    p = bytes(plain)
    if len(p) < MESSAGE_HEADER_LEN:
        raise DiscoParseError(f"disco message too short: {len(p)} bytes, need at least {MESSAGE_HEADER_LEN}")
    t, ver, body = p[0], p[1], p[2:]
    if t == MessageType.PING:
        if len(body) < TXID_LEN:
            raise DiscoParseError(f"disco Ping too short: {len(body)} bytes, need at least {TXID_LEN}")
        rest = body[TXID_LEN:]
        if len(rest) >= KEY_LEN:
            raw = rest[:KEY_LEN]
            key = NodePublic(raw) if any(raw) else None  # all zero: no key, as Go's IsZero
            return Ping(body[:TXID_LEN], key, len(rest) - KEY_LEN)
        return Ping(body[:TXID_LEN], None, len(rest))
    if t == MessageType.PONG:
        if len(body) < PONG_LEN:
            raise DiscoParseError(f"disco Pong too short: {len(body)} bytes, need {PONG_LEN}")
        return Pong(body[:TXID_LEN], Endpoint.from_disco(body[TXID_LEN:PONG_LEN]))
    if t == MessageType.CALL_ME_MAYBE:
        if ver != VERSION or len(body) % ENDPOINT_LEN:
            return CallMeMaybe(())
        n = len(body) // ENDPOINT_LEN
        return CallMeMaybe(
            tuple(Endpoint.from_disco(body[i * ENDPOINT_LEN : (i + 1) * ENDPOINT_LEN]) for i in range(n))
        )
    raise UnknownMessageError(t)


# --- datagrams ----------------------------------------------------------------------------------------------


def looks_like_disco(datagram: bytes) -> bool:
    """True if ``datagram`` starts with :data:`MAGIC` and is long enough for the clear header
    (disco.go ``LooksLikeDiscoWrapper``)."""
    return len(datagram) >= HEADER_LEN and datagram[: len(MAGIC)] == MAGIC


def sender(datagram: bytes) -> DiscoPublic:
    """The sender's disco key from the clear header (not yet authenticated: only a box that opens proves it).
    Raises DiscoParseError if the datagram is not disco or is shorter than :data:`MIN_DATAGRAM_LEN`."""
    if not looks_like_disco(datagram):
        raise DiscoParseError("not a disco datagram (no 'TS💬' magic or shorter than its header)")
    if len(datagram) < MIN_DATAGRAM_LEN:
        raise DiscoParseError(f"disco datagram too short: {len(datagram)} bytes, need {MIN_DATAGRAM_LEN}")
    return DiscoPublic(bytes(datagram[len(MAGIC) : len(MAGIC) + KEY_LEN]))


def box_for(private: DiscoPrivate, peer: DiscoPublic) -> nacl.public.Box:
    """The NaCl box between this node's disco key and a peer's (the X25519 agreement, done once).

    Raises DecryptError when ``peer`` cannot be used (an all-zero or other low-order point)."""
    try:
        return nacl.public.Box(nacl.public.PrivateKey(private.raw), nacl.public.PublicKey(peer.raw))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise DecryptError(f"disco key {peer.text()} cannot be used for a NaCl box") from None


def seal_with(
    box: nacl.public.Box, sender_key: DiscoPublic, msg: Message, nonce: bytes | None = None
) -> bytes:
    """A whole datagram: magic + ``sender_key`` (this node's disco public key) + nonce + box of ``msg``.
    ``nonce`` (24 bytes) is random unless given (tests)."""
    n = nacl.utils.random(NONCE_LEN) if nonce is None else bytes(nonce)
    sealed = box.encrypt(encode(msg), n)
    return MAGIC + sender_key.raw + bytes(sealed)


def seal(private: DiscoPrivate, receiver: DiscoPublic, msg: Message, nonce: bytes | None = None) -> bytes:
    """:func:`seal_with` with a fresh box from ``private`` to ``receiver``. Raises DecryptError for a
    receiver key that cannot be used."""
    return seal_with(box_for(private, receiver), private.public, msg, nonce)


def open_with(box: nacl.public.Box, datagram: bytes) -> Message:
    """Open and parse a datagram whose sender ``box`` was made for (see :func:`sender`).

    Raises DiscoParseError (short, no magic), DecryptError (the box does not open), UnknownMessageError."""
    sender(datagram)  # checks magic and length
    try:
        nonce = bytes(datagram[HEADER_LEN - NONCE_LEN : HEADER_LEN])
        plain = box.decrypt(bytes(datagram[HEADER_LEN:]), nonce)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise DecryptError("disco box does not open (wrong key or altered bytes)") from None
    return parse(plain)


def open_datagram(private: DiscoPrivate, datagram: bytes) -> tuple[DiscoPublic, Message]:
    """(sender's disco key, message) of a datagram sealed to ``private``'s public key.

    Raises DiscoParseError, DecryptError or UnknownMessageError."""
    src = sender(datagram)
    return src, open_with(box_for(private, src), datagram)


__all__ = [
    "BOX_OVERHEAD",
    "ENDPOINT_LEN",
    "HEADER_LEN",
    "MAGIC",
    "MAX_PADDING",
    "MESSAGE_HEADER_LEN",
    "MIN_DATAGRAM_LEN",
    "NONCE_LEN",
    "PING_DATAGRAM_LEN",
    "PING_LEN",
    "PONG_LEN",
    "TXID_LEN",
    "VERSION",
    "CallMeMaybe",
    "DecryptError",
    "DiscoParseError",
    "Endpoint",
    "IPAddress",
    "Message",
    "MessageType",
    "Ping",
    "Pong",
    "UnknownMessageError",
    "box_for",
    "encode",
    "looks_like_disco",
    "new_txid",
    "open_datagram",
    "open_with",
    "parse",
    "seal",
    "seal_with",
    "sender",
]
