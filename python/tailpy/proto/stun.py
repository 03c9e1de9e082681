"""Sans-IO STUN codec (RFC 8489, which obsoletes RFC 5389), checked against the RFC 5769 test vectors.

A message is a 20-byte header (2-bit zero prefix, 14-bit type = method + class, big-endian u16 length of the
attributes, magic cookie 0x2112A442, 12-byte transaction id) followed by TLV attributes (u16 type, u16 value
length, value padded to a multiple of 4 bytes; the padding bytes may hold anything: RFC 5769's request vector
pads with 0x20).

* :func:`parse` checks the framing and, when present, FINGERPRINT (CRC-32 xor 0x5354554e, RFC 8489 §14.7;
  a wrong one raises :class:`FingerprintError`). Every known attribute is decoded at parse time, so a message
  that parses has well-formed addresses and error codes. Attributes after MESSAGE-INTEGRITY other than
  MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are ignored, as §14.5 says.
* :meth:`Message.verify_integrity` checks MESSAGE-INTEGRITY (HMAC-SHA1, §14.5) with a key from
  :func:`short_term_key` or :func:`long_term_key` (§9.1.1, §9.2.2).
* :func:`encode` builds a message, optionally adding MESSAGE-INTEGRITY and FINGERPRINT;
  :meth:`Message.encode` gives back the exact bytes of a parsed message (padding included).
* :meth:`Message.unknown_required` lists comprehension-required attributes (0x0000-0x7FFF) this codec does not
  understand: a server answers a request having any with 420 and UNKNOWN-ATTRIBUTES (§6.3.1), a client treats
  a success response having any as a failed transaction (§6.3.3). Comprehension-optional ones (0x8000-0xFFFF)
  are kept but otherwise ignored.

Errors: only :class:`StunParseError` (a :class:`tailpy.errors.ParseError`) and its subclasses escape
:func:`parse`, whatever the input (Hypothesis-fuzzed in ``tests/unit/test_stun.py``).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import ipaddress
import os
import stringprep
import struct
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from tailpy.errors import ParseError

MAGIC_COOKIE = 0x2112A442
"""RFC 8489 §5: fixed value at bytes 4-7 of every RFC 5389/8489 message."""
COOKIE_BYTES = struct.pack(">I", MAGIC_COOKIE)
HEADER_LEN = 20
TXID_LEN = 12
FINGERPRINT_XOR = 0x5354554E
"""RFC 8489 §14.7: CRC-32 of the message is XORed with this ("STUN")."""
MAX_MESSAGE_LEN = 0xFFFF + HEADER_LEN

BINDING = 0x001
"""The Binding method (RFC 8489 §18.2), the only one tailpy uses."""


class MessageClass(IntEnum):
    """The 2-bit class of a message (RFC 8489 §5)."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


# Attribute types (RFC 8489 §18.3, RFC 8445 §16.1, RFC 5780 §7)
MAPPED_ADDRESS = 0x0001
CHANGE_REQUEST = 0x0003  # RFC 5780; RFC 3489 clients (stun-client) send it
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
REALM = 0x0014
NONCE = 0x0015
MESSAGE_INTEGRITY_SHA256 = 0x001C
PASSWORD_ALGORITHM = 0x001D
USERHASH = 0x001E
XOR_MAPPED_ADDRESS = 0x0020
PRIORITY = 0x0024
USE_CANDIDATE = 0x0025
PASSWORD_ALGORITHMS = 0x8002
ALTERNATE_DOMAIN = 0x8003
XOR_MAPPED_ADDRESS_OLD = 0x8020  # pre-RFC 5389 drafts; some servers still send it
SOFTWARE = 0x8022
ALTERNATE_SERVER = 0x8023
FINGERPRINT = 0x8028
ICE_CONTROLLED = 0x8029
ICE_CONTROLLING = 0x802A

