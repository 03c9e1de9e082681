"""DERP relay throughput: tailpy's DERP server vs Tailscale's derper, same lab, same load, same run.

Topology: a lab (network namespaces) with a ``relay`` host and a ``clients`` host joined by a veth pair
(198.51.100.0/30). Both servers run on ``relay`` at once, plain HTTP, on ports 3340 (tailpy: ``tailpy derp
serve``) and 3341 (derper ``v1.102.3``, built by ``tests/interop/_tailscale_go.py``); an idle server costs
nothing, and alternating them per row keeps slow drifts of a shared machine from favouring one.

Load: ``benchmarks/derpload`` (Go, Tailscale's own DERP client ``tailscale.com/derp/derphttp`` at the pinned
version, built once into ``~/.cache/tailpy/go-bin/derpload-<hash>/``) on ``clients``: N sender/receiver
pairs, each sender sending ``--size``-byte packets (1200 B: a WireGuard-sized datagram) to its receiver as
fast as the server takes them (TCP backpressure), for ``--warmup`` + ``--seconds`` seconds. Measured at the
receivers: relayed packets/s and Gbit/s (payload bits; DERP framing not counted). From /proc of the server
pid: CPU seconds over the measured run (``cpu%``: of one core), packets relayed per CPU second (the cost per
packet, which a shared machine disturbs less than the rate) and peak RSS (VmRSS sampled every 0.1 s).
``sent/s`` is what the senders handed over; where it is far above ``pkts/s`` the server dropped packets
(derper drops from a full per-client queue, tailpy drops its oldest queued packet). The load generator's
own CPU use is printed too, to show whether it, not the server, was the limit.

Prints a table (``--json`` for JSON) and the ratio tailpy / derper of packets/s per N.
Usage: ``python benchmarks/derp_relay.py [--pairs 1,10,100] [--seconds 5] [--size 1200] [--rate PPS]
[--json] [--only tailpy|derper] [--smoke]`` (``--rate``: pace each sender, in packets/s, instead of full
speed; ``--smoke``: one pair for one second per server, a check in seconds that the benchmark still works,
once derper and derpload are built). Needs root (namespaces) and Go (derper, derpload); without them it
exits 77 (the "skipped" status of automake's test harness) with the reason on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tailpy.errors import TailpyError
from tailpy.lab import Host, Lab, cpu_seconds, wait_for
from tailpy.lab.netns import unavailable_reason
from tailpy.proto import derp as proto

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "interop"))
from _tailscale_go import TAILSCALE_VERSION, build_lock, build_tailscale_tools, cache_dir  # noqa: E402

LOAD_DIR = HERE / "derpload"
PORTS = {"tailpy": 3340, "derper": 3341}
SKIPPED = 77  # exit status: the benchmark could not run here (automake's convention for a skipped test)


@dataclass
class Row:
    server: str
    pairs: int
    pps: float
    gbps: float
    sent_pps: float
    cpu_s: float
    cpu_pct: float
    rss_mib: float
    load_cpu_pct: float
    seconds: float


def build_load_generator() -> Path:
    """``derpload`` built from benchmarks/derpload (cached by a hash of its sources). Raises TailpyError."""
    digest = hashlib.sha256()
    for name in ("main.go", "go.mod", "go.sum"):
        digest.update((LOAD_DIR / name).read_bytes())
    out = cache_dir(TAILSCALE_VERSION).parent / f"derpload-{digest.hexdigest()[:12]}" / "derpload"
    with build_lock(out.parent):  # another process may be building it right now
        if out.is_file():
            return out
        go = shutil.which("go")
        if go is None:
            raise TailpyError("no Go toolchain ('go' on PATH) to build benchmarks/derpload")
        env = {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
        partial = out.with_name(out.name + ".partial")
        done = subprocess.run(
            [go, "build", "-o", str(partial), "."],
            cwd=LOAD_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if done.returncode != 0:
            raise TailpyError(f"cannot build benchmarks/derpload: {done.stderr.strip()[-300:]}")
        partial.replace(out)
    return out


class RssSampler:
    """Peak VmRSS of ``pid`` in KiB, sampled every 0.1 s while running."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def wait_listening(clients: Host, ip: str, port: int, proc: subprocess.Popen[str], what: str) -> None:
    probe = f"import socket; socket.create_connection(({ip!r}, {port}), 1).close()"

    def ready() -> bool:
        if proc.poll() is not None:
            raise TailpyError(f"{what} exited with status {proc.returncode} before listening")
        return clients.run([sys.executable, "-c", probe], check=False, timeout=10).returncode == 0

    wait_for(ready, timeout=30, what=f"{what} to listen on {ip}:{port}", interval=0.2)


