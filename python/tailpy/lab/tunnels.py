"""Tunnel endpoints to start on lab hosts: a bare tailpy data plane (:mod:`tailpy.lab.wgnode`) and a stock
WireGuard peer (wireguard-go + wg(8)). Both are tracked by the lab and stopped when it closes."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailpy.errors import LabError
from tailpy.lab.netns import Host
from tailpy.lab.procs import read_line, wait_for
from tailpy.lab.wgnode import PeerArg

#: Where wireguard-go puts its UAPI socket. It is not per network namespace, so the lab names every
#: wireguard-go interface uniquely (lab prefix + host name) to let parallel labs coexist.
WG_RUN_DIR = Path("/var/run/wireguard")


def missing_tools(*tools: str) -> str | None:
    """A one-sentence reason naming the tools that are not on PATH, or None when all are there."""
    missing = [t for t in tools if shutil.which(t) is None]
    return f"not installed: {', '.join(missing)} (make deps installs them)" if missing else None


def native_device_reason() -> str | None:
    """Why ``tailpy._native.Device`` cannot be used (one sentence), or None when it can."""
    try:
        from tailpy import _native
    except ImportError as e:
        return f"tailpy._native is not built ({e}): run make build"
    if not hasattr(_native, "Device"):
        return "tailpy._native has no Device yet (this build of the extension lacks the data plane)"
    return None


def wg_keypair() -> tuple[str, str]:
    """(private, public) key in base64, from ``wg genkey`` / ``wg pubkey`` (no network involved)."""
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    public = subprocess.run(
        ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
    ).stdout.strip()
    return private, public


@dataclass
class TailpyNode:
    """A running ``python -m tailpy.lab.wgnode`` on ``host``."""

    host: Host
    proc: subprocess.Popen[str]
    public_key: str  # base64
    listen_port: int

    @classmethod
    def start(
        cls,
        host: Host,
        private_key: str,
        *,
        address: str,
        peers: list[PeerArg],
        listen_port: int = 0,
        tun: str = "tailpy0",
        mtu: int = 1280,
        keepalive: int | None = None,
        relay_listen: str | None = None,
        relay_connect: str | None = None,
        timeout: float = 20.0,
    ) -> TailpyNode:
        """Start the node and wait (up to ``timeout`` s) until it reports ready. Raises LabError."""
        args = [
            "--private-key",
            private_key,
            "--listen-port",
            str(listen_port),
            "--tun",
            tun,
            "--address",
            address,
            "--mtu",
            str(mtu),
        ]
        for peer in peers:
            args += ["--peer", peer.format()]
        if keepalive:
            args += ["--keepalive", str(keepalive)]
        if relay_listen:
            args += ["--relay-listen", relay_listen]
        if relay_connect:
            args += ["--relay-connect", relay_connect]
        proc = host.python("tailpy.lab.wgnode", *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        ready = json.loads(read_line(proc.stdout, timeout, f"tailpy wgnode on {host.name} to be ready"))
        return cls(host, proc, ready["public_key"], int(ready["listen_port"]))

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """The node's device and peer stats (``{"device": ..., "peers": [...], "relay": ...}``)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(read_line(self.proc.stdout, timeout, f"stats of {self.host.name}"))
        return reply


@dataclass
class WireguardGo:
    """A running ``wireguard-go -f <ifname>`` on ``host``, configured with wg(8) and ip(8)."""

    host: Host
    proc: subprocess.Popen[str]
    ifname: str
    public_key: str
    listen_port: int

    @classmethod
    def start(
        cls,
        host: Host,
        private_key: str,
        *,
        address: str,
        peers: list[PeerArg],
        listen_port: int = 51820,
        mtu: int = 1280,
        timeout: float = 10.0,
    ) -> WireguardGo:
        """Start wireguard-go in the foreground (tracked), wait for its UAPI socket, configure it."""
        reason = missing_tools("wireguard-go", "wg")
        if reason:
            raise LabError(reason)
        ifname = f"wg{host.lab.prefix[3:7]}{host.name}"[:15]
        sock = WG_RUN_DIR / f"{ifname}.sock"
        host.lab.track_path(sock)
        proc = host.popen(
            ["wireguard-go", "-f", ifname], env={"LOG_LEVEL": "error"}, stderr=subprocess.DEVNULL
        )
        wait_for(
            lambda: sock.exists() or proc.poll() is not None, timeout=timeout, what=f"wireguard-go {ifname}"
        )
        if proc.poll() is not None:
            raise LabError(f"wireguard-go {ifname} on {host.name} exited with status {proc.returncode}")
        cmd = ["wg", "set", ifname, "private-key", "/dev/stdin", "listen-port", str(listen_port)]
        for peer in peers:
            cmd += [
                "peer",
                base64.b64encode(peer.public_key).decode(),
                "allowed-ips",
                ",".join(peer.allowed_ips),
            ]
            if peer.endpoint:
                cmd += ["endpoint", peer.endpoint]
        host.run(cmd, input=private_key + "\n")
        host.run(["ip", "addr", "add", address, "dev", ifname])
        host.run(["ip", "link", "set", ifname, "mtu", str(mtu), "up"])
        for peer in peers:
            for prefix in peer.allowed_ips:
                host.run(["ip", "route", "replace", prefix, "dev", ifname])
        public = host.run(["wg", "show", ifname, "public-key"]).stdout.strip()
        return cls(host, proc, ifname, public, listen_port)

    def latest_handshakes(self) -> dict[str, int]:
        """Peer public key (base64) -> unix time of the latest handshake (0 = none yet)."""
        out = self.host.run(["wg", "show", self.ifname, "latest-handshakes"]).stdout
        return {key: int(ts) for key, ts in (line.split() for line in out.splitlines() if line.strip())}
