"""tailpyd's health warnings (tailpy.daemon.health): each warning's trigger and clearing, logging once per
change, the JSON shape, the TLS reason of a relay whose certificate is not trusted, and clock skew from
control's Date header."""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import logging
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tailpy.control.client import ControlClient
from tailpy.daemon import health as hl
from tailpy.daemon import netconf
from tailpy.derp.client import DerpClient, DerpClientError
from tailpy.ipnstate import HealthWarning
from tailpy.keys import MachinePrivate, NodePrivate

T0 = 1_700_000_000.0


def names(t: hl.Tracker) -> list[str]:
    return [w.name for w in t.warnings()]


def run(t: hl.Tracker, **kw: Any) -> list[str]:
    watch = kw.pop("watch", None) or hl.HandshakeWatch()
    hl.evaluate(t, watch, hl.Inputs(**kw))
    return names(t)


def test_tracker_logs_once_per_change(caplog: pytest.LogCaptureFixture) -> None:
    now = [T0]
    t = hl.Tracker(clock=lambda: now[0])
    caplog.set_level(logging.INFO, "tailpy.daemon")
    for _ in range(3):
        t.set_unhealthy(hl.NO_DERP_MAP)
    now[0] += 5
    t.set_unhealthy(hl.MTU, {"text": "too big"})
    t.set_unhealthy(hl.MTU, {"text": "still too big"})  # new text: shown at once, logged at most each minute
    t.set_unhealthy(hl.MTU, {"text": "too big"})
    now[0] += hl.RELOG_AFTER
    t.set_unhealthy(hl.MTU, {"text": "still too big"})
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert sum("no-derp-map" in m for m in logged) == 1
    assert sum("health: mtu" in m for m in logged) == 2
    (mtu,) = [w for w in t.warnings() if w.name == "mtu"]
    assert mtu.since == T0 + 5 and mtu.text == "still too big"
    t.set_healthy(hl.NO_DERP_MAP)
    t.set_healthy(hl.NO_DERP_MAP)
    assert sum("no-derp-map: ok again" in r.getMessage() for r in caplog.records) == 1
    assert names(t) == ["mtu"]


def test_warning_json_shape() -> None:
    t = hl.Tracker(clock=lambda: T0)
    t.set_unhealthy(hl.NO_DERP_MAP)
    t.set_unhealthy(hl.HOME_DERP_UNREACHABLE, {"region": "900", "error": "refused", "todo": hl.DERP_TODO})
    doc = [w.to_json() for w in t.warnings()]
    assert [d["name"] for d in doc] == ["home-derp-unreachable", "no-derp-map"]  # most severe first
    assert doc[0]["severity"] == "high" and doc[0]["since"] == T0 and "refused" in doc[0]["text"]
    assert set(doc[1]) == {"name", "severity", "text", "since"}
    assert [HealthWarning.from_json(d) for d in doc] == list(t.warnings())


def test_control_unreachable_after_grace_and_clears() -> None:
    t = hl.Tracker()
    base = {"following": True, "login_server": "http://192.0.2.1:8080"}
    assert run(t, now=T0 + 2, control_down_since=T0, **base) == []  # a reconnect takes a second
    got = run(t, now=T0 + 30, control_down_since=T0, control_error="connection refused", **base)
    assert got == ["control-unreachable"]
    text = t.warnings()[0].text
    assert "http://192.0.2.1:8080" in text and "connection refused" in text and hl.clock(T0) in text
    assert run(t, now=T0 + 40, control_down_since=None, **base) == []
    # a node that was told to go down does not warn
    assert run(t, now=T0 + 30, control_down_since=T0, following=False) == []


def test_no_derp_map() -> None:
    t = hl.Tracker()
    assert run(t, now=T0, following=True, netmap_since=None) == []  # no netmap yet
    assert run(t, now=T0, following=True, netmap_since=T0, derp_regions=0) == ["no-derp-map"]
    assert run(t, now=T0, following=True, netmap_since=T0, derp_regions=1) == []


