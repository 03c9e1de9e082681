"""DERP reconnect backoff (no reconnect storms: tailscale/tailscale#109), liveness of a silent connection,
Health frames, and error wording.

Real sockets on 127.0.0.1: a real DerpServer, a scripted server that closes right after login, and a TCP
proxy that can go silent (swallow everything both ways) to stand for a relay whose path died."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import nacl.public
import pytest

from tailpy.derp.client import ReconnectingDerpClient
from tailpy.derp.server import DerpServer
from tailpy.keys import MachinePrivate, NodePrivate
from tailpy.magicsock.derp import DerpConnections
from tailpy.netmap import DerpMap, DerpNode, DerpRegion
from tailpy.proto import derp as proto

ROOT = Path(__file__).resolve().parents[2]


def node() -> NodePrivate:
    return NodePrivate(bytes(nacl.public.PrivateKey.generate()))


async def eventually(cond: object, timeout: float = 15.0) -> None:
    assert callable(cond)
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


class _FixedRng(random.Random):
    def random(self) -> float:
        return 0.999  # jitter at its top: every delay is its full step


async def _close_after_login_server() -> tuple[asyncio.Server, list[float]]:
    sk = MachinePrivate(bytes(nacl.public.PrivateKey.generate()))
    accepted: list[float] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(asyncio.get_running_loop().time())
        try:
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
            w.write(proto.encode(proto.ServerKey(sk.public)))
            fr = proto.FrameReader()
            frames: list[proto.Frame] = []
            while not frames:
                data = await r.read(4096)
                if not data:
                    return
                frames += fr.feed(data)
            ci = frames[0]
            assert isinstance(ci, proto.ClientInfo)
            w.write(proto.encode(proto.seal_server_info(sk, ci.key)))
            await w.drain()
        finally:
            w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), accepted


async def test_immediate_close_after_login_backs_off() -> None:
    """A server closing each connection right after login sees growing delays, not a flat 0.25-0.5 s."""
    srv, _accepted = await _close_after_login_server()
    port = srv.sockets[0].getsockname()[1]
    c = ReconnectingDerpClient(f"http://127.0.0.1:{port}/derp", node(), base=0.02, cap=0.64, rng=_FixedRng())
    c.start()
    try:
        await eventually(lambda: len(c.delays) >= 6)
        assert c.connects >= 5
        d = c.delays[:6]
        assert all(b > a for a, b in itertools.pairwise(d)), d  # doubling (jitter fixed at the top)
        assert d[-1] > 10 * d[0], d
    finally:
        await c.close()
        srv.close()
        await srv.wait_closed()


async def test_stable_connection_resets_backoff() -> None:
    """A connection that stayed up ``stable_after`` seconds starts the delays again from ``base``."""
    s = DerpServer(MachinePrivate(bytes(nacl.public.PrivateKey.generate())))
    await s.start("127.0.0.1", 0)
    key = node()
    c = ReconnectingDerpClient(
        f"http://127.0.0.1:{s.addresses[0][1]}/derp",
        key,
        base=0.02,
        cap=5.0,
        stable_after=0.2,
        rng=_FixedRng(),
    )
    c.start()
    try:
        for n in range(1, 4):
            await eventually(lambda n=n: c.connects == n and c.client is not None)
            await asyncio.sleep(0.3)  # longer than stable_after
            for conn in s.connections(key.public):
                conn.close()
            await eventually(lambda n=n: len(c.delays) == n)
        assert c.delays[0] == c.delays[1] == c.delays[2]
    finally:
        await c.close()
        await s.stop()


class SilentProxy:
    """TCP proxy 127.0.0.1:port -> target; ``silent = True`` swallows every byte both ways from then on."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.silent = False
        self.server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await r.read(65536):
                if not self.silent:
                    w.write(data)
                    await w.drain()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [w, uw]
        await asyncio.gather(self._pipe(r, uw), self._pipe(ur, w), return_exceptions=True)

    async def stop(self) -> None:
        for w in self._writers:
            w.transport.abort()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def relay() -> AsyncIterator[tuple[DerpServer, SilentProxy, int]]:
    s = DerpServer(MachinePrivate(bytes(nacl.public.PrivateKey.generate())))
    await s.start("127.0.0.1", 0)
    proxy = SilentProxy(s.addresses[0][1])
    port = await proxy.start()
    yield s, proxy, port
    await proxy.stop()
    await s.stop()