UNDERSTOOD = frozenset(
    {
        MAPPED_ADDRESS,
        USERNAME,
        MESSAGE_INTEGRITY,
        ERROR_CODE,
        UNKNOWN_ATTRIBUTES,
        REALM,
        NONCE,
        MESSAGE_INTEGRITY_SHA256,
        PASSWORD_ALGORITHM,
        USERHASH,
        XOR_MAPPED_ADDRESS,
        PRIORITY,
        USE_CANDIDATE,
    }
)
"""Comprehension-required types (< 0x8000) this codec understands; any other such type in a message is
"unknown" (:meth:`Message.unknown_required`). CHANGE-REQUEST is not here: a server that cannot change its
address or port must answer 420 to it (RFC 5780 §6.1), which :mod:`tailpy.derp.stun_server` does unless its
flags are zero."""

ERROR_REASONS = {
    300: "Try Alternate",
    400: "Bad Request",
    401: "Unauthenticated",
    420: "Unknown Attribute",
    438: "Stale Nonce",
    500: "Server Error",
}
"""Reason phrases RFC 8489 §14.8 suggests."""

_HDR = struct.Struct(">HHI12s")
_TL = struct.Struct(">HH")


class StunParseError(ParseError):
    """Bytes are not a well-formed STUN message (RFC 8489 §5, §14)."""


class FingerprintError(StunParseError):
    """A FINGERPRINT attribute does not match the message's CRC-32 (RFC 8489 §14.7): drop the message."""


@dataclass(frozen=True)
class Attribute:
    """One TLV attribute: u16 ``type`` and its ``value`` (unpadded). ``pad``: the padding bytes it arrived
    with (kept so that :meth:`Message.encode` reproduces a parsed message exactly; not compared)."""

    type: int
    value: bytes
    pad: bytes = field(default=b"", compare=False, repr=False)

    @property
    def comprehension_required(self) -> bool:
        """True for types 0x0000-0x7FFF (RFC 8489 §14)."""
        return self.type < 0x8000


Address = tuple[str, int]
"""(IP address text, UDP port): ("192.0.2.1", 32853), ("2001:db8::1", 3478)."""