def test_home_derp_unreachable_with_tls_reason_and_clears() -> None:
    t = hl.Tracker()
    error = (
        "could not connect to DERP server https://derp.example:443/derp: its TLS certificate is not trusted "
        "(self-signed certificate)"
    )
    base = {"now": T0, "following": True, "netmap_since": T0, "derp_regions": 1}
    assert run(t, home=hl.HomeDerp(900, "lab", connected=False, error=error), **base) == [
        "home-derp-unreachable"
    ]
    text = t.warnings()[0].text
    assert "900 (lab)" in text and "not trusted" in text and "SSL_CERT_FILE" in text
    assert "update-ca-certificates" in text
    assert run(t, home=hl.HomeDerp(900, "lab", connected=True), **base) == []
    other = hl.HomeDerp(900, "lab", connected=False, error="connection refused")
    run(t, home=other, **base)
    assert "SSL_CERT_FILE" not in t.warnings()[0].text and "connection refused" in t.warnings()[0].text


def test_no_home_region_after_grace_names_the_probe_error() -> None:
    t = hl.Tracker()
    home = hl.HomeDerp(0, error="DERP node https://d/derp: its TLS certificate is not trusted (x)")
    base = {"following": True, "netmap_since": T0, "derp_regions": 1, "home": home}
    assert run(t, now=T0 + 1, **base) == []
    assert run(t, now=T0 + 20, **base) == ["home-derp-unreachable"]
    assert "SSL_CERT_FILE" in t.warnings()[0].text


def test_handshake_failing_per_peer_and_clearing() -> None:
    t, w = hl.Tracker(), hl.HandshakeWatch()
    key_b, key_c = b"b" * 32, b"c" * 32

    def look(now: float, b_sent: int, b_hs: float | None, c_sent: int = 0) -> list[str]:
        peers = [hl.PeerHandshakes("b", key_b, b_sent, b_hs), hl.PeerHandshakes("c", key_c, c_sent, T0)]
        return run(t, watch=w, now=now, peers=peers)

    assert look(T0, 0, None) == []
    for i in range(1, 4):  # an initiation every 5 s (REKEY_TIMEOUT), none answered
        assert look(T0 + 5 * i, i, None) == []
    assert look(T0 + 20, 4, None) == ["handshake-failing"]
    text = t.warnings()[0].text
    assert "peer b" in text and "tailpy ping b" in text
    assert look(T0 + 25, 5, T0 + 24) == []  # a handshake completed
    # a normal rekey (one initiation, answered at the next look) never warns
    assert look(T0 + 150, 6, T0 + 24) == [] and look(T0 + 152, 6, T0 + 151) == []
    # failing again, then the traffic stops: the warning clears once initiations stop for a minute
    for i in range(1, 6):
        look(T0 + 200 + 5 * i, 6 + i, T0 + 151)
    assert names(t) == ["handshake-failing"]
    assert look(T0 + 300, 11, T0 + 151) == []
    # a peer that left the netmap takes its warning with it
    for i in range(1, 6):
        look(T0 + 400 + 5 * i, 11 + i, T0 + 151)
    assert names(t) == ["handshake-failing"]
    run(t, watch=w, now=T0 + 430, peers=[hl.PeerHandshakes("c", key_c, 0, T0)])
    assert names(t) == []


def test_dns_not_applied_and_mtu() -> None:
    t = hl.Tracker()
    assert run(t, now=T0, dns_error="/etc/resolv.conf: read-only file system") == ["dns-not-applied"]
    assert "read-only" in t.warnings()[0].text
    assert run(t, now=T0) == []
    assert netconf.mtu_warnings(1280, ("eth0", 1500)) == []
    (too_big,) = netconf.mtu_warnings(1500, ("eth0", 1500))
    assert "eth0" in too_big and "--mtu 1420" in too_big
    assert run(t, now=T0, mtu=[too_big]) == ["mtu"]
    assert run(t, now=T0, mtu=[]) == []


def test_clock_skew() -> None:
    t = hl.Tracker()
    assert run(t, now=T0, following=True, clock_skew=12.0) == []
    assert run(t, now=T0, following=True, clock_skew=-300.0) == ["clock-skew"]
    assert "300 s ahead of control" in t.warnings()[0].text
    assert run(t, now=T0, following=True, clock_skew=None) == []
    assert hl.clock_skew_text(90.0) == "90 s behind"


