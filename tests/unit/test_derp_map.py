"""The DERP map: its Tailscale-shaped JSON, the netmap carrying it, and `tailpy control serve`'s embedded
relay (a real ControlServer and DerpServer on 127.0.0.1, and the real CLI)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nacl.public
import pytest
from click.testing import CliRunner

from tailpy.cli.main import cli
from tailpy.control import ControlClient, ControlServer, Store
from tailpy.control.service import derp_advertised_host, embedded_derp_map
from tailpy.derp.client import DerpClient
from tailpy.derp.server import DerpServer, load_or_create_key
from tailpy.errors import ParseError
from tailpy.keys import MachinePrivate, NodePrivate
from tailpy.netmap import DerpMap, DerpNode, DerpRegion, MapDelta, NetMap, Node, apply_delta

STEP = 5.0

# As Tailscale writes it (tailcfg.DERPMap JSON; extra keys such as OmitDefaultRegions and Avoid ignored).
TAILSCALE_MAP = {
    "OmitDefaultRegions": True,
    "Regions": {
        "1": {
            "RegionID": 1,
            "RegionCode": "nyc",
            "RegionName": "New York City",
            "Avoid": False,
            "Nodes": [
                {
                    "Name": "1f",
                    "RegionID": 1,
                    "HostName": "derp1f.tailscale.com",
                    "IPv4": "199.38.181.104",
                    "IPv6": "2607:f740:f::bc",
                    "CanPort80": True,
                },
            ],
        },
        "900": {
            "RegionID": 900,
            "RegionCode": "lab",
            "RegionName": "Lab",
            "Nodes": [
                {
                    "Name": "900a",
                    "RegionID": 900,
                    "HostName": "127.0.0.1",
                    "IPv4": "127.0.0.1",
                    "STUNPort": -1,
                    "DERPPort": 3340,
                    "InsecureForTests": True,
                }
            ],
        },
    },
}


def mkey() -> MachinePrivate:
    return MachinePrivate(bytes(nacl.public.PrivateKey.generate()))


def test_parses_a_tailscale_map_and_builds_urls() -> None:
    m = DerpMap.from_json(TAILSCALE_MAP)
    assert sorted(m.regions) == [1, 900]
    nyc = m.regions[1].nodes[0]
    assert (m.regions[1].region_code, nyc.host_name, nyc.ipv6) == (
        "nyc",
        "derp1f.tailscale.com",
        "2607:f740:f::bc",
    )
    assert (nyc.derp_port, nyc.stun_port, nyc.insecure_for_tests) == (0, 0, False)  # Go zero values
    assert nyc.url() == "https://199.38.181.104:443/derp"
    lab = m.regions[900].nodes[0]
    assert (lab.stun_port, lab.derp_port, lab.url()) == (-1, 3340, "http://127.0.0.1:3340/derp")
    assert DerpNode("x", 2, "h.example", ipv6="2001:db8::1").url() == "https://[2001:db8::1]:443/derp"
    again = DerpMap.from_json(json.loads(json.dumps(m.to_json())))
    assert again == m
    assert m.to_json()["Regions"]["900"]["Nodes"][0] == TAILSCALE_MAP["Regions"]["900"]["Nodes"][0]  # type: ignore[index]


@pytest.mark.parametrize(
    "obj",
    [
        [],
        {},
        {"Regions": []},
        {"Regions": {"1": "x"}},
        {"Regions": {"1": {"RegionID": 2, "RegionCode": "a", "Nodes": []}}},
        {"Regions": {"1": {"RegionID": 1, "RegionCode": "a", "Nodes": [{"Name": "n", "RegionID": 1}]}}},
        {"Regions": {"1": {"RegionID": "1", "RegionCode": "a"}}},
        {
            "Regions": {
                "1": {
                    "RegionID": 1,
                    "RegionCode": "a",
                    "Nodes": [{"Name": "n", "RegionID": 2, "HostName": "h"}],
                }
            }
        },
        {
            "Regions": {
                "1": {
                    "RegionID": 1,
                    "RegionCode": "a",
                    "Nodes": [{"Name": "n", "RegionID": 1, "HostName": "h", "DERPPort": 70000}],
                }
            }
        },
    ],
)
def test_malformed_maps_raise_parse_error(obj: object) -> None:
    with pytest.raises(ParseError):
        DerpMap.from_json(obj)


def _node(i: int) -> Node:
    return Node(
        id=i,
        name=f"n{i}",
        hostname=f"n{i}",
        node_key=NodePrivate.generate().public,
        machine_key=mkey().public,
        addresses=(f"100.64.0.{i}/32",),
    )


def test_netmap_round_trip_old_json_and_deltas_keep_the_map() -> None:
    dm = embedded_derp_map("127.0.0.1", 3340, 900, "tailpy")
    nm = NetMap(_node(1), {2: _node(2)}, "tailnet.internal", dm)
    assert NetMap.from_json(json.loads(json.dumps(nm.to_json()))) == nm
    old = nm.to_json()
    del old["derp_map"]
    assert NetMap.from_json(old).derp_map is None
    assert "derp_map" not in NetMap(_node(1)).to_json()
    with pytest.raises(ParseError):
        NetMap.from_json({**nm.to_json(), "derp_map": {"Regions": 5}})
    after = apply_delta(nm, MapDelta(1, changed=(_node(3),), removed=(2,)))
    assert after.derp_map == dm and set(after.peers) == {3}
    assert nm.with_peers([]).derp_map == dm


def test_embedded_map_and_advertised_host() -> None:
    v6 = embedded_derp_map("::1", 3340, 901, "x").regions[901].nodes[0]
    assert (v6.ipv4, v6.ipv6, v6.url()) == ("", "::1", "http://[::1]:3340/derp")
    named = embedded_derp_map("control.lab", 3340, 900, "tailpy").regions[900]
    assert named.nodes[0] == DerpNode("900a", 900, "control.lab", "", "", -1, 3340, True)
    assert isinstance(named, DerpRegion) and named.region_code == "tailpy"
    assert derp_advertised_host("0.0.0.0", "0.0.0.0", "relay.lab") == "relay.lab"
    assert derp_advertised_host("0.0.0.0", "10.0.0.1", None) == "10.0.0.1"
    assert derp_advertised_host("10.0.0.2", "10.0.0.1", None) == "10.0.0.2"
    assert derp_advertised_host(None, "::", None) is None


async def test_netmap_carries_embedded_map_and_a_derp_client_logs_in(tmp_path: Path) -> None:
    relay = DerpServer(load_or_create_key(tmp_path))
    await relay.start("127.0.0.1", 0)
    store = Store(tmp_path)
    dm = embedded_derp_map("127.0.0.1", relay.addresses[0][1], 900, "tailpy")
    server = ControlServer(store, keepalive=0.5, poll_interval=0.2, derp_map=dm)
    host, port = await server.start("127.0.0.1", 0)
    a, b = ControlClient(f"http://{host}:{port}", mkey()), ControlClient(f"http://{host}:{port}", mkey())
    node_priv = NodePrivate.generate()
    try:
        key = store.create_auth_key(reusable=True, expires=None, now=time.time()).key
        na = await a.register(node_priv.public, "alpha", key)
        sa = a.stream_map(na.node_key, [], "alpha")
        nm = await asyncio.wait_for(sa.__anext__(), STEP)
        assert nm.derp_map == dm
        await b.register(NodePrivate.generate().public, "beta", key)  # a delta: the map stays
        nm = await asyncio.wait_for(sa.__anext__(), STEP)
        assert len(nm.peers) == 1 and nm.derp_map == dm
        assert server.netmap(na.id) is not None and server.netmap(na.id).derp_map == dm  # type: ignore[union-attr]
        url = nm.derp_map.regions[900].nodes[0].url()
        client = await DerpClient.connect(url, node_priv)
        try:
            for _ in range(100):
                if relay.connections(node_priv.public):
                    break
                await asyncio.sleep(0.02)
            assert relay.connections(node_priv.public)
        finally:
            await client.close()
        await sa.aclose()
    finally:
        await a.close()
        await b.close()
        await server.stop()
        await relay.stop()
        store.close()


# --- the CLI ---

SERVE = (sys.executable, "-m", "tailpy.cli.main", "control", "serve")


def _serve(state: Path, *args: str) -> tuple[subprocess.Popen[str], str, str]:
    """Start `tailpy control serve` on 127.0.0.1:0; returns it, its URL, its log to the DERP map line."""
    proc = subprocess.Popen(
        [*SERVE, "--state-dir", str(state), "--listen", "127.0.0.1:0", *args],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines = []
    while not (line := proc.stderr.readline()).__contains__("DERP map:") and line:
        lines.append(line)
    lines.append(line)
    m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", lines[0])
    assert m, lines
    return proc, m.group(1), "".join(lines)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


async def _first_netmap(state: Path, url: str) -> tuple[NetMap, NodePrivate]:
    store = Store(state)
    try:
        key = store.create_auth_key(reusable=False, expires=None, now=time.time()).key
    finally:
        store.close()
    c = ControlClient(url, mkey())
    priv = NodePrivate.generate()
    try:
        n = await c.register(priv.public, "alpha", key)
        s = c.stream_map(n.node_key, [], "alpha")
        try:
            return await asyncio.wait_for(s.__anext__(), STEP), priv
        finally:
            await s.aclose()
    finally:
        await c.close()


async def test_serve_runs_the_embedded_relay_by_default(tmp_path: Path) -> None:
    proc, url, log = _serve(tmp_path / "s", "--derp-listen", "127.0.0.1:0")
    try:
        assert "DERP map: 900" in log and "region 900 'tailpy' at http://127.0.0.1:" in log, log
        nm, priv = await _first_netmap(tmp_path / "s", url)
        assert nm.derp_map is not None and list(nm.derp_map.regions) == [900]
        client = await DerpClient.connect(nm.derp_map.regions[900].nodes[0].url(), priv)
        await client.close()
    finally:
        _stop(proc)


async def test_serve_no_derp_and_external_map(tmp_path: Path) -> None:
    proc, url, log = _serve(tmp_path / "s", "--no-derp")
    try:
        assert "DERP map: none" in log, log
        nm, _ = await _first_netmap(tmp_path / "s", url)
        assert nm.derp_map is None
    finally:
        _stop(proc)
    f = tmp_path / "derp.json"
    f.write_text(json.dumps(TAILSCALE_MAP))
    proc, url, log = _serve(tmp_path / "t", "--no-derp", "--derp-map", str(f))
    try:
        nm, _ = await _first_netmap(tmp_path / "t", url)
        assert nm.derp_map == DerpMap.from_json(TAILSCALE_MAP)
    finally:
        _stop(proc)


async def test_serve_keeps_serving_when_the_relay_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, url, log = _serve(tmp_path / "s", "--derp-listen", f"127.0.0.1:{port}")
        try:
            assert "embedded DERP relay cannot listen on 127.0.0.1:" in log and "DERP map: none" in log, log
            nm, _ = await _first_netmap(tmp_path / "s", url)
            assert nm.derp_map is None
        finally:
            _stop(proc)


def test_serve_wildcard_without_hostname_refuses_to_start(tmp_path: Path) -> None:
    """A wildcard --listen gives nodes no host to dial for the embedded relay: one sentence, no server."""
    r = subprocess.run(
        [*SERVE, "--state-dir", str(tmp_path), "--listen", ":0", "--derp-listen", ":0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("tailpy: --listen :0 is every address") and r.stderr.count("\n") == 1, r.stderr
    assert "--server-url" in r.stderr and "--derp-hostname" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("content", "sentence"),
    [
        ("{not json", "is not valid JSON"),
        ('{"Regions": []}', "is not a DERP map"),
        (
            '{"Regions": {"900": {"RegionID": 900, "RegionCode": "x"}}}',
            "has region 900, the embedded relay's",
        ),
        (b"\xff\xfe", "is not a JSON text file"),
        (None, "cannot read --derp-map"),
    ],
)
def test_malformed_derp_map_is_one_sentence(
    tmp_path: Path, content: str | bytes | None, sentence: str
) -> None:
    f = tmp_path / "derp.json"
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content)
    r = CliRunner().invoke(
        cli,
        [
            "control",
            "serve",
            "--state-dir",
            str(tmp_path / "s"),
            "--listen",
            "127.0.0.1:0",
            "--derp-map",
            str(f),
        ],
    )
    assert r.exit_code == 1, r.output
    assert r.output.startswith("tailpy: ") and sentence in r.output, r.output
    assert "Traceback" not in r.output and r.output.count("\n") == 1