@dataclass(frozen=True)
class Message:
    """A parsed or to-be-encoded STUN message.

    ``method`` 12-bit (1 = Binding), ``cls`` the class, ``txid`` 12 bytes, ``attributes`` in wire order.
    ``cookie`` is the magic cookie, or for an RFC 3489 message (parsed with ``allow_rfc3489``) the first four
    bytes of its 16-byte transaction id. ``raw`` holds the bytes it was parsed from (empty for a built one).
    """

    method: int
    cls: MessageClass
    txid: bytes
    attributes: tuple[Attribute, ...] = ()
    cookie: int = MAGIC_COOKIE
    raw: bytes = field(default=b"", compare=False, repr=False)
    # index of MESSAGE-INTEGRITY in ``attributes`` and its byte offset in ``raw`` (parsed messages)
    _integrity_at: tuple[int, int] | None = field(default=None, compare=False, repr=False)

    # -- attribute access -----------------------------------------------------------------------------

    @property
    def is_rfc3489(self) -> bool:
        """True when the cookie is not RFC 5389's: a classic RFC 3489 client sent it (RFC 8489 §12)."""
        return self.cookie != MAGIC_COOKIE

    def get(self, attr_type: int) -> bytes | None:
        """Value of the first attribute of ``attr_type`` that counts (not after MESSAGE-INTEGRITY, except
        FINGERPRINT and MESSAGE-INTEGRITY-SHA256), or None."""
        for a in self._counted():
            if a.type == attr_type:
                return a.value
        return None

    def _counted(self) -> Iterable[Attribute]:
        if self._integrity_at is None:
            return self.attributes
        cut = self._integrity_at[0] + 1
        tail = (a for a in self.attributes[cut:] if a.type in (FINGERPRINT, MESSAGE_INTEGRITY_SHA256))
        return (*self.attributes[:cut], *tail)

    def unknown_required(self) -> list[int]:
        """Comprehension-required attribute types (0x0000-0x7FFF) not in :data:`UNDERSTOOD`, in order,
        without repeats (RFC 8489 §6.3.1, §7.3.3)."""
        out: list[int] = []
        for a in self._counted():
            if a.comprehension_required and a.type not in UNDERSTOOD and a.type not in out:
                out.append(a.type)
        return out

    @property
    def mapped_address(self) -> Address | None:
        """The reflexive address: XOR-MAPPED-ADDRESS (RFC 8489 §14.2), else the old 0x8020 form, else
        MAPPED-ADDRESS (§14.1), else None."""
        for t in (XOR_MAPPED_ADDRESS, XOR_MAPPED_ADDRESS_OLD):
            v = self.get(t)
            if v is not None:
                return _decode_address(v, self.txid, xor=True)
        v = self.get(MAPPED_ADDRESS)
        return None if v is None else _decode_address(v, self.txid, xor=False)

    @property
    def software(self) -> str | None:
        """SOFTWARE (§14.14) as text (invalid UTF-8 replaced), or None."""
        v = self.get(SOFTWARE)
        return None if v is None else v.decode("utf-8", "replace")

    @property
    def username(self) -> str | None:
        v = self.get(USERNAME)
        return None if v is None else v.decode("utf-8", "replace")

    @property
    def error(self) -> tuple[int, str] | None:
        """ERROR-CODE (§14.8) as (code 300-699, reason phrase), or None."""
        v = self.get(ERROR_CODE)
        return None if v is None else _decode_error(v)

    @property
    def unknown_attributes(self) -> list[int]:
        """UNKNOWN-ATTRIBUTES (§14.9): the types a 420 response lists; [] when absent."""
        v = self.get(UNKNOWN_ATTRIBUTES)
        return [] if v is None else _decode_unknown(v)

    @property
    def has_fingerprint(self) -> bool:
        """True when the message ended with a FINGERPRINT (which :func:`parse` verified)."""
        return bool(self.attributes) and self.attributes[-1].type == FINGERPRINT

    @property
    def has_integrity(self) -> bool:
        return self._integrity_at is not None

    def verify_integrity(self, key: bytes) -> bool:
        """True when MESSAGE-INTEGRITY (HMAC-SHA1 over the message up to it, with the header length
        counting up to its end; RFC 8489 §14.5) matches ``key``. False when absent or wrong."""
        if self._integrity_at is None or not self.raw:
            return False
        index, offset = self._integrity_at
        expected = self.attributes[index].value
        return hmac.compare_digest(_integrity(self.raw[:offset], key), expected)

    # -- encoding -------------------------------------------------------------------------------------

    def encode(self) -> bytes:
        """The message's bytes with its attributes as they are (padding bytes as parsed, else zero)."""
        body = b"".join(_attr_bytes(a) for a in self.attributes)
        return _header(self.method, self.cls, len(body), self.txid, self.cookie) + body


def new_txid() -> bytes:
    """A random 12-byte transaction id (RFC 8489 §6: uniformly random, from a CSPRNG)."""
    return os.urandom(TXID_LEN)


def encode(
    method: int,
    cls: MessageClass,
    txid: bytes,
    attributes: Sequence[Attribute] = (),
    *,
    integrity_key: bytes | None = None,
    fingerprint: bool = False,
    cookie: int = MAGIC_COOKIE,
) -> bytes:
    """Build a message: ``attributes`` (zero padding unless an attribute carries its own ``pad``), then
    MESSAGE-INTEGRITY with ``integrity_key`` when given (§14.5), then FINGERPRINT when asked (§14.7).

    Raises ValueError for a txid that is not 12 bytes, a method over 12 bits, or an attribute value over
    65535 bytes (programming errors, not network input)."""
    if len(txid) != TXID_LEN:
        raise ValueError(f"STUN transaction id must be {TXID_LEN} bytes, not {len(txid)}")
    if not 0 <= method < 0x1000:
        raise ValueError(f"STUN method {method:#x} does not fit in 12 bits")
    body = b"".join(_attr_bytes(a) for a in attributes)
    if integrity_key is not None:
        head = _header(method, cls, len(body) + 24, txid, cookie)
        body += _attr_bytes(Attribute(MESSAGE_INTEGRITY, _integrity(head + body, integrity_key)))
    if fingerprint:
        head = _header(method, cls, len(body) + 8, txid, cookie)
        crc = binascii.crc32(head + body) ^ FINGERPRINT_XOR
        body += _attr_bytes(Attribute(FINGERPRINT, struct.pack(">I", crc)))
    if len(body) > 0xFFFF:
        raise ValueError("STUN message too long")
    return _header(method, cls, len(body), txid, cookie) + body


