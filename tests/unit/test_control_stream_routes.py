"""Subnet routes end to end between a real control server (aiohttp on 127.0.0.1, SQLite) and real clients'
map streams: an approved route reaches a peer's allowed IPs and primary routes, an unapproved one does
not, a policy that grants no rule to the CIDR hides it, ``autoApprovers`` approve on advertise and on a
policy change, and closing the primary router's stream moves the route to the standby in one delta."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import pytest

from tailpy.control import ControlClient, ControlServer, Store
from tailpy.control.server import parse_routable_ips
from tailpy.errors import ControlError, ParseError
from tailpy.keys import MachinePrivate, NodePrivate
from tailpy.netmap import NetMap

STEP = 5.0  # seconds to wait for one expected stream message
LAN = "198.51.100.0/24"


class Control:
    def __init__(self, state_dir: Path) -> None:
        self.store = Store(state_dir)
        self.server = ControlServer(self.store, keepalive=0.5, poll_interval=0.2)
        self.url = ""
        self.clients: list[ControlClient] = []
        self.key = self.store.create_auth_key(reusable=True, expires=None, now=time.time()).key

    async def start(self) -> None:
        host, port = await self.server.start("127.0.0.1", 0)
        self.url = f"http://{host}:{port}"

    def client(self) -> ControlClient:
        c = ControlClient(self.url, MachinePrivate.generate())
        self.clients.append(c)
        return c


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[Control]:
    c = Control(tmp_path)
    await c.start()
    yield c
    for client in c.clients:
        await client.close()
    await c.server.stop()
    c.store.close()


async def next_map(it: AsyncIterator[NetMap]) -> NetMap:
    return await asyncio.wait_for(it.__anext__(), STEP)


async def until(it: AsyncIterator[NetMap], ok: object) -> NetMap:
    """The first netmap for which ``ok(nm)`` holds (each message waited for at most STEP seconds)."""
    assert callable(ok)
    while not ok(nm := await next_map(it)):
        pass
    return nm


async def join(
    control: Control, name: str, routes: list[str] | None = None
) -> tuple[int, AsyncGenerator[NetMap, None]]:
    """Register a node advertising ``routes`` and open its map stream (which sends them again)."""
    c = control.client()
    nk = NodePrivate.generate().public
    node = await c.register(nk, name, control.key, routable_ips=routes)
    return node.id, c.stream_map(nk, [], name, routable_ips=routes)


async def test_approved_routes_reach_peers_and_fail_over(control: Control) -> None:
    r1, s1 = await join(control, "r1", [LAN, "2001:db8:1::/64"])
    r2, s2 = await join(control, "r2", [LAN])
    _, sc = await join(control, "client")
    streams = [s1, s2, sc]
    try:
        nm = [await next_map(s) for s in streams][-1]  # (C opens last: it sees both routers online)
        assert nm.peers[r1].online and nm.peers[r2].online
        # advertised, not approved: peers see the advertisement, no route to use
        assert nm.peers[r1].routable_ips == (LAN, "2001:db8:1::/64") and nm.peers[r1].approved_routes == ()
        assert nm.peers[r1].effective_allowed_ips() == nm.peers[r1].addresses
        control.store.approve_routes(r1, [LAN], time.time())  # as `tailpy control routes approve` does
        control.store.approve_routes(r2, [LAN], time.time())
        control.server.admin_changed(r1)
        control.server.admin_changed(r2)
        nm = await until(sc, lambda nm: nm.peers[r1].primary_routes and nm.peers[r2].approved_routes)
        assert nm.peers[r1].primary_routes == (LAN,)  # the lower id, online first
        assert nm.peers[r1].allowed_ips == (*nm.peers[r1].addresses, LAN)  # the unapproved /64 is not there
        assert nm.peers[r2].primary_routes == () and nm.peers[r2].allowed_ips is None  # standby
        own = await until(s1, lambda nm: nm.self_node.primary_routes)
        assert own.self_node.allowed_ips == (*own.self_node.addresses, LAN)
        # R1's daemon dies: its stream closes; the next message C gets moves the route to R2
        await s1.aclose()
        await control.clients[0].close()
        nm = await next_map(sc)
        assert not nm.peers[r1].online and nm.peers[r1].primary_routes == ()
        assert nm.peers[r2].primary_routes == (LAN,) and nm.peers[r2].allowed_ips == (
            *nm.peers[r2].addresses,
            LAN,
        )
        assert (await until(s2, lambda nm: nm.self_node.primary_routes)).self_node.primary_routes == (LAN,)
    finally:
        for s in streams:
            await s.aclose()


async def test_a_policy_without_the_cidr_hides_the_route(control: Control) -> None:
    control.server.policy.set(
        '{"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:*"]}]}',
        "test",
    )
    r1, s1 = await join(control, "r1", [LAN])
    _, sc = await join(control, "client")
    try:
        await next_map(s1)
        control.store.approve_routes(r1, [LAN], time.time())
        control.server.admin_changed(r1)
        await until(s1, lambda nm: nm.self_node.primary_routes == (LAN,))
        nm = await until(sc, lambda nm: r1 in nm.peers and nm.peers[r1].approved_routes)
        # the rule names the router (a member's node), not the LAN, and no source is behind the router: the
        # client may not use the route
        assert nm.peers[r1].allowed_ips is None and nm.peers[r1].primary_routes == ()
        control.server.policy.set(
            '{"acls": [{"action": "accept", "src": ["*"], "dst": ["198.51.100.0/24:*"]}]}', "test"
        )
        nm = await until(sc, lambda nm: nm.peers[r1].allowed_ips is not None)
        assert nm.peers[r1].allowed_ips == (*nm.peers[r1].addresses, LAN)
        assert nm.peers[r1].primary_routes == (LAN,)
    finally:
        await s1.aclose()
        await sc.aclose()


async def test_auto_approvers_on_advertise_and_on_policy_change(control: Control) -> None:
    r1, s1 = await join(control, "r1", [LAN, "0.0.0.0/0", "::/0"])
    try:
        nm = await next_map(s1)
        assert nm.self_node.approved_routes == ()
        control.server.policy.set(
            '{"autoApprovers": {"routes": {"198.51.100.0/22": ["default@"]}, "exitNode": ["default@"]}}',
            "test",
        )  # (nodes of the auth key without a user belong to the user "default")
        nm = await until(s1, lambda nm: nm.self_node.approved_routes)
        assert nm.self_node.approved_routes == (LAN, "0.0.0.0/0", "::/0") and nm.self_node.exit_node_option()
        # a newly advertised route inside the approved prefix is approved at once; the policy never unapproves
        c = control.clients[0]
        await c.update(routable_ips=[LAN, "198.51.101.0/24"])
        nm = await until(s1, lambda nm: "198.51.101.0/24" in nm.self_node.approved_routes)
        assert nm.self_node.approved_routes == (LAN, "198.51.101.0/24")
        control.server.policy.set('{"acls": []}', "test")
        stored = control.store.node(r1)
        assert stored is not None and "0.0.0.0/0" in stored.approved_routes  # kept, though not advertised
        # a bad list: a 400 with one sentence, nothing stored
        with pytest.raises(ControlError, match="host bits set"):
            await c.update(routable_ips=["198.51.100.1/24"])
        with pytest.raises(ControlError, match="overlaps the tailnet's own range"):
            await c.update(routable_ips=["100.64.0.0/24"])
        stored = control.store.node(r1)
        assert stored is not None and stored.routable_ips == (LAN, "198.51.101.0/24")
    finally:
        await s1.aclose()


@pytest.mark.parametrize(
    ("body", "sentence"),
    [
        ({"routable_ips": "198.51.100.0/24"}, "routable_ips must be a list of CIDR prefixes"),
        ({"routable_ips": [1]}, "routable_ips must be a list of CIDR prefixes"),
        ({"routable_ips": ["banana"]}, "is not an IP prefix"),
    ],
)
def test_bad_routable_ips_are_one_sentence(body: dict[str, object], sentence: str) -> None:
    with pytest.raises(ParseError, match=sentence):
        parse_routable_ips(body)
    assert parse_routable_ips({}) is None and parse_routable_ips({"routable_ips": []}) == ()
    assert parse_routable_ips({"routable_ips": ["2001:DB8:1::/64"]}) == ("2001:db8:1::/64",)


def _user_timeout_ms(control: Control, node_id: int) -> int:
    import socket as socket_mod

    (sock,) = [s for st, s in control.server._stream_socks.items() if st.node_id == node_id]
    assert sock is not None
    return int(sock.getsockopt(socket_mod.IPPROTO_TCP, socket_mod.TCP_USER_TIMEOUT))


async def test_a_router_stream_notices_a_vanished_router_sooner(tmp_path: Path) -> None:
    """A node that advertises routes gets keepalive lines every ROUTER_KEEPALIVE seconds and a short TCP user
    timeout on its stream, so that control notices its host vanishing (no FIN, no RST) in seconds and moves
    its routes; a node that stops advertising gets the defaults back."""
    from tailpy.control.server import ROUTER_KEEPALIVE, ROUTER_USER_TIMEOUT, STREAM_USER_TIMEOUT

    c = Control(tmp_path)
    c.server.keepalive = 15.0  # the default, so the router's own keepalive is the one that shows
    await c.start()
    try:
        r1, s1 = await join(c, "r1", [LAN])
        n1, sn = await join(c, "n1")
        await next_map(s1)
        await next_map(sn)
        by_node = {st.node_id: st for st in c.server._stream_socks}
        assert by_node[r1].keepalive == ROUTER_KEEPALIVE
        assert by_node[n1].keepalive == 15.0
        assert _user_timeout_ms(c, r1) == int(ROUTER_USER_TIMEOUT * 1000)
        assert _user_timeout_ms(c, n1) == int(STREAM_USER_TIMEOUT * 1000)

        # routes advertised later with an update: the open stream becomes a router's; and back
        client_n1 = c.clients[1]
        await client_n1.update(routable_ips=["203.0.113.0/24"])
        assert by_node[n1].keepalive == ROUTER_KEEPALIVE
        assert _user_timeout_ms(c, n1) == int(ROUTER_USER_TIMEOUT * 1000)
        await client_n1.update(routable_ips=[])
        assert by_node[n1].keepalive == 15.0
        assert _user_timeout_ms(c, n1) == int(STREAM_USER_TIMEOUT * 1000)
    finally:
        for client in c.clients:
            await client.close()
        await c.server.stop()
        c.store.close()
