"""The mapper with a policy: each stream's netmap carries its node's packet filter and only the peers it
sees; node changes and policy changes reach exactly the streams they affect, as deltas."""

from __future__ import annotations

from _mapclient import Client, mkey, node

from tailpy.control.mapper import Mapper
from tailpy.control.policy import Policy
from tailpy.packetfilter import ALLOW_ALL, ALLOW_ALL_PART, CLEAR_PARTS, filter_to_json

TAGS = '"tagOwners": {"tag:server": ["group:dev"], "tag:db": ["group:dev"], "tag:web": []}'
DEV_TO_SERVER = Policy.parse(
    '{"groups": {"group:dev": ["alice@", "bob@"], "group:ops": ["carol@"]}, ' + TAGS + ","
    ' "acls": [{"action": "accept", "src": ["group:dev"], "dst": ["tag:server:22"]}]}'
)


def tailnet() -> Mapper:
    m = Mapper(mkey(), "ts.net", log_limit=64)
    m.load(
        [
            node(1, "alice"),
            node(2, "alice"),
            node(3, "bob"),
            node(4, "carol"),
            node(5, tags=("tag:server",)),
            node(6, tags=("tag:web",)),
        ]
    )
    return m


def test_no_policy_everyone_sees_everyone_and_allows_all() -> None:
    m = tailnet()
    a = Client(m, 1)
    (full,) = a.drain()
    assert full.body["netmap"]["packet_filters"] == {ALLOW_ALL_PART: filter_to_json(ALLOW_ALL)}
    assert a.peers() == {2, 3, 4, 5, 6} and m.filter_for(1) == ALLOW_ALL
    assert m.filter_for(99) is None


def test_full_netmap_carries_the_filter_and_only_visible_peers() -> None:
    m = tailnet()
    m.set_policy(DEV_TO_SERVER)
    clients = {i: Client(m, i) for i in range(1, 7)}
    for c in clients.values():
        c.drain()
        assert c.in_sync()
    assert clients[1].peers() == {5} and clients[3].peers() == {5}
    assert clients[5].peers() == {1, 2, 3}
    assert clients[4].peers() == set() and clients[6].peers() == set()
    nm5 = clients[5].state.netmap  # type: ignore[union-attr]
    assert filter_to_json(nm5.packet_filter or ()) == [
        {
            "SrcIPs": ["100.64.0.1-100.64.0.3"],
            "DstPorts": [{"IP": "100.64.0.5", "Ports": {"First": 22, "Last": 22}}],
        }
    ]
    assert clients[1].state.netmap.packet_filter == ()  # type: ignore[union-attr]  # nothing may reach it


def test_a_node_change_reaches_only_the_streams_that_see_it() -> None:
    m = tailnet()
    m.set_policy(DEV_TO_SERVER)
    clients = {i: Client(m, i) for i in range(1, 7)}
    for c in clients.values():
        c.drain()
    m.publish(node(3, "bob", hostname="renamed"))  # bob's device: seen by the server only
    assert [x.type for x in clients[5].drain()] == ["delta"]
    for i in (1, 2, 4, 6):
        assert clients[i].drain() == []
    assert [x.body.get("self", {}).get("hostname") for x in clients[3].drain()] == ["renamed"]
    assert all(c.in_sync() for c in clients.values())


def test_a_new_group_member_changes_the_filters_of_the_nodes_the_group_reaches() -> None:
    m = tailnet()
    m.set_policy(DEV_TO_SERVER)
    server, web = Client(m, 5), Client(m, 6)
    server.drain()
    web.drain()
    m.publish(node(7, "bob"))  # bob's second device joins
    (d,) = server.drain()
    (part,) = d.body["packet_filters"].values()  # the one rule's part, sent again
    assert part[0]["SrcIPs"] == ["100.64.0.1-100.64.0.3", "100.64.0.7"]
    assert [n["id"] for n in d.body["peers_changed"]] == [7]
    assert web.drain() == []
    assert server.in_sync()


def test_a_node_that_becomes_invisible_is_removed_and_its_own_view_resent() -> None:
    m = tailnet()
    m.set_policy(DEV_TO_SERVER)
    clients = {i: Client(m, i) for i in range(1, 7)}
    for c in clients.values():
        c.drain()
    m.publish(node(5, tags=("tag:web",)))  # the server loses tag:server: no rule reaches it now
    for i in (1, 2, 3):
        (d,) = clients[i].drain()
        assert d.body["peers_removed"] == [5] and "peers_changed" not in d.body
    assert [x.type for x in clients[5].drain()] == ["netmap"]
    assert clients[5].peers() == set()
    assert clients[4].drain() == [] and clients[6].drain() == []
    assert all(c.in_sync() for c in clients.values())


def test_policy_change_reaches_affected_streams_as_deltas() -> None:
    m = tailnet()
    clients = {i: Client(m, i) for i in range(1, 7)}
    for c in clients.values():
        c.drain()
    m.set_policy(DEV_TO_SERVER)  # from allow-all: most peers disappear
    for c in clients.values():
        c.drain()
        assert c.in_sync()
    m.set_policy(
        Policy.parse(
            '{"groups": {"group:dev": ["alice@", "bob@"], "group:ops": ["carol@"]}, ' + TAGS + ","
            ' "acls": [{"action": "accept", "src": ["group:dev"], "dst": ["tag:server:22"]},'
            ' {"action": "accept", "src": ["group:ops"], "dst": ["tag:web:443"]}]}'
        )
    )
    (d4,) = clients[4].drain()
    assert d4.type == "delta" and [n["id"] for n in d4.body["peers_changed"]] == [6]
    assert "packet_filters" not in d4.body  # its filter is still empty: not sent again
    (d6,) = clients[6].drain()
    (part,) = d6.body["packet_filters"].values()
    assert part[0]["SrcIPs"] == ["100.64.0.4"]
    assert [n["id"] for n in d6.body["peers_changed"]] == [4]
    for c in clients.values():
        c.drain()
        assert c.in_sync()
    m.set_policy(None)  # back to allow-all: everyone again
    for c in clients.values():
        c.drain()
        assert c.in_sync() and len(c.peers()) == 5
        assert c.state is not None and c.state.netmap.packet_filter == ALLOW_ALL


