"""The data plane's relay hooks: WireGuard between two Devices carried entirely by Python.

Two hosts on a LAN each run a tailpy Device (``python -m tailpy.lab.wgnode``) whose only peer has path
"relay". Their relay queues are bridged by one plain TCP connection (:mod:`tailpy.lab.relay`, standing in
for DERP): each side drains its queue when the device's eventfd is readable and sends length-prefixed
frames; the other side calls ``device.inject``. Ping must work through the tunnel while the UDP sockets
carry nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import pytest

from tailpy.lab import Host, Lab
from tailpy.lab.relay import RelayBridge
from tailpy.lab.tunnels import TUN_A, TUN_B, native_device_reason, start_tailpy_pair

RELAY_PORT = 7000


@pytest.fixture
def _needs_device() -> None:
    reason = native_device_reason()
    if reason:
        pytest.skip(reason)


class FakeDevice:
    """The relay-facing part of a Device: a queue behind an eventfd, and a record of injected datagrams."""

    def __init__(self, key: bytes) -> None:
        self.public_key = key
        self._fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.queue: list[tuple[bytes, bytes]] = []
        self.injected: list[tuple[bytes, bytes]] = []

    def send_to_relay(self, peer: bytes, datagram: bytes) -> None:
        self.queue.append((peer, datagram))
        os.eventfd_write(self._fd, 1)

    def fileno(self) -> int:
        return self._fd

    def drain(self, max_items: int = 1024) -> tuple[list[tuple[bytes, str]], list[tuple[bytes, bytes]]]:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._fd)
        items, self.queue = self.queue[:max_items], self.queue[max_items:]
        return [], items

    def inject(self, public_key: bytes, datagram: bytes) -> None:
        self.injected.append((public_key, datagram))


async def test_bridge_frames_datagrams_both_ways() -> None:
    """The TCP framing of the bridge itself, with fake devices (no namespaces, no extension)."""
    ka, kb = b"a" * 32, b"b" * 32
    dev_a, dev_b = FakeDevice(ka), FakeDevice(kb)
    sa, sb = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=sa)
    rb, wb = await asyncio.open_connection(sock=sb)
    bridges = [RelayBridge(dev_a, ra, wa), RelayBridge(dev_b, rb, wb)]
    tasks = [asyncio.create_task(br.run()) for br in bridges]
    datagrams = [bytes([4, 0, 0, 0]) + bytes(range(n % 256)) * (n // 256 + 1) for n in (0, 1, 300, 2000)]
    for d in datagrams:
        dev_a.send_to_relay(kb, d)
    dev_b.send_to_relay(ka, b"\x01\x00\x00\x00hello")

    async def delivered() -> None:
        while len(dev_b.injected) < len(datagrams) or not dev_a.injected:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(delivered(), timeout=10)
    assert dev_b.injected == [(ka, d) for d in datagrams]
    assert dev_a.injected == [(kb, b"\x01\x00\x00\x00hello")]
    assert bridges[0].sent == len(datagrams) and bridges[1].received == len(datagrams)
    wa.close()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    for dev in (dev_a, dev_b):
        os.close(dev.fileno())


def _ping(host: Host, address: str) -> None:
    host.run(["ping", "-c", "3", "-i", "0.2", "-W", "5", "-w", "15", address])


@pytest.mark.lab
@pytest.mark.usefixtures("_needs_device")
@pytest.mark.parametrize("endpoints", [False, True], ids=["no-endpoint", "endpoint-known-but-relay"])
def test_ping_over_relay_only(lab: Lab, endpoints: bool) -> None:
    a, b = lab.host("a"), lab.host("b")
    lan = lab.lan("lan", [a, b], subnet="192.0.2.0/24")
    pair = start_tailpy_pair(
        a,
        b,
        endpoint_a=lan.ip(a) if endpoints else None,
        endpoint_b=lan.ip(b) if endpoints else None,
        relay=f"{lan.ip(a)}:{RELAY_PORT}",
    )

    _ping(a, TUN_B)
    _ping(b, TUN_A)

    for node in (pair.a, pair.b):
        stats = node.stats()
        (peer,) = stats["peers"]
        assert peer["path"] == "relay"
        assert peer["last_handshake"] is not None
        assert peer["tx_packets"] > 0 and peer["rx_packets"] > 0
        if not endpoints:
            assert peer["endpoint"] is None
        # Nothing went over the UDP socket: every WireGuard datagram took the relay.
        assert stats["device"]["tx_datagrams"] == 0
        assert stats["device"]["rx_datagrams"] == 0
        assert stats["relay"]["sent"] > 0 and stats["relay"]["received"] > 0
