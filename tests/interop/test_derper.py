"""tailpy's DERP client against Tailscale's ``derper``, and Tailscale's ``derpprobe`` against DERP servers.

derper and derpprobe are built once per machine with ``go install`` at a pinned version (see
``_tailscale_go.py``); every test here skips, saying why, where Go or the build is missing. derper listens on
127.0.0.1 only and is killed by pid at the end, pass or fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tailpy.derp.client import DerpClient, DerpClientError, Message, ReconnectingDerpClient
from tailpy.keys import NodePrivate
from tailpy.lab import Lab, wait_for
from tailpy.lab.tailnet import LabTailnet
from tailpy.proto.derp import PeerGone, PeerGoneReason, RecvPacket

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tailscale_go import (
    Derper,
    GoTools,
    build_tailscale_tools,
    free_tcp_port,
    stop_process,
    wait_tcp,
)

pytestmark = pytest.mark.interop

DISCO_MAGIC = "TS💬".encode()

_HTTP_PROBE = (
    "import sys, urllib.request\n"
    "try:\n    urllib.request.urlopen(sys.argv[1], timeout=1).read()\nexcept Exception:\n    sys.exit(1)\n"
)


@pytest.fixture(scope="module")
def go_tools() -> GoTools:
    tools = build_tailscale_tools()
    if isinstance(tools, str):
        pytest.skip(tools)
    if tools.build_seconds:
        print(f"built derper and derpprobe {tools.version} in {tools.build_seconds:.1f} s")
    return tools


@pytest.fixture(scope="module")
def derper(go_tools: GoTools, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Derper]:
    d = Derper(go_tools.derper, tmp_path_factory.mktemp("derper"))
    try:
        d.start()
        yield d
    finally:
        d.stop()


async def _recv_packet(client: DerpClient, timeout: float = 5.0) -> RecvPacket:
    async def first() -> RecvPacket:
        async for msg in client:
            if isinstance(msg, RecvPacket):
                return msg
        raise AssertionError("connection closed before a packet arrived")

    return await asyncio.wait_for(first(), timeout)


async def _recv_matching(client: DerpClient, kind: type[Message], timeout: float = 5.0) -> Message:
    async def first() -> Message:
        async for msg in client:
            if isinstance(msg, kind):
                return msg
        raise AssertionError(f"connection closed before a {kind.__name__} arrived")

    return await asyncio.wait_for(first(), timeout)


def _disco_like(payload: bytes = b"x" * 16) -> bytes:
    # derper answers "not here" only for disco-looking packets (derpserver requestPeerGoneWriteLimited).
    return DISCO_MAGIC + os.urandom(32) + os.urandom(24) + payload


async def test_login_reports_server_key_and_version(derper: Derper) -> None:
    key = NodePrivate.generate()
    async with await DerpClient.connect(derper.url, key) as client:
        assert client.server_info.version == 2
        assert client.server_key.raw != key.public.raw
        assert len(client.server_key.raw) == 32 and client.public_key == key.public


async def test_packets_both_ways(derper: Derper) -> None:
    ka, kb = NodePrivate.generate(), NodePrivate.generate()
    async with await DerpClient.connect(derper.url, ka) as a, await DerpClient.connect(derper.url, kb) as b:
        await a.note_preferred(True)
        await a.send(kb.public, b"hello from a")
        got = await _recv_packet(b)
        assert got.src == ka.public and got.data == b"hello from a"

        big = os.urandom(64 << 10)  # the largest payload DERP carries
        await b.send(ka.public, big)
        got = await _recv_packet(a)
        assert got.src == kb.public and got.data == big

        # derper queues at most 32 frames per receiver and drops the oldest when full: a burst may lose some
        # early packets, but what arrives keeps its order and the newest always arrives.
        for i in range(50):
            await a.send(kb.public, i.to_bytes(2, "big"))
        seen: list[int] = []
        while not seen or seen[-1] != 49:
            seen.append(int.from_bytes((await _recv_packet(b)).data, "big"))
        assert seen == sorted(set(seen)) and len(seen) >= 32


async def test_oversized_payload_refused_locally(derper: Derper) -> None:
    async with await DerpClient.connect(derper.url, NodePrivate.generate()) as a:
        with pytest.raises(ValueError):
            await a.send(NodePrivate.generate().public, bytes((64 << 10) + 1))


async def test_peer_gone_not_here_for_unknown_key(derper: Derper) -> None:
    unknown = NodePrivate.generate().public
    async with await DerpClient.connect(derper.url, NodePrivate.generate()) as a:
        await a.send(unknown, _disco_like())
        msg = await _recv_matching(a, PeerGone)
        assert isinstance(msg, PeerGone)
        assert msg.key == unknown and msg.reason == PeerGoneReason.NOT_HERE


async def test_peer_gone_when_sender_disconnects(derper: Derper) -> None:
    ka, kb = NodePrivate.generate(), NodePrivate.generate()
    async with await DerpClient.connect(derper.url, kb) as b:
        a = await DerpClient.connect(derper.url, ka)
        await a.send(kb.public, b"remember me")
        assert (await _recv_packet(b)).src == ka.public
        await a.close()
        msg = await _recv_matching(b, PeerGone)
        assert isinstance(msg, PeerGone)
        assert msg.key == ka.public and msg.reason == PeerGoneReason.DISCONNECTED


async def test_ping_pong(derper: Derper) -> None:
    async with await DerpClient.connect(derper.url, NodePrivate.generate()) as a:
        rtts = [await a.ping(timeout=5.0) for _ in range(3)]
        assert all(0 <= rtt < 5.0 for rtt in rtts)


async def test_refused_upgrade_and_closed_port_are_one_sentence(derper: Derper) -> None:
    bad_path = derper.url.replace("/derp", "/not-derp")
    with pytest.raises(DerpClientError, match="refused the upgrade"):
        await DerpClient.connect(bad_path, NodePrivate.generate(), timeout=5.0)
    with pytest.raises(DerpClientError, match="could not connect"):
        await DerpClient.connect(
            f"http://127.0.0.1:{free_tcp_port()}/derp", NodePrivate.generate(), timeout=5.0
        )


async def test_reconnecting_client_returns_after_derper_restart(go_tools: GoTools, tmp_path: Path) -> None:
    relay = Derper(go_tools.derper, tmp_path / "d")
    try:
        relay.start()
        ka, kb = NodePrivate.generate(), NodePrivate.generate()
        rc = ReconnectingDerpClient(relay.url, ka, base=0.1, cap=1.0)
        rc.start()
        try:
            await rc.wait_connected(10.0)
            relay.stop()
            relay.start()  # same port, same key file
            await asyncio.sleep(0.2)
            b = await DerpClient.connect(relay.url, kb)
            async with b:
                deadline = asyncio.get_running_loop().time() + 15.0
                while rc.connects < 2:
                    assert asyncio.get_running_loop().time() < deadline, f"no reconnect: {rc.last_error}"
                    await asyncio.sleep(0.1)
                await rc.send(kb.public, b"after restart", timeout=10.0)
                got = await _recv_packet(b)
                assert got.src == ka.public and got.data == b"after restart"
        finally:
            await rc.close()
    finally:
        relay.stop()


# ---- derpprobe ----


def _derp_map(host: str, port: int) -> dict[str, object]:
    return {
        "Regions": {
            "900": {
                "RegionID": 900,
                "RegionCode": "test",
                "RegionName": "Loopback test",
                "Nodes": [
                    {
                        "Name": "900a",
                        "RegionID": 900,
                        "HostName": host,
                        "IPv4": "127.0.0.1",
                        "IPv6": "none",
                        "DERPPort": port,
                        "STUNPort": -1,
                        "InsecureForTests": True,
                    }
                ],
            }
        }
    }


def _run_derpprobe(tools: GoTools, workdir: Path, port: int) -> subprocess.CompletedProcess[str]:
    """derpprobe -once over a one-node DERP map (TLS at localhost:port, self-signed accepted).

    derpprobe's mesh probe needs TLS: prober/derp.go newConn checks the TLS state and that the server
    name equals the node's HostName, so the node is "localhost" dialled at 127.0.0.1."""
    map_path = workdir / "derpmap.json"
    map_path.write_text(json.dumps(_derp_map("localhost", port)))
    return subprocess.run(
        [
            str(tools.derpprobe),
            "-once",
            f"-derp-map=file://{map_path}",
            "-spread=false",
            "-tls-interval=0",
            "-stun-interval=0",
            "-mesh-interval=1s",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=workdir,
    )


def _self_signed_localhost(directory: Path) -> tuple[Path, Path] | str:
    crt, key = directory / "localhost.crt", directory / "localhost.key"
    try:
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                "-keyout", str(key), "-out", str(crt),
            ],
            capture_output=True,
            check=True,
            timeout=30,
        )  # fmt: skip
    except FileNotFoundError:
        return "no openssl to make a self-signed certificate for the TLS that derpprobe needs"
    except subprocess.CalledProcessError as exc:
        return f"openssl could not make a certificate: {exc.stderr.decode(errors='replace').strip()[-200:]}"
    return crt, key


