"""The SOCKS5 and HTTP proxies into the tailnet (tailpy.proxy): the SOCKS5 codec against RFC 1928's layouts
and fuzzed, and both proxies end to end on 127.0.0.1 with curl (--socks5-hostname, --proxy, --proxytunnel)
into a tailnet of two tailpy.Nodes on a stand-in userspace data plane."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from _userspace_device import FakeNet
from hypothesis import given
from hypothesis import strategies as st

import tailpy
from tailpy.control import ControlServer, Store
from tailpy.errors import ParseError
from tailpy.proxy import (
    CMD_CONNECT,
    encode_reply,
    encode_request,
    greeting_size,
    parse_greeting,
    parse_listen,
    parse_request,
    request_size,
    split_authority,
    start_http_proxy,
    start_socks5,
)

# -- the SOCKS5 codec ----------------------------------------------------------------------------------------


def test_socks5_layouts() -> None:
    # RFC 1928 section 3: VER NMETHODS METHODS
    assert greeting_size(b"\x05") == 2 and greeting_size(b"\x05\x02") == 4
    assert parse_greeting(b"\x05\x02\x00\x02") == {0, 2}
    # section 4: VER CMD RSV ATYP DST.ADDR DST.PORT
    v4 = b"\x05\x01\x00\x01\xc0\x00\x02\x01\x00\x50"
    assert request_size(v4[:4]) == len(v4)
    r = parse_request(v4)
    assert (r.command, r.host, r.port) == (CMD_CONNECT, "192.0.2.1", 80)
    name = b"\x05\x01\x00\x03\x04beta\x1f\x90"
    assert request_size(name[:4]) == 5 and request_size(name[:5]) == len(name)
    assert parse_request(name).host == "beta" and parse_request(name).port == 8080
    v6 = encode_request(CMD_CONNECT, "fd7a:115c:a1e0::2", 22)
    assert len(v6) == 22 and parse_request(v6).host == "fd7a:115c:a1e0::2"
    # section 6: VER REP RSV ATYP BND.ADDR BND.PORT
    assert encode_reply(0, ("100.64.0.1", 1080)) == b"\x05\x00\x00\x01\x64\x40\x00\x01\x04\x38"
    assert encode_reply(5) == b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"
    for bad in (b"\x04\x01\x00\x01", b"\x05\x01\x00\x02"):
        with pytest.raises(ParseError):
            request_size(bad)


@given(
    st.sampled_from([1, 2, 3]),
    st.one_of(st.ip_addresses().map(str), st.from_regex(r"[a-z0-9.-]{1,60}", fullmatch=True)),
    st.integers(0, 65535),
)
def test_socks5_request_round_trip(command: int, host: str, port: int) -> None:
    wire = encode_request(command, host, port)
    assert request_size(wire[:4]) <= len(wire) and request_size(wire) == len(wire)
    r = parse_request(wire)
    assert (r.command, r.host, r.port) == (command, host, port)


@given(st.binary(max_size=300))
def test_socks5_parsers_raise_only_parse_error(data: bytes) -> None:
    for size, parse in ((greeting_size, parse_greeting), (request_size, parse_request)):
        try:
            n = size(data)
            if n == len(data):
                parse(data)
        except ParseError:
            pass


def test_addresses() -> None:
    assert parse_listen("127.0.0.1:1080") == ("127.0.0.1", 1080)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    assert parse_listen(":1080") == ("", 1080)
    assert split_authority("beta:80", None) == ("beta", 80)
    assert split_authority("[fd7a:115c:a1e0::2]:443", None) == ("fd7a:115c:a1e0::2", 443)
    assert split_authority("beta", 80) == ("beta", 80)
    for bad in ("1080", "host:port", "h:99999"):
        with pytest.raises(ParseError):
            parse_listen(bad)
    with pytest.raises(ParseError):
        split_authority("beta", None)


# -- end to end ----------------------------------------------------------------------------------------------


@pytest.fixture
async def tailnet(tmp_path: Path) -> AsyncIterator[tuple[tailpy.Node, tailpy.Node]]:
    (tmp_path / "control").mkdir()
    store = Store(tmp_path / "control")
    srv = ControlServer(store, keepalive=0.5, poll_interval=0.2)
    host, port = await srv.start("127.0.0.1", 0)
    url = f"http://{host}:{port}"
    key = store.create_auth_key(reusable=True, expires=None, now=time.time()).key
    net = FakeNet()
    a = tailpy.Node(
        control_url=url, auth_key=key, state_dir=tmp_path / "a", hostname="alpha", device_factory=net.factory
    )
    b = tailpy.Node(
        control_url=url, auth_key=key, state_dir=tmp_path / "b", hostname="beta", device_factory=net.factory
    )
    async with a, b:
        for _ in range(100):
            if (await a.status()).peers:
                break
            await asyncio.sleep(0.05)
        yield a, b
    await srv.stop()
    store.close()


async def _web(node: tailpy.Node) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        line = head.split(b"\r\n")[0]
        body = b"hello from beta: " + line + b"\n"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    await node.start_server(handle, port=80)


async def _curl(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--max-time",
        "10",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, (out + err).decode()


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_socks5_with_curl(tailnet: tuple[tailpy.Node, tailpy.Node]) -> None:
    a, b = tailnet
    await _web(b)
    proxy = await start_socks5("127.0.0.1:0", a.open_connection)
    try:
        socks = "{}:{}".format(*proxy.address)
        rc, out = await _curl("--socks5-hostname", socks, "http://beta/hi")
        assert rc == 0 and out == "hello from beta: GET /hi HTTP/1.1\n"
        rc, out = await _curl("--socks5-hostname", socks, f"http://{b.addresses[0]}/")
        assert rc == 0 and "hello from beta" in out
        rc, out = await _curl("--socks5-hostname", socks, "http://beta:81/")  # nothing listens: refused
        assert rc != 0 and "(5)" in out  # reply 0x05, connection refused
        rc, out = await _curl("--socks5-hostname", socks, "http://gamma/")  # no such node
        assert rc != 0 and "(4)" in out  # reply 0x04, host unreachable
    finally:
        await proxy.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_http_proxy_with_curl(tailnet: tuple[tailpy.Node, tailpy.Node]) -> None:
    a, b = tailnet
    await _web(b)
    proxy = await start_http_proxy("127.0.0.1:0", a.open_connection)
    try:
        url = "http://{}:{}".format(*proxy.address)
        rc, out = await _curl("--proxy", url, "http://beta/plain?q=1")
        assert rc == 0 and out == "hello from beta: GET /plain?q=1 HTTP/1.1\n"
        rc, out = await _curl("--proxy", url, "--proxytunnel", "http://beta/tunnel")  # CONNECT beta:80
        assert rc == 0 and out == "hello from beta: GET /tunnel HTTP/1.1\n"
        rc, out = await _curl("--proxy", url, "-w", "%{http_code}", "-o", "/dev/null", "http://gamma/")
        assert out.strip() == "502"
        rc, out = await _curl("--proxy", url, "-d", "x=1", "http://beta/post")
        assert rc == 0 and out == "hello from beta: POST /post HTTP/1.1\n"
    finally:
        await proxy.close()
