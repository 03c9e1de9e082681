"""Hostile HTTP requests to control: compressed bodies, control characters meant for the log, malformed
requests (tailpy.httpguard)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tailpy.control import ControlServer, Store
from tailpy.control.apikeys import create_api_key
from tailpy.httpguard import MULTILINE, EscapeControls, escape_controls

SECRET = "tpyapi-0123456789abcdef0123456789abcdef"


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[tuple[int, str]]:
    store = Store(tmp_path)
    srv = ControlServer(store, keepalive=0.5, poll_interval=0.2)
    _, port = await srv.start("127.0.0.1", 0)
    key = create_api_key(store, expiration_seconds=3600, description="t")[1]
    yield port, key
    await srv.stop()
    store.close()


async def raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is; the answer's status, headers (lowercase names) and body."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(request)
    data = await asyncio.wait_for(r.read(), 10)
    w.close()
    await w.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]) if lines[0] else 0, headers, body


def post(path: str, body: bytes, encoding: str, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert "Traceback" not in caplog.text


async def test_compressed_bodies_refused_before_any_handler(
    control: tuple[int, str], caplog: pytest.LogCaptureFixture
) -> None:
    port, key = control
    caplog.set_level(logging.DEBUG)
    bodies = {
        "gzip": b"garbage",
        "deflate": b"garbage",
        "br": b"garbage",
        "x-gzip": gzip.compress(b'{"name": "alice@"}'),
        "DEFLATE": zlib.compress(b"{}"),
    }
    paths = [
        ("/machine/register", ""),
        ("/machine/map", ""),
        ("/machine/update", ""),
        ("/admin/signin", ""),
        ("/admin/machines/1/rename", ""),
        ("/api/v1/users", f"Authorization: Bearer {key}\r\n"),
        ("/api/v1/users", ""),
    ]
    for path, extra in paths:
        for encoding, body in bodies.items():
            status, headers, answer = await raw(port, post(path, body, encoding, extra))
            assert status == 415, (path, encoding, answer)
            assert headers["accept-encoding"] == "identity"
            assert "Content-Encoding" in json.loads(answer)["error"]
    status, _, answer = await raw(
        port, post("/api/v1/users", b'{"name": "bob@"}', "identity", f"Authorization: Bearer {key}\r\n")
    )
    assert status == 200, answer
    no_traceback(caplog)


async def test_request_text_cannot_forge_log_lines(
    control: tuple[int, str], caplog: pytest.LogCaptureFixture
) -> None:
    port, _ = control
    caplog.set_level(logging.DEBUG)
    forged = "2026-12-06 22:30:00,000 tailpy.control.console console: signed in"
    path = "/x%0a" + forged.replace(" ", "%20") + "%0d%00%1b]0;pwned%07"
    ua = "curl/8"  # (aiohttp itself refuses control characters in a header)
    status, _, _ = await raw(
        port, f"GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: {ua}\r\nConnection: close\r\n\r\n".encode()
    )
    assert status == 404
    access = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert access and all(not any(c in m for c in "\n\r\x00\x1b\x07") for m in access), access
    assert any("\\n2026-12-06" in m and "\\x00" in m and "\\x1b]0;pwned\\x07" in m for m in access)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n",
        b"POST /api/v1/users HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"\x16\x03\x01garbage request line\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + SECRET.encode() + b"x" * 9000 + b"\r\n\r\n",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["nul-in-header", "content-length-abc", "garbage-line", "long-authorization", "long-line"],
)
async def test_malformed_requests_log_one_line_without_their_bytes(
    control: tuple[int, str], caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    port, _ = control
    caplog.set_level(logging.DEBUG)
    status, _, _ = await raw(port, request_bytes)
    assert status in (0, 400, 431)
    no_traceback(caplog)
    assert SECRET[:12] not in caplog.text
    refused = [r.getMessage() for r in caplog.records if r.name == "aiohttp.server"]
    assert refused and all(m.startswith("refused a malformed HTTP request from 127.0.0.1") for m in refused)


def test_escape_controls_and_the_log_filter() -> None:
    assert escape_controls("a\nb\r\tc\x00\x1b[0m\x7f\x85\u2028ok é") == (
        "a\\nb\\r\\tc\\x00\\x1b[0m\\x7f\\x85\\u2028ok é"
    )
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "user %s signed in", ("x\ny",), None)
    assert EscapeControls().filter(record)
    assert record.getMessage() == "user x\\ny signed in"
    dump = logging.LogRecord("t", logging.WARNING, __file__, 1, "task %s:\n%s", ("t", "a\nb"), None)
    dump.__dict__[MULTILINE] = True
    assert EscapeControls().filter(dump) and dump.getMessage() == "task t:\na\nb"
