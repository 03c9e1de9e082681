"""The data plane's offload modes for lab tests: offloads on, and each fallback driven as the field meets it.

Each :class:`OffloadMode` says how to bring a fallback about on a bare tailpy node (environment variables
the Rust data plane reads when it opens its TUN and socket, and commands run on the node's host after its
links exist) and checks what the node then reports in ``Device.stats()["offload"]`` (see
``tailpy._native.OffloadStats``):

* ``offloads``: defaults on veth; TUN with virtio-net header and TSO/USO, UDP GSO and GRO, no fallback;
* ``tun-plain``: ``TAILPY_TUN_OFFLOAD=0``, the path of a kernel without ``IFF_VNET_HDR``;
* ``no-uso``: ``TAILPY_TUN_OFFLOAD=tso``, the path of a kernel before 6.2 (TSO but no USO);
* ``gso-refused``: the link's MTU set below the tunnel's datagrams, so the kernel refuses a GSO send
  (``EMSGSIZE``: a segment longer than the route's MTU; a device that cannot checksum for the sender
  gets ``EIO`` on kernels that still check, which this kernel's veth does not) and the node resends one
  datagram per message from then on, which the kernel fragments;
* ``no-gro``: ``TAILPY_UDP_GRO=0``, the path of a kernel without ``UDP_GRO``;
* ``veth-offloads-off``: ``ethtool -K`` turns the veth's segmentation and GRO offloads off
  (``tx-udp-segmentation``, ``rx-gro``/``gro``, ``rx-udp-gro-forwarding``): the node keeps its own
  offloads and the kernel segments in software; traffic must still flow.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tailpy.lab.netns import Host

Check = Callable[[Mapping[str, Any]], str | None]


def _on(o: Mapping[str, Any]) -> str | None:
    if not (o["tun_vnet_hdr"] and o["tun_tso"] and o["udp_gso"] and o["udp_gro"]):
        return f"an offload is off: {o}"
    if o["fallbacks"]:
        return f"unexpected fallbacks: {o['fallbacks']}"
    if o["tun_super_packets_read"] + o["tun_super_packets_written"] == 0:
        return f"no TUN super-packet read or written: {o}"
    return None


def _fallback(words: str, **flags: bool) -> Check:
    def check(o: Mapping[str, Any]) -> str | None:
        wrong = {k: o[k] for k, v in flags.items() if o[k] != v}
        if wrong:
            return f"expected {flags}, got {wrong}"
        if not any(words in f for f in o["fallbacks"]):
            return f"no fallback mentioning {words!r} in {o['fallbacks']}"
        return None

    return check


def _flows(o: Mapping[str, Any]) -> str | None:
    return None if o["tun_vnet_hdr"] else f"TUN offloads off: {o}"


@dataclass(frozen=True)
class OffloadMode:
    """One way to run a node: environment for its data plane, commands for its host, and what it reports."""

    name: str
    env: Mapping[str, str] = field(default_factory=dict)
    #: Commands run on the node's host once its links are up (``ifname`` is the host's veth).
    host_commands: tuple[tuple[str, ...], ...] = ()
    #: Returns why the node's offload stats are wrong for this mode, or None.
    check: Check = _flows
    tools: tuple[str, ...] = ()

    def missing_tool(self) -> str | None:
        """Why this mode cannot run here (a tool missing), or None."""
        missing = [t for t in self.tools if shutil.which(t) is None]
        return f"{', '.join(missing)} not installed" if missing else None

    def prepare(self, host: Host, ifname: str = "eth0") -> None:
        """Run the mode's commands on ``host`` (after its veth ``ifname`` exists)."""
        for cmd in self.host_commands:
            host.run([part.replace("{ifname}", ifname) for part in cmd])


OFFLOAD_MODES: tuple[OffloadMode, ...] = (
    OffloadMode("offloads", check=_on),
    OffloadMode(
        "tun-plain",
        env={"TAILPY_TUN_OFFLOAD": "0"},
        check=_fallback("TAILPY_TUN_OFFLOAD", tun_vnet_hdr=False, tun_tso=False, udp_gso=True),
    ),
    OffloadMode(
        "no-uso",
        env={"TAILPY_TUN_OFFLOAD": "tso"},
        check=_fallback("USO", tun_vnet_hdr=True, tun_tso=True, tun_uso=False),
    ),
    OffloadMode(
        "gso-refused",
        host_commands=(("ip", "link", "set", "{ifname}", "mtu", "1300"),),
        check=_fallback("GSO refused", udp_gso=False, tun_vnet_hdr=True),
    ),
    OffloadMode(
        "no-gro",
        env={"TAILPY_UDP_GRO": "0"},
        check=_fallback("GRO", udp_gro=False, udp_gso=True),
    ),
    OffloadMode(
        "veth-offloads-off",
        host_commands=(
            ("ethtool", "-K", "{ifname}", "tx-udp-segmentation", "off"),
            ("ethtool", "-K", "{ifname}", "gro", "off"),
            ("ethtool", "-K", "{ifname}", "rx-udp-gro-forwarding", "off"),
        ),
        tools=("ethtool",),
    ),
)

MODES_BY_NAME = {m.name: m for m in OFFLOAD_MODES}
