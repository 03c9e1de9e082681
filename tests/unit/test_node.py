"""tailpy.Node against a real control server on 127.0.0.1 with a stand-in userspace data plane
(tests/unit/_userspace_device.py): two nodes in one process come up with an auth key, resolve each other's
MagicDNS names from the netmap, talk TCP both ways and UDP, report peers' tailnet addresses, and release
every file descriptor and thread when closed. The datagram header of the netstack's UDP fds is fuzzed."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from _userspace_device import FakeNet
from hypothesis import given
from hypothesis import strategies as st

import tailpy
from tailpy.control import ControlServer, Store
from tailpy.errors import AuthKeyError, ConfigError, DaemonRunningError, DialError, ParseError
from tailpy.netstack import decode_datagram, encode_datagram, lookup


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[tuple[ControlServer, str]]:
    (tmp_path / "control").mkdir()
    store = Store(tmp_path / "control")
    srv = ControlServer(store, keepalive=0.5, poll_interval=0.2)
    host, port = await srv.start("127.0.0.1", 0)
    yield srv, f"http://{host}:{port}"
    await srv.stop()
    store.close()


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def node(net: FakeNet, url: str, key: str, state: Path, name: str) -> tailpy.Node:
    return tailpy.Node(
        control_url=url, auth_key=key, state_dir=state, hostname=name, device_factory=net.factory
    )


async def test_two_nodes_in_one_process(control: tuple[ControlServer, str], tmp_path: Path) -> None:
    srv, url = control
    key = srv.store.create_auth_key(reusable=True, expires=None, now=time.time()).key
    net = FakeNet()
    fds, threads = _fds(), set(threading.enumerate())
    async with (
        node(net, url, key, tmp_path / "a", "alpha") as a,
        node(net, url, key, tmp_path / "b", "beta") as b,
    ):
        assert a.addresses and a.addresses[0].version == 4
        assert a.addresses != b.addresses
        status = await a.status()
        assert status.backend_state == "Running" and status.self_node.tun == "userspace-networking"
        for _ in range(100):  # each sees the other in its netmap
            if (await a.status()).peers and (await b.status()).peers:
                break
            await asyncio.sleep(0.05)
        assert [p.name for p in (await a.status()).peers] == ["beta"]

        seen: list[tuple[str, int]] = []

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(writer.get_extra_info("peername"))
            writer.write((await reader.readline()).upper())
            await writer.drain()
            writer.close()

        server = await b.start_server(echo, port=80)
        domain = (await b.status()).domain
        for host in ("beta", f"beta.{domain}.", str(b.addresses[0]), "BETA"):
            reader, writer = await a.open_connection(host, 80)
            assert writer.get_extra_info("peername") == (str(b.addresses[0]), 80)
            writer.write(b"hello\n")
            assert await reader.readline() == b"HELLO\n"
            writer.close()
            await writer.wait_closed()
        assert seen[0][0] == str(a.addresses[0])
        who = await b.whois(f"{seen[0][0]}:{seen[0][1]}")
        assert who is not None and who.name == "alpha"

        with pytest.raises(DialError) as refused:
            await a.open_connection("beta", 81)
        assert refused.value.reason == "refused"
        with pytest.raises(DialError) as unknown:
            await a.open_connection("gamma", 80)
        assert unknown.value.reason == "no-name"

        # UDP both ways, by name and by address
        got: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

        class Echo(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                assert isinstance(self.transport, asyncio.DatagramTransport)
                self.transport.sendto(data[::-1], addr)

        class Collect(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                got.put_nowait((data, addr))

        t_b, _ = await b.create_datagram_endpoint(Echo, local_port=5353)
        t_a, _ = await a.create_datagram_endpoint(Collect, remote_addr=("beta", 5353))
        t_a.sendto(b"ping")
        data, addr = await asyncio.wait_for(got.get(), 5)
        assert data == b"gnip" and addr == (str(b.addresses[0]), 5353)
        # larger than the userspace stack carries: refused at once, not dropped unseen
        v6 = next(str(ip) for ip in b.addresses if ip.version == 6)
        for payload, dst in ((bytes(16357), "beta"), (bytes(1233), v6)):
            with pytest.raises(OSError, match="too long") as big:
                t_a.sendto(payload, (dst, 5353))
            assert big.value.errno == errno.EMSGSIZE
        t_a.sendto(bytes(1232), (v6, 5353))  # fits one IPv6 packet of the default MTU

        server.close()
        await server.wait_closed()
        with pytest.raises(DialError):
            await a.open_connection("beta", 80)
        t_a.close()
        t_b.close()
        # a second node on a state directory in use is refused
        with pytest.raises(DaemonRunningError):
            await node(net, url, key, tmp_path / "a", "alpha2").start()
    await asyncio.sleep(0.1)
    assert _fds() <= fds | {"dummy"}, "file descriptors left open"
    assert set(threading.enumerate()) <= threads, "threads left running"


async def test_close_releases_open_connections(control: tuple[ControlServer, str], tmp_path: Path) -> None:
    srv, url = control
    key = srv.store.create_auth_key(reusable=True, expires=None, now=time.time()).key
    net = FakeNet()
    fds = _fds()
    a = node(net, url, key, tmp_path / "a", "alpha")
    b = node(net, url, key, tmp_path / "b", "beta")
    await a.start()
    await b.start()
    for _ in range(100):
        if (await a.status()).peers:
            break
        await asyncio.sleep(0.05)
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()

    await b.start_server(hold, port=22)
    reader, _ = await a.open_connection("beta", 22)
    await a.create_datagram_endpoint(asyncio.DatagramProtocol, local_port=9)
    await b.close()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the server's side went away with b
    await a.close()
    await a.close()  # idempotent
    await asyncio.sleep(0.1)
    assert _fds() <= fds


async def test_ephemeral_node_keeps_no_state(control: tuple[ControlServer, str], tmp_path: Path) -> None:
    srv, url = control
    key = srv.store.create_auth_key(reusable=True, expires=None, now=time.time()).key
    net = FakeNet()
    n = tailpy.Node(control_url=url, auth_key=key, hostname="tmp", ephemeral=True, device_factory=net.factory)
    async with n:
        state = n.state_dir
        assert state is not None and state.exists()
        assert [x.name for x in srv.store.list_nodes()] == ["tmp"]
    assert not state.exists()
    assert srv.store.list_nodes() == []  # a plain reusable key: deleted at close all the same


def test_lookup_names() -> None:
    from tailpy import netmap as nm
    from tailpy.dns.config import DNSConfig, ExtraRecord
    from tailpy.keys import MachinePrivate, NodePrivate

    def mk(i: int, name: str) -> nm.Node:
        return nm.Node(
            id=i,
            name=name,
            hostname=f"host-{name}",
            node_key=NodePrivate.generate().public,
            machine_key=MachinePrivate.generate().public,
            addresses=(f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i}/128"),
        )

    m = nm.NetMap(
        mk(1, "alpha"),
        {2: mk(2, "beta")},
        "ts.test",
        dns=DNSConfig(extra_records=(ExtraRecord.make("www.ts.test", "A", "100.64.0.9"),)),
    )
    v4, v6 = ipaddress.ip_address("100.64.0.2"), ipaddress.ip_address("fd7a:115c:a1e0::2")
    assert lookup(m, "beta") == [v4, v6]
    assert lookup(m, "Beta.TS.test.") == [v4, v6]
    assert lookup(m, "host-beta") == [v4, v6]
    assert lookup(m, "alpha") == [
        ipaddress.ip_address("100.64.0.1"),
        ipaddress.ip_address("fd7a:115c:a1e0::1"),
    ]
    assert lookup(m, "www.ts.test") == [ipaddress.ip_address("100.64.0.9")]
    assert lookup(m, "[fd7a:115c:a1e0::2]") == [v6]
    for bad in ("gamma", "beta.other.test"):
        with pytest.raises(DialError, match="no node"):
            lookup(m, bad)
    with pytest.raises(DialError, match="no netmap"):
        lookup(None, "beta")


async def test_dial_to_expired_peer_names_the_expiry() -> None:
    from dataclasses import replace

    from tailpy import netmap as nm
    from tailpy.keys import MachinePrivate, NodePrivate
    from tailpy.netstack import Netstack, check_peer

    def mk(i: int, name: str, expired: bool = False) -> nm.Node:
        return nm.Node(
            id=i,
            name=name,
            hostname=name,
            node_key=NodePrivate.generate().public,
            machine_key=MachinePrivate.generate().public,
            addresses=(f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i}/128"),
            expired=expired,
        )

    m = nm.NetMap(mk(1, "alpha"), {2: mk(2, "beta", expired=True), 3: mk(3, "gamma")}, "ts.test")

    class Unreachable:
        def tcp_dial(self, dst_ip: str, dst_port: int, timeout: float) -> int:
            raise DialError(f"no peer's allowed IPs contain {dst_ip}")

    stack = Netstack(lambda: Unreachable(), lambda h: lookup(m, h), check=lambda ip: check_peer(m, ip))  # type: ignore[arg-type,return-value]
    for host in ("beta", "100.64.0.2", "fd7a:115c:a1e0::2"):
        with pytest.raises(DialError, match="peer beta's key has expired") as e:
            await stack.open_connection(host, 80)
        assert e.value.reason == "unreachable"
    with pytest.raises(DialError, match="allowed IPs"):
        await stack.open_connection("gamma", 80)
    check_peer(replace(m, peers={2: replace(m.peers[2], expired=False)}), ipaddress.ip_address("100.64.0.2"))
    await stack.close()


@given(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(0, 65535),
    st.binary(max_size=2000),
)
def test_datagram_header_round_trip(ip: ipaddress.IPv4Address, port: int, payload: bytes) -> None:
    msg = encode_datagram(ip, port, payload)
    assert len(msg) == 19 + len(payload)
    assert decode_datagram(msg) == (payload, ip, port)


@given(st.binary(max_size=64))
def test_datagram_header_rejects_garbage(data: bytes) -> None:
    try:
        payload, _ip, port = decode_datagram(data)
    except ParseError:
        return
    assert data[0] in (4, 6) and 0 <= port <= 65535 and len(payload) == len(data) - 19


async def test_interactive_login_reports_the_url(tmp_path: Path) -> None:
    """Without an auth key, control's sign-in URL goes to on_login_url, login_url and wait_login_url; the
    node comes up once the user signed in (OpenID Connect, tests/_oidc_provider.py)."""
    import re

    from test_control_oidc import _start, callback, sign_in

    (tmp_path / "control").mkdir()
    async for env in _start(tmp_path / "control", allowed_domains=("example.com",)):
        urls: list[str] = []
        n = tailpy.Node(
            control_url=env.url,
            state_dir=tmp_path / "n",
            hostname="laptop",
            on_login_url=urls.append,
            device_factory=FakeNet().factory,
        )
        starting = asyncio.create_task(n.start())
        try:
            url = await asyncio.wait_for(n.wait_login_url(), 10)
            assert url.startswith(env.url + "/login/") and n.login_url == url
            async with env.browser.get(url) as r:
                found = re.search(r'href="([^"]+)"', await r.text())
            assert found is not None
            async with env.browser.get(env.url + found.group(1), allow_redirects=False) as r:
                auth = r.headers["Location"]
            status, _ = await callback(env, await sign_in(env, auth, "alice", "pw-alice"))
            assert status == 200
            await asyncio.wait_for(starting, 30)
            st = await n.status()
            assert st.backend_state == "Running" and st.self_node.user == "alice@example.com"
            assert urls == [url] and n.login_url is None
        finally:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await n.close()


async def test_refused_auth_key_leaves_nothing(control: tuple[ControlServer, str], tmp_path: Path) -> None:
    _, url = control
    fds = _fds()
    with pytest.raises(AuthKeyError):
        async with tailpy.Node(
            control_url=url, auth_key="tskey-nope", state_dir=tmp_path / "n", device_factory=FakeNet().factory
        ):
            pass
    await asyncio.sleep(0.1)
    assert _fds() <= fds
    with pytest.raises(ConfigError, match="no control server"):
        await tailpy.Node(state_dir=tmp_path / "m", device_factory=FakeNet().factory).start()
