"""Connect time over the NAT matrix: from both nodes' ``tailpy up`` to the first pong on the final path.

For each cell of the NAT matrix (the topologies of ``tests/integration/test_nat_matrix.py``: two nodes
behind lab routers of the given kinds, or on one site LAN), each run starts two fresh ``tailpyd`` (their
start is not timed: a machine whose daemon already runs), then at t=0 starts ``tailpy up --auth-key`` on
both at the same moment. As soon as node a's netmap holds b (its local API polled every 20 ms), a runs
``tailpy ping --until-direct -c 40 --timeout 5 <b's tailnet IPv4>``, whose output lines are timestamped as
they arrive. Measured from t=0, in seconds:

* ``connect``: the first pong over a direct path ("via ip:port") where the cell expects one, the first
  pong over DERP where it does not (EDM on both sides, or one EDM layer): how long a user waits before
  the tunnel runs on the path it will keep;
* ``up``: both ``tailpy up`` commands returned (registered, first netmap);
* ``ping started``: a's netmap held b and ``tailpy ping`` was started (the rest of ``connect`` is that
  command starting and path discovery);
* ``first pong``: the first pong of any path (over DERP while hole punching is under way).

``up``, ``ping started`` and ``first pong`` are medians too.

**First reply with plain ping** (real traffic, no disco ping): each cell also has ``--runs`` runs with fresh
nodes where, the moment a's netmap holds b, a runs iputils ``ping -n -c 3 <b's tailnet IPv4>`` (one echo
request a second, as a user types it) and nothing else. ``first reply`` is the time from ``ping`` starting to
its first echo reply (median, and max), ``lost`` the echo requests sent before the one first answered
(median; 0: the very first one was answered). The first WireGuard handshake goes out while the direct path
is still unknown: it goes over DERP too, and is sent again at once when a path is confirmed, so the first
echo request (queued in the data plane until the handshake completes) is answered.

Each figure includes starting the ``tailpy`` CLI processes (a Python interpreter each, about 0.3-0.5 s on
a busy 2-core machine), as a user's would. Each cell has a lab of its own (one control server with its
embedded DERP/STUN); runs of a cell share it, with fresh nodes each run. Median, min and max over
``--runs`` (default 3). A run that should go direct and does not is counted as failed (``fail`` column).

Usage: ``python benchmarks/connect_time.py [--runs 3] [--cells eim-eim,edm-edm] [--json] [--smoke]``.
``--smoke``: one run of the ``eim-eim`` cell, a check (in seconds) that the benchmark still works. Needs root
(network namespaces); without them it exits 77 (the "skipped" status of automake's test harness) with the
reason on stderr. Exits 1 when a run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from tailpy.daemon.client import LocalClient
from tailpy.errors import TailpyError
from tailpy.ipnstate import Status
from tailpy.lab import Lab, stop_process, wait_for
from tailpy.lab.matrix import CELLS, Cell
from tailpy.lab.netns import unavailable_reason
from tailpy.lab.tailnet import LabNode, LabTailnet, tailpy_argv

PONG = re.compile(r"^pong from \S+ \([^)]+\) via (?P<via>\S+) in ")
ECHO_REPLY = re.compile(r"bytes from \S+: icmp_seq=(?P<seq>\d+) ")
PLAIN_PING_COUNT = 3
PING_COUNT = 40
SKIPPED = 77  # exit status: the benchmark could not run here (automake's convention for a skipped test)
SMOKE_CELL = "eim-eim"


@dataclass
class Run:
    up: float | None = None
    ping_start: float | None = None  # a's netmap held b and `tailpy ping` was started
    first_pong: float | None = None
    connect: float | None = None  # first direct pong (direct cells) or first DERP pong (relay cells)
    first_via: str = ""
    last_via: str = ""
    error: str = ""


@dataclass
class PlainRun:
    """One run with plain ``ping``: seconds from ``ping`` starting to its first echo reply, and how many echo
    requests went unanswered before it (None: no reply at all)."""

    first_reply: float | None = None
    lost: int | None = None
    error: str = ""


@dataclass
class Row:
    cell: str
    expected: str
    runs: int
    failed: int
    connect_median: float | None
    connect_min: float | None
    connect_max: float | None
    up_median: float | None
    ping_start_median: float | None
    first_pong_median: float | None
    first_reply_median: float | None = None  # plain ping: seconds from its start to the first echo reply
    first_reply_max: float | None = None
    lost_median: float | None = None  # echo requests unanswered before the first reply
    plain_failed: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    plain_samples: list[dict[str, Any]] = field(default_factory=list)


def _status(node: LabNode) -> Status:
    async def get() -> Status:
        return await LocalClient(node.socket).status()

    return asyncio.run(get())


def _sees(node: LabNode, other: str) -> bool:
    try:
        st = _status(node)
    except TailpyError:
        return False
    return any(p.hostname == other and p.addresses for p in st.peers)


def _up(node: LabNode, key: str) -> subprocess.Popen[str]:
    argv = tailpy_argv(
        "up", "--login-server", node.tailnet.control_url, "--hostname", node.name, "--auth-key", key
    )
    return node.host.popen(
        [*argv, "--socket", node.socket], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _nodes(net: LabTailnet, cell: Cell, names: tuple[str, str]) -> tuple[LabNode, LabNode]:
    if cell.same_lan:
        site = f"lan{len(net.sites) + 1}"
        return net.add_node(names[0], behind=cell.a, lan=site), net.add_node(names[1], lan=site)
    return net.add_node(names[0], behind=cell.a), net.add_node(names[1], behind=cell.b)


def _peer_ip(a: LabNode, b: LabNode) -> str:
    """b's tailnet IPv4 address as a's netmap has it, once it does (polled every 20 ms)."""
    wait_for(lambda: _sees(a, b.name), timeout=60, what=f"{a.name} to see {b.name}", interval=0.02)
    return next(p for p in _status(a).peers if p.hostname == b.name).addresses[0].split("/")[0]


def plain_run(net: LabTailnet, key: str, cell: Cell, index: int) -> PlainRun:
    """Both nodes up at once; the moment a sees b, plain ``ping`` from a to b (and nothing else)."""
    a, b = _nodes(net, cell, (f"{cell.id[:10]}-{index}p", f"{cell.id[:10]}-{index}q"))
    run = PlainRun()
    ping: subprocess.Popen[str] | None = None
    ups: list[subprocess.Popen[str]] = []
    try:
        ups = [_up(a, key), _up(b, key)]
        b_ip = _peer_ip(a, b)
        t0 = time.monotonic()
        ping = a.host.popen(
            ["ping", "-n", "-c", str(PLAIN_PING_COUNT), b_ip],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert ping.stdout is not None
        for line in ping.stdout:
            m = ECHO_REPLY.search(line)
            if m:
                run.first_reply, run.lost = time.monotonic() - t0, int(m["seq"]) - 1
                break
        else:
            run.error = f"no echo reply to {PLAIN_PING_COUNT} echo requests"
        for proc in ups:
            proc.wait(timeout=120)
    except (TailpyError, subprocess.TimeoutExpired) as e:
        run.error = str(e)
    finally:
        if ping is not None:
            stop_process(ping)
        for proc in ups:
            stop_process(proc)
        a.stop_daemon()
        b.stop_daemon()
    return run


def one_run(net: LabTailnet, key: str, cell: Cell, index: int) -> Run:
    names = (f"{cell.id[:10]}-{index}a", f"{cell.id[:10]}-{index}b")
    a, b = _nodes(net, cell, names)
    run = Run()
    ping: subprocess.Popen[str] | None = None
    try:
        t0 = time.monotonic()
        ups = [_up(a, key), _up(b, key)]
        done_at = [0.0, 0.0]

        def reap(i: int) -> None:
            ups[i].wait(timeout=120)
            done_at[i] = time.monotonic()

        reapers = [threading.Thread(target=reap, args=(i,), daemon=True) for i in (0, 1)]
        for t in reapers:
            t.start()
        b_ip = _peer_ip(a, b)
        argv = tailpy_argv(
            "ping", "--until-direct", "-c", str(PING_COUNT), "--timeout", "5", b_ip, "--socket", a.socket
        )
        run.ping_start = time.monotonic() - t0
        ping = a.host.popen(
            argv, env={"PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert ping.stdout is not None
        for line in ping.stdout:
            now = time.monotonic() - t0
            m = PONG.match(line.strip())
            if not m:
                continue
            via = m["via"]
            derp = via.startswith("DERP(")
            if run.first_pong is None:
                run.first_pong, run.first_via = now, via
            run.last_via = via
            if run.connect is None and derp != cell.direct:
                run.connect = now
                if not cell.direct:
                    break  # the first relayed pong is all a relay cell measures
        for t in reapers:
            t.join(timeout=120)
        for i, proc in enumerate(ups):
            if proc.returncode != 0:
                err = proc.stderr.read() if proc.stderr else ""
                run.error = f"tailpy up on {names[i]} failed: {err.strip()}"
        run.up = max(done_at) - t0 if all(done_at) else None
        if cell.direct and run.connect is None:
            run.error = run.error or f"no direct pong (last via {run.last_via or 'nothing'})"
    except TailpyError as e:
        run.error = str(e)
    finally:
        if ping is not None:
            stop_process(ping)
        a.stop_daemon()
        b.stop_daemon()
    return run


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def measure(cell: Cell, runs: int, quiet: bool) -> Row:
    samples: list[Run] = []
    plain: list[PlainRun] = []
    with Lab() as lab:
        net = LabTailnet(lab)
        net.start_control()
        key = net.authkey(reusable=True)
        for i in range(runs):
            r = one_run(net, key, cell, i)
            samples.append(r)
            if not quiet:
                c = f"{r.connect:.2f} s" if r.connect is not None else "-"
                print(
                    f"  {cell.id} run {i + 1}: connect {c} (first pong {r.first_via or '-'}, "
                    f"last {r.last_via or '-'}){' ERROR ' + r.error if r.error else ''}",
                    file=sys.stderr,
                    flush=True,
                )
        for i in range(runs):
            p = plain_run(net, key, cell, i)
            plain.append(p)
            if not quiet:
                f = f"{p.first_reply:.2f} s, {p.lost} lost" if p.first_reply is not None else "-"
                err = f" ERROR {p.error}" if p.error else ""
                print(
                    f"  {cell.id} plain ping {i + 1}: first reply {f}{err}",
                    file=sys.stderr,
                    flush=True,
                )
    replied = [p for p in plain if not p.error and p.first_reply is not None]
    ok = [r for r in samples if not r.error and r.connect is not None]
    connect = [r.connect for r in ok if r.connect is not None]
    return Row(
        cell=cell.id,
        expected="direct" if cell.direct else "relay",
        runs=runs,
        failed=runs - len(ok),
        connect_median=_median(connect),
        connect_min=min(connect) if connect else None,
        connect_max=max(connect) if connect else None,
        up_median=_median([r.up for r in ok if r.up is not None]),
        ping_start_median=_median([r.ping_start for r in ok if r.ping_start is not None]),
        first_pong_median=_median([r.first_pong for r in ok if r.first_pong is not None]),
        first_reply_median=_median([p.first_reply for p in replied if p.first_reply is not None]),
        first_reply_max=max((p.first_reply for p in replied if p.first_reply is not None), default=None),
        lost_median=_median([float(p.lost) for p in replied if p.lost is not None]),
        plain_failed=runs - len(replied),
        samples=[asdict(r) for r in samples],
        plain_samples=[asdict(p) for p in plain],
    )


def _f(x: float | None) -> str:
    return f"{x:.2f}" if x is not None else "-"


def table(rows: list[Row]) -> str:
    lines = [
        "| cell | path | connect median (s) | min | max | up (s) | ping started (s) | first pong (s) "
        "| failed | first reply, plain ping (s) | max | lost | failed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.cell} | {r.expected} | {_f(r.connect_median)} | {_f(r.connect_min)} | "
            f"{_f(r.connect_max)} | {_f(r.up_median)} | {_f(r.ping_start_median)} | "
            f"{_f(r.first_pong_median)} | {r.failed}/{r.runs} | {_f(r.first_reply_median)} | "
            f"{_f(r.first_reply_max)} | {_f(r.lost_median)} | {r.plain_failed}/{r.runs} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per cell (fresh nodes each)")
    ap.add_argument(
        "--cells",
        default="",
        help="comma-separated cell ids (default: all): " + ", ".join(c.id for c in CELLS),
    )
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--smoke", action="store_true", help=f"one run of {SMOKE_CELL}: check it still runs")
    args = ap.parse_args()
    if args.smoke:
        args.runs, args.cells = 1, SMOKE_CELL
    reason = unavailable_reason()
    if reason:
        print(f"connect_time: skipped: no lab on this machine: {reason}", file=sys.stderr)
        return SKIPPED
    if args.runs < 1:
        print("connect_time: --runs must be at least 1", file=sys.stderr)
        return 2
    wanted = [c for c in args.cells.split(",") if c]
    by_id = {c.id: c for c in CELLS}
    unknown = [c for c in wanted if c not in by_id]
    if unknown:
        print(
            f"connect_time: unknown cell(s) {', '.join(unknown)}; known: {', '.join(by_id)}", file=sys.stderr
        )
        return 2
    cells = [by_id[c] for c in wanted] if wanted else CELLS
    rows = [measure(c, args.runs, args.json) for c in cells]
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(table(rows))
    return 0 if all(r.failed == 0 and r.plain_failed == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
