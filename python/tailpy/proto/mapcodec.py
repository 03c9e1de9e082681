"""Compact map stream messages: zstd frames and peer field patches (sans-IO, both sides).

A client that can read them says so in its map request (``"accept": ["zstd", "patches", "frames",
"derp_map"]``, see :mod:`tailpy.control.mapper` for the stream they change); a client that does not gets
plain JSON, as before.

* ``zstd`` (RFC 8878, through the ``zstandard`` package; Tailscale compresses its MapResponses the same way):
  the sealed plaintext of a message may be one or more concatenated zstd frames instead of the JSON object;
  their decompressed contents, concatenated, are that JSON object (RFC 8878 section 3.1: a decoder reads
  frames one after another). A plaintext that starts with ``{`` is plain JSON (small messages stay plain).
  Frames are compressed before sealing (a box of random-looking bytes does not compress). Every frame must
  carry its content size (``Frame_Content_Size``), so that the opener bounds the output before it inflates
  anything. Concatenation lets the server compress a block of peer records once and send the same frame to
  every stream that sees those peers.
* ``patches``: a delta may carry ``"peers_patched": [{"id": N, field: value, ...}]``: for a peer the
  client already holds, only the fields of its record that changed (Tailscale's
  ``tailcfg.PeerChange`` / ``MapResponse.PeersChangedPatch``), in :meth:`tailpy.netmap.Node.to_json`'s
  names and forms; a field that went back to its default is sent with that default (``null``, ``[]``,
  ``false``, ``0``, ``""``).
* ``frames``: the stream is framed in binary, each sealed message a 4-byte big-endian length and the raw
  nonce + ciphertext, instead of one base64 line per message; the server says it granted this with the
  response's ``Content-Type: application/x-tailpy-frames`` (:mod:`tailpy.proto.control`,
  :class:`~tailpy.proto.control.FrameReader`).
* ``derp_map``: a delta may carry ``"derp_map"`` (the server's new DERP map, replacing the client's), so a
  DERP map change is one small delta, not a full netmap per stream; and the client may resume its stream on
  another control replica of the same database (the first delta then carries that replica's DERP map).

When the ``zstandard`` package is missing, :data:`ZSTD` is False: the server compresses nothing and the
client does not ask for it (plain JSON, as an old client).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tailpy.errors import ParseError

try:
    import zstandard
except ImportError:  # pragma: no cover - the package is a dependency; without it streams stay plain JSON
    zstandard = None  # type: ignore[assignment]

ZSTD = zstandard is not None
"""Whether zstd frames can be made and read here."""

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
"""The first four bytes of a zstd frame (RFC 8878 3.1.1, ``Magic_Number`` 0xFD2FB528, little-endian)."""

LEVEL = 1
"""Compression level: zstd's fastest standard level. At 10,000 peers a netmap's records shrink about 5 times
(most of what is left is the keys' entropy); higher levels save a few percent for several times the CPU."""

MIN_COMPRESS = 512
"""Bytes below which a message is sent as plain JSON even on a zstd stream."""

FEATURES = ("zstd", "patches", "frames", "derp_map")
"""What a map request's ``accept`` may name (``derp_map``: the client applies a DERP map carried by a delta,
:class:`tailpy.netmap.MapDelta`, so a new DERP map or a stream resumed on another control replica needs no
full netmap)."""

_ZERO: dict[str, Any] = {
    "endpoints": [],
    "online": False,
    "last_seen": None,
    "user": "",
    "tags": [],
    "os": "",
    "key_expiry": None,
    "expired": False,
    "home_derp": 0,
    "disco_key": None,
    "name_by_admin": False,
    "allowed_ips": None,
    "primary_routes": [],
    "routable_ips": [],
    "approved_routes": [],
}
"""The value a record field takes when it is absent (what :meth:`tailpy.netmap.Node.from_json` assumes)."""


_compressor: Any = None


def compress(data: bytes) -> bytes:
    """One zstd frame of ``data`` (content size in its header). Raises RuntimeError without ``zstandard``."""
    global _compressor
    if zstandard is None:
        raise RuntimeError("zstd compression needs the zstandard package")
    if _compressor is None:
        _compressor = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True)
    return bytes(_compressor.compress(data))


def is_compressed(plaintext: bytes) -> bool:
    return plaintext[:4] == ZSTD_MAGIC