def test_autogroup_self_then_a_rule_and_a_tag_reach_nodes_without_restart() -> None:
    """Users' devices reach each other only; then group:ops may reach tag:db:5432 and one of alice's
    devices is tagged tag:db: ops sees it, its filter admits ops, alice's other device loses it."""
    m = tailnet()
    self_only = (
        '{"groups": {"group:dev": ["alice@", "bob@"], "group:ops": ["carol@"]}, ' + TAGS + ","
        ' "acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}'
    )
    m.set_policy(Policy.parse(self_only + "]}"))
    clients = {i: Client(m, i) for i in range(1, 7)}
    for c in clients.values():
        c.drain()
    assert clients[1].peers() == {2} and clients[2].peers() == {1} and clients[3].peers() == set()
    m.set_policy(
        Policy.parse(self_only + ', {"action": "accept", "src": ["group:ops"], "dst": ["tag:db:5432"]}]}')
    )
    m.publish(node(2, tags=("tag:db",)))  # the admin tags alice's second device
    for c in clients.values():
        c.drain()
        assert c.in_sync()
    assert clients[4].peers() == {2} and clients[1].peers() == set()
    nm2 = clients[2].state.netmap  # type: ignore[union-attr]
    assert nm2.self_node.tags == ("tag:db",)
    assert filter_to_json(nm2.packet_filter or ()) == [
        {"SrcIPs": ["100.64.0.4"], "DstPorts": [{"IP": "100.64.0.2", "Ports": {"First": 5432, "Last": 5432}}]}
    ]


def test_users_matched_by_email_once_control_gives_them() -> None:
    m = tailnet()
    m.set_policy(
        Policy.parse(
            '{"tagOwners": {"tag:server": []}, '
            '"acls": [{"action": "accept", "src": ["carol@example.com"], "dst": ["tag:server:80"]}]}'
        )
    )
    server = Client(m, 5)
    server.drain()
    assert server.peers() == set()
    m.set_user_emails({"carol": "carol@example.com"})
    server.drain()
    assert server.peers() == {4} and server.in_sync()


def test_resume_across_a_policy_change_gets_a_full_netmap() -> None:
    m = tailnet()
    a = Client(m, 1)
    a.drain()
    assert a.state is not None
    m.close_stream(a.stream)
    m.set_policy(DEV_TO_SERVER)
    again = Client(m, 1, (a.state.generation, a.state.version))
    assert again.stream.resync
    again.drain()
    assert again.in_sync() and again.peers() == {5}


def test_resume_without_a_policy_change_sends_the_filter_and_removes_hidden_peers() -> None:
    m = tailnet()
    m.set_policy(DEV_TO_SERVER)
    a = Client(m, 1)
    a.drain()
    assert a.state is not None
    m.close_stream(a.stream)
    m.publish(node(5, tags=("tag:web",)))  # a no longer sees the server
    m.publish(node(8, "bob", tags=("tag:server",)))  # a new server it does see
    again = Client(m, 1, (a.state.generation, a.state.version))
    again.state = a.state
    (first,) = again.drain()
    assert first.body["peers_removed"] == [5] and [n["id"] for n in first.body["peers_changed"]] == [8]
    assert CLEAR_PARTS in first.body["packet_filters"]  # what the client had is unknown: all parts again
    assert again.in_sync()


def test_a_policy_edit_sends_each_node_only_the_parts_of_the_rules_that_changed() -> None:
    """Parts are named after their rule's content: adding a rule sends its part, editing one replaces its
    part (the old name deleted), the rules left alone travel no more; the filters end as the policy's."""
    base = (
        '{"groups": {"group:dev": ["alice@", "bob@"], "group:ops": ["carol@"]}, ' + TAGS + ","
        ' "acls": [{"action": "accept", "src": ["group:dev"], "dst": ["tag:server:22"]}'
    )
    m = tailnet()
    m.set_policy(Policy.parse(base + "]}"))
    server = Client(m, 5)
    (full,) = server.drain()
    (kept,) = full.body["netmap"]["packet_filters"]
    m.set_policy(Policy.parse(base + ', {"action": "accept", "src": ["group:ops"], "dst": ["*:80"]}]}'))
    (d,) = server.drain()
    (added,) = d.body["packet_filters"].items()
    assert added[0] != kept and added[1][0]["SrcIPs"] == ["100.64.0.4"]
    m.set_policy(Policy.parse(base + ', {"action": "accept", "src": ["group:ops"], "dst": ["*:81"]}]}'))
    (d,) = server.drain()
    assert d.body["packet_filters"][added[0]] is None and kept not in d.body["packet_filters"]
    assert len(d.body["packet_filters"]) == 2
    assert server.in_sync()
    assert server.state is not None and set(server.state.netmap.packet_filter or ()) == set(
        m.filter_for(5) or ()
    )