def test_derpprobe_against_derper(go_tools: GoTools, tmp_path: Path) -> None:
    """The derpprobe harness itself, against derper with manual certs: the run that checks tailpy's server."""
    made = _self_signed_localhost(tmp_path)
    if isinstance(made, str):
        pytest.skip(made)
    port = free_tcp_port()
    log_path = tmp_path / "derper-tls.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                str(go_tools.derper),
                "-a", f"127.0.0.1:{port}", "-http-port=-1", "-stun=false", "-home=blank",
                "-certmode=manual", f"-certdir={tmp_path}", "-hostname=localhost",
                "-c", str(tmp_path / "derper.key"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )  # fmt: skip
    try:
        wait_tcp(port, proc, 20.0)
        result = _run_derpprobe(go_tools, tmp_path, port)
        assert result.returncode == 0, result.stderr[-2000:]
        assert re.search(r"good: derp/test/900a/900a/mesh", result.stderr), result.stderr[-2000:]
    finally:
        stop_process(proc)


def test_derpprobe_against_tailpy_derp_serve(go_tools: GoTools, tmp_path: Path) -> None:
    made = _self_signed_localhost(tmp_path)
    if isinstance(made, str):
        pytest.skip(made)
    crt, key = made
    port = free_tcp_port()
    log_path = tmp_path / "tailpy-derp.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "tailpy.cli.main", "derp", "serve",
                "--state-dir", str(tmp_path / "state"), "--listen", f"127.0.0.1:{port}",
                "--certfile", str(crt), "--keyfile", str(key),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )  # fmt: skip
    try:
        try:
            wait_tcp(port, proc, 30.0)
        except RuntimeError as exc:
            pytest.fail(f"{exc}; log: {log_path.read_text(errors='replace')[-1500:]}")
        result = _run_derpprobe(go_tools, tmp_path, port)
        assert result.returncode == 0, result.stderr[-2000:]
        assert re.search(r"good: derp/test/900a/900a/mesh", result.stderr), result.stderr[-2000:]
    finally:
        stop_process(proc)