def decompress(data: bytes, limit: int) -> bytes:
    """The concatenated contents of the zstd frames in ``data``. Raises ParseError when a frame is malformed,
    has no content size in its header, or the contents would exceed ``limit`` bytes (checked from the
    headers before inflating each frame). Each frame is found by walking its block headers (RFC 8878
    section 3.1.1.2) and inflated in one call."""
    if zstandard is None:
        raise ParseError("a map message is zstd-compressed but the zstandard package is not installed")
    d = zstandard.ZstdDecompressor()
    view = memoryview(data)
    out: list[bytes] = []
    total = pos = 0
    try:
        while pos < len(view):
            frame = view[pos:]
            size = zstandard.frame_content_size(frame)
            if size < 0:
                raise ParseError("a zstd frame in a map message does not give its content size")
            total += size
            if total > limit:
                raise ParseError(f"a compressed map message inflates to more than {limit} bytes")
            end = pos + _frame_length(frame)
            chunk = d.decompress(view[pos:end])
            if len(chunk) != size:
                raise ParseError("a zstd frame in a map message does not match its content size")
            out.append(chunk)
            pos = end
    except zstandard.ZstdError as e:
        raise ParseError(f"a map message is not valid zstd: {e}") from None
    return out[0] if len(out) == 1 else b"".join(out)


def _frame_length(frame: memoryview) -> int:
    """Bytes of the zstd frame at the start of ``frame``: its header, its blocks (each a 3-byte header:
    ``Last_Block``, ``Block_Type``, ``Block_Size``; an RLE block holds one byte), and the 4-byte checksum
    when its header says so. Raises ParseError when ``frame`` is shorter."""
    if bytes(frame[:4]) != ZSTD_MAGIC:
        raise ParseError("a map message holds something other than zstd frames")
    pos = zstandard.frame_header_size(frame)
    checksum = frame[4] & 0x04
    while True:
        if pos + 3 > len(frame):
            raise ParseError("a zstd frame in a map message is truncated")
        header = frame[pos] | frame[pos + 1] << 8 | frame[pos + 2] << 16
        kind = header >> 1 & 3
        if kind == 3:
            raise ParseError("a zstd frame in a map message has a reserved block type")
        pos += 3 + (1 if kind == 1 else header >> 3)
        if header & 1:
            break
    pos += 4 if checksum else 0
    if pos > len(frame):
        raise ParseError("a zstd frame in a map message is truncated")
    return pos


def compact_record(full: Mapping[str, Any]) -> dict[str, Any]:
    """``full`` (a :meth:`tailpy.netmap.Node.to_json` object) without the fields at their defaults (absent
    fields read back as defaults): a third smaller for a typical peer."""
    return {k: v for k, v in full.items() if k not in _ZERO or v != _ZERO[k]}


def patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any] | None:
    """The field patch from record ``old`` to record ``new`` (both :meth:`tailpy.netmap.Node.to_json`
    objects, full or compact, of the same node): ``{"id": id, field: new value, ...}`` with the fields
    that differ; None when ``id``, ``node_key`` or ``machine_key`` differ (send the whole record) or when
    nothing does."""
    if old.get("id") != new.get("id"):
        return None
    out: dict[str, Any] = {"id": new["id"]}
    for k in new.keys() | old.keys():
        a = old.get(k, _ZERO.get(k))
        b = new.get(k, _ZERO.get(k))
        if a != b:
            if k in ("node_key", "machine_key"):
                return None
            out[k] = b
    return out if len(out) > 1 else None


def apply_patch(record: Mapping[str, Any], p: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with patch ``p``'s fields replacing its own (the ``id`` must match). Raises ParseError."""
    if p.get("id") != record.get("id"):
        raise ParseError(f"a peer patch for node {p.get('id')!r} applied to node {record.get('id')!r}")
    return {**record, **p}


def accepted(value: object) -> frozenset[str]:
    """The features a map request's ``accept`` names that this side knows (others are ignored; zstd only
    when it can be made here). Raises ParseError when ``accept`` is not a list of strings."""
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ParseError("'accept' must be a list of strings")
    return frozenset(v for v in value if v in FEATURES and (v != "zstd" or ZSTD))


def offered() -> list[str]:
    """What a client puts in its map request's ``accept``."""
    return [f for f in FEATURES if f != "zstd" or ZSTD]


__all__ = [
    "FEATURES",
    "LEVEL",
    "MIN_COMPRESS",
    "ZSTD",
    "ZSTD_MAGIC",
    "accepted",
    "apply_patch",
    "compact_record",
    "compress",
    "decompress",
    "is_compressed",
    "offered",
    "patch",
]
