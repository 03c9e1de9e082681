"""Single-stream TCP through an embedded node (tailpy.Node on the userspace data plane) beside TUN-to-TUN.

A lab tailnet (control with its DERP/STUN, two tailpyd nodes on TUNs, ``tun1`` and ``tun2``, all on one
LAN) and a process embedding a :class:`tailpy.Node` on host ``emb``. Each row moves one TCP stream for
``--seconds`` and is measured at the receiver (first byte to EOF):

* ``tun -> embedded``: a plain socket sender on tun1 to the embedded node's server (``Node.create_server``);
* ``embedded -> tun``: the embedded node dials (``Node.dial``) a plain socket receiver on tun1;
* ``tun -> tun``: the same sender and receiver between tun1 and tun2 (the reference).

Sender and receiver are the same small Python programs in every row (this file with ``--role``: 256 KiB
``sendall``/``recv_into`` loops; the embedded node, one process for all rows, uses the event loop's
``sock_sendall`` and a protocol's ``data_received``), so the rows differ only in the data plane. ``CPU
s/Gbit`` is the CPU seconds of both nodes' processes (tailpyd for a TUN node, the whole embedded process:
data plane, stack and application) per gigabit moved. Each direct path is confirmed first (``tailpy ping
--until-direct``). Median of ``--rounds`` (rows alternate within a round).

Usage: ``python benchmarks/embedded.py [--seconds 10] [--rounds 3] [--json] [--smoke]``; ``--smoke``: one
round of 1 s, a check that the benchmark still works. Needs root (network namespaces) and a tailpy._native
with the userspace data plane (``Device.userspace``); otherwise exits 77 with the reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SKIPPED = 77
CHUNK = 256 * 1024
PORT = 5201


# -- the programs at each end (``--role``) ------------------------------------------------------------------


def kernel_sink(port: int) -> None:
    srv = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
    print(json.dumps({"event": "ready"}), flush=True)
    conn, _ = srv.accept()
    buf = bytearray(CHUNK)
    total, start = 0, 0.0
    while n := conn.recv_into(buf):
        if not total:
            start = time.monotonic()
        total += n
    print(json.dumps({"event": "result", "bytes": total, "seconds": time.monotonic() - start}), flush=True)


def kernel_send(host: str, port: int, seconds: float) -> None:
    conn = socket.create_connection((host, port), timeout=30)
    buf = b"\0" * CHUNK
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        conn.sendall(buf)
    conn.close()


def _node(name: str) -> Any:
    import tailpy

    return tailpy.Node(
        control_url=os.environ["TAILPY_CONTROL_URL"],
        auth_key=os.environ["TAILPY_AUTH_KEY"],
        state_dir=Path(os.environ["TAILPY_STATE_ROOT"]) / name,
        hostname=name,
    )


async def node(name: str, port: int) -> None:
    """One embedded node for every row: a sink on TCP ``port`` (a "result" event per connection), and
    "send HOST PORT SECONDS" lines on stdin, each answered by a "sent" event."""
    loop = asyncio.get_running_loop()

    class Sink(asyncio.Protocol):
        total, start = 0, 0.0

        def data_received(self, data: bytes) -> None:
            if not self.total:
                self.start = time.monotonic()
            self.total += len(data)

        def eof_received(self) -> bool:
            secs = time.monotonic() - self.start
            print(json.dumps({"event": "result", "bytes": self.total, "seconds": secs}), flush=True)
            return False

    async with _node(name) as n:
        await n.create_server(Sink, port)
        print(json.dumps({"event": "ready", "ip": str(n.addresses[0])}), flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            _, host, dport, seconds = line.split()
            sock = await n.dial(host, int(dport))
            buf = b"\0" * CHUNK
            end = time.monotonic() + float(seconds)
            while time.monotonic() < end:
                await loop.sock_sendall(sock, buf)
            sock.close()
            print(json.dumps({"event": "sent"}), flush=True)


def role(argv: list[str]) -> None:
    r, *args = argv
    if r == "kernel-sink":
        kernel_sink(int(args[0]))
    elif r == "kernel-send":
        kernel_send(args[0], int(args[1]), float(args[2]))
    elif r == "node":
        asyncio.run(node(args[0], int(args[1])))
    else:
        raise SystemExit(f"unknown role {r}")


# -- the lab ---------------------------------------------------------------------------------------------


def _read_event(proc: subprocess.Popen[str], name: str, timeout: float = 120) -> dict[str, Any]:
    from tailpy.lab.procs import read_line

    assert proc.stdout is not None
    while True:
        line = read_line(proc.stdout, timeout, f"{name} from a benchmark end")
        if line.startswith("{"):
            ev: dict[str, Any] = json.loads(line)
            if ev["event"] == name:
                return ev


def measure(seconds: float, rounds: int) -> dict[str, list[dict[str, float]]]:
    from tailpy.lab import Lab, cpu_seconds
    from tailpy.lab.tailnet import LabTailnet

    me = [sys.executable, str(Path(__file__).resolve()), "--role"]
    rows: dict[str, list[dict[str, float]]] = {"tun -> embedded": [], "embedded -> tun": [], "tun -> tun": []}
    with Lab() as lab:
        tailnet = LabTailnet(lab)
        tailnet.start_control()
        key = tailnet.authkey()
        tun1, tun2 = tailnet.connected("tun1", "tun2")
        emb_host = tailnet.public_host("emb")
        root = Path(tempfile.mkdtemp(prefix="tailpy-bench-emb-"))
        lab.track_path(root)
        env = {
            "TAILPY_CONTROL_URL": tailnet.control_url,
            "TAILPY_AUTH_KEY": key,
            "TAILPY_STATE_ROOT": str(root),
            "PYTHONPATH": os.pathsep.join(
                p
                for p in (str(Path(__file__).resolve().parents[1] / "python"), os.environ.get("PYTHONPATH"))
                if p
            ),
        }

        def direct(src: Any, ip: str) -> None:
            src.cli("ping", "--until-direct", "-c", "20", "--timeout", "2", ip, check=False, timeout=120)

        def result(rx: subprocess.Popen[str], pids: list[int], run: Any) -> dict[str, float]:
            cpu0 = sum(cpu_seconds(p) for p in pids)
            run()
            ev = _read_event(rx, "result", timeout=seconds + 60)
            cpu = sum(cpu_seconds(p) for p in pids) - cpu0
            gbit = ev["bytes"] * 8 / 1e9
            return {"gbps": gbit / ev["seconds"], "cpu_per_gbit": cpu / gbit if gbit else 0.0}

        emb = emb_host.popen(
            [*me, "node", "emb", str(PORT)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        emb_ip = _read_event(emb, "ready")["ip"]
        tun1.wait_peers(2)
        tun2.wait_peers(2)
        assert tun1.daemon is not None and tun2.daemon is not None
        ip1, ip2 = tun1.ip(), tun2.ip()
        direct(tun1, emb_ip)
        direct(tun1, ip2)

        def send(seconds: float = seconds) -> None:
            assert emb.stdin is not None
            emb.stdin.write(f"send {ip1} {PORT + 1} {seconds}\n")
            emb.stdin.flush()

        for _ in range(rounds):
            # tun1 -> embedded
            tx = [*me, "kernel-send", emb_ip, str(PORT), str(seconds)]
            rows["tun -> embedded"].append(
                result(
                    emb,
                    [emb.pid, tun1.daemon.pid],
                    functools.partial(tun1.host.run, tx, timeout=seconds + 60),
                )
            )
            # embedded -> tun1
            rx = tun1.host.popen([*me, "kernel-sink", str(PORT + 1)], stdout=subprocess.PIPE)
            _read_event(rx, "ready")
            rows["embedded -> tun"].append(result(rx, [emb.pid, tun1.daemon.pid], send))
            _read_event(emb, "sent")
            lab.stop(rx)
            # tun1 -> tun2
            rx = tun2.host.popen([*me, "kernel-sink", str(PORT + 2)], stdout=subprocess.PIPE)
            _read_event(rx, "ready")
            tx2 = [*me, "kernel-send", ip2, str(PORT + 2), str(seconds)]
            rows["tun -> tun"].append(
                result(
                    rx,
                    [tun1.daemon.pid, tun2.daemon.pid],
                    functools.partial(tun1.host.run, tx2, timeout=seconds + 60),
                )
            )
            lab.stop(rx)
        lab.stop(emb)
    return rows


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--role"]:
        role(args_in[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=10.0, help="length of each stream, seconds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--smoke", action="store_true", help="one round of 1 s: check that the benchmark runs")
    args = p.parse_args(args_in)
    from tailpy.lab.netns import unavailable_reason

    why = unavailable_reason()
    if why is None:
        from tailpy import _native

        if not hasattr(_native.Device, "userspace"):
            why = "tailpy._native has no userspace data plane (Device.userspace): build the netstack"
    if why is not None:
        print(f"embedded.py: skipped: {why}", file=sys.stderr)
        return SKIPPED
    seconds, rounds = (1.0, 1) if args.smoke else (args.seconds, args.rounds)
    rows = measure(seconds, rounds)
    med = {
        name: {k: statistics.median(r[k] for r in runs) for k in ("gbps", "cpu_per_gbit")}
        for name, runs in rows.items()
    }
    ref = med["tun -> tun"]["gbps"]
    if args.json:
        print(json.dumps({"seconds": seconds, "rounds": rounds, "median": med, "runs": rows}, indent=1))
        return 0
    print(f"single-stream TCP, {seconds:g} s x {rounds} round(s), median")
    print(f"{'path':<18} {'Gbit/s':>8} {'vs tun->tun':>12} {'CPU s/Gbit':>11}")
    for name, m in med.items():
        ratio = m["gbps"] / ref if ref else 0.0
        print(f"{name:<18} {m['gbps']:>8.2f} {ratio:>11.2f}x {m['cpu_per_gbit']:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