# ---- two tailpy nodes relaying through derper ----

DERPER_PORT = 3341


@pytest.mark.lab
def test_two_tailpy_nodes_relay_through_derper(go_tools: GoTools, lab: Lab) -> None:
    """Control with --no-derp and a --derp-map naming derper (plain HTTP, in the control host's namespace);
    two nodes with UDP between them dropped ping both ways through derper, and status says relay "derper"."""
    if shutil.which("nft") is None:
        pytest.skip("nft (Debian package nftables) is not installed")
    net = LabTailnet(lab)
    host_ip = net.lan.ip(net.control_host)
    workdir = net.root / "derper"
    workdir.mkdir()
    log = open(workdir / "derper.log", "wb")  # noqa: SIM115 - the child owns it
    derper = net.control_host.popen(
        [
            str(go_tools.derper),
            "-a", f"0.0.0.0:{DERPER_PORT}", "-http-port=-1", "-stun=false", "-home=blank",
            "-c", str(workdir / "derper.key"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    probe = [sys.executable, "-c", _HTTP_PROBE, f"http://{host_ip}:{DERPER_PORT}/generate_204"]
    wait_for(
        lambda: derper.poll() is None and net.control_host.run(probe, check=False).returncode == 0,
        timeout=30,
        what="derper to answer",
        interval=0.2,
    )
    dm = _derp_map(host_ip, DERPER_PORT)
    region = dm["Regions"]["900"]  # type: ignore[index]
    region["RegionID"], region["RegionCode"] = 901, "derper"
    region["Nodes"][0].update({"Name": "901a", "RegionID": 901, "IPv4": host_ip, "IPv6": ""})
    map_file = workdir / "derpmap.json"
    map_file.write_text(json.dumps({"Regions": {"901": region}}))
    net.start_control("--no-derp", "--derp-map", str(map_file), "--derp-hostname", host_ip)
    a, b = net.connected("a", "b")
    with lab.block_udp(a.host, b.host):
        for node in (a, b):
            wait_for(
                lambda node=node: node.status()["self"]["home_derp"] == 901,  # type: ignore[misc]
                timeout=60,
                what=f"{node.name} to make derper's region its home",
                interval=0.5,
            )

        def pings() -> bool:
            return a.host.run(["ping", "-c", "1", "-W", "2", b.ip()], check=False, timeout=30).returncode == 0

        wait_for(pings, timeout=90, what="a to ping b through derper", interval=0.5)
        a.ping(b.ip(), count=3)
        b.ping(a.ip(), count=3)
        for node, other in ((a, b), (b, a)):
            st = node.status()
            p = next(p for p in st["peers"] if p["name"] == other.name)
            assert p["path"] == "relay" and p["relay_region_code"] == "derper", p
            row = next(line for line in node.cli("status").splitlines() if f" {other.name} " in line)
            assert 'relay "derper"' in row, row
    assert derper.poll() is None, (workdir / "derper.log").read_text(errors="replace")[-1500:]