async def test_silent_relay_is_found_dead(relay: tuple[DerpServer, SilentProxy, int]) -> None:
    """A connection that goes silent is pinged, and without a Pong it is closed (status no longer
    'connected'); before, it stayed 'connected' forever."""
    _, proxy, port = relay
    c = ReconnectingDerpClient(
        f"http://127.0.0.1:{port}/derp", node(), idle_ping=0.3, ping_timeout=0.3, connect_timeout=0.5
    )
    c.start()
    try:
        await c.wait_connected(5)
        await asyncio.sleep(1.0)  # quiet but alive: pings are answered, the connection stays
        assert c.client is not None and c.connects == 1
        proxy.silent = True
        await eventually(lambda: c.client is None)
        assert c.last_error is not None and "did not answer a ping" in c.last_error
        assert c.last_recv is None
    finally:
        await c.close()


async def test_dead_home_has_no_recent_traffic(relay: tuple[DerpServer, SilentProxy, int]) -> None:
    """In magicsock: once the home's connection is found dead, last_recv() is None, so the home chooser
    (which keeps a probe-less home only while frames arrive) moves home at its next report."""
    _, proxy, port = relay
    region = DerpRegion(
        region_id=901,
        region_code="r1",
        region_name="one",
        nodes=(
            DerpNode(
                name="901a",
                region_id=901,
                host_name="127.0.0.1",
                ipv4="127.0.0.1",
                derp_port=port,
                insecure_for_tests=True,
            ),
        ),
    )
    conns = DerpConnections(
        node(), lambda *_: None, idle_ping=0.3, ping_timeout=0.3, connect_timeout=0.5, cap=0.5
    )
    down: list[int] = []
    conns.on_down = down.append
    await conns.set_derp_map(DerpMap(regions={901: region}))
    try:
        await conns.set_home(901)
        await eventually(lambda: conns.connected(901))
        assert conns.last_recv(901) is not None
        assert conns.status()[0].last_error is None
        proxy.silent = True
        await eventually(lambda: not conns.connected(901))
        assert conns.last_recv(901) is None
        assert down and down[0] == 901  # magicsock.Conn's hook to re-measure at once
        st = conns.status()[0]
        assert st.connected is False and st.last_error is not None and "ping" in st.last_error
        proxy.silent = False  # the relay comes back: the error clears on the next connect
        await eventually(lambda: conns.connected(901), timeout=30)
        assert conns.status()[0].last_error is None
    finally:
        await conns.close()


async def test_last_error_cleared_after_reconnect() -> None:
    """After a failed attempt and then a successful connect, last_error is None."""
    sock_srv = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = sock_srv.sockets[0].getsockname()[1]
    sock_srv.close()
    await sock_srv.wait_closed()  # nothing listens on port now: the first attempts fail
    c = ReconnectingDerpClient(f"http://127.0.0.1:{port}/derp", node(), base=0.05, cap=0.2)
    c.start()
    s = DerpServer(MachinePrivate(bytes(nacl.public.PrivateKey.generate())))
    try:
        await eventually(lambda: c.last_error is not None)
        await s.start("127.0.0.1", port)
        await c.wait_connected(10)
        assert c.last_error is None
    finally:
        await c.close()
        await s.stop()


async def test_health_frame_in_status() -> None:
    """A Health frame from the server (duplicate key) shows in DerpConnections.status()."""
    s = DerpServer(MachinePrivate(bytes(nacl.public.PrivateKey.generate())))
    await s.start("127.0.0.1", 0)
    port = s.addresses[0][1]
    region = DerpRegion(
        region_id=900,
        region_code="t",
        region_name="t",
        nodes=(
            DerpNode(
                name="900a",
                region_id=900,
                host_name="127.0.0.1",
                ipv4="127.0.0.1",
                derp_port=port,
                insecure_for_tests=True,
            ),
        ),
    )
    key = node()
    a = DerpConnections(key, lambda *_: None)
    b = DerpConnections(key, lambda *_: None)
    try:
        for conns in (a, b):
            await conns.set_derp_map(DerpMap(regions={900: region}))
            await conns.set_home(900)
            await eventually(lambda conns=conns: conns.connected(900))
        await eventually(lambda: any(c.status()[0].health for c in (a, b)))
    finally:
        await a.close()
        await b.close()
        await s.stop()


