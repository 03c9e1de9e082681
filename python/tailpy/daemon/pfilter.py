"""The node's packet filter: a netmap's :attr:`~tailpy.netmap.NetMap.packet_filter` in the form the data
plane takes (:meth:`tailpy._native.Device.set_filter`), and the filter's drop counters for ``tailpy status``.

The filter itself (stateful: TCP connections, UDP replies, ICMP) runs in Rust on every decrypted inbound
packet: ``rust/tailpy-core/src/filter.rs``, after Tailscale's ``wgengine/filter/filter.go``. A netmap
without a filter (None: control sends none) leaves the device with none, which admits everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tailpy.packetfilter import FilterRule

DeviceRule = tuple[list[str], list[tuple[str, int, int]], list[int]]
"""One rule as ``Device.set_filter`` takes it: ``(src_ips, [(dst_ip, first_port, last_port)], ip_protos)``."""

#: The data plane's drop reasons (``stats()["filter"]["dropped_<reason>"]``), in the order status prints them.
DROP_REASONS = ("no_rule", "not_a_reply", "protocol", "malformed", "multicast", "link_local")


def device_rules(rules: tuple[FilterRule, ...] | None) -> list[DeviceRule] | None:
    """``rules`` (tailcfg.FilterRule's shape) as ``Device.set_filter`` takes them; None stays None."""
    if rules is None:
        return None
    return [
        (list(r.src_ips), [(d.ip, d.ports.first, d.ports.last) for d in r.dst_ports], list(r.ip_proto))
        for r in rules
    ]


def filter_drops(device_stats: Mapping[str, Any] | None) -> dict[str, int]:
    """The filter's non-zero drop counters by reason (``{"no_rule": 3}``) from ``Device.stats()`` as the
    status JSON carries it (``device``); empty when nothing was dropped or there is no device."""
    f = (device_stats or {}).get("filter") or {}
    return {r: int(f.get(f"dropped_{r}", 0)) for r in DROP_REASONS if f.get(f"dropped_{r}", 0)}


__all__ = ["DROP_REASONS", "DeviceRule", "device_rules", "filter_drops"]
