"""Policy compile cost in process: :class:`tailpy.control.policy.Compiled` over N nodes, with and without
rules naming many literal IP addresses.

    .venv/bin/python benchmarks/policy_compile.py [--nodes 10000] [--literals 2000] [--repeat 3] [--json]
        [--smoke]

The nodes and the base policy have the shape of ``control_scale.py``'s realistic run
(:func:`control_scale.realistic_policy` over N/4 users, :func:`control_scale.node_keys`'s mix: three in ten
nodes tagged, the others 2-3 devices per user), each node with one random address in 100.64.0.0/10 and one in
fd7a:115c:a1e0::/48. Cases:

* ``realistic``: the base policy;
* ``dst-hosts``: plus one rule from ``group:g1`` to ``--literals`` node addresses (``100.x.y.z:22`` each);
* ``dst-hosts-small``: the same with a tenth as many addresses;
* ``src-hosts``: plus one rule from ``--literals`` node addresses to ``tag:web:443``;
* ``dst-prefixes``: plus one rule from ``group:g1`` to ``--literals`` /30 prefixes around node addresses.

Measured, per case: ``compile_s`` (building ``Compiled``), ``render_s`` (every node's
:meth:`~tailpy.control.policy.Compiled.filter_parts` and :meth:`~tailpy.control.policy.Compiled.filter_json`
after the compile: what map streams send), in CPU seconds of this process (steadier than wall time on a
shared machine), each the best of ``--repeat`` runs.
``--smoke``: 200 nodes and 50 literals, a check that the benchmark runs; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from tailpy.control.policy import Compiled, Policy, PolicyNode

sys.path.insert(0, str(Path(__file__).parent))
from control_scale import TAGS, node_keys, realistic_policy


def make_nodes(n: int) -> list[PolicyNode]:
    """N nodes of control_scale's realistic mix, with random distinct tailnet addresses."""
    rnd = random.Random(11)
    users = [f"user{u}" for u in range(max(1, n // 4))]
    tags = ["tag:web"] + [f"tag:t{i}" for i in range(1, TAGS)]
    v4 = rnd.sample(
        range(int(ipaddress.IPv4Address("100.64.0.1")), int(ipaddress.IPv4Address("100.115.0.0"))), n
    )
    out = []
    for g, key in enumerate(node_keys(n, users, tags)):
        v6 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("fd7a:115c:a1e0::")) + v4[g])
        addrs = (f"{ipaddress.IPv4Address(v4[g])}/32", f"{v6}/128")
        if key.startswith("tag:"):
            out.append(PolicyNode(g + 1, addrs, "", "", (key,)))
        else:
            out.append(PolicyNode(g + 1, addrs, key, f"{key}@example.com"))
    return out


def with_rule(text: str, rule: dict[str, Any]) -> str:
    body = json.loads(text.split("\n", 1)[1])
    body["acls"].append(rule)
    return json.dumps(body)


def cases(nodes: list[PolicyNode], literals: int) -> dict[str, str]:
    base = realistic_policy(max(1, len(nodes) // 4))
    rnd = random.Random(5)
    picked = rnd.sample(nodes, min(literals, len(nodes)))
    ips = [n.addresses[0].split("/")[0] for n in picked]
    small = ips[: max(1, len(ips) // 10)]
    prefixes = sorted({str(ipaddress.ip_network(ip + "/30", strict=False)) for ip in ips})
    return {
        "realistic": base,
        "dst-hosts": with_rule(
            base, {"action": "accept", "src": ["group:g1"], "dst": [f"{ip}:22" for ip in ips]}
        ),
        "dst-hosts-small": with_rule(
            base, {"action": "accept", "src": ["group:g1"], "dst": [f"{ip}:22" for ip in small]}
        ),
        "src-hosts": with_rule(base, {"action": "accept", "src": ips, "dst": ["tag:web:443"]}),
        "dst-prefixes": with_rule(
            base, {"action": "accept", "src": ["group:g1"], "dst": [f"{p}:22" for p in prefixes]}
        ),
    }


def measure(policy: Policy, nodes: list[PolicyNode], repeat: int) -> dict[str, float]:
    """The best of ``repeat`` runs (the machine's other load only adds time)."""
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        t0 = time.process_time()
        c = Compiled(policy, nodes)
        t1 = time.process_time()
        for n in nodes:
            c.filter_parts(n.id)
            c.filter_json(n.id)
        t2 = time.process_time()
        best = (min(best[0], t1 - t0), min(best[1], t2 - t1))
    return {"compile_s": round(best[0], 3), "render_s": round(best[1], 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--nodes", type=int, default=10000)
    ap.add_argument("--literals", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the best is reported")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    n, lits, repeat = (200, 50, 1) if args.smoke else (args.nodes, args.literals, args.repeat)
    nodes = make_nodes(n)
    rows = []
    for name, text in cases(nodes, lits).items():
        row: dict[str, Any] = {"case": name, "nodes": n, "literals": lits}
        row.update(measure(Policy.parse(text), nodes, repeat))
        rows.append(row)
        if not args.json:
            print(f"{name:16} nodes={n} compile {row['compile_s']:.3f} s  render {row['render_s']:.3f} s")
    if args.json:
        settings = {"nodes": n, "literals": lits, "repeat": repeat, "smoke": args.smoke}
        print(json.dumps({"settings": settings, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
