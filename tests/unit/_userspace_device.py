"""A stand-in for ``tailpy._native.Device.userspace`` with the netstack's file-descriptor surface: devices on
one :class:`FakeNet` reach each other's TCP listeners and UDP sockets by tailnet address, through
socketpairs, with no WireGuard in between. Enough to drive :class:`tailpy.Node`, :mod:`tailpy.netstack` and
the proxies in unit tests; the real stack is tested in Rust and in the lab."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import os
import socket
from typing import Any

from _conn_device import FakeDevice

from tailpy.errors import DeviceError
from tailpy.netstack import decode_datagram, encode_datagram


class FakeNet:
    def __init__(self) -> None:
        self.devices: list[FakeUserspaceDevice] = []

    def owner(self, ip: str) -> FakeUserspaceDevice | None:
        want = ipaddress.ip_address(ip)
        for d in self.devices:
            if want in d.ips:
                return d
        return None

    def factory(self, private_key: bytes, listen_port: int, addresses: list[str], mtu: int) -> Any:
        dev = FakeUserspaceDevice(self, private_key)
        dev.set_addresses(addresses)
        self.devices.append(dev)
        return dev


class _Listener:
    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.backlog: collections.deque[tuple[int, str, int]] = collections.deque()

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)
        while self.backlog:
            os.close(self.backlog.popleft()[0])


class FakeUserspaceDevice(FakeDevice):
    listen_port = 41641
    tun_name = ""

    def __init__(self, net: FakeNet, private_key: bytes) -> None:
        super().__init__(strict=False)
        self.net = net
        self.private_key = private_key
        self.ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        self.listeners: dict[int, _Listener] = {}
        self.by_port: dict[int, int] = {}  # TCP port -> listener id
        self.udp: dict[int, socket.socket] = {}  # UDP port -> our end
        self._next_id = 1
        self._ephemeral = 40000
        self.closed = False

    # -- DataPlane -----------------------------------------------------------------------------------------

    def remove_peer(self, public_key: bytes) -> bool:
        return self.paths.pop(public_key, None) is not None

    def set_private_key(self, private_key: bytes) -> None:
        self.private_key = private_key

    def stats(self) -> dict[str, int]:
        return {}

    def set_addresses(self, addresses: list[str]) -> None:
        self.ips = [ipaddress.ip_interface(a).ip for a in addresses]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for lst in self.listeners.values():
            lst.close()
        self.listeners.clear()
        loop = asyncio.get_event_loop()
        for s in self.udp.values():
            loop.remove_reader(s.fileno())
            s.close()
        self.udp.clear()
        if self in self.net.devices:
            self.net.devices.remove(self)
        super().close()

    # -- the netstack surface ------------------------------------------------------------------------------

    def _port(self) -> int:
        self._ephemeral += 1
        return self._ephemeral

    def tcp_dial(self, dst_ip: str, dst_port: int, timeout: float) -> int:
        if self.closed:
            raise DeviceError("the device is closed")
        peer = self.net.owner(dst_ip)
        lid = peer.by_port.get(dst_port) if peer is not None else None
        if peer is None or lid is None:
            raise DeviceError(f"connection to {dst_ip}:{dst_port} refused (RST)")
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        src = next((ip for ip in self.ips if ip.version == ipaddress.ip_address(dst_ip).version), None)
        lst = peer.listeners[lid]
        lst.backlog.append((b.detach(), str(src), self._port()))
        os.write(lst.w, b"x")
        return a.detach()

    def tcp_listen(self, port: int, backlog: int = 128) -> int:
        if port in self.by_port:
            raise DeviceError(f"TCP port {port} is in use")
        lid, self._next_id = self._next_id, self._next_id + 1
        self.listeners[lid] = _Listener()
        self.by_port[port] = lid
        return lid

    def tcp_accept_fd(self, listener: int) -> int:
        return self.listeners[listener].r

    def tcp_accept(self, listener: int) -> tuple[int, str, int] | None:
        lst = self.listeners[listener]
        if not lst.backlog:
            return None
        with contextlib.suppress(BlockingIOError):
            os.read(lst.r, 1)
        return lst.backlog.popleft()

    def tcp_close_listener(self, listener: int) -> None:
        lst = self.listeners.pop(listener, None)
        if lst is not None:
            lst.close()
        self.by_port = {p: i for p, i in self.by_port.items() if i != listener}

    def udp_bind(self, port: int) -> int:
        port = port or self._port()
        if port in self.udp:
            raise DeviceError(f"UDP port {port} is in use")
        outer, inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        inner.setblocking(False)
        self.udp[port] = inner
        asyncio.get_event_loop().add_reader(inner.fileno(), self._forward, port, inner)
        return outer.detach()

    def _forward(self, port: int, inner: socket.socket) -> None:
        try:
            msg = inner.recv(70000)
        except BlockingIOError:
            return
        except OSError:
            return
        if not msg:
            return
        payload, ip, dport = decode_datagram(msg)
        peer = self.net.owner(str(ip))
        src = next((a for a in self.ips if a.version == ip.version), None)
        if peer is None or src is None or dport not in peer.udp:
            return
        with contextlib.suppress(OSError):
            peer.udp[dport].send(encode_datagram(src, port, payload))

    def netstack_stats(self) -> dict[str, int]:
        return {"tcp_listeners": len(self.listeners), "udp_sockets": len(self.udp)}
