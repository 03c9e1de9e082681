"""`GET /health` on control and on the DERP relay (JSON ``{"status", "checks"}``, 200 or 503), and where
control tells nodes to reach its embedded relay (``--server-url``'s host when it listens on every
address)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tailpy.control import ControlConfig, ControlProcess
from tailpy.control.service import derp_advertised_host
from tailpy.derp.server import DerpServer
from tailpy.keys import MachinePrivate


def _config(state_dir: Path, **kw: object) -> ControlConfig:
    base: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "derp_host": "127.0.0.1",
        "derp_port": 0,
        "stun_port": 0,
    }
    return ControlConfig(state_dir=state_dir, **{**base, **kw})  # type: ignore[arg-type]


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


async def _fetch(url: str) -> tuple[int, dict[str, Any]]:
    import asyncio

    return await asyncio.to_thread(_get, url)


async def test_control_and_embedded_relay_health(tmp_path: Path) -> None:
    process = ControlProcess(_config(tmp_path))
    await process.start()
    try:
        assert process.relay is not None and process.server is not None
        host, port = process.addresses[0]
        status, doc = await _fetch(f"http://{host}:{port}/health")
        assert status == 200 and doc["status"] == "ok", doc
        assert doc["checks"]["database"]["status"] == "ok"
        assert doc["checks"]["map_streams"] == {"status": "ok", "open": 0}
        assert doc["checks"]["derp"]["status"] == "ok" and doc["checks"]["derp"]["in_derp_map"]
        rhost, rport = process.relay.addresses[0]
        status, doc = await _fetch(f"http://{rhost}:{rport}/health")
        assert status == 200 and doc["status"] == "ok" and doc["checks"]["relay"]["clients"] == 0

        # A failing check turns the answer into 503 with the reason.
        def broken() -> None:
            raise RuntimeError("database is locked")

        process.server.store.settings = broken  # type: ignore[method-assign,assignment]
        status, doc = await _fetch(f"http://{host}:{port}/health")
        assert status == 503 and doc["status"] == "error"
        assert "database is locked" in doc["checks"]["database"]["error"]
    finally:
        await process.stop()


async def test_relay_health_extra_check_fails_with_503() -> None:
    server = DerpServer(MachinePrivate.generate())
    await server.start("127.0.0.1", 0)
    try:
        server.extra_health["stun"] = lambda: {"status": "error", "error": "cannot bind UDP 3478"}
        host, port = server.addresses[0]
        status, doc = await _fetch(f"http://{host}:{port}/health")
        assert status == 503 and doc["checks"]["stun"]["error"] == "cannot bind UDP 3478"
        assert doc["checks"]["listening"]["status"] == "ok"
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("derp_host", "listen_host", "hostname", "server_url", "want"),
    [
        (None, "0.0.0.0", None, "http://203.0.113.5:8080", "203.0.113.5"),
        (None, None, None, "https://control.example.com", "control.example.com"),
        (None, "0.0.0.0", "derp.example.com", "http://203.0.113.5:8080", "derp.example.com"),
        (None, "192.0.2.1", None, None, "192.0.2.1"),
        ("0.0.0.0", "::", None, None, None),
    ],
)
def test_embedded_relay_host_comes_from_server_url_or_listen(
    derp_host: str | None,
    listen_host: str | None,
    hostname: str | None,
    server_url: str | None,
    want: str | None,
) -> None:
    assert derp_advertised_host(derp_host, listen_host, hostname, server_url) == want


async def test_wildcard_listen_with_server_url_puts_the_relay_in_the_map(tmp_path: Path) -> None:
    process = ControlProcess(
        _config(tmp_path, host=None, derp_host=None, server_url="http://198.51.100.4:8080", stun=False)
    )
    await process.start()
    try:
        dm = process.derp_map
        assert dm is not None and dm.regions[900].nodes[0].ipv4 == "198.51.100.4"
    finally:
        await process.stop()
