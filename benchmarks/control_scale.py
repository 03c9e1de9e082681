"""Control server scale: N simulated nodes streaming their netmaps from one `tailpy control serve` process.

    .venv/bin/python benchmarks/control_scale.py --nodes 1000,10000 [--workers 4] [--policy none,realistic]
        [--plain] [--replicas 2] [--json] [--smoke]

The server is a real subprocess on 127.0.0.1 with its own state dir. Simulated nodes live in ``--workers``
separate processes (each holding thousands of streams): each has its own machine key and NaCl boxes and talks
the real protocol through ``ControlClient`` (``stream_messages``: every message is opened and checked, full
netmaps are not parsed into Node objects, but every message is opened, checked and inflated). The clients
accept zstd and peer patches (:mod:`tailpy.proto.mapcodec`) unless ``--plain``. Measured, per N:

* streams up: seconds from the last registration to every node holding its first netmap
  (``streams_up_s``; ``all_streams_ready_s`` counts from the start, registrations included), and the mean
  size of a first netmap on the wire and as JSON (``first_map_kib``, ``first_map_json_kib``);
* change: one node changes its endpoints; seconds until every other node has the delta (p50, p99, max),
  and the mean size of that delta on the wire (``change_delta_bytes``);
* join: a new node registers and opens its stream; seconds until every other node has seen it (p50, p99);
* server CPU seconds (utime+stime from /proc/<pid>/stat) spent in the change and in the whole run, and its
  peak RSS (VmHWM, MiB).

Each N runs once per ``--policy``: ``none`` (no policy: every node sees every other, filters allow all) and
``realistic``, a policy of the shape large tailnets run (:func:`realistic_policy`: 20 groups, 10 tags, 100
rules, one of them to ``10.0.0.0/8:*``, one from ``*`` to ``tag:web:443``) over N/4 users (three in ten
nodes tagged, the rest 2-3 devices per user), given with ``serve --policy FILE``. The node that moves and the
joiner are ``tag:web`` servers, which every node may reach, so every node sees them in both runs. With a
policy the run also measures a policy change: a rule letting ``tag:t1`` reach every node on one port is
added to the file and the server is sent SIGHUP; seconds until every node has its new packet filter
(``policy_p50_s``, ``policy_p99_s``), and the server CPU it took.

With ``--replicas R`` (2 or more) the run starts a throwaway PostgreSQL (as the store tests do,
``tests/unit/_postgres.py``; exits 77 with the reason when none can start) and R ``control serve --db``
replicas on it (no embedded relay or STUN). Every node is given every replica's URL, node g starting on
replica g mod R, so the nodes spread evenly; the moving node streams from the first replica and the joiner
registers with the last, so change and join cross replicas. CPU is the replicas' sum, ``server_peak_rss_mib``
the largest and ``replica_peak_rss_mib`` each one's. At the end the last replica is sent SIGKILL: its
nodes' streams break and each opens its stream again after half a second (tailpyd's first backoff step) on
the next URL of its list, resuming from the last message it had (as tailpyd does: ``resume`` with the
message's generation, version and feed resume point, so another replica of the database may answer with a
delta instead of a full netmap); ``failover_p50_s`` / ``failover_max_s`` are the seconds from the kill until
each had its first message from another replica (``failover_moved`` of ``failover_nodes``;
``failover_resumed``: how many of those were deltas). The policy run is left out.

Each measurement starts once the server is quiet (under a tenth of a core for a second: the last streams
to open have had their deltas; ``settle_s`` is how long that took after all streams were up), so a figure
is the measured change alone. The state directory is removed at the end.

Clients and server share the machine's cores, so figures are upper bounds of the server's own latency.
Exits 1 when some node never saw the change, the join or the policy change within ``--timeout``.
``--smoke``: 20 nodes in one client process, both policy modes (with ``--replicas``: no policy), a check
(in seconds) that the benchmark still works; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import nacl.public

from tailpy.control.client import ControlClient
from tailpy.control.store import Store
from tailpy.endpoint import Endpoint
from tailpy.errors import ControlError
from tailpy.keys import MachinePrivate, NodePublic

TAILPY = str(Path(sys.executable).with_name("tailpy"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
HEAD = re.compile(
    rb'\{"type":"(?:netmap|delta)"(?:,"generation":"([0-9a-f]+)")?,"version":(\d+)(?:,"feed":"([^"]+)")?'
)
"""The start of a netmap or delta message: generation (netmaps and resumed deltas), version, resume point."""
RECONNECT = 0.5  # seconds before a simulated node opens its stream again (tailpyd's first backoff step)
SKIPPED = 77  # exit status: cannot run here (automake's "skipped"), the reason on stderr
UNIT_TESTS = Path(__file__).resolve().parents[1] / "tests" / "unit"  # _postgres.py: a throwaway PostgreSQL


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def server_cpu(pids: list[int]) -> float:
    """utime + stime of the processes ``pids`` together, seconds."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def server_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_quiet(pids: list[int], limit: float = 300.0, window: float = 1.0, busy: float = 0.1) -> float:
    """Wait (at most ``limit`` seconds) until the servers used under ``busy`` of a core over ``window``
    seconds: the streams that opened last have had their deltas, so what is measured next is the
    measured change alone. Returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        c0 = server_cpu(pids)
        time.sleep(window)
        if server_cpu(pids) - c0 < busy * window:
            break
    return time.monotonic() - t0


def new_key() -> MachinePrivate:
    return MachinePrivate(bytes(nacl.public.PrivateKey.generate()))


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] if s else float("nan")


# --- worker process: many simulated nodes ---


async def worker_main(
    urls: list[str], auth_keys: list[str], count: int, index: int, pipe: Connection, compact: bool
) -> None:
    """``urls``: each node's control URL list (one URL, or the replicas' URLs separated by commas, the one it
    streams from first). ``auth_keys``: one per node (whose owner or tags it gets). ``compact``: the clients
    accept zstd and peer patches (else plain JSON, as older clients). A stream that ends is opened again
    after :data:`RECONNECT` seconds (on the next URL of the node's list, as tailpyd's session does)."""
    sem = asyncio.Semaphore(32)
    clients = [ControlClient(urls[i], new_key(), stream_silence=600) for i in range(count)]
    node_keys = [NodePublic(bytes(nacl.public.PrivateKey.generate().public_key)) for _ in range(count)]

    async def register(i: int) -> None:
        async with sem:
            await clients[i].register(node_keys[i], f"w{index}-{i}", auth_keys[i])

    await asyncio.gather(*(register(i) for i in range(count)))
    pipe.send(("registered", count))

    ready = asyncio.Event()
    got_full = 0
    first_bytes: list[int] = []  # wire bytes of each first map (base64 line)
    first_raw: list[int] = []  # its JSON once opened (and inflated)
    marker_bytes: dict[bytes, list[int]] = {}  # marker -> wire bytes of the messages that brought it
    seen: dict[bytes, dict[int, float]] = {}  # marker -> node index -> first arrival (monotonic)
    mover_too: set[bytes] = set()  # markers the moving node (0, 0) also waits for
    stream_url: dict[int, str] = {}  # node index -> the URL its current stream came up on
    reopened: dict[int, float] = {}  # node index -> when its last reopened stream brought its netmap
    resumed: set[int] = set()  # node indexes whose last reopened stream began with a delta
    resume: dict[int, tuple[str, int, str | None]] = {}  # node index -> its resume point (last message)

    async def follow(i: int) -> None:
        nonlocal got_full
        initial = True
        while True:
            held = initial
            if held:
                await sem.acquire()  # only the first connecting is throttled
            try:
                url = clients[i].server_url
                it = clients[i].stream_messages(
                    node_keys[i],
                    [Endpoint.parse(f"192.0.2.{index}:{i + 1}")],
                    f"w{index}-{i}",
                    resume=resume.get(i),
                    accept=None if compact else [],
                )
                first = True
                async for msg in it:
                    now = time.monotonic()
                    head = HEAD.match(msg.raw, 0, 240)
                    if head is not None:  # (what tailpyd keeps to resume: generation, version, feed)
                        gen, feed = head[1], head[3]
                        old = resume.get(i)
                        g = gen.decode() if gen else (old[0] if old else "")
                        f = feed.decode() if feed else (old[2] if old else None)
                        resume[i] = (g, int(head[2]), f)
                    if first:
                        first = False
                        stream_url[i] = url
                        if not initial:
                            reopened[i] = now
                            if msg.type == "delta":
                                resumed.add(i)
                            continue
                        initial = False
                        got_full += 1
                        first_bytes.append(msg.wire_bytes)
                        first_raw.append(len(msg.raw))
                        if got_full == count:
                            ready.set()
                        held = False
                        sem.release()
                        await asyncio.sleep(0)
                        continue
                    for marker, times in seen.items():
                        if i in times or marker not in msg.raw:
                            continue
                        if (index, i) != (0, 0) or marker in mover_too:  # (0, 0) moves
                            times[i] = now
                            marker_bytes.setdefault(marker, []).append(msg.wire_bytes)
            except ControlError:
                pass
            finally:
                if held:
                    sem.release()
            await asyncio.sleep(RECONNECT)

    tasks = [asyncio.create_task(follow(i)) for i in range(count)]
    await ready.wait()
    pipe.send(("ready", (first_bytes, first_raw)))
    loop = asyncio.get_running_loop()
    moving: set[int] = set()
    while True:
        cmd, arg = await loop.run_in_executor(None, pipe.recv)
        if cmd == "watch":
            marker, everyone = arg
            seen[marker.encode()] = {}
            if everyone:
                mover_too.add(marker.encode())
            pipe.send(("ok", None))
        elif cmd == "collect":
            marker, expect, deadline = arg
            while len(seen[marker.encode()]) < expect and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            m = marker.encode()
            pipe.send(("times", (list(seen[m].values()), marker_bytes.get(m, []))))
        elif cmd == "move":  # node 0 of this worker changes its endpoints to the marker
            await clients[0].update_endpoints([arg])
            pipe.send(("ok", None))
        elif cmd == "failover-watch":  # the nodes streaming from replica ``arg``, about to be killed
            moving = {i for i, u in stream_url.items() if u == arg}
            reopened.clear()
            resumed.clear()
            pipe.send(("count", len(moving)))
        elif cmd == "failover-collect":  # when each of them had its netmap from another replica
            deadline = arg
            while not moving <= reopened.keys() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            pipe.send(("times", ([reopened[i] for i in moving if i in reopened], len(moving & resumed))))
        elif cmd == "stop":
            break
    for t in tasks:
        t.cancel()
    for c in clients:
        await c.close()


def worker(
    urls: list[str], auth_keys: list[str], count: int, index: int, pipe: Connection, compact: bool
) -> None:
    raise_nofile()
    asyncio.run(worker_main(urls, auth_keys, count, index, pipe, compact))


# --- the policy ---

GROUPS, TAGS, RULES = 20, 10, 100
POLICY_PORT = 9173
"""The port of the rule a policy change adds (no other rule names it: its JSON is the change's marker)."""


def realistic_policy(users: int, *, seed: int = 7) -> str:
    """A policy of the shape large tailnets run, over users ``user0`` .. ``user{users-1}``: 20 groups (each
    user in one, every fifth in a second), 10 tags (``tag:web``, ``tag:t1`` ..) owned by ``group:g0``, 100
    ACL rules: ``group:g1`` to ``10.0.0.0/8:*``, ``*`` to ``tag:web:443``, then groups and tags reaching
    tags and groups on ports of everyday services, a fifth of them for one protocol only. HuJSON text."""
    rnd = random.Random(seed)
    groups: dict[str, list[str]] = {f"group:g{g}": [] for g in range(GROUPS)}
    for u in range(users):
        groups[f"group:g{u % GROUPS}"].append(f"user{u}@")
        if u % 5 == 0:
            groups[f"group:g{(u * 7 + 3) % GROUPS}"].append(f"user{u}@")
    tags = ["tag:web"] + [f"tag:t{i}" for i in range(1, TAGS)]
    ports = ["22", "80,443", "5432", "8000-8999", "*", "53", "3000-3100,9090"]
    acls: list[dict[str, Any]] = [
        {"action": "accept", "src": ["group:g1"], "dst": ["10.0.0.0/8:*"]},
        {"action": "accept", "src": ["*"], "dst": ["tag:web:443"]},
    ]
    while len(acls) < RULES:
        src = rnd.choice(list(groups)) if rnd.random() < 0.7 else rnd.choice(tags)
        dst = rnd.choice(tags) if rnd.random() < 0.7 else rnd.choice(list(groups))
        rule: dict[str, Any] = {"action": "accept", "src": [src], "dst": [f"{dst}:{rnd.choice(ports)}"]}
        if rnd.random() < 0.2:
            rule["proto"] = rnd.choice(["tcp", "udp"])
        acls.append(rule)
    body = {"groups": groups, "tagOwners": {t: ["group:g0"] for t in tags}, "acls": acls}
    return "// control_scale.py's realistic policy\n" + json.dumps(body, indent=1)


def with_policy_change(text: str) -> str:
    """``text`` plus a rule letting ``tag:t1`` reach every node on :data:`POLICY_PORT` (every filter
    changes)."""
    body = json.loads(text.split("\n", 1)[1])
    body["acls"].append({"action": "accept", "src": ["tag:web"], "dst": [f"*:{POLICY_PORT}"]})
    return "// control_scale.py's realistic policy, changed\n" + json.dumps(body, indent=1)


def node_keys(n: int, users: list[str], tag_keys: list[str]) -> list[str]:
    """Which auth key node ``g`` (0 .. n-1) registers with: node 0 (the one that moves) ``tag:web``, three in
    ten tagged (the tags in turn), the others users' devices (the users in turn)."""
    out = []
    for g in range(n):
        if g == 0:
            out.append(tag_keys[0])
        elif g % 10 < 3:
            out.append(tag_keys[g // 10 % len(tag_keys)])
        else:
            out.append(users[g % len(users)])
    return out


# --- the run ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ask(pipes: list[Connection], cmd: str, arg: Any) -> list[Any]:
    for p in pipes:
        p.send((cmd, arg))
    return [p.recv()[1] for p in pipes]


def serves_policy_files() -> bool:
    """Whether ``tailpy control serve`` takes ``--policy FILE``."""
    out = subprocess.run([TAILPY, "control", "serve", "--help"], capture_output=True, text=True, check=False)
    return "--policy" in out.stdout


def prepare(state: str, n: int, policy: bool, db: str | None) -> tuple[list[str], str, Path | None]:
    """Users and auth keys made in the database (SQLite in ``state``, or ``db``) before the server starts:
    (one key per node, the joiner's key, the policy file or None)."""
    store = Store(state, db=db)
    try:
        if not policy:
            key = store.create_auth_key(reusable=True, expires=None, now=time.time()).key
            return [key] * n, key, None
        users = max(1, n // 4)
        user_keys = []
        for u in range(users):
            store.create_user(f"user{u}", time.time())
            user_keys.append(
                store.create_auth_key(reusable=True, expires=None, now=time.time(), user=f"user{u}").key
            )
        tags = ["tag:web"] + [f"tag:t{i}" for i in range(1, TAGS)]
        tag_keys = [
            store.create_auth_key(reusable=True, expires=None, now=time.time(), tags=[t]).key for t in tags
        ]
    finally:
        store.close()
    path = Path(state) / "policy.hujson"
    path.write_text(realistic_policy(users))
    return node_keys(n, user_keys, tag_keys), tag_keys[0], path


def start_server(
    state: str, db: str | None, name: str, policy_file: Path | None
) -> tuple[subprocess.Popen[bytes], str]:
    """`tailpy control serve` on a free port of 127.0.0.1, its log in ``state``/serve.log; with ``db`` a
    replica named ``name`` on that database (no embedded relay, no STUN: replicas on one host would share
    their ports). Returns (process, URL) once it accepts connections."""
    port = free_port()
    cmd = [TAILPY, "control", "serve", "--state-dir", state, "--listen", f"127.0.0.1:{port}"]
    if db is not None:
        cmd += ["--db", db, "--replica-id", name, "--no-derp", "--no-stun"]
    if policy_file is not None:
        cmd += ["--policy", str(policy_file)]
    with open(Path(state) / "serve.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def node_urls(urls: list[str], g: int) -> str:
    """Node ``g``'s control URL list: every replica's URL, node ``g`` starting on replica ``g % len(urls)``
    (the nodes spread evenly)."""
    k = g % len(urls)
    return ",".join(urls[k:] + urls[:k])


def run(
    n: int,
    workers: int,
    timeout: float,
    policy: bool,
    compact: bool = True,
    db: str | None = None,
    replicas: int = 1,
) -> dict[str, Any]:
    """One measurement of ``n`` nodes; with ``db`` (a PostgreSQL URL, emptied first) ``replicas`` servers on
    it, the nodes spread over them, and a failover measured at the end (the last replica is killed)."""
    state = tempfile.mkdtemp(prefix="tailpy-control-scale-")
    if db is not None:
        empty_database(db)
    keys, key, policy_file = prepare(state, n, policy, db)
    servers: list[subprocess.Popen[bytes]] = []
    procs: list[mp.process.BaseProcess] = []
    try:
        urls: list[str] = []
        for r in range(replicas):
            sdir = state if replicas == 1 else os.path.join(state, f"r{r}")
            os.makedirs(sdir, exist_ok=True)
            proc, url = start_server(sdir, db, f"r{r}", policy_file)
            servers.append(proc)
            urls.append(url)
        pids = [p.pid for p in servers]
        ctx = mp.get_context("spawn")
        pipes: list[Connection] = []
        per = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
        t0 = time.monotonic()
        for i, count in enumerate(per):
            a, b = ctx.Pipe()
            lo = sum(per[:i])
            mine = keys[lo : lo + count]
            lists = [node_urls(urls, g) for g in range(lo, lo + count)]
            proc_w = ctx.Process(target=worker, args=(lists, mine, count, i, b, compact), daemon=True)
            proc_w.start()
            procs.append(proc_w)
            pipes.append(a)
        [p.recv() for p in pipes]
        t_reg = time.monotonic() - t0
        firsts = [p.recv()[1] for p in pipes]
        t_ready = time.monotonic() - t0
        first_wire = [b for f in firsts for b in f[0]]
        first_json = [b for f in firsts for b in f[1]]
        settle = wait_quiet(pids)

        # One node changes its endpoints (node 0, on the first replica).
        marker = "203.0.113.77:4242"
        ask(pipes, "watch", (marker, False))
        cpu0 = server_cpu(pids)
        start = time.monotonic()
        pipes[0].send(("move", marker))
        pipes[0].recv()
        expect = [c - (1 if i == 0 else 0) for i, c in enumerate(per)]
        times: list[float] = []
        delta_wire: list[int] = []
        for p, e in zip(pipes, expect, strict=True):
            p.send(("collect", (marker, e, start + timeout)))
        for p in pipes:
            got, sizes = p.recv()[1]
            times += got
            delta_wire += sizes
        change = [t - start for t in times]
        cpu_change = server_cpu(pids) - cpu0

        # A node joins (on the last replica): registers and opens its stream; others see its node key.
        async def join() -> tuple[float, str]:
            c = ControlClient(node_urls(urls, replicas - 1), new_key())
            nk = NodePublic(bytes(nacl.public.PrivateKey.generate().public_key))
            ask(pipes, "watch", (nk.text(), False))
            begin = time.monotonic()
            await c.register(nk, "joiner", key)
            it = c.stream_messages(nk, [Endpoint.parse("198.51.100.9:9")], "joiner")
            await it.__anext__()
            await it.aclose()
            await c.close()
            return begin, nk.text()

        wait_quiet(pids)
        begin, nk_text = asyncio.run(join())
        for p, e in zip(pipes, expect, strict=True):  # the mover (0, 0) is not watched
            p.send(("collect", (nk_text, e, begin + timeout)))
        joined: list[float] = []
        for p in pipes:
            joined += [t - begin for t in p.recv()[1][0]]
        # The policy changes: every node gets a new packet filter.
        changed: list[float] = []
        cpu_policy = 0.0
        if policy_file is not None:
            pmarker = f'"First":{POLICY_PORT},'
            ask(pipes, "watch", (pmarker, True))
            wait_quiet(pids)
            policy_file.write_text(with_policy_change(policy_file.read_text()))
            cpu0 = server_cpu(pids)
            begin = time.monotonic()
            for proc in servers:
                proc.send_signal(signal.SIGHUP)
            for p, c in zip(pipes, per, strict=True):
                p.send(("collect", (pmarker, c, begin + timeout)))
            for p in pipes:
                changed += [t - begin for t in p.recv()[1][0]]
            cpu_policy = server_cpu(pids) - cpu0
        cpu_total = server_cpu(pids)
        rss = [round(server_hwm_mib(pid), 1) for pid in pids]
        # Failover: the last replica is killed; its nodes open their streams on another.
        failover: list[float] = []
        moving = resumed_n = 0
        if replicas > 1:
            wait_quiet(pids)
            moving = sum(ask(pipes, "failover-watch", urls[-1]))
            killed = time.monotonic()
            servers[-1].send_signal(signal.SIGKILL)
            servers[-1].wait()
            for p in pipes:
                p.send(("failover-collect", killed + timeout))
            for p in pipes:
                times, n_resumed = p.recv()[1]
                failover += [t - killed for t in times]
                resumed_n += n_resumed
        for pipe in pipes:
            pipe.send(("stop", None))
        row: dict[str, Any] = {
            "nodes": n,
            "replicas": replicas,
            "policy": "realistic" if policy else "none",
            "compact": compact,
            "workers": workers,
            "register_s": round(t_reg, 1),
            "all_streams_ready_s": round(t_ready, 1),
            "streams_up_s": round(t_ready - t_reg, 1),
            "first_map_kib": round(sum(first_wire) / max(1, len(first_wire)) / 1024, 1),
            "first_map_json_kib": round(sum(first_json) / max(1, len(first_json)) / 1024, 1),
            "change_delta_bytes": round(sum(delta_wire) / max(1, len(delta_wire))),
            "settle_s": round(settle, 1),
            "change_received": len(change),
            "expected": n - 1,
            "change_p50_s": round(pct(change, 50), 3),
            "change_p99_s": round(pct(change, 99), 3),
            "change_max_s": round(max(change, default=float("nan")), 3),
            "join_received": len(joined),
            "change_server_cpu_s": round(cpu_change, 2),
            "join_p50_s": round(pct(joined, 50), 3),
            "join_p99_s": round(pct(joined, 99), 3),
            "policy_received": len(changed) if policy else n,
            "policy_p50_s": round(pct(changed, 50), 3) if policy else None,
            "policy_p99_s": round(pct(changed, 99), 3) if policy else None,
            "policy_server_cpu_s": round(cpu_policy, 2) if policy else None,
            "server_cpu_total_s": round(cpu_total, 1),
            "server_peak_rss_mib": max(rss),
        }
        if replicas > 1:
            row |= {
                "replica_peak_rss_mib": rss,
                "failover_nodes": moving,
                "failover_moved": len(failover),
                "failover_resumed": resumed_n,
                "failover_p50_s": round(pct(failover, 50), 2),
                "failover_max_s": round(max(failover, default=float("nan")), 2),
            }
        return row
    finally:
        for w in procs:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
        for proc in servers:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(state, ignore_errors=True)


def empty_database(url: str) -> None:
    """Drop every table of the PostgreSQL database at ``url`` (a run starts from an empty tailnet)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="1000,10000", help="comma-separated node counts")
    ap.add_argument("--workers", type=int, default=4, help="client processes")
    ap.add_argument("--policy", default="none,realistic", help="comma-separated: none, realistic")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a delta everywhere")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--smoke", action="store_true", help="20 nodes, 1 worker: check it still runs")
    ap.add_argument(
        "--plain", action="store_true", help="clients ask for plain JSON (no zstd, no peer patches)"
    )
    ap.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="control servers: 1 (SQLite) or more, replicas on one throwaway PostgreSQL (failover measured)",
    )
    args = ap.parse_args()
    if args.replicas < 1:
        ap.error("--replicas takes 1 or more")
    if args.smoke:
        args.nodes, args.workers, args.timeout = "20", 1, 30.0
    raise_nofile()
    modes = [m.strip() for m in args.policy.split(",") if m.strip()]
    if any(m not in ("none", "realistic") for m in modes):
        ap.error("--policy takes none and/or realistic")
    if args.replicas > 1 and "realistic" in modes:
        print(
            "control_scale: with --replicas the policy run is left out (one policy file per replica)",
            file=sys.stderr,
        )
        modes.remove("realistic")
    if "realistic" in modes and not serves_policy_files():
        print(
            "control_scale: this tailpy's control serve has no --policy: the policy run is left out",
            file=sys.stderr,
        )
        modes.remove("realistic")
    with contextlib.ExitStack() as stack:
        db: str | None = None
        if args.replicas > 1:
            sys.path.insert(0, str(UNIT_TESTS))
            import _postgres

            reason = _postgres.unavailable_reason()
            if reason:
                print(f"control_scale: --replicas needs PostgreSQL: {reason}", file=sys.stderr)
                return SKIPPED
            db = stack.enter_context(_postgres.postgres_server())
        rows = [
            run(int(n), args.workers, args.timeout, m == "realistic", not args.plain, db, args.replicas)
            for n in args.nodes.split(",")
            for m in modes
        ]
    short = [
        (r["nodes"], r["policy"])
        for r in rows
        if r["change_received"] < r["expected"]
        or r["join_received"] < r["expected"]
        or r["policy_received"] < r["nodes"]
        or r.get("failover_moved", 0) < r.get("failover_nodes", 0)
    ]
    if short:
        print(
            f"control_scale: some nodes missed the change, the join, the policy or the failover in {short}",
            file=sys.stderr,
        )
    status = 1 if short else 0
    if args.json:
        print(json.dumps(rows, indent=2))
        return status
    cols = list(dict.fromkeys(c for r in rows for c in r))
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    print(f"({os.cpu_count()} cores shared by the server and the client processes)")
    return status


if __name__ == "__main__":
    sys.exit(main())
