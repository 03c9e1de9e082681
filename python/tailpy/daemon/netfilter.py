"""The node firewall: an nftables table of tailpyd's own that drops packets claiming a tailnet source address
(100.64.0.0/10, fd7a:115c:a1e0::/48) when they arrive on any interface other than tailpy's TUN, and accepts
tailpyd's UDP port.

The rules follow tailscaled's ``ts-input`` chain (Tailscale ``util/linuxfw``, ``iptables_runner.go``
``AddBase`` / ``nftables_runner.go`` ``addBase``): a LAN neighbour that forges a tailnet source cannot
reach this node's services as if it were a peer. Shape, in table ``inet tailpy`` (``inet tailpy-<tun>`` for
a TUN not named ``tailpy0``)::

    chain input {
        type filter hook input priority filter - 1; policy accept;
        iifname "lo" accept                          # this host's own traffic (MagicDNS on 100.100.100.100)
        iifname != "<tun>" ip saddr 100.64.0.0/10 counter drop
        iifname != "<tun>" ip6 saddr fd7a:115c:a1e0::/48 counter drop
        iifname "<tun>" accept
        udp dport <port> accept
    }
    chain forward {                                  # as ts-forward: none forwarded with a forged source
        type filter hook forward priority filter - 1; policy accept;
        iifname != "<tun>" ip saddr 100.64.0.0/10 counter drop
        iifname != "<tun>" ip6 saddr fd7a:115c:a1e0::/48 counter drop
    }

``accept`` ends only this table's chain (nftables evaluates every base chain of a hook), so the host's own
firewall still decides for everything else, as with tailscaled. The table is created with the TUN, replaced
atomically (one ``nft -f`` transaction), and deleted with the TUN, at ``tailpyd --cleanup`` and at the next
start after a crash. ``nft`` missing or refusing is a health warning, not a failure. ``--netfilter-mode
off`` (Tailscale's flag name) leaves the host's nftables alone.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess

log = logging.getLogger("tailpy.daemon")

MODES = ("on", "off")
DEFAULT_TABLE = "tailpy"
CHAIN = "input"
FORWARD_CHAIN = "forward"
TAILNET_V4 = "100.64.0.0/10"
TAILNET_V6 = "fd7a:115c:a1e0::/48"


def table_name(tun: str) -> str:
    """The nftables table (family ``inet``) for TUN ``tun``."""
    return DEFAULT_TABLE if tun == "tailpy0" else f"tailpy-{tun}"


def ruleset(table: str, tun: str, port: int) -> str:
    """The ``nft -f`` script that creates (or atomically replaces) ``table`` for ``tun`` and UDP ``port``."""
    q = json.dumps(tun)  # a quoted nft string
    rules = [
        'iifname "lo" accept',
        f"iifname != {q} ip saddr {TAILNET_V4} counter drop",
        f"iifname != {q} ip6 saddr {TAILNET_V6} counter drop",
        f"iifname {q} accept",
    ]
    if port:
        rules.append(f"udp dport {port} accept")
    forward = [
        f"iifname != {q} ip saddr {TAILNET_V4} counter drop",
        f"iifname != {q} ip6 saddr {TAILNET_V6} counter drop",
    ]
    body = "\n".join(f"    {r}" for r in rules)
    fbody = "\n".join(f"    {r}" for r in forward)
    return (
        f"table inet {table}\n"
        f"delete table inet {table}\n"
        f"table inet {table} {{\n"
        f"  chain {CHAIN} {{\n"
        "    type filter hook input priority filter - 1; policy accept;\n"
        f"{body}\n"
        "  }\n"
        f"  chain {FORWARD_CHAIN} {{\n"
        "    type filter hook forward priority filter - 1; policy accept;\n"
        f"{fbody}\n"
        "  }\n"
        "}\n"
    )


def _nft(args: list[str], script: str | None = None) -> subprocess.CompletedProcess[str] | None:
    exe = shutil.which("nft")
    if exe is None:
        return None
    return subprocess.run([exe, *args], input=script, capture_output=True, text=True, timeout=30, check=False)


def table_exists(table: str) -> bool:
    done = _nft(["list", "table", "inet", table])
    return done is not None and done.returncode == 0


def delete_table(table: str) -> bool:
    """Delete ``inet table`` if it is there; whether it was."""
    if not table_exists(table):
        return False
    done = _nft(["delete", "table", "inet", table])
    return done is not None and done.returncode == 0


def drop_counters(table: str) -> int:
    """Packets dropped so far by ``table``'s rules (0 when it is not there)."""
    done = _nft(["-j", "list", "table", "inet", table])
    if done is None or done.returncode != 0:
        return 0
    total = 0
    for item in json.loads(done.stdout).get("nftables", []):
        rule = item.get("rule")
        if not rule:
            continue
        exprs = rule.get("expr", [])
        if any("drop" in e for e in exprs):
            total += sum(int(e["counter"]["packets"]) for e in exprs if "counter" in e)
    return total


class Firewall:
    """tailpyd's table for one TUN: :meth:`install` with the device, :meth:`remove` with it.
    ``mode``: "on" or "off" (nothing touched)."""

    def __init__(self, mode: str = "on") -> None:
        self.mode = mode
        self.table = ""  # the installed table ("" none)
        self.warning = ""  # one sentence when the rules could not be installed

    def install(self, tun: str, port: int) -> None:
        """Create or replace the table for ``tun`` and UDP ``port``; a failure becomes :attr:`warning`."""
        if self.mode == "off":
            self.remove()
            self.warning = ""
            return
        table = table_name(tun)
        done = _nft(["-f", "-"], ruleset(table, tun, port))
        if done is None:
            self.warning = (
                "nft (nftables) is not installed: packets forging a tailnet source address from the LAN are "
                "not dropped; install nftables, or pass --netfilter-mode=off to silence this"
            )
        elif done.returncode != 0:
            self.warning = (
                f"cannot install the nftables table inet {table}: {done.stderr.strip() or 'nft failed'}; "
                "packets forging a tailnet source address from the LAN are not dropped"
            )
        else:
            self.table, self.warning = table, ""
            log.info("firewall: nftables table inet %s drops tailnet sources not on %s", table, tun)
            return
        log.warning("firewall: %s", self.warning)

    def set_mode(self, mode: str, tun: str | None, port: int) -> None:
        """Switch to ``mode``, re-applying to ``tun`` if a device is up."""
        self.mode = mode
        if tun is not None:
            self.install(tun, port)

    def remove(self) -> None:
        """Delete the table if installed. Idempotent."""
        table, self.table = self.table, ""
        if table:
            delete_table(table)

    def warnings(self) -> list[str]:
        return [self.warning] if self.warning else []


__all__ = [
    "DEFAULT_TABLE",
    "MODES",
    "Firewall",
    "delete_table",
    "drop_counters",
    "ruleset",
    "table_exists",
    "table_name",
]
