"""Typed keys and their text forms.

Three kinds of X25519 (Curve25519) key pairs, as in Tailscale:

* **machine key** (``mkey:``): identifies a device to the control server; lasts for the device's life and
  authenticates every control request (NaCl box).
* **node key** (``nodekey:``): the WireGuard static key; rotated before it expires.
* **disco key** (``discokey:``): seals disco messages; new at each start.

Text forms: ``<prefix>:<64 lowercase hex>`` for public keys, ``privkey:<hex>`` for private keys (any kind),
and standard base64 of the 32 bytes as wg(8) writes it.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from tailpy import _native
from tailpy.errors import InvalidKeyError

KEY_LEN = 32

_P = TypeVar("_P", bound="PublicKey")
_K = TypeVar("_K", bound="PrivateKey")


def _check_len(raw: bytes, what: str) -> bytes:
    if not isinstance(raw, (bytes, bytearray)):
        raise InvalidKeyError(f"{what} must be bytes, got {type(raw).__name__}")
    if len(raw) != KEY_LEN:
        raise InvalidKeyError(f"{what} must be {KEY_LEN} bytes, got {len(raw)}")
    return bytes(raw)


def _from_hex(text: str, prefix: str, what: str) -> bytes:
    if not text.startswith(prefix + ":"):
        raise InvalidKeyError(f"{what} must start with '{prefix}:', got {text[:16]!r}")
    body = text[len(prefix) + 1 :]
    if len(body) != 2 * KEY_LEN:
        raise InvalidKeyError(f"{what} must have {2 * KEY_LEN} hex digits after '{prefix}:', got {len(body)}")
    try:
        return bytes.fromhex(body)
    except ValueError:
        raise InvalidKeyError(f"{what} is not hexadecimal after '{prefix}:'") from None


def _from_base64(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKeyError(
            f"{what} is not valid base64 (expected 44 characters as wg(8) writes)"
        ) from None
    return _check_len(raw, what)


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A 32-byte X25519 public key. Subclasses fix the text prefix."""

    raw: bytes
    prefix: ClassVar[str] = "pubkey"
    what: ClassVar[str] = "public key"

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw", _check_len(self.raw, self.what))

    @classmethod
    def from_text(cls: type[_P], text: str) -> _P:
        """Parse ``<prefix>:<hex>``. Raises InvalidKeyError."""
        return cls(_from_hex(text, cls.prefix, cls.what))

    @classmethod
    def from_base64(cls: type[_P], text: str) -> _P:
        """Parse base64 as wg(8) writes it. Raises InvalidKeyError."""
        return cls(_from_base64(text, cls.what))

    def text(self) -> str:
        return f"{self.prefix}:{self.raw.hex()}"

    def base64(self) -> str:
        return base64.b64encode(self.raw).decode()

    def short(self) -> str:
        """The first 8 characters of the base64 form, for logs and tables."""
        return self.base64()[:8]

    def __str__(self) -> str:
        return self.text()


@dataclass(frozen=True, slots=True)
class PrivateKey:
    """A 32-byte X25519 private key; ``public`` gives the matching public key."""

    raw: bytes = b""
    public_type: ClassVar[type[PublicKey]] = PublicKey
    what: ClassVar[str] = "private key"

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw", _check_len(self.raw, self.what))

    @classmethod
    def generate(cls: type[_K]) -> _K:
        return cls(_native.generate_private_key())

    @classmethod
    def from_text(cls: type[_K], text: str) -> _K:
        """Parse ``privkey:<hex>``. Raises InvalidKeyError."""
        return cls(_from_hex(text, "privkey", cls.what))

    @classmethod
    def from_base64(cls: type[_K], text: str) -> _K:
        return cls(_from_base64(text, cls.what))

    @property
    def public(self) -> PublicKey:
        return self.public_type(_native.public_key(self.raw))

    def text(self) -> str:
        return f"privkey:{self.raw.hex()}"

    def base64(self) -> str:
        return base64.b64encode(self.raw).decode()

    def __repr__(self) -> str:  # never print secrets
        return f"{type(self).__name__}(public={self.public.text()})"

    __str__ = __repr__


class MachinePublic(PublicKey):
    prefix = "mkey"
    what = "machine public key"


class NodePublic(PublicKey):
    prefix = "nodekey"
    what = "node public key"


class DiscoPublic(PublicKey):
    prefix = "discokey"
    what = "disco public key"


class MachinePrivate(PrivateKey):
    public_type = MachinePublic
    what = "machine private key"

    @property
    def public(self) -> MachinePublic:
        return MachinePublic(_native.public_key(self.raw))


class NodePrivate(PrivateKey):
    public_type = NodePublic
    what = "node private key"

    @property
    def public(self) -> NodePublic:
        return NodePublic(_native.public_key(self.raw))


class DiscoPrivate(PrivateKey):
    public_type = DiscoPublic
    what = "disco private key"

    @property
    def public(self) -> DiscoPublic:
        return DiscoPublic(_native.public_key(self.raw))


__all__ = [
    "KEY_LEN",
    "DiscoPrivate",
    "DiscoPublic",
    "MachinePrivate",
    "MachinePublic",
    "NodePrivate",
    "NodePublic",
    "PrivateKey",
    "PublicKey",
]
