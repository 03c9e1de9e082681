"""A bare tailpy data plane for the lab: one ``tailpy._native.Device`` configured from the command line.

Run inside a lab host (it configures the TUN with ``ip``, so it must be in the namespace)::

    python -m tailpy.lab.wgnode --private-key B64 --listen-port 51820 --address 100.64.0.1/32 \\
        --peer PUB_B64,ENDPOINT,ALLOWED[+ALLOWED...] [--keepalive S] \\
        [--relay-listen IP:PORT | --relay-connect IP:PORT]

``ENDPOINT`` is ``ip:port``, ``[ipv6]:port`` or ``-`` (none: learned from the peer's handshake). With a
``--relay-*`` option every peer's path is "relay" and the relay queue is bridged over TCP
(:mod:`tailpy.lab.relay`), standing in for DERP.

Protocol on stdio (one JSON object per line): the node prints ``{"event": "ready", "public_key": B64,
"listen_port": N}`` once configured; each ``stats`` line read on stdin is answered with
``{"event": "stats", "device": {...}, "peers": [...], "relay": {...}}`` (keys in base64); a line
``filter JSON`` sets the device's packet filter (``JSON``: a list of tailcfg.FilterRule objects as
:func:`tailpy.packetfilter.filter_to_json` writes them, or ``null`` for none) and is answered with
``{"event": "filter", "rules": N | null}`` or ``{"event": "filter", "error": "..."}``. SIGTERM or SIGINT
closes the device and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from tailpy.errors import TailpyError


@dataclass(frozen=True)
class PeerArg:
    """One ``--peer`` value."""

    public_key: bytes
    endpoint: str | None
    allowed_ips: list[str]

    @classmethod
    def parse(cls, text: str) -> PeerArg:
        try:
            key, endpoint, allowed = text.split(",", 2)
            raw = base64.b64decode(key, validate=True)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--peer {text!r}: expected PUB_B64,ENDPOINT,ALLOWED") from None
        if len(raw) != 32:
            raise argparse.ArgumentTypeError(f"--peer {text!r}: public key must be 32 bytes of base64")
        return cls(raw, None if endpoint in ("", "-") else endpoint, [a for a in allowed.split("+") if a])

    def format(self) -> str:
        """The ``--peer`` argument for this peer."""
        key = base64.b64encode(self.public_key).decode()
        return f"{key},{self.endpoint or '-'},{'+'.join(self.allowed_ips)}"


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected IP:PORT")
    return host.strip("[]"), int(port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tailpy.lab.wgnode", description=__doc__.splitlines()[0])
    p.add_argument("--private-key", required=True, help="32-byte X25519 private key, base64 as wg(8) writes")
    p.add_argument("--listen-port", type=int, default=0)
    p.add_argument("--tun", default="tailpy0", help="TUN interface name")
    p.add_argument("--mtu", type=int, default=1280)
    p.add_argument("--address", action="append", default=[], help="address/prefix for the TUN (repeatable)")
    p.add_argument("--peer", action="append", type=PeerArg.parse, default=[], help="PUB_B64,ENDPOINT,ALLOWED")
    p.add_argument("--keepalive", type=int, default=None, help="persistent keepalive, seconds")
    relay = p.add_mutually_exclusive_group()
    relay.add_argument("--relay-listen", type=_hostport, help="bridge relay datagrams: listen on IP:PORT")
    relay.add_argument("--relay-connect", type=_hostport, help="bridge relay datagrams: connect to IP:PORT")
    return p.parse_args(argv)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise TailpyError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(_jsonable(obj)) + "\n")
    sys.stdout.flush()


def _set_filter(device: Any, text: bytes) -> dict[str, Any]:
    """Apply a ``filter JSON`` command; the answer to print."""
    from tailpy.daemon.pfilter import device_rules
    from tailpy.packetfilter import filter_from_json

    try:
        obj = json.loads(text)
        rules = None if obj is None else filter_from_json(obj)
        device.set_filter(device_rules(rules))
    except (ValueError, TailpyError) as e:
        return {"event": "filter", "error": str(e)}
    return {"event": "filter", "rules": None if rules is None else len(rules)}


async def main_async(args: argparse.Namespace) -> None:
    from tailpy._native import Device  # imported here so --help works without the extension
    from tailpy.lab import relay

    device = Device(
        base64.b64decode(args.private_key), tun_name=args.tun, listen_port=args.listen_port, mtu=args.mtu
    )
    bridge: relay.RelayBridge | None = None
    try:
        for address in args.address:
            _ip("addr", "add", address, "dev", args.tun)
        _ip("link", "set", args.tun, "mtu", str(args.mtu), "up")
        for peer in args.peer:
            device.set_peer(
                peer.public_key,
                allowed_ips=peer.allowed_ips,
                endpoint=peer.endpoint,
                persistent_keepalive=args.keepalive,
            )
            if args.relay_listen or args.relay_connect:
                device.set_path(peer.public_key, "relay")
            for prefix in peer.allowed_ips:
                _ip("route", "replace", prefix, "dev", args.tun)

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        _emit({"event": "ready", "public_key": device.public_key, "listen_port": device.listen_port})

        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

        async def serve_stdin() -> None:
            while line := await stdin.readline():
                if line.startswith(b"filter "):
                    _emit(_set_filter(device, line[len(b"filter ") :]))
                elif line.strip() == b"stats":
                    counters = {"sent": bridge.sent, "received": bridge.received} if bridge else None
                    peers = device.peers()
                    _emit(
                        {"event": "stats", "device": dict(device.stats()), "peers": peers, "relay": counters}
                    )

        async def serve_relay() -> None:
            nonlocal bridge
            if args.relay_listen:
                reader, writer = await relay.accept_one(*args.relay_listen)
            else:
                reader, writer = await relay.connect(*args.relay_connect)
            bridge = relay.RelayBridge(device, reader, writer)
            await bridge.run()
            print("wgnode: the relay connection closed", file=sys.stderr)

        def report(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                print(f"wgnode: relay bridge failed: {task.exception()!r}", file=sys.stderr)

        tasks = [asyncio.create_task(serve_stdin())]
        if args.relay_listen or args.relay_connect:
            tasks.append(asyncio.create_task(serve_relay()))
            tasks[-1].add_done_callback(report)
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        device.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        asyncio.run(main_async(args))
    except TailpyError as e:
        print(f"wgnode: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