async def test_control_client_measures_skew_from_date_header() -> None:
    """A control server whose clock is 5 minutes ahead: the client's clock_skew says so at /key."""
    ahead = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=300)

    async def key(_req: web.Request) -> web.Response:
        date = email.utils.format_datetime(ahead, usegmt=True)
        return web.Response(text="mkey:" + "00" * 32, headers={"Date": date})

    app = web.Application()
    app.router.add_get("/key", key)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    seen: list[float] = []
    client = ControlClient(f"http://127.0.0.1:{port}", MachinePrivate.generate())
    client.on_clock_skew = seen.append
    try:
        await client.server_key()
    finally:
        await client.close()
        await runner.cleanup()
    assert client.clock_skew is not None and 295 < client.clock_skew < 305 and seen
    assert hl.clock_skew_text(client.clock_skew) is not None


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_derp_client_says_certificate_not_trusted(tmp_path: Path) -> None:
    """A TLS relay whose certificate the node does not trust: the client's error says so in words the
    health warning matches (and so names the remedy)."""
    try:
        cert, key = _self_signed(tmp_path)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"openssl cannot make a certificate: {e}")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def handle(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(DerpClientError) as got:
            await DerpClient.connect(f"https://localhost:{port}/derp", NodePrivate.generate(), timeout=5)
    finally:
        server.close()
        await server.wait_closed()
    assert "TLS certificate is not trusted" in str(got.value)
    assert hl.derp_todo(str(got.value)) == hl.DERP_TLS_TODO


def test_dns_os_error_and_reapply_after_stop(tmp_path: Path) -> None:
    """MagicDNS's resolver configuration: os_error is "" once applied, says why when it cannot be, and
    after stop() (the resolver put back) the next apply points it at MagicDNS again."""
    from tailpy.dns.manager import DNSManager
    from tailpy.keys import MachinePublic, NodePublic
    from tailpy.netmap import NetMap, Node

    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")
    m = DNSManager(tmp_path / "state", listen=[], add_addresses=False, resolv_conf=resolv)
    (tmp_path / "state").mkdir()
    me = Node(1, "a", "a", NodePublic(b"\x01" * 32), MachinePublic(b"\x02" * 32), ("100.64.0.1/32",))
    netmap = NetMap(me, {}, "tail.example")
    m.apply(netmap, accept_dns=True)
    assert m.os_error == "" and "100.100.100.100" in resolv.read_text()
    m.stop()
    assert "192.0.2.53" in resolv.read_text() and "100.100.100.100" not in resolv.read_text()
    m.apply(netmap, accept_dns=True)
    assert m.os_error == "" and "100.100.100.100" in resolv.read_text()
    m.apply(netmap, accept_dns=False)
    assert m.os_error == ""  # not wanted: nothing to warn about
    m.stop()


async def test_dns_os_error_keeps_its_reason_once_magicdns_listens(tmp_path: Path) -> None:
    """The reason the resolver could not be changed survives MagicDNS's listener starting (which has no
    error of its own): the warning names the file and why, not only that nothing changed."""
    from tailpy.dns.manager import DNSManager
    from tailpy.keys import MachinePublic, NodePublic
    from tailpy.netmap import NetMap, Node

    (tmp_path / "etc").write_text("")  # a file where a directory should be: resolv.conf cannot be read
    resolv = tmp_path / "etc" / "resolv.conf"
    (tmp_path / "state").mkdir()
    m = DNSManager(tmp_path / "state", listen=[("127.0.0.1", 0)], add_addresses=False, resolv_conf=resolv)
    me = Node(1, "a", "a", NodePublic(b"\x01" * 32), MachinePublic(b"\x02" * 32), ("100.64.0.1/32",))
    try:
        m.apply(NetMap(me, {}, "tail.example"), accept_dns=True)
        starting = m._starting
        assert starting is not None
        await starting
        assert m.server is not None and m.server.addresses
        assert str(resolv) in m.os_error and "resolver configuration was not changed" not in m.os_error
        assert str(resolv) in m.status()["error"]
    finally:
        m.stop()
