"""`tailpy derp serve`'s STUN server in a lab namespace, answering a third-party client (Debian's
stun-client), tailpy's own client over IPv4 and IPv6, and garbage (counted; the server keeps serving); and
`tailpy netcheck` in the lab against two STUN ports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tailpy.lab import Host, Lab, wait_for

pytestmark = pytest.mark.lab

SERVER_V4, CLIENT_V4 = "192.0.2.1", "192.0.2.2"
SERVER_V6, CLIENT_V6 = "2001:db8:5::1", "2001:db8:5::2"

# From one UDP socket: 50 datagrams that are not STUN, 10 STUN requests with a wrong FINGERPRINT, then a
# good Binding request (retransmitted until answered); prints the mapped address of the answer.
_GARBAGE_THEN_REQUEST = """
import socket, sys
from tailpy.proto import stun
dst = (sys.argv[1], int(sys.argv[2]))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for n in range(50):
    s.sendto(bytes([0xFF]) * (n + 1), dst)
bad = bytes.fromhex("000100082112a442b7e7a701bc34d686fa87dfae80280004fdf6ae03")
for _ in range(10):
    s.sendto(bad, dst)
txid, req = stun.binding_request()
s.settimeout(0.5)
for _ in range(20):
    s.sendto(req, dst)
    try:
        data, _ = s.recvfrom(2048)
    except socket.timeout:
        continue
    m = stun.parse(data)
    if m.txid == txid:
        print("%s:%d" % m.mapped_address)
        break
"""

# In a lab host: a real data plane (Device: TUN + its one UDP socket) sends STUN through send_datagram and
# gets the answers back through drain(), as tailpyd does; prints the device's port and the netcheck report.
_THROUGH_DEVICE = """
import asyncio, json, sys
from tailpy import _native
from tailpy.endpoint import Endpoint
from tailpy.magicsock import netcheck
from tailpy.magicsock.stun import StunRunner
from tailpy.proto import stun

async def main():
    dev = _native.Device(_native.generate_private_key(), tun_name="tpystun0")
    runner = StunRunner(lambda datagram, to: dev.send_datagram(datagram, str(to)))
    def readable():
        datagrams, _relay = dev.drain()
        for payload, source in datagrams:
            if stun.is_stun(payload):
                runner.feed(payload, Endpoint.parse(source))
    asyncio.get_running_loop().add_reader(dev.fileno(), readable)
    targets = netcheck.stun_targets(None, sys.argv[1:])
    report = await netcheck.run(runner, targets, netcheck.Netcheck(), timeout=5.0)
    print(json.dumps({"port": dev.listen_port, "report": report.to_json()}))
    dev.close()

