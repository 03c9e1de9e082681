"""Packet filter rules in tailcfg.FilterRule's JSON shape, and how netmaps and deltas carry them."""

from __future__ import annotations

import dataclasses

import pytest

from tailpy.errors import ParseError
from tailpy.keys import MachinePrivate, NodePrivate
from tailpy.netmap import MapDelta, NetMap, Node, apply_delta, delta
from tailpy.packetfilter import (
    ALLOW_ALL,
    CLEAR_PARTS,
    DEFAULT_PROTOS,
    FilterRule,
    NetPortRange,
    PortRange,
    combine_parts,
    filter_from_json,
    filter_to_json,
)

SSH_RULE = {
    "SrcIPs": ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"],
    "DstPorts": [{"IP": "100.64.0.2/32", "Ports": {"First": 22, "Last": 22}}],
    "IPProto": [6],
}


def _node(i: int) -> Node:
    return Node(
        id=i,
        name=f"n{i}",
        hostname=f"n{i}",
        node_key=NodePrivate.generate().public,
        machine_key=MachinePrivate.generate().public,
        addresses=(f"100.64.0.{i}/32",),
    )


def test_tailcfg_shape_round_trips() -> None:
    rule = FilterRule.from_json(SSH_RULE)
    assert rule == FilterRule(
        ("100.64.0.1/32", "fd7a:115c:a1e0::1/128"), (NetPortRange("100.64.0.2/32", PortRange(22, 22)),), (6,)
    )
    assert rule.to_json() == SSH_RULE
    assert rule.protocols() == (6,)


def test_empty_ipproto_means_tailscale_default_set() -> None:
    (rule,) = ALLOW_ALL
    assert rule.protocols() == DEFAULT_PROTOS
    assert "IPProto" not in rule.to_json()
    all_ports = {"First": 0, "Last": 65535}
    assert rule.to_json() == {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": all_ports}]}


@pytest.mark.parametrize(
    "bad",
    [
        "rule",
        {"SrcIPs": "*", "DstPorts": []},
        {"SrcIPs": ["*"], "DstPorts": [{"Ports": {"First": 1, "Last": 2}}]},
        {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 80, "Last": 22}}]},
        {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 70000}}]},
        {"SrcIPs": ["*"], "DstPorts": [], "IPProto": [300]},
        {"SrcIPs": ["*"], "DstPorts": [], "IPProto": [True]},
    ],
)
def test_malformed_rules_raise_parse_error(bad: object) -> None:
    with pytest.raises(ParseError):
        filter_from_json([bad])


def test_netmap_and_delta_carry_the_filter() -> None:
    me, peer = _node(1), _node(2)
    rules = filter_from_json([SSH_RULE])
    old = NetMap(me, {2: peer}, "ts.test")
    new = NetMap(me, {2: peer}, "ts.test", packet_filter=rules)
    assert NetMap.from_json(new.to_json()) == new
    assert "packet_filter" not in old.to_json()  # None: control sent none, the node allows everything
    d = delta(old, new, 7)
    assert d and d.packet_filter == rules and not d.changed and d.self_node is None
    assert MapDelta.from_json(d.to_json()) == d
    assert apply_delta(old, d) == new
    # a delta without a filter keeps the one the node has
    assert apply_delta(new, MapDelta(8, changed=(peer,))).packet_filter == rules
    assert filter_to_json(rules) == [SSH_RULE]


def test_named_parts_combine_in_name_order_and_update_like_tailscale() -> None:
    """``packet_filters``: a delta's parts replace parts of the same name, ``null`` deletes one, ``"*"``
    clears all first; the filter is the parts concatenated in name order."""
    me, peer = _node(1), _node(2)
    ssh, web = filter_from_json([SSH_RULE]), filter_from_json([{**SSH_RULE, "IPProto": [17]}])
    nm = NetMap.from_json({**NetMap(me, {2: peer}, "ts.test").to_json(), "packet_filters": {"b": [SSH_RULE]}})
    assert nm.packet_filters == {"b": ssh} and nm.packet_filter == ssh
    assert NetMap.from_json(nm.to_json()) == nm
    d = MapDelta.from_json({"type": "delta", "version": 3, "packet_filters": {"a": filter_to_json(web)}})
    assert d and d.packet_filters == {"a": web}
    both = apply_delta(nm, d)
    assert both.packet_filter == web + ssh and both.packet_filters == {"a": web, "b": ssh}
    assert apply_delta(both, MapDelta(packet_filters={"a": None})).packet_filter == ssh
    cleared = apply_delta(both, MapDelta(packet_filters={CLEAR_PARTS: None, "c": ssh}))
    assert cleared.packet_filters == {"c": ssh}
    assert apply_delta(both, MapDelta(4, changed=(peer,))) == dataclasses.replace(both, peers={2: peer})
    # delta() computes the part updates that turn one netmap into the other
    for old, new in (
        (nm, both),
        (both, nm),
        (both, cleared),
        (NetMap(me, {}, "ts.test", packet_filter=ALLOW_ALL), nm),
    ):
        dd = delta(old, new, 9)
        assert MapDelta.from_json(dd.to_json()) == dd and apply_delta(old, dd) == new
    assert combine_parts({"b": ssh, "a": web}) == web + ssh


@pytest.mark.parametrize(
    "bad",
    [{"packet_filters": []}, {"packet_filters": {"a": "x"}}, {"packet_filters": {"a": [{"SrcIPs": 1}]}}],
)
def test_malformed_named_parts_raise_parse_error(bad: dict[str, object]) -> None:
    with pytest.raises(ParseError):
        MapDelta.from_json({"type": "delta", "version": 1, **bad})