def binding_request(
    txid: bytes | None = None, *, software: str | None = None, fingerprint: bool = True
) -> tuple[bytes, bytes]:
    """A Binding request: (txid, bytes). A new random txid unless given; SOFTWARE when given;
    FINGERPRINT by default (some servers, Tailscale's among them, ignore requests without one)."""
    txid = txid or new_txid()
    attrs = [software_attr(software)] if software else []
    return txid, encode(BINDING, MessageClass.REQUEST, txid, attrs, fingerprint=fingerprint)


def software_attr(text: str) -> Attribute:
    """SOFTWARE (§14.14): UTF-8, cut to at most 763 bytes (on a character boundary)."""
    raw = text.encode()[:763]
    return Attribute(SOFTWARE, raw.decode("utf-8", "ignore").encode())


def address_attr(addr: Address, txid: bytes, *, xor: bool = True, cookie: int = MAGIC_COOKIE) -> Attribute:
    """XOR-MAPPED-ADDRESS (§14.2) or, with ``xor=False``, MAPPED-ADDRESS (§14.1) for ``addr``. An
    IPv4-mapped IPv6 address (::ffff:a.b.c.d) is written as IPv4. Raises ValueError for a bad address."""
    ip = ipaddress.ip_address(addr[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    port = addr[1]
    if not 0 <= port < 65536:
        raise ValueError(f"port {port} out of range")
    family = 0x01 if ip.version == 4 else 0x02
    raw_ip = ip.packed
    if xor:
        port ^= MAGIC_COOKIE >> 16
        mask = struct.pack(">I", cookie) + txid
        raw_ip = bytes(b ^ m for b, m in zip(raw_ip, mask, strict=False))
    return Attribute(
        XOR_MAPPED_ADDRESS if xor else MAPPED_ADDRESS, struct.pack(">BBH", 0, family, port) + raw_ip
    )


def error_attr(code: int, reason: str | None = None) -> Attribute:
    """ERROR-CODE (§14.8): ``code`` 300-699, ``reason`` (default: RFC 8489's phrase)."""
    if not 300 <= code <= 699:
        raise ValueError(f"STUN error code {code} is not within 300-699")
    text = (reason if reason is not None else ERROR_REASONS.get(code, "Error")).encode()[:763]
    return Attribute(ERROR_CODE, struct.pack(">HBB", 0, code // 100, code % 100) + text)


def unknown_attributes_attr(types: Iterable[int]) -> Attribute:
    """UNKNOWN-ATTRIBUTES (§14.9) listing ``types`` (u16 each)."""
    return Attribute(UNKNOWN_ATTRIBUTES, b"".join(struct.pack(">H", t) for t in types))


def short_term_key(password: str) -> bytes:
    """MESSAGE-INTEGRITY key for short-term credentials: OpaqueString(password) as UTF-8 (§9.1.1)."""
    return _opaque_string(password).encode()


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """MESSAGE-INTEGRITY key for long-term credentials, MD5 algorithm:
    MD5(username ":" OpaqueString(realm) ":" OpaqueString(password)) (§9.2.2; RFC 5769 §2.4 applies
    SASLprep, which gives the same result for its vector)."""
    text = f"{username}:{_opaque_string(realm)}:{_opaque_string(password)}"
    return hashlib.md5(text.encode(), usedforsecurity=False).digest()


def is_stun(data: bytes) -> bool:
    """Cheap test, as the data plane's demultiplexer does: at least 20 bytes, top two bits zero, the magic
    cookie at offset 4."""
    return len(data) >= HEADER_LEN and data[0] & 0xC0 == 0 and data[4:8] == COOKIE_BYTES


def parse(data: bytes, *, allow_rfc3489: bool = False, verify_fingerprint: bool = True) -> Message:
    """Parse one STUN message (one UDP datagram).

    Checks (RFC 8489 §6.3): at least 20 bytes; the top two bits zero; a length that is a multiple of 4 and
    equals the bytes after the header; the magic cookie (unless ``allow_rfc3489``: then any value, for
    classic RFC 3489 clients, kept in :attr:`Message.cookie`); attributes that fit exactly; FINGERPRINT, when
    present, last and correct (else :class:`FingerprintError`; ``verify_fingerprint=False`` skips only the
    CRC comparison, for diagnostics); known attributes well-formed (addresses,
    ERROR-CODE, UNKNOWN-ATTRIBUTES, MESSAGE-INTEGRITY's 20 bytes).

    Raises :class:`StunParseError` (or :class:`FingerprintError`), nothing else."""
    data = bytes(data)
    if len(data) < HEADER_LEN:
        raise StunParseError(f"STUN message too short ({len(data)} bytes, header is {HEADER_LEN})")
    mtype, length, cookie, txid = _HDR.unpack_from(data)
    if mtype & 0xC000:
        raise StunParseError("not a STUN message: the first two bits are not zero")
    if cookie != MAGIC_COOKIE and not allow_rfc3489:
        raise StunParseError(f"not a STUN message: magic cookie {cookie:#010x}")
    if length % 4:
        raise StunParseError(f"STUN message length {length} is not a multiple of 4")
    if length != len(data) - HEADER_LEN:
        raise StunParseError(f"STUN length field says {length} bytes, datagram has {len(data) - HEADER_LEN}")
    method = (mtype & 0x000F) | ((mtype & 0x00E0) >> 1) | ((mtype & 0x3E00) >> 2)
    cls = MessageClass(((mtype >> 4) & 0x1) | ((mtype >> 7) & 0x2))
    attrs: list[Attribute] = []
    integrity_at: tuple[int, int] | None = None
    pos = HEADER_LEN
    while pos < len(data):
        if len(data) - pos < 4:
            raise StunParseError("STUN attribute header cut short")
        atype, alen = _TL.unpack_from(data, pos)
        start = pos + 4
        end = start + alen
        padded = start + (alen + 3) // 4 * 4
        if padded > len(data):
            raise StunParseError(f"STUN attribute {atype:#06x} of {alen} bytes runs past the message")
        attr = Attribute(atype, data[start:end], data[end:padded])
        if atype == FINGERPRINT:
            if padded != len(data):
                raise StunParseError("STUN FINGERPRINT is not the last attribute")
            if alen != 4:
                raise StunParseError(f"STUN FINGERPRINT must be 4 bytes, not {alen}")
            crc = binascii.crc32(data[:pos]) ^ FINGERPRINT_XOR
            if verify_fingerprint and struct.pack(">I", crc) != attr.value:
                raise FingerprintError("STUN FINGERPRINT does not match the message: dropped")
        elif atype == MESSAGE_INTEGRITY and integrity_at is None:
            if alen != 20:
                raise StunParseError(f"STUN MESSAGE-INTEGRITY must be 20 bytes, not {alen}")
            integrity_at = (len(attrs), pos)
        attrs.append(attr)
        pos = padded
    msg = Message(method, cls, txid, tuple(attrs), cookie, data, integrity_at)
    # Decode the attributes that count, so that a parsed message's accessors never raise.
    for a in msg._counted():
        if a.type in (MAPPED_ADDRESS, XOR_MAPPED_ADDRESS, XOR_MAPPED_ADDRESS_OLD):
            _decode_address(a.value, txid, xor=a.type != MAPPED_ADDRESS)
        elif a.type == ERROR_CODE:
            _decode_error(a.value)
        elif a.type == UNKNOWN_ATTRIBUTES:
            _decode_unknown(a.value)
    return msg


# -- internals ----------------------------------------------------------------------------------------


def _header(method: int, cls: MessageClass, length: int, txid: bytes, cookie: int) -> bytes:
    c = int(cls)
    mtype = (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2)
    mtype |= ((c & 0x1) << 4) | ((c & 0x2) << 7)
    return _HDR.pack(mtype, length, cookie, txid)


def _attr_bytes(a: Attribute) -> bytes:
    n = len(a.value)
    if n > 0xFFFF:
        raise ValueError(f"STUN attribute {a.type:#06x} value too long ({n} bytes)")
    pad_len = -n % 4
    pad = a.pad if len(a.pad) == pad_len else bytes(pad_len)
    return _TL.pack(a.type, n) + a.value + pad


def _integrity(before: bytes, key: bytes) -> bytes:
    """HMAC-SHA1 over ``before`` (header + attributes preceding MESSAGE-INTEGRITY) with the header's
    length set as if the message ended right after MESSAGE-INTEGRITY."""
    length = len(before) - HEADER_LEN + 24
    adjusted = before[:2] + struct.pack(">H", length) + before[4:]
    return hmac.new(key, adjusted, hashlib.sha1).digest()


def _decode_address(v: bytes, txid: bytes, *, xor: bool) -> Address:
    if len(v) < 4:
        raise StunParseError("STUN address attribute shorter than 4 bytes")
    family = v[1]
    (port,) = struct.unpack_from(">H", v, 2)
    raw = v[4:]
    if (family == 0x01 and len(raw) == 4) or (family == 0x02 and len(raw) == 16):
        pass
    else:
        raise StunParseError(f"STUN address attribute: family {family:#04x} with {len(raw)} address bytes")
    if xor:
        port ^= MAGIC_COOKIE >> 16
        mask = COOKIE_BYTES + txid
        raw = bytes(b ^ m for b, m in zip(raw, mask, strict=False))
    ip = ipaddress.IPv4Address(raw) if family == 0x01 else ipaddress.IPv6Address(raw)
    return str(ip), port


def _decode_error(v: bytes) -> tuple[int, str]:
    if len(v) < 4:
        raise StunParseError("STUN ERROR-CODE shorter than 4 bytes")
    klass, number = v[2] & 0x07, v[3]
    if not 3 <= klass <= 6 or number > 99:
        raise StunParseError(f"STUN ERROR-CODE class {klass} number {number} is out of range")
    return klass * 100 + number, v[4:].decode("utf-8", "replace")


def _decode_unknown(v: bytes) -> list[int]:
    if len(v) % 2:
        raise StunParseError("STUN UNKNOWN-ATTRIBUTES has an odd length")
    return [t for (t,) in struct.iter_unpack(">H", v)]


def _opaque_string(text: str) -> str:
    """RFC 8265 OpaqueString, close enough for credentials: non-ASCII spaces become U+0020, characters
    that SASLprep maps to nothing (soft hyphen, zero-width joiners) go, then NFKC (SASLprep's
    normalization; RFC 5769 §2.4's vector needs it)."""
    out = []
    for ch in text:
        if stringprep.in_table_b1(ch):
            continue
        out.append(" " if stringprep.in_table_c12(ch) else ch)
    return unicodedata.normalize("NFKC", "".join(out))


__all__ = [
    "BINDING",
    "ERROR_CODE",
    "FINGERPRINT",
    "MAGIC_COOKIE",
    "MAPPED_ADDRESS",
    "MESSAGE_INTEGRITY",
    "SOFTWARE",
    "UNDERSTOOD",
    "UNKNOWN_ATTRIBUTES",
    "XOR_MAPPED_ADDRESS",
    "Address",
    "Attribute",
    "FingerprintError",
    "Message",
    "MessageClass",
    "StunParseError",
    "address_attr",
    "binding_request",
    "encode",
    "error_attr",
    "is_stun",
    "long_term_key",
    "new_txid",
    "parse",
    "short_term_key",
    "software_attr",
    "unknown_attributes_attr",
]