def measure(
    clients: Host, load: Path, server: str, pid: int, url: str, pairs: int, args: argparse.Namespace
) -> Row:
    argv = [
        str(load),
        f"-url={url}",
        f"-pairs={pairs}",
        f"-size={args.size}",
        f"-duration={args.seconds}s",
        f"-warmup={args.warmup}s",
        f"-rate={args.rate}",
    ]
    proc = clients.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with RssSampler(pid) as rss:
        time.sleep(args.warmup)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        try:
            out, err = proc.communicate(timeout=args.seconds + args.warmup + 120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise TailpyError(f"derpload against {server} with {pairs} pairs did not finish") from None
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
    if proc.returncode != 0:
        raise TailpyError(f"derpload against {server} failed: {(err or '').strip()[-300:]}")
    res = json.loads(out.strip().splitlines()[-1])
    secs = float(res["seconds"])
    wall = max(t1 - t0, 1e-9)
    cpu = cpu1 - cpu0
    return Row(
        server=server,
        pairs=pairs,
        pps=res["packets"] / secs,
        gbps=res["bytes"] * 8 / secs / 1e9,
        sent_pps=res["sent"] / secs,
        cpu_s=cpu,
        cpu_pct=100 * cpu / wall,
        rss_mib=rss.peak_kib / 1024,
        load_cpu_pct=100 * float(res["cpu_seconds"]) / secs,
        seconds=secs,
    )


def check_args(args: argparse.Namespace) -> str | None:
    """One sentence about the first invalid option, or None when all are usable."""
    parts = [p.strip() for p in args.pairs.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        return f"--pairs {args.pairs!r} must be positive whole numbers separated by commas, like 1,10,100"
    if not args.seconds > 0:
        return f"--seconds {args.seconds:g} must be more than 0"
    if not args.warmup >= 0:
        return f"--warmup {args.warmup:g} must be 0 or more"
    if not 1 <= args.size <= proto.MAX_PACKET_SIZE:
        return (
            f"--size {args.size} must be 1 to {proto.MAX_PACKET_SIZE} bytes (the DERP packet payload limit)"
        )
    if not args.rate >= 0:
        return f"--rate {args.rate:g} must be 0 (as fast as possible) or more"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--pairs", default="1,10,100", help="comma-separated numbers of client pairs")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    ap.add_argument("--size", type=int, default=1200, help="packet size, bytes")
    ap.add_argument(
        "--rate", type=float, default=0, help="packets/s per sender (default 0: as fast as the server takes)"
    )
    ap.add_argument("--only", choices=("tailpy", "derper"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="1 pair, 1 s per server: check it still runs")
    args = ap.parse_args()
    if args.smoke:
        args.pairs, args.seconds, args.warmup = "1", 1.0, 0.2
    problem = check_args(args)
    if problem:
        ap.error(problem)
    pair_counts = [int(p) for p in args.pairs.split(",") if p.strip()]
    why = unavailable_reason()
    if why:
        print(f"derp_relay: skipped: no lab on this machine: {why}", file=sys.stderr)
        return SKIPPED
    tools = build_tailscale_tools()
    if isinstance(tools, str):
        print(f"derp_relay: skipped: {tools}", file=sys.stderr)
        return SKIPPED
    try:
        load = build_load_generator()
    except TailpyError as e:
        print(f"derp_relay: skipped: {e}", file=sys.stderr)
        return SKIPPED
    servers = [s for s in ("tailpy", "derper") if args.only in (None, s)]
    rows: list[Row] = []
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="derp-relay-") as tmp:
        lab.install_signal_handlers()
        relay, clients = lab.host("relay"), lab.host("clients")
        relay_ip, _ = lab.link(relay, clients)
        pids: dict[str, int] = {}
        for name in servers:
            port = PORTS[name]
            state = Path(tmp) / name
            state.mkdir()
            if name == "tailpy":
                proc = relay.python(
                    "tailpy.cli.main", "derp", "serve", "--state-dir", str(state),
                    "--listen", f"{relay_ip}:{port}", stderr=subprocess.DEVNULL,
                )  # fmt: skip
            else:
                proc = relay.popen(
                    [str(tools.derper), "-a", f"{relay_ip}:{port}", "-http-port=-1", "-stun=false",
                     "-home=blank", "-c", str(state / "derper.key")],
                    stderr=subprocess.DEVNULL,
                )  # fmt: skip
            wait_listening(clients, relay_ip, port, proc, name)
            pids[name] = proc.pid
        for n in pair_counts:
            for name in servers:
                url = f"http://{relay_ip}:{PORTS[name]}/derp"
                row = measure(clients, load, name, pids[name], url, n, args)
                rows.append(row)
                if not args.json:
                    print(f"  measured {name} with {n} pairs: {row.pps:,.0f} packets/s", file=sys.stderr)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    print(
        f"DERP relay, {args.size}-byte packets, {args.seconds:g} s per row "
        f"(after {args.warmup:g} s warm-up); derper {tools.version}; "
        f"{os.cpu_count()} CPUs shared with the load generator"
    )
    print(
        f"{'server':<8} {'pairs':>5} {'pkts/s':>10} {'Gbit/s':>7} {'sent/s':>10} {'CPU s':>6} {'cpu%':>5} "
        f"{'RSS MiB':>8} {'pkts/CPU s':>10} {'load cpu%':>9}"
    )
    for r in rows:
        print(
            f"{r.server:<8} {r.pairs:>5} {r.pps:>10,.0f} {r.gbps:>7.3f} {r.sent_pps:>10,.0f} {r.cpu_s:>6.2f} "
            f"{r.cpu_pct:>5.0f} {r.rss_mib:>8.1f} {r.pps * r.seconds / max(r.cpu_s, 1e-9):>10,.0f} "
            f"{r.load_cpu_pct:>9.0f}"
        )
    if len(servers) == 2:
        for n in pair_counts:
            t = next(r for r in rows if r.server == "tailpy" and r.pairs == n)
            d = next(r for r in rows if r.server == "derper" and r.pairs == n)
            ratio = t.pps / d.pps if d.pps else float("inf")
            print(f"ratio tailpy/derper, {n} pairs: {ratio:.2f}x packets/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
