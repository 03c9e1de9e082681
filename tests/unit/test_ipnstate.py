"""tailpy.ipnstate: the local API's status as types, serialised to the JSON tailpyd has always sent (the shape
README "Status JSON" documents), and parsed back by the CLI."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailpy import netmap as nm
from tailpy.daemon.backend import Backend
from tailpy.daemon.state import StateStore
from tailpy.endpoint import Endpoint
from tailpy.errors import ParseError
from tailpy.ipnstate import (
    DerpConnStatus,
    DerpStatus,
    DiscoPeerStatus,
    PeerStatus,
    PingPeer,
    PingReply,
    Status,
    TraversalStatus,
)
from tailpy.keys import DiscoPublic, MachinePublic, NodePublic
from tailpy.magicsock.netcheck import Report


class FakeDevice:
    """The data plane as Backend.status reads it: two peers' counters and the device's stats."""

    listen_port = 41641
    tun_name = "tailpy0"

    def __init__(self, key: bytes) -> None:
        self._r, self._w = os.pipe()  # the queue for Python: never readable here

    def fileno(self) -> int:
        return self._r

    def drain(self, max_items: int = 1024) -> tuple[list[tuple[bytes, str]], list[tuple[bytes, bytes]]]:
        return [], []

    def set_path(self, public_key: bytes, path: str, *, confirmed: bool = True) -> None:
        pass

    def retry_handshake(self, public_key: bytes) -> bool:
        return False

    def inject(self, public_key: bytes, datagram: bytes) -> None:
        pass

    def send_datagram(self, data: bytes, endpoint: str) -> None:
        pass

    def set_peer(
        self, public_key: bytes, *, allowed_ips: list[str], endpoint: str | None = None, **_: Any
    ) -> None:
        pass

    def set_filter(self, rules: Any) -> None:
        pass

    def remove_peer(self, public_key: bytes) -> bool:
        return True

    def set_private_key(self, private_key: bytes) -> None:
        pass

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)

    def peers(self) -> list[dict[str, Any]]:
        return [
            {
                "public_key": bytes([2]) * 32,
                "endpoint": "192.168.1.20:41641",
                "path": "relay",
                "tx_bytes": 10,
                "rx_bytes": 20,
                "last_handshake": 1000.5,
            },
            {
                "public_key": bytes([3]) * 32,
                "endpoint": "[2001:db8::3]:41641",
                "path": "direct",
                "tx_bytes": 0,
                "rx_bytes": 7,
                "last_handshake": None,
            },
        ]

    def stats(self) -> dict[str, Any]:
        return {"dropped_send_error": 0, "tx_datagrams": 12, "gso": True}


def node(i: int, **kw: Any) -> nm.Node:
    base = nm.Node(
        id=i,
        name=f"n{i}",
        hostname=f"host{i}",
        node_key=NodePublic(bytes([i]) * 32),
        machine_key=MachinePublic(bytes([i + 100]) * 32),
        addresses=(f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i}/128"),
    )
    return dataclasses.replace(base, **kw)


async def backend(tmp_path: Path) -> Backend:
    """A node with a netmap of three peers (one relayed, one direct, one expired) and a DERP map. Its
    magicsock.Conn is stopped at once (before its first tick: no DERP connections, probes or STUN from this
    host), so its parts of the status are as they start."""
    b = Backend(StateStore(tmp_path), FakeDevice, configure_os=False)
    await b.start()  # not registered yet: NeedsLogin, then Running with the netmap below
    s = b.state_data
    s.node_id, s.hostname, s.login_server = 1, "host1", "http://192.0.2.1:8080"
    ep = Endpoint.parse
    me = node(1, user="alice@example.com", os="linux", key_expiry=2000.0)
    peers = {
        2: node(
            2,
            user="bob@example.com",
            os="linux",
            endpoints=(ep("192.168.1.20:41641"), ep("203.0.113.2:41641")),
            online=True,
            last_seen=999.0,
            home_derp=900,
            disco_key=DiscoPublic(bytes([9]) * 32),
        ),
        3: node(3, tags=("tag:server",), endpoints=(ep("[2001:db8::3]:41641"),)),
        4: node(4, expired=True),
    }
    region = nm.DerpRegion(
        900, "r900", "Lab", (nm.DerpNode("900a", 900, "derp.example", ipv4="198.51.100.1", stun_port=3478),)
    )
    b.apply_netmap(nm.NetMap(me, peers, "tail.example", derp_map=nm.DerpMap({900: region})))
    assert b.conn is not None
    b.conn.stop()
    await b.conn.close()
    b.session.reported_endpoints = [ep("192.0.2.11:41641"), ep("[2001:db8::11]:41641")]
    b.last_error = "an error"
    return b


EXPECTED_STATUS: dict[str, Any] = {
    "backend_state": "Running",
    "login_server": "http://192.0.2.1:8080",
    "control_connected": False,
    "control_url": "",
    "map_stream_starts": {"netmap": 0, "delta": 0},
    "error": "an error",
    "auth_url": "",
    "login_pending": False,
    "health": [],
    "now": 0,
    "self": {
        "id": 1,
        "name": "n1",
        "fqdn": "n1.tail.example",
        "hostname": "host1",
        "user": "alice@example.com",
        "tags": [],
        "os": "linux",
        "key_expiry": 2000.0,
        "expired": False,
        "node_key": "X",
        "machine_key": "X",
        "disco_key": "X",
        "addresses": ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"],
        "listen_port": 41641,
        "endpoints": ["192.0.2.11:41641", "[2001:db8::11]:41641"],
        "tun": "tailpy0",
        "home_derp": 0,
        "home_derp_code": "",
        "name_by_admin": False,
        "name_pending": False,
        "advertised_routes": [],
        "approved_routes": [],
        "primary_routes": [],
        "control_routes": [],
    },
    "domain": "tail.example",
    "peers": [
        {
            "id": 2,
            "name": "n2",
            "fqdn": "n2.tail.example",
            "hostname": "host2",
            "user": "bob@example.com",
            "tags": [],
            "os": "linux",
            "node_key": "nodekey:0202020202020202020202020202020202020202020202020202020202020202",
            "addresses": ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"],
            "online": True,
            "last_seen": 999.0,
            "key_expiry": None,
            "expired": False,
            "home_derp": 900,
            "disco_key": "discokey:0909090909090909090909090909090909090909090909090909090909090909",
            "endpoints": ["192.168.1.20:41641", "203.0.113.2:41641"],
            "endpoint": None,
            "path": "relay",
            "relay_region": 900,
            "relay_region_code": "r900",
            "last_handshake": 1000.5,
            "active": False,
            "tx_bytes": 10,
            "rx_bytes": 20,
            "primary_routes": [],
            "allowed_ips": ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"],
            "exit_node_option": False,
            "exit_node": False,
        },
        {
            "id": 3,
            "name": "n3",
            "fqdn": "n3.tail.example",
            "hostname": "host3",
            "user": "",
            "tags": ["tag:server"],
            "os": "",
            "node_key": "nodekey:0303030303030303030303030303030303030303030303030303030303030303",
            "addresses": ["100.64.0.3/32", "fd7a:115c:a1e0::3/128"],
            "online": False,
            "last_seen": None,
            "key_expiry": None,
            "expired": False,
            "home_derp": 0,
            "disco_key": None,
            "endpoints": ["[2001:db8::3]:41641"],
            "endpoint": None,  # sent to directly, never answered (no handshake): no path yet
            "path": None,
            "relay_region": 0,
            "relay_region_code": "",
            "last_handshake": None,
            "active": False,
            "tx_bytes": 0,
            "rx_bytes": 7,
            "primary_routes": [],
            "allowed_ips": ["100.64.0.3/32", "fd7a:115c:a1e0::3/128"],
            "exit_node_option": False,
            "exit_node": False,
        },
        {
            "id": 4,
            "name": "n4",
            "fqdn": "n4.tail.example",
            "hostname": "host4",
            "user": "",
            "tags": [],
            "os": "",
            "node_key": "nodekey:0404040404040404040404040404040404040404040404040404040404040404",
            "addresses": ["100.64.0.4/32", "fd7a:115c:a1e0::4/128"],
            "online": False,
            "last_seen": None,
            "key_expiry": None,
            "expired": True,
            "home_derp": 0,
            "disco_key": None,
            "endpoints": [],
            "endpoint": None,
            "path": None,
            "relay_region": 0,
            "relay_region_code": "",
            "last_handshake": None,
            "active": False,
            "tx_bytes": 0,
            "rx_bytes": 0,
            "primary_routes": [],
            "allowed_ips": ["100.64.0.4/32", "fd7a:115c:a1e0::4/128"],
            "exit_node_option": False,
            "exit_node": False,
        },
    ],
    "device": {"dropped_send_error": 0, "tx_datagrams": 12, "gso": True},
    "derp": "X",
    "derp_map": {
        "Regions": {
            "900": {
                "RegionID": 900,
                "RegionCode": "r900",
                "RegionName": "Lab",
                "Nodes": [
                    {
                        "Name": "900a",
                        "RegionID": 900,
                        "HostName": "derp.example",
                        "IPv4": "198.51.100.1",
                        "STUNPort": 3478,
                    }
                ],
            }
        }
    },
    "traversal": "X",
    "ignored_datagrams": 0,
    "dns": None,
    "exit_node": None,
}
"""The status JSON of :func:`backend` (``now``, this node's random keys and the magicsock parts ``derp`` and
``traversal``, which depend on this host's addresses, blanked), as tailpyd sent it before the status had
types."""

EXPECTED_WHOIS: dict[str, Any] = {
    "id": 3,
    "name": "n3",
    "fqdn": "n3.tail.example",
    "hostname": "host3",
    "user": "",
    "tags": ["tag:server"],
    "os": "",
    "node_key": "nodekey:0303030303030303030303030303030303030303030303030303030303030303",
    "addresses": ["100.64.0.3/32", "fd7a:115c:a1e0::3/128"],
    "online": False,
    "last_seen": None,
    "key_expiry": None,
    "expired": False,
    "home_derp": 0,
    "disco_key": None,
    "endpoints": ["[2001:db8::3]:41641"],
    "endpoint": None,
    "path": None,
    "relay_region": 0,
    "relay_region_code": "",
    "last_handshake": None,
    "active": False,
    "tx_bytes": 0,
    "rx_bytes": 7,
    "primary_routes": [],
    "allowed_ips": ["100.64.0.3/32", "fd7a:115c:a1e0::3/128"],
    "exit_node_option": False,
    "exit_node": False,
}


def _blank(st: dict[str, Any]) -> dict[str, Any]:
    st["now"] = 0
    for k in ("node_key", "machine_key", "disco_key"):
        st["self"][k] = "X"
    for k in ("derp", "traversal"):
        assert isinstance(st[k], dict)
        st[k] = "X"
    return st


async def test_status_json_is_pinned(tmp_path: Path) -> None:
    b = await backend(tmp_path)
    st = b.status()
    doc = st.to_json()
    assert json.loads(json.dumps(doc)) == doc  # plain JSON types only
    assert _blank(copy.deepcopy(doc)) == EXPECTED_STATUS
    assert list(doc) == list(EXPECTED_STATUS) and list(doc["self"]) == list(EXPECTED_STATUS["self"])
    assert [list(p) for p in doc["peers"]] == [list(p) for p in EXPECTED_STATUS["peers"]]
    # the CLI's view: fields, typed
    assert st.self_node.node_key == b.state_data.node_key.public
    relayed, unanswered, expired = st.peers
    assert relayed.path == "relay" and relayed.endpoint is None and relayed.last_handshake == 1000.5
    assert unanswered.path is None and unanswered.endpoint is None and unanswered.first_ip == "100.64.0.3"
    assert expired.expired and expired.path is None
    assert st.derp_map is not None and st.derp_map.regions[900].region_code == "r900"
    assert st.device == {"dropped_send_error": 0, "tx_datagrams": 12, "gso": True}  # passed through


async def test_whois_json_is_pinned(tmp_path: Path) -> None:
    got = (await backend(tmp_path)).whois("100.64.0.3")
    assert got is not None and got.to_json() == EXPECTED_WHOIS
    assert PeerStatus.from_json(EXPECTED_WHOIS) == got


async def test_status_round_trips_through_json(tmp_path: Path) -> None:
    doc = (await backend(tmp_path)).status().to_json()
    assert Status.from_json(doc).to_json() == doc
    assert Status.from_json(json.loads(json.dumps(doc))).to_json() == doc


DERP_JSON = {
    "home_derp": 900,
    "home_derp_code": "r900",
    "latency_ms": {"900": 1.25, "901": 30.0},
    "connections": [
        {
            "region_id": 900,
            "region_code": "r900",
            "home": True,
            "connected": True,
            "url": "https://derp.example/derp",
            "sent": 3,
            "received": 4,
            "dropped": 0,
            "peer_gone": 1,
            "last_error": None,
            "health": "",
        }
    ],
    "relay_sent": 5,
    "relay_dropped": 0,
    "derp_received": 6,
    "derp_dropped": 0,
    "disco_dropped": 0,
    "not_here": 1,
    "not_here_peers": [],
}

NETCHECK_JSON = {
    "time": 1700000000.5,
    "udp": True,
    "ipv4": True,
    "ipv6": False,
    "os_has_ipv6": True,
    "global_v4": "203.0.113.5:41641",
    "global_v6": None,
    "global_v4_fresh": True,
    "global_v6_fresh": True,
    "mapping_varies_by_dest_ip": False,
    "mapping_varies_fresh": True,
    "hairpinning": None,
    "hairpinning_fresh": False,
    "preferred_derp": 900,
    "region_latency": {"900": 0.00125},
    "region_v4_latency": {"900": 0.00125},
    "region_v6_latency": {},
}

TRAVERSAL_JSON = {
    "endpoints": ["192.0.2.11:41641", "203.0.113.5:41641", "[2001:db8::11]:41641"],
    "disco": {"received": 3, "pings": 1, "pongs": 1},
    "send_errors": 0,
    "copied": 2,
    "link_changes": 0,
    "ignored": 1,
    "stun_unmatched": 0,
    "netcheck": NETCHECK_JSON,
    "peers": {
        NodePublic(bytes([2]) * 32).text(): {"path": "203.0.113.2:41641", "latency_ms": 1.5, "active": True},
        NodePublic(bytes([3]) * 32).text(): {"path": None, "latency_ms": None, "active": False},
    },
}


async def test_derp_and_traversal_parts_round_trip(tmp_path: Path) -> None:
    derp = DerpStatus.from_json(DERP_JSON)
    assert derp.latency_ms == {900: 1.25, 901: 30.0} and derp.connections[0].home
    assert derp.to_json() == DERP_JSON
    tr = TraversalStatus.from_json(TRAVERSAL_JSON)
    assert tr.endpoints[1] == Endpoint.parse("203.0.113.5:41641")
    assert tr.netcheck is not None and tr.netcheck.global_v4 == Endpoint.parse("203.0.113.5:41641")
    assert tr.peers[NodePublic(bytes([2]) * 32)].path == Endpoint.parse("203.0.113.2:41641")
    assert tr.to_json() == TRAVERSAL_JSON
    doc = (await backend(tmp_path)).status().to_json()
    full = {**doc, "derp": DERP_JSON, "traversal": TRAVERSAL_JSON, "dns": {"magic_dns": True, "names": 3}}
    assert Status.from_json(full).to_json() == full


def test_traversal_netcheck_leaves_out_the_probes() -> None:
    report = Report.from_json(NETCHECK_JSON)
    tr = TraversalStatus((), {}, 0, 0, 0, 0, 0, report)
    assert tr.to_json()["netcheck"] == NETCHECK_JSON and "probes" in report.to_json()


def test_parts_built_directly_serialise_as_documented() -> None:
    conn = DerpConnStatus(900, "r900", True, True, "https://derp.example/derp", 1, 2, 0, 0, None, "")
    assert DerpConnStatus.from_json(conn.to_json()) == conn
    peer = DiscoPeerStatus(Endpoint.parse("[2001:db8::2]:41641"), 0.5, True)
    assert peer.to_json() == {"path": "[2001:db8::2]:41641", "latency_ms": 0.5, "active": True}


def test_ping_reply_json() -> None:
    peer = PingPeer("b", "b.tail.example", "100.64.0.2")
    direct = PingReply(True, "198.51.100.7:41641", 0.001, Endpoint.parse("203.0.113.5:41641"), peer=peer)
    doc = direct.to_json()
    assert doc == {
        "peer": {"name": "b", "fqdn": "b.tail.example", "ip": "100.64.0.2"},
        "direct": True,
        "via": "198.51.100.7:41641",
        "rtt": 0.001,
        "peer_saw": "203.0.113.5:41641",
        "timeout": False,
    }
    assert PingReply.from_json(doc) == direct
    timeout = PingReply(False, "", None, timeout=True)
    assert timeout.to_json() == {"direct": False, "via": "", "rtt": None, "peer_saw": None, "timeout": True}
    assert PingReply.from_json(timeout.to_json()) == timeout


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("self"),
        lambda d: d.update(peers=[{"id": "x"}]),
        lambda d: d.update(now="soon"),
        lambda d: d["self"].update(endpoints=["junk"]),
        lambda d: d["self"].update(node_key="nodekey:12"),
        lambda d: d.update(derp={"home_derp": 1}),
        lambda d: d.update(device=[1, 2]),
        lambda d: d.update(health="one warning"),
    ],
)
async def test_malformed_status_is_one_parse_error(tmp_path: Path, mutate: Any) -> None:
    doc = (await backend(tmp_path)).status().to_json()
    mutate(doc)
    with pytest.raises(ParseError, match=r"malformed|endpoint"):
        Status.from_json(doc)


@pytest.mark.parametrize("obj", [None, 3, "status", [], {}])
def test_not_a_status_is_a_parse_error(obj: object) -> None:
    with pytest.raises(ParseError):
        Status.from_json(obj)
    with pytest.raises(ParseError):
        PingReply.from_json(obj)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=20,
)


@given(_json)
@settings(max_examples=300, deadline=None)
def test_fuzz_parsers_raise_only_parse_errors(obj: object) -> None:
    for parse in (Status.from_json, PeerStatus.from_json, PingReply.from_json, TraversalStatus.from_json):
        with contextlib.suppress(ParseError):
            parse(obj)


@given(st.sampled_from(["self", "peers", "derp", "traversal", "now", "device"]), _json)
@settings(max_examples=300, deadline=None)
def test_fuzz_one_field_of_a_real_status(key: str, value: object) -> None:
    doc = {**_STATUS_DOC, key: value}
    with contextlib.suppress(ParseError):
        Status.from_json(doc)


_STATUS_DOC: dict[str, Any] = {
    **EXPECTED_STATUS,
    "self": {
        **EXPECTED_STATUS["self"],
        "node_key": NodePublic(bytes([1]) * 32).text(),
        "machine_key": MachinePublic(bytes([101]) * 32).text(),
        "disco_key": DiscoPublic(bytes([7]) * 32).text(),
    },
    "derp": DERP_JSON,
    "traversal": TRAVERSAL_JSON,
}


def test_the_fuzzed_status_parses() -> None:
    assert Status.from_json(_STATUS_DOC).to_json() == _STATUS_DOC


def test_status_text_names_offload_fallbacks() -> None:
    """`tailpy status` says when the data plane fell back from an offload (the JSON has it under
    device.offload.fallbacks), and says nothing of offloads while all are in use."""
    from io import StringIO

    from rich.console import Console

    from tailpy.cli.status import render

    def text(device: dict[str, Any] | None) -> str:
        out = StringIO()
        render(Status.from_json({**_STATUS_DOC, "device": device}), Console(file=out, width=200))
        return out.getvalue()

    fallback = "udp: GSO refused (Input/output error), one datagram per message"
    assert f"data plane: {fallback}" in text({"offload": {"fallbacks": [fallback]}})
    filtered = {"filter": {"rules": 2, "dropped_no_rule": 3, "dropped_not_a_reply": 1, "dropped_protocol": 0}}
    assert "packet filter: dropped 4 inbound packets (3 no rule, 1 not a reply)" in text(filtered)
    assert "packet filter" not in text({"filter": {"rules": 2, "dropped_no_rule": 0}})
    assert "data plane" not in text({"offload": {"fallbacks": []}})
    assert "data plane" not in text(None)
