"""A lab node for test_disco_lab.py: the Rust data plane with one peer, its path chosen by disco.

Runs inside a lab namespace: a tailpy ``Device`` (TUN + UDP socket), a :class:`DiscoNode` for the one peer,
and a stand-in for DERP: one TCP connection to the other node carrying frames (big-endian u32 length, one kind
byte: 0 a WireGuard datagram, 1 a disco datagram; then the bytes). It drives DiscoNode the way the design note
of tailpy.magicsock.disco says: disco datagrams drained from the device and received over the stand-in are
fed, actions carried out on the device, poll at next_timer, activity noted when the peer's tx_packets grow.

stdout: JSON lines: ``{"event": "ready"}``, ``{"event": "path", "endpoint": "ip:port" | null}``, and a
``{"event": "stats", ...}`` answer to each ``stats`` line on stdin. SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import struct
import subprocess
import sys
import time
from typing import Any

from tailpy._native import Device
from tailpy.asyncutil import wait_event
from tailpy.endpoint import Endpoint
from tailpy.errors import DeviceError
from tailpy.keys import DiscoPrivate, DiscoPublic, NodePrivate, NodePublic
from tailpy.magicsock.disco import Action, DiscoNode, PeerInfo, SendDERP, SendUDP
from tailpy.magicsock.paths import PingResult, PingTimeout, SetPath, ViaDERP
from tailpy.proto import disco

_LEN = struct.Struct(">I")
WG, DISCO = 0, 1


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=lambda v: v.hex() if isinstance(v, bytes) else str(v)), flush=True)


class LabNode:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        node_priv = NodePrivate.from_base64(args.private_key)
        self.peer = NodePublic.from_base64(args.peer_key)
        self.device = Device(node_priv.raw, tun_name=args.tun, listen_port=args.listen_port, mtu=1280)
        self.disco = DiscoNode(
            DiscoPrivate(bytes.fromhex(args.disco_key)),
            node_priv.public,
            endpoints=[Endpoint.parse(args.endpoint)],
        )
        self.writer: asyncio.StreamWriter | None = None
        self.wake = asyncio.Event()
        self.tx = 0
        self.send_errors = 0

    def setup(self) -> None:
        ip = ["ip"]
        subprocess.run([*ip, "addr", "add", self.args.address, "dev", self.args.tun], check=True)
        subprocess.run([*ip, "link", "set", self.args.tun, "up"], check=True)
        self.device.set_peer(self.peer.raw, allowed_ips=[self.args.peer_allowed], endpoint=None)
        self.device.set_path(self.peer.raw, "relay")
        subprocess.run([*ip, "route", "replace", self.args.peer_allowed, "dev", self.args.tun], check=True)
        info = PeerInfo(
            self.peer,
            DiscoPublic(bytes.fromhex(self.args.peer_disco)),
            (Endpoint.parse(self.args.peer_endpoint),),
        )
        self.act(self.disco.on_netmap([info], time.monotonic()))

    def act(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, SendUDP):
                try:
                    self.device.send_datagram(a.datagram, str(a.endpoint))
                except DeviceError:
                    self.send_errors += 1  # e.g. EPERM from a firewall: the Pong will just not come
            elif isinstance(a, SendDERP):
                self.frame(DISCO, a.datagram)
            elif isinstance(a, SetPath):
                if a.endpoint is None:
                    self.device.set_path(self.peer.raw, "relay")
                else:
                    self.device.set_peer(
                        self.peer.raw, allowed_ips=[self.args.peer_allowed], endpoint=str(a.endpoint)
                    )
                    self.device.set_path(self.peer.raw, "direct")
                emit({"event": "path", "endpoint": None if a.endpoint is None else str(a.endpoint)})
            elif isinstance(a, (PingResult, PingTimeout)):
                pass
        self.wake.set()

    def frame(self, kind: int, data: bytes) -> None:
        if self.writer is not None:
            self.writer.write(_LEN.pack(len(data) + 1) + bytes([kind]) + data)

    def on_readable(self) -> None:
        datagrams, relay = self.device.drain()
        now = time.monotonic()
        for payload, src in datagrams:
            if disco.looks_like_disco(payload):
                self.act(self.disco.feed(payload, Endpoint.parse(src), now))
        for _key, datagram in relay:
            self.frame(WG, datagram)

    async def derp(self) -> None:
        if self.args.derp_listen:
            host, port = self.args.derp_listen.rsplit(":", 1)
            got: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
                asyncio.get_running_loop().create_future()
            )

            def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                if got.done():
                    w.close()
                else:
                    got.set_result((r, w))

            server = await asyncio.start_server(on_client, host, int(port))
            emit({"event": "listening"})
            reader, self.writer = await got
            server.close()
        else:
            host, port = self.args.derp_connect.rsplit(":", 1)
            for _ in range(200):
                try:
                    reader, self.writer = await asyncio.open_connection(host, int(port))
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            else:
                raise SystemExit("cannot connect to the DERP stand-in")
        emit({"event": "ready"})
        while True:
            try:
                (n,) = _LEN.unpack(await reader.readexactly(4))
                body = await reader.readexactly(n)
            except asyncio.IncompleteReadError:
                return
            if body[0] == WG:
                self.device.inject(self.peer.raw, body[1:])
            else:
                self.act(self.disco.feed(body[1:], ViaDERP(1), time.monotonic(), derp_src=self.peer))

    async def timers(self) -> None:
        next_look = 0.0
        while True:
            now = time.monotonic()
            if now >= next_look:
                for p in self.device.peers():
                    if p["tx_packets"] > self.tx:
                        self.tx = p["tx_packets"]
                        self.disco.note_activity(self.peer, now)
                next_look = now + 0.25
            self.act(self.disco.poll(now))
            self.wake.clear()
            nt = self.disco.next_timer()
            until = min(nt if nt is not None else now + 1.0, next_look)
            await wait_event(self.wake, max(0.0, until - time.monotonic()))

    async def stdin(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            if line.strip() == b"stats":
                emit(
                    {
                        "event": "stats",
                        "device": dict(self.device.stats()),
                        "peers": self.device.peers(),
                        "disco": self.disco.counters.as_dict(),
                        "send_errors": self.send_errors,
                        "path": None
                        if self.disco.path(self.peer) is None
                        else str(self.disco.path(self.peer)),
                    }
                )


async def main_async(args: argparse.Namespace) -> None:
    node = LabNode(args)
    try:
        node.setup()
        loop = asyncio.get_running_loop()
        loop.add_reader(node.device.fileno(), node.on_readable)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        tasks = [asyncio.create_task(c) for c in (node.derp(), node.timers(), node.stdin())]

        def report(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                print(f"disco lab node: {task.get_name()} failed: {task.exception()!r}", file=sys.stderr)
                stop.set()

        for t in tasks:
            t.add_done_callback(report)
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        node.device.close()


def main() -> None:
    p = argparse.ArgumentParser()
    for name in (
        "--private-key",
        "--peer-key",
        "--disco-key",
        "--peer-disco",
        "--address",
        "--peer-allowed",
        "--endpoint",
        "--peer-endpoint",
    ):
        p.add_argument(name, required=True)
    p.add_argument("--listen-port", type=int, default=41641)
    p.add_argument("--tun", default="tailpy0")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--derp-listen")
    g.add_argument("--derp-connect")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
