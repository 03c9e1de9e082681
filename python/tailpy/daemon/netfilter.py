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
        # while the node serves subnet routes or is an exit node (:mod:`tailpy.daemon.router`):
        iifname "<tun>" meta mark set meta mark & 0xff00ffff | 0x40000
        meta mark & 0xff0000 == 0x40000 accept       # from the tailnet, to the LAN
        oifname "<tun>" ip saddr 100.64.0.0/10 drop
        oifname "<tun>" accept                       # from the LAN, to the tailnet
    }
    chain postrouting {                              # as ts-postrouting, unless --snat-subnet-routes=false
        type nat hook postrouting priority srcnat; policy accept;
        oifname != "<tun>" meta mark & 0xff0000 == 0x40000 masquerade
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
POSTROUTING_CHAIN = "postrouting"
SUBNET_ROUTE_MARK = 0x40000  # tailscaled's TailscaleSubnetRouteMark: forwarded from the TUN
MARK_MASK = 0xFF0000  # the fwmark bits tailpy (as tailscaled) owns
TAILNET_V4 = "100.64.0.0/10"
TAILNET_V6 = "fd7a:115c:a1e0::/48"


def table_name(tun: str) -> str:
    """The nftables table (family ``inet``) for TUN ``tun``."""
    return DEFAULT_TABLE if tun == "tailpy0" else f"tailpy-{tun}"


def ruleset(table: str, tun: str, port: int, *, forward: bool = False, masquerade: bool = False) -> str:
    """The ``nft -f`` script that creates (or atomically replaces) ``table`` for ``tun`` and UDP ``port``.
    ``forward``: accept forwarding between the TUN and other interfaces (the node serves routes);
    ``masquerade``: and masquerade what is forwarded from the TUN to other interfaces (SNAT of subnet
    routes). Both follow tailscaled's ``ts-forward`` / ``ts-postrouting`` (Tailscale ``util/linuxfw``)."""
    q = json.dumps(tun)  # a quoted nft string
    rules = [
        'iifname "lo" accept',
        f"iifname != {q} ip saddr {TAILNET_V4} counter drop",
        f"iifname != {q} ip6 saddr {TAILNET_V6} counter drop",
        f"iifname {q} accept",
    ]
    if port:
        rules.append(f"udp dport {port} accept")
    forward_rules = [
        f"iifname != {q} ip saddr {TAILNET_V4} counter drop",
        f"iifname != {q} ip6 saddr {TAILNET_V6} counter drop",
    ]
    if forward:
        keep = f"{MARK_MASK ^ 0xFFFFFFFF:#010x}"
        mark, mask = f"{SUBNET_ROUTE_MARK:#x}", f"{MARK_MASK:#x}"
        forward_rules += [
            f"iifname {q} meta mark set meta mark & {keep} | {mark}",
            f"meta mark & {mask} == {mark} accept",
            f"oifname {q} ip saddr {TAILNET_V4} drop",
            f"oifname {q} accept",
        ]
    body = "\n".join(f"    {r}" for r in rules)
    fbody = "\n".join(f"    {r}" for r in forward_rules)
    nat = ""
    if forward and masquerade:
        nat = (
            f"  chain {POSTROUTING_CHAIN} {{\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f"    oifname != {q} meta mark & {MARK_MASK:#x} == {SUBNET_ROUTE_MARK:#x} masquerade\n"
            "  }\n"
        )
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
        f"{nat}"
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
        self.forward = False  # accept forwarding to and from the TUN (the node serves routes)
        self.masquerade = False  # and masquerade what the TUN forwards to the LAN
        self._installed_for: tuple[str, int] | None = None  # (tun, port) of the installed table

    def install(self, tun: str, port: int) -> None:
        """Create or replace the table for ``tun`` and UDP ``port``; a failure becomes :attr:`warning`."""
        if self.mode == "off":
            self.remove()
            self.warning = ""
            return
        table = table_name(tun)
        done = _nft(["-f", "-"], ruleset(table, tun, port, forward=self.forward, masquerade=self.masquerade))
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
            self.table, self.warning, self._installed_for = table, "", (tun, port)
            log.info("firewall: nftables table inet %s drops tailnet sources not on %s", table, tun)
            return
        log.warning("firewall: %s", self.warning)

    def set_mode(self, mode: str, tun: str | None, port: int) -> None:
        """Switch to ``mode``, re-applying to ``tun`` if a device is up."""
        self.mode = mode
        if tun is not None:
            self.install(tun, port)

    def set_routing(self, *, forward: bool, masquerade: bool) -> None:
        """Accept forwarding to and from the TUN, and masquerade what it forwards toward other interfaces
        (:func:`ruleset`); re-installs the table when installed and this changes it."""
        if (forward, masquerade) == (self.forward, self.masquerade):
            return
        self.forward, self.masquerade = forward, masquerade
        if self.table and self._installed_for is not None:
            self.install(*self._installed_for)

    def remove(self) -> None:
        """Delete the table if installed. Idempotent."""
        table, self.table, self._installed_for = self.table, "", None
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
