"""nftables rulesets for the lab's routers and UDP blocks (pure text builders; :mod:`tailpy.lab.netns` loads
them into namespaces with ``nft -f -``).

Router kinds, in RFC 4787 terms (mapping / filtering), as Linux conntrack and nftables give them:

``"eim"``
    ``masquerade``: endpoint-independent mapping (conntrack keeps the inside source port when it is free, so
    one inside ``ip:port`` keeps one public ``ip:port`` towards every destination) and address-and-port-
    dependent filtering: only the exact remote ``ip:port`` the inside sent to gets in (a "port-restricted
    cone"). Linux rewrites the port when two inside hosts use the same one; the second host then gets a new
    port towards destinations the first already uses, and its own port towards others (endpoint-dependent
    for that host), as real Linux routers do (netbirdio/netbird#2703: peers sharing a listen port behind
    one NAT).
``"full-cone"``
    ``masquerade`` plus endpoint-independent filtering: every outbound UDP mapping is recorded in a dynamic
    nftables map (public port -> inside ``ip . port``) and any remote host's UDP to that public port is
    destination-NATed back to the inside endpoint while the map entry lives.
``"edm"`` (alias ``"symmetric"``)
    ``masquerade fully-random``: endpoint-dependent mapping, a random public port per (inside endpoint,
    destination), with the same port-restricted filtering.
``"firewall"``
    No NAT; a stateful filter forwarding inside -> outside and the replies, dropping unsolicited inbound.
``"none"``
    A plain router forwarding both ways.

Hairpinning (an inside host sending to a public ``ip:port`` of the same router) is off unless asked for:
with it on, inside UDP to the router's public address is destination-NATed through the same map and
source-NATed to the public address, so the receiver sees the sender's public address.

Only IPv4 is routed; IPv6 addresses on a router's LANs stay link-local to each LAN.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

from tailpy.errors import LabError

NatKind = Literal["none", "firewall", "eim", "full-cone", "edm", "symmetric"]
NAT_KINDS: tuple[str, ...] = get_args(NatKind)
#: Kinds that translate addresses (the inside LAN is not routable from outside).
TRANSLATING = frozenset({"eim", "full-cone", "edm", "symmetric"})

#: The nftables table every router rule lives in (family ip).
TABLE = "tailpy_router"
#: Seconds a recorded mapping (full-cone, hairpin) lives after its last outbound packet, unless the
#: router's UDP timeout says otherwise.
DEFAULT_MAP_TIMEOUT = 120


def check_kind(nat: str) -> NatKind:
    """``nat`` if it is a router kind; LabError (one sentence listing the kinds) otherwise."""
    if nat not in NAT_KINDS:
        raise LabError(f"unknown router kind {nat!r}: use one of {', '.join(NAT_KINDS)}")
    return nat  # type: ignore[return-value]


def _q(name: str) -> str:
    return '"' + name + '"'


def router_ruleset(
    nat: NatKind,
    *,
    inside_if: str,
    outside_if: str,
    inside_net: str,
    public_ip: str,
    hairpin: bool = False,
    map_timeout: int = DEFAULT_MAP_TIMEOUT,
) -> str:
    """The ``nft -f`` text of table ``ip tailpy_router`` for a router of kind ``nat``.

    ``inside_if``/``outside_if`` are interface names, ``inside_net`` the inside IPv4 prefix, ``public_ip``
    the router's outside IPv4 address, ``map_timeout`` the seconds a recorded mapping lives (full-cone and
    hairpin only). Raises LabError for an unknown kind or hairpinning on a router without NAT."""
    check_kind(nat)
    translating = nat in TRANSLATING
    if hairpin and not translating:
        raise LabError(f"hairpinning needs a NAT router; a {nat!r} router has no public mapping to hairpin")
    full_cone = nat == "full-cone"
    needs_map = full_cone or hairpin
    ins, out = _q(inside_if), _q(outside_if)
    lines = [f"table ip {TABLE} {{"]
    if needs_map:
        lines += [
            "  map cone {",
            "    type inet_service : ipv4_addr . inet_service",
            "    flags dynamic, timeout",
            f"    timeout {map_timeout}s",
            "  }",
        ]
    lines += [
        "  chain forward {",
        f"    type filter hook forward priority filter; policy {'accept' if nat == 'none' else 'drop'};",
        "    ct state established,related accept",
        "    ct state invalid drop",
        f"    iifname {ins} oifname {out} accept",
    ]
    if needs_map:
        lines.append("    ct status dnat accept")
    lines.append("  }")
    if nat != "none":
        # Unsolicited UDP to the router itself is dropped before conntrack confirms an entry for it, as a
        # home router's WAN firewall does. Otherwise Linux keeps that entry, and the inside host's answer
        # to the same remote ip:port clashes with it and is moved to another public port, which breaks
        # simultaneous open through an endpoint-independent mapping.
        lines += [
            "  chain input {",
            "    type filter hook input priority filter; policy accept;",
            f"    iifname {out} meta l4proto udp ct state new drop",
            "  }",
        ]
    if translating:
        random = " fully-random" if nat in ("edm", "symmetric") else ""
        lines += [
            "  chain prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
        ]
        if full_cone:
            lines.append(
                f"    iifname {out} ip daddr {public_ip} meta l4proto udp dnat ip to udp dport map @cone"
            )
        if hairpin:
            lines.append(
                f"    iifname {ins} ip daddr {public_ip} meta l4proto udp dnat ip to udp dport map @cone"
            )
        lines += [
            "  }",
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f"    oifname {out} masquerade{random}",
        ]
        if hairpin:
            lines.append(f"    oifname {ins} ip saddr {inside_net} ct status dnat snat ip to {public_ip}")
        lines.append("  }")
    if needs_map:
        # After srcnat the packet carries its public source port; the conntrack entry still knows the
        # inside endpoint it came from. Only original-direction, source-NATed packets create mappings.
        lines += [
            "  chain record {",
            "    type filter hook postrouting priority srcnat + 10; policy accept;",
            f"    oifname {out} meta l4proto udp ct direction original ct status snat"
            " update @cone { udp sport : ct original ip saddr . ct original proto-src }",
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def block_ruleset(table: str, addresses: Iterable[str]) -> str:
    """The ``nft -f`` text of table ``inet <table>`` dropping UDP to and from ``addresses`` (IPv4 and IPv6,
    without prefix length) in the input and output hooks of one namespace."""
    v4 = sorted({a for a in addresses if ":" not in a})
    v6 = sorted({a for a in addresses if ":" in a})
    lines = [f"table inet {table} {{"]
    for chain, hook, field in (("in", "input", "saddr"), ("out", "output", "daddr")):
        lines.append(f"  chain {chain} {{")
        lines.append(f"    type filter hook {hook} priority filter - 10; policy accept;")
        if v4:
            lines.append(f"    meta l4proto udp ip {field} {{ {', '.join(v4)} }} drop")
        if v6:
            lines.append(f"    meta l4proto udp ip6 {field} {{ {', '.join(v6)} }} drop")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"
