import ipaddress

import pytest

from tailpy.daemon.netconf import choose_endpoint
from tailpy.endpoint import Endpoint
from tailpy.errors import ParseError
from tailpy.keys import MachinePrivate, NodePrivate
from tailpy.netmap import NetMap, Node, diff


def node(i: int, **kw: object) -> Node:
    fields: dict[str, object] = {
        "id": i,
        "name": f"n{i}",
        "hostname": f"n{i}",
        "node_key": NodePrivate.generate().public,
        "machine_key": MachinePrivate.generate().public,
        "addresses": (f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i}/128"),
        "endpoints": (Endpoint.parse(f"192.0.2.{i}:41641"),),
    }
    fields.update(kw)
    return Node(**fields)  # type: ignore[arg-type]


def test_diff_added_removed_changed() -> None:
    me, a, b, c = node(1), node(2), node(3), node(4)
    old = NetMap(me, {2: a, 3: b})
    b2 = Node(**{**b.__dict__, "endpoints": (Endpoint.parse("198.51.100.3:41641"),)})
    new = NetMap(me, {3: b2, 4: c})
    d = diff(old, new)
    assert d.added == (c,)
    assert d.removed == (a,)
    assert d.changed == ((b, b2),)
    assert not diff(new, new)
    assert diff(None, new).added == (b2, c)


def test_diff_sees_node_key_change() -> None:
    me, a = node(1), node(2)
    rotated = Node(**{**a.__dict__, "node_key": NodePrivate.generate().public})
    d = diff(NetMap(me, {2: a}), NetMap(me, {2: rotated}))
    assert d.changed == ((a, rotated),)


def test_netmap_json_round_trip() -> None:
    m = NetMap(node(1), {2: node(2), 3: node(3, online=True, last_seen=12.5)}, "tail.internal")
    assert NetMap.from_json(m.to_json()) == m


def test_malformed_netmap_is_parse_error() -> None:
    good = NetMap(node(1), {2: node(2)}).to_json()
    bad = {**good, "peers": [{**good["peers"][0], "node_key": "nodekey:12"}]}
    with pytest.raises(ParseError):
        NetMap.from_json(bad)
    with pytest.raises(ParseError):
        NetMap.from_json({"peers": []})


def test_endpoints_json_are_strings_and_junk_is_skipped() -> None:
    n = node(2, endpoints=(Endpoint.parse("192.0.2.2:41641"), Endpoint.parse("[2001:db8::2]:7")))
    obj = n.to_json()
    assert obj["endpoints"] == ["192.0.2.2:41641", "[2001:db8::2]:7"]
    obj["endpoints"] = ["junk", "192.0.2.2:41641", "[::ffff:192.0.2.3]:9", "2001:db8::1:80"]
    assert Node.from_json(obj).endpoints == (Endpoint.parse("192.0.2.2:41641"), Endpoint.parse("192.0.2.3:9"))


def test_choose_endpoint_prefers_same_lan_then_ipv4() -> None:
    lan = [ipaddress.ip_interface("198.18.1.5/24"), ipaddress.ip_interface("2001:db8::5/64")]
    cands = [Endpoint.parse(e) for e in ("[2001:db8:1::9]:41641", "203.0.113.9:41641", "198.18.1.9:41641")]
    assert choose_endpoint(cands, lan) == Endpoint.parse("198.18.1.9:41641")
    assert choose_endpoint(cands[:2], lan) == Endpoint.parse("203.0.113.9:41641")
    assert choose_endpoint([Endpoint.parse("[2001:db8::9]:1")], lan) == Endpoint.parse("[2001:db8::9]:1")
    assert choose_endpoint([], lan) is None