asyncio.run(main())
"""

_METRICS = """
import urllib.request, sys
print(urllib.request.urlopen("http://127.0.0.1:%s/debug/metrics" % sys.argv[1], timeout=10).read().decode())
"""


def _lan(lab: Lab) -> tuple[Host, Host]:
    srv, cli = lab.host("stunsrv"), lab.host("stuncli")
    lab.lan("lan", [srv, cli], subnet="192.0.2.0/24", subnet6="2001:db8:5::/64")
    return srv, cli


def _derp_serve(host: Host, state: Path, http_port: int, stun_port: int) -> subprocess.Popen[str]:
    """`tailpy derp serve` on every address of ``host``; returns once its STUN server listens (its log,
    ``<state>.log``, says so)."""
    log = state.with_suffix(".log")
    with log.open("w") as f:
        proc = host.python(
            "tailpy.cli.main",
            "derp",
            "serve",
            "--state-dir",
            str(state),
            "--listen",
            f"0.0.0.0:{http_port}",
            "--stun-port",
            str(stun_port),
            stderr=f,
        )

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"tailpy derp serve exited: {log.read_text()}")
        return f"STUN server listening on udp [::]:{stun_port}" in log.read_text()

    wait_for(listening, timeout=60, what="tailpy derp serve's STUN server")
    return proc


def _tailpy(host: Host, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return host.run([sys.executable, "-m", "tailpy.cli.main", *args], timeout=timeout)


def _metrics(host: Host, http_port: int) -> dict[str, int]:
    text = host.run([sys.executable, "-c", _METRICS, str(http_port)]).stdout
    out = {}
    for line in text.splitlines():
        if line.startswith("stun_"):
            name, value = line.rsplit(" ", 1)
            out[name] = int(value)
    return out


def test_stun_client_package_gets_its_mapped_address(lab: Lab, tmp_path: Path) -> None:
    """Debian's stun-client (an RFC 3489 client: no magic cookie, CHANGE-REQUEST probes) against tailpy's
    STUN server: its Binding requests get MAPPED-ADDRESS answers, and it finds the open (no NAT) path."""
    if shutil.which("stun") is None:
        pytest.skip("Debian's stun-client (`stun`) is not installed: `make deps` installs it")
    srv, cli = _lan(lab)
    _derp_serve(srv, tmp_path / "derp", 8443, 3478)
    done = cli.run(["stun", SERVER_V4, "-v"], check=False, timeout=60)
    out = done.stdout + done.stderr
    assert f"MappedAddress = {CLIENT_V4}:" in out, out
    assert "Primary: Open" in out, out
    m = _metrics(srv, 8443)
    assert m['stun_requests_total{disposition="success"}'] >= 1
    # its "change IP and port" / "change port" probes get 420: this server has no second address
    assert m['stun_requests_total{disposition="unknown_attribute"}'] >= 1


def test_tailpy_client_ipv4_ipv6_and_garbage(lab: Lab, tmp_path: Path) -> None:
    srv, cli = _lan(lab)
    _derp_serve(srv, tmp_path / "derp", 8443, 3478)
    no_daemon = ("--socket", str(tmp_path / "no-tailpyd.sock"))  # only the --stun servers, no netmap's
    done = _tailpy(
        cli, "netcheck", "--json", *no_daemon, "--stun", f"{SERVER_V4}:3478", "--stun", f"[{SERVER_V6}]:3478"
    )
    report = json.loads(done.stdout)
    assert report["udp"] and report["ipv4"] and report["ipv6"]
    assert report["global_v4"].startswith(f"{CLIENT_V4}:")
    assert report["global_v6"].startswith(f"[{CLIENT_V6}]:")

    before = _metrics(srv, 8443)
    mapped = cli.run([sys.executable, "-c", _GARBAGE_THEN_REQUEST, SERVER_V4, "3478"]).stdout.strip()
    assert mapped.startswith(f"{CLIENT_V4}:")
    after = _metrics(srv, 8443)

    def delta(name: str) -> int:
        return after[name] - before.get(name, 0)

    assert delta('stun_requests_total{disposition="not_stun"}') == 50
    assert delta('stun_requests_total{disposition="bad_fingerprint"}') == 10
    assert delta('stun_requests_total{disposition="success"}') >= 1
    assert after['stun_requests_by_family_total{family="ipv6"}'] >= 1
    # and it still serves
    again = json.loads(_tailpy(cli, "netcheck", "--json", *no_daemon, "--stun", f"{SERVER_V4}:3478").stdout)
    assert again["global_v4"].startswith(f"{CLIENT_V4}:")


def test_netcheck_against_two_stun_ports(lab: Lab, tmp_path: Path) -> None:
    srv, cli = _lan(lab)
    _derp_serve(srv, tmp_path / "one", 8443, 3478)
    _derp_serve(srv, tmp_path / "two", 8444, 3479)

    def region(rid: int, code: str, stun_port: int, derp_port: int) -> dict[str, object]:
        node = {
            "Name": f"{rid}a",
            "RegionID": rid,
            "HostName": SERVER_V4,
            "IPv4": SERVER_V4,
            "STUNPort": stun_port,
            "DERPPort": derp_port,
            "InsecureForTests": True,
        }
        return {"RegionID": rid, "RegionCode": code, "RegionName": f"Lab {code}", "Nodes": [node]}

    derp_map = {
        "Regions": {
            "1": region(1, "one", 3478, 8443),
            "2": region(2, "two", 3479, 8444),
            "3": region(3, "dead", 3480, 8445),  # nobody there
        }
    }
    map_file = tmp_path / "derpmap.json"
    map_file.write_text(json.dumps(derp_map))

    report = json.loads(
        _tailpy(cli, "netcheck", "--json", "--derp-map", str(map_file), "--timeout", "2").stdout
    )
    assert report["udp"] and report["global_v4"].startswith(f"{CLIENT_V4}:")
    assert report["mapping_varies_by_dest_ip"] is False and report["mapping_varies_fresh"]
    assert set(report["region_latency"]) == {"1", "2"}
    assert all(0 < v < 2 for v in report["region_latency"].values())
    assert report["preferred_derp"] in (1, 2)
    assert report["hairpinning"] is True  # no NAT in this lab: our own address reaches us
    dead = [p for p in report["probes"] if p["region_id"] == 3]
    assert dead and dead[0]["mapped"] is None and dead[0]["error"] == "timeout"

    text = _tailpy(cli, "netcheck", "--derp-map", str(map_file), "--timeout", "2").stdout
    assert "\t* UDP: true" in text
    assert f"\t* IPv4: yes, {CLIENT_V4}:" in text
    assert "\t* MappingVariesByDestIP: false" in text
    assert "\t* Nearest DERP: Lab " in text
    assert "- one: " in text and "- two: " in text and "- dead:" in text


@pytest.mark.parametrize(
    ("nat", "hairpin", "varies"),
    [("eim", False, False), ("eim", True, False), ("edm", False, True)],
    ids=["eim", "eim-hairpin", "edm"],
)
def test_netcheck_behind_nat(lab: Lab, tmp_path: Path, nat: str, hairpin: bool, varies: bool) -> None:
    """Behind a lab NAT router, with two STUN servers on the lab's internet: the global endpoint is the
    router's public address; an endpoint-dependent mapping ("edm", nftables ``masquerade fully-random``) is
    seen as varying by destination, an endpoint-independent one ("eim") is not; hairpinning is what the
    router does."""
    inet = lab.lan("inet", subnet="203.0.113.0/24")
    servers = [lab.host("s1"), lab.host("s2")]
    for s in servers:
        inet.attach(s)
    home = lab.lan("home", subnet="198.18.1.0/24")
    router = lab.router("r1", inside=home, outside=inet, nat=nat, hairpin=hairpin)  # type: ignore[arg-type]
    cli = lab.host("cli")
    home.attach(cli)
    for i, s in enumerate(servers):
        _derp_serve(s, tmp_path / f"derp{i}", 8443, 3478)
    stun_args = [arg for s in servers for arg in ("--stun", f"{inet.ip(s)}:3478")]
    done = _tailpy(
        cli, "netcheck", "--json", "--socket", str(tmp_path / "none.sock"), "--timeout", "3", *stun_args
    )
    report = json.loads(done.stdout)
    assert report["udp"]
    assert report["global_v4"].startswith(f"{router.public_ip}:")
    assert report["mapping_varies_by_dest_ip"] is varies and report["mapping_varies_fresh"]
    assert report["hairpinning"] is hairpin


def test_stun_from_the_data_planes_own_socket(lab: Lab, tmp_path: Path, native_device: None) -> None:
    """StunRunner over a real Device (send_datagram out, drain() in): the mapped address is the data
    plane's own socket, and the hairpin probe comes back up through the device's STUN queue."""
    srv, cli = _lan(lab)
    _derp_serve(srv, tmp_path / "one", 8443, 3478)
    _derp_serve(srv, tmp_path / "two", 8444, 3479)
    out = cli.run([sys.executable, "-c", _THROUGH_DEVICE, f"{SERVER_V4}:3478", f"{SERVER_V4}:3479"]).stdout
    got = json.loads(out)
    report = got["report"]
    assert report["global_v4"] == f"{CLIENT_V4}:{got['port']}"
    assert report["mapping_varies_by_dest_ip"] is False
    assert report["hairpinning"] is True
