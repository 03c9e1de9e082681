"""Disco driving the real data plane in the lab: two namespaces on a LAN, each running the Rust Device with a
DiscoNode choosing the peer's path (``_disco_lab_node.py``), a TCP stand-in for DERP between them. While a
ping runs through the tunnel: relay first, direct on the first pong, back to relay when UDP between the two is
dropped (nftables), direct again when it is let through, all on one WireGuard session (no new handshake).
Pings are lost only between the cut and the fall back to relay.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tailpy.keys import DiscoPrivate, NodePrivate
from tailpy.lab import Host, Lab

A_TUN, B_TUN = "100.64.0.1", "100.64.0.2"
PORT, DERP_PORT = 41641, 7000
SCRIPT = Path(__file__).with_name("_disco_lab_node.py")
PKG_ROOT = Path(__file__).resolve().parents[2] / "python"


class Node:
    def __init__(self, host: Host, args: list[str]) -> None:
        self.host = host
        self.proc = host.popen(
            [sys.executable, str(SCRIPT), *args],
            env={"PYTHONPATH": str(PKG_ROOT), "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.paths: list[tuple[float, str | None]] = []
        self.lines: queue.Queue[str] = queue.Queue()
        # A thread reads the pipe: several lines often arrive at once, and select() on a buffered text pipe
        # would not see the ones already buffered.
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def event(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event from {self.host.name} within {timeout:.1f} s") from None
        ev: dict[str, Any] = json.loads(line)
        if ev["event"] == "path":
            self.paths.append((time.monotonic(), ev["endpoint"]))
        return ev

    def wait(self, event: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            ev = self.event(max(0.1, deadline - time.monotonic()))
            if ev["event"] == event:
                return ev

    def wait_path(self, direct: bool, timeout: float = 30.0) -> float:
        """Seconds until the node reports a direct (or relay) path."""
        start = time.monotonic()
        if self.paths and (self.paths[-1][1] is not None) == direct:
            return 0.0
        while True:
            ev = self.wait("path", max(0.1, timeout - (time.monotonic() - start)))
            if (ev["endpoint"] is not None) == direct:
                return time.monotonic() - start

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return self.wait("stats", 10.0)


@pytest.mark.lab
@pytest.mark.usefixtures("native_device")
def test_relay_direct_relay_direct_on_one_session(lab: Lab, tmp_path: Path) -> None:
    a, b = lab.host("a"), lab.host("b")
    lan = lab.lan("lan", [a, b], subnet="192.0.2.0/24")
    ka, kb = NodePrivate.generate(), NodePrivate.generate()
    da, db = DiscoPrivate.generate(), DiscoPrivate.generate()
    a_ep, b_ep = f"{lan.ip(a)}:{PORT}", f"{lan.ip(b)}:{PORT}"

    def args(me: NodePrivate, peer: NodePrivate, dme: DiscoPrivate, dpeer: DiscoPrivate) -> list[str]:
        return [
            *("--private-key", me.base64(), "--peer-key", peer.public.base64()),
            *("--disco-key", dme.raw.hex(), "--peer-disco", dpeer.public.raw.hex()),
            *("--listen-port", str(PORT)),
        ]

    derp = f"{lan.ip(b)}:{DERP_PORT}"
    b_args = ["--address", f"{B_TUN}/32", "--peer-allowed", f"{A_TUN}/32", "--endpoint", b_ep]
    nb = Node(b, [*args(kb, ka, db, da), *b_args, "--peer-endpoint", a_ep, "--derp-listen", derp])
    nb.wait("listening")
    a_args = ["--address", f"{A_TUN}/32", "--peer-allowed", f"{B_TUN}/32", "--endpoint", a_ep]
    na = Node(a, [*args(ka, kb, da, db), *a_args, "--peer-endpoint", b_ep, "--derp-connect", derp])
    na.wait("ready")
    nb.wait("ready")
    assert na.paths == [] or na.paths[-1][1] is None  # relay until a pong

    ping_log = (tmp_path / "ping.txt").open("w")
    ping = a.popen(["ping", "-n", "-i", "0.2", "-W", "2", B_TUN], stdout=ping_log)
    try:
        t_direct = na.wait_path(direct=True)
        nb.wait_path(direct=True)
        assert na.paths[-1][1] == b_ep and nb.paths[-1][1] == a_ep
        time.sleep(1.0)
        sa, sb = na.stats(), nb.stats()
        hs = (sa["device"]["handshakes_sent"], sb["device"]["handshakes_sent"])
        assert sa["peers"][0]["path"] == "direct" and sa["peers"][0]["endpoint"] == b_ep
        udp_before = sa["device"]["tx_datagrams"]

        block = lab.block_udp(a, b)
        t_relay = na.wait_path(direct=False)
        nb.wait_path(direct=False)
        time.sleep(1.0)
        assert na.stats()["peers"][0]["path"] == "relay"
        block.remove()
        t_healed = na.wait_path(direct=True)
        nb.wait_path(direct=True)
        time.sleep(1.0)
        sa, sb = na.stats(), nb.stats()
        assert sa["device"]["tx_datagrams"] > udp_before
        # One WireGuard session all along: no handshake after the first, on either side.
        assert (sa["device"]["handshakes_sent"], sb["device"]["handshakes_sent"]) == hs
        assert sa["disco"]["undecryptable"] == 0 and sb["disco"]["undecryptable"] == 0
    finally:
        ping.send_signal(signal.SIGINT)  # ping prints its summary on SIGINT
        with contextlib.suppress(subprocess.TimeoutExpired):
            ping.wait(timeout=5)
        lab.stop(ping)
        ping_log.close()
    out = (tmp_path / "ping.txt").read_text()
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    sent, got = int(m.group(1)), int(m.group(2))
    # Pings are lost only while the dead direct path is still trusted (until the fall back to relay).
    assert sent - got <= (t_relay + 2.0) / 0.2, out
    print(
        f"\ndisco in the lab: direct {t_direct:.2f} s after start, relay {t_relay:.2f} s after UDP was cut, "
        f"direct {t_healed:.2f} s after it healed; ping {got}/{sent} answered"
    )