async def test_request_head_431_at_the_cap() -> None:
    """9000 bytes with no blank line get 431 at once, not a close after header_timeout."""
    s = DerpServer(MachinePrivate(bytes(nacl.public.PrivateKey.generate())), header_timeout=30.0)
    await s.start("127.0.0.1", 0)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", s.addresses[0][1])
        w.write(b"\x00" * 9000)
        await w.drain()
        got = await asyncio.wait_for(r.read(200), 10)  # well under header_timeout
        assert got.startswith(b"HTTP/1.1 431 ")
        w.close()
    finally:
        await s.stop()


async def test_client_dropping_during_login_logged_plainly(caplog: pytest.LogCaptureFixture) -> None:
    """The log says the client closed the connection during login, not IncompleteReadError text."""
    s = DerpServer(MachinePrivate(bytes(nacl.public.PrivateKey.generate())))
    await s.start("127.0.0.1", 0)
    caplog.set_level(logging.INFO, logger="tailpy.derp")
    try:
        r, w = await asyncio.open_connection("127.0.0.1", s.addresses[0][1])
        w.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        await r.readuntil(b"\r\n\r\n")
        w.close()
        await eventually(lambda: s.metrics.login_failures >= 1)
        text = caplog.text
        assert "client closed the connection during login" in text
        assert "bytes read on a total" not in text
    finally:
        await s.stop()


def test_cli_names_control_url_and_bad_pem(tmp_path: Path) -> None:
    """--control-url notaurl names the flag and the value; a bad PEM names the file."""
    from click.testing import CliRunner

    from tailpy.cli.main import cli

    runner = CliRunner()
    base = ["derp", "serve", "--state-dir", str(tmp_path / "s"), "--listen", "127.0.0.1:0"]
    r = runner.invoke(cli, [*base, "--verify-clients", "--control-url", "notaurl"])
    assert r.exit_code == 1 and "--control-url 'notaurl' must start with http://" in r.output, r.output
    bad = tmp_path / "bad.pem"
    bad.write_text("not a pem\n")
    r = runner.invoke(cli, [*base, "--certfile", str(bad), "--keyfile", str(bad)])
    assert r.exit_code == 1 and f"--certfile {bad} is not a valid PEM certificate" in r.output, r.output
    assert "PEM lib" not in r.output and "Traceback" not in r.output


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--pairs", "abc"], "--pairs 'abc' must be positive whole numbers"),
        (["--pairs", "0"], "--pairs '0' must be positive whole numbers"),
        (["--seconds", "-1"], "--seconds -1 must be more than 0"),
        (["--size", "70000"], "--size 70000 must be 1 to 65536 bytes"),
    ],
)
def test_benchmark_validates_options(argv: list[str], words: str) -> None:
    """benchmarks/derp_relay.py refuses bad options with one sentence, no traceback."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "derp_relay.py"), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2, r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr, r.stderr


async def test_new_derp_map_reconnects_the_home_region_to_its_new_first_node() -> None:
    """A DERP map whose home region changed (a relay joined or left the region) closes that connection and
    opens it again at once, as the home (told it is preferred), to the region's new first node."""
    servers = [DerpServer(MachinePrivate(bytes(nacl.public.PrivateKey.generate()))) for _ in range(2)]
    for s in servers:
        await s.start("127.0.0.1", 0)

    def relay(i: int) -> DerpNode:
        port = servers[i].addresses[0][1]
        return DerpNode(f"900{'ab'[i]}", 900, "127.0.0.1", ipv4="127.0.0.1", derp_port=port,
                        insecure_for_tests=True)  # fmt: skip

    conns = DerpConnections(node(), lambda *_: None)
    try:
        await conns.set_derp_map(DerpMap({900: DerpRegion(900, "t", "t", (relay(0),))}))
        await conns.set_home(900)
        await eventually(lambda: conns.connected(900))
        await conns.set_derp_map(DerpMap({900: DerpRegion(900, "t", "t", (relay(1), relay(0)))}))
        await eventually(lambda: conns.connected(900))
        (st,) = conns.status()
        assert st.home and st.url == relay(1).url()
        await eventually(lambda: servers[1].metrics.home_clients == 1)
    finally:
        await conns.close()
        for s in servers:
            await s.stop()
