"""Health warnings on real processes: a DERP relay (`tailpy derp serve`) with a self-signed certificate the
node does not trust. `tailpy status` shows the home relay warning with the TLS reason and how to trust the
CA; tailpyd started with SSL_CERT_FILE naming that certificate connects and the warning clears."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tailpy.lab import Lab
from tailpy.lab.procs import wait_for
from tailpy.lab.tailnet import LabNode, LabTailnet

pytestmark = pytest.mark.lab

DERP_PORT = 8443
STUN_PORT = 3478


def _warning(node: LabNode, name: str) -> dict[str, Any] | None:
    return next((w for w in node.status()["health"] if w["name"] == name), None)


def test_relay_with_untrusted_certificate(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (it makes the relay's self-signed certificate)")
    with Lab() as lab:
        net = LabTailnet(lab)
        relay = net.public_host("relay")
        ip = net.lan.ip(relay)
        cert, key = tmp_path / "relay.pem", tmp_path / "relay.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={ip}",
             "-addext", f"subjectAltName=IP:{ip}", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        log = tmp_path / "relay.log"
        with log.open("w") as f:
            proc = relay.python(
                "tailpy.cli.main", "derp", "serve", "--state-dir", str(tmp_path / "relay"),
                "--listen", f"0.0.0.0:{DERP_PORT}", "--certfile", str(cert), "--keyfile", str(key),
                "--stun-port", str(STUN_PORT), stderr=f,
            )  # fmt: skip

        def listening() -> bool:
            assert proc.poll() is None, log.read_text()
            return "STUN server listening" in log.read_text()

        wait_for(listening, timeout=60, what="tailpy derp serve")
        derp_map = {
            "Regions": {
                "901": {
                    "RegionID": 901,
                    "RegionCode": "tls",
                    "RegionName": "relay with a self-signed certificate",
                    "Nodes": [
                        {"Name": "901a", "RegionID": 901, "HostName": ip, "IPv4": ip, "DERPPort": DERP_PORT,
                         "STUNPort": STUN_PORT},
                    ],
                }
            }
        }  # fmt: skip
        map_file = tmp_path / "derpmap.json"
        map_file.write_text(json.dumps(derp_map))
        net.start_control("--no-derp", "--derp-map", str(map_file))
        a = net.add_node("a")
        a.up(net.authkey())

        warning = wait_for(
            lambda: _warning(a, "home-derp-unreachable"), timeout=60, what="the home relay warning"
        )
        assert "not trusted" in warning["text"] and "SSL_CERT_FILE" in warning["text"]
        assert warning["severity"] == "high" and warning["since"] > 0
        text = a.cli("status")
        first = text.splitlines()[0]
        assert "home-derp-unreachable" in first and "not trusted" in first, text
        assert "self-signed" in text or "self signed" in text, text
        # The log says it once, not at every check.
        wait_for(lambda: "health: home-derp-unreachable" in a.log.read_text(), timeout=10, what="log line")
        assert a.log.read_text().count("WARNING health: home-derp-unreachable") == 1

        # The remedy the warning names: tailpyd trusting the relay's CA through SSL_CERT_FILE.
        a.stop_daemon()
        a.daemon_env = {"SSL_CERT_FILE": str(cert)}
        a.start_daemon()
        wait_for(
            lambda: (
                a.status()["backend_state"] == "Running"
                and any(
                    c["home"] and c["connected"] for c in (a.status()["derp"] or {}).get("connections", [])
                )
            ),
            timeout=60,
            what="a connected to its home relay",
        )
        assert _warning(a, "home-derp-unreachable") is None
        assert "home-derp-unreachable" not in a.cli("status")


def test_control_health_endpoints_in_lab(tmp_path: Path) -> None:
    """`GET /health` on control (and its embedded relay) answers JSON with status "ok"."""
    with Lab() as lab:
        net = LabTailnet(lab)
        url = net.start_control()
        relay_url = url.rsplit(":", 1)[0] + ":3340"
        for u in (url, relay_url):
            probe = (
                "import json, sys, urllib.request; r = urllib.request.urlopen(sys.argv[1] + '/health', "
                "timeout=5); print(r.status, json.dumps(json.load(r)))"
            )
            out = net.control_host.run([sys.executable, "-c", probe, u]).stdout
            status, body = out.split(" ", 1)
            doc = json.loads(body)
            assert status == "200" and doc["status"] == "ok" and isinstance(doc["checks"], dict), out


def test_control_unreachable_warning_comes_and_goes(tmp_path: Path) -> None:
    """Control stops: after a few seconds `tailpy status` says since when it is unreachable and why, the
    log says it once; control back: the warning clears (logged once more)."""
    with Lab() as lab:
        net = LabTailnet(lab)
        net.start_control()
        (a,) = net.connected("a")
        net.stop_control()
        warning = wait_for(lambda: _warning(a, "control-unreachable"), timeout=60, what="the warning")
        assert net.control_url in warning["text"] and "unreachable since" in warning["text"]
        lines = a.cli("status").splitlines()
        assert lines[0].startswith("health: "), lines  # warnings first (its relay went down with it too)
        assert any(x.startswith("health: control-unreachable: ") for x in lines), lines
        net.start_control()
        wait_for(lambda: _warning(a, "control-unreachable") is None, timeout=60, what="the warning to clear")
        text = a.log.read_text()
        assert text.count("WARNING health: control-unreachable:") == 1, text
        assert "control-unreachable: ok again" in text
