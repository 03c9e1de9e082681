"""``tailpy._native.Device.userspace``: two userspace devices in one process, each the other's peer over
loopback UDP, with TCP and UDP through both network stacks on the socketpair descriptors they hand out
(asyncio on the descriptors, no root, no TUN), errors, and nothing left behind by ``close``."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from tailpy import _native
from tailpy.errors import ConfigError, DeviceError, DialError

A4, B4 = "100.64.0.1", "100.64.0.2"
A6, B6 = "fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"


def _pair() -> tuple[_native.Device, _native.Device]:
    ka, kb = _native.generate_private_key(), _native.generate_private_key()
    a = _native.Device.userspace(ka, 0, [f"{A4}/32", f"{A6}/128"])
    b = _native.Device.userspace(kb, 0, [f"{B4}/32", f"{B6}/128"])
    a.set_peer(b.public_key, allowed_ips=[f"{B4}/32", f"{B6}/128"], endpoint=f"127.0.0.1:{b.listen_port}")
    b.set_peer(a.public_key, allowed_ips=[f"{A4}/32", f"{A6}/128"], endpoint=f"127.0.0.1:{a.listen_port}")
    return a, b


@pytest.fixture
def pair() -> Iterator[tuple[_native.Device, _native.Device]]:
    a, b = _pair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


async def _serve_echo(dev: _native.Device, listener: int) -> None:
    """Accept connections on ``listener`` and echo each until end-of-stream."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    efd = dev.tcp_accept_fd(listener)
    loop.add_reader(efd, ready.set)
    tasks: set[asyncio.Task[None]] = set()

    async def echo(fd: int) -> None:
        reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    try:
        while True:
            await ready.wait()
            ready.clear()
            while (conn := dev.tcp_accept(listener)) is not None:
                fd, _ip, _port = conn
                task = asyncio.create_task(echo(fd))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    finally:
        loop.remove_reader(efd)
        for t in list(tasks):
            t.cancel()


@pytest.mark.parametrize("dst", [B4, B6])
async def test_tcp_echo_through_two_stacks(pair: tuple[_native.Device, _native.Device], dst: str) -> None:
    a, b = pair
    listener = b.tcp_listen(7, backlog=8)
    server = asyncio.create_task(_serve_echo(b, listener))
    loop = asyncio.get_running_loop()
    fd = await loop.run_in_executor(None, a.tcp_dial, dst, 7, 10.0)
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    payload = os.urandom(1 << 20)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(), 30)
    assert got == payload
    writer.close()
    await writer.wait_closed()
    server.cancel()
    stats = a.netstack_stats()
    assert stats["tcp_bytes_out"] == stats["tcp_bytes_in"] == len(payload)
    b.tcp_close_listener(listener)
    assert b.netstack_stats()["tcp_listeners"] == 0


def _header(ip: str, port: int) -> bytes:
    addr = ipaddress.ip_address(ip)
    return bytes([addr.version]) + addr.packed.ljust(16, b"\0") + struct.pack(">H", port)


async def test_udp_exchange(pair: tuple[_native.Device, _native.Device]) -> None:
    a, b = pair
    loop = asyncio.get_running_loop()
    sa = socket.socket(fileno=a.udp_bind(0))
    sb = socket.socket(fileno=b.udp_bind(5353))
    assert sa.type == socket.SOCK_SEQPACKET
    sa.setblocking(False)
    sb.setblocking(False)
    try:
        # The first datagrams may wait behind the WireGuard handshake: resend until one arrives.
        msg = b""
        for _ in range(50):
            await loop.sock_sendall(sa, _header(B4, 5353) + b"ping")
            try:
                msg = await asyncio.wait_for(loop.sock_recv(sb, 65536), 0.2)
                break
            except TimeoutError:
                continue
        family, ip, port = msg[0], msg[1:17], struct.unpack(">H", msg[17:19])[0]
        assert (family, ipaddress.ip_address(ip[:4]), msg[19:]) == (4, ipaddress.ip_address(A4), b"ping")
        assert port >= 49152
        # The reply goes back to the source the header names; IPv6 works the same way.
        await loop.sock_sendall(sb, msg[:19] + b"pong")
        assert await asyncio.wait_for(loop.sock_recv(sa, 65536), 10) == _header(B4, 5353) + b"pong"
        await loop.sock_sendall(sa, _header(B6, 5353) + b"six")
        got = await asyncio.wait_for(loop.sock_recv(sb, 65536), 10)
        assert got[:17] == _header(A6, 0)[:17] and got[19:] == b"six"
        assert a.netstack_stats()["udp_sockets"] == 1
    finally:
        sa.close()
        sb.close()


def test_dial_errors(pair: tuple[_native.Device, _native.Device]) -> None:
    a, _b = pair
    with pytest.raises(DialError, match="refused"):
        a.tcp_dial(B4, 81, 10.0)
    with pytest.raises(DialError, match="allowed IPs"):
        a.tcp_dial("100.64.0.9", 80, 10.0)
    with pytest.raises(ConnectionError):
        a.tcp_dial(B6, 81, 10.0)
    with pytest.raises(ConfigError, match="malformed IP address"):
        a.tcp_dial("beta", 80, 1.0)
    with pytest.raises(ConfigError, match="timeout"):
        a.tcp_dial(B4, 80, 0)


def test_argument_errors() -> None:
    key = _native.generate_private_key()
    with pytest.raises(ConfigError, match="malformed address"):
        _native.Device.userspace(key, 0, ["100.64.0.1/40"])
    with pytest.raises(ConfigError, match="at most one IPv4"):
        _native.Device.userspace(key, 0, ["100.64.0.1/32", "100.64.0.2/32"])
    dev = _native.Device.userspace(key, 0, ["100.64.0.1/32"], mtu=1400)
    try:
        assert dev.tun_name == "userspace-networking"
        with pytest.raises(ConfigError, match="port must be 1-65535"):
            dev.tcp_listen(0)
        lid = dev.tcp_listen(80)
        with pytest.raises(DeviceError, match="already listening"):
            dev.tcp_listen(80)
        assert dev.tcp_accept(lid) is None
        with pytest.raises(DeviceError, match="no TCP listener"):
            dev.tcp_accept(lid + 1)
        dev.set_addresses(["100.64.0.3/32", "fd7a:115c:a1e0::3/128"])
    finally:
        dev.close()
    with pytest.raises(DeviceError, match="closed"):
        dev.netstack_stats()


def _count(path: str) -> int:
    return len(os.listdir(path))


async def test_close_leaves_no_descriptor_or_thread() -> None:
    gc.collect()
    fds, threads = _count("/proc/self/fd"), _count("/proc/self/task")
    a, b = _pair()
    listener = b.tcp_listen(80)
    loop = asyncio.get_running_loop()
    fd = await loop.run_in_executor(None, a.tcp_dial, B4, 80, 10.0)
    udp = a.udp_bind(0)
    assert a.netstack_stats()["tcp_connections"] == 1
    a.close()
    b.close()
    # The stack's ends are closed: the caller's end reads end-of-stream.
    with socket.socket(fileno=fd) as s:
        assert s.recv(10) == b""
    os.close(udp)
    del a, b, listener
    gc.collect()
    assert _count("/proc/self/fd") == fds
    # The executor's worker thread stays; every device and stack thread is gone.
    assert _count("/proc/self/task") <= threads + 1
