"""A stand-in for ``tailpy._native.Device`` as :class:`tailpy.magicsock.Conn` uses it: paths, endpoints,
injected datagrams and per-peer counters recorded; datagrams sent and received over an optional asyncio UDP
socket on 127.0.0.1; the queue for Python (:meth:`FakeDevice.drain`, readable on :meth:`FakeDevice.fileno`)
fed by that socket and by :meth:`FakeDevice.queue_relay`."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any, Literal

from tailpy.errors import DeviceError


class FakeDevice(asyncio.DatagramProtocol):
    def __init__(self, *, strict: bool = True) -> None:
        self.strict = strict  # set_path/inject on an unknown peer raise DeviceError, as the device does
        self.transport: asyncio.DatagramTransport | None = None
        self.paths: dict[bytes, str] = {}
        self.confirmed: dict[bytes, bool] = {}  # set_path's confirmed=
        self.retried: list[bytes] = []  # retry_handshake calls
        self.pending: set[bytes] = set()  # keys retry_handshake reports a handshake re-sent for
        self.endpoints: dict[bytes, str | None] = {}
        self.injected: list[tuple[bytes, bytes]] = []
        self.filters: list[Any] = []  # set_filter calls (recorded, not enforced)
        self.peer_stats: dict[bytes, dict[str, Any]] = {}
        self.received: list[bytes] = []
        self.got = asyncio.Event()
        self._datagrams: list[tuple[bytes, str]] = []
        self._relay: list[tuple[bytes, bytes]] = []
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)

    # -- what the backend does: add a peer (key, allowed IPs) -------------------------------------------

    def add(self, key: bytes, endpoint: str | None = None) -> None:
        self.paths[key] = "direct"
        self.endpoints[key] = endpoint
        self.peer_stats[key] = {"tx_packets": 0, "rx_packets": 0, "last_handshake": None}

    def set_filter(self, rules: Any) -> None:
        self.filters.append(rules)

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        self.transport = transport
        host, port = transport.get_extra_info("sockname")[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        os.close(self._r)
        os.close(self._w)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)
        self.got.set()
        self._datagrams.append((data, f"{addr[0]}:{addr[1]}"))
        os.write(self._w, b"x")

    def queue_relay(self, key: bytes, datagram: bytes) -> None:
        """The data plane queues a WireGuard datagram for a peer on the relay path."""
        self._relay.append((key, datagram))
        os.write(self._w, b"x")

    # -- the device's calls -----------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._r

    def drain(self, max_items: int = 1024) -> tuple[list[tuple[bytes, str]], list[tuple[bytes, bytes]]]:
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 65536)
        datagrams, self._datagrams = self._datagrams, []
        relay, self._relay = self._relay, []
        return datagrams, relay

    def send_datagram(self, data: bytes, endpoint: str) -> None:
        host, _, port = endpoint.rpartition(":")
        if self.transport is None:
            raise DeviceError("no socket")
        self.transport.sendto(data, (host.strip("[]"), int(port)))

    def set_path(
        self, public_key: bytes, path: Literal["direct", "relay"], *, confirmed: bool = True
    ) -> None:
        if self.strict and public_key not in self.paths:
            raise DeviceError("unknown peer")
        self.paths[public_key] = path
        self.confirmed[public_key] = confirmed

    def retry_handshake(self, public_key: bytes) -> bool:
        """Records the call; True (a pending handshake sent again) for keys in :attr:`pending`."""
        if self.strict and public_key not in self.paths:
            raise DeviceError("unknown peer")
        self.retried.append(public_key)
        return public_key in self.pending

    def set_peer(
        self, public_key: bytes, *, allowed_ips: list[str], endpoint: str | None = None, **_: Any
    ) -> None:
        if public_key not in self.paths:
            self.add(public_key)
        if endpoint is not None:
            self.endpoints[public_key] = endpoint

    def inject(self, public_key: bytes, datagram: bytes) -> None:
        if self.strict and public_key not in self.paths:
            raise DeviceError("unknown peer")
        self.injected.append((public_key, datagram))

    def peers(self) -> list[dict[str, Any]]:
        return [
            {"public_key": k, "path": self.paths[k], "endpoint": self.endpoints.get(k), **st}
            for k, st in self.peer_stats.items()
        ]
