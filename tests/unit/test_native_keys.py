"""The Rust extension's key functions: RFC 7748 vectors and errors raised as tailpy's own classes."""

from __future__ import annotations

import base64

import pytest

from tailpy import _native
from tailpy.errors import InvalidKeyError
from tailpy.keys import NodePrivate

# RFC 7748 §6.1 (Alice), as wg(8) writes keys.
RFC7748_PRIVATE = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo="
RFC7748_PUBLIC = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="


def test_version() -> None:
    assert isinstance(_native.__version__, str)
    assert _native.__version__


def test_rfc7748_vector_native() -> None:
    raw = base64.b64decode(RFC7748_PRIVATE)
    assert base64.b64encode(_native.public_key(raw)).decode() == RFC7748_PUBLIC


def test_rfc7748_vector_via_keys() -> None:
    assert NodePrivate.from_base64(RFC7748_PRIVATE).public.base64() == RFC7748_PUBLIC


def test_generate_private_key_is_clamped_and_random() -> None:
    a = _native.generate_private_key()
    b = _native.generate_private_key()
    assert isinstance(a, bytes)
    assert len(a) == 32
    assert a != b
    assert a[0] & 7 == 0
    assert a[31] & 0x80 == 0
    assert a[31] & 0x40 == 0x40
    assert len(_native.public_key(a)) == 32


@pytest.mark.parametrize("length", [0, 1, 31, 33, 64])
def test_public_key_wrong_length(length: int) -> None:
    with pytest.raises(InvalidKeyError, match=f"private key must be 32 bytes, got {length}"):
        _native.public_key(b"\x01" * length)


def test_invalid_key_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        _native.public_key(b"")
