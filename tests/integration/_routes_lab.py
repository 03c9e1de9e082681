"""Shared helpers of the subnet-router and exit-node lab tests: reading routes out of ``tailpy status --json``
and ``tailpy control routes list --json``, setting a policy, waiting for a wanted state."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tailpy.lab import wait_for
from tailpy.lab.tailnet import LabNode, LabTailnet

#: How long a wanted state may take to appear after a change (generous: the target is a few seconds).
SETTLE = 45.0

ALLOW_ALL = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}\n'


def eventually(check: Callable[[], Any], what: str, timeout: float = SETTLE) -> Any:
    """Poll ``check`` until it returns something truthy (returned); LabError naming ``what`` on timeout."""
    return wait_for(check, timeout=timeout, what=what, interval=0.3)


def set_policy(net: LabTailnet, text: str) -> None:
    path = Path(net.root) / "policy.hujson"
    path.write_text(text)
    net.control("policy", "set", str(path))


def key(net: LabTailnet, user: str) -> str:
    """A reusable pre-auth key of ``user``."""
    return net.control("authkey", "create", "--user", user, "--reusable").strip().splitlines()[-1]


def peer(node: LabNode, name: str) -> dict[str, Any] | None:
    """Peer ``name`` in ``node``'s ``tailpy status --json``, None when its netmap leaves it out."""
    found = [p for p in node.status()["peers"] if p["name"] == name]
    return found[0] if found else None


def peer_field(node: LabNode, name: str, key_: str) -> Any:
    """A field of peer ``name`` in ``node``'s status; the contract's field names (``primary_routes``,
    ``allowed_ips``, ``exit_node_option``, ``exit_node``). KeyError (the field is missing: the status does not
    carry it yet) is left to fail the test loudly."""
    p = peer(node, name)
    assert p is not None, f"{node.name} has no peer {name}"
    return p[key_]


def primary_routes(node: LabNode, name: str) -> list[str]:
    return list(peer_field(node, name, "primary_routes") or [])


def allowed_ips(node: LabNode, name: str) -> list[str]:
    return list(peer_field(node, name, "allowed_ips") or [])


def routes_table(net: LabTailnet) -> list[dict[str, Any]]:
    """``tailpy control routes list --json``: one object per node (rows of a list, or the values of a
    mapping keyed by node)."""
    data = json.loads(net.control("routes", "list", "--json"))
    if isinstance(data, dict):
        rows = data.get("nodes", data.get("routes"))
        if rows is None:
            rows = [dict(v, node=k) if isinstance(v, dict) else v for k, v in data.items()]
        data = rows
    assert isinstance(data, list), data
    return data


def route_row(net: LabTailnet, node_name: str) -> dict[str, Any]:
    """The row of ``tailpy control routes list --json`` for node ``node_name`` (matched on any field holding
    the name, the FQDN's first label or the id)."""
    rows = routes_table(net)
    for row in rows:
        for k in ("name", "node", "hostname", "given_name"):
            v = row.get(k)
            if isinstance(v, str) and v.split(".")[0] == node_name:
                return row
            if isinstance(v, dict) and str(v.get("name", "")).split(".")[0] == node_name:
                return row
    raise AssertionError(f"no row for {node_name} in `routes list --json`: {rows}")


def row_primary(row: dict[str, Any]) -> set[str]:
    """The prefixes a ``routes list --json`` row says its node is primary for: a ``primary`` (or
    ``primary_routes``) list, or per-prefix states (``{"198.51.100.0/24": "primary"}`` or a list of objects
    with ``prefix`` and ``state``)."""
    for k in ("primary_routes", "primary"):
        v = row.get(k)
        if isinstance(v, list):
            return {str(p) for p in v}
    states = row.get("routes", row.get("states", row.get("state")))
    if isinstance(states, dict):
        return {p for p, s in states.items() if s == "primary"}
    if isinstance(states, list):
        return {str(s.get("prefix")) for s in states if isinstance(s, dict) and s.get("state") == "primary"}
    return set()


def route_state(net: LabTailnet, node_name: str, prefix: str) -> str:
    """Control's word for ``prefix`` on ``node_name`` in ``routes list --json``: "primary", "standby",
    "offline", "awaiting approval", "not advertised", "exit node"; "" when the row does not list it."""
    for r in route_row(net, node_name).get("routes", []):
        if isinstance(r, dict) and r.get("prefix") == prefix:
            return str(r.get("state", ""))
    return ""


def reachable(node: LabNode, address: str) -> bool:
    """One ping from ``node`` answered within 2 s."""
    return node.pings(address)


def tun_routes(node: LabNode, table: str = "52") -> str:
    """``ip route show table <table>`` (v4 and v6) in ``node``."""
    return "\n".join(
        node.host.run(["ip", f, "route", "show", "table", table], check=False).stdout.strip()
        for f in ("-4", "-6")
    ).strip()
